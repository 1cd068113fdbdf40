//! The IPv4 flow table (`FLOWS_V4`, see [`FlowBucket`]): where IPv4 flows live, with
//! `CONNTRACK_V4` (the kernel's LRU hash) behind it for the flows of full buckets.
//!
//! A new flow in the LRU hash costs a cold hash bucket, a cold element taken from the LRU's
//! lists, and their locks; here it costs the one cold cache line of its bucket. Readers take no
//! lock (see [`FlowBucket`] for the protocol); writers hold the bucket's lock for a few stores.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};

use enforcer_common::{
    Config, CtKeyV4, CtValue, FLOW_CONTROL, FLOW_FLAGS_SHIFT, FLOW_LIVE0, FLOW_LIVE1, FLOW_LOCK,
    FLOW_OVERFLOW, FLOW_PROTO_MASK, FLOW_SEQ_MASK, FLOW_SEQ_SHIFT, FlowBucket, FlowSeed, FlowWay,
    flow_bucket, flow_stamp, flow_stamp_ns,
};

use crate::{
    conntrack::{fresh, timeout},
    maps::FLOWS_V4,
};

/// Buckets of `FLOWS_V4`, set by the loader (`.rodata`, so the verifier and the JIT see a
/// constant); 0 = the table is off and IPv4 flows live in `CONNTRACK_V4` alone.
#[unsafe(no_mangle)]
static FLOW_BUCKETS: u32 = 0;

/// The key of the bucket hash, set by the loader (`.rodata`: the verifier sees a constant and
/// drops the unkeyed hash's code when it is keyed). The loader always sets it; the placeholder
/// is not all zeros because LLVM merges identical constants: an anonymous 16-byte zero (an
/// address compared with `::`) would become this global, and take the seed's value.
#[unsafe(no_mangle)]
static FLOW_SEED: FlowSeed = FlowSeed {
    k: [0x5eed_0001, 0x5eed_0002, 0x5eed_0003, 0x5eed_0004],
};

/// The table's bucket count, 0 when off.
#[inline(always)]
pub fn buckets() -> u32 {
    // SAFETY: a plain read of a global the loader fills in.
    unsafe { read_volatile(&FLOW_BUCKETS) }
}

/// The key of the table's bucket hash (also keys the Service deferral slots).
#[inline(always)]
pub fn seed() -> FlowSeed {
    // SAFETY: plain reads of a global the loader fills in.
    unsafe { read_volatile(&FLOW_SEED) }
}

/// The bucket of `key` in a table of `n` buckets.
#[inline(always)]
fn bucket_of(key: &CtKeyV4, n: u32) -> u32 {
    // SAFETY: plain reads of a global the loader fills in.
    let seed = unsafe { read_volatile(&FLOW_SEED) };
    flow_bucket(key, n, &seed)
}

/// Tries at the bucket lock before giving up (a holder keeps it for a few stores).
const LOCK_TRIES: u32 = 16;

/// What a lookup found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// In the table; the entry is in the caller's [`Snap`].
    Found,
    /// Not in the table, and its bucket never overflowed: not tracked at all.
    Missing,
    /// Not in the table, but its bucket overflowed: `CONNTRACK_V4` may hold it.
    Overflowed,
    /// The bucket stayed locked: nothing could be read.
    Busy,
}

/// What an insert did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Stored,
    /// The bucket is full of live flows; it is now marked [`FLOW_OVERFLOW`] and the flow
    /// belongs in `CONNTRACK_V4`.
    Spill,
    Busy,
}

/// A flow as read from its way: a consistent snapshot, and where it lives (for stamping it).
pub struct Snap {
    pub way: *mut FlowWay,
    pub flags: u32,
    pub epoch: u32,
    pub rule: u32,
    pub last_seen: u32,
    /// After a miss ([`Lookup::Missing`], [`Lookup::Overflowed`]) read without the lock: the
    /// bucket, and its control pair
    /// (way 0's `meta` and `epoch`) as read, for [`insert_missing`]; `u32::MAX` otherwise.
    pub bucket: u32,
    pub pair: u64,
}

impl Snap {
    pub const fn new() -> Self {
        Snap {
            way: core::ptr::null_mut(),
            flags: 0,
            epoch: 0,
            rule: 0,
            last_seen: 0,
            bucket: u32::MAX,
            pair: 0,
        }
    }

