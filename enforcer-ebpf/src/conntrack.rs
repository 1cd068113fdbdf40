//! Conntrack (the IPv4 flow table of [`crate::flows`] first, then the LRU maps) and fragment
//! keys, address helpers.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub},
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use enforcer_common::{
    CONFIG_CT_LRU_ALL, CT_ORIGIN_A, CT_ORIGIN_EGRESS, Config, CtKey, CtKeyV4, CtValue, DIR_EGRESS,
    FAMILY_V4, FlowSeed, FragKey, ct_timeout,
};

use crate::{
    flows::{self, Insert, Lookup, Snap},
    maps::{CONNTRACK_V4, CONNTRACK_V6, FLOW_COUNTS},
    mem::{copy16, word},
    parse::Packet,
};

/// Byte-wise equality of two addresses (no memcmp in BPF), a word at a time.
#[inline(always)]
pub fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    (word(a, 0) ^ word(b, 0))
        | (word(a, 1) ^ word(b, 1))
        | (word(a, 2) ^ word(b, 2))
        | (word(a, 3) ^ word(b, 3))
        == 0
}

/// `(a, pa) <= (b, pb)`, comparing address bytes then port (big-endian words compare as bytes).
#[inline(always)]
fn end_le(a: &[u8; 16], pa: u16, b: &[u8; 16], pb: u16) -> bool {
    let mut i = 0;
    while i < 4 {
        let x = u32::from_be(word(a, i));
        let y = u32::from_be(word(b, i));
        if x != y {
            return x < y;
        }
        i += 1;
    }
    pa <= pb
}

/// The conntrack key of the packet at hand, in the form of its family's map: IPv4 flows live in
/// `CONNTRACK_V4` under a 20-byte key (hashed and compared on every packet of an established
/// flow), IPv6 flows in `CONNTRACK_V6` under the 44-byte [`CtKey`].
#[repr(C)]
pub struct CtKeys {
    pub v4: CtKeyV4,
    pub v6: CtKey,
    pub family: u8,
}

/// Writes into `keys` the normalized key of the flow `src:sport -> dst:dport` at `endpoint`;
/// returns whether `src` is end `a` of the key.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "a flow tuple")]
pub fn ct_key(
    keys: &mut CtKeys,
    endpoint: u32,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> bool {
    keys.family = family;
    if family == FAMILY_V4 {
        return v4_flow(
            &mut keys.v4,
            endpoint,
            proto,
            word(src, 0),
            sport,
            word(dst, 0),
            dport,
        );
    }
    let key = &mut keys.v6;
    let src_is_a = end_le(src, sport, dst, dport);
    key.endpoint = endpoint;
    key.family = family;
    key.protocol = proto;
    key._pad = 0;
    if src_is_a {
        copy16(&mut key.addr_a, src);
        copy16(&mut key.addr_b, dst);
        key.port_a = sport;
        key.port_b = dport;
    } else {
        copy16(&mut key.addr_a, dst);
        copy16(&mut key.addr_b, src);
        key.port_a = dport;
        key.port_b = sport;
    }
    src_is_a
}

/// The normalized IPv4 key of `src:sport -> dst:dport` (addresses in network order, as in the
/// packet) into `key`; returns whether `src` is end `a`.
#[inline(always)]
fn v4_flow(
    key: &mut CtKeyV4,
    endpoint: u32,
    proto: u8,
    s: u32,
    sport: u16,
    d: u32,
    dport: u16,
) -> bool {
    let (hs, hd) = (u32::from_be(s), u32::from_be(d));
    let src_is_a = hs < hd || (hs == hd && sport <= dport);
    let (a, b, pa, pb) = if src_is_a {
        (s, d, sport, dport)
    } else {
        (d, s, dport, sport)
    };
    v4_key(key, endpoint, proto, a, b, pa, pb);
    src_is_a
}

/// [`ct_key`] for the fast path: the IPv4 key alone, in a caller's (stack) slot.
#[inline(always)]
pub fn ct_key_v4(
    key: &mut MaybeUninit<CtKeyV4>,
    endpoint: u32,
    proto: u8,
    src: u32,
    sport: u16,
    dst: u32,
    dport: u16,
) -> (&CtKeyV4, bool) {
    // SAFETY: `v4_flow` writes all 20 bytes (five words) before the reference is used.
    let k = unsafe { &mut *key.as_mut_ptr() };
    let src_is_a = v4_flow(k, endpoint, proto, src, sport, dst, dport);
    (k, src_is_a)
}

/// `CtKeyV4` as five word stores (a struct literal's zero padding would become a `memset`).
#[inline(always)]
fn v4_key(key: &mut CtKeyV4, endpoint: u32, proto: u8, a: u32, b: u32, pa: u16, pb: u16) {
    const {
        assert!(core::mem::offset_of!(CtKeyV4, protocol) == 4);
        assert!(core::mem::offset_of!(CtKeyV4, addr_a) == 8);
        assert!(core::mem::offset_of!(CtKeyV4, addr_b) == 12);
        assert!(core::mem::offset_of!(CtKeyV4, port_a) == 16);
        assert!(core::mem::offset_of!(CtKeyV4, port_b) == 18);
        assert!(core::mem::size_of::<CtKeyV4>() == 20);
    };
    let w = key as *mut CtKeyV4 as *mut u32;
    let (pa, pb) = (pa.to_ne_bytes(), pb.to_ne_bytes());
    unsafe {
        write_volatile(w, endpoint);
        write_volatile(w.add(1), u32::from_ne_bytes([proto, 0, 0, 0]));
        write_volatile(w.add(2), a);
        write_volatile(w.add(3), b);
        write_volatile(w.add(4), u32::from_ne_bytes([pa[0], pa[1], pb[0], pb[1]]));
    }
}

/// An entry found by [`ct_lookup`]: a copy of it, and where it lives.
pub struct CtHit {
    pub value: CtValue,
    /// Its way of `FLOWS_V4` (`snap.way` null when it lives in an LRU map).
    snap: Snap,
    /// Its element of `CONNTRACK_V4` / `CONNTRACK_V6`, when it lives there.
    lru: *mut CtValue,
}

impl CtHit {
    pub const fn new() -> Self {
        CtHit {
            value: CtValue {
                last_seen_ns: 0,
                epoch: 0,
                flags: 0,
                rule: 0,
                _pad: 0,
            },
            snap: Snap::new(),
            lru: core::ptr::null_mut(),
        }
    }

    /// Marks the flow seen at `now` (a lone store, skipped within the clock's tick).
    #[inline(always)]
    pub fn touch(&self, now: u64) {
        if !self.lru.is_null() {
            // SAFETY: an element of an LRU map, valid for the rest of the program run.
            unsafe {
                if (*self.lru).last_seen_ns != now {
                    (*self.lru).last_seen_ns = now;
                }
            }
        } else {
            self.snap.touch(now);
        }
    }

    /// Writes `self.value` back to the flow of `keys` (all fields at once for `FLOWS_V4`).
    #[inline(always)]
    pub fn store(&self, keys: &CtKeys) {
        if !self.lru.is_null() {
            let v = &self.value;
            // SAFETY: as in `touch`.
            unsafe {
                (*self.lru).flags = v.flags;
                (*self.lru).epoch = v.epoch;
                (*self.lru).rule = v.rule;
                (*self.lru).last_seen_ns = v.last_seen_ns;
            }
        } else {
            // Gone or locked: the flow keeps its old epoch, so its next packet is re-checked.
            flows::update(&keys.v4, flows::buckets(), &self.value);
        }
    }
}

/// What [`ct_lookup`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CtFound {
    Yes,
    No,
    /// The flow's `FLOWS_V4` bucket stayed locked: unknown.
    Busy,
}

