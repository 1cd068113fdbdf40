//! The attestation audit log: one JSON line on stdout per attestation, accepted or refused, beside
//! the flow log's lines (told apart by `"type":"attestation"`). A line carries the caller's
//! address, the outcome and its reason, and, once a token verified, the pod and service account
//! from its claims; never the token. Refusals for the rate limit are bounded (a flood of them
//! would otherwise flood the log): past [`DEFAULT_RATE_LIMITED_LINES`] a second they are counted
//! instead, and the next such line says how many were left out.

#[cfg(not(test))]
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::chrono::{DateTime, SecondsFormat};
use serde_json::{Value, json};

use super::super::{IdentityMetrics, Reason, VerifiedToken};

/// Audit lines a second for refusals by the rate limit; the rest are counted.
pub const DEFAULT_RATE_LIMITED_LINES: u32 = 10;

/// Where lines go (one call a line, without the newline).
pub type AuditSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Writes the audit lines.
pub struct AuditLog {
    sink: AuditSink,
    node: Option<String>,
    rate_limited_per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    lines: u32,
    /// Rate-limited lines left out since the last one written.
    suppressed: u64,
}

impl AuditLog {
    /// Lines to stdout, as the flow log's.
    pub fn stdout(node: Option<String>) -> AuditLog {
        AuditLog::new(
            Arc::new(|line: &str| {
                // Unit tests: through the test harness's capture.
                #[cfg(test)]
                println!("{line}");
                #[cfg(not(test))]
                {
                    let mut out = std::io::stdout().lock();
                    // One write a line, so lines of the flow log never interleave with it.
                    let _ = out.write_all(format!("{line}\n").as_bytes());
                    let _ = out.flush();
                }
            }),
            node,
        )
    }

    pub fn new(sink: AuditSink, node: Option<String>) -> AuditLog {
        AuditLog {
            sink,
            node,
            rate_limited_per_second: DEFAULT_RATE_LIMITED_LINES,
            window: Mutex::new(Window {
                start: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn with_rate_limited_lines(mut self, per_second: u32) -> AuditLog {
        self.rate_limited_per_second = per_second;
        self
    }

    /// An attestation that bound `source` to the token's identity.
    pub fn accepted(&self, source: IpAddr, token: &VerifiedToken) {
        (self.sink)(&self.line(source, None, Some(token), None).to_string());
    }

    /// A refused attestation. `token` is the verified token when the refusal came after
    /// verification (the binding check), so the line can say whose token it was.
    pub fn refused(
        &self,
        source: IpAddr,
        reason: Reason,
        token: Option<&VerifiedToken>,
        metrics: &IdentityMetrics,
    ) {
        let mut suppressed_before = None;
        if reason == Reason::RateLimited {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now.duration_since(w.start) >= Duration::from_secs(1) {
                w.start = now;
                w.lines = 0;
            }
            if w.lines >= self.rate_limited_per_second {
                w.suppressed += 1;
                metrics.audit_suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            w.lines += 1;
            suppressed_before = Some(std::mem::take(&mut w.suppressed)).filter(|n| *n > 0);
        }
        (self.sink)(
            &self
                .line(source, Some(reason), token, suppressed_before)
                .to_string(),
        );
    }

    fn line(
        &self,
        source: IpAddr,
        refused: Option<Reason>,
        token: Option<&VerifiedToken>,
        suppressed_before: Option<u64>,
    ) -> Value {
        let (outcome, reason, status) = match refused {
            None => ("accepted", "ok", 200),
            Some(r) => ("refused", r.as_str(), r.http_status()),
        };
        let id = token.map(|t| &t.identity);
        let mut line = json!({
            "type": "attestation",
            "time": rfc3339_now(),
            "node": self.node,
            "source": source.to_string(),
            "outcome": outcome,
            "reason": reason,
            "status": status,
            "pod": id.map(|i| json!({
                "namespace": i.namespace,
                "name": i.pod_name,
                "uid": i.pod_uid,
            })),
            "serviceAccount": id.map(|i| &i.service_account),
            "expiresAt": id.map(|i| i.expires_at),
            "jti": token.and_then(|t| t.jti.as_deref()),
        });
        if let Some(n) = suppressed_before {
            line["suppressedBefore"] = json!(n);
        }
        line
    }
}

/// Now in RFC 3339, UTC, to the millisecond.
fn rfc3339_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    DateTime::from_timestamp(since.as_secs() as i64, since.subsec_nanos())
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::VerifiedIdentity;

    fn capture() -> (AuditLog, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let log = AuditLog::new(
            Arc::new(move |s: &str| l.lock().unwrap().push(s.to_string())),
            Some("node-1".into()),
        );
        (log, lines)
    }

    #[test]
    fn rate_limited_lines_are_bounded_and_the_next_one_counts_the_rest() {
        let (log, lines) = capture();
        let log = log.with_rate_limited_lines(2);
        let metrics = IdentityMetrics::new();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for _ in 0..5 {
            log.refused(ip, Reason::RateLimited, None, &metrics);
        }
        // Other refusals are never left out.
        log.refused(ip, Reason::Malformed, None, &metrics);
        assert_eq!(lines.lock().unwrap().len(), 3);
        assert_eq!(metrics.audit_suppressed.load(Ordering::Relaxed), 3);
        log.window.lock().unwrap().start -= Duration::from_secs(2);
        log.refused(ip, Reason::RateLimited, None, &metrics);
        let last: Value = serde_json::from_str(lines.lock().unwrap().last().unwrap()).unwrap();
        assert_eq!(last["reason"], "rate-limited");
        assert_eq!(last["suppressedBefore"], 3);
    }

    #[test]
    fn a_line_has_the_claims_fields_and_an_rfc3339_time() {
        let (log, lines) = capture();
        let token = VerifiedToken {
            identity: VerifiedIdentity {
                namespace: "shop".into(),
                service_account: "checkout".into(),
                pod_name: "checkout-1".into(),
                pod_uid: "u-1".into(),
                expires_at: 1_900_000_000,
            },
            service_account_uid: "sa-1".into(),
            node_name: None,
            issued_at: 1_899_996_400,
            jti: Some("j-1".into()),
            kid: "k".into(),
        };
        log.accepted("10.0.0.5".parse().unwrap(), &token);
        let line: Value = serde_json::from_str(&lines.lock().unwrap()[0]).unwrap();
        assert_eq!(line["type"], "attestation");
        assert_eq!(line["node"], "node-1");
        assert_eq!(line["source"], "10.0.0.5");
        assert_eq!(line["outcome"], "accepted");
        assert_eq!(line["reason"], "ok");
        assert_eq!(line["status"], 200);
        assert_eq!(
            line["pod"],
            json!({"namespace": "shop", "name": "checkout-1", "uid": "u-1"})
        );
        assert_eq!(line["serviceAccount"], "checkout");
        assert_eq!(line["jti"], "j-1");
        let time = line["time"].as_str().unwrap();
        assert!(
            DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{time}"
        );
    }
}
