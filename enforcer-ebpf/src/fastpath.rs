//! The fast path: a plain IPv4 TCP or UDP packet of a flow conntrack already allows, judged from
//! a few header words read in place and one conntrack lookup; on a conntrack miss, a packet from
//! or to the node (the peer lookup) and the first of a new flow a policy allows (the peer and
//! policy lookups, then tracked), judged from the same words.
//! It touches no scratch space and none of the general parser's code, so on the real path (where
//! the stack and the applications evict our code and data between two packets) the common
//! packet pays for a small, contiguous piece of the program.
//!
//! It only ever answers "established", "reply", "allowed by policy" or "the node", and only
//! when the full path would give the same answer for the same packet: anything else (IPv6, IP
//! options, fragments, other protocols, a header the full parser would call malformed, a spoofed
//! or self-addressed packet, a stale, revoked or re-check-due entry, a new flow of a direction
//! no policy isolates, denied (no entry, or a deny entry), to the node where policy judges it,
//! logged, or whose insert failed) goes to the full path unchanged, with what was already
//! looked up ([`Known`]), so no lookup is made twice.

use core::ptr::read_volatile;

use aya_ebpf::programs::TcContext;
use enforcer_common::{
    CONFIG_CT_LRU_ALL, CONFIG_LOG_ALLOWED, CT_ORIGIN_A, CT_REVOKED, CT_SERVICE, Config, CtKeyV4,
    DIR_EGRESS, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_INGRESS_ISOLATED, EndpointInfo, EndpointSlot,
    IDENTITY_ANY, IDENTITY_HOST, PROTO_TCP, PROTO_UDP, endpoint_slot, flow_stamp, flow_stamp_ns,
    is_deny_rule, isolated_in, reason, tcp_flags_after,
};

use crate::{
    conntrack::{admit, config_flags, ct_key_v4, fresh, new_entry, release, timeout},
    flows::{self, Insert, Lookup, Snap},
    lookup::{host_judged, peer_identity_v4, policy_lookup},
    maps::{CONNTRACK_V4, ENDPOINT_SLOTS},
};

/// What the fast path needs of the endpoint: from its slot or from its ENDPOINTS entry.
#[derive(Clone, Copy)]
pub struct FastEp {
    pub id: u32,
    pub flags: u32,
    pub epoch: u32,
    /// The pod's IPv4 address as the packet carries it (network order).
    pub ipv4: u32,
    pub port_masks: [u32; 2],
}

impl FastEp {
    #[inline(always)]
    pub fn of(ep: &EndpointInfo) -> Self {
        Self {
            id: ep.id,
            flags: ep.flags,
            epoch: ep.epoch,
            ipv4: u32::from_ne_bytes(ep.ipv4),
            port_masks: ep.port_masks,
        }
    }

    /// Whether what the fast path found with this copy holds for `ep`: same endpoint, same
    /// isolation and the same policy keys to probe (a slot can lag its entry by an agent write).
    #[inline(always)]
    pub fn decides_as(&self, ep: &EndpointInfo) -> bool {
        self.id == ep.id
            && self.flags == ep.flags
            && self.port_masks[0] == ep.port_masks[0]
            && self.port_masks[1] == ep.port_masks[1]
    }
}

/// The endpoint at `ifindex` from its slot of `ENDPOINT_SLOTS`: one array element, no hash, so
/// the conntrack lookup that follows waits on one cache miss instead of three. `None` when the
/// slot describes another ifindex, is free, or is being written (odd sequence, or a first word
/// that changed while the fields were read): ENDPOINTS then decides, as it always may.
///
/// The two reads of the first word bracket the field reads in program order; the JIT keeps
/// that order and x86-64 does not reorder loads with loads, which is why the agent fills slots
/// on x86-64 only (elsewhere every slot stays free).
#[inline(always)]
pub fn slot_endpoint(ifindex: u32) -> Option<FastEp> {
    let s: *const EndpointSlot = ENDPOINT_SLOTS.get_ptr(endpoint_slot(ifindex))?;
    let head = s as *const u64;
    // SAFETY: a pointer to a 32-byte, 8-aligned element of an array map (page-aligned values).
    unsafe {
        let h = read_volatile(head);
        if h as u32 != ifindex || (h >> 32) & 1 != 0 {
            return None;
        }
        let ep = FastEp {
            id: read_volatile(&(*s).id),
            flags: read_volatile(&(*s).flags),
            epoch: read_volatile(&(*s).epoch),
            ipv4: read_volatile(&(*s).ipv4 as *const [u8; 4] as *const u32),
            port_masks: [
                read_volatile(&(*s).port_masks[0]),
                read_volatile(&(*s).port_masks[1]),
            ],
        };
        if read_volatile(head) != h {
            return None;
        }
        Some(ep)
    }
}

/// What the fast path found.
pub enum Fast {
    /// Allowed: an established flow (`ALLOW_ESTABLISHED` or `ALLOW_REPLY`), a new one a policy
    /// allows, now tracked (`ALLOW_POLICY`), or a peer on the node (`ALLOW_HOST`, untracked).
    Allowed(u8),
    /// A plain IPv4 TCP/UDP packet whose flow key is not in conntrack and that the fast path
    /// did not admit as a new flow; what it looked up is in the caller's [`Known`].
    Missed,
    /// Not for the fast path.
    Other,
}

