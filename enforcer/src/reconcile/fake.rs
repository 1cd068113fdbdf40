//! In-memory fakes of the kernel seam, for tests of everything above the kernel (this crate's
//! unit tests, and other crates' through the `testkit` feature).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use enforcer_common::{EndpointInfo, PeerInfo, PolicyKey, PolicyValue};
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
    pub links: BTreeSet<u32>,
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
pub struct FakeRoutes(pub BTreeMap<IpAddr, u32>);

impl Routes for FakeRoutes {
    fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>> {
        Ok(self.0.get(&ip).copied())
    }
    /// The interfaces of the table exist; no other does.
    fn exists(&self, ifindex: u32) -> bool {
        self.0.values().any(|i| *i == ifindex)
    }
}
