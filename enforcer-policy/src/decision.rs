//! The datapath's decision, done over a [`DesiredState`] instead of kernel maps: the same steps,
//! in the same order, as the eBPF program takes for the first packet of a flow. Used by the
//! property tests (compiled state vs the reference evaluator) and by `enforcer compile` checks.

use std::{fmt, net::IpAddr};

use enforcer_common::{
    DIR_EGRESS, EP_EGRESS_HOST_JUDGED, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD,
    PORT_MASK_ANY_PROTO, PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
    RULE_DENY,
};

use crate::state::{DesiredState, PodRef, Prefix};

/// Why [`decide`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The pod has no endpoint entry: the datapath does not touch its traffic.
    Unmanaged,
    /// The peer address is the pod's own.
    SelfTraffic,
    /// The peer is the node.
    Host,
    /// The direction is not isolated.
    NotIsolated,
    /// A policy entry allows it.
    Policy,
    /// Isolated, and no policy entry allows it, or the first entry found denies it
    /// ([`RULE_DENY`]).
    Denied,
    /// Isolated by audit policies only, and no policy entry allows it: allowed, reported as
    /// would-drop.
    WouldDrop,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unmanaged => "unmanaged",
            Self::SelfTraffic => "self",
            Self::Host => "host",
            Self::NotIsolated => "not-isolated",
            Self::Policy => "policy",
            Self::Denied => "policy-denied",
            Self::WouldDrop => "would-drop",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The rule id (without [`RULE_DENY`]) of the entry that decided: the first one found.
    pub rule: Option<u32>,
    pub reason: Reason,
    /// The identity the peer address resolved to.
    pub peer_identity: u32,
}

/// The identity of an address: exact peer entry, else longest CIDR prefix, else world.
pub fn resolve_peer(state: &DesiredState, peer: IpAddr) -> u32 {
    match peer {
        IpAddr::V4(a) => {
            if let Some(p) = state.peers_v4.get(&a) {
                return p.identity;
            }
            let bits = u32::from(a);
            for len in (0..=32u8).rev() {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                if let Some(p) = state.cidrs_v4.get(&Prefix {
                    addr: (bits & mask).into(),
                    len,
                }) {
                    return p.identity;
                }
            }
        }
        IpAddr::V6(a) => {
            if let Some(p) = state.peers_v6.get(&a) {
                return p.identity;
            }
            let bits = u128::from(a);
            for len in (0..=128u8).rev() {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                if let Some(p) = state.cidrs_v6.get(&Prefix {
                    addr: (bits & mask).into(),
                    len,
                }) {
                    return p.identity;
                }
            }
        }
    }
    IDENTITY_WORLD
}

/// The verdict of the datapath for a new flow at `endpoint` in `direction` with the peer at
/// `peer` (source on ingress, destination on egress), `port` being the flow's destination port.
pub fn decide(
    state: &DesiredState,
    endpoint: &PodRef,
    direction: u8,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Decision {
    let identity = resolve_peer(state, peer);
    let done = |allowed, reason, rule| Decision {
        allowed,
        rule,
        reason,
        peer_identity: identity,
    };
    let Some(ep) = state.endpoints.get(endpoint) else {
        return done(true, Reason::Unmanaged, None);
    };
    let info = &ep.info;
    let own = match peer {
        IpAddr::V4(a) => info.flags & enforcer_common::EP_HAS_V4 != 0 && info.ipv4 == a.octets(),
        IpAddr::V6(a) => info.flags & enforcer_common::EP_HAS_V6 != 0 && info.ipv6 == a.octets(),
    };
    if own || ep.ips.contains(&peer) {
        return done(true, Reason::SelfTraffic, None);
    }
    // The node is allowed, but where the tiers judge this endpoint's egress to it: then it is
    // looked up like any identity.
    let judged = direction == DIR_EGRESS && info.flags & EP_EGRESS_HOST_JUDGED != 0;
    if identity == IDENTITY_HOST && !judged {
        return done(true, Reason::Host, None);
    }
    if !info.isolated(direction) {
        return done(true, Reason::NotIsolated, None);
    }
    let masks = info
        .port_masks
        .get(usize::from(direction))
        .copied()
        .unwrap_or(0);
    let audit_only = enforcer_common::audit_only_in(info.flags, direction);
    // The first entry found decides, allowing or denying (a would-drop where only audit
    // policies isolate, as a miss there).
    let hit = |v: &PolicyValue| {
        if v.rule & RULE_DENY != 0 && audit_only {
            done(true, Reason::WouldDrop, None)
        } else if v.rule & RULE_DENY != 0 {
            done(false, Reason::Denied, Some(v.rule & !RULE_DENY))
        } else {
            done(true, Reason::Policy, Some(v.rule))
        }
    };
    let ported = matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP);
    for id in [identity, IDENTITY_ANY] {
        if ported {
            for len in (0..=16u8).rev() {
                if masks & (1 << len) == 0 {
                    continue;
                }
                let key = PolicyKey::new(info.id, id, direction, protocol, port, len);
                if let Some(v) = state.policy.get(&key) {
                    return hit(v);
                }
            }
        }
        if masks & PORT_MASK_ANY_PROTO != 0 {
            let key = PolicyKey::new(info.id, id, direction, PROTO_ANY, 0, 0);
            if let Some(v) = state.policy.get(&key) {
                return hit(v);
            }
        }
    }
    if audit_only {
        return done(true, Reason::WouldDrop, None);
    }
    done(false, Reason::Denied, None)
}
