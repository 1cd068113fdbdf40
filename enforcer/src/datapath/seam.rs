//! The real [`DatapathMaps`]: the reconciler's view of the loaded [`Datapath`].

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use enforcer_common::{EndpointInfo, PeerInfo, PolicyKey, PolicyValue};

use enforcer_policy::state::Prefix;

use crate::{
    datapath::Datapath,
    reconcile::{DatapathMaps, MapTable},
};

impl DatapathMaps for Datapath {
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
