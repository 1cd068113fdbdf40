//! The enforcer's TC programs, attached to each pod's host-side veth:
//! - `from_pod` at the TC ingress hook: what the pod sends (pod egress, `DIR_EGRESS`);
//! - `to_pod` at the TC egress hook: what the pod receives (pod ingress, `DIR_INGRESS`).
//!
//! Per packet: endpoint, parse, anti-spoofing, peer identity, fragments, conntrack, policy.
//! Every packet bumps one counter; every drop (and, when asked, every new allowed flow) sends a
//! `VerdictEvent`. Every error path maps to a deliberate verdict with its own reason: nothing
//! fails open silently.
#![no_std]
#![no_main]

mod conntrack;
mod lookup;
mod maps;
mod parse;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use enforcer_common::{
    CONFIG_LOG_ALLOWED, CT_ORIGIN_A, CT_ORIGIN_EGRESS, CT_REVOKED, CtValue, DIR_EGRESS, DIR_INGRESS, EP_HAS_V4,
    EP_HAS_V6, EndpointInfo, FAMILY_V4, FragValue, IDENTITY_HOST, PROTO_UDP, reason,
};

use crate::{
    conntrack::{addr_eq, config_flags, ct_key, frag_key, timeout},
    lookup::{peer_identity, policy_lookup},
    maps::{CONNTRACK, ENDPOINTS, FRAGMENTS, SCRATCH, Scratch},
    parse::{FRAG_FIRST, FRAG_LATER, L4_ICMP_ERROR, PARSED_IP, Packet, parse, parse_inner},
    verdict::{Verdict, count, emit},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    process(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    process(&ctx, DIR_INGRESS)
}

/// Why a packet could not be judged normally; each maps to a drop reason.
enum Error {
    /// Truncated or inconsistent headers.
    Malformed,
    /// A map insert failed for a new flow: fail closed.
    MapFull,
}

impl Error {
    const fn reason(&self) -> u8 {
        match self {
            Error::Malformed => reason::DROP_MALFORMED,
            Error::MapFull => reason::DROP_MAP_FULL,
        }
    }
}

impl From<parse::Malformed> for Error {
    fn from(_: parse::Malformed) -> Self {
        Error::Malformed
    }
}

#[inline(always)]
fn process(ctx: &TcContext, direction: u8) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let bytes = ctx.len();
    let Some(ep) = ENDPOINTS.get_ptr(&ifindex) else {
        count(0, direction, reason::ALLOW_UNMANAGED, bytes);
        return TC_ACT_OK;
    };
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (a one-slot per-CPU array); fail closed, counted as malformed.
        let id = unsafe { (*ep).id };
        count(id, direction, reason::DROP_MALFORMED, bytes);
        return TC_ACT_SHOT;
    };
    let s = unsafe { &mut *s };
    s.ep = unsafe { *ep };
    s.pkt = Packet::zeroed();
    let v = match decide(ctx, s, direction) {
        Ok(v) => v,
        Err(e) => Verdict::new(e.reason()),
    };
    count(s.ep.id, direction, v.reason, bytes);
    if v.is_drop() || (v.new_flow && config_flags() & CONFIG_LOG_ALLOWED != 0) {
        emit(s.ep.id, direction, &s.pkt, &v, bytes);
    }
    if v.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
}

#[inline(always)]
fn is_pod_addr(ep: &EndpointInfo, family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        ep.flags & EP_HAS_V4 != 0
            && addr[0] == ep.ipv4[0]
            && addr[1] == ep.ipv4[1]
            && addr[2] == ep.ipv4[2]
            && addr[3] == ep.ipv4[3]
    } else {
        ep.flags & EP_HAS_V6 != 0 && addr_eq(addr, &ep.ipv6)
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, s: &mut Scratch, dir: u8) -> Result<Verdict, Error> {
    if parse(ctx, &mut s.pkt)? != PARSED_IP {
        return Ok(Verdict::new(reason::ALLOW_NON_IP));
    }
    let ep = &s.ep;
    let pkt = &s.pkt;
    // Anti-spoofing: the pod may only send from its own address.
    if dir == DIR_EGRESS && !is_pod_addr(ep, pkt.family, &pkt.src) {
        return Ok(Verdict::new(reason::DROP_SPOOFED));
    }
    let peer = if dir == DIR_EGRESS {
        &pkt.dst
    } else {
        &pkt.src
    };
    if is_pod_addr(ep, pkt.family, peer) {
        return Ok(Verdict::new(reason::ALLOW_HOST));
    }
    let identity = peer_identity(pkt.family, peer);
    let mut v = Verdict::new(reason::ALLOW_HOST);
    v.peer_identity = identity;
    if identity == IDENTITY_HOST {
        return Ok(v);
    }
    let now = unsafe { bpf_ktime_get_ns() };

    if pkt.frag == FRAG_LATER {
        frag_key(&mut s.frag, s.ep.id, dir, &s.pkt);
        v.reason = reason::DROP_FRAGMENT;
        if let Some(f) = FRAGMENTS.get_ptr_mut(&s.frag) {
            let f = unsafe { &mut *f };
            f.last_seen_ns = now;
            v.reason = reason::ALLOW_FRAGMENT;
            v.rule = f.rule;
            s.pkt.sport = f.sport;
            s.pkt.dport = f.dport;
        } else if !s.ep.isolated(dir) {
            // Any first fragment would be allowed here as a new flow: nothing to bypass.
            v.reason = reason::ALLOW_NOT_ISOLATED;
        }
        return Ok(v);
    }
    if !ep.isolated(DIR_INGRESS) && !ep.isolated(DIR_EGRESS) {
        v.reason = reason::ALLOW_NOT_ISOLATED;
        return Ok(v);
    }

    track(ctx, s, dir, &mut v, now)?;
    if s.pkt.frag == FRAG_FIRST && !v.is_drop() {
        frag_key(&mut s.frag, s.ep.id, dir, &s.pkt);
        let value = FragValue {
            last_seen_ns: now,
            sport: s.pkt.sport,
            dport: s.pkt.dport,
            rule: v.rule,
        };
        // Failing to record only makes the later fragments drop: fail closed.
        let _ = FRAGMENTS.insert(&s.frag, &value, 0);
    }
    Ok(v)
}

