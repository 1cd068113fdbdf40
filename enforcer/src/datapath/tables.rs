//! Typed views of the pinned maps: [`MapTable`] implementations for the reconciler, conntrack
//! access, counters and verdict events.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use aya::maps::{
    HashMap, MapData, MapError, PerCpuArray, RingBuf,
    lpm_trie::{Key, LpmTrie},
};
use enforcer_common::{
    Counter, CtKey, CtKeyV4, CtValue, EndpointInfo, FAMILY_V6, PeerInfo, REASON_COUNT, VerdictEvent,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{flows::FlowTable, peer_slots::PeerSlotSync, slots::SlotSync};
use enforcer_policy::state::Prefix;

use crate::reconcile::MapTable;

fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
}

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

/// Conntrack: the IPv4 flow table (`FLOWS_V4`, when on) and the LRU maps, IPv4 flows under
/// their short key (those of full table buckets, or all of them with the table off), IPv6
/// flows under [`CtKey`]. Seen from here as one table of [`CtKey`]s (IPv4 addresses in the
/// first 4 bytes).
pub struct Conntrack {
    pub(crate) flows: Option<FlowTable>,
    pub(crate) v4: HashTable<CtKeyV4, CtValue>,
    pub(crate) v6: HashTable<CtKey, CtValue>,
    /// Second descriptors of the maps, for batched counts (none if cloning failed).
    pub(crate) counter: Option<ConntrackCounter>,
}

/// Flows held, by map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCount {
    /// In `FLOWS_V4`.
    pub flows: usize,
    /// In `CONNTRACK_V4`.
    pub v4: usize,
    /// In `CONNTRACK_V6`.
    pub v6: usize,
}

impl CtCount {
    pub fn total(&self) -> usize {
        self.flows + self.v4 + self.v6
    }
}

impl Conntrack {
    /// Flows in all maps.
    pub fn count(&self) -> Result<usize> {
        Ok(self.count_by_map()?.total())
    }

    /// Flows of each map: batched, or a key walk on kernels without batch lookups.
    pub fn count_by_map(&self) -> Result<CtCount> {
        if let Some(c) = &self.counter {
            match c.count() {
                Ok(n) => return Ok(n),
                Err(e) => log::debug!("batched conntrack count failed ({e:#}); walking the keys"),
            }
        }
        Ok(CtCount {
            flows: match &self.flows {
                Some(f) => f.count()?,
                None => 0,
            },
            v4: self.v4.keys()?.len(),
            v6: self.v6.keys()?.len(),
        })
    }

    /// A counter of its own (new descriptors of the same maps), for a thread other than the
    /// one that owns the datapath: a count never holds up policy programming.
    pub fn counter(&self) -> Option<ConntrackCounter> {
        let c = self.counter.as_ref()?;
        Some(ConntrackCounter {
            flows: match &c.flows {
                Some(f) => Some(f.try_clone().ok()?),
                None => None,
            },
            v4: c.v4.try_clone().ok()?,
            v6: c.v6.try_clone().ok()?,
        })
    }

    /// The IPv4 flow table, when the programs use it.
    pub fn flow_table(&self) -> Option<&FlowTable> {
        self.flows.as_ref()
    }

