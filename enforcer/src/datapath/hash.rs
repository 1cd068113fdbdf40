//! The exact-match maps as [`MapTable`]s for the reconciler: endpoints (with their slots),
//! peers (with the IPv4 peer cache) and the policy map.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use enforcer_common::{EndpointInfo, PeerInfo};

use super::syscall::not_found;
use super::{peer_slots::PeerSlotSync, slots::SlotSync};
use crate::reconcile::MapTable;

/// A BPF hash map as a [`MapTable`].
pub struct HashTable<K: aya::Pod, V: aya::Pod> {
    pub(crate) name: &'static str,
    pub(crate) map: HashMap<MapData, K, V>,
}

impl<K: aya::Pod, V: aya::Pod> HashTable<K, V> {
    pub(crate) fn new(name: &'static str, map: HashMap<MapData, K, V>) -> Self {
        Self { name, map }
    }

    /// Every entry (a snapshot; entries may change while iterating).
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for kv in self.map.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // An entry deleted between `next_key` and `lookup`.
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("iterating map {}", self.name)),
            }
        }
        Ok(out)
    }
}

impl<K: aya::Pod, V: aya::Pod> MapTable<K, V> for HashTable<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up map {}", self.name)),
        }
    }
    fn set(&mut self, key: &K, value: &V) -> Result<()> {
        self.map
            .insert(key, value, 0)
            .with_context(|| format!("writing map {}", self.name))
    }
    fn remove(&mut self, key: &K) -> Result<()> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing from map {}", self.name)),
        }
    }
    fn keys(&self) -> Result<Vec<K>> {
        let mut out = Vec::new();
        for k in self.map.keys() {
            out.push(k.with_context(|| format!("listing keys of map {}", self.name))?);
        }
        Ok(out)
    }
}

/// ENDPOINTS, and the slots that mirror it for the established path (see [`super::slots`]):
/// a write lands in ENDPOINTS, then in the slot; a removal clears the slot, then ENDPOINTS.
pub struct EndpointTable {
    pub(crate) hash: HashTable<u32, EndpointInfo>,
    pub(crate) slots: SlotSync,
}

impl EndpointTable {
    pub fn entries(&self) -> Result<Vec<(u32, EndpointInfo)>> {
        self.hash.entries()
    }

    /// The slots, e.g. to see which endpoint one mirrors.
    pub fn slots(&self) -> &SlotSync {
        &self.slots
    }
}

impl MapTable<u32, EndpointInfo> for EndpointTable {
    fn get(&self, key: &u32) -> Result<Option<EndpointInfo>> {
        self.hash.get(key)
    }
    fn set(&mut self, key: &u32, value: &EndpointInfo) -> Result<()> {
        self.hash.set(key, value)?;
        self.slots.written(*key, value);
        Ok(())
    }
    fn remove(&mut self, key: &u32) -> Result<()> {
        self.slots.removing(*key);
        self.hash.remove(key)
    }
    fn keys(&self) -> Result<Vec<u32>> {
        self.hash.keys()
    }
}

/// PEERS_V4, and the buckets of `PEER_SLOTS` that cache it (see [`super::peer_slots`]): a
/// write lands in PEERS_V4, then in its way; a removal clears the way, then PEERS_V4.
pub struct PeerTable {
    pub(crate) hash: HashTable<[u8; 4], PeerInfo>,
    pub(crate) slots: PeerSlotSync,
}

impl PeerTable {
    pub fn entries(&self) -> Result<Vec<([u8; 4], PeerInfo)>> {
        self.hash.entries()
    }

    /// The cache, e.g. to see which addresses it holds.
    pub fn slots(&self) -> &PeerSlotSync {
        &self.slots
    }
}

impl MapTable<[u8; 4], PeerInfo> for PeerTable {
    fn get(&self, key: &[u8; 4]) -> Result<Option<PeerInfo>> {
        self.hash.get(key)
    }
    fn set(&mut self, key: &[u8; 4], value: &PeerInfo) -> Result<()> {
        self.hash.set(key, value)?;
        self.slots.written(*key, value);
        Ok(())
    }
    fn remove(&mut self, key: &[u8; 4]) -> Result<()> {
        self.slots.removing(*key);
        self.hash.remove(key)
    }
    fn keys(&self) -> Result<Vec<[u8; 4]>> {
        self.hash.keys()
    }
}

/// PEERS_V4 with `Ipv4Addr` keys, as `DesiredState` has them.
impl MapTable<Ipv4Addr, PeerInfo> for PeerTable {
    fn get(&self, key: &Ipv4Addr) -> Result<Option<PeerInfo>> {
        MapTable::<[u8; 4], PeerInfo>::get(self, &key.octets())
    }
    fn set(&mut self, key: &Ipv4Addr, value: &PeerInfo) -> Result<()> {
        MapTable::<[u8; 4], PeerInfo>::set(self, &key.octets(), value)
    }
    fn remove(&mut self, key: &Ipv4Addr) -> Result<()> {
        MapTable::<[u8; 4], PeerInfo>::remove(self, &key.octets())
    }
    fn keys(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(MapTable::<[u8; 4], PeerInfo>::keys(self)?
            .into_iter()
            .map(Ipv4Addr::from)
            .collect())
    }
}

/// PEERS_V6 with `Ipv6Addr` keys, as `DesiredState` has them.
impl MapTable<Ipv6Addr, PeerInfo> for HashTable<[u8; 16], PeerInfo> {
    fn get(&self, key: &Ipv6Addr) -> Result<Option<PeerInfo>> {
        MapTable::<[u8; 16], PeerInfo>::get(self, &key.octets())
    }
    fn set(&mut self, key: &Ipv6Addr, value: &PeerInfo) -> Result<()> {
        MapTable::<[u8; 16], PeerInfo>::set(self, &key.octets(), value)
    }
    fn remove(&mut self, key: &Ipv6Addr) -> Result<()> {
        MapTable::<[u8; 16], PeerInfo>::remove(self, &key.octets())
    }
    fn keys(&self) -> Result<Vec<Ipv6Addr>> {
        Ok(MapTable::<[u8; 16], PeerInfo>::keys(self)?
            .into_iter()
            .map(Ipv6Addr::from)
            .collect())
    }
}
