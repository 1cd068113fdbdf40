//! The agent's control loop: read the source, compile, reconcile, publish status; and the flow
//! log of verdict events.
//!
//! The loop runs on its own thread (the kernel calls are synchronous and quick); the HTTP side
//! runs on tokio and only reads [`Status`].

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use enforcer_common::REASON_COUNT;

use enforcer_policy::{
    compile::{Allocations, CompileOptions, compile},
    model::Cluster,
    state::DesiredState,
};

use crate::{
    datapath::{
        ConntrackCounter, CounterKey, CounterReader, CtCount, Datapath, routes::KernelRoutes,
    },
    observe::health::Status,
    reconcile::Reconciler,
    source::{Source, watch::LastGoodPolicies},
};

/// Longest wait for news from the source between turns of the loop (a manifests folder wakes it
/// early through inotify); also the pace of identity sweeps and the resync check.
const POLL: Duration = Duration::from_millis(100);
/// How often the kernel state is re-checked without an input change (new veths, retries).
const RESYNC: Duration = Duration::from_secs(1);
/// How often a resync compares every map entry with the kernel rather than with what this
/// process wrote (repairs drift made behind the agent's back).
const VERIFY_KERNEL: Duration = Duration::from_secs(60);
/// How often conntrack is counted for its fill ratio: a batched read of the whole LRU map (about
/// 0.1 s when full) on a thread of its own, or a key walk on the loop's thread where batches are
/// missing.
const COUNT_CONNTRACK: Duration = Duration::from_secs(10);

/// The compiled view the agent enforces now, shared with the flow log.
#[derive(Default)]
pub struct View {
    /// The state enforced now (shared with the control loop, not copied).
    pub state: Arc<DesiredState>,
    /// Endpoint id -> pod, identity -> description, for the flow log.
    pub pods_by_endpoint: BTreeMap<u32, String>,
    pub pods_by_ip: BTreeMap<IpAddr, String>,
}

/// Everything the loop needs.
pub struct Agent {
    pub source: Source,
    pub compile_options: CompileOptions,
    pub datapath: Arc<Mutex<Datapath>>,
    pub status: Arc<Status>,
    pub view: Arc<Mutex<View>>,
    /// Export per-pod packet counters on /metrics.
    pub per_pod_metrics: bool,
    /// Verified workload identities, when attestation is on.
    pub identity: Option<crate::identity::attestation::Identity>,
}

impl Agent {
    /// Runs until `stop` is set.
    pub fn run(mut self, stop: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
        let mut reconciler = Reconciler::new();
        let mut alloc = Allocations::new();
        let mut last_good = LastGoodPolicies::default();
        let mut cluster: Option<Cluster> = None;
        let mut bindings_seen = u64::MAX;
        let mut desired = Arc::new(DesiredState::default());
        let mut last_sync = Instant::now() - RESYNC;
        let mut dirty = false;
        let mut last_counters = Instant::now() - RESYNC;
        let mut last_verify = Instant::now();
        let mut last_ct_count: Option<Instant> = None;
        let ct_counts = Arc::new(CtCounts::default());
        let counter = self
            .datapath
            .lock()
            .ok()
            .and_then(|dp| dp.conntrack.counter());
        let _counting = counter.map(|c| CtCounts::spawn(&ct_counts, c, &stop));
        // Packet counters are read on a thread of their own where the kernel has batch lookups.
        let reader = self
            .datapath
            .lock()
            .ok()
            .and_then(|dp| dp.counters.reader());
        let packets_elsewhere = reader
            .and_then(|r| self.spawn_packet_counting(r, &stop))
            .is_some();
        // After a restart or an upgrade: point the links pinned by the previous process at this
        // build's programs, atomically. The maps are the pinned ones, so enforcement continues
        // unchanged until the first reconcile diffs them against the input.
        if let Ok(mut dp) = self.datapath.lock() {
            match dp.reattach_all() {
                Ok(ifs) => log::info!("took over {} pinned interfaces", ifs.len()),
                Err(e) => log::warn!("taking over pinned links: {e:#}"),
            }
        }
        while !stop.load(Ordering::Relaxed) {
            match self.source.poll() {
                Ok(Some((mut c, mut problems))) => {
                    problems.extend(last_good.apply(&mut c));
                    for p in &problems {
                        log::warn!("{p}");
                    }
                    self.status
                        .input_problems
                        .store(problems.len() as u64, Ordering::Relaxed);
                    if let Some(id) = &self.identity {
                        id.pods.update(&c, &self.compile_options.node_ips);
                    }
                    if cluster.is_none() {
                        if let Some(id) = &self.identity {
                            c.verified = id.verified();
                        }
                        self.restore_numbers(&c, &mut alloc);
                    }
                    cluster = Some(c);
                    self.status.ready.store(false, Ordering::Relaxed);
                    self.status.observed.fetch_add(1, Ordering::Relaxed);
                    dirty = true;
                }
                Ok(None) => {}
                Err(e) => log::warn!("{e:#}"),
            }
            // Identity: expired tokens and gone pods lose their binding; any change of the
            // bindings recompiles (the flows they allowed are re-checked through the epoch).
            if let Some(id) = &self.identity {
                id.sweep();
                let generation = id.bindings.generation();
                if generation != bindings_seen {
                    bindings_seen = generation;
                    if let Some(c) = &mut cluster {
                        c.verified = id.verified();
                        dirty = true;
                    }
                }
            }
            if dirty {
                if let Some(c) = &mut cluster {
                    if let Some(id) = &self.identity {
                        c.verified = id.verified();
                    }
                    let started = Instant::now();
                    let compiled = compile(c, &self.compile_options, &mut alloc);
                    self.status.observe_compile(started.elapsed());
                    for e in &compiled.errors {
                        log::warn!("{e}");
                    }
                    desired = Arc::new(compiled.state);
                    self.publish_view(&desired);
                    self.reconcile(&mut reconciler, &desired, started);
                    last_sync = Instant::now();
                    release_free_memory();
                }
                dirty = false;
            } else if cluster.is_some() && last_sync.elapsed() >= RESYNC {
                if last_verify.elapsed() >= VERIFY_KERNEL {
                    reconciler.verify_kernel();
                    last_verify = Instant::now();
                }
                self.reconcile(&mut reconciler, &desired, Instant::now());
                last_sync = Instant::now();
            }
            if last_counters.elapsed() >= RESYNC {
                // Without batch lookups (before Linux 5.6) the count is a key walk on this thread.
                if !ct_counts.batched.load(Ordering::Relaxed)
                    && last_ct_count.is_none_or(|t| t.elapsed() >= COUNT_CONNTRACK)
                {
                    if let Ok(dp) = self.datapath.lock() {
                        ct_counts.store(dp.conntrack.count_by_map().unwrap_or_default());
                    }
                    last_ct_count = Some(Instant::now());
                }
                self.publish_counters(&reconciler, ct_counts.load(), !packets_elsewhere);
                last_counters = Instant::now();
            }
            // Wakes early when the source has news (a file written into the folder).
            self.source.wait(POLL);
        }
        Ok(())
    }

