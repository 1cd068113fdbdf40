//! The enforcer's TC programs, attached to each pod's host-side veth:
//! - `from_pod` at the TC ingress hook: what the pod sends (pod egress, `DIR_EGRESS`);
//! - `to_pod` at the TC egress hook: what the pod receives (pod ingress, `DIR_INGRESS`).
//!
//! Per packet: endpoint (its slot of `ENDPOINT_SLOTS`, else its ENDPOINTS entry), then the
//! fast path ([`fastpath`]: a plain IPv4 TCP/UDP packet of an allowed flow, the first of a new
//! flow a policy allows, or one from or to the node, stops there); otherwise parse, anti-spoofing, conntrack (other
//! established flows stop there) and, for new flows, peer identity and policy, reusing what the
//! fast path already looked up; see [`decide`] for the exact order.
//! Every packet bumps one counter; every drop (and, when asked, every new allowed flow) sends a
//! `VerdictEvent`. Every error path maps to a deliberate verdict with its own reason: nothing
//! fails open silently.
#![no_std]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "the compare-and-swap of crate::flows (no 32-bit or CAS atomics on this target)"
)]
#![no_main]

mod audit;
mod conntrack;
mod fastpath;
mod flows;
mod lookup;
mod maps;
mod mem;
mod parse;
mod service;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
};
use enforcer_common::{
    CONFIG_LOG_ALLOWED, CT_ORIGIN_A, CT_ORIGIN_EGRESS, CT_REVOKED, CT_SERVICE, Config, DIR_EGRESS,
    DIR_INGRESS, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6, EP_INGRESS_ISOLATED, EndpointInfo,
    FAMILY_V4, FragValue, IDENTITY_ANY, IDENTITY_HOST, PROTO_TCP, RULE_IMPLICIT, SERVICE_MARK_MASK,
    SVC_PROG_JUDGE, SVC_PROG_TO_POD, audit_slot, is_deny_rule, reason, rule_id, tcp_flags_after,
};