    /// Every flow; one the table and an LRU map both hold (the table's is the one the
    /// programs read) is listed once, from the table.
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let mut out: Vec<(CtKey, CtValue)> = Vec::new();
        let mut seen = BTreeSet::new();
        if let Some(f) = &self.flows {
            for (k, v) in f.entries(super::flows::now_ns())? {
                seen.insert(k);
                out.push((k.to_key(), v));
            }
        }
        out.extend(
            self.v4
                .entries()?
                .into_iter()
                .filter(|(k, _)| !seen.contains(k))
                .map(|(k, v)| (k.to_key(), v)),
        );
        out.extend(self.v6.entries()?);
        Ok(out)
    }

    pub fn get(&self, key: &CtKey) -> Result<Option<CtValue>> {
        match key.to_v4() {
            Some(k) => {
                if let Some(f) = &self.flows
                    && let Some(v) = f.get(&k, super::flows::now_ns())?
                {
                    return Ok(Some(v));
                }
                self.v4.get(&k)
            }
            None => self.v6.get(key),
        }
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<()> {
        match key.to_v4() {
            Some(k) => {
                let in_table = match &self.flows {
                    Some(f) => f.with_memory(|m| m.remove(&k))?,
                    None => false,
                };
                if in_table {
                    // A copy in CONNTRACK_V4 (left by older programs) goes too, if any.
                    let _ = self.v4.remove(&k);
                    return Ok(());
                }
                self.v4.remove(&k)
            }
            None => self.v6.remove(key),
        }
    }

    /// Marks the table bucket of every flow in `CONNTRACK_V4` overflowed, so the programs look
    /// for it there: after an upgrade from programs that did not know the table, once none of
    /// them runs any more. Returns how many flows.
    pub fn mark_lru_flows(&self) -> Result<usize> {
        let Some(f) = &self.flows else {
            return Ok(0);
        };
        let keys = self.v4.keys()?;
        if !keys.is_empty() {
            f.with_memory(|m| {
                for k in &keys {
                    m.mark_overflow(k);
                }
            })?;
        }
        Ok(keys.len())
    }

    /// Moves the IPv4 flows an older agent recorded in the IPv6 map (which then held both
    /// families) to the IPv4 map, where the programs look them up now; returns how many.
    /// Each is written to its new place before it leaves the old one.
    pub fn migrate_v4(&mut self) -> Result<usize> {
        let legacy: Vec<(CtKey, CtValue)> = self
            .v6
            .entries()?
            .into_iter()
            .filter(|(k, _)| k.family != FAMILY_V6)
            .collect();
        let moved: Vec<(CtKeyV4, CtValue)> = legacy
            .iter()
            .filter_map(|(k, v)| Some((k.to_v4()?, *v)))
            .collect();
        for (k4, v) in &moved {
            self.v4.set(k4, v)?;
        }
        // Their buckets point the programs at CONNTRACK_V4 before they leave the old map.
        if let Some(f) = &self.flows
            && !moved.is_empty()
        {
            f.with_memory(|m| moved.iter().for_each(|(k, _)| m.mark_overflow(k)))?;
        }
        for (k, _) in &legacy {
            self.v6.remove(k)?;
        }
        Ok(legacy.len())
    }

    /// Deletes every flow of `endpoint` (a pod went away); returns how many.
    pub fn remove_endpoint(&mut self, endpoint: u32) -> Result<usize> {
        let in_table = match &self.flows {
            Some(f) => f.remove_where(|k| k.endpoint == endpoint)?,
            None => 0,
        };
        let v4: Vec<CtKeyV4> = self
            .v4
            .keys()?
            .into_iter()
            .filter(|k| k.endpoint == endpoint)
            .collect();
        for k in &v4 {
            self.v4.remove(k)?;
        }
        let v6: Vec<CtKey> = self
            .v6
            .keys()?
            .into_iter()
            .filter(|k| k.endpoint == endpoint)
            .collect();
        for k in &v6 {
            self.v6.remove(k)?;
        }
        Ok(in_table + v4.len() + v6.len())
    }
}

/// Per-CPU packet/byte counters.
pub struct Counters {
    pub(crate) map: PerCpuArray<MapData, Counter>,
    /// A second descriptor of the same map, for `BPF_MAP_LOOKUP_BATCH`.
    pub(crate) fd: Option<std::os::fd::OwnedFd>,
    pub(crate) slots: u32,
}

/// `(endpoint id, direction, reason)`.
pub type CounterKey = (u32, u8, u8);

/// Slots read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: u32 = 4096;

impl Counters {
    /// Every non-zero counter, summed over CPUs. One `BPF_MAP_LOOKUP_BATCH` call per 4096
    /// slots (the agent reads them every second; a lookup per slot would be 33k syscalls at
    /// the default 1024 endpoints), or a lookup per slot on kernels without batch lookups.
    pub fn read(&self) -> Result<BTreeMap<CounterKey, Counter>> {
        let sums = match self.read_batched() {
            Ok(s) => s,
            Err(e) => {
                log::debug!("batched read of COUNTERS failed ({e}); reading slot by slot");
                self.read_each()?
            }
        };
        Ok(by_key(sums))
    }

    /// A descriptor of its own for reading on another thread, without the datapath lock; `None`
    /// without batch lookups (then [`Counters::read`] it is).
    pub fn reader(&self) -> Option<CounterReader> {
        let reader = CounterReader {
            fd: self.fd.as_ref()?.try_clone().ok()?,
            slots: self.slots,
        };
        reader.read().ok()?;
        Some(reader)
    }

    /// Sums per slot, one lookup per slot.
    pub fn read_each(&self) -> Result<Vec<Counter>> {
        let mut out = Vec::with_capacity(self.slots as usize);
        for values in self.map.iter() {
            let values = values.context("reading map COUNTERS")?;
            let mut sum = Counter::default();
            for v in values.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push(sum);
        }
        Ok(out)
    }