    /// The entry as a [`CtValue`] at `now`.
    #[inline(always)]
    pub fn value(&self, now: u64) -> CtValue {
        CtValue {
            last_seen_ns: flow_stamp_ns(self.last_seen, now),
            epoch: self.epoch,
            flags: self.flags,
            rule: self.rule,
            _pad: 0,
        }
    }

    /// Stamps the flow as seen at `now`: a lone store, with no lock. Should the way have been
    /// freed or given to another flow meanwhile, the store only makes a live entry look seen
    /// now, or a free way carry a stamp it ignores.
    #[inline(always)]
    pub fn touch(&self, now: u64) {
        let s = flow_stamp(now);
        if s != self.last_seen && !self.way.is_null() {
            // SAFETY: `way` points into a map value that outlives the program run.
            unsafe { write_volatile(&mut (*self.way).last_seen, s) };
        }
    }
}

/// Way 0 of the bucket of `key`.
#[inline(always)]
fn bucket(key: &CtKeyV4, n: u32) -> Option<*mut FlowWay> {
    bucket_at(bucket_of(key, n))
}

/// Way 0 of bucket `index`.
#[inline(always)]
fn bucket_at(index: u32) -> Option<*mut FlowWay> {
    let b: *mut FlowBucket = FLOWS_V4.get_ptr_mut(index)?;
    Some(b as *mut FlowWay)
}

/// Way 0's `meta` and `epoch` as one 64-bit word (meta in the low half), read with one load.
#[inline(always)]
fn control_pair(w0: *mut FlowWay) -> u64 {
    // SAFETY: way 0's meta and epoch, an 8-aligned pair of words of a map value.
    unsafe { read_volatile(&(*w0).meta as *const u32 as *const u64) }
}

/// Whether way `w` (whose `meta` is `meta`, live when `live`) holds `key`.
#[inline(always)]
fn holds(w: *const FlowWay, meta: u32, live: bool, key: &CtKeyV4) -> bool {
    let k = key as *const CtKeyV4 as *const u32;
    let ww = w as *const u32;
    // SAFETY: 32 bytes of a map value and a 20-byte key, both 4-aligned.
    unsafe {
        live && (meta & FLOW_PROTO_MASK) == (read_volatile(k.add(1)) & FLOW_PROTO_MASK)
            && (read_volatile(ww) ^ read_volatile(k))
                | (read_volatile(ww.add(1)) ^ read_volatile(k.add(2)))
                | (read_volatile(ww.add(2)) ^ read_volatile(k.add(3)))
                | (read_volatile(ww.add(3)) ^ read_volatile(k.add(4)))
                == 0
    }
}

/// Copies way `w` (with `meta`) into `snap`.
#[inline(always)]
fn copy(w: *mut FlowWay, meta: u32, snap: &mut Snap) {
    snap.way = w;
    snap.flags = (meta >> FLOW_FLAGS_SHIFT) & 0xff;
    // SAFETY: fields of a map value.
    unsafe {
        snap.epoch = read_volatile(&(*w).epoch);
        snap.rule = read_volatile(&(*w).rule);
        snap.last_seen = read_volatile(&(*w).last_seen);
    }
}

/// Looks `key` up in the bucket whose way 0 is `w0` and whose control word is `m0`.
#[inline(always)]
fn scan(w0: *mut FlowWay, m0: u32, key: &CtKeyV4, snap: &mut Snap) -> Lookup {
    if holds(w0, m0, m0 & FLOW_LIVE0 != 0, key) {
        copy(w0, m0, snap);
        return Lookup::Found;
    }
    // SAFETY: way 1 of the same 64-byte value.
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    if holds(w1, m1, m0 & FLOW_LIVE1 != 0, key) {
        copy(w1, m1, snap);
        return Lookup::Found;
    }
    if m0 & FLOW_OVERFLOW != 0 {
        Lookup::Overflowed
    } else {
        Lookup::Missing
    }
}

