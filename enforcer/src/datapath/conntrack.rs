//! Conntrack as the agent sees it: the IPv4 flow table and the LRU maps behind it, read in
//! batches, flows of an endpoint forgotten, counted for `/metrics`, and swept: each sweep
//! counts the live flows of every endpoint and sets the programs' per-endpoint counts
//! ([`FlowCounts`]) to it.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use enforcer_common::{
    CT_ORIGIN_EGRESS, Config, CtKey, CtKeyV4, CtValue, DIR_EGRESS, DIR_INGRESS, FAMILY_V6,
    FlowCount, MAP_FLOW_COUNTS, ct_timeout,
};

use super::syscall::{for_each_batched, lookup_raw};
use super::{flows::FlowTable, hash::HashTable, mapping::SharedMemory};
use crate::reconcile::MapTable;

/// The programs' flow counts ([`MAP_FLOW_COUNTS`]): per endpoint id, the flows it opened in each
/// direction. The programs add one per new flow (under `--ct-max-flows-per-endpoint`); the
/// sweep corrects them to the live flows it counted, with atomic adds beside the programs'.
pub struct FlowCounts {
    mem: SharedMemory,
    slots: u32,
}

/// Live flows by endpoint id and direction of origin, as a sweep counts them.
pub type FlowTally = Vec<[u64; 2]>;

