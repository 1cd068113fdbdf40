//! `PEER_SLOTS`: a cache of `PEERS_V4` that the programs read with one load.
//!
//! A new flow needs its peer's identity. From the `PEERS_V4` hash that is a hash of the
//! address, a bucket and an element (two dependent loads, a key compare, and on the real path
//! two cache misses); from the peer's bucket of this array it is one load of a line shared by
//! four buckets. `PEERS_V4` stays the authority: every write goes there first, a way only
//! ever mirrors an entry, is cleared before its entry is removed, and an address in no way is
//! looked up in `PEERS_V4` as before (see [`PeerBucket`]).
//!
//! Each way is one 64-bit word written with one atomic store and read by the programs with
//! one load: no lock, no sequence, on every 64-bit machine.

use std::{
    collections::{BTreeSet, HashMap},
    sync::atomic::{AtomicU64, Ordering},
};

use super::mapping::SharedMemory;
use anyhow::{Result, bail};
use enforcer_common::{PeerBucket, PeerInfo, peer_bucket, peer_way};

/// The bucket array as memory the agent writes with atomic stores.
pub struct PeerSlotMemory {
    mem: SharedMemory,
    buckets: u32,
}

impl PeerSlotMemory {
    fn len(buckets: u32) -> usize {
        buckets as usize * size_of::<PeerBucket>()
    }

    /// Maps the array of `buckets` behind `fd` (a `PEER_SLOTS` map created `BPF_F_MMAPABLE`).
    pub fn map(fd: std::os::fd::BorrowedFd<'_>, buckets: u32) -> Result<Self> {
        if buckets == 0 {
            bail!("{} has no buckets", enforcer_common::MAP_PEER_SLOTS);
        }
        Ok(Self {
            mem: SharedMemory::map(fd, Self::len(buckets), enforcer_common::MAP_PEER_SLOTS)?,
            buckets,
        })
    }

    /// Zeroed buckets in plain memory, for tests of the writer.
    pub fn heap(buckets: u32) -> Self {
        Self {
            mem: SharedMemory::heap(Self::len(buckets.max(1))),
            buckets: buckets.max(1),
        }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    fn way(&self, bucket: u32, way: usize) -> &AtomicU64 {
        assert!(bucket < self.buckets && way < 2);
        // SAFETY: in bounds (asserted), an 8-aligned word inside the memory this value owns or
        // maps (page- or u64-aligned base, 16-byte buckets).
        unsafe {
            AtomicU64::from_ptr(
                self.mem
                    .base::<PeerBucket>()
                    .add(bucket as usize)
                    .cast::<u64>()
                    .add(way),
            )
        }
    }

    /// The bucket as it is now.
    pub fn read(&self, bucket: u32) -> [u64; 2] {
        [0, 1].map(|w| self.way(bucket, w).load(Ordering::Acquire))
    }

    /// Stores one way word (one atomic store: the programs see the old word or the new one).
    pub fn write(&self, bucket: u32, way: usize, word: u64) {
        self.way(bucket, way).store(word, Ordering::Release);
    }
}

/// Keeps the ways equal to what `PEERS_V4` holds: the caller reports every entry it writes
/// or removes, after writing it and before removing it.
pub struct PeerSlotSync {
    mem: PeerSlotMemory,
    /// Identity of every address `PEERS_V4` holds.
    known: HashMap<[u8; 4], u32>,
    /// (bucket, address as a big-endian number) of every known address: a bucket's ways go to
    /// its two lowest addresses, so which ones hold it does not depend on the order of writes.
    by_bucket: BTreeSet<(u32, u32)>,
    /// Ways that hold an address.
    filled: usize,
}

impl PeerSlotSync {
    /// Starts from the entries `PEERS_V4` holds (a restarted agent finds its predecessor's)
    /// and rewrites every way that does not mirror them.
    pub fn new(
        mem: PeerSlotMemory,
        entries: impl IntoIterator<Item = ([u8; 4], PeerInfo)>,
    ) -> Self {
        let mut s = Self {
            mem,
            known: HashMap::new(),
            by_bucket: BTreeSet::new(),
            filled: 0,
        };
        for (addr, info) in entries {
            s.known.insert(addr, info.identity);
            s.by_bucket
                .insert((s.bucket_of(addr), u32::from_be_bytes(addr)));
        }
        for b in 0..s.mem.buckets() {
            s.sync(b);
        }
        s.filled = (0..s.mem.buckets())
            .map(|b| s.mem.read(b).iter().filter(|&&w| w != 0).count())
            .sum();
        s
    }

