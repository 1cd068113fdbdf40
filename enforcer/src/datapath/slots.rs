//! `ENDPOINT_SLOTS`: the established path's copy of ENDPOINTS, direct-mapped by ifindex.
//!
//! A packet of an established flow needs four fields of its endpoint before its conntrack
//! lookup. Read from the ENDPOINTS hash they cost three dependent cache misses on the real
//! path (table, bucket, element), and the conntrack lookup waits on all three; read from the
//! endpoint's slot of an array they cost one. ENDPOINTS stays the authority: every write goes
//! there first, a slot only ever mirrors an entry, and a program that finds no usable slot
//! reads ENDPOINTS as before.
//!
//! Slots are written through a shared mapping of the (mmapable) array as a sequence lock (see
//! [`EndpointSlot`]): a program never acts on a half-written slot. Two live veths whose
//! ifindexes share the low bits share a slot: the lower ifindex gets it, the other keeps the
//! hash path. The programs read a slot with plain loads in program order, which only x86-64
//! keeps in order, so elsewhere every slot stays free.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use super::mapping::SharedMemory;
use anyhow::Result;
use enforcer_common::{ENDPOINT_SLOT_COUNT, EndpointInfo, EndpointSlot, endpoint_slot};

/// Whether this machine may fill slots (see the module doc).
pub const SLOTS_SUPPORTED: bool = cfg!(target_arch = "x86_64");

const LEN: usize = ENDPOINT_SLOT_COUNT as usize * size_of::<EndpointSlot>();

/// The slot array as memory the agent writes with atomic stores.
pub struct SlotMemory {
    mem: SharedMemory,
}

impl SlotMemory {
    /// Maps the array behind `fd` (an `ENDPOINT_SLOTS` map created `BPF_F_MMAPABLE`).
    pub fn map(fd: std::os::fd::BorrowedFd<'_>) -> Result<Self> {
        Ok(Self {
            mem: SharedMemory::map(fd, LEN, enforcer_common::MAP_ENDPOINT_SLOTS)?,
        })
    }

    /// Zeroed slots in plain memory, for tests of the writer.
    pub fn heap() -> Self {
        Self {
            mem: SharedMemory::heap(LEN),
        }
    }

    fn slot(&self, index: u32) -> *mut EndpointSlot {
        assert!(index < ENDPOINT_SLOT_COUNT);
        // SAFETY: in bounds (asserted), inside the LEN bytes this value owns or maps.
        unsafe { self.mem.base::<EndpointSlot>().add(index as usize) }
    }

    fn head(&self, index: u32) -> &AtomicU64 {
        // SAFETY: the first 8 bytes of a 32-byte slot at an 8-aligned (page or u64) base.
        unsafe { AtomicU64::from_ptr(self.slot(index).cast()) }
    }

    fn word(&self, index: u32, field: usize) -> &AtomicU32 {
        // SAFETY: a 4-aligned field inside the slot.
        unsafe { AtomicU32::from_ptr(self.slot(index).cast::<u8>().add(field).cast()) }
    }

    /// The slot as it is now (fields read one by one: consistent only when nobody writes).
    pub fn read(&self, index: u32) -> EndpointSlot {
        let h = self.head(index).load(Ordering::Acquire);
        let w = |f| self.word(index, f).load(Ordering::Relaxed);
        EndpointSlot {
            ifindex: h as u32,
            seq: (h >> 32) as u32,
            id: w(core::mem::offset_of!(EndpointSlot, id)),
            flags: w(core::mem::offset_of!(EndpointSlot, flags)),
            epoch: w(core::mem::offset_of!(EndpointSlot, epoch)),
            ipv4: w(core::mem::offset_of!(EndpointSlot, ipv4)).to_ne_bytes(),
            port_masks: [
                w(core::mem::offset_of!(EndpointSlot, port_masks)),
                w(core::mem::offset_of!(EndpointSlot, port_masks) + 4),
            ],
        }
    }

    /// Writes `v` (its `seq` ignored) under the sequence lock: odd sequence on the old first
    /// word, the fields, then the new first word with the next even sequence.
    pub fn write(&self, index: u32, v: &EndpointSlot) {
        let head = self.head(index);
        let cur = head.load(Ordering::Relaxed);
        // Odd from here on (already odd if a writer died half-way: stays odd until done).
        let odd = (cur >> 32) as u32 | 1;
        head.store((cur & 0xffff_ffff) | (odd as u64) << 32, Ordering::Relaxed);
        fence(Ordering::Release);
        let set = |f, x: u32| self.word(index, f).store(x, Ordering::Relaxed);
        set(core::mem::offset_of!(EndpointSlot, id), v.id);
        set(core::mem::offset_of!(EndpointSlot, flags), v.flags);
        set(core::mem::offset_of!(EndpointSlot, epoch), v.epoch);
        set(
            core::mem::offset_of!(EndpointSlot, ipv4),
            u32::from_ne_bytes(v.ipv4),
        );
        set(
            core::mem::offset_of!(EndpointSlot, port_masks),
            v.port_masks[0],
        );
        set(
            core::mem::offset_of!(EndpointSlot, port_masks) + 4,
            v.port_masks[1],
        );
        let even = odd.wrapping_add(1);
        head.store(v.ifindex as u64 | (even as u64) << 32, Ordering::Release);
    }