impl FlowCounts {
    /// Maps the `slots` counts of the (mmapable) map behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, slots: u32) -> Result<Self> {
        Ok(Self {
            mem: SharedMemory::map(fd, slots as usize * size_of::<FlowCount>(), MAP_FLOW_COUNTS)?,
            slots,
        })
    }

    /// `slots` zero counts in plain memory, for tests.
    pub fn heap(slots: u32) -> Self {
        Self {
            mem: SharedMemory::heap(slots as usize * size_of::<FlowCount>()),
            slots,
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Word `i` of `endpoint`'s [`FlowCount`]: 0 and 1 the counts by origin, 2 `valid_until_ns`.
    fn word(&self, endpoint: u32, i: usize) -> &AtomicU64 {
        assert!(endpoint < self.slots && i < 3);
        // SAFETY: in bounds (asserted), 8-aligned (32-byte elements at a page or u64 base).
        unsafe {
            AtomicU64::from_ptr(
                self.mem
                    .base::<FlowCount>()
                    .add(endpoint as usize)
                    .cast::<u64>()
                    .add(i),
            )
        }
    }

    fn cell(&self, endpoint: u32, dir: u8) -> &AtomicU64 {
        self.word(endpoint, usize::from(dir & 1))
    }

    fn valid_cell(&self, endpoint: u32) -> &AtomicU64 {
        self.word(endpoint, 2)
    }

    /// Makes the programs keep and enforce the counts until `ns` (their coarse clock).
    pub fn keep_until(&self, ns: u64) {
        for e in 0..self.slots {
            self.valid_cell(e).store(ns, Ordering::Relaxed);
        }
    }

    /// Until when the programs keep the counts.
    pub fn kept_until(&self) -> u64 {
        self.valid_cell(0).load(Ordering::Relaxed)
    }

    /// The count of `endpoint` in direction `dir` (negative after a race, until a sweep).
    pub fn get(&self, endpoint: u32, dir: u8) -> i64 {
        self.cell(endpoint, dir).load(Ordering::Relaxed) as i64
    }

    /// Every count as it is now.
    pub fn snapshot(&self) -> FlowTally {
        (0..self.slots)
            .map(|e| [DIR_INGRESS, DIR_EGRESS].map(|d| self.cell(e, d).load(Ordering::Relaxed)))
            .collect()
    }

    /// Moves every count by `live - before`: what a sweep that read `before` first counted
    /// live. Flows the programs added meanwhile stay counted on top (the sweep may have
    /// counted some of them too: a count errs high, by what one sweep's time adds).
    pub fn correct(&self, before: &FlowTally, live: &FlowTally) {
        for (e, (b, l)) in before.iter().zip(live).enumerate() {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                let i = usize::from(d);
                if l[i] != b[i] {
                    self.cell(e as u32, d)
                        .fetch_add(l[i].wrapping_sub(b[i]), Ordering::Relaxed);
                }
            }
        }
    }

    /// Zeroes `endpoint`'s counts (its flows are gone; its id may go to another pod).
    pub fn clear(&self, endpoint: u32) {
        if endpoint < self.slots {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                self.cell(endpoint, d).store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Ends a sweep that read `before` and counted `live` at `now`: counts that were kept get the
/// difference; counts the programs stopped keeping (no sweep for too long) start from `live`.
/// Either way they are kept for `valid_for` more.
fn settle(
    counts: &FlowCounts,
    before: &FlowTally,
    live: &FlowTally,
    now: u64,
    valid_for: std::time::Duration,
) {
    if counts.kept_until() >= now {
        counts.correct(before, live);
    } else {
        // The programs do not count now: nothing moves these under us.
        for (e, l) in live.iter().enumerate() {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                counts
                    .cell(e as u32, d)
                    .store(l[usize::from(d)], Ordering::Relaxed);
            }
        }
    }
    counts.keep_until(now.saturating_add(u64::try_from(valid_for.as_nanos()).unwrap_or(u64::MAX)));
}

/// Adds a flow of `endpoint` with `value` to `tally` when it is live at `now` under `cfg`.
fn tally_flow(
    tally: &mut FlowTally,
    cfg: &Config,
    now: u64,
    endpoint: u32,
    proto: u8,
    v: &CtValue,
) {
    let timeout = ct_timeout(cfg, proto, v.flags);
    if now.saturating_sub(v.last_seen_ns) > timeout {
        return;
    }
    if let Some(t) = tally.get_mut(endpoint as usize) {
        let dir = if v.flags & CT_ORIGIN_EGRESS != 0 {
            DIR_EGRESS
        } else {
            DIR_INGRESS
        };
        t[usize::from(dir)] += 1;
    }
}

/// Conntrack: the IPv4 flow table (`FLOWS_V4`, when on) and the LRU maps, IPv4 flows under
/// their short key (those of full table buckets, or all of them with the table off), IPv6
/// flows under [`CtKey`]. Seen from here as one table of [`CtKey`]s (IPv4 addresses in the
/// first 4 bytes).
pub struct Conntrack {
    /// The programs' per-endpoint flow counts.
    pub(crate) counts: Arc<FlowCounts>,
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
            config: c.config.try_clone().ok()?,
            counts: Arc::clone(&c.counts),
        })
    }

    /// The programs' per-endpoint flow counts.
    pub fn flow_counts(&self) -> &FlowCounts {
        &self.counts
    }

    /// A sweep by key walk (kernels without batch lookups): counts the live flows of every
    /// endpoint under `cfg` and sets the programs' counts to them, kept for `valid_for`;
    /// returns the maps' fill.
    pub fn sweep(&self, cfg: &Config, valid_for: std::time::Duration) -> Result<CtCount> {
        let before = self.counts.snapshot();
        let now = super::flows::now_ns();
        let mut live = vec![[0u64; 2]; before.len()];
        let entries = self.entries()?;
        for (k, v) in &entries {
            tally_flow(&mut live, cfg, now, k.endpoint, k.protocol, v);
        }
        settle(&self.counts, &before, &live, now, valid_for);
        self.count_by_map()
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

    /// Deletes every flow of `endpoint` (a pod went away) and zeroes its counts; returns how
    /// many.
    pub fn remove_endpoint(&mut self, endpoint: u32) -> Result<usize> {
        self.counts.clear(endpoint);
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

/// Counts the IPv4 and IPv6 conntrack maps through `BPF_MAP_LOOKUP_BATCH`: a few calls of
/// thousands of entries each rather than a `get_next_key` call per entry, and usable from a
/// thread of its own.
pub struct ConntrackCounter {
    pub(crate) flows: Option<FlowTable>,
    pub(crate) v4: OwnedFd,
    pub(crate) v6: OwnedFd,
    /// CONFIG, for the timeouts a sweep judges flows by.
    pub(crate) config: OwnedFd,
    pub(crate) counts: Arc<FlowCounts>,
}

impl ConntrackCounter {
    /// The maps' fill, read in batches.
    pub fn count(&self) -> Result<CtCount> {
        Ok(CtCount {
            flows: match &self.flows {
                Some(f) => f.count()?,
                None => 0,
            },
            v4: for_each_batched(self.v4.as_fd(), |_: &CtKeyV4, _: &CtValue| {})?,
            v6: for_each_batched(self.v6.as_fd(), |_: &CtKey, _: &CtValue| {})?,
        })
    }

    /// Reads every flow in batches: returns the maps' fill, and sets the programs'
    /// per-endpoint counts to the live flows found (see [`FlowCounts::correct`]), kept for
    /// `valid_for`.
    pub fn sweep(&self, valid_for: std::time::Duration) -> Result<CtCount> {
        let mut cfg = Config::default();
        lookup_raw(self.config.as_fd(), &0u32, &mut cfg).context("reading CONFIG")?;
        let before = self.counts.snapshot();
        let now = super::flows::now_ns();
        let mut live = vec![[0u64; 2]; before.len()];
        let mut count = CtCount::default();
        if let Some(f) = &self.flows {
            f.for_each(|_, b| {
                for w in b.live() {
                    count.flows += 1;
                    let k = w.key();
                    tally_flow(&mut live, &cfg, now, k.endpoint, k.protocol, &w.value(now));
                }
            })?;
        }
        count.v4 = for_each_batched(self.v4.as_fd(), |k: &CtKeyV4, v: &CtValue| {
            tally_flow(&mut live, &cfg, now, k.endpoint, k.protocol, v);
        })?;
        count.v6 = for_each_batched(self.v6.as_fd(), |k: &CtKey, v: &CtValue| {
            tally_flow(&mut live, &cfg, now, k.endpoint, k.protocol, v);
        })?;
        settle(&self.counts, &before, &live, now, valid_for);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::{
        CT_FIN_A, CT_FIN_B, CT_ORIGIN_A, CT_REPLIED, CT_REVOKED, CT_RST, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, tcp_flags_after,
    };

    const S: u64 = 1_000_000_000;

    fn cfg() -> Config {
        Config {
            ct_timeout_tcp_ns: 3600 * S,
            ct_timeout_other_ns: 120 * S,
            ct_timeout_tcp_syn_ns: 60 * S,
            ct_timeout_tcp_closed_ns: 10 * S,
            ..Config::default()
        }
    }

    /// The state a connection opened from end `a` goes through, and the timeout of each.
    #[test]
    fn a_tcp_flow_times_out_by_its_state() {
        let c = cfg();
        let t = |f| ct_timeout(&c, PROTO_TCP, f);
        let o = CT_ORIGIN_A;
        let syn = o;
        assert_eq!(t(syn), 60 * S, "unanswered");
        let answered = tcp_flags_after(syn, TCP_SYN | TCP_ACK, false, true);
        assert_eq!(answered, o | CT_REPLIED);
        assert_eq!(t(answered), 3600 * S, "established");
        let ack = tcp_flags_after(answered, TCP_ACK, true, true);
        assert_eq!(ack, answered, "data moves nothing");
        let half = tcp_flags_after(answered, TCP_FIN | TCP_ACK, true, true);
        assert_eq!(half, answered | CT_FIN_A);
        assert_eq!(
            t(half),
            3600 * S,
            "half-closed: still carrying data one way"
        );
        let closed = tcp_flags_after(half, TCP_FIN | TCP_ACK, false, true);
        assert_eq!(closed, answered | CT_FIN_A | CT_FIN_B);
        assert_eq!(t(closed), 10 * S, "closed by both FINs");
        let reset = tcp_flags_after(answered, TCP_RST, false, true);
        assert_eq!(t(reset), 10 * S, "reset");
        assert_eq!(reset & CT_RST, CT_RST);
        let reopened = tcp_flags_after(closed, TCP_SYN, true, true);
        assert_eq!(reopened, o, "a SYN from the originator starts over");
        assert_eq!(
            tcp_flags_after(closed, TCP_SYN, false, true),
            closed | CT_REPLIED,
            "a SYN from the other end does not"
        );
        assert_eq!(
            tcp_flags_after(answered, TCP_SYN, true, true),
            answered,
            "nor one on an open flow"
        );
        assert_eq!(
            t(closed | CT_REVOKED),
            120 * S,
            "a tombstone lasts the other timeout"
        );
        assert_eq!(ct_timeout(&c, PROTO_UDP, 0), 120 * S);
        assert_eq!(
            ct_timeout(&Config::default(), PROTO_TCP, o),
            enforcer_common::DEFAULT_CT_TIMEOUT_TCP_SYN_NS,
            "zeros: the defaults"
        );
    }

    /// A sweep moves each count by what it found minus what it read first: flows the programs
    /// added meanwhile stay counted, and a count raced below zero reads as negative.
    #[test]
    fn a_sweep_sets_the_counts_to_the_live_flows_and_keeps_newer_ones() {
        let counts = FlowCounts::heap(4);
        let add = |e, d: u8, n: u64| counts.cell(e, d).fetch_add(n, Ordering::Relaxed);
        add(1, DIR_INGRESS, 10);
        add(2, DIR_EGRESS, 5);
        let before = counts.snapshot();
        // During the sweep the programs add two flows of endpoint 1.
        add(1, DIR_INGRESS, 2);
        let mut live = vec![[0u64; 2]; 4];
        live[1][usize::from(DIR_INGRESS)] = 4;
        live[3][usize::from(DIR_EGRESS)] = 1;
        counts.correct(&before, &live);
        assert_eq!(counts.get(1, DIR_INGRESS), 6, "4 live + 2 added meanwhile");
        assert_eq!(counts.get(2, DIR_EGRESS), 0, "all of 2's flows ended");
        assert_eq!(
            counts.get(3, DIR_EGRESS),
            1,
            "one the programs did not count"
        );
        counts.cell(2, DIR_EGRESS).fetch_sub(1, Ordering::Relaxed);
        assert_eq!(counts.get(2, DIR_EGRESS), -1);
        counts.clear(2);
        assert_eq!(counts.get(2, DIR_EGRESS), 0);
    }

    /// Only live flows count, each for its endpoint and the direction that opened it.
    #[test]
    fn the_tally_counts_live_flows_by_endpoint_and_origin() {
        let c = cfg();
        let now = 1000 * S;
        let mut tally = vec![[0u64; 2]; 3];
        let v = |flags, age: u64| CtValue {
            last_seen_ns: now - age * S,
            flags,
            ..CtValue::default()
        };
        tally_flow(&mut tally, &c, now, 1, PROTO_TCP, &v(CT_ORIGIN_EGRESS, 59));
        tally_flow(&mut tally, &c, now, 1, PROTO_TCP, &v(CT_ORIGIN_EGRESS, 61));
        tally_flow(&mut tally, &c, now, 1, PROTO_UDP, &v(0, 100));
        tally_flow(&mut tally, &c, now, 2, PROTO_TCP, &v(CT_REPLIED, 600));
        tally_flow(&mut tally, &c, now, 9, PROTO_TCP, &v(0, 0));
        assert_eq!(tally, vec![[0, 0], [1, 1], [1, 0]]);
    }
}