/// Compare-and-swap of way 0's `meta` and `epoch` as one 64-bit word (meta in the low half):
/// the target's only compare-and-swap (`BPF_CMPXCHG`) with a width Rust emits. Way 0's epoch
/// only changes under the lock, so a swap that expects the epoch just read fails only when the
/// control bits moved.
#[inline(always)]
fn swap_control(w0: *mut FlowWay, old: u64, new: u64) -> bool {
    const { assert!(core::mem::offset_of!(FlowWay, meta) == 16) };
    const { assert!(core::mem::offset_of!(FlowWay, epoch) == 20) };
    // SAFETY: an 8-aligned pair of words of a map value (page-aligned values, 64-byte buckets),
    // shared with other CPUs and the agent, which access way 0's meta atomically or with single
    // aligned loads and stores.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Acquire }, { AtomicOrdering::Relaxed }>(
            &mut (*w0).meta as *mut u32 as *mut u64,
            old,
            new,
        )
        .1
    }
}

/// One try at the bucket lock: way 0's `meta` as it was (unlocked) when taken.
#[inline(always)]
fn try_lock(w0: *mut FlowWay) -> Option<u32> {
    let pair = control_pair(w0);
    let cur = pair as u32;
    if cur & FLOW_LOCK == 0 && swap_control(w0, pair, pair | u64::from(FLOW_LOCK)) {
        Some(cur)
    } else {
        None
    }
}

/// What [`lock_retry`] returns when the lock stayed taken (no `meta` has bit 32).
const LOCK_FAILED: u64 = 1 << 32;

/// The tries after the first, out of line: a contended bucket is rare, and the loop (which
/// LLVM unrolls) would otherwise sit in every inlined path that takes the lock.
#[inline(never)]
fn lock_retry(w0: *mut FlowWay) -> u64 {
    let mut i = 1;
    while i < LOCK_TRIES {
        if let Some(m) = try_lock(w0) {
            return u64::from(m);
        }
        i += 1;
    }
    LOCK_FAILED
}

/// Takes the bucket lock; returns way 0's `meta` as it was (unlocked), or `None` after
/// [`LOCK_TRIES`] tries (another CPU's program holds it for a few stores).
#[inline(always)]
fn lock(w0: *mut FlowWay) -> Option<u32> {
    if let Some(m) = try_lock(w0) {
        return Some(m);
    }
    let m = lock_retry(w0);
    if m == LOCK_FAILED {
        None
    } else {
        Some(m as u32)
    }
}

/// Releases the lock with way 0's `meta` set to `m0` (its control bits as taken, plus any of
/// `extra`), the sequence moved on when the bucket `changed`. A plain store: while the lock is
/// held nobody else writes the word (the agent's compare-and-swap expects it free).
#[inline(always)]
fn unlock(w0: *mut FlowWay, m0: u32, extra: u32, changed: bool) {
    let mut m = (m0 & !FLOW_LOCK) | extra;
    if changed {
        let seq = (m0 & FLOW_SEQ_MASK).wrapping_add(1 << FLOW_SEQ_SHIFT) & FLOW_SEQ_MASK;
        m = (m & !FLOW_SEQ_MASK) | seq;
    }
    // SAFETY: way 0's meta, an aligned word of a map value.
    unsafe { write_volatile(&mut (*w0).meta, m) };
}

/// Looks `key` up in a table of `n` buckets, without a lock unless the bucket is being written.
#[inline(always)]
pub fn lookup(key: &CtKeyV4, n: u32, snap: &mut Snap) -> Lookup {
    let index = bucket_of(key, n);
    let Some(w0) = bucket_at(index) else {
        return Lookup::Overflowed;
    };
    let pair = control_pair(w0);
    let m0 = pair as u32;
    if m0 & FLOW_LOCK == 0 {
        let found = scan(w0, m0, key, snap);
        let again = unsafe { read_volatile(&(*w0).meta) };
        if (again ^ m0) & (FLOW_LOCK | FLOW_SEQ_MASK) == 0 {
            if found != Lookup::Found {
                snap.bucket = index;
                snap.pair = pair;
            }
            return found;
        }
    }
    // Being written: find the way under the lock, out of line; copy it here, lock still held
    // (a callee storing into the caller's `snap` would make the verifier lose track of the
    // caller's stack).
    let r = find_locked(w0, key);
    let m0 = r as u32;
    let w = match (r >> 32) as u32 {
        LOCKED_WAY0 => w0,
        // SAFETY: way 1 of the same 64-byte value.
        LOCKED_WAY1 => unsafe { w0.add(1) },
        LOCKED_OVERFLOWED => return Lookup::Overflowed,
        LOCKED_MISSING => return Lookup::Missing,
        _ => return Lookup::Busy,
    };
    // Flags sit below the lock bit: way 0's `meta` gives them as well as way 1's.
    copy(w, unsafe { read_volatile(&(*w).meta) }, snap);
    unlock(w0, m0, 0, false);
    Lookup::Found
}