/// Conntrack, then policy for new flows. `v` carries the peer identity in and the verdict out.
#[inline(always)]
fn track(
    ctx: &TcContext,
    s: &mut Scratch,
    dir: u8,
    v: &mut Verdict,
    now: u64,
) -> Result<(), Error> {
    let identity = v.peer_identity;
    if s.pkt.l4 == L4_ICMP_ERROR && parse_inner(ctx, &s.pkt, &mut s.inner) {
        let i = &s.inner;
        ct_key(
            &mut s.ct,
            s.ep.id,
            s.pkt.family,
            i.proto,
            &i.src,
            i.sport,
            &i.dst,
            i.dport,
        );
        if let Some(e) = CONNTRACK.get_ptr(&s.ct) {
            let e = unsafe { &*e };
            if e.flags & CT_REVOKED == 0 && now.wrapping_sub(e.last_seen_ns) <= timeout(i.proto) {
                v.reason = reason::ALLOW_RELATED;
                v.rule = e.rule;
                return Ok(());
            }
        }
        // Not about a tracked flow: judged as a new ICMP flow below.
    }
    let pkt = &s.pkt;
    let ep = &s.ep;
    let src_is_a = ct_key(
        &mut s.ct, ep.id, pkt.family, pkt.proto, &pkt.src, pkt.sport, &pkt.dst, pkt.dport,
    );
    if let Some(e) = CONNTRACK.get_ptr_mut(&s.ct) {
        let e = unsafe { &mut *e };
        // A tombstone lives for the non-TCP timeout of silence, whatever the protocol.
        let limit = if e.flags & CT_REVOKED != 0 {
            timeout(PROTO_UDP)
        } else {
            timeout(pkt.proto)
        };
        if now.wrapping_sub(e.last_seen_ns) <= limit {
            let forward = src_is_a == (e.flags & CT_ORIGIN_A != 0);
            v.reason = if forward {
                reason::ALLOW_ESTABLISHED
            } else {
                reason::ALLOW_REPLY
            };
            if e.epoch != ep.epoch {
                // The policy changed since the flow was last allowed: re-check its original
                // direction, peer and destination port.
                let odir = if e.flags & CT_ORIGIN_EGRESS != 0 {
                    DIR_EGRESS
                } else {
                    DIR_INGRESS
                };
                let (pod_port, peer_port) = if dir == DIR_EGRESS {
                    (pkt.sport, pkt.dport)
                } else {
                    (pkt.dport, pkt.sport)
                };
                let oport = if odir == DIR_EGRESS {
                    peer_port
                } else {
                    pod_port
                };
                let rule = if ep.isolated(odir) {
                    match policy_lookup(ep, identity, odir, pkt.proto, oport) {
                        Some(rule) => rule,
                        None => {
                            // Keep a tombstone rather than forget the flow: forgotten, a
                            // packet from the side that is not isolated would open it again.
                            e.flags |= CT_REVOKED;
                            e.epoch = ep.epoch;
                            e.rule = 0;
                            e.last_seen_ns = now;
                            v.reason = reason::DROP_REVOKED;
                            v.rule = 0;
                            return Ok(());
                        }
                    }
                } else {
                    0
                };
                e.flags &= !CT_REVOKED;
                e.epoch = ep.epoch;
                e.rule = rule;
            }
            e.last_seen_ns = now;
            if e.flags & CT_REVOKED != 0 {
                v.reason = reason::DROP_REVOKED;
                return Ok(());
            }
            v.rule = e.rule;
            return Ok(());
        }
    }

    // A new flow.
    if ep.isolated(dir) {
        match policy_lookup(ep, identity, dir, pkt.proto, pkt.dport) {
            Some(rule) => {
                v.reason = reason::ALLOW_POLICY;
                v.rule = rule;
            }
            None => {
                v.reason = reason::DROP_POLICY;
                return Ok(());
            }
        }
    } else {
        v.reason = reason::ALLOW_NOT_ISOLATED;
    }
    let mut flags = 0;
    if src_is_a {
        flags |= CT_ORIGIN_A;
    }
    if dir == DIR_EGRESS {
        flags |= CT_ORIGIN_EGRESS;
    }
    let value = CtValue {
        last_seen_ns: now,
        epoch: ep.epoch,
        flags,
        rule: v.rule,
        _pad: 0,
    };
    if CONNTRACK.insert(&s.ct, &value, 0).is_err() {
        return Err(Error::MapFull);
    }
    v.new_flow = true;
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
