//! The per-CPU packet and byte counters by endpoint, direction and reason.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use enforcer_common::{Counter, REASON_COUNT};

use super::syscall::{BATCH, lookup_batch};

/// Per-CPU packet/byte counters.
pub struct Counters {
    pub(crate) map: PerCpuArray<MapData, Counter>,
    /// A second descriptor of the same map, for `BPF_MAP_LOOKUP_BATCH`.
    pub(crate) fd: Option<std::os::fd::OwnedFd>,
    pub(crate) slots: u32,
}

/// `(endpoint id, direction, reason)`.
pub type CounterKey = (u32, u8, u8);

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