const LOCKED_WAY0: u32 = 0;
const LOCKED_WAY1: u32 = 1;
const LOCKED_MISSING: u32 = 2;
const LOCKED_OVERFLOWED: u32 = 3;
const LOCKED_BUSY: u32 = 4;

/// [`lookup`] of a bucket being written: takes its lock and finds the way of `key`. Returns
/// the outcome in the high half and way 0's `meta` as taken in the low half; when a way holds
/// the key the lock is still held, for the caller to copy it and release with that `meta`.
#[inline(never)]
fn find_locked(w0: *mut FlowWay, key: &CtKeyV4) -> u64 {
    let Some(m0) = lock(w0) else {
        return u64::from(LOCKED_BUSY) << 32;
    };
    // SAFETY: way 1 of the same 64-byte value.
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    let way = if holds(w0, m0, m0 & FLOW_LIVE0 != 0, key) {
        LOCKED_WAY0
    } else if holds(w1, m1, m0 & FLOW_LIVE1 != 0, key) {
        LOCKED_WAY1
    } else {
        unlock(w0, m0, 0, false);
        if m0 & FLOW_OVERFLOW != 0 {
            LOCKED_OVERFLOWED
        } else {
            LOCKED_MISSING
        }
    };
    u64::from(way) << 32 | u64::from(m0)
}

/// Whether way `w` (with `meta`, live when `live`) may be given to a new flow: free, or idle
/// past the timeout of its protocol and state, as in the full path. (An expired flow no longer
/// counts for its endpoint from the next sweep on: the count is not touched here.)
#[inline(always)]
fn reusable(w: *mut FlowWay, meta: u32, live: bool, now: u64, cfg: Option<&Config>) -> bool {
    if !live {
        return true;
    }
    let proto = (meta & FLOW_PROTO_MASK) as u8;
    let flags = (meta >> FLOW_FLAGS_SHIFT) & 0xff;
    let stamp = unsafe { read_volatile(&(*w).last_seen) };
    !fresh(now, flow_stamp_ns(stamp, now), timeout(cfg, proto, flags))
}

/// Writes `key` and `v` into way `w` (lock held); returns the way's new low `meta` bits.
#[inline(always)]
fn fill(w: *mut FlowWay, key: &CtKeyV4, v: &CtValue) -> u32 {
    let k = key as *const CtKeyV4 as *const u32;
    let ww = w as *mut u32;
    // SAFETY: a 32-byte way of a map value and a 20-byte key, both 4-aligned.
    unsafe {
        write_volatile(ww, read_volatile(k));
        write_volatile(ww.add(1), read_volatile(k.add(2)));
        write_volatile(ww.add(2), read_volatile(k.add(3)));
        write_volatile(ww.add(3), read_volatile(k.add(4)));
        write_volatile(&mut (*w).epoch, v.epoch);
        write_volatile(&mut (*w).rule, v.rule);
        write_volatile(&mut (*w).last_seen, flow_stamp(v.last_seen_ns));
        (read_volatile(k.add(1)) & FLOW_PROTO_MASK) | (v.flags & 0xff) << FLOW_FLAGS_SHIFT
    }
}

/// Records `v` for `key`: in the way that holds it already, else in a free or expired way;
/// with both ways live, marks the bucket overflowed and leaves the flow to `CONNTRACK_V4`.
#[inline(always)]
pub fn insert(key: &CtKeyV4, n: u32, v: &CtValue, now: u64, cfg: Option<&Config>) -> Insert {
    let Some(w0) = bucket(key, n) else {
        return Insert::Spill;
    };
    let Some(m0) = lock(w0) else {
        return Insert::Busy;
    };
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    // A flow is never in both ways: its own way first.
    if holds(w0, m0, m0 & FLOW_LIVE0 != 0, key) {
        let low = fill(w0, key, v);
        unlock(w0, (m0 & FLOW_CONTROL) | FLOW_LIVE0 | low, 0, true);
        return Insert::Stored;
    }
    if holds(w1, m1, m0 & FLOW_LIVE1 != 0, key) {
        let low = fill(w1, key, v);
        unsafe { write_volatile(&mut (*w1).meta, low) };
        unlock(w0, m0 | FLOW_LIVE1, 0, true);
        return Insert::Stored;
    }
    place(w0, m0, key, v, now, cfg)
}

