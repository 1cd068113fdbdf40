//! Identity counters, rendered in the Prometheus text format by the agent's `/metrics`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Reason;
use crate::httpd::ConnStats;

/// Counters of attestations by outcome and reason, of the endpoint's connections and of key
/// refreshes.
#[derive(Debug)]
pub struct IdentityMetrics {
    accepted: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    key_refresh_ok: AtomicU64,
    key_refresh_failed: AtomicU64,
    keys_loaded: AtomicU64,
    /// Consecutive failed key refreshes (0 after a success).
    key_refresh_failing: AtomicU64,
    /// Connections of the attestation port.
    pub connections: Arc<ConnStats>,
    /// Rate-limited audit lines left out.
    pub(crate) audit_suppressed: AtomicU64,
    /// New sources refused because the rate limiter's table was full of budgets in use.
    rate_limiter_full: AtomicU64,
}

impl Default for IdentityMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityMetrics {
    pub fn new() -> Self {
        IdentityMetrics {
            accepted: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            key_refresh_ok: AtomicU64::new(0),
            key_refresh_failed: AtomicU64::new(0),
            keys_loaded: AtomicU64::new(0),
            key_refresh_failing: AtomicU64::new(0),
            connections: Arc::new(ConnStats::default()),
            audit_suppressed: AtomicU64::new(0),
            rate_limiter_full: AtomicU64::new(0),
        }
    }

    pub fn record_accept(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_reject(&self, reason: Reason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_key_refresh(&self, ok: bool, keys: usize) {
        if ok {
            self.key_refresh_ok.fetch_add(1, Ordering::Relaxed);
            self.key_refresh_failing.store(0, Ordering::Relaxed);
        } else {
            self.key_refresh_failed.fetch_add(1, Ordering::Relaxed);
            self.key_refresh_failing.fetch_add(1, Ordering::Relaxed);
        }
        self.keys_loaded.store(keys as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_rate_limiter_full(&self) {
        self.rate_limiter_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate_limiter_full(&self) -> u64 {
        self.rate_limiter_full.load(Ordering::Relaxed)
    }

    pub fn audit_lines_suppressed(&self) -> u64 {
        self.audit_suppressed.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    /// Append the metrics in the Prometheus text exposition format.
    pub fn render_prometheus(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_attestations_total Attestation requests by outcome and reason."
        );
        let _ = writeln!(out, "# TYPE enforcer_identity_attestations_total counter");
        let _ = writeln!(
            out,
            "enforcer_identity_attestations_total{{outcome=\"accepted\",reason=\"ok\"}} {}",
            self.accepted()
        );
        for r in Reason::ALL {
            let _ = writeln!(
                out,
                "enforcer_identity_attestations_total{{outcome=\"rejected\",reason=\"{}\"}} {}",
                r.as_str(),
                self.rejected(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_key_refreshes_total JWKS refreshes by result."
        );
        let _ = writeln!(out, "# TYPE enforcer_identity_key_refreshes_total counter");
        let _ = writeln!(
            out,
            "enforcer_identity_key_refreshes_total{{result=\"ok\"}} {}",
            self.key_refresh_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "enforcer_identity_key_refreshes_total{{result=\"error\"}} {}",
            self.key_refresh_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_keys Verification keys currently loaded."
        );
        let _ = writeln!(out, "# TYPE enforcer_identity_keys gauge");
        let _ = writeln!(
            out,
            "enforcer_identity_keys {}",
            self.keys_loaded.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_key_refresh_failures Consecutive failed key refreshes (0 after a success).\n# TYPE enforcer_identity_key_refresh_failures gauge\nenforcer_identity_key_refresh_failures {}",
            self.key_refresh_failing.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_rate_limiter_full_total New sources refused with 429 because every place of the rate limiter held a budget in use.\n# TYPE enforcer_identity_rate_limiter_full_total counter\nenforcer_identity_rate_limiter_full_total {}",
            self.rate_limiter_full()
        );
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_audit_lines_suppressed_total Audit lines of rate-limited attestations left out (at most 10 a second are written).\n# TYPE enforcer_identity_audit_lines_suppressed_total counter\nenforcer_identity_audit_lines_suppressed_total {}",
            self.audit_lines_suppressed()
        );
        self.connections.render(
            "enforcer_identity_connections_total",
            "Connections to the attestation port by what became of them.",
            out,
        );
    }
}
