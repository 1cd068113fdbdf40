//! Peer identity (ipcache) and policy lookups. A bounded number of lookups each: for the peer
//! one `PEER_SLOTS` bucket (IPv4), then at most 1 exact + 1 LPM; for the policy at most 2 * 18
//! hash lookups.

use core::{
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    DIR_EGRESS, EP_EGRESS_HOST_JUDGED, FAMILY_V4, IDENTITY_ANY, IDENTITY_WORLD,
    PORT_MASK_ANY_PROTO, PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey, RULE_DENY,
    peer_bucket, peer_way_identity, port_mask, reason,
};

use crate::maps::{CIDRS_V4, CIDRS_V6, PEER_SLOTS, PEERS_V4, PEERS_V6, POLICY};

/// Buckets of `PEER_SLOTS`, set by the loader (`.rodata`: a constant to the verifier and the
/// JIT); 0 = no cache, every address is looked up in `PEERS_V4`.
#[unsafe(no_mangle)]
static PEER_BUCKETS: u32 = 0;

/// Identity of `addr`: exact pod/node address first, then the CIDR regions, else world.
#[inline(always)]
pub fn peer_identity(family: u8, addr: &[u8; 16]) -> u32 {
    if family == FAMILY_V4 {
        return peer_identity_v4([addr[0], addr[1], addr[2], addr[3]]);
    } else {
        if let Some(p) = PEERS_V6.get_ptr(addr) {
            return unsafe { (*p).identity };
        }
        if let Some(p) = CIDRS_V6.get(&Key::new(128, *addr)) {
            return p.identity;
        }
    }
    IDENTITY_WORLD
}

/// [`peer_identity`] of an IPv4 address (network order): its `PEER_SLOTS` way when it has
/// one (one load of a line shared by four buckets), else `PEERS_V4`, then the CIDR regions.
#[inline(always)]
pub fn peer_identity_v4(a: [u8; 4]) -> u32 {
    // SAFETY: a plain read of a global the loader fills in.
    let n = unsafe { read_volatile(&PEER_BUCKETS) };
    if n != 0
        && let Some(b) = PEER_SLOTS.get_ptr(peer_bucket(a, n))
    {
        // SAFETY: two aligned words of a map value, each read with one load (the agent stores
        // each with one store).
        let (w0, w1) = unsafe { (read_volatile(&(*b).ways[0]), read_volatile(&(*b).ways[1])) };
        if let Some(id) = peer_way_identity(w0, a) {
            return id;
        }
        if let Some(id) = peer_way_identity(w1, a) {
            return id;
        }
    }
    if let Some(p) = PEERS_V4.get_ptr(&a) {
        return unsafe { (*p).identity };
    }
    if let Some(p) = CIDRS_V4.get(&Key::new(32, a)) {
        return p.identity;
    }
    IDENTITY_WORLD
}

/// `PolicyKey::new(..)` as four word stores. Built as a struct literal, its zero padding becomes
/// a `memset` call, which the BPF backend makes a byte loop.
#[inline(always)]
fn policy_key(
    key: &mut MaybeUninit<PolicyKey>,
    endpoint: u32,
    identity: u32,
    direction: u8,
    protocol: u8,
    port: u16,
    len: u8,
) -> &PolicyKey {
    const {
        assert!(core::mem::offset_of!(PolicyKey, identity) == 4);
        assert!(core::mem::offset_of!(PolicyKey, direction) == 8);
        assert!(core::mem::offset_of!(PolicyKey, protocol) == 9);
        assert!(core::mem::offset_of!(PolicyKey, port_prefix_len) == 10);
        assert!(core::mem::offset_of!(PolicyKey, port) == 12);
        assert!(core::mem::size_of::<PolicyKey>() == 16);
    };
    let w = key.as_mut_ptr() as *mut u32;
    let port = (port & port_mask(len)).to_ne_bytes();
    unsafe {
        write_volatile(w, endpoint);
        write_volatile(w.add(1), identity);
        write_volatile(w.add(2), u32::from_ne_bytes([direction, protocol, len, 0]));
        write_volatile(w.add(3), u32::from_ne_bytes([port[0], port[1], 0, 0]));
        key.assume_init_ref()
    }
}

