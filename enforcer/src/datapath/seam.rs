//! The real [`DatapathMaps`]: the reconciler's view of the loaded [`Datapath`].

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use enforcer_common::{EndpointInfo, NodePortKey, PeerInfo, PolicyKey, PolicyValue};

use enforcer_policy::state::Prefix;

use crate::{
    datapath::Datapath,
    reconcile::{DatapathMaps, MapTable, seam::MapName},
};

impl DatapathMaps for Datapath {
    /// From the pinned map itself: a map reused across a restart keeps the size it was made
    /// with, whatever the flags say now. The flag's value where the pin cannot be read.
    fn capacity(&mut self, map: MapName) -> Option<usize> {
        let maps = self.root().join("maps");
        let pinned = super::pinned_entries(&maps, map.as_str()).ok().flatten();
        let o = self.options();
        let flag = match map {
            MapName::Endpoints => o.max_endpoints,
            MapName::Policy => o.policy_size,
            MapName::PeersV4 | MapName::PeersV6 => o.peers_size,
            MapName::CidrsV4 | MapName::CidrsV6 => o.cidrs_size,
            MapName::NodePorts => o.node_ports_size,
        };
        Some(pinned.unwrap_or(flag) as usize)
    }
    fn endpoints(&mut self) -> &mut dyn MapTable<u32, EndpointInfo> {
        &mut self.endpoints
    }
    fn peers_v4(&mut self) -> &mut dyn MapTable<[u8; 4], PeerInfo> {
        &mut self.peers_v4
    }
    fn peers_v6(&mut self) -> &mut dyn MapTable<[u8; 16], PeerInfo> {
        &mut self.peers_v6
    }
    fn cidrs_v4(&mut self) -> &mut dyn MapTable<Prefix<Ipv4Addr>, PeerInfo> {
        &mut self.cidrs_v4
    }
    fn cidrs_v6(&mut self) -> &mut dyn MapTable<Prefix<Ipv6Addr>, PeerInfo> {
        &mut self.cidrs_v6
    }
    fn policy(&mut self) -> &mut dyn MapTable<PolicyKey, PolicyValue> {
        &mut self.policy
    }
    fn node_ports(&mut self) -> &mut dyn MapTable<NodePortKey, u32> {
        &mut self.node_ports
    }
    fn attach_exit(&mut self, ifindex: u32) -> Result<()> {
        Datapath::attach_exit(self, ifindex)
    }
    fn detach_exit(&mut self, ifindex: u32) -> Result<()> {
        Datapath::detach_exit(self, ifindex)
    }
    fn exits_attached(&mut self) -> Result<BTreeSet<u32>> {
        Ok(Datapath::exits_attached(self)?.into_iter().collect())
    }
    fn attach(&mut self, ifindex: u32) -> Result<()> {
        Datapath::attach(self, ifindex)
    }
    fn detach(&mut self, ifindex: u32) -> Result<()> {
        Datapath::detach(self, ifindex)
    }
    fn attached(&mut self) -> Result<BTreeSet<u32>> {
        Ok(Datapath::attached(self)?.into_iter().collect())
    }
    fn forget_flows(&mut self, endpoint_id: u32) -> Result<()> {
        self.conntrack.remove_endpoint(endpoint_id)?;
        Ok(())
    }
}
