//! The CIDR tries (`CIDRS_V4`, `CIDRS_V6`) as [`MapTable`]s of prefixes.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use aya::maps::{
    MapData,
    lpm_trie::{Key, LpmTrie},
};
use enforcer_common::PeerInfo;
use enforcer_policy::state::Prefix;

use super::syscall::not_found;
use crate::reconcile::MapTable;

/// An address type usable as an LPM trie key.
pub trait LpmAddr: Copy + Ord {
    type Bytes: aya::Pod;
    fn to_bytes(self) -> Self::Bytes;
    fn from_bytes(b: Self::Bytes) -> Self;
}

impl LpmAddr for Ipv4Addr {
    type Bytes = [u8; 4];
    fn to_bytes(self) -> [u8; 4] {
        self.octets()
    }
    fn from_bytes(b: [u8; 4]) -> Self {
        Self::from(b)
    }
}

impl LpmAddr for Ipv6Addr {
    type Bytes = [u8; 16];
    fn to_bytes(self) -> [u8; 16] {
        self.octets()
    }
    fn from_bytes(b: [u8; 16]) -> Self {
        Self::from(b)
    }
}

/// A CIDR LPM trie (CIDRS_V4 or CIDRS_V6) keyed by [`Prefix`].
///
/// A trie lookup returns the longest match, not the exact entry, so the table keeps the set of
/// keys present (read once at open, then maintained: the agent is the only writer) to answer
/// [`MapTable::get`] exactly.
pub struct LpmTable<A: LpmAddr> {
    name: &'static str,
    map: LpmTrie<MapData, A::Bytes, PeerInfo>,
    present: BTreeSet<Prefix<A>>,
}

impl<A: LpmAddr> LpmTable<A> {
    pub(crate) fn new(
        name: &'static str,
        map: LpmTrie<MapData, A::Bytes, PeerInfo>,
    ) -> Result<Self> {
        let mut t = Self {
            name,
            map,
            present: BTreeSet::new(),
        };
        t.present = t.list()?.into_iter().collect();
        Ok(t)
    }

    fn list(&self) -> Result<Vec<Prefix<A>>> {
        let mut out = Vec::new();
        for k in self.map.keys() {
            let k = k.with_context(|| format!("listing keys of map {}", self.name))?;
            #[expect(clippy::cast_possible_truncation, reason = "prefix lengths are <= 128")]
            out.push(Prefix {
                addr: A::from_bytes(k.data()),
                len: k.prefix_len() as u8,
            });
        }
        Ok(out)
    }
}

impl<A: LpmAddr> MapTable<Prefix<A>, PeerInfo> for LpmTable<A> {
    fn get(&self, key: &Prefix<A>) -> Result<Option<PeerInfo>> {
        // The kernel's lookup is longest-prefix; an exact-entry check needs the key listed.
        if !self.present.contains(key) {
            return Ok(None);
        }
        let k = Key::new(u32::from(key.len), key.addr.to_bytes());
        match self.map.get(&k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up map {}", self.name)),
        }
    }
    fn set(&mut self, key: &Prefix<A>, value: &PeerInfo) -> Result<()> {
        let k = Key::new(u32::from(key.len), key.addr.to_bytes());
        self.map
            .insert(&k, value, 0)
            .with_context(|| format!("writing map {}", self.name))?;
        self.present.insert(*key);
        Ok(())
    }
    fn remove(&mut self, key: &Prefix<A>) -> Result<()> {
        let k = Key::new(u32::from(key.len), key.addr.to_bytes());
        match self.map.remove(&k) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("removing from map {}", self.name)),
        }
        self.present.remove(key);
        Ok(())
    }
    fn keys(&self) -> Result<Vec<Prefix<A>>> {
        self.list()
    }
}
