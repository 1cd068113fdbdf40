//! The agent's status and its Prometheus text for `/metrics`. The control loop publishes into
//! [`Status`]; the HTTP side ([`super::health`]) only reads it, so a scrape never waits on the
//! kernel or the compiler.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use enforcer_common::{REASON_COUNT, REASON_FIRST_DROP, REASON_NAMES};

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
    /// Problems in the latest observed input (bad files, invalid policies).
    pub input_problems: AtomicU64,
    /// Input versions seen (each change of the folder or of the watched objects).
    pub observed: AtomicU64,
    /// The latest input version fully programmed into the maps.
    pub programmed: AtomicU64,
    /// Verdict events the datapath could not queue (ring buffer full).
    pub events_lost: AtomicU64,
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
    /// Extra text appended to /metrics (e.g. identity verifications).
    extra: Vec<Renderer>,
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

    /// Adds a renderer of more metrics.
    pub fn add_renderer(&self, f: Renderer) {
        if let Ok(mut i) = self.inner.lock() {
            i.extra.push(f);
        }
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut o = String::new();
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
            let verdict = if reason >= REASON_FIRST_DROP {
                "dropped"
            } else {
                "allowed"
            };
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
                let verdict = if *reason >= REASON_FIRST_DROP {
                    "dropped"
                } else {
                    "allowed"
                };
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
        for f in &i.extra {
            f(&mut o);
        }
        o
    }
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
        s.set_packets(packets, BTreeMap::new());
        s.set_maps(vec![("POLICY".into(), 5, 10)]);
        let t = s.render();
        assert!(
            t.contains("enforcer_packets_total{verdict=\"dropped\",reason=\"policy-denied\"} 7"),
            "{t}"
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
            t.contains("enforcer_map_fill_ratio{map=\"POLICY\"} 0.5"),
            "{t}"
        );
    }
}