    /// Sums per slot through `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+).
    pub fn read_batched(&self) -> std::io::Result<Vec<Counter>> {
        use std::os::fd::AsFd as _;
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no descriptor"))?;
        read_batched(fd.as_fd(), self.slots)
    }

    /// One counter, summed over CPUs.
    pub fn get(&self, endpoint: u32, direction: u8, reason: u8) -> Result<Counter> {
        let values = self
            .map
            .get(
                &enforcer_common::counter_index(endpoint, direction, reason),
                0,
            )
            .context("reading map COUNTERS")?;
        let mut sum = Counter::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        Ok(sum)
    }
}

/// Reads [`VerdictEvent`]s from the EVENTS ring buffer.
pub struct EventReader {
    pub(crate) ring: RingBuf<MapData>,
}

fn decode(bytes: &[u8]) -> Option<VerdictEvent> {
    if bytes.len() < std::mem::size_of::<VerdictEvent>() {
        return None;
    }
    // SAFETY: VerdictEvent is a Pod made of integers; the record holds at least its size.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<VerdictEvent>()) })
}

impl EventReader {
    /// The next event, if one is waiting.
    #[expect(
        clippy::should_implement_trait,
        reason = "not an Iterator: it can resume after None"
    )]
    pub fn next(&mut self) -> Option<VerdictEvent> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = decode(&item) {
                return Some(e);
            }
        }
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<VerdictEvent> {
        std::iter::from_fn(|| self.next()).collect()
    }

    /// An async reader (needs a tokio runtime with IO enabled).
    pub fn into_async(self) -> Result<AsyncEvents> {
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as the
        // AsyncFd owns the RingBuf.
        let fd = unsafe { AsyncFd::register_with_interest(self.ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering EVENTS with tokio: {e}"))?;
        Ok(AsyncEvents { fd })
    }
}

/// [`EventReader`] driven by epoll through tokio's `AsyncFd`.
pub struct AsyncEvents {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl AsyncEvents {
    /// Waits until at least one event is available and returns all waiting events.
    pub async fn next_batch(&mut self) -> Result<Vec<VerdictEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await.context("waiting on EVENTS")?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(e) = decode(&item) {
                    out.push(e);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every non-zero counter by `(endpoint, direction, reason)`, from the per-slot sums.
fn by_key(sums: Vec<Counter>) -> BTreeMap<CounterKey, Counter> {
    let mut out = BTreeMap::new();
    for (index, sum) in sums.into_iter().enumerate() {
        if sum.packets == 0 && sum.bytes == 0 {
            continue;
        }
        #[expect(clippy::cast_possible_truncation, reason = "the map has u32 indexes")]
        let index = index as u32;
        let reason = (index % REASON_COUNT) as u8;
        let slot = index / REASON_COUNT;
        out.insert((slot / 2, (slot % 2) as u8, reason), sum);
    }
    out
}

/// Sums per slot over CPUs, `BATCH` slots per `BPF_MAP_LOOKUP_BATCH` call.
fn read_batched(fd: std::os::fd::BorrowedFd<'_>, slots: u32) -> std::io::Result<Vec<Counter>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // Per-CPU values come as one 8-byte-aligned value per possible CPU.
    let stride = std::mem::size_of::<Counter>().next_multiple_of(8);
    let mut out = Vec::with_capacity(slots as usize);
    let mut keys = vec![0u8; BATCH as usize * 4];
    let mut values = vec![0u8; BATCH as usize * cpus * stride];
    let mut resume = None;
    loop {
        let (n, next) = lookup_batch(fd, resume, &mut keys, 4, &mut values, cpus * stride)?;
        for i in 0..n {
            let key = u32::from_ne_bytes([
                keys[i * 4],
                keys[i * 4 + 1],
                keys[i * 4 + 2],
                keys[i * 4 + 3],
            ]);
            let mut sum = Counter::default();
            for cpu in 0..cpus {
                let at = (i * cpus + cpu) * stride;
                let bytes = &values[at..at + std::mem::size_of::<Counter>()];
                // SAFETY: `Counter` is plain integers (repr(C)), `bytes` holds one.
                let v: Counter = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            if key as usize != out.len() {
                return Err(std::io::Error::other("batch returned slots out of order"));
            }
            out.push(sum);
        }
        match next {
            Some(at) if out.len() < slots as usize => resume = Some(at),
            _ => return Ok(out),
        }
    }
}

/// Reads COUNTERS through a descriptor of its own ([`Counters::reader`]): the agent's metrics
/// thread reads a second's worth of counters (33k slots x CPUs) without holding the datapath
/// lock, so the read never delays a policy change.
pub struct CounterReader {
    fd: std::os::fd::OwnedFd,
    slots: u32,
}

impl CounterReader {
    /// Every non-zero counter, summed over CPUs.
    pub fn read(&self) -> std::io::Result<BTreeMap<CounterKey, Counter>> {
        use std::os::fd::AsFd as _;
        Ok(by_key(read_batched(self.fd.as_fd(), self.slots)?))
    }
}

/// Counts the IPv4 and IPv6 conntrack maps through `BPF_MAP_LOOKUP_BATCH`: a few calls of
/// thousands of entries each, about half the time of the key walk (a `get_next_key` call per
/// entry; ~0.27 s at a full 262k-flow map here), and usable from a thread of its own.
pub struct ConntrackCounter {
    pub(crate) flows: Option<FlowTable>,
    pub(crate) v4: std::os::fd::OwnedFd,
    pub(crate) v6: std::os::fd::OwnedFd,
}

impl ConntrackCounter {
    pub fn count(&self) -> Result<CtCount> {
        use std::os::fd::AsFd as _;
        Ok(CtCount {
            flows: match &self.flows {
                Some(f) => f.count()?,
                None => 0,
            },
            v4: count_batched(
                self.v4.as_fd(),
                std::mem::size_of::<CtKeyV4>(),
                std::mem::size_of::<CtValue>(),
            )?,
            v6: count_batched(
                self.v6.as_fd(),
                std::mem::size_of::<CtKey>(),
                std::mem::size_of::<CtValue>(),
            )?,
        })
    }
}

/// Entries of the hash map `fd` (keys of `key_size`, values of `value_size` bytes), read in
/// batches. A snapshot only in the loose sense of any walk: entries may come and go meanwhile.
fn count_batched(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> std::io::Result<usize> {
    let mut batch = BATCH as usize;
    let mut keys = vec![0u8; batch * key_size];
    let mut values = vec![0u8; batch * value_size];
    let mut resume = None;
    let mut total = 0usize;
    loop {
        match lookup_batch(fd, resume, &mut keys, key_size, &mut values, value_size) {
            Ok((n, next)) => {
                total += n;
                match next {
                    Some(at) => resume = Some(at),
                    None => return Ok(total),
                }
            }
            // One bucket holds more entries than a batch: retry the same bucket with room for
            // it.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && batch < 1 << 20 => {
                batch *= 2;
                keys.resize(batch * key_size, 0);
                values.resize(batch * value_size, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`lookup_batch`] for other modules of the loader.
pub(super) fn lookup_batch_raw(
    fd: std::os::fd::BorrowedFd<'_>,
    resume: Option<u32>,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> std::io::Result<(usize, Option<u32>)> {
    lookup_batch(fd, resume, keys, key_size, values, value_size)
}

/// One `BPF_MAP_LOOKUP_ELEM` of `key` into `value` (plain-old-data types of the map's sizes).
pub(super) fn lookup_raw<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    key: &K,
    value: &mut V,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(value) as u64,
        flags: 0,
    };
    // SAFETY: key and value point at values of the map's key and value sizes (the caller's
    // types), which outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// One `BPF_MAP_LOOKUP_BATCH` call: as many entries as `keys` and `values` hold (`key_size` and
/// `value_size` bytes each), from the start of the map or from the position `resume` an earlier
/// call returned. Returns how many came and where to resume (`None`: the map is done). Hash maps
/// use a bucket index as the position, arrays a key: both a u32.
fn lookup_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    resume: Option<u32>,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> std::io::Result<(usize, Option<u32>)> {
    use std::os::fd::AsRawFd as _;
    let count = (keys.len() / key_size).min(values.len() / value_size);
    let in_batch = resume.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if resume.is_some() {
            std::ptr::from_ref(&in_batch) as u64
        } else {
            0
        },
        out_batch: std::ptr::from_mut(&mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(count).map_err(std::io::Error::other)?,
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the attr points at buffers holding `count` keys and values, which outlive the
    // call; the kernel writes at most `count` of each and a u32 to `out_batch`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        // ENOENT: the last chunk (its `count` entries are valid).
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok((attr.count as usize, None));
        }
        return Err(e);
    }
    Ok((attr.count as usize, Some(out_batch)))
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
