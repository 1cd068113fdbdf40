//! Egress to Services, judged after kube-proxy's translation.
//!
//! `from_pod` runs before netfilter, so it sees a pod's packet to a Service frontend (a
//! ClusterIP, or a node address on a node port) before kube-proxy DNATs it to a backend. A new
//! flow of an egress-isolated pod to a frontend is therefore *deferred*: `from_pod` records the
//! flow under its original tuple as a pending Service flow ([`CT_SERVICE`], rule 0), writes the
//! original tuple into a [`DEFERRED`] slot and the slot's number into the packet's mark
//! ([`SERVICE_MARK_MASK`]: the mark is kept from the veth's TC ingress to the TC egress of the
//! device the packet leaves by), and lets it go. After the translation, [`judge`] runs on that device: in `to_pod`
//! (through a tail call to `svc_pod`) when the backend is a pod of this node, in `svc_exit` on
//! the node's other interfaces when it is elsewhere. It judges the sending pod's egress policy
//! on the translated destination and records the outcome on the pending flow: its rule, or a
//! revocation. Replies come back un-NATed, from the frontend, and match that flow.
//!
//! A backend on the node itself (a host-network pod) is delivered locally and never reaches a
//! TC egress hook; the flow stays pending and its replies pass, as traffic to the node does.
//! When one is judged (a backend with the node's identity seen on the way out), it is allowed
//! as the node is, unless the pod's egress to the node is judged by policy
//! ([`EP_EGRESS_HOST_JUDGED`](enforcer_common::EP_EGRESS_HOST_JUDGED)): then its entries decide,
//! as for any backend.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::programs::TcContext;
use enforcer_common::{
    CONFIG_LOG_ALLOWED, CT_REVOKED, CT_SERVICE, CtKey, DEFERRED_TTL_NS, DIR_EGRESS, Deferred,
    EndpointInfo, FAMILY_V4, IDENTITY_HOST, NodePortKey, RULE_AUDIT, RULE_IMPLICIT,
    SERVICE_MARK_MASK, SERVICE_MARK_SHIFT, ServiceBackend, audit_only_in, deferred_slot,
    is_deny_rule, reason, rule_id,
};

use crate::{
    conntrack::{CtFound, CtHit, addr_eq, config_flags, ct_insert, ct_key, ct_lookup, new_entry},
    flows,
    lookup::{denial_reason, host_judged, peer_identity, policy_lookup},
    maps::{CONFIG, DEFERRED, ENDPOINTS, NODE_PORTS, SCRATCH, SERVICE_FLOWS},
    mem::copy16,
    parse::{PARSED_IP, Packet, parse},
    verdict::{Verdict, count, emit},
};

/// TC action that lets the next program of the hook (or the default) decide.
pub const TC_ACT_UNSPEC: i32 = -1;

/// Whether `port` is a node port of a Service for `proto`.
#[inline(always)]
pub fn node_port(proto: u8, port: u16) -> bool {
    let key = NodePortKey {
        protocol: proto,
        _pad: 0,
        port,
    };
    NODE_PORTS.get_ptr(&key).is_some()
}

/// Whether a new egress flow to a peer of `identity` on `proto`/`port` goes to a Service
/// frontend, to be judged after the translation.
#[inline(always)]
pub fn deferrable(identity: u32, proto: u8, port: u16) -> bool {
    identity == enforcer_common::IDENTITY_SERVICE
        || (identity == IDENTITY_HOST && node_port(proto, port))
}

/// A keyed mix of the original tuple: the slot of [`DEFERRED`] it takes.
#[inline(always)]
fn slot_of(pkt: &Packet) -> u32 {
    let k = flows::seed().k;
    let w = |a: &[u8; 16], i: usize| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    };
    let mix = |h: u32, x: u32| (h ^ x).wrapping_mul(0x9e37_79b1).rotate_left(13);
    let mut h = k[0] ^ pkt.proto as u32;
    h = mix(h, w(&pkt.src, 0) ^ k[1]);
    h = mix(h, w(&pkt.dst, 0) ^ k[2]);
    if pkt.family != FAMILY_V4 {
        h = mix(h, w(&pkt.src, 1) ^ w(&pkt.src, 2) ^ w(&pkt.src, 3));
        h = mix(h, w(&pkt.dst, 1) ^ w(&pkt.dst, 2) ^ w(&pkt.dst, 3));
    }
    h = mix(h, ((pkt.sport as u32) << 16 | pkt.dport as u32) ^ k[3]);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    deferred_slot(h)
}