/// Whether IPv4 flows of `keys` live in `FLOWS_V4` (first).
#[inline(always)]
fn in_table(keys: &CtKeys) -> bool {
    keys.family == FAMILY_V4 && flows::buckets() != 0
}

/// Looks up the flow whose key `ct_key` wrote last, into `hit`.
#[inline(always)]
pub fn ct_lookup(keys: &CtKeys, now: u64, cfg: Option<&Config>, hit: &mut CtHit) -> CtFound {
    if in_table(keys) {
        match flows::lookup(&keys.v4, flows::buckets(), &mut hit.snap) {
            Lookup::Found => {
                hit.value = hit.snap.value(now);
                return CtFound::Yes;
            }
            Lookup::Busy => return CtFound::Busy,
            Lookup::Missing if config_flags(cfg) & CONFIG_CT_LRU_ALL == 0 => return CtFound::No,
            Lookup::Missing | Lookup::Overflowed => {}
        }
        hit.snap.way = core::ptr::null_mut();
    }
    let e = if keys.family == FAMILY_V4 {
        CONNTRACK_V4.get_ptr_mut(&keys.v4)
    } else {
        CONNTRACK_V6.get_ptr_mut(&keys.v6)
    };
    match e {
        Some(e) => {
            hit.lru = e;
            // SAFETY: an element of an LRU map.
            hit.value = unsafe { *e };
            CtFound::Yes
        }
        None => CtFound::No,
    }
}

/// Records the flow of `keys`; `Err` when the maps would not take it.
#[inline(always)]
pub fn ct_insert(
    keys: &CtKeys,
    value: &CtValue,
    now: u64,
    cfg: Option<&Config>,
) -> Result<(), i32> {
    if in_table(keys) {
        match flows::insert_slow(&keys.v4, flows::buckets(), value, now, cfg) {
            Insert::Stored => return Ok(()),
            Insert::Busy => return Err(-1),
            Insert::Spill => {}
        }
    }
    if keys.family == FAMILY_V4 {
        CONNTRACK_V4.insert(&keys.v4, value, 0)
    } else {
        CONNTRACK_V6.insert(&keys.v6, value, 0)
    }
}