use crate::{
    conntrack::{
        CtFound, CtHit, addr_eq, admit, config_flags, ct_insert, ct_key, ct_lookup, ct_remove,
        frag_key, fresh, new_entry, release, timeout,
    },
    fastpath::{Fast, FastEp, Known, established_v4, slot_endpoint},
    lookup::{denial_reason, host_exempt, host_judged, peer_identity, policy_lookup},
    maps::{AuditFlow, CONFIG, ENDPOINTS, FRAGMENTS, SCRATCH, SERVICE_FLOWS, SVC_PROGS, Scratch},
    parse::Inner,
    parse::{
        FRAG_FIRST, FRAG_LATER, L4_ICMP_ERROR, PARSED_ARP, PARSED_IP, PARSED_ND, PARSED_VLAN,
        Packet, parse, parse_inner, vlan_tagged,
    },
    service::{Judged, defer, deferrable, service_key},
    verdict::{Verdict, count, emit},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    process(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // A packet `from_pod` deferred to a Service: its sender's egress is judged first.
    if unsafe { (*ctx.skb.skb).mark } & SERVICE_MARK_MASK != 0 {
        unsafe { SVC_PROGS.tail_call(&ctx, SVC_PROG_JUDGE) };
        // No judge loaded: fail closed.
        count(0, DIR_EGRESS, reason::DROP_UNRESOLVED, ctx.len());
        return TC_ACT_SHOT;
    }
    process(&ctx, DIR_INGRESS)
}

/// Tail-called by `to_pod` for a deferred packet: judges the sender's egress on the backend
/// (this pod), then hands the packet back to `to_pod` for the pod's own ingress.
#[classifier]
pub fn svc_pod(ctx: TcContext) -> i32 {
    if let Judged::Dropped = service::judge(&ctx) {
        return TC_ACT_SHOT;
    }
    unsafe { SVC_PROGS.tail_call(&ctx, SVC_PROG_TO_POD) };
    count(0, DIR_INGRESS, reason::DROP_UNRESOLVED, ctx.len());
    TC_ACT_SHOT
}

/// Tail-called by `from_pod` or `to_pod` for a new flow only audit policies would drop: lets it
/// through as a would-drop (see [`audit`]).
#[classifier]
pub fn audit_pod(ctx: TcContext) -> i32 {
    audit::audit(&ctx)
}

/// On the node's other interfaces (TC egress): judges a deferred packet leaving the node (a
/// backend elsewhere); every other packet goes on to the hook's next program untouched.
#[classifier]
pub fn svc_exit(ctx: TcContext) -> i32 {
    match service::judge(&ctx) {
        Judged::Dropped => TC_ACT_SHOT,
        Judged::Allowed | Judged::NotDeferred => service::TC_ACT_UNSPEC,
    }
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
    let cfg = CONFIG.get(0);
    let now = clock();
    // The endpoint from its slot when it has one (the common case), else from ENDPOINTS.
    // Programs on an interface without an entry: a pod the agent attached but could not program
    // (the agent writes an entry before attaching and detaches before removing it, so nothing
    // else gets here). Denied, counted on endpoint 0; no event (there is no parsed packet to
    // name), the agent names the pod instead.
    let (fast, mut entry) = match slot_endpoint(ifindex) {
        Some(f) => (f, None),
        None => {
            let Some(ep) = ENDPOINTS.get_ptr(&ifindex) else {
                count(0, direction, reason::DROP_UNPROGRAMMED, bytes);
                return TC_ACT_SHOT;
            };
            (FastEp::of(unsafe { &*ep }), Some(ep))
        }
    };
    let mut known = Known::NOTHING;
    if let Fast::Allowed(reason) = established_v4(ctx, &fast, direction, now, cfg, &mut known) {
        count(fast.id, direction, reason, bytes);
        return TC_ACT_OK;
    }
    // The rest reads the authoritative entry (in place: no per-packet copy). A slot can only
    // lag it by the few microseconds of an agent write; the entry wins.
    if entry.is_none() {
        entry = ENDPOINTS.get_ptr(&ifindex);
    }
    let Some(ep) = entry else {
        // The slot outlived its entry by an agent write: the entry wins.
        count(0, direction, reason::DROP_UNPROGRAMMED, bytes);
        return TC_ACT_SHOT;
    };
    let ep = unsafe { &*ep };
    // What the fast path found holds only if the slot decides as the entry does.
    let known = if fast.decides_as(ep) {
        known
    } else {
        Known::NOTHING
    };
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (a one-slot per-CPU array); fail closed, counted as malformed.
        count(ep.id, direction, reason::DROP_MALFORMED, bytes);
        return TC_ACT_SHOT;
    };
    let s = unsafe { &mut *s };
    s.pkt.clear();
    let v = match decide(ctx, ep, s, direction, cfg, now, known) {
        Ok(v) => v,
        Err(e) => Verdict::new(e.reason()),
    };
    count(ep.id, direction, v.reason, bytes);
    if v.is_drop() || (v.new_flow && config_flags(cfg) & CONFIG_LOG_ALLOWED != 0) {
        emit(ep.id, direction, &s.pkt, &v, bytes);
    }
    if v.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// The time stamp of conntrack and fragment entries: CLOCK_MONOTONIC at tick resolution, which is
/// plenty for idle timeouts of seconds to hours and cheaper than `bpf_ktime_get_ns` (no clock
/// source read). Verdict events keep the precise clock.
#[inline(always)]
pub(crate) fn clock() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
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

/// An ND/MLD message that stays on the link: from a link-local or unspecified address (or, sent
/// by the pod, its own), to a link-local or multicast one (or, sent to the pod, its own: the
/// node's unreachability probes are unicast from its link-local address).
#[inline(always)]
fn nd_scoped(ep: &EndpointInfo, pkt: &Packet, dir: u8) -> bool {
    let link_local = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    let src_ok = link_local(&pkt.src)
        || addr_eq(&pkt.src, &[0; 16])
        || (dir == DIR_EGRESS && is_pod_addr(ep, pkt.family, &pkt.src));
    let dst_ok = link_local(&pkt.dst)
        || pkt.dst[0] == 0xff
        || (dir == DIR_INGRESS && is_pod_addr(ep, pkt.family, &pkt.dst));
    src_ok && dst_ok
}

/// The peer's address: the destination of what the pod sends, the source of what it receives.
#[inline(always)]
fn peer_addr(pkt: &Packet, dir: u8) -> &[u8; 16] {
    if dir == DIR_EGRESS {
        &pkt.dst
    } else {
        &pkt.src
    }
}

/// Order of the checks: parse, anti-spoofing, the pod itself, then
/// - the fast path (an isolated endpoint, a whole datagram or first fragment, not an ICMP error):
///   conntrack first, so an established flow needs no peer (ipcache) lookup; the identity is
///   looked up only for a new flow, an epoch re-check or a drop. A node/host peer is never
///   tracked, so its packets miss conntrack and come out as `ALLOW_HOST` there;
/// - otherwise the peer identity first (node/host peers allowed), then later fragments,
///   endpoints isolated in no direction, related ICMP errors and conntrack.
#[inline(always)]
fn decide(
    ctx: &TcContext,
    ep: &EndpointInfo,
    s: &mut Scratch,
    dir: u8,
    cfg: Option<&Config>,
    now: u64,
    known: Known,
) -> Result<Verdict, Error> {
    // A tagged frame is judged by what the kernel will deliver after untagging it, which TC
    // never sees whole: drop it, whatever it carries.
    if vlan_tagged(ctx) {
        return Ok(Verdict::new(reason::DROP_VLAN));
    }
    match parse(ctx, &mut s.pkt)? {
        PARSED_IP => {}
        PARSED_VLAN => return Ok(Verdict::new(reason::DROP_VLAN)),
        PARSED_ARP => {
            // A pod answers and asks only for its own address (no ARP spoofing of others).
            let own = is_pod_addr(ep, FAMILY_V4, &s.pkt.src);
            return Ok(Verdict::new(if dir == DIR_INGRESS || own {
                reason::ALLOW_NON_IP
            } else {
                reason::DROP_SPOOFED
            }));
        }
        PARSED_ND => {
            // Neighbour discovery and MLD stay on the link; anything else shaped like them is
            // judged as the IPv6 packet it is.
            if nd_scoped(ep, &s.pkt, dir) {
                return Ok(Verdict::new(reason::ALLOW_NON_IP));
            }
        }
        _ => {
            return Ok(Verdict::new(if dir == DIR_EGRESS {
                reason::DROP_NON_IP
            } else {
                reason::ALLOW_NON_IP
            }));
        }
    }
    let pkt = &s.pkt;
    // Anti-spoofing: the pod may only send from its own address, and nothing may reach it from
    // its own address (a pod's traffic to itself never crosses its veth; hairpin traffic
    // through a Service arrives masqueraded).
    if dir == DIR_EGRESS && !is_pod_addr(ep, pkt.family, &pkt.src) {
        return Ok(Verdict::new(reason::DROP_SPOOFED));
    }
    if dir == DIR_INGRESS && is_pod_addr(ep, pkt.family, &pkt.src) {
        return Ok(Verdict::new(reason::DROP_SPOOFED));
    }
    if is_pod_addr(ep, pkt.family, peer_addr(pkt, dir)) {
        return Ok(Verdict::new(reason::ALLOW_HOST));
    }
    let isolated = ep.flags & (EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED) != 0;
    let mut v = Verdict::new(reason::ALLOW_HOST);
    let fast = isolated && pkt.frag != FRAG_LATER && pkt.l4 != L4_ICMP_ERROR;
    if !fast {
        v.peer_identity = peer_identity(pkt.family, peer_addr(pkt, dir));
        if v.peer_identity == IDENTITY_HOST && !host_judged(ep.flags, dir) {
            return Ok(v);
        }
    }
    if pkt.frag == FRAG_LATER {
        frag_key(&mut s.frag, ep.id, dir, &s.pkt);
        v.reason = reason::DROP_FRAGMENT;
        if let Some(f) = FRAGMENTS.get_ptr_mut(&s.frag) {
            let f = unsafe { &mut *f };
            f.last_seen_ns = now;
            v.reason = reason::ALLOW_FRAGMENT;
            v.rule = f.rule;
            s.pkt.sport = f.sport;
            s.pkt.dport = f.dport;
        } else if !ep.enforced(dir) {
            // Any first fragment would be allowed here as a new flow: nothing to bypass.
            v.reason = reason::ALLOW_NOT_ISOLATED;
        }
        return Ok(v);
    }
    if !isolated {
        v.reason = reason::ALLOW_NOT_ISOLATED;
        return Ok(v);
    }

    track(ctx, ep, s, dir, &mut v, now, fast, cfg, known)?;
    // A deferred first fragment is judged after the translation, which reassembles: its later
    // fragments find no entry and drop (fail closed).
    if s.pkt.frag == FRAG_FIRST
        && !v.is_drop()
        && v.reason != reason::ALLOW_HOST
        && v.reason != reason::ALLOW_SERVICE
    {
        frag_key(&mut s.frag, ep.id, dir, &s.pkt);
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

/// Whether an ICMP error travels between the ends of the flow it names: it goes back to the
/// sender of the packet that caused it (outer destination = inner source), and one the pod sends
/// comes from the end it reports about (outer source = inner destination). Errors the pod
/// receives may come from a router on the path. Without this, naming a tracked flow inside
/// would carry any payload to any host.
#[inline(always)]
fn error_between_endpoints(pkt: &Packet, inner: &Inner, dir: u8) -> bool {
    addr_eq(&pkt.dst, &inner.src) && (dir == DIR_INGRESS || addr_eq(&pkt.src, &inner.dst))
}

/// The `CT_*` flags of a tracked flow (`flags`) once this packet (from end `a` when
/// `src_is_a`) passes: its TCP state moved on (see [`tcp_flags_after`]), or unchanged.
#[inline(always)]
fn tcp_state(pkt: &Packet, flags: u32, src_is_a: bool) -> u32 {
    if pkt.proto == PROTO_TCP {
        tcp_flags_after(flags, pkt.tcp_flags, src_is_a, flags & CT_ORIGIN_A != 0)
    } else {
        flags
    }
}

/// Conntrack, then policy for new flows. `v` carries the verdict out, and the peer identity in
/// when `!fast` (on the fast path it is looked up here when needed).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the state of one decision")]
fn track(
    ctx: &TcContext,
    ep: &EndpointInfo,
    s: &mut Scratch,
    dir: u8,
    v: &mut Verdict,
    now: u64,
    fast: bool,
    cfg: Option<&Config>,
    known: Known,
) -> Result<(), Error> {
    if s.pkt.l4 == L4_ICMP_ERROR
        && parse_inner(ctx, &s.pkt, &mut s.inner)
        && error_between_endpoints(&s.pkt, &s.inner, dir)
    {
        let i = &s.inner;
        ct_key(
            &mut s.ct,
            ep.id,
            s.pkt.family,
            i.proto,
            &i.src,
            i.sport,
            &i.dst,
            i.dport,
        );
        let mut hit = CtHit::new();
        if ct_lookup(&s.ct, now, cfg, &mut hit) == CtFound::Yes {
            let e = &hit.value;
            if e.flags & CT_REVOKED == 0
                && fresh(now, e.last_seen_ns, timeout(cfg, i.proto, e.flags))
            {
                v.reason = reason::ALLOW_RELATED;
                v.rule = e.rule;
                return Ok(());
            }
        }
        // Not about a tracked flow: judged as a new ICMP flow below.
    }
    let pkt = &s.pkt;
    let src_is_a = ct_key(
        &mut s.ct, ep.id, pkt.family, pkt.proto, &pkt.src, pkt.sport, &pkt.dst, pkt.dport,
    );
    // The fast path has just missed this very key: no second lookup.
    let mut hit = CtHit::new();
    let found = if known.ct_miss {
        CtFound::No
    } else {
        ct_lookup(&s.ct, now, cfg, &mut hit)
    };
    if found == CtFound::Busy {
        return Err(Error::MapFull);
    }
    if found == CtFound::Yes {
        let e = &mut hit.value;
        if fresh(now, e.last_seen_ns, timeout(cfg, pkt.proto, e.flags)) {
            let forward = src_is_a == (e.flags & CT_ORIGIN_A != 0);
            v.reason = if forward {
                reason::ALLOW_ESTABLISHED
            } else {
                reason::ALLOW_REPLY
            };
            let service = e.flags & CT_SERVICE != 0;
            if e.epoch != ep.epoch {
                // The policy changed since the flow was last allowed: re-check its original
                // direction, peer and destination port.
                let odir = if e.flags & CT_ORIGIN_EGRESS != 0 {
                    DIR_EGRESS
                } else {
                    DIR_INGRESS
                };
                if fast {
                    v.peer_identity = peer_identity(pkt.family, peer_addr(pkt, dir));
                    if v.peer_identity == IDENTITY_HOST && !host_judged(ep.flags, odir) {
                        // Became the node's address: allowed, and no longer tracked.
                        ct_remove(&s.ct);
                        v.reason = reason::ALLOW_HOST;
                        v.rule = 0;
                        return Ok(());
                    }
                }
                let (pod_port, peer_port) = if dir == DIR_EGRESS {
                    (pkt.sport, pkt.dport)
                } else {
                    (pkt.dport, pkt.sport)
                };
                let mut oport = if odir == DIR_EGRESS {
                    peer_port
                } else {
                    pod_port
                };
                // A Service flow is judged on its backend: a reply (from the frontend) by the
                // backend the judge recorded; the pod's own packets, or a reply whose backend
                // is not known, make the flow pending again (the pod's next packet is judged
                // anew after the translation). A direction only audit policies isolate is not
                // enforced: its flows stay (and are revoked here once a policy enforces it).
                let mut judge = !service && ep.enforced(odir);
                let mut pending = service && ep.enforced(DIR_EGRESS);
                if pending && dir == DIR_INGRESS {
                    service_key(
                        &mut s.svc, ep.id, pkt.family, pkt.proto, &pkt.dst, pkt.dport, &pkt.src,
                        pkt.sport,
                    );
                    if let Some(b) = SERVICE_FLOWS.get_ptr(&s.svc) {
                        let b = unsafe { &*b };
                        v.peer_identity = peer_identity(pkt.family, &b.addr);
                        oport = b.port;
                        pending = false;
                        judge = (v.peer_identity != IDENTITY_HOST
                            || host_judged(ep.flags, DIR_EGRESS))
                            && !is_pod_addr(ep, pkt.family, &b.addr);
                    }
                }
                let rule = if judge {
                    match policy_lookup(
                        ep.id,
                        &ep.port_masks,
                        v.peer_identity,
                        odir,
                        pkt.proto,
                        oport,
                    ) {
                        rule if !is_deny_rule(rule) => rule,
                        // No entry, or a deny entry (an Admin Deny added while it was open).
                        _ => {
                            // Keep a tombstone rather than forget the flow: forgotten, a
                            // packet from a side that is not isolated (a retransmission) would
                            // open it again as a new flow, and the other side's packets would
                            // pass as its replies.
                            e.flags |= CT_REVOKED;
                            e.epoch = ep.epoch;
                            e.rule = 0;
                            e.last_seen_ns = now;
                            hit.store(&s.ct);
                            v.reason = reason::DROP_REVOKED;
                            v.rule = 0;
                            return Ok(());
                        }
                    }
                } else if pending {
                    0
                } else if service {
                    RULE_IMPLICIT
                } else {
                    0
                };
                e.flags = tcp_state(pkt, e.flags, src_is_a) & !CT_REVOKED;
                e.epoch = ep.epoch;
                e.rule = rule;
                e.last_seen_ns = now;
                hit.store(&s.ct);
            } else if e.flags & CT_REVOKED == 0 && tcp_state(pkt, e.flags, src_is_a) != e.flags {
                e.flags = tcp_state(pkt, e.flags, src_is_a);
                e.last_seen_ns = now;
                hit.store(&s.ct);
            } else {
                // The coarse clock moves once a tick: most packets need not dirty the entry.
                hit.touch(now);
            }
            let e = &hit.value;
            if e.flags & CT_REVOKED != 0 {
                v.reason = reason::DROP_REVOKED;
                return Ok(());
            }
            if service && dir == DIR_EGRESS && e.rule == 0 {
                // Not judged yet: on to the translation again.
                defer(ctx, pkt, unsafe { (*ctx.skb.skb).ifindex }, now);
                v.reason = reason::ALLOW_SERVICE;
                return Ok(());
            }
            v.rule = if e.rule == RULE_IMPLICIT { 0 } else { e.rule };
            return Ok(());
        }
    }

    // A new flow.
    if fast {
        v.peer_identity = if known.peer != IDENTITY_ANY {
            known.peer
        } else {
            peer_identity(pkt.family, peer_addr(pkt, dir))
        };
    }
    // To a Service frontend or a node port: tracked as a pending Service flow, judged on the
    // backend after the translation.
    let service = dir == DIR_EGRESS
        && ep.isolated(DIR_EGRESS)
        && deferrable(v.peer_identity, pkt.proto, pkt.dport);
    // The node: allowed untracked, unless policy judges this endpoint's egress to it.
    if v.peer_identity == host_exempt(ep.flags, dir) && !service {
        return Ok(());
    }
    if service {
        v.reason = reason::ALLOW_SERVICE;
    } else if ep.isolated(dir) {
        let rule = if known.denied != 0 {
            known.denied
        } else {
            policy_lookup(
                ep.id,
                &ep.port_masks,
                v.peer_identity,
                dir,
                pkt.proto,
                pkt.dport,
            )
        };
        if !is_deny_rule(rule) {
            v.reason = reason::ALLOW_POLICY;
            v.rule = rule;
        } else {
            // No entry, or a deny entry first (a miss with a name): one drop path.
            v.reason = denial_reason(rule);
            v.rule = rule_id(rule);
            // Only audit policies isolate it: `audit_pod` lets it through as a would-drop,
            // with what it needs in this CPU's scratch. Otherwise the call goes to an empty
            // slot and fails, and the packet drops (as it does when `audit_pod` is not
            // loaded: fail closed). No branch here: one more would cost `from_pod` more of
            // the verifier's budget than it has.
            s.audit = AuditFlow {
                endpoint: ep.id,
                epoch: ep.epoch,
                peer_identity: v.peer_identity,
                direction: dir,
                src_is_a: src_is_a as u8,
                _pad: [0; 2],
            };
            unsafe { SVC_PROGS.tail_call(ctx, audit_slot(ep.flags, dir)) };
            return Ok(());
        }
    } else {
        v.reason = reason::ALLOW_NOT_ISOLATED;
    }
    if !admit(ep.id, dir, now, cfg) {
        v.reason = reason::DROP_FLOW_LIMIT;
        v.rule = 0;
        return Ok(());
    }
    let mut value = new_entry(src_is_a, dir, now, ep.epoch, v.rule);
    value.flags |= (service as u32) * CT_SERVICE;
    if ct_insert(&s.ct, &value, now, cfg).is_err() {
        release(ep.id, dir, cfg);
        return Err(Error::MapFull);
    }
    if service {
        defer(ctx, pkt, unsafe { (*ctx.skb.skb).ifindex }, now);
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