    fn bucket_of(&self, addr: [u8; 4]) -> u32 {
        peer_bucket(addr, self.mem.buckets())
    }

    /// `PEERS_V4` now holds `info` for `addr`.
    pub fn written(&mut self, addr: [u8; 4], info: &PeerInfo) {
        let b = self.bucket_of(addr);
        self.known.insert(addr, info.identity);
        self.by_bucket.insert((b, u32::from_be_bytes(addr)));
        self.sync(b);
    }

    /// `PEERS_V4` is about to lose `addr`.
    pub fn removing(&mut self, addr: [u8; 4]) {
        let b = self.bucket_of(addr);
        self.known.remove(&addr);
        self.by_bucket.remove(&(b, u32::from_be_bytes(addr)));
        self.sync(b);
    }

    /// The bucket `addr` maps to, as it is now.
    pub fn bucket(&self, addr: [u8; 4]) -> [u64; 2] {
        self.mem.read(self.bucket_of(addr))
    }

    /// The memory itself, for tests that write a way behind the agent's back.
    pub fn memory(&self) -> &PeerSlotMemory {
        &self.mem
    }

    /// Ways that hold an address (the addresses served without a hash lookup).
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// What bucket `b` should hold: its two lowest addresses (with identities that are not
    /// [`enforcer_common::IDENTITY_ANY`], which a way cannot carry), in order.
    fn wanted(&self, b: u32) -> [u64; 2] {
        let mut want = [0u64; 2];
        let mut ways = self
            .by_bucket
            .range((b, 0)..=(b, u32::MAX))
            .filter_map(|&(_, a)| {
                let addr = a.to_be_bytes();
                let id = *self.known.get(&addr)?;
                (id != enforcer_common::IDENTITY_ANY).then(|| peer_way(addr, id))
            });
        for w in &mut want {
            *w = ways.next().unwrap_or(0);
        }
        want
    }