/// Hands the packet on to kube-proxy's translation: its original tuple into a [`DEFERRED`]
/// slot, the slot into the mark's [`SERVICE_MARK_MASK`] bits. `false` when there is no slot (cannot happen: the array
/// has every index); the caller then drops.
#[inline(always)]
pub fn defer(ctx: &TcContext, pkt: &Packet, ifindex: u32, now: u64) -> bool {
    let slot = slot_of(pkt);
    let Some(d) = DEFERRED.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: an element of an array map, valid for the program run. Another CPU may write the
    // same slot meanwhile: the judge then finds a tuple that is not its packet's and drops it.
    unsafe {
        copy16(&mut (*d).src, &pkt.src);
        copy16(&mut (*d).dst, &pkt.dst);
        (*d).sport = pkt.sport;
        (*d).dport = pkt.dport;
        (*d).family = pkt.family;
        (*d).protocol = pkt.proto;
        (*d).ifindex = ifindex;
        (*d).stamp_ns = now;
        // Whole-word accesses: the verifier refuses a narrower store into the context, which
        // LLVM would make of a masked update.
        let skb = ctx.skb.skb;
        let mark = read_volatile(&(*skb).mark);
        write_volatile(
            &mut (*skb).mark,
            (mark & !SERVICE_MARK_MASK) | slot << SERVICE_MARK_SHIFT,
        );
    }
    true
}

/// The key of [`SERVICE_FLOWS`] for a pod's Service flow: the pod's end first, then the
/// frontend's, unordered (the flow's direction is known: the pod opened it).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "a flow tuple")]
pub fn service_key(
    key: &mut CtKey,
    endpoint: u32,
    family: u8,
    proto: u8,
    pod: &[u8; 16],
    pod_port: u16,
    frontend: &[u8; 16],
    frontend_port: u16,
) {
    key.endpoint = endpoint;
    key.family = family;
    key.protocol = proto;
    key._pad = 0;
    copy16(&mut key.addr_a, pod);
    copy16(&mut key.addr_b, frontend);
    key.port_a = pod_port;
    key.port_b = frontend_port;
}

/// What [`judge`] did with the packet.
pub enum Judged {
    /// Nothing was deferred: not a packet for this program.
    NotDeferred,
    Allowed,
    Dropped,
}

#[inline(always)]
fn own_addr(ep: &EndpointInfo, family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        ep.flags & enforcer_common::EP_HAS_V4 != 0
            && addr[0] == ep.ipv4[0]
            && addr[1] == ep.ipv4[1]
            && addr[2] == ep.ipv4[2]
            && addr[3] == ep.ipv4[3]
    } else {
        ep.flags & enforcer_common::EP_HAS_V6 != 0 && addr_eq(addr, &ep.ipv6)
    }
}

