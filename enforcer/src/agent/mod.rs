//! The agent's control loop: read the source, compile, reconcile, publish status and the view the
//! flow log names things with.
//!
//! The loop runs on its own thread (the kernel calls are synchronous and quick); the HTTP side
//! runs on tokio and only reads [`Status`].

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

mod counters;
use counters::CtCounts;
mod numbering;
mod programming;
use programming::Shown;

use anyhow::Result;

use enforcer_policy::{
    compile::{Allocations, CompileError, CompileOptions, compile},
    model::{Cluster, pod_ips, pod_ref},
    state::{DesiredState, PodRef},
};

use crate::{
    datapath::{Datapath, peers_growth, routes::KernelRoutes},
    observe::{View, metrics::Status},
    reconcile::{DatapathMaps, MapName, Reconciler},
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
/// Wait before a failed growth of the peers maps is tried again (each try loads the programs).
const GROW_RETRY: Duration = Duration::from_secs(60);

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
    /// Pace of conntrack sweeps (`--ct-sweep-interval`): each reads every flow (a batched read
    /// of the whole map) on a thread of its own, or walks the keys on the loop's thread where
    /// batches are missing; it counts the maps' fill and sets the per-endpoint flow counts to
    /// the live flows.
    pub ct_sweep: Duration,
    /// `/healthz` fails when a turn of the loop takes longer (`--loop-stall-timeout`).
    pub loop_stall_timeout: Duration,
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
        // Local pods the compile gave no endpoint id: attached without an entry (denied).
        let mut unnumbered: Vec<(PodRef, Vec<IpAddr>)> = Vec::new();
        let mut shown = Shown::default();
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
        let _counting = counter.map(|c| CtCounts::spawn(&ct_counts, c, self.ct_sweep, &stop));
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
        // Beaten on every turn, idle or not: only a turn that hangs (a kernel call, a lock, a
        // compile past the bound) makes it stale.
        let heartbeat = self
            .status
            .heartbeats
            .register("control loop", self.loop_stall_timeout);
        while !stop.load(Ordering::Relaxed) {
            heartbeat.beat();
            let mut cluster_changed = false;
            match self.source.poll() {
                Ok(Some((mut c, mut problems))) => {
                    let started = Instant::now();
                    problems.extend(last_good.apply(&mut c));
                    log::debug!(
                        "input: {} pods, {} policies, {} problems; policies validated in {:.3} s",
                        c.pods.len(),
                        c.policies.len(),
                        problems.len(),
                        started.elapsed().as_secs_f64()
                    );
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
                        // The first compile after a restart has every identity the records
                        // hold, so the pinned maps are never reprogrammed without them.
                        if let Some(id) = &self.identity {
                            id.update_records(Some(&c), true, &self.compile_options.node_ips);
                            c.verified = id.verified();
                        }
                        let started = Instant::now();
                        self.restore_numbers(&c, &mut alloc);
                        log::debug!(
                            "pinned numbering read in {:.3} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                    cluster = Some(c);
                    cluster_changed = true;
                    self.status.ready.store(false, Ordering::Relaxed);
                    self.status.observed.fetch_add(1, Ordering::Relaxed);
                    dirty = true;
                }
                Ok(None) => {}
                Err(e) => log::warn!("{e:#}"),
            }
            // Identity: expired tokens and gone pods lose their binding, records are read and
            // checked against the pods again; any change of the bindings recompiles (the flows
            // they allowed are re-checked through the epoch).
            if let Some(id) = &self.identity {
                id.sweep();
                let records_changed = id.update_records(
                    cluster.as_ref(),
                    cluster_changed,
                    &self.compile_options.node_ips,
                );
                let generation = id.bindings.generation();
                if generation != bindings_seen || records_changed {
                    bindings_seen = generation;
                    if let Some(c) = &mut cluster {
                        c.verified = id.verified();
                        dirty = true;
                    }
                }
            }
            // Pods without an endpoint id get one only from a compile: while there are any, each
            // resync compiles again (an id freed by a pod that left is handed out then); its
            // errors were logged the first time.
            let retry_ids = !dirty && !unnumbered.is_empty() && last_sync.elapsed() >= RESYNC;
            if retry_ids && last_verify.elapsed() >= VERIFY_KERNEL {
                reconciler.verify_kernel();
                last_verify = Instant::now();
            }
            dirty |= retry_ids;
            if dirty {
                if let Some(c) = &mut cluster {
                    if let Some(id) = &self.identity {
                        c.verified = id.verified();
                    }
                    let started = Instant::now();
                    let compiled = compile(c, &self.compile_options, &mut alloc);
                    self.status.observe_compile(started.elapsed());
                    log::debug!("compiled in {:.3} s", started.elapsed().as_secs_f64());
                    unnumbered = without_ids(c, &compiled.errors);
                    for e in &compiled.errors {
                        // A refused policy's errors were logged with the input's problems.
                        let logged = matches!(
                            e,
                            CompileError::TooManyEndpoints { .. } | CompileError::Policy(_)
                        );
                        if !retry_ids && !logged {
                            log::warn!("{e}");
                        }
                    }
                    let refused = compiled.refused.iter().map(|r| {
                        format!(
                            "{}/{}: {}",
                            r.refusal.namespace,
                            r.refusal.name,
                            r.refusal.consequence()
                        )
                    });
                    // Invalid cluster policies run as their fail-closed stand-in (logged by
                    // the source); listed as refused like invalid NetworkPolicies.
                    let tier_refused = c.cluster_policies.iter().filter_map(|p| {
                        let first = p.refused.first()?;
                        Some(format!(
                            "{}: refused ({first}): enforcing its fail-closed stand-in",
                            p.display_name()
                        ))
                    });
                    self.status
                        .set_refused(refused.chain(tier_refused).collect());
                    desired = Arc::new(compiled.state);
                    let viewing = Instant::now();
                    self.publish_view(&desired, c);
                    log::debug!(
                        "status view built in {:.3} s",
                        viewing.elapsed().as_secs_f64()
                    );
                    let turn = Turn {
                        desired: &desired,
                        unnumbered: &unnumbered,
                        cluster: Some(c),
                        started,
                    };
                    self.reconcile(&mut reconciler, &turn, &mut shown);
                    last_sync = Instant::now();
                    release_free_memory();
                }
                dirty = false;
            } else if cluster.is_some() && last_sync.elapsed() >= RESYNC {
                if last_verify.elapsed() >= VERIFY_KERNEL {
                    reconciler.verify_kernel();
                    last_verify = Instant::now();
                }
                let turn = Turn {
                    desired: &desired,
                    unnumbered: &unnumbered,
                    cluster: cluster.as_ref(),
                    started: Instant::now(),
                };
                self.reconcile(&mut reconciler, &turn, &mut shown);
                last_sync = Instant::now();
            }
            if last_counters.elapsed() >= RESYNC {
                // Without batch lookups (before Linux 5.6) the count is a key walk on this thread.
                if !ct_counts.batched.load(Ordering::Relaxed)
                    && last_ct_count.is_none_or(|t| t.elapsed() >= self.ct_sweep)
                {
                    if let Ok(dp) = self.datapath.lock() {
                        let swept = dp
                            .config()
                            .and_then(|cfg| dp.conntrack.sweep(&cfg, self.ct_sweep * 3));
                        match swept {
                            Ok(c) => ct_counts.store(c),
                            Err(e) => log::warn!("sweeping conntrack: {e:#}"),
                        }
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

    fn reconcile(&self, reconciler: &mut Reconciler, turn: &Turn<'_>, shown: &mut Shown) {
        let Turn {
            desired,
            unnumbered,
            cluster,
            started,
        } = *turn;
        let programming = Instant::now();
        let result = match (KernelRoutes::read(), self.datapath.lock()) {
            (Ok(routes), Ok(mut dp)) => {
                self.grow_peers(&mut dp, desired, reconciler, shown);
                reconciler.apply_shared(desired, unnumbered, &mut *dp, &routes)
            }
            (Err(e), _) => Err(e),
            (_, Err(_)) => return,
        };
        match result {
            Ok(report) => {
                self.status.observe_reconcile(started.elapsed());
                if report.written + report.removed > 0 {
                    log::debug!(
                        "maps programmed in {:.3} s",
                        programming.elapsed().as_secs_f64()
                    );
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
                if !report.exit_attached.is_empty() || !report.exit_detached.is_empty() {
                    log::info!(
                        "exit program: attached to interfaces {:?}, detached from {:?}",
                        report.exit_attached,
                        report.exit_detached
                    );
                }
                // Not ready, and said so, while anything is not programmed: the pods named are
                // denied beyond their policies (never allowed more).
                let programming = shown.report(&report, &reconciler.fill(), cluster);
                self.status.set_programming(programming);
                // Enforced: the pods with an endpoint entry and programs (not those without an
                // endpoint id, or without room, which are attached only to be denied).
                let pending = (report.pending.len() + report.failed.len()) as u64;
                let numbered = |p: &PodRef| desired.endpoints.contains_key(p);
                let not_enforced = report.pending.iter().filter(|(p, _)| numbered(p)).count()
                    + report.failed.iter().filter(|(p, _)| numbered(p)).count()
                    + report
                        .unprogrammed
                        .iter()
                        .filter(|u| u.map == MapName::Endpoints && numbered(&u.pod))
                        .count();
                self.status.pods_enforced.store(
                    desired.endpoints.len().saturating_sub(not_enforced) as u64,
                    Ordering::Relaxed,
                );
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

    /// Grows the peers maps before the cluster's addresses outgrow them (see
    /// [`Datapath::grow_peers`]: new maps, filled, swapped in without a gap). A failed growth
    /// is logged and tried again after [`GROW_RETRY`]; meanwhile what does not fit is left out
    /// and reported like any full map (denied, never allowed).
    fn grow_peers(
        &self,
        dp: &mut Datapath,
        desired: &DesiredState,
        reconciler: &mut Reconciler,
        shown: &mut Shown,
    ) {
        if shown.peers_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let needed = desired.peers_v4.len().max(desired.peers_v6.len());
        let capacity = DatapathMaps::capacity(dp, MapName::PeersV4).unwrap_or(0);
        let max = dp.options().peers_max;
        let Some(size) = peers_growth(needed, u32::try_from(capacity).unwrap_or(u32::MAX), max)
        else {
            return;
        };
        let started = Instant::now();
        match dp.grow_peers(size) {
            Ok(()) => {
                shown.peers_retry = None;
                log::info!(
                    "peers maps grown from {capacity} to {size} entries each for {needed} addresses ({:.1} s, no gap: the links were re-pointed at programs reading the new maps)",
                    started.elapsed().as_secs_f64()
                );
                self.status.peers_grown.fetch_add(1, Ordering::Relaxed);
                // The new maps were filled from the old ones; compare with them once.
                reconciler.verify_kernel();
            }
            Err(e) => {
                shown.peers_retry = Some(Instant::now() + GROW_RETRY);
                log::error!(
                    "growing the peers maps from {capacity} to {size} entries failed: {e:#}; they keep {capacity} (what does not fit is denied and reported); retried in {} s",
                    GROW_RETRY.as_secs()
                );
            }
        }
    }

    fn publish_view(&self, desired: &Arc<DesiredState>, cluster: &Cluster) {
        let verified = self.view.lock().ok().map(|mut v| {
            v.update(desired, cluster, &self.compile_options.node_ips);
            v.verified_pods()
        });
        if let Some(verified) = verified {
            self.status.set_verified(verified);
        }
        // Reserved labels an object sets itself are ignored for selection: said once per
        // object and label (again only if it goes and comes back), and counted on /metrics.
        for l in self
            .status
            .set_self_set_labels(enforcer_policy::model::self_set_labels(cluster))
        {
            log::warn!("{l}");
        }
    }
}

/// One reconcile's inputs.
#[derive(Clone, Copy)]
struct Turn<'a> {
    desired: &'a Arc<DesiredState>,
    unnumbered: &'a [(PodRef, Vec<IpAddr>)],
    /// Names the pods behind addresses the maps had no room for.
    cluster: Option<&'a Cluster>,
    started: Instant,
}

/// The pods the compile gave no endpoint id (more local pods than ids), with their addresses:
/// the reconciler attaches the programs to them all the same, without an entry, so they are
/// denied both ways rather than left open.
fn without_ids(cluster: &Cluster, errors: &[CompileError]) -> Vec<(PodRef, Vec<IpAddr>)> {
    let mut out = Vec::new();
    for e in errors {
        if let CompileError::TooManyEndpoints { pod, max } = e {
            // Said once, with the others not programmed (see `programming`).
            log::debug!("pod {pod}: no endpoint id left (more than {max} local pods)");
            out.push((pod.clone(), Vec::new()));
        }
    }
    if !out.is_empty() {
        let index: BTreeMap<PodRef, usize> = out
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (p.clone(), i))
            .collect();
        for pod in &cluster.pods {
            if let Some(i) = index.get(&pod_ref(pod)) {
                out[*i].1 = pod_ips(pod);
            }
        }
    }
    out
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