    /// Rewrites bucket `b` to what it should hold, a word at a time: a reader sees each word
    /// old or new, and each is one `PEERS_V4` agrees with (its entries are written before and
    /// removed after their ways). An address moving between the ways may be in neither for a
    /// moment: the programs then ask `PEERS_V4`.
    fn sync(&mut self, b: u32) {
        let want = self.wanted(b);
        let cur = self.mem.read(b);
        for (w, (&c, &n)) in cur.iter().zip(&want).enumerate() {
            if c != n {
                self.mem.write(b, w, n);
                // Wrapping: while `new` clears an earlier agent's leftover ways the count
                // starts at 0 (it is counted afresh once they are cleared).
                self.filled = (self.filled + usize::from(n != 0)).wrapping_sub(usize::from(c != 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{IDENTITY_ANY, peer_way_identity};

    use super::*;

    fn info(identity: u32) -> PeerInfo {
        PeerInfo { identity, flags: 0 }
    }

    /// What a program would take from the cache for `addr`.
    fn seen(s: &PeerSlotSync, addr: [u8; 4]) -> Option<u32> {
        s.bucket(addr)
            .iter()
            .find_map(|&w| peer_way_identity(w, addr))
    }

    /// Three addresses that share a bucket among `buckets`, in ascending order.
    fn colliding(buckets: u32) -> [[u8; 4]; 3] {
        let mut by = HashMap::<u32, Vec<[u8; 4]>>::new();
        for i in 0..100_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let a = [10, b, c, d];
            let v = by.entry(peer_bucket(a, buckets)).or_default();
            v.push(a);
            if v.len() == 3 {
                return [v[0], v[1], v[2]];
            }
        }
        unreachable!("100k addresses over {buckets} buckets always collide")
    }

    #[test]
    fn ways_mirror_writes_and_removals() {
        let mut s = PeerSlotSync::new(PeerSlotMemory::heap(64), []);
        let a = [10, 0, 0, 1];
        s.written(a, &info(300));
        assert_eq!(seen(&s, a), Some(300));
        s.written(a, &info(301));
        assert_eq!(seen(&s, a), Some(301));
        assert_eq!(s.filled(), 1);
        s.removing(a);
        assert_eq!(seen(&s, a), None);
        assert_eq!(s.filled(), 0);
    }

    #[test]
    fn a_full_bucket_goes_to_its_two_lowest_addresses_and_passes_on() {
        let [lo, mid, hi] = colliding(64);
        let mut s = PeerSlotSync::new(PeerSlotMemory::heap(64), []);
        s.written(hi, &info(3));
        s.written(mid, &info(2));
        assert_eq!((seen(&s, mid), seen(&s, hi)), (Some(2), Some(3)));
        // The lowest takes a way; the highest is left to PEERS_V4.
        s.written(lo, &info(1));
        assert_eq!(
            (seen(&s, lo), seen(&s, mid), seen(&s, hi)),
            (Some(1), Some(2), None)
        );
        // A write of the one left out leaves the bucket alone.
        s.written(hi, &info(30));
        assert_eq!(seen(&s, hi), None);
        s.removing(lo);
        assert_eq!((seen(&s, mid), seen(&s, hi)), (Some(2), Some(30)));
        assert_eq!(s.filled(), 2);
    }

    #[test]
    fn restart_rewrites_what_does_not_mirror_the_entries() {
        let mem = PeerSlotMemory::heap(64);
        let (gone, stale, kept) = ([10, 0, 0, 3], [10, 0, 0, 4], [10, 0, 0, 5]);
        // A predecessor's leftovers: a gone address, a stale identity, one as it should be.
        for (a, id) in [(gone, 7), (stale, 8), (kept, 9)] {
            mem.write(peer_bucket(a, 64), 1, peer_way(a, id));
        }
        let s = PeerSlotSync::new(mem, [(stale, info(80)), (kept, info(9))]);
        assert_eq!(seen(&s, gone), None);
        assert_eq!(seen(&s, stale), Some(80));
        assert_eq!(seen(&s, kept), Some(9));
        assert_eq!(s.filled(), 2);
    }

    #[test]
    fn an_address_without_an_identity_takes_no_way() {
        let mut s = PeerSlotSync::new(PeerSlotMemory::heap(8), []);
        s.written([10, 0, 0, 1], &info(IDENTITY_ANY));
        assert_eq!(s.filled(), 0);
    }

    /// Random writes and removals against a model: after each, every address the model holds
    /// is either in its bucket with the model's identity or left to the hash (never with a
    /// wrong one), at most the two lowest of a bucket hold it, and nothing else is cached.
    #[test]
    fn ways_follow_a_random_history() {
        let buckets = 16;
        let mut s = PeerSlotSync::new(PeerSlotMemory::heap(buckets), []);
        let mut model = std::collections::BTreeMap::<[u8; 4], u32>::new();
        let mut x = 0x2545_f491u32;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let addr = [10, 0, 0, (x % 64) as u8];
            if x & 0x300 == 0 {
                s.removing(addr);
                model.remove(&addr);
            } else {
                let id = 256 + (x >> 20) % 8;
                model.insert(addr, id);
                s.written(addr, &info(id));
            }
            for b in 0..buckets {
                let mut lows: Vec<_> = model
                    .keys()
                    .filter(|a| peer_bucket(**a, buckets) == b)
                    .copied()
                    .collect();
                lows.truncate(2);
                let want: Vec<u64> = lows.iter().map(|a| peer_way(*a, model[a])).collect();
                let got: Vec<u64> = s.memory().read(b).into_iter().filter(|&w| w != 0).collect();
                assert_eq!(got, want, "bucket {b}");
            }
            let walked: usize = (0..buckets)
                .map(|b| s.memory().read(b).iter().filter(|&&w| w != 0).count())
                .sum();
            assert_eq!(s.filled(), walked);
        }
    }
}
