//! `FLOWS_V4` from the agent's side: the IPv4 flow table the programs keep in front of
//! `CONNTRACK_V4` (see [`FlowBucket`] for the layout and the locking).
//!
//! Reads (counts, listings) go through `BPF_MAP_LOOKUP_BATCH`, a copy per bucket, and never map
//! the table into the agent's memory. Writes (forgetting flows, marking buckets overflowed) are
//! one compare-and-swap of a bucket's control word each, through a shared mapping made for the
//! occasion and dropped after it, so the agent's resident size never carries the table. The
//! agent never holds a bucket lock: preempted while holding one, it would stall the programs.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use super::{mapping::SharedMemory, syscall::BATCH};
use anyhow::{Context as _, Result};
use enforcer_common::{
    CtKeyV4, CtValue, FLOW_LOCK, FLOW_OVERFLOW, FLOW_PROTO_MASK, FLOW_SEQ_MASK, FLOW_SEQ_SHIFT,
    FLOW_WAYS, FlowBucket, FlowSeed, FlowWay, MAP_FLOWS_V4, flow_bucket, flow_live,
};

/// Buckets of a table for `flows` flows: two per bucket. The table is kept as small as its
/// capacity allows (32 bytes a flow, 8 MiB at the default 262,144): a new flow's bucket is a
/// random line of it, and the larger the table, the more of it falls outside the TLB's reach
/// (a page-table walk on top of the cache miss; see bench/HISTORY.md).
pub fn buckets_for(flows: u32) -> u32 {
    flows.div_ceil(FLOW_WAYS as u32).max(1)
}

/// The table: a descriptor of the map, its bucket count and the key of its bucket hash.
pub struct FlowTable {
    fd: OwnedFd,
    buckets: u32,
    seed: FlowSeed,
}

impl FlowTable {
    pub fn new(fd: OwnedFd, buckets: u32, seed: FlowSeed) -> Self {
        Self { fd, buckets, seed }
    }

    /// The key of the bucket hash.
    pub fn seed(&self) -> FlowSeed {
        self.seed
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Ways in the table (two per bucket).
    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * FLOW_WAYS as u64
    }

    /// A second table over a new descriptor of the same map (for a thread of its own).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            fd: self
                .fd
                .try_clone()
                .context("duplicating the FLOWS_V4 descriptor")?,
            buckets: self.buckets,
            seed: self.seed,
        })
    }

    /// Runs `f` on every bucket with its index, copied in batches of [`BATCH`] (the table is
    /// never held whole: 8 MiB at the default size). Each copy is the kernel's memcpy of a
    /// bucket the programs may be writing: good for counts, listings and finding what to change
    /// (under the compare-and-swap that checks it), never for a decision.
    pub fn for_each(&self, mut f: impl FnMut(u32, &FlowBucket)) -> Result<()> {
        let per = BATCH.min(self.buckets.max(1)) as usize;
        let mut keys = vec![0u8; per * 4];
        let mut values = vec![0u8; per * size_of::<FlowBucket>()];
        let mut resume = None;
        loop {
            let (n, next) = super::syscall::lookup_batch(
                self.fd.as_fd(),
                resume,
                &mut keys,
                4,
                &mut values,
                size_of::<FlowBucket>(),
            )
            .with_context(|| format!("reading {MAP_FLOWS_V4}"))?;
            let found = keys
                .chunks_exact(4)
                .zip(values.chunks_exact(size_of::<FlowBucket>()));
            for (key, value) in found.take(n) {
                let index = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
                // SAFETY: FlowBucket is plain old data of exactly this size.
                let bucket: FlowBucket = unsafe { std::ptr::read_unaligned(value.as_ptr().cast()) };
                f(index, &bucket);
            }
            match next {
                Some(at) => resume = Some(at),
                None => return Ok(()),
            }
        }
    }

    /// Flows held (ways in use, live or idle).
    pub fn count(&self) -> Result<usize> {
        let mut n = 0;
        self.for_each(|_, b| n += b.live().count())?;
        Ok(n)
    }

    /// Every flow, its stamp widened against `now_ns` (the programs' clock).
    pub fn entries(&self, now_ns: u64) -> Result<Vec<(CtKeyV4, CtValue)>> {
        let mut out = Vec::new();
        self.for_each(|_, b| out.extend(b.live().map(|w| (w.key(), w.value(now_ns)))))?;
        Ok(out)
    }

    /// The flow of `key`, if the table holds it.
    pub fn get(&self, key: &CtKeyV4, now_ns: u64) -> Result<Option<CtValue>> {
        let index = flow_bucket(key, self.buckets, &self.seed);
        let mut bucket = FlowBucket::default();
        super::syscall::lookup_raw(self.fd.as_fd(), &index, &mut bucket)
            .with_context(|| format!("reading bucket {index} of {MAP_FLOWS_V4}"))?;
        Ok(bucket
            .live()
            .find(|w| w.key() == normalized(key))
            .map(|w| w.value(now_ns)))
    }

    /// Forgets every flow `drop` picks; returns how many. The buckets that hold one are found
    /// in a batched read, so only their pages are mapped in and written.
    pub fn remove_where(&self, drop: impl Fn(&CtKeyV4) -> bool) -> Result<usize> {
        let mut holding = Vec::new();
        self.for_each(|i, b| {
            if b.live().any(|w| drop(&w.key())) {
                holding.push(i);
            }
        })?;
        if holding.is_empty() {
            return Ok(0);
        }
        self.with_memory(|m| holding.iter().map(|&b| m.free_in(b, &drop)).sum())
    }

    /// Runs `f` on the table's memory, mapped for the call.
    pub fn with_memory<R>(&self, f: impl FnOnce(&FlowMemory) -> R) -> Result<R> {
        let mem = FlowMemory::map(self.fd.as_fd(), self.buckets, self.seed)?;
        Ok(f(&mem))
    }
}

