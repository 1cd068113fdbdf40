//! Counters for `/metrics`: packets and bytes by verdict and reason (per pod when asked) read on
//! a thread of their own, conntrack fill, map fill.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_common::REASON_COUNT;

use super::{Agent, POLL, RESYNC};
use crate::{
    datapath::{ConntrackCounter, CounterKey, CounterReader, CtCount},
    observe::{View, metrics::Status},
    reconcile::{MapName, Reconciler},
};

impl Agent {
    /// Reads the packet counters every `RESYNC` on a thread of its own, through its own
    /// descriptor: a read of every slot takes milliseconds, and on the control loop it would
    /// delay any policy change that arrived meanwhile. `None` when the thread did not start.
    pub(super) fn spawn_packet_counting(
        &self,
        reader: CounterReader,
        stop: &Arc<AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let (status, view, stop) = (
            Arc::clone(&self.status),
            Arc::clone(&self.view),
            Arc::clone(stop),
        );
        let per_pod = self.per_pod_metrics;
        std::thread::Builder::new()
            .name("packet-count".into())
            .spawn(move || {
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    match reader.read() {
                        Ok(counters) => {
                            failing = false;
                            publish_packets(&status, &view, per_pod, counters);
                        }
                        // Loud once, then quiet until it recovers: /metrics keeps the last read.
                        Err(e) if !failing => {
                            failing = true;
                            log::warn!("reading COUNTERS: {e}; packet metrics are stale");
                        }
                        Err(e) => log::debug!("reading COUNTERS: {e}"),
                    }
                    let next = Instant::now() + RESYNC;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep(POLL);
                    }
                }
            })
            .map_err(|e| log::warn!("starting the packet counter: {e}; the control loop counts"))
            .ok()
    }

    /// Publishes `/metrics` gauges: map fill and lost events, and the packet counters unless a
    /// thread of their own does ([`Agent::spawn_packet_counting`]).
    pub(super) fn publish_counters(
        &self,
        reconciler: &Reconciler,
        ct_entries: CtCount,
        packets: bool,
    ) {
        let Ok(dp) = self.datapath.lock() else { return };
        if packets && let Ok(counters) = dp.counters.read() {
            publish_packets(&self.status, &self.view, self.per_pod_metrics, counters);
        }
        if let Ok(lost) = dp.events_lost() {
            self.status.events_lost.store(lost, Ordering::Relaxed);
        }
        let o = dp.options();
        let flag = |m: MapName| match m {
            MapName::Endpoints => o.max_endpoints,
            MapName::Policy => o.policy_size,
            MapName::CidrsV4 | MapName::CidrsV6 => o.cidrs_size,
            MapName::PeersV4 | MapName::PeersV6 => o.peers_size,
            MapName::NodePorts => o.node_ports_size,
        };
        // What the reconciler holds is what the maps hold: no walk over 100k entries a second.
        // Capacities are the pinned maps' own (a reused map keeps its size).
        let mut maps: Vec<(String, u64, u64)> = reconciler
            .fill()
            .into_iter()
            .map(|(m, n, cap)| {
                let cap = cap.map_or(u64::from(flag(m)), |c| c as u64);
                (m.to_string(), n as u64, cap)
            })
            .collect();
        // Endpoints in ENDPOINTS but not here share a slot: their packets take the hash path.
        maps.push((
            enforcer_common::MAP_ENDPOINT_SLOTS.to_string(),
            dp.endpoints.slots().filled() as u64,
            u64::from(enforcer_common::ENDPOINT_SLOT_COUNT),
        ));
        // PEERS_V4 entries not here are addresses whose cache bucket is full: a hash lookup.
        maps.push((
            enforcer_common::MAP_PEER_SLOTS.to_string(),
            dp.peers_v4.slots().filled() as u64,
            2 * u64::from(dp.peers_v4.slots().memory().buckets()),
        ));
        if let Some(f) = dp.conntrack.flow_table() {
            maps.push((
                enforcer_common::MAP_FLOWS_V4.to_string(),
                ct_entries.flows as u64,
                f.capacity(),
            ));
        }
        maps.push((
            "CONNTRACK_V4".to_string(),
            ct_entries.v4 as u64,
            u64::from(o.conntrack_size),
        ));
        maps.push((
            "CONNTRACK_V6".to_string(),
            ct_entries.v6 as u64,
            u64::from(o.conntrack_size),
        ));
        self.status.set_maps(maps);
    }
}

/// Packets and bytes by reason, and per pod when asked, from one read of the counters.
fn publish_packets(
    status: &Status,
    view: &Mutex<View>,
    per_pod_metrics: bool,
    counters: BTreeMap<CounterKey, enforcer_common::Counter>,
) {
    let mut by_reason = vec![(0u64, 0u64); REASON_COUNT as usize];
    let mut per_pod = BTreeMap::new();
    let view = view.lock().ok();
    for ((endpoint, _dir, reason), c) in counters {
        if let Some(slot) = by_reason.get_mut(reason as usize) {
            slot.0 += c.packets;
            slot.1 += c.bytes;
        }
        if per_pod_metrics
            && let Some(pod) = view
                .as_ref()
                .and_then(|v| v.pods_by_endpoint.get(&endpoint))
        {
            let e = per_pod.entry((pod.clone(), reason)).or_insert((0, 0));
            e.0 += c.packets;
            e.1 += c.bytes;
        }
    }
    drop(view);
    status.set_packets(by_reason, per_pod);
}

/// The conntrack entry counts (IPv4, IPv6) for the fill ratios on /metrics.
#[derive(Default)]
pub(super) struct CtCounts {
    flows: AtomicU64,
    v4: AtomicU64,
    v6: AtomicU64,
    /// The counting thread counts in batches; otherwise the control loop walks the keys.
    pub(super) batched: AtomicBool,
}

impl CtCounts {
    pub(super) fn store(&self, c: CtCount) {
        self.flows.store(c.flows as u64, Ordering::Relaxed);
        self.v4.store(c.v4 as u64, Ordering::Relaxed);
        self.v6.store(c.v6 as u64, Ordering::Relaxed);
    }

    pub(super) fn load(&self) -> CtCount {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as usize;
        CtCount {
            flows: n(&self.flows),
            v4: n(&self.v4),
            v6: n(&self.v6),
        }
    }

    /// Sweeps conntrack every `every` on a thread of its own, through its own descriptors
    /// (counts the maps' fill and resets the per-endpoint flow counts to the live flows): a
    /// sweep of a full map never holds the datapath lock, so it never delays a policy change.
    /// Stops with the agent, or at the first failure (the loop then walks the keys).
    pub(super) fn spawn(
        counts: &Arc<Self>,
        counter: ConntrackCounter,
        every: Duration,
        stop: &Arc<AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let (counts, stop) = (Arc::clone(counts), Arc::clone(stop));
        counts.batched.store(true, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().name("ct-count".into()).spawn({
            let counts = Arc::clone(&counts);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match counter.sweep(every * 3) {
                        Ok(c) => counts.store(c),
                        Err(e) => {
                            log::warn!("counting conntrack in batches: {e:#}; walking it instead");
                            counts.batched.store(false, Ordering::Relaxed);
                            return;
                        }
                    }
                    let next = Instant::now() + every;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep(POLL);
                    }
                }
            }
        });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                log::warn!("starting the conntrack counter: {e}; the control loop counts");
                counts.batched.store(false, Ordering::Relaxed);
                None
            }
        }
    }
}