/// Judges a packet `from_pod` deferred, now that kube-proxy translated it: the sending pod's
/// egress policy on the backend it goes to. Clears the slot from the mark whatever happens.
#[inline(always)]
pub fn judge(ctx: &TcContext) -> Judged {
    let skb = ctx.skb.skb;
    // SAFETY: the context's sk_buff, valid for the run; the mark is writable in TC programs.
    let mark = unsafe { read_volatile(&(*skb).mark) };
    let slot = (mark & SERVICE_MARK_MASK) >> SERVICE_MARK_SHIFT;
    if slot == 0 {
        return Judged::NotDeferred;
    }
    unsafe { write_volatile(&mut (*skb).mark, mark & !SERVICE_MARK_MASK) };
    let bytes = ctx.len();
    let now = crate::clock();
    let cfg = CONFIG.get(0);
    let (Some(s), Some(d)) = (SCRATCH.get_ptr_mut(0), DEFERRED.get_ptr(slot)) else {
        count(0, DIR_EGRESS, reason::DROP_UNRESOLVED, bytes);
        return Judged::Dropped;
    };
    // SAFETY: a per-CPU scratch slot and an array element, both valid for the run.
    let (s, d): (_, &Deferred) = unsafe { (&mut *s, &*d) };
    s.pkt.clear();
    if !matches!(parse(ctx, &mut s.pkt), Ok(PARSED_IP)) {
        count(0, DIR_EGRESS, reason::DROP_UNRESOLVED, bytes);
        return Judged::Dropped;
    }
    let pkt = &s.pkt;
    let (d_family, d_proto, d_sport, d_dport, d_ifindex) =
        (d.family, d.protocol, d.sport, d.dport, d.ifindex);
    // The slot must describe this packet: same protocol and source (kube-proxy masquerades
    // hairpin and node-port traffic to a node address, keeping nothing of the source), fresh.
    let same_source = addr_eq(&pkt.src, &d.src) && pkt.sport == d_sport;
    if now.wrapping_sub(d.stamp_ns) > DEFERRED_TTL_NS
        || d_proto != pkt.proto
        || d_family != pkt.family
        || (!same_source && peer_identity(pkt.family, &pkt.src) != IDENTITY_HOST)
    {
        count(0, DIR_EGRESS, reason::DROP_UNRESOLVED, bytes);
        emit(
            0,
            DIR_EGRESS,
            pkt,
            &Verdict::new(reason::DROP_UNRESOLVED),
            bytes,
        );
        return Judged::Dropped;
    }
    let Some(a) = ENDPOINTS.get_ptr(&d_ifindex) else {
        // The sending pod is gone (or lost its entry) since: nothing to judge it by.
        count(0, DIR_EGRESS, reason::DROP_UNPROGRAMMED, bytes);
        return Judged::Dropped;
    };
    // SAFETY: a hash map value, valid for the run.
    let a = unsafe { &*a };
    let mut v = Verdict::new(reason::ALLOW_POLICY);
    // A pod may always reach itself (hairpin), and the node unless its policy judges the node
    // (EP_EGRESS_HOST_JUDGED); otherwise its egress policy on the backend and the backend's
    // port decides. 0: denied (`v` says why).
    let rule = if own_addr(a, pkt.family, &pkt.dst) {
        v.reason = reason::ALLOW_HOST;
        RULE_IMPLICIT
    } else {
        v.peer_identity = peer_identity(pkt.family, &pkt.dst);
        if v.peer_identity == IDENTITY_HOST && !host_judged(a.flags, DIR_EGRESS) {
            v.reason = reason::ALLOW_HOST;
            RULE_IMPLICIT
        } else if !a.isolated(DIR_EGRESS) {
            v.reason = reason::ALLOW_NOT_ISOLATED;
            RULE_IMPLICIT
        } else {
            match policy_lookup(
                a.id,
                &a.port_masks,
                v.peer_identity,
                DIR_EGRESS,
                pkt.proto,
                pkt.dport,
            ) {
                r if !is_deny_rule(r) => r,
                // Only audit policies isolate its egress: allowed as would-drop, judged.
                _ if audit_only_in(a.flags, DIR_EGRESS) => {
                    v.reason = reason::ALLOW_AUDIT;
                    RULE_AUDIT
                }
                // No entry, or a deny entry (the rule named).
                r => {
                    v.reason = denial_reason(r);
                    v.rule = rule_id(r);
                    0
                }
            }
        }
    };
    if rule != 0 {
        v.rule = if rule == RULE_IMPLICIT { 0 } else { rule };
    } else if !v.is_drop() {
        // An entry allowing with rule 0 ("allowed, unnamed"): the judge records 0 as pending,
        // so it cannot allow it.
        v.reason = reason::DROP_POLICY;
    }
    // The pod's flow under its original tuple: judged now.
    let src_is_a = ct_key(
        &mut s.ct, a.id, d_family, d_proto, &d.src, d_sport, &d.dst, d_dport,
    );
    let mut hit = CtHit::new();
    match ct_lookup(&s.ct, now, cfg, &mut hit) {
        CtFound::Yes => {
            let e = &mut hit.value;
            if rule != 0 {
                e.flags &= !CT_REVOKED;
            } else {
                e.flags |= CT_REVOKED;
            }
            e.flags |= CT_SERVICE;
            e.rule = rule;
            e.epoch = a.epoch;
            e.last_seen_ns = now;
            hit.store(&s.ct);
        }
        CtFound::No if rule != 0 => {
            // Evicted since `from_pod` recorded it: recorded again (failing, the pod's next
            // packet is deferred again).
            let mut value = new_entry(src_is_a, DIR_EGRESS, now, a.epoch, rule);
            value.flags |= CT_SERVICE;
            let _ = ct_insert(&s.ct, &value, now, cfg);
        }
        CtFound::No | CtFound::Busy => {}
    }
    if rule != 0 {
        // The backend, for the re-check of the flow's replies after a policy change.
        service_key(
            &mut s.ct.v6,
            a.id,
            d_family,
            d_proto,
            &d.src,
            d_sport,
            &d.dst,
            d_dport,
        );
        let mut backend = ServiceBackend::default();
        copy16(&mut backend.addr, &s.pkt.dst);
        backend.port = s.pkt.dport;
        let _ = SERVICE_FLOWS.insert(&s.ct.v6, &backend, 0);
    }
    count(a.id, DIR_EGRESS, v.reason, bytes);
    // `is_drop` holds for `ALLOW_AUDIT` too (see `is_drop_reason`): a would-drop is reported.
    if v.is_drop() || config_flags(cfg) & CONFIG_LOG_ALLOWED != 0 {
        emit(a.id, DIR_EGRESS, &s.pkt, &v, bytes);
    }
    if rule == 0 {
        Judged::Dropped
    } else {
        Judged::Allowed
    }
}