/// [`insert`] of a flow that [`lookup`] has just found missing (`snap` from that lookup):
/// when the bucket's control pair is still the one the lookup read, taking the lock with it
/// proves no way was written since (every write moves the sequence on under the lock), so
/// the ways need no second look for the key, and the bucket no second hash. Otherwise, a
/// plain [`insert`].
#[inline(always)]
pub fn insert_missing(
    key: &CtKeyV4,
    snap: &Snap,
    n: u32,
    v: &CtValue,
    now: u64,
    cfg: Option<&Config>,
) -> Insert {
    if snap.bucket != u32::MAX
        && let Some(w0) = bucket_at(snap.bucket)
        && swap_control(w0, snap.pair, snap.pair | u64::from(FLOW_LOCK))
    {
        return place(w0, snap.pair as u32, key, v, now, cfg);
    }
    insert(key, n, v, now, cfg)
}

/// Puts `key` (in neither way) into a free or expired way of the bucket whose way 0 is `w0`,
/// locked with `meta` `m0`, and releases it; with both ways live, marks the bucket overflowed.
#[inline(always)]
fn place(
    w0: *mut FlowWay,
    m0: u32,
    key: &CtKeyV4,
    v: &CtValue,
    now: u64,
    cfg: Option<&Config>,
) -> Insert {
    if reusable(w0, m0, m0 & FLOW_LIVE0 != 0, now, cfg) {
        let low = fill(w0, key, v);
        unlock(w0, (m0 & FLOW_CONTROL) | FLOW_LIVE0 | low, 0, true);
        return Insert::Stored;
    }
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    if reusable(w1, m1, m0 & FLOW_LIVE1 != 0, now, cfg) {
        let low = fill(w1, key, v);
        unsafe { write_volatile(&mut (*w1).meta, low) };
        unlock(w0, m0 | FLOW_LIVE1, 0, true);
        return Insert::Stored;
    }
    unlock(w0, m0, FLOW_OVERFLOW, m0 & FLOW_OVERFLOW == 0);
    Insert::Spill
}

/// [`insert`] out of line, for the full path (the fast path inlines its own).
#[inline(never)]
pub fn insert_slow(key: &CtKeyV4, n: u32, v: &CtValue, now: u64, cfg: Option<&Config>) -> Insert {
    insert(key, n, v, now, cfg)
}

/// Rewrites the entry of `key` (a re-check under a new policy epoch): its flags, epoch, rule
/// and stamp at once, under the lock, so no reader sees half of it. False if it is gone.
#[inline(never)]
pub fn update(key: &CtKeyV4, n: u32, v: &CtValue) -> bool {
    let Some(w0) = bucket(key, n) else {
        return false;
    };
    let Some(m0) = lock(w0) else {
        return false;
    };
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    if holds(w0, m0, m0 & FLOW_LIVE0 != 0, key) {
        let low = fill(w0, key, v);
        unlock(w0, (m0 & FLOW_CONTROL) | low, 0, true);
        return true;
    }
    if holds(w1, m1, m0 & FLOW_LIVE1 != 0, key) {
        let low = fill(w1, key, v);
        unsafe { write_volatile(&mut (*w1).meta, low) };
        unlock(w0, m0, 0, true);
        return true;
    }
    unlock(w0, m0, 0, false);
    false
}

/// Frees the way of `key`, if any.
#[inline(never)]
pub fn remove(key: &CtKeyV4, n: u32) {
    let Some(w0) = bucket(key, n) else {
        return;
    };
    let Some(m0) = lock(w0) else {
        return;
    };
    let w1 = unsafe { w0.add(1) };
    let m1 = unsafe { read_volatile(&(*w1).meta) };
    if holds(w0, m0, m0 & FLOW_LIVE0 != 0, key) {
        unlock(w0, m0 & !FLOW_LIVE0, 0, true);
    } else if holds(w1, m1, m0 & FLOW_LIVE1 != 0, key) {
        unlock(w0, m0 & !FLOW_LIVE1, 0, true);
    } else {
        unlock(w0, m0, 0, false);
    }
}
