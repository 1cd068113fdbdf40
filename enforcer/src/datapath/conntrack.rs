//! Conntrack as the agent sees it: the IPv4 flow table and the LRU maps behind it, read in
//! batches, flows of an endpoint forgotten, counted for `/metrics`.

use std::collections::BTreeSet;

use anyhow::Result;
use enforcer_common::{CtKey, CtKeyV4, CtValue, FAMILY_V6};

use super::syscall::count_batched;
use super::{flows::FlowTable, hash::HashTable};
use crate::reconcile::MapTable;

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

/// Counts the IPv4 and IPv6 conntrack maps through `BPF_MAP_LOOKUP_BATCH`: a few calls of
/// thousands of entries each rather than a `get_next_key` call per entry, and usable from a
/// thread of its own.
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
