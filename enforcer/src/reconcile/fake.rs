//! In-memory fakes of the kernel seam, for tests of everything above the kernel (this crate's
//! unit tests, and other crates' through the `testkit` feature).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use enforcer_common::{EndpointInfo, NodePortKey, PeerInfo, PolicyKey, PolicyValue};
use enforcer_policy::state::Prefix;

use super::seam::{DatapathMaps, MapName, MapTable, Routes};

/// In-memory map, for tests of everything above the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTable<K: Ord, V> {
    pub entries: BTreeMap<K, V>,
    /// Make every `set` fail (a full map, a kernel error), to test what a failure leaves behind.
    pub fail_writes: bool,
    /// Most entries, as a kernel map's `max_entries`: a `set` of a new key beyond it fails
    /// (`None`: unbounded). Reported by [`DatapathMaps::capacity`].
    pub capacity: Option<usize>,
    /// `get` + `keys` calls so far: what a kernel would have been asked.
    pub reads: std::cell::Cell<usize>,
    /// When set, every write is logged here, stamped from the clock: tables sharing one clock
    /// give the order of writes across maps, for tests that replay a change write by write.
    pub journal: Option<Journal<K, V>>,
}

/// The writes of one [`FakeTable`]: (sequence number, key, value or `None` for a removal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal<K, V> {
    pub clock: std::rc::Rc<std::cell::Cell<usize>>,
    pub writes: Vec<(usize, K, Option<V>)>,
}

impl<K, V> Journal<K, V> {
    fn log(&mut self, key: K, value: Option<V>) {
        let n = self.clock.get();
        self.clock.set(n + 1);
        self.writes.push((n, key, value));
    }
}

impl<K: Ord, V> Default for FakeTable<K, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            fail_writes: false,
            capacity: None,
            reads: std::cell::Cell::new(0),
            journal: None,
        }
    }
}

impl<K: Ord + Clone, V: Clone> MapTable<K, V> for FakeTable<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        self.reads.set(self.reads.get() + 1);
        Ok(self.entries.get(key).cloned())
    }
    fn set(&mut self, key: &K, value: &V) -> Result<()> {
        anyhow::ensure!(!self.fail_writes, "write refused");
        anyhow::ensure!(
            self.entries.contains_key(key) || self.capacity.is_none_or(|c| self.entries.len() < c),
            "map full"
        );
        self.entries.insert(key.clone(), value.clone());
        if let Some(j) = &mut self.journal {
            j.log(key.clone(), Some(value.clone()));
        }
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<()> {
        self.entries.remove(key);
        if let Some(j) = &mut self.journal {
            j.log(key.clone(), None);
        }
        Ok(())
    }
    fn keys(&self) -> Result<Vec<K>> {
        self.reads.set(self.reads.get() + 1);
        Ok(self.entries.keys().cloned().collect())
    }
}
/// A dataplane of in-memory maps, for tests of everything above the kernel.
#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub endpoints: FakeTable<u32, EndpointInfo>,
    pub peers_v4: FakeTable<[u8; 4], PeerInfo>,
    pub peers_v6: FakeTable<[u8; 16], PeerInfo>,
    pub cidrs_v4: FakeTable<Prefix<Ipv4Addr>, PeerInfo>,
    pub cidrs_v6: FakeTable<Prefix<Ipv6Addr>, PeerInfo>,
    pub policy: FakeTable<PolicyKey, PolicyValue>,
    pub node_ports: FakeTable<NodePortKey, u32>,
    pub links: BTreeSet<u32>,
    /// Interfaces with the exit program.
    pub exits: BTreeSet<u32>,
    /// Interfaces whose exit attach fails (a kernel error), with the error.
    pub exit_failures: BTreeMap<u32, String>,
    pub forgotten: Vec<u32>,
}