    /// The slot of `index` as the programs take it: when it names `ifindex` with an even
    /// sequence that did not change while the fields were read.
    pub fn read_consistent(&self, index: u32, ifindex: u32) -> Option<EndpointSlot> {
        let v = self.read(index);
        if v.ifindex != ifindex || v.seq & 1 != 0 {
            return None;
        }
        fence(Ordering::Acquire);
        let again = self.head(index).load(Ordering::Relaxed);
        (again == v.ifindex as u64 | (v.seq as u64) << 32).then_some(v)
    }

    /// Writes the first word alone, as a writer that stopped half-way would leave it: for
    /// tests that a program ignores such a slot.
    pub fn write_head(&self, index: u32, ifindex: u32, seq: u32) {
        self.head(index)
            .store(ifindex as u64 | (seq as u64) << 32, Ordering::Release);
    }
}

/// Keeps the slots equal to what ENDPOINTS holds: the caller reports every entry it writes or
/// removes, after writing it and before removing it.
pub struct SlotSync {
    mem: SlotMemory,
    enabled: bool,
    known: BTreeMap<u32, EndpointInfo>,
    /// (slot, ifindex) of every known entry: a slot's owner is its lowest ifindex.
    by_slot: BTreeSet<(u32, u32)>,
}

impl SlotSync {
    /// Starts from the entries ENDPOINTS holds (a restarted agent finds its predecessor's) and
    /// rewrites every slot that does not mirror them.
    pub fn new(
        mem: SlotMemory,
        enabled: bool,
        entries: impl IntoIterator<Item = (u32, EndpointInfo)>,
    ) -> Self {
        let mut s = Self {
            mem,
            enabled,
            known: BTreeMap::new(),
            by_slot: BTreeSet::new(),
        };
        for (ifindex, info) in entries {
            s.known.insert(ifindex, info);
            s.by_slot.insert((endpoint_slot(ifindex), ifindex));
        }
        for slot in 0..ENDPOINT_SLOT_COUNT {
            s.sync(slot);
        }
        s
    }

    /// ENDPOINTS now holds `info` at `ifindex`.
    pub fn written(&mut self, ifindex: u32, info: &EndpointInfo) {
        self.known.insert(ifindex, *info);
        self.by_slot.insert((endpoint_slot(ifindex), ifindex));
        self.sync(endpoint_slot(ifindex));
    }

    /// ENDPOINTS is about to lose `ifindex`.
    pub fn removing(&mut self, ifindex: u32) {
        self.known.remove(&ifindex);
        self.by_slot.remove(&(endpoint_slot(ifindex), ifindex));
        self.sync(endpoint_slot(ifindex));
    }

    /// The slot `ifindex` maps to, as it is now.
    pub fn slot_of(&self, ifindex: u32) -> EndpointSlot {
        self.mem.read(endpoint_slot(ifindex))
    }

    /// The slot memory itself, for tests that leave a slot half-written.
    pub fn memory(&self) -> &SlotMemory {
        &self.mem
    }

    /// Slots that describe an endpoint.
    pub fn filled(&self) -> usize {
        (0..ENDPOINT_SLOT_COUNT)
            .filter(|&i| self.mem.read(i).ifindex != 0)
            .count()
    }

    /// What `slot` should hold: its owner's fields, or nothing.
    fn wanted(&self, slot: u32) -> EndpointSlot {
        if !self.enabled {
            return EndpointSlot::default();
        }
        self.by_slot
            .range((slot, 0)..=(slot, u32::MAX))
            .next()
            .and_then(|&(_, ifindex)| {
                let info = self.known.get(&ifindex)?;
                Some(EndpointSlot::of(ifindex, info))
            })
            .unwrap_or_default()
    }