    /// After a restart: pods keep the endpoint ids of their pinned entries (found by address),
    /// so their policy keys and conntrack entries stay valid across the restart; then the
    /// identities and rules keep their pinned numbers ([`Allocations::restore`]), so the first
    /// reconcile rewrites only what changed while the agent was away.
    fn restore_numbers(&self, cluster: &Cluster, alloc: &mut Allocations) {
        self.restore_endpoint_ids(cluster, alloc);
        let pinned = match self.datapath.lock() {
            Ok(mut dp) => crate::reconcile::read_pinned(&mut *dp),
            Err(_) => return,
        };
        match pinned {
            Ok(pinned) => {
                let (identities, rules) = alloc.restore(cluster, &self.compile_options, &pinned);
                if identities + rules > 0 {
                    log::info!(
                        "restored the numbers of {identities} identities and {rules} rules from the pinned maps"
                    );
                }
            }
            Err(e) => log::warn!("reading the pinned maps to keep their numbering: {e:#}"),
        }
    }

    fn restore_endpoint_ids(&self, cluster: &Cluster, alloc: &mut Allocations) {
        let Ok(dp) = self.datapath.lock() else { return };
        let Ok(pinned) = dp.endpoints.entries() else {
            return;
        };
        let mut restored = 0;
        for (_, info) in pinned {
            let v4 =
                (info.flags & enforcer_common::EP_HAS_V4 != 0).then(|| IpAddr::from(info.ipv4));
            let v6 =
                (info.flags & enforcer_common::EP_HAS_V6 != 0).then(|| IpAddr::from(info.ipv6));
            let owner = cluster.pods.iter().find(|p| {
                let ips = enforcer_policy::model::pod_ips(p);
                v4.is_some_and(|a| ips.contains(&a)) || v6.is_some_and(|a| ips.contains(&a))
            });
            if let Some(pod) = owner
                && alloc.reserve_endpoint(&enforcer_policy::model::pod_ref(pod), info.id)
            {
                restored += 1;
            }
        }
        if restored > 0 {
            log::info!("restored the endpoint ids of {restored} pods from the pinned maps");
        }
    }