/// `key` as a way gives it back (no padding bytes).
fn normalized(key: &CtKeyV4) -> CtKeyV4 {
    CtKeyV4 {
        _pad: [0; 3],
        ..*key
    }
}

/// The table as memory the agent writes under the buckets' locks.
pub struct FlowMemory {
    mem: SharedMemory,
    buckets: u32,
    seed: FlowSeed,
}

/// Spins at a bucket a program holds before yielding the CPU (it holds it for a few stores).
const SPINS: u32 = 1_000;

impl FlowMemory {
    /// Maps `buckets` buckets of the (mmapable) map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, buckets: u32, seed: FlowSeed) -> Result<Self> {
        Ok(Self {
            mem: SharedMemory::map(fd, buckets as usize * size_of::<FlowBucket>(), MAP_FLOWS_V4)?,
            buckets,
            seed,
        })
    }

    /// `buckets` empty buckets in plain memory, for tests.
    pub fn heap(buckets: u32, seed: FlowSeed) -> Self {
        Self {
            mem: SharedMemory::heap(buckets as usize * size_of::<FlowBucket>()),
            buckets,
            seed,
        }
    }

    fn way(&self, bucket: u32, way: usize) -> *mut FlowWay {
        assert!(bucket < self.buckets && way < FLOW_WAYS);
        // SAFETY: in bounds (asserted) of the memory this value maps or owns.
        unsafe {
            self.mem
                .base::<FlowBucket>()
                .add(bucket as usize)
                .cast::<FlowWay>()
                .add(way)
        }
    }

    fn word(&self, bucket: u32, way: usize, field: usize) -> &AtomicU32 {
        // SAFETY: a 4-aligned field of a way.
        unsafe { AtomicU32::from_ptr(self.way(bucket, way).cast::<u8>().add(field).cast()) }
    }

    fn meta(&self, bucket: u32, way: usize) -> &AtomicU32 {
        self.word(bucket, way, std::mem::offset_of!(FlowWay, meta))
    }

    /// Way 0's `meta` and `epoch`, the word the programs compare-and-swap.
    fn control(&self, bucket: u32) -> &AtomicU64 {
        // SAFETY: 8-aligned (offset 16 of a 64-byte bucket at a page or u64 base).
        unsafe {
            AtomicU64::from_ptr(
                self.way(bucket, 0)
                    .cast::<u8>()
                    .add(std::mem::offset_of!(FlowWay, meta))
                    .cast(),
            )
        }
    }

    /// Replaces `bucket`'s control word (way 0's `meta`) by what `change` makes of it, with one
    /// compare-and-swap that expects the lock free and the word as read: nothing a program
    /// writes, or wrote since `change` looked at the ways, is overwritten. `change` returns
    /// `None` for no change. Returns whether it changed the word.
    fn swap_control(&self, bucket: u32, change: impl Fn(u32) -> Option<u32>) -> bool {
        let c = self.control(bucket);
        let mut spins = 0u32;
        loop {
            let pair = c.load(Ordering::Acquire);
            let m0 = pair as u32;
            if m0 & FLOW_LOCK == 0 {
                let Some(new) = change(m0) else {
                    return false;
                };
                let next = (pair & !0xffff_ffff) | u64::from(new);
                if c.compare_exchange(pair, next, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return true;
                }
            }
            spins += 1;
            if spins.is_multiple_of(SPINS) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The key way `way` of `bucket` holds when way 0's `meta` is `m0`, `None` if free.
    fn key_at(&self, bucket: u32, way: usize, m0: u32) -> Option<CtKeyV4> {
        if m0 & flow_live(way) == 0 {
            return None;
        }
        let w = |f| self.word(bucket, way, f).load(Ordering::Relaxed);
        let ports = w(std::mem::offset_of!(FlowWay, port_a)).to_ne_bytes();
        Some(CtKeyV4 {
            endpoint: w(std::mem::offset_of!(FlowWay, endpoint)),
            protocol: (self.meta(bucket, way).load(Ordering::Relaxed) & FLOW_PROTO_MASK) as u8,
            _pad: [0; 3],
            addr_a: w(std::mem::offset_of!(FlowWay, addr_a)).to_ne_bytes(),
            addr_b: w(std::mem::offset_of!(FlowWay, addr_b)).to_ne_bytes(),
            port_a: u16::from_ne_bytes([ports[0], ports[1]]),
            port_b: u16::from_ne_bytes([ports[2], ports[3]]),
        })
    }

    /// Frees every way of `bucket` whose key `drop` picks; returns how many.
    fn free_in(&self, bucket: u32, drop: &impl Fn(&CtKeyV4) -> bool) -> usize {
        let freed = std::cell::Cell::new(0);
        self.swap_control(bucket, |m0| {
            let picked: Vec<usize> = (0..FLOW_WAYS)
                .filter(|&i| self.key_at(bucket, i, m0).is_some_and(|k| drop(&k)))
                .collect();
            freed.set(picked.len());
            if picked.is_empty() {
                return None;
            }
            let cleared = picked.iter().fold(m0, |m, &i| m & !flow_live(i));
            Some(next_seq(cleared))
        });
        freed.get()
    }

    /// Forgets the flow of `key`; returns whether the table held it.
    pub fn remove(&self, key: &CtKeyV4) -> bool {
        let key = normalized(key);
        self.free_in(flow_bucket(&key, self.buckets, &self.seed), &|k| *k == key) > 0
    }

    /// Marks the bucket of `key` overflowed: a program that misses there looks in
    /// `CONNTRACK_V4` too (where `key` lives).
    pub fn mark_overflow(&self, key: &CtKeyV4) {
        let b = flow_bucket(key, self.buckets, &self.seed);
        self.swap_control(b, |m0| {
            (m0 & FLOW_OVERFLOW == 0).then_some(m0 | FLOW_OVERFLOW)
        });
    }

    /// Bucket `b` as it is now (fields read one by one: consistent only when nobody writes).
    pub fn read(&self, b: u32) -> FlowBucket {
        let mut out = FlowBucket::default();
        for (i, w) in out.ways.iter_mut().enumerate() {
            // SAFETY: a way of the table, read as plain data (tests and diagnostics only).
            *w = unsafe { std::ptr::read_volatile(self.way(b, i)) };
        }
        out
    }

    /// The stores of a write of `way` into way `i` of `b` (its key and value words, and way
    /// 1's `meta`), the lock held (tests).
    #[cfg(test)]
    fn store_way(&self, b: u32, i: usize, way: &FlowWay) {
        let set = |f, x: u32| self.word(b, i, f).store(x, Ordering::Relaxed);
        set(std::mem::offset_of!(FlowWay, endpoint), way.endpoint);
        set(
            std::mem::offset_of!(FlowWay, addr_a),
            u32::from_ne_bytes(way.addr_a),
        );
        set(
            std::mem::offset_of!(FlowWay, addr_b),
            u32::from_ne_bytes(way.addr_b),
        );
        let (a, bb) = (way.port_a.to_ne_bytes(), way.port_b.to_ne_bytes());
        set(
            std::mem::offset_of!(FlowWay, port_a),
            u32::from_ne_bytes([a[0], a[1], bb[0], bb[1]]),
        );
        set(std::mem::offset_of!(FlowWay, epoch), way.epoch);
        set(std::mem::offset_of!(FlowWay, rule), way.rule);
        set(std::mem::offset_of!(FlowWay, last_seen), way.last_seen);
        if i != 0 {
            self.meta(b, i).store(way.meta & 0xffff, Ordering::Relaxed);
        }
    }

    /// Writes `way` into way `i` of `b` as a program's insert does: under the bucket lock,
    /// the sequence moved on (tests of the agent's side).
    #[cfg(test)]
    pub fn write(&self, b: u32, i: usize, way: &FlowWay) {
        let c = self.control(b);
        let pair = loop {
            let pair = c.load(Ordering::Acquire);
            if pair as u32 & FLOW_LOCK == 0
                && c.compare_exchange(
                    pair,
                    pair | u64::from(FLOW_LOCK),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                break pair;
            }
        };
        let m0 = pair as u32;
        self.store_way(b, i, way);
        let low = way.meta & 0xffff;
        let m = if i == 0 { (m0 & !0xffff) | low } else { m0 };
        self.meta(b, 0)
            .store(next_seq(m | flow_live(i)), Ordering::Release);
    }
}

/// `m0` with the sequence moved on.
fn next_seq(m0: u32) -> u32 {
    let seq = (m0 & FLOW_SEQ_MASK).wrapping_add(1 << FLOW_SEQ_SHIFT) & FLOW_SEQ_MASK;
    (m0 & !FLOW_SEQ_MASK) | seq
}

/// The programs' clock (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC at tick resolution).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::{CT_ORIGIN_A, PROTO_TCP, PROTO_UDP, flow_stamp};

    const SEED: FlowSeed = FlowSeed {
        k: [0x1234_5678, 0x9abc_def0, 0x0fed_cba9, 0x8765_4321],
    };

    fn bucket_of(k: &CtKeyV4, buckets: u32) -> u32 {
        flow_bucket(k, buckets, &SEED)
    }

    fn key(endpoint: u32, port: u16) -> CtKeyV4 {
        CtKeyV4 {
            endpoint,
            protocol: PROTO_TCP,
            _pad: [0; 3],
            addr_a: [10, 0, 0, 1],
            addr_b: [10, 0, 0, 2],
            port_a: port,
            port_b: 80,
        }
    }

    fn way_of(k: &CtKeyV4, flags: u32) -> FlowWay {
        FlowWay {
            endpoint: k.endpoint,
            addr_a: k.addr_a,
            addr_b: k.addr_b,
            port_a: k.port_a,
            port_b: k.port_b,
            meta: u32::from(k.protocol) | flags << 8,
            epoch: 7,
            rule: 9,
            last_seen: flow_stamp(5 << 30),
        }
    }

    /// Two keys of the same bucket (of `buckets`), found by trying ports.
    fn colliding(buckets: u32) -> (CtKeyV4, CtKeyV4) {
        let a = key(1, 1000);
        let b = (1001..u16::MAX)
            .map(|p| key(1, p))
            .find(|k| bucket_of(k, buckets) == bucket_of(&a, buckets))
            .expect("a colliding port");
        (a, b)
    }

    #[test]
    fn the_agent_keeps_the_control_bits_and_moves_the_sequence_when_it_frees() {
        let mem = FlowMemory::heap(8, SEED);
        let (a, b) = colliding(8);
        let bucket = bucket_of(&a, 8);
        mem.write(bucket, 0, &way_of(&a, CT_ORIGIN_A));
        mem.write(bucket, 1, &way_of(&b, 0));
        mem.mark_overflow(&a);
        let m = mem.meta(bucket, 0).load(Ordering::Relaxed);
        assert_eq!(m & FLOW_OVERFLOW, FLOW_OVERFLOW);
        let live: Vec<CtKeyV4> = mem.read(bucket).live().map(FlowWay::key).collect();
        assert_eq!(live, vec![a, b], "marking frees nothing");
        assert!(mem.remove(&b));
        let after = mem.meta(bucket, 0).load(Ordering::Relaxed);
        assert_eq!(after & FLOW_OVERFLOW, FLOW_OVERFLOW, "overflow kept");
        assert_eq!(after & FLOW_LOCK, 0);
        assert_ne!(
            after & FLOW_SEQ_MASK,
            m & FLOW_SEQ_MASK,
            "a reader mid-read sees the bucket changed"
        );
        assert_eq!(mem.read(bucket).ways[0].value(5 << 30).flags, CT_ORIGIN_A);
    }

    #[test]
    fn remove_frees_only_its_flow() {
        let mem = FlowMemory::heap(8, SEED);
        let (a, b) = colliding(8);
        let bucket = bucket_of(&a, 8);
        mem.write(bucket, 0, &way_of(&a, 0));
        mem.write(bucket, 1, &way_of(&b, 0));
        let mut other = a;
        other.protocol = PROTO_UDP;
        assert!(!mem.remove(&other), "another protocol is another flow");
        assert!(mem.remove(&a));
        let after = mem.read(bucket);
        let live: Vec<CtKeyV4> = after.live().map(FlowWay::key).collect();
        assert_eq!(live, vec![b], "way 0 free, way 1 kept");
        assert!(!mem.remove(&a), "already gone");
        assert_eq!(mem.free_in(bucket, &|k: &CtKeyV4| k.endpoint == 1), 1);
        assert_eq!(mem.read(bucket).live().count(), 0);
    }

    #[test]
    fn the_agent_waits_for_a_program_holding_the_lock_and_keeps_its_write() {
        let mem = FlowMemory::heap(4, SEED);
        let (a, b) = colliding(4);
        let bucket = bucket_of(&a, 4);
        mem.write(bucket, 0, &way_of(&a, 0));
        // A program holds the bucket: the agent's change waits, then lands on top of what the
        // program wrote (way 1), never over it.
        let c = mem.control(bucket);
        c.fetch_or(u64::from(FLOW_LOCK), Ordering::AcqRel);
        std::thread::scope(|s| {
            let agent = s.spawn(|| mem.remove(&a));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!agent.is_finished(), "the agent waited for the lock");
            // The program's write: way 1, then release with the sequence moved on.
            mem.store_way(bucket, 1, &way_of(&b, 0));
            let m0 = mem.meta(bucket, 0).load(Ordering::Relaxed);
            mem.meta(bucket, 0).store(
                next_seq((m0 & !FLOW_LOCK) | flow_live(1)),
                Ordering::Release,
            );
            assert!(agent.join().unwrap(), "then removed its flow");
        });
        let after = mem.read(bucket);
        let live: Vec<CtKeyV4> = after.live().map(FlowWay::key).collect();
        assert_eq!(live, vec![b], "way 0 freed, the program's way 1 kept");
    }

    #[test]
    fn buckets_spread_flows() {
        // A port scan from one client: no bucket may take much more than its share, keyed or
        // with the unkeyed hash of older tables.
        let n = 1 << 12;
        for seed in [SEED, FlowSeed::UNKEYED] {
            let mut load = vec![0u32; n as usize];
            for p in 0..(4 * n) {
                load[flow_bucket(&key(3, p as u16), n, &seed) as usize] += 1;
            }
            assert!(load.iter().all(|&l| l <= 16), "max {:?}", load.iter().max());
        }
    }

    #[test]
    fn flows_aimed_at_one_bucket_under_one_key_spread_under_another() {
        // What a pod that knew the hash key could do: pick 64 tuples of one bucket. Under the
        // key the table really has, they land all over it.
        let n = 1 << 16;
        let target = bucket_of(&key(5, 0), n);
        let aimed: Vec<CtKeyV4> = (0..=u16::MAX)
            .flat_map(|p| (0..64u8).map(move |h| (p, h)))
            .map(|(p, h)| {
                let mut k = key(5, p);
                k.addr_b = [10, 9, 0, h];
                k
            })
            .filter(|k| bucket_of(k, n) == target)
            .take(64)
            .collect();
        assert_eq!(aimed.len(), 64, "enough tuples of one bucket");
        let other = FlowSeed {
            k: [0xdead_beef, 0x0bad_f00d, 0x1357_9bdf, 0x2468_ace0],
        };
        let buckets: std::collections::BTreeSet<u32> =
            aimed.iter().map(|k| flow_bucket(k, n, &other)).collect();
        assert!(buckets.len() >= 60, "{} buckets", buckets.len());
    }
}
