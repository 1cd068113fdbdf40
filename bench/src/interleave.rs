//! Interleaved windows: under one continuous load (an iperf3 stream, a TCP_RR connection, a
//! TCP_CRR loop), the TCX hooks of the pods' veths switch every fraction of a second between
//! no programs, the empty program and ours, and each window's rate is read from a counter.
//! Other work on this VM comes in phases of seconds, so windows a fraction of a second apart
//! share one phase: the ratio within a cycle of three windows is far steadier than between
//! runs seconds apart, which is what a 3-5 % target needs.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer::datapath::{Hook, detach_at, link_pin};
use serde::Serialize;

use crate::{
    steal::CpuTimes,
    testrun::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, linked_prog, load_empty_program, tcx_link},
};

/// What is on the hooks during a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    None = 0,
    /// `r0 = 0; exit` on the hooks ours use: what running any program there costs.
    Empty = 1,
    Ours = 2,
}

pub const STATES: [Hooks; 3] = [Hooks::None, Hooks::Empty, Hooks::Ours];

/// Puts our programs, the empty program or nothing on the hooks, with links of its own (a
/// syscall each, no reload): our programs are the ones behind the agent's pinned links, which
/// [`Switch::take_over`] detaches, so they run on the agent's maps. Must be used from a thread
/// in the node's netns (TCX links name the interface by ifindex there). Dropping it leaves the
/// hooks empty.
pub struct Switch {
    ours: Vec<(u32, u32, OwnedFd)>,
    empty: OwnedFd,
    links: Vec<OwnedFd>,
}

impl Switch {
    pub fn take_over(pin: &Path, veths: &[u32]) -> Result<Self> {
        let mut ours = Vec::new();
        for &v in veths {
            for hook in Hook::ALL {
                let prog = linked_prog(&link_pin(pin, v, hook))?;
                let attach_type = match hook {
                    Hook::Ingress => BPF_TCX_INGRESS,
                    Hook::Egress | Hook::Exit => BPF_TCX_EGRESS,
                };
                ours.push((v, attach_type, prog));
            }
        }
        for &v in veths {
            detach_at(pin, v)?;
        }
        Ok(Self {
            ours,
            empty: load_empty_program()?,
            links: Vec::new(),
        })
    }

    pub fn set(&mut self, hooks: Hooks) -> Result<()> {
        self.links.clear();
        for (ifindex, attach_type, prog) in &self.ours {
            let prog = match hooks {
                Hooks::None => continue,
                Hooks::Empty => &self.empty,
                Hooks::Ours => prog,
            };
            self.links.push(
                tcx_link(prog.as_raw_fd(), *ifindex, *attach_type)
                    .with_context(|| format!("attaching for the {hooks:?} windows"))?,
            );
        }
        Ok(())
    }
}

/// Window lengths and counts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Windows {
    /// Length of one window, s.
    pub window_secs: f64,
    /// Time after each switch before the window opens, s (the switch itself, packets in
    /// flight under the previous hooks).
    pub settle_secs: f64,
    /// Cycles of three windows per measure.
    pub cycles: usize,
    /// Load before the first window, s.
    pub warmup_secs: f64,
}

/// One cycle: the rate in each state's window (indexed by [`Hooks`] as usize), per second, and
/// the share of CPU time stolen by the hypervisor during each.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Cycle {
    pub rate: [f64; 3],
    pub steal: [f64; 3],
}

impl Cycle {
    /// `state` over no programs in this cycle.
    pub fn ratio(&self, state: Hooks) -> f64 {
        self.rate[state as usize] / self.rate[Hooks::None as usize]
    }
}

/// Runs `w.cycles` cycles of the three windows, the order rotated every cycle (so each state
/// is first, second and third equally often; `offset` shifts the rotation between measures).
/// `count` reads the load's counter (bytes, transactions), `alive` fails when the load died.
pub fn cycles(
    switch: &mut Switch,
    w: &Windows,
    offset: usize,
    count: &dyn Fn() -> Result<u64>,
    alive: &dyn Fn() -> Result<()>,
) -> Result<Vec<Cycle>> {
    let windows = windows::<3>(
        w,
        offset,
        &mut |i| switch.set(STATES[i]),
        &|i| format!("{:?}", STATES[i]),
        count,
        alive,
    )?;
    Ok(windows
        .into_iter()
        .map(|(rate, steal)| Cycle { rate, steal })
        .collect())
}

/// The windows of [`cycles`] over `N` states that `set` puts in place (by index): per cycle,
/// each state's rate and the share of CPU time stolen during its window.
pub fn windows<const N: usize>(
    w: &Windows,
    offset: usize,
    set: &mut dyn FnMut(usize) -> Result<()>,
    name: &dyn Fn(usize) -> String,
    count: &dyn Fn() -> Result<u64>,
    alive: &dyn Fn() -> Result<()>,
) -> Result<Vec<([f64; N], [f64; N])>> {
    let window = Duration::from_secs_f64(w.window_secs);
    let settle = Duration::from_secs_f64(w.settle_secs);
    std::thread::sleep(Duration::from_secs_f64(w.warmup_secs));
    let mut out = Vec::with_capacity(w.cycles);
    for c in 0..w.cycles {
        let (mut rate, mut steal) = ([0.0; N], [0.0; N]);
        for k in 0..N {
            let state = (c + k + offset) % N;
            set(state)?;
            std::thread::sleep(settle);
            let (n0, t0, cpu) = (count()?, Instant::now(), CpuTimes::now());
            std::thread::sleep(window);
            let (n1, t1) = (count()?, Instant::now());
            alive()?;
            if n1 <= n0 {
                bail!(
                    "the load made no progress in a {} window (cycle {c})",
                    name(state)
                );
            }
            rate[state] = (n1 - n0) as f64 / (t1 - t0).as_secs_f64();
            steal[state] = CpuTimes::now().stolen_since(&cpu);
        }
        out.push((rate, steal));
    }
    Ok(out)
}

/// Bytes received by the interfaces (all but `lo`) of the network namespace of process `pid`.
pub fn rx_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/net/dev");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut total = 0u64;
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        total += rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{path}: no rx_bytes in {line:?}"))?;
    }
    Ok(total)
}