/// Forgets the flow of `keys`, wherever it lives.
#[inline(always)]
pub fn ct_remove(keys: &CtKeys) {
    if in_table(keys) {
        flows::remove(&keys.v4, flows::buckets());
    }
    let _ = if keys.family == FAMILY_V4 {
        CONNTRACK_V4.remove(&keys.v4)
    } else {
        CONNTRACK_V6.remove(&keys.v6)
    };
}

#[inline(always)]
pub fn frag_key(key: &mut FragKey, endpoint: u32, direction: u8, pkt: &Packet) {
    key.endpoint = endpoint;
    key.id = pkt.frag_id;
    key.family = pkt.family;
    key.protocol = pkt.proto;
    key.direction = direction;
    key._pad = 0;
    copy16(&mut key.src, &pkt.src);
    copy16(&mut key.dst, &pkt.dst);
}

/// The entry of a flow allowed now: opened from end `a` of its key when `src_is_a`, in the
/// endpoint's direction `dir`, under its policy `epoch`, by `rule`. A TCP flow starts
/// unanswered whatever its first packet (a FIN or RST that opens one is rare, and its state
/// only gets the shorter timeout).
#[inline(always)]
pub fn new_entry(src_is_a: bool, dir: u8, now: u64, epoch: u32, rule: u32) -> CtValue {
    let mut flags = 0;
    if src_is_a {
        flags |= CT_ORIGIN_A;
    }
    if dir == DIR_EGRESS {
        flags |= CT_ORIGIN_EGRESS;
    }
    CtValue {
        last_seen_ns: now,
        epoch,
        flags,
        rule,
        _pad: 0,
    }
}

/// Timeouts and limits when CONFIG cannot be read: the defaults, no limit.
const NO_CONFIG: Config = Config {
    flags: 0,
    max_flows_per_endpoint: 0,
    ct_timeout_tcp_ns: 0,
    ct_timeout_other_ns: 0,
    ct_timeout_tcp_syn_ns: 0,
    ct_timeout_tcp_closed_ns: 0,
    flow_seed: FlowSeed::UNKEYED,
};

/// Idle timeout (ns) of a flow of `proto` in the state `flags` (see [`ct_timeout`]).
#[inline(always)]
pub fn timeout(cfg: Option<&Config>, proto: u8, flags: u32) -> u64 {
    ct_timeout(cfg.unwrap_or(&NO_CONFIG), proto, flags)
}

/// Takes one of the flows `endpoint` may open in direction `dir` at `now`: false when it holds
/// its limit already, or a limit is set and its count is out of reach (fail closed). A count a
/// race took below zero compares as negative. Counts the agent stopped sweeping (past their
/// `valid_until_ns`) read as zero: no limit while nobody corrects them, and the next sweep
/// counts from scratch. Branch-free but for the limit itself: each branch here would be
/// carried by the verifier through the insert that follows.
#[inline(always)]
pub fn admit(endpoint: u32, dir: u8, now: u64, cfg: Option<&Config>) -> bool {
    let limit = match cfg {
        Some(c) => c.max_flows_per_endpoint,
        None => 0,
    };
    if limit == 0 {
        return true;
    }
    let Some(c) = FLOW_COUNTS.get_ptr_mut(endpoint) else {
        return false;
    };
    // SAFETY: an element of an array map, shared with other CPUs and the agent, which change
    // the counts with atomic adds only (or stores while the programs do not use them).
    unsafe {
        let n = &mut (*c).by_origin[(dir & 1) as usize] as *mut u64;
        // All ones when `now` is past `valid_until_ns`.
        let stale = (read_volatile(&(*c).valid_until_ns).wrapping_sub(now) as i64 >> 63) as u64;
        if (read_volatile(n) & !stale) as i64 >= i64::from(limit) {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
    }
    true
}

/// Gives back a flow of `endpoint` opened in direction `dir` (its entry was never written).
#[inline(always)]
pub fn release(endpoint: u32, dir: u8, cfg: Option<&Config>) {
    if cfg.is_none_or(|c| c.max_flows_per_endpoint == 0) {
        return;
    }
    if let Some(c) = FLOW_COUNTS.get_ptr_mut(endpoint) {
        // SAFETY: as in `admit`.
        unsafe {
            atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(
                &mut (*c).by_origin[(dir & 1) as usize] as *mut u64,
                1,
            );
        }
    }
}

/// Whether an entry last seen at `last_seen` is still live at `now`. A stamp ahead of `now` (one
/// taken by the precise clock of an older program, which runs up to a tick ahead of the coarse
/// one) counts as just seen.
#[inline(always)]
pub fn fresh(now: u64, last_seen: u64, timeout: u64) -> bool {
    now.saturating_sub(last_seen) <= timeout
}

/// Global flags from CONFIG.
#[inline(always)]
pub fn config_flags(cfg: Option<&Config>) -> u32 {
    match cfg {
        Some(c) => c.flags,
        None => 0,
    }
}
