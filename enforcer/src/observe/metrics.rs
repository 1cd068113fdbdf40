//! The agent's status and its Prometheus text for `/metrics`. The control loop publishes into
//! [`Status`]; the HTTP side ([`super::health`]) only reads it, so a scrape never waits on the
//! kernel or the compiler.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use enforcer_common::{REASON_COUNT, REASON_NAMES, verdict_name};
use enforcer_policy::model::SelfSetLabel;

use super::{VerifiedPods, report};

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A latency histogram in Prometheus' cumulative form.
#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        for (b, le) in BUCKETS.iter().enumerate() {
            if s <= *le {
                self.buckets[b] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, o: &mut String, name: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {}", self.buckets[b]);
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(o, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// The maps the reconciler writes, as labelled on /metrics (every one rendered, 0 when fine).
pub const RECONCILED_MAPS: [&str; 7] = [
    "ENDPOINTS",
    "POLICY",
    "PEERS_V4",
    "PEERS_V6",
    "CIDRS_V4",
    "CIDRS_V6",
    "NODE_PORTS",
];

/// Most pods named on /metrics and /readyz as not programmed; the rest are counted.
pub const NAMED_UNPROGRAMMED: usize = 100;

/// What the latest reconcile could not program, for `/readyz`, `/metrics` and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programming {
    /// One line per pod (or peer address) and map, e.g. `x/b ingress denied (allow rules not
    /// written: POLICY full)`.
    pub lines: Vec<String>,
    /// (pod, map, directions) of the pods not programmed, at most [`NAMED_UNPROGRAMMED`].
    pub pods: Vec<(String, String, String)>,
    /// Per map: pods (for the peer maps, addresses) not programmed because of it.
    pub unprogrammed: BTreeMap<String, u64>,
    /// Per map: entries needed that it does not hold.
    pub missing: BTreeMap<String, u64>,
    /// (pod, reason, why) of the local pods without programs (their own interface not found, or
    /// found where programs must not go), at most [`NAMED_UNPROGRAMMED`]; reason is one of
    /// [`NOT_ENFORCED_REASONS`].
    pub not_enforced: Vec<(String, String, String)>,
    /// Per reason: local pods without programs.
    pub not_enforced_by_reason: BTreeMap<String, u64>,
    /// (interface, why) of the node's interfaces the exit program could not be attached to:
    /// deferred Service packets leaving by them go unjudged.
    pub exits_not_attached: Vec<(String, String)>,
}

/// Why a local pod has no programs, as `/metrics` labels it: its own interface is not found
/// (yet); its address leads to an interface that is not its own veth (a bridge, an uplink, a
/// device shared by several pods); the attach failed.
pub const NOT_ENFORCED_REASONS: [&str; 3] = ["no-interface", "not-own-veth", "attach-failed"];

/// Appends more metrics to a /metrics page.
pub type Renderer = Arc<dyn Fn(&mut String) + Send + Sync>;

/// What the agent reports about itself.
#[derive(Default)]
pub struct Status {
    /// The latest observed state is fully programmed into the maps.
    pub ready: AtomicBool,
    pub pods_enforced: AtomicU64,
    pub pods_pending: AtomicU64,
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    /// Times the peers maps were grown (new, larger maps swapped in).
    pub peers_grown: AtomicU64,
    /// Problems in the latest observed input (bad files, invalid policies).
    pub input_problems: AtomicU64,
    /// Input versions seen (each change of the folder or of the watched objects).
    pub observed: AtomicU64,
    /// The latest input version fully programmed into the maps.
    pub programmed: AtomicU64,
    /// Verdict events the datapath could not queue (ring buffer full).
    pub events_lost: AtomicU64,
    /// The control loop's and the watchers' signs of life (`/healthz`).
    pub heartbeats: super::heartbeat::Heartbeats,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Compile and program, per change.
    reconcile: Histogram,
    /// The compile alone, per change (its part of `reconcile`).
    compile: Histogram,
    /// Packets and bytes by reason (index = reason), summed over endpoints and directions.
    packets: Vec<(u64, u64)>,
    /// Per pod (when asked), by (pod, reason).
    per_pod: BTreeMap<(String, u8), (u64, u64)>,
    /// (map, entries, capacity).
    maps: Vec<(String, u64, u64)>,
    /// What the latest reconcile could not program (see [`Programming`]).
    programming: Programming,
    /// Per map: reconciles that found it too small for what they had to write.
    map_full: BTreeMap<String, u64>,
    /// Policies the agent refuses, each as "ns/name: what it isolates": enforced as isolation
    /// with nothing allowed, so the state is programmed, but it is not what their authors wrote.
    refused: Vec<String>,
    /// Extra text appended to /metrics (e.g. identity verifications).
    extra: Vec<Renderer>,
    /// The pods with a verified address (see [`VerifiedPods`]).
    verified: VerifiedPods,
    /// The reserved labels objects set themselves, as logged (`SelfSetLabel`'s text), and the
    /// number of objects carrying them.
    self_set: BTreeSet<String>,
    self_set_objects: u64,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Status {
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut i) = self.inner.lock() {
            i.reconcile.observe(took);
        }
    }

    /// The compile of a change, apart: with the reconcile histogram it says whether a slow
    /// change was slow to compile or to program.
    pub fn observe_compile(&self, took: Duration) {
        if let Ok(mut i) = self.inner.lock() {
            i.compile.observe(took);
        }
    }

    /// Replaces the packet counters (index = reason) and the per-pod breakdown.
    pub fn set_packets(
        &self,
        by_reason: Vec<(u64, u64)>,
        per_pod: BTreeMap<(String, u8), (u64, u64)>,
    ) {
        if let Ok(mut i) = self.inner.lock() {
            i.packets = by_reason;
            i.per_pod = per_pod;
        }
    }

    /// Replaces the map fill figures.
    pub fn set_maps(&self, maps: Vec<(String, u64, u64)>) {
        if let Ok(mut i) = self.inner.lock() {
            i.maps = maps;
        }
    }

    /// Replaces what is not programmed; every map with missing entries counts one more
    /// reconcile that found it full.
    pub fn set_programming(&self, p: Programming) {
        if let Ok(mut i) = self.inner.lock() {
            for (map, n) in &p.missing {
                if *n > 0 {
                    *i.map_full.entry(map.clone()).or_default() += 1;
                }
            }
            i.programming = p;
        }
    }

    /// What the latest reconcile could not program, one line each (for `/readyz`).
    /// Sets the refused policies (see [`Inner::refused`]).
    pub fn set_refused(&self, refused: Vec<String>) {
        if let Ok(mut i) = self.inner.lock() {
            i.refused = refused;
        }
    }

    /// The refused policies, for `/readyz`.
    pub fn refused(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.refused.clone())
            .unwrap_or_default()
    }

    /// The local pods without programs, one line each (for `/readyz`).
    pub fn not_enforced(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| {
                i.programming
                    .not_enforced
                    .iter()
                    .map(|(pod, _, why)| format!("{pod}: {why}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The interfaces without the exit program, one line each (for `/readyz`).
    pub fn exits_not_attached(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| {
                i.programming
                    .exits_not_attached
                    .iter()
                    .map(|(ifname, why)| format!("exit {ifname} not attached: {why}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn not_programmed(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.programming.lines.clone())
            .unwrap_or_default()
    }

    /// Replaces the verified pods.
    pub fn set_verified(&self, v: VerifiedPods) {
        if let Ok(mut i) = self.inner.lock() {
            i.verified = v;
        }
    }

    /// Replaces the reserved labels that Pod and Namespace objects set themselves (ignored for
    /// selection); returns those not there last time, for the log to name once per object.
    pub fn set_self_set_labels(&self, labels: Vec<SelfSetLabel>) -> Vec<SelfSetLabel> {
        let Ok(mut i) = self.inner.lock() else {
            return Vec::new();
        };
        let objects: BTreeSet<(&str, &str)> =
            labels.iter().map(|l| (l.kind, l.object.as_str())).collect();
        i.self_set_objects = objects.len() as u64;
        let now: BTreeSet<String> = labels.iter().map(ToString::to_string).collect();
        let new = labels
            .into_iter()
            .filter(|l| !i.self_set.contains(&l.to_string()))
            .collect();
        i.self_set = now;
        new
    }

    /// Adds a renderer of more metrics.
    pub fn add_renderer(&self, f: Renderer) {
        if let Ok(mut i) = self.inner.lock() {
            i.extra.push(f);
        }
    }

    /// The state as `/status` serves it.
    pub fn report(&self) -> report::StatusReport {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = report::StatusReport {
            ready: self.ready.load(Ordering::Relaxed),
            generation: report::Generation {
                observed: load(&self.observed),
                programmed: load(&self.programmed),
            },
            pods_enforced: load(&self.pods_enforced),
            pods_pending: load(&self.pods_pending),
            input_problems: load(&self.input_problems),
            events_lost: load(&self.events_lost),
            build: report::BuildInfo::current(),
            ..report::StatusReport::default()
        };
        let Ok(i) = self.inner.lock() else { return out };
        let mean = |h: &Histogram| (h.count > 0).then(|| h.sum / h.count as f64);
        out.reconciles = report::Reconciles {
            total: load(&self.reconciles),
            failed: load(&self.reconcile_errors),
            mean_seconds: mean(&i.reconcile),
            mean_compile_seconds: mean(&i.compile),
        };
        for reason in 0..REASON_COUNT as u8 {
            let (packets, bytes) = i.packets.get(reason as usize).copied().unwrap_or_default();
            out.packets.push(report::PacketCount {
                verdict: enforcer_common::verdict_name(reason).into(),
                reason: REASON_NAMES[reason as usize].into(),
                packets,
                bytes,
            });
        }
        out.maps = i
            .maps
            .iter()
            .map(|(map, entries, capacity)| report::MapFill {
                map: map.clone(),
                entries: *entries,
                capacity: *capacity,
                fill: if *capacity == 0 {
                    0.0
                } else {
                    *entries as f64 / *capacity as f64
                },
            })
            .collect();
        out.refused_policies = i.refused.clone();
        out.not_enforced = i
            .programming
            .not_enforced
            .iter()
            .map(|(pod, reason, why)| report::NotEnforced {
                pod: pod.clone(),
                reason: reason.clone(),
                why: why.clone(),
            })
            .collect();
        out.not_programmed = i.programming.lines.clone();
        out.entries_missing = i
            .programming
            .missing
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (m.clone(), *n))
            .collect();
        out.exits_not_attached = i
            .programming
            .exits_not_attached
            .iter()
            .map(|(interface, why)| report::ExitNotAttached {
                interface: interface.clone(),
                why: why.clone(),
            })
            .collect();
        out.verified = report::Verified {
            local: i
                .verified
                .local
                .iter()
                .map(|(namespace, pod, service_account)| report::VerifiedPod {
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    service_account: service_account.clone(),
                })
                .collect(),
            remote: i.verified.remote,
        };
        out.reserved_labels_ignored = i.self_set_objects;
        out
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let build = report::BuildInfo::current();
        let _ = writeln!(
            o,
            "# HELP enforcer_build_info The running binary: version, git revision and compiler (always 1)\n# TYPE enforcer_build_info gauge\nenforcer_build_info{{version=\"{}\",revision=\"{}\",rustc=\"{}\"}} 1",
            escape(&build.version),
            escape(&build.revision),
            escape(&build.rustc)
        );
        let g = |o: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut o,
            "enforcer_ready",
            "1 when the latest observed state is programmed",
            "gauge",
            u64::from(self.ready.load(Ordering::Relaxed)),
        );
        g(
            &mut o,
            "enforcer_pods_enforced",
            "Pods with programs attached",
            "gauge",
            self.pods_enforced.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_pods_pending",
            "Local pods whose interface is not found yet",
            "gauge",
            self.pods_pending.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_reconciles_total",
            "Reconciles run",
            "counter",
            self.reconciles.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_reconcile_errors_total",
            "Reconciles that failed",
            "counter",
            self.reconcile_errors.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_peers_maps_grown_total",
            "Times PEERS_V4 and PEERS_V6 were replaced by larger maps",
            "counter",
            self.peers_grown.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_events_lost_total",
            "Verdict events lost to a full ring buffer",
            "counter",
            self.events_lost.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "enforcer_input_problems",
            "Problems in the latest input (bad files, invalid policies)",
            "gauge",
            self.input_problems.load(Ordering::Relaxed),
        );
        let Ok(i) = self.inner.lock() else { return o };
        g(
            &mut o,
            "enforcer_policies_refused",
            "Policies the agent refuses: each isolates the pods it selects, allowing nothing",
            "gauge",
            i.refused.len() as u64,
        );
        i.reconcile.render(
            &mut o,
            "enforcer_reconcile_seconds",
            "Time to compile and program a change",
        );
        i.compile.render(
            &mut o,
            "enforcer_compile_seconds",
            "Time to compile a change (part of enforcer_reconcile_seconds)",
        );
        let _ = writeln!(
            o,
            "# HELP enforcer_packets_total Packets by verdict and reason\n# TYPE enforcer_packets_total counter"
        );
        let mut bytes = String::new();
        for reason in 0..REASON_COUNT as u8 {
            let (p, b) = i.packets.get(reason as usize).copied().unwrap_or_default();
            let verdict = verdict_name(reason);
            let name = REASON_NAMES[reason as usize];
            let _ = writeln!(
                o,
                "enforcer_packets_total{{verdict=\"{verdict}\",reason=\"{name}\"}} {p}"
            );
            let _ = writeln!(
                bytes,
                "enforcer_bytes_total{{verdict=\"{verdict}\",reason=\"{name}\"}} {b}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP enforcer_bytes_total Bytes by verdict and reason\n# TYPE enforcer_bytes_total counter\n{}",
            bytes.trim_end()
        );
        if !i.per_pod.is_empty() {
            let _ = writeln!(
                o,
                "# HELP enforcer_pod_packets_total Packets by pod, verdict and reason\n# TYPE enforcer_pod_packets_total counter"
            );
            for ((pod, reason), (p, _)) in &i.per_pod {
                let verdict = verdict_name(*reason);
                let name = REASON_NAMES
                    .get(*reason as usize)
                    .copied()
                    .unwrap_or("unknown");
                let _ = writeln!(
                    o,
                    "enforcer_pod_packets_total{{pod=\"{pod}\",verdict=\"{verdict}\",reason=\"{name}\"}} {p}"
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP enforcer_map_entries Entries in a datapath map\n# TYPE enforcer_map_entries gauge"
        );
        for (m, n, _) in &i.maps {
            let _ = writeln!(o, "enforcer_map_entries{{map=\"{m}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP enforcer_map_capacity Entries a datapath map has room for\n# TYPE enforcer_map_capacity gauge"
        );
        for (m, _, cap) in &i.maps {
            let _ = writeln!(o, "enforcer_map_capacity{{map=\"{m}\"}} {cap}");
        }
        let _ = writeln!(
            o,
            "# HELP enforcer_map_fill_ratio Entries over capacity\n# TYPE enforcer_map_fill_ratio gauge"
        );
        for (m, n, cap) in &i.maps {
            let ratio = if *cap == 0 {
                0.0
            } else {
                *n as f64 / *cap as f64
            };
            let _ = writeln!(o, "enforcer_map_fill_ratio{{map=\"{m}\"}} {ratio}");
        }
        let per_map =
            |o: &mut String, name: &str, help: &str, kind: &str, v: &BTreeMap<String, u64>| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for m in RECONCILED_MAPS {
                    let n = v.get(m).copied().unwrap_or(0);
                    let _ = writeln!(o, "{name}{{map=\"{m}\"}} {n}");
                }
            };
        per_map(
            &mut o,
            "enforcer_endpoints_unprogrammed",
            "Local pods (for PEERS_*, pod addresses) not fully programmed because the map is full: denied beyond their policies",
            "gauge",
            &i.programming.unprogrammed,
        );
        per_map(
            &mut o,
            "enforcer_map_entries_missing",
            "Entries the desired state needs that the map does not hold",
            "gauge",
            &i.programming.missing,
        );
        per_map(
            &mut o,
            "enforcer_map_full_total",
            "Reconciles that could not write every entry a map needed",
            "counter",
            &i.map_full,
        );
        let _ = writeln!(
            o,
            "# HELP enforcer_pods_not_enforced Local pods without programs, by reason: their traffic is not filtered on this node\n# TYPE enforcer_pods_not_enforced gauge"
        );
        for r in NOT_ENFORCED_REASONS {
            let n = i
                .programming
                .not_enforced_by_reason
                .get(r)
                .copied()
                .unwrap_or(0);
            let _ = writeln!(o, "enforcer_pods_not_enforced{{reason=\"{r}\"}} {n}");
        }
        if !i.programming.not_enforced.is_empty() {
            let _ = writeln!(
                o,
                "# HELP enforcer_pod_not_enforced Local pods without programs (see /readyz for why)\n# TYPE enforcer_pod_not_enforced gauge"
            );
            for (pod, reason, _) in &i.programming.not_enforced {
                let _ = writeln!(
                    o,
                    "enforcer_pod_not_enforced{{pod=\"{pod}\",reason=\"{reason}\"}} 1"
                );
            }
        }
        g(
            &mut o,
            "enforcer_exits_not_attached",
            "Interfaces of the node the exit program could not be attached to: deferred Service packets leaving by them go unjudged",
            "gauge",
            i.programming.exits_not_attached.len() as u64,
        );
        if !i.programming.exits_not_attached.is_empty() {
            let _ = writeln!(
                o,
                "# HELP enforcer_exit_not_attached Interfaces without the exit program (see /readyz for why)\n# TYPE enforcer_exit_not_attached gauge"
            );
            for (ifname, _) in &i.programming.exits_not_attached {
                let _ = writeln!(o, "enforcer_exit_not_attached{{interface=\"{ifname}\"}} 1");
            }
        }
        if !i.programming.pods.is_empty() {
            let _ = writeln!(
                o,
                "# HELP enforcer_pod_unprogrammed Pods not fully programmed, by the map that is full and the directions denied\n# TYPE enforcer_pod_unprogrammed gauge"
            );
            for (pod, map, dirs) in &i.programming.pods {
                let _ = writeln!(
                    o,
                    "enforcer_pod_unprogrammed{{pod=\"{pod}\",map=\"{map}\",direction=\"{dirs}\"}} 1"
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP enforcer_identity_verified_pods Pods with an address bound to a verified identity: on this node (local) and on others (remote)\n# TYPE enforcer_identity_verified_pods gauge\nenforcer_identity_verified_pods{{scope=\"local\"}} {}\nenforcer_identity_verified_pods{{scope=\"remote\"}} {}",
            i.verified.local.len(),
            i.verified.remote
        );
        // One series per local verified pod only: a node has at most its own pods, while the
        // cluster's may be 100k.
        if !i.verified.local.is_empty() {
            let _ = writeln!(
                o,
                "# HELP enforcer_identity_verified Local pods bound to a verified identity\n# TYPE enforcer_identity_verified gauge"
            );
            for (ns, pod, sa) in &i.verified.local {
                let _ = writeln!(
                    o,
                    "enforcer_identity_verified{{namespace=\"{}\",pod=\"{}\",service_account=\"{}\"}} 1",
                    escape(ns),
                    escape(pod),
                    escape(sa)
                );
            }
        }
        g(
            &mut o,
            "enforcer_reserved_labels_ignored",
            "Pod and Namespace objects that set reserved enforcer.dev/ labels themselves: ignored for selection (the log names each)",
            "gauge",
            i.self_set_objects,
        );
        for f in &i.extra {
            f(&mut o);
        }
        o
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Status::default();
        s.observe_reconcile(Duration::from_millis(3));
        s.observe_compile(Duration::from_millis(30));
        let mut packets = vec![(0, 0); REASON_COUNT as usize];
        packets[enforcer_common::reason::DROP_POLICY as usize] = (7, 700);
        packets[enforcer_common::reason::ALLOW_AUDIT as usize] = (3, 300);
        s.set_packets(packets, BTreeMap::new());
        s.set_maps(vec![("POLICY".into(), 5, 10)]);
        let t = s.render();
        assert!(
            t.contains("enforcer_packets_total{verdict=\"dropped\",reason=\"policy-denied\"} 7"),
            "{t}"
        );
        assert!(
            t.contains("enforcer_packets_total{verdict=\"would-drop\",reason=\"audit\"} 3"),
            "audit mode's would-drop apart from drops: {t}"
        );
        assert!(
            t.contains("enforcer_reconcile_seconds_bucket{le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("enforcer_reconcile_seconds_bucket{le=\"0.0025\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("enforcer_compile_seconds_bucket{le=\"0.025\"} 0")
                && t.contains("enforcer_compile_seconds_bucket{le=\"0.05\"} 1")
                && t.contains(
                    "enforcer_compile_seconds_sum 0.03\nenforcer_compile_seconds_count 1"
                ),
            "{t}"
        );
        assert!(
            t.contains("enforcer_map_fill_ratio{map=\"POLICY\"} 0.5")
                && t.contains("enforcer_map_capacity{map=\"POLICY\"} 10"),
            "{t}"
        );
        assert!(
            t.contains("enforcer_map_full_total{map=\"POLICY\"} 0")
                && t.contains("enforcer_endpoints_unprogrammed{map=\"ENDPOINTS\"} 0")
                && !t.contains("enforcer_pod_unprogrammed"),
            "every map has its series, at 0: {t}"
        );
    }

    #[test]
    fn renders_verified_pods_and_self_set_labels() {
        let s = Status::default();
        let t = s.render();
        for line in [
            "enforcer_identity_verified_pods{scope=\"local\"} 0",
            "enforcer_identity_verified_pods{scope=\"remote\"} 0",
            "enforcer_reserved_labels_ignored 0",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in {t}");
        }
        assert!(!t.contains("enforcer_identity_verified{"), "{t}");
        s.set_verified(VerifiedPods {
            local: [("x".into(), "a".into(), "frontend".into())].into(),
            remote: 3,
        });
        let label = |object: &str, key: &str| SelfSetLabel {
            kind: "Pod",
            object: object.into(),
            key: key.into(),
            value: "v".into(),
        };
        let first = vec![
            label("x/c", "enforcer.dev/serviceaccount"),
            label("x/c", "enforcer.dev/namespace"),
        ];
        assert_eq!(s.set_self_set_labels(first.clone()), first, "new: logged");
        let mut second = first.clone();
        second.push(label("x/d", "enforcer.dev/serviceaccount"));
        assert_eq!(
            s.set_self_set_labels(second),
            [label("x/d", "enforcer.dev/serviceaccount")],
            "only what is new is logged again"
        );
        let t = s.render();
        for line in [
            "enforcer_identity_verified_pods{scope=\"local\"} 1",
            "enforcer_identity_verified_pods{scope=\"remote\"} 3",
            "enforcer_identity_verified{namespace=\"x\",pod=\"a\",service_account=\"frontend\"} 1",
            "enforcer_reserved_labels_ignored 2",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in {t}");
        }
        // Gone, then back: said again.
        assert!(s.set_self_set_labels(Vec::new()).is_empty());
        assert_eq!(s.set_self_set_labels(first.clone()), first);
    }

    #[test]
    fn renders_what_is_not_programmed() {
        let s = Status::default();
        let p = Programming {
            lines: vec!["x/c ingress denied (allow rules not written: POLICY full)".into()],
            pods: vec![("x/c".into(), "POLICY".into(), "ingress".into())],
            unprogrammed: BTreeMap::from([("POLICY".into(), 1)]),
            missing: BTreeMap::from([("POLICY".into(), 2)]),
            not_enforced: vec![("x/d".into(), "not-own-veth".into(), "cni0".into())],
            not_enforced_by_reason: BTreeMap::from([("not-own-veth".into(), 1)]),
            exits_not_attached: vec![("eth1".into(), "busy".into())],
        };
        s.set_programming(p.clone());
        s.set_programming(p);
        let t = s.render();
        for line in [
            "enforcer_endpoints_unprogrammed{map=\"POLICY\"} 1",
            "enforcer_map_entries_missing{map=\"POLICY\"} 2",
            "enforcer_map_full_total{map=\"POLICY\"} 2",
            "enforcer_map_full_total{map=\"ENDPOINTS\"} 0",
            "enforcer_pod_unprogrammed{pod=\"x/c\",map=\"POLICY\",direction=\"ingress\"} 1",
            "enforcer_pod_not_enforced{pod=\"x/d\",reason=\"not-own-veth\"} 1",
            "enforcer_pods_not_enforced{reason=\"not-own-veth\"} 1",
            "enforcer_pods_not_enforced{reason=\"no-interface\"} 0",
            "enforcer_packets_total{verdict=\"dropped\",reason=\"unprogrammed\"} 0",
            "enforcer_map_full_total{map=\"NODE_PORTS\"} 0",
            "enforcer_exits_not_attached 1",
            "enforcer_exit_not_attached{interface=\"eth1\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in {t}");
        }
        assert_eq!(s.not_programmed().len(), 1);
        assert_eq!(s.exits_not_attached(), ["exit eth1 not attached: busy"]);
        s.set_programming(Programming::default());
        assert!(s.not_programmed().is_empty());
        assert!(s.render().contains("enforcer_exits_not_attached 0\n"));
    }
}