    fn sync(&mut self, slot: u32) {
        let want = self.wanted(slot);
        let cur = self.mem.read(slot);
        // `want` has sequence 0: compare everything but the sequence.
        if cur.seq & 1 == 1 || (EndpointSlot { seq: 0, ..cur }) != want {
            self.mem.write(slot, &want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::EP_HAS_V4;

    fn info(id: u32, epoch: u32) -> EndpointInfo {
        EndpointInfo {
            id,
            flags: EP_HAS_V4,
            epoch,
            ipv4: [10, 0, 0, id as u8],
            ..EndpointInfo::default()
        }
    }

    /// What a program would take from the slot for `ifindex`: the fields when the slot names
    /// it with an even sequence.
    fn seen(s: &SlotSync, ifindex: u32) -> Option<(u32, u32)> {
        let v = s.slot_of(ifindex);
        (v.ifindex == ifindex && v.seq & 1 == 0).then_some((v.id, v.epoch))
    }

    #[test]
    fn slots_mirror_writes_and_removals() {
        let mut s = SlotSync::new(SlotMemory::heap(), true, []);
        s.written(7, &info(1, 1));
        assert_eq!(seen(&s, 7), Some((1, 1)));
        s.written(7, &info(1, 2));
        assert_eq!(seen(&s, 7), Some((1, 2)));
        s.removing(7);
        assert_eq!(seen(&s, 7), None);
        assert_eq!(s.slot_of(7).ifindex, 0);
        assert_eq!(s.filled(), 0);
    }

    #[test]
    fn a_shared_slot_goes_to_the_lower_ifindex_and_passes_on() {
        let (a, b) = (9, 9 + ENDPOINT_SLOT_COUNT);
        let mut s = SlotSync::new(SlotMemory::heap(), true, []);
        s.written(b, &info(2, 1));
        assert_eq!(seen(&s, b), Some((2, 1)));
        s.written(a, &info(1, 1));
        // The lower ifindex takes it; `b` now reads ENDPOINTS.
        assert_eq!(seen(&s, a), Some((1, 1)));
        assert_eq!(seen(&s, b), None);
        // A write of the other one leaves the slot alone.
        s.written(b, &info(2, 5));
        assert_eq!(seen(&s, a), Some((1, 1)));
        s.removing(a);
        assert_eq!(seen(&s, b), Some((2, 5)));
        assert_eq!(s.filled(), 1);
    }

    #[test]
    fn restart_rewrites_what_does_not_mirror_the_entries() {
        let mem = SlotMemory::heap();
        // A predecessor's leftovers: a slot for a gone endpoint, one half-written, one stale.
        mem.write(endpoint_slot(3), &EndpointSlot::of(3, &info(3, 1)));
        mem.write(endpoint_slot(4), &EndpointSlot::of(4, &info(4, 1)));
        mem.write_head(endpoint_slot(4), 4, 7);
        mem.write(endpoint_slot(5), &EndpointSlot::of(5, &info(5, 1)));
        let s = SlotSync::new(mem, true, [(4, info(4, 1)), (5, info(5, 2))]);
        assert_eq!(seen(&s, 3), None);
        assert_eq!(seen(&s, 4), Some((4, 1)));
        assert_eq!(seen(&s, 5), Some((5, 2)));
        assert_eq!(s.filled(), 2);
    }

    #[test]
    fn disabled_keeps_every_slot_free() {
        let mem = SlotMemory::heap();
        mem.write(endpoint_slot(3), &EndpointSlot::of(3, &info(3, 1)));
        let mut s = SlotSync::new(mem, false, [(3, info(3, 1))]);
        s.written(8, &info(8, 1));
        assert_eq!(s.filled(), 0);
    }

    /// A writer flipping a slot between two endpoints' fields as fast as it can, a reader on
    /// another thread reading it the way the programs do: the reader gets one or the other,
    /// never a mix of the two (the check fails when the writer stores a field before marking
    /// the slot odd).
    #[test]
    fn a_reader_never_sees_a_mix_of_two_writes() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering::Relaxed},
        };
        let mem = Arc::new(SlotMemory::heap());
        let x = EndpointSlot::of(5, &info(1, 1));
        let mut y = EndpointSlot::of(5, &info(2, 2));
        y.flags = 0;
        y.port_masks = [7, 9];
        mem.write(0, &x);
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = {
            let (mem, stop, writes) = (mem.clone(), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    mem.write(0, if n.is_multiple_of(2) { &y } else { &x });
                    n += 1;
                    writes.store(n, Relaxed);
                    // A gap between writes, as between two agent writes: without it a reader
                    // on the other core would rarely find the slot at rest at all.
                    for _ in 0..8 {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        // Read while the writer runs: until it has written 3M times and we have read 3M
        // times, or 5 s.
        let start = std::time::Instant::now();
        let (mut reads, mut mixed, mut tries) = (0u64, 0u64, 0u64);
        while (tries < 3_000_000 || writes.load(Relaxed) < 3_000_000)
            && start.elapsed() < std::time::Duration::from_secs(5)
        {
            tries += 1;
            if writes.load(Relaxed) == 0 {
                continue;
            }
            if let Some(v) = mem.read_consistent(0, 5) {
                reads += 1;
                let v = EndpointSlot { seq: 0, ..v };
                if v != x && v != y {
                    mixed += 1;
                }
            }
        }
        stop.store(true, Relaxed);
        writer.join().unwrap();
        assert!(reads > 0, "the reader never got a consistent slot");
        assert_eq!(mixed, 0, "{mixed} of {reads} reads mixed two writes");
    }

    #[test]
    fn every_write_moves_the_sequence_by_two_and_leaves_it_even() {
        let mem = SlotMemory::heap();
        for n in 1..=3u32 {
            mem.write(1, &EndpointSlot::of(1, &info(1, n)));
            assert_eq!(mem.read(1).seq, 2 * n);
        }
        // After a writer that stopped at odd: the next write completes to the next even.
        mem.write_head(1, 1, 9);
        mem.write(1, &EndpointSlot::of(1, &info(1, 9)));
        assert_eq!(mem.read(1).seq, 10);
    }
}
