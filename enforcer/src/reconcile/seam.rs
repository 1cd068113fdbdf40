//! The seam between the reconciler and the kernel: the datapath as the reconciler sees it
//! ([`DatapathMaps`]: each map a [`MapTable`], and the attach points) and the node's routes to
//! pods ([`Routes`]). `crate::datapath` implements them over pinned aya maps and links;
//! `super::fake` over in-memory maps, for tests of everything above the kernel.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use enforcer_common::{EndpointInfo, NodePortKey, PeerInfo, PolicyKey, PolicyValue};
use enforcer_policy::state::Prefix;

/// One key/value map of the datapath.
pub trait MapTable<K, V> {
    /// Current value of `key`, if any.
    fn get(&self, key: &K) -> Result<Option<V>>;
    /// Insert or replace one entry (atomic per entry in the kernel).
    fn set(&mut self, key: &K, value: &V) -> Result<()>;
    /// Remove one entry; removing an absent key is not an error.
    fn remove(&mut self, key: &K) -> Result<()>;
    /// All keys present now.
    fn keys(&self) -> Result<Vec<K>>;
}

/// A map the reconciler writes, in the order it writes additions (removals go in reverse).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    Policy,
    PeersV4,
    PeersV6,
    CidrsV4,
    CidrsV6,
    NodePorts,
    Endpoints,
}

impl MapName {
    pub const ALL: [Self; 7] = [
        Self::Policy,
        Self::PeersV4,
        Self::PeersV6,
        Self::CidrsV4,
        Self::CidrsV6,
        Self::NodePorts,
        Self::Endpoints,
    ];

    /// The map's name, as pinned and as the metrics label it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Policy => enforcer_common::MAP_POLICY,
            Self::PeersV4 => enforcer_common::MAP_PEERS_V4,
            Self::PeersV6 => enforcer_common::MAP_PEERS_V6,
            Self::CidrsV4 => enforcer_common::MAP_CIDRS_V4,
            Self::CidrsV6 => enforcer_common::MAP_CIDRS_V6,
            Self::NodePorts => enforcer_common::MAP_NODE_PORTS,
            Self::Endpoints => enforcer_common::MAP_ENDPOINTS,
        }
    }
}

impl std::fmt::Display for MapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The datapath as the reconciler needs it.
pub trait DatapathMaps {
    /// Most entries `map` can hold (its `max_entries`), `None` when unknown: the reconciler
    /// plans its writes within it, so a full map costs what does not fit, not the whole job.
    fn capacity(&mut self, map: MapName) -> Option<usize> {
        let _ = map;
        None
    }
    fn endpoints(&mut self) -> &mut dyn MapTable<u32, EndpointInfo>;
    /// Keyed by the address bytes in network order, as the program looks them up.
    fn peers_v4(&mut self) -> &mut dyn MapTable<[u8; 4], PeerInfo>;
    fn peers_v6(&mut self) -> &mut dyn MapTable<[u8; 16], PeerInfo>;
    fn cidrs_v4(&mut self) -> &mut dyn MapTable<Prefix<Ipv4Addr>, PeerInfo>;
    fn cidrs_v6(&mut self) -> &mut dyn MapTable<Prefix<Ipv6Addr>, PeerInfo>;
    fn policy(&mut self) -> &mut dyn MapTable<PolicyKey, PolicyValue>;
    /// The Services' node ports (value 1).
    fn node_ports(&mut self) -> &mut dyn MapTable<NodePortKey, u32>;
    /// Attach the exit program (`svc_exit`, TC egress) to one of the node's other interfaces
    /// (uplink, tunnel, bridge), where it judges deferred Service packets that leave by it.
    fn attach_exit(&mut self, ifindex: u32) -> Result<()>;
    /// Detach the exit program from `ifindex` (the interface may be gone already).
    fn detach_exit(&mut self, ifindex: u32) -> Result<()>;
    /// Interfaces with the exit program attached.
    fn exits_attached(&mut self) -> Result<BTreeSet<u32>>;
    /// Attach both programs to `ifindex` (replacing older programs atomically).
    fn attach(&mut self, ifindex: u32) -> Result<()>;
    /// Detach both programs from `ifindex` (the interface may be gone already).
    fn detach(&mut self, ifindex: u32) -> Result<()>;
    /// Interfaces with our programs attached.
    fn attached(&mut self) -> Result<BTreeSet<u32>>;
    /// Drop the conntrack and fragment entries of an endpoint id that is going away.
    fn forget_flows(&mut self, endpoint_id: u32) -> Result<()>;
}
/// Where a pod's own host-side interface is, as the node's network says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// The pod's own veth.
    Found(u32),
    /// Not found yet (no route yet, a MAC address not resolved yet); retried.
    NotYet(String),
    /// The address leads to an interface that is not a pod's own veth (a bridge, an uplink, a
    /// device of another kind, a route shared by several addresses): never attached to; retried.
    Unsupported(String),
}

/// Resolves a pod's address to its own host-side interface, and lists the node's interfaces.
pub trait Routes {
    /// The ifindex of the interface the node routes `ip` to.
    fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>>;
    /// The pod's own interface for `ip`, or why there is none.
    fn locate(&self, ip: IpAddr) -> Result<Located> {
        Ok(match self.ifindex_for(ip)? {
            Some(i) => Located::Found(i),
            None => Located::NotYet(format!("no route to {ip}")),
        })
    }
    /// Whether `ifindex` still exists as a pod's veth: a pod keeps the interface it was attached
    /// to while its route (or neighbour entry) is briefly gone, as during a CNI restart.
    fn exists(&self, ifindex: u32) -> bool {
        let _ = ifindex;
        false
    }
    /// The interfaces of the agent's network namespace that are up, but `lo`: (ifindex, name).
    /// The exit program goes on every one that is not a pod's veth.
    fn interfaces(&self) -> Result<Vec<(u32, String)>>;
}