#[inline(always)]
const fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// The `rule` of the first POLICY entry found for a new flow of `proto` to destination `port`
/// with a peer of `identity` in `direction` at endpoint `endpoint`, whose `port_masks` are
/// given: the peer's identity first, then [`IDENTITY_ANY`]. [`RULE_DENY`] set denies (a deny
/// entry of a cluster policy, or [`RULE_DENY`] alone: no entry found, denied unnamed, as the
/// compiler's rule ids start at 1); clear, it allows (rule 0: allowed, unnamed).
///
/// One value for both denials, so callers test one bit once, after the lookup: a test inside
/// the unrolled probes, or a second path for the miss, would cost `from_pod` verifier budget
/// it does not have.
#[inline(always)]
pub fn policy_lookup(
    endpoint: u32,
    port_masks: &[u32; 2],
    identity: u32,
    direction: u8,
    proto: u8,
    port: u16,
) -> u32 {
    let masks = if direction == 0 {
        port_masks[0]
    } else {
        port_masks[1]
    };
    let mut i = 0;
    while i < 2 {
        let id = if i == 0 { identity } else { IDENTITY_ANY };
        if has_ports(proto) {
            let mut n: u32 = 17;
            while n > 0 {
                n -= 1;
                if masks & (1 << n) != 0 {
                    let mut key = MaybeUninit::uninit();
                    let key = policy_key(&mut key, endpoint, id, direction, proto, port, n as u8);
                    if let Some(v) = POLICY.get_ptr(key) {
                        return unsafe { (*v).rule };
                    }
                }
            }
        }
        if masks & PORT_MASK_ANY_PROTO != 0 {
            let mut key = MaybeUninit::uninit();
            let key = policy_key(&mut key, endpoint, id, direction, PROTO_ANY, 0, 0);
            if let Some(v) = POLICY.get_ptr(key) {
                return unsafe { (*v).rule };
            }
        }
        i += 1;
    }
    RULE_DENY
}

/// The drop reason of a new flow [`policy_lookup`] denied with `rule`: a deny entry names its
/// rule ([`reason::DROP_DENY_RULE`]), a miss does not ([`reason::DROP_POLICY`]). Arithmetic,
/// not a branch: the drop path stays one path for the verifier.
#[inline(always)]
pub fn denial_reason(rule: u32) -> u8 {
    reason::DROP_POLICY + (rule != RULE_DENY) as u8 * (reason::DROP_DENY_RULE - reason::DROP_POLICY)
}

/// What a peer's identity is compared with to let it through as the node, untracked, for
/// endpoint `flags` in `dir`: [`enforcer_common::IDENTITY_HOST`], or, when policy judges that
/// direction's flows to the node ([`host_judged`]), [`IDENTITY_ANY`], which no peer resolves
/// to, so the node goes on to the policy lookup like any peer. Arithmetic, not a branch: a
/// branch gives the verifier a second walk of the new-flow path with the node's identity, which
/// `from_pod` has no budget for; compared with this, the node and the other peers go on as one.
#[inline(always)]
pub fn host_exempt(flags: u32, dir: u8) -> u32 {
    let judged = (flags >> EP_EGRESS_HOST_JUDGED.trailing_zeros()) & (dir == DIR_EGRESS) as u32;
    enforcer_common::IDENTITY_HOST ^ (judged & 1)
}

/// Whether endpoint `flags` have new flows to the node ([`enforcer_common::IDENTITY_HOST`]) in
/// `dir` judged by the policy entries rather than always allowed: egress with
/// [`EP_EGRESS_HOST_JUDGED`] only (the node's probes into a pod always pass).
#[inline(always)]
pub fn host_judged(flags: u32, dir: u8) -> bool {
    dir == DIR_EGRESS && flags & EP_EGRESS_HOST_JUDGED != 0
}