impl FakeDatapath {
    /// Logs every write from now on, in one order across all maps (see [`FakeTable::journal`]),
    /// dropping what was logged before.
    ///
    /// [`FakeTable::journal`]: FakeTable::journal
    pub fn start_journal(&mut self) {
        let clock = std::rc::Rc::default();
        fn on<K: Ord, V>(t: &mut FakeTable<K, V>, clock: &std::rc::Rc<std::cell::Cell<usize>>) {
            t.journal = Some(Journal {
                clock: clock.clone(),
                writes: Vec::new(),
            });
        }
        on(&mut self.endpoints, &clock);
        on(&mut self.peers_v4, &clock);
        on(&mut self.peers_v6, &clock);
        on(&mut self.cidrs_v4, &clock);
        on(&mut self.cidrs_v6, &clock);
        on(&mut self.policy, &clock);
        on(&mut self.node_ports, &clock);
    }

    /// Sets the capacity of one map (`None`: unbounded).
    pub fn set_capacity(&mut self, map: MapName, capacity: Option<usize>) {
        match map {
            MapName::Endpoints => self.endpoints.capacity = capacity,
            MapName::PeersV4 => self.peers_v4.capacity = capacity,
            MapName::PeersV6 => self.peers_v6.capacity = capacity,
            MapName::CidrsV4 => self.cidrs_v4.capacity = capacity,
            MapName::CidrsV6 => self.cidrs_v6.capacity = capacity,
            MapName::Policy => self.policy.capacity = capacity,
            MapName::NodePorts => self.node_ports.capacity = capacity,
        }
    }
}

impl DatapathMaps for FakeDatapath {
    fn capacity(&mut self, map: MapName) -> Option<usize> {
        match map {
            MapName::Endpoints => self.endpoints.capacity,
            MapName::PeersV4 => self.peers_v4.capacity,
            MapName::PeersV6 => self.peers_v6.capacity,
            MapName::CidrsV4 => self.cidrs_v4.capacity,
            MapName::CidrsV6 => self.cidrs_v6.capacity,
            MapName::Policy => self.policy.capacity,
            MapName::NodePorts => self.node_ports.capacity,
        }
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
        if let Some(e) = self.exit_failures.get(&ifindex) {
            anyhow::bail!("{e}");
        }
        self.exits.insert(ifindex);
        Ok(())
    }
    fn detach_exit(&mut self, ifindex: u32) -> Result<()> {
        self.exits.remove(&ifindex);
        Ok(())
    }
    fn exits_attached(&mut self) -> Result<BTreeSet<u32>> {
        Ok(self.exits.clone())
    }
    fn attach(&mut self, ifindex: u32) -> Result<()> {
        self.links.insert(ifindex);
        Ok(())
    }
    fn detach(&mut self, ifindex: u32) -> Result<()> {
        self.links.remove(&ifindex);
        Ok(())
    }
    fn attached(&mut self) -> Result<BTreeSet<u32>> {
        Ok(self.links.clone())
    }
    fn forget_flows(&mut self, endpoint_id: u32) -> Result<()> {
        self.forgotten.push(endpoint_id);
        Ok(())
    }
}

/// Routes from a fixed table, for tests.
#[derive(Debug, Default)]
pub struct FakeRoutes {
    /// Pod address -> the ifindex of its veth (named `veth<ifindex>`).
    pub routes: BTreeMap<IpAddr, u32>,
    /// The node's other interfaces that are up (uplinks, tunnels, bridges): ifindex -> name.
    pub others: BTreeMap<u32, String>,
}

impl FakeRoutes {
    /// Pods' veths only.
    pub fn new(routes: BTreeMap<IpAddr, u32>) -> Self {
        Self {
            routes,
            others: BTreeMap::new(),
        }
    }
}

impl Routes for FakeRoutes {
    fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>> {
        Ok(self.routes.get(&ip).copied())
    }
    /// The interfaces of the table exist; no other does.
    fn exists(&self, ifindex: u32) -> bool {
        self.routes.values().any(|i| *i == ifindex)
    }
    /// The pods' veths and the other interfaces, by ifindex.
    fn interfaces(&self) -> Result<Vec<(u32, String)>> {
        let mut all: BTreeMap<u32, String> = self
            .routes
            .values()
            .map(|i| (*i, format!("veth{i}")))
            .collect();
        all.extend(self.others.iter().map(|(i, n)| (*i, n.clone())));
        Ok(all.into_iter().collect())
    }
}