/// What the fast path looked up for a new flow it left to the full path: valid there for the
/// key that path builds when the endpoint it reads [`FastEp::decides_as`] the one used here.
#[derive(Clone, Copy)]
pub struct Known {
    /// The conntrack lookup of the flow's key missed.
    pub ct_miss: bool,
    /// The peer's identity, [`IDENTITY_ANY`] when not looked up.
    pub peer: u32,
    /// The policy lookup for the peer denied the flow: its `rule` ([`policy_lookup`]:
    /// [`RULE_DENY`](enforcer_common::RULE_DENY) set, never 0); 0 when not looked up or allowed.
    pub denied: u32,
}

impl Known {
    pub const NOTHING: Known = Known {
        ct_miss: false,
        peer: IDENTITY_ANY,
        denied: 0,
    };
}

const ETH_HLEN: usize = 14;
/// Ethernet, a 20-byte IPv4 header and the 4 port bytes.
const MIN_LINEAR: usize = ETH_HLEN + 20 + 4;
/// A TCP header's flags byte.
const TCP_FLAGS_OFF: usize = 13;

#[inline(always)]
fn be16(p: *const u8, i: usize) -> u16 {
    unsafe { u16::from_be_bytes([*p.add(i), *p.add(i + 1)]) }
}

#[inline(always)]
pub fn established_v4(
    ctx: &TcContext,
    ep: &FastEp,
    dir: u8,
    now: u64,
    cfg: Option<&Config>,
    known: &mut Known,
) -> Fast {
    if ep.flags & EP_HAS_V4 == 0 || ep.flags & (EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED) == 0 {
        return Fast::Other;
    }
    // A tagged frame is the full path's to drop.
    if crate::parse::vlan_tagged(ctx) {
        return Fast::Other;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + MIN_LINEAR > end {
        return Fast::Other;
    }
    let p = data as *const u8;
    let len = ctx.len() as usize;
    // IPv4 without options, not a fragment (no MF, offset 0).
    if be16(p, 12) != 0x0800 || unsafe { *p.add(ETH_HLEN) } != 0x45 {
        return Fast::Other;
    }
    let ip = unsafe { p.add(ETH_HLEN) };
    let total = be16(ip, 2) as usize;
    if be16(ip, 6) & 0x3fff != 0 || total > len - ETH_HLEN {
        return Fast::Other;
    }
    let proto = unsafe { *ip.add(9) };
    // The full parser's minimum for each (a shorter datagram is malformed there).
    let need = match proto {
        PROTO_TCP => 20 + 20,
        PROTO_UDP => 20 + 8,
        _ => return Fast::Other,
    };
    if total < need {
        return Fast::Other;
    }
    // The TCP flags (0 for UDP), for the flow's state.
    let mut tcp = 0;
    if proto == PROTO_TCP {
        // Data offset below 5 words is malformed there; it and the flags sit past MIN_LINEAR.
        if data + ETH_HLEN + 20 + TCP_FLAGS_OFF + 1 > end || unsafe { *ip.add(20 + 12) } >> 4 < 5 {
            return Fast::Other;
        }
        tcp = unsafe { *ip.add(20 + TCP_FLAGS_OFF) };
    }
    let word = |i: usize| unsafe { core::ptr::read_unaligned(ip.add(i) as *const u32) };
    let (src, dst) = (word(12), word(16));
    let own = ep.ipv4;
    // Spoofed (pod egress from another address) or to/from the pod itself: the full path.
    if (dir == DIR_EGRESS && src != own) || (if dir == DIR_EGRESS { dst } else { src }) == own {
        return Fast::Other;
    }
    let (sport, dport) = (be16(ip, 20), be16(ip, 22));
    let mut key = core::mem::MaybeUninit::<CtKeyV4>::uninit();
    let (key, src_is_a) = ct_key_v4(&mut key, ep.id, proto, src, sport, dst, dport);
    let peer = if dir == DIR_EGRESS { dst } else { src };
    let n = flows::buckets();
    // With the table on, the LRU map behind it is looked at only for an overflowed bucket (or
    // while flows of older programs may sit there unmarked).
    let mut snap = Snap::new();
    let in_lru = if n != 0 {
        match flows::lookup(key, n, &mut snap) {
            Lookup::Found => {
                if snap.flags & CT_REVOKED != 0
                    || snap.epoch != ep.epoch
                    || moves_state(proto, tcp, snap.flags, src_is_a)
                    || pending_service(dir, snap.flags, snap.rule)
                {
                    return Fast::Other;
                }
                // As below: within the tick of the last packet, no timeouts and no store.
                if flow_stamp(now) != snap.last_seen {
                    let seen = flow_stamp_ns(snap.last_seen, now);
                    if !fresh(now, seen, timeout(cfg, proto, snap.flags)) {
                        return Fast::Other;
                    }
                    snap.touch(now);
                }
                return Fast::Allowed(if src_is_a == (snap.flags & CT_ORIGIN_A != 0) {
                    reason::ALLOW_ESTABLISHED
                } else {
                    reason::ALLOW_REPLY
                });
            }
            Lookup::Busy => return Fast::Other,
            Lookup::Missing => config_flags(cfg) & CONFIG_CT_LRU_ALL != 0,
            Lookup::Overflowed => true,
        }
    } else {
        true
    };
    // One call of the new-flow path (it is inlined: one copy of it).
    let e = if in_lru {
        CONNTRACK_V4.get_ptr_mut(key)
    } else {
        None
    };
    let Some(e) = e else {
        return new_v4(
            ep, key, &snap, src_is_a, dir, proto, peer, dport, now, cfg, known,
        );
    };
    let e = unsafe { &mut *e };
    if e.flags & CT_REVOKED != 0
        || e.epoch != ep.epoch
        || moves_state(proto, tcp, e.flags, src_is_a)
        || pending_service(dir, e.flags, e.rule)
    {
        return Fast::Other;
    }
    // The coarse clock moves once a tick: most packets come in the tick of the flow's last one,
    // which cannot be idle too long, and need neither CONFIG's timeouts (a cache line) nor a
    // write to the entry.
    if now > e.last_seen_ns {
        if !fresh(now, e.last_seen_ns, timeout(cfg, proto, e.flags)) {
            return Fast::Other;
        }
        e.last_seen_ns = now;
    }
    Fast::Allowed(if src_is_a == (e.flags & CT_ORIGIN_A != 0) {
        reason::ALLOW_ESTABLISHED
    } else {
        reason::ALLOW_REPLY
    })
}

/// A packet the pod sends on a Service flow not judged yet: the full path defers it again.
#[inline(always)]
fn pending_service(dir: u8, flags: u32, rule: u32) -> bool {
    dir == DIR_EGRESS && flags & CT_SERVICE != 0 && rule == 0
}

/// Whether a TCP packet with flags `tcp`, from end `a` when `src_is_a`, changes the state of
/// its flow (the first reply, a FIN, a RST, a SYN opening a closed flow again): the full path
/// writes the change. A few packets a connection.
#[inline(always)]
fn moves_state(proto: u8, tcp: u8, flags: u32, src_is_a: bool) -> bool {
    proto == PROTO_TCP && tcp_flags_after(flags, tcp, src_is_a, flags & CT_ORIGIN_A != 0) != flags
}

/// A flow conntrack does not hold: a peer on the node is allowed here, untracked (kubelet
/// probes: every packet of theirs comes this way); a new flow is allowed and tracked here when
/// the direction is isolated, a policy allows the peer, and the flow is not to be logged (the
/// event needs the full path's parsed packet); anything else goes to the full path with what
/// was found.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "a flow tuple")]
fn new_v4(
    ep: &FastEp,
    key: &CtKeyV4,
    snap: &Snap,
    src_is_a: bool,
    dir: u8,
    proto: u8,
    peer: u32,
    dport: u16,
    now: u64,
    cfg: Option<&Config>,
    known: &mut Known,
) -> Fast {
    known.ct_miss = true;
    known.peer = peer_identity_v4(peer.to_ne_bytes());
    // A node port from an egress-isolated pod: the full path defers it (as a Service
    // frontend, whose identity no policy entry names: denied here, deferred there). Egress to
    // the node that policy judges (EP_EGRESS_HOST_JUDGED): the full path judges and tracks it.
    if known.peer == IDENTITY_HOST {
        if host_judged(ep.flags, dir)
            || (dir == DIR_EGRESS
                && isolated_in(ep.flags, DIR_EGRESS)
                && crate::service::node_port(proto, dport))
        {
            return Fast::Missed;
        }
        return Fast::Allowed(reason::ALLOW_HOST);
    }
    if !isolated_in(ep.flags, dir) || config_flags(cfg) & CONFIG_LOG_ALLOWED != 0 {
        return Fast::Missed;
    }
    // Denied (no entry, or a deny entry): the full path drops it, with the event.
    let rule = policy_lookup(ep.id, &ep.port_masks, known.peer, dir, proto, dport);
    if is_deny_rule(rule) {
        known.denied = rule;
        return Fast::Missed;
    }
    // Over its flow limit: the full path drops it, with the event.
    if !admit(ep.id, dir, now, cfg) {
        return Fast::Missed;
    }
    let value = new_entry(src_is_a, dir, now, ep.epoch, rule);
    let n = flows::buckets();
    if n != 0 {
        match flows::insert_missing(key, snap, n, &value, now, cfg) {
            Insert::Stored => return Fast::Allowed(reason::ALLOW_POLICY),
            // The full path tries again.
            Insert::Busy => {
                release(ep.id, dir, cfg);
                return Fast::Missed;
            }
            Insert::Spill => {}
        }
    }
    if CONNTRACK_V4.insert(key, &value, 0).is_err() {
        // The full path tries again and fails closed, with the event.
        release(ep.id, dir, cfg);
        return Fast::Missed;
    }
    Fast::Allowed(reason::ALLOW_POLICY)
}