    fn reconcile(&self, reconciler: &mut Reconciler, desired: &DesiredState, started: Instant) {
        let result = match (KernelRoutes::read(), self.datapath.lock()) {
            (Ok(routes), Ok(mut dp)) => reconciler.apply(desired, &mut *dp, &routes),
            (Err(e), _) => Err(e),
            (_, Err(_)) => return,
        };
        match result {
            Ok(report) => {
                self.status.observe_reconcile(started.elapsed());
                for pod in &report.pending {
                    log::debug!("{pod}: no route to its address yet; retrying");
                }
                for (pod, err) in &report.failed {
                    log::warn!("{pod}: {err}");
                }
                if !report.attached.is_empty()
                    || !report.detached.is_empty()
                    || report.written + report.removed > 0
                {
                    log::info!(
                        "programmed: {} written, {} removed, attached {:?}, detached {:?}, pending {}",
                        report.written,
                        report.removed,
                        report.attached,
                        report.detached,
                        report.pending.len()
                    );
                }
                let total = desired.endpoints.len() as u64;
                let pending = (report.pending.len() + report.failed.len()) as u64;
                self.status
                    .pods_enforced
                    .store(total.saturating_sub(pending), Ordering::Relaxed);
                self.status.pods_pending.store(pending, Ordering::Relaxed);
                if report.complete() {
                    let observed = self.status.observed.load(Ordering::Relaxed);
                    self.status.programmed.store(observed, Ordering::Relaxed);
                }
                self.status
                    .ready
                    .store(report.complete(), Ordering::Relaxed);
            }
            Err(e) => {
                self.status.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                self.status.ready.store(false, Ordering::Relaxed);
                log::error!("reconcile failed: {e:#}");
            }
        }
    }

    fn publish_view(&self, desired: &Arc<DesiredState>) {
        let mut pods_by_endpoint = BTreeMap::new();
        let mut pods_by_ip = BTreeMap::new();
        for (pod, ep) in &desired.endpoints {
            pods_by_endpoint.insert(ep.info.id, pod.to_string());
            for ip in &ep.ips {
                pods_by_ip.insert(*ip, pod.to_string());
            }
        }
        if let Ok(mut v) = self.view.lock() {
            v.state = Arc::clone(desired);
            v.pods_by_endpoint = pods_by_endpoint;
            v.pods_by_ip = pods_by_ip;
        }
    }

    /// Reads the packet counters every `RESYNC` on a thread of its own, through its own
    /// descriptor: a read of every slot takes milliseconds, and on the control loop it would
    /// delay any policy change that arrived meanwhile. `None` when the thread did not start.
    fn spawn_packet_counting(
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
    fn publish_counters(&self, reconciler: &Reconciler, ct_entries: CtCount, packets: bool) {
        let Ok(dp) = self.datapath.lock() else { return };
        if packets && let Ok(counters) = dp.counters.read() {
            publish_packets(&self.status, &self.view, self.per_pod_metrics, counters);
        }
        if let Ok(lost) = dp.events_lost() {
            self.status.events_lost.store(lost, Ordering::Relaxed);
        }
        let o = dp.options();
        let capacity = |name: &str| match name {
            "ENDPOINTS" => o.max_endpoints,
            "POLICY" => o.policy_size,
            "CIDRS_V4" | "CIDRS_V6" => o.cidrs_size,
            _ => o.peers_size,
        };
        // What the reconciler wrote is what the maps hold: no walk over 100k entries a second.
        let mut maps: Vec<(String, u64, u64)> = reconciler
            .written_sizes()
            .unwrap_or_default()
            .into_iter()
            .map(|(name, n)| (name.to_string(), n as u64, u64::from(capacity(name))))
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
struct CtCounts {
    flows: AtomicU64,
    v4: AtomicU64,
    v6: AtomicU64,
    /// The counting thread counts in batches; otherwise the control loop walks the keys.
    batched: AtomicBool,
}

impl CtCounts {
    fn store(&self, c: CtCount) {
        self.flows.store(c.flows as u64, Ordering::Relaxed);
        self.v4.store(c.v4 as u64, Ordering::Relaxed);
        self.v6.store(c.v6 as u64, Ordering::Relaxed);
    }

    fn load(&self) -> CtCount {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as usize;
        CtCount {
            flows: n(&self.flows),
            v4: n(&self.v4),
            v6: n(&self.v6),
        }
    }

    /// Counts every `COUNT_CONNTRACK` on a thread of its own, through its own descriptors: a
    /// count of a full map never holds the datapath lock, so it never delays a policy change.
    /// Stops with the agent, or at the first failure (the loop then walks the keys).
    fn spawn(
        counts: &Arc<Self>,
        counter: ConntrackCounter,
        stop: &Arc<AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let (counts, stop) = (Arc::clone(counts), Arc::clone(stop));
        counts.batched.store(true, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().name("ct-count".into()).spawn({
            let counts = Arc::clone(&counts);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match counter.count() {
                        Ok(c) => counts.store(c),
                        Err(e) => {
                            log::warn!("counting conntrack in batches: {e:#}; walking it instead");
                            counts.batched.store(false, Ordering::Relaxed);
                            return;
                        }
                    }
                    let next = Instant::now() + COUNT_CONNTRACK;
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

/// Hands the heap pages freed by a parse and compile back to the kernel. glibc keeps freed
/// memory in its arenas, so without this the resident size stays at the peak of the largest
/// recompile (all manifests parsed, the whole cluster compiled) for the agent's lifetime.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
