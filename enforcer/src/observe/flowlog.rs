//! The flow log: verdict events from the datapath as JSON lines on stdout, rate-limited so a
//! flood of drops cannot take the agent down; what the limit suppresses is counted.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_common::{DIR_INGRESS, FAMILY_V4, REASON_NAMES, VerdictEvent, reason};
use serde_json::json;

use enforcer_policy::explain::protocol_label;

use super::View;

/// Events logged and suppressed, for /metrics.
#[derive(Debug, Default)]
pub struct FlowLogStats {
    pub logged: AtomicU64,
    pub suppressed: AtomicU64,
}

impl FlowLogStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP enforcer_flow_events_total Verdict events by outcome in the flow log\n# TYPE enforcer_flow_events_total counter\nenforcer_flow_events_total{{outcome=\"logged\"}} {}\nenforcer_flow_events_total{{outcome=\"rate-limited\"}} {}",
            self.logged.load(Ordering::Relaxed),
            self.suppressed.load(Ordering::Relaxed)
        );
    }
}

/// Turns events into log lines, at most `per_second` a second.
pub struct FlowLog {
    pub view: Arc<Mutex<View>>,
    pub stats: Arc<FlowLogStats>,
    pub per_second: u32,
    window: Instant,
    in_window: u32,
}

impl FlowLog {
    pub fn new(view: Arc<Mutex<View>>, stats: Arc<FlowLogStats>, per_second: u32) -> Self {
        Self {
            view,
            stats,
            per_second,
            window: Instant::now(),
            in_window: 0,
        }
    }

    /// Logs a batch of events to stdout.
    pub fn log(&mut self, events: &[VerdictEvent]) {
        let mut out = std::io::stdout().lock();
        for e in events {
            if self.window.elapsed() >= Duration::from_secs(1) {
                self.window = Instant::now();
                self.in_window = 0;
            }
            if self.in_window >= self.per_second {
                self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.in_window += 1;
            self.stats.logged.fetch_add(1, Ordering::Relaxed);
            let line = self.line(e);
            let _ = writeln!(out, "{line}");
        }
    }

    /// One event as a JSON object.
    pub fn line(&self, e: &VerdictEvent) -> serde_json::Value {
        let (src, dst) = addrs(e);
        let view = self.view.lock().ok();
        let name = |ip: IpAddr| view.as_ref().and_then(|v| v.pod_name(ip));
        // Who each end is: verified now, or only as its pod object claims (`verified: false`);
        // null for an address that is no pod's.
        let identity = |ip: IpAddr| {
            view.as_ref().and_then(|v| v.identity(ip)).map(|id| {
                json!({
                    "namespace": id.namespace,
                    "serviceAccount": id.service_account,
                    "verified": id.verified,
                })
            })
        };
        let rule = view.as_ref().and_then(|v| {
            if e.reason == reason::ALLOW_AUDIT {
                // No rule decided a would-drop: the audit policies isolating that direction did.
                v.state
                    .audited
                    .get(&(e.endpoint, e.direction))
                    .map(|p| p.join(", "))
            } else {
                v.state.rules.get(&e.rule).map(ToString::to_string)
            }
        });
        let reason = REASON_NAMES
            .get(e.reason as usize)
            .copied()
            .unwrap_or("unknown");
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        json!({
            "time": time,
            "verdict": enforcer_common::verdict_name(e.reason),
            "reason": reason,
            "direction": if e.direction == DIR_INGRESS { "ingress" } else { "egress" },
            "src": src.to_string(),
            "src_pod": name(src),
            "src_identity": identity(src),
            "dst": dst.to_string(),
            "dst_pod": name(dst),
            "dst_identity": identity(dst),
            "protocol": protocol_label(e.protocol),
            "sport": e.sport,
            "dport": e.dport,
            "policy": rule,
            "peer_identity": e.peer_identity,
            "bytes": e.bytes,
        })
    }
}

fn addrs(e: &VerdictEvent) -> (IpAddr, IpAddr) {
    if e.family == FAMILY_V4 {
        let a = |b: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        (a(&e.src), a(&e.dst))
    } else {
        (
            IpAddr::V6(Ipv6Addr::from(e.src)),
            IpAddr::V6(Ipv6Addr::from(e.dst)),
        )
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{DIR_EGRESS, PROTO_TCP};
    use enforcer_policy::{
        compile::{Allocations, CompileOptions, compile},
        model::{Cluster, shared},
    };
    use k8s_openapi::api::core::v1::Pod;

    use super::{super::VerifiedPods, *};

    /// A running pod `ns/name` at `ip` on `node`, running as `sa` (none: unset).
    fn pod(ns: &str, name: &str, ip: &str, node: &str, sa: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    fn event(src: [u8; 4], dst: [u8; 4]) -> VerdictEvent {
        let mut e = VerdictEvent {
            family: FAMILY_V4,
            protocol: PROTO_TCP,
            direction: DIR_EGRESS,
            reason: reason::DROP_POLICY,
            sport: 4000,
            dport: 80,
            ..Default::default()
        };
        e.src[..4].copy_from_slice(&src);
        e.dst[..4].copy_from_slice(&dst);
        e
    }

    /// The view of a node-a agent: x/a local and verified as x/frontend, y/b on node-b
    /// claiming service account `backend` and not verified, 10.0.0.9 no pod's.
    fn view() -> View {
        let cluster = Cluster {
            pods: shared([
                pod("x", "a", "10.0.0.1", "node-a", Some("frontend")),
                pod("y", "b", "10.0.1.2", "node-b", Some("backend")),
                pod("y", "c", "10.0.1.3", "node-b", None),
            ]),
            // The reserved labels as the identity module gives them: the view reads the same
            // keys.
            verified: [(
                "10.0.0.1".parse().unwrap(),
                crate::identity::identity_labels(&crate::identity::VerifiedIdentity {
                    namespace: "x".into(),
                    service_account: "frontend".into(),
                    pod_name: "a".into(),
                    pod_uid: "uid-a".into(),
                    expires_at: u64::MAX,
                }),
            )]
            .into(),
            ..Cluster::default()
        };
        let opts = CompileOptions {
            node_name: Some("node-a".into()),
            ..CompileOptions::default()
        };
        let state = Arc::new(compile(&cluster, &opts, &mut Allocations::new()).state);
        View::build(&state, &cluster, &[])
    }

    #[test]
    fn each_end_is_named_with_its_pod_and_identity() {
        let log = FlowLog::new(
            Arc::new(Mutex::new(view())),
            Arc::new(FlowLogStats::default()),
            10,
        );
        let l = log.line(&event([10, 0, 0, 1], [10, 0, 1, 2]));
        assert_eq!(l["src_pod"], "x/a");
        assert_eq!(
            l["src_identity"],
            json!({"namespace": "x", "serviceAccount": "frontend", "verified": true})
        );
        assert_eq!(l["dst_pod"], "y/b", "a remote pod is named too");
        assert_eq!(
            l["dst_identity"],
            json!({"namespace": "y", "serviceAccount": "backend", "verified": false})
        );
        let l = log.line(&event([10, 0, 1, 3], [10, 0, 0, 9]));
        assert_eq!(
            l["src_identity"],
            json!({"namespace": "y", "serviceAccount": "default", "verified": false}),
            "no serviceAccountName: the default account, unverified"
        );
        assert_eq!(l["dst_pod"], serde_json::Value::Null);
        assert_eq!(
            l["dst_identity"],
            serde_json::Value::Null,
            "no pod's address"
        );
    }

    #[test]
    fn the_view_names_local_verified_pods_and_counts_remote_ones() {
        let mut v = view();
        let want = VerifiedPods {
            local: [("x".into(), "a".into(), "frontend".into())].into(),
            remote: 0,
        };
        assert_eq!(v.verified_pods(), want);
        v.verified.insert(
            "10.0.1.2".parse().unwrap(),
            super::super::Verified {
                namespace: "y".into(),
                service_account: "backend".into(),
            },
        );
        assert_eq!(v.verified_pods().remote, 1);
        assert_eq!(v.verified_pods().local, want.local);
    }

    #[test]
    fn a_drop_becomes_a_json_line_and_floods_are_limited() {
        let view = Arc::new(Mutex::new(view()));
        let stats = Arc::new(FlowLogStats::default());
        let mut log = FlowLog::new(view, stats.clone(), 2);
        let e = event([10, 0, 0, 1], [10, 0, 0, 2]);
        let l = log.line(&e);
        assert_eq!(l["verdict"], "dropped");
        assert_eq!(l["reason"], "policy-denied");
        assert_eq!(l["src_pod"], "x/a");
        assert_eq!(l["dst"], "10.0.0.2");
        assert_eq!(l["protocol"], "TCP");
        log.log(&[e, e, e, e]);
        assert_eq!(stats.logged.load(Ordering::Relaxed), 2);
        assert_eq!(stats.suppressed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_would_drop_names_the_audit_policies_that_isolate() {
        let mut v = view();
        let mut state = (*v.state).clone();
        let ep = state.endpoints.values().next().unwrap().info.id;
        state.audited.insert(
            (ep, DIR_EGRESS),
            vec!["x/lockdown".into(), "x/other".into()],
        );
        v.state = Arc::new(state);
        let log = FlowLog::new(
            Arc::new(Mutex::new(v)),
            Arc::new(FlowLogStats::default()),
            10,
        );
        let mut e = event([10, 0, 0, 1], [10, 0, 1, 2]);
        e.endpoint = ep;
        e.reason = reason::ALLOW_AUDIT;
        let l = log.line(&e);
        assert_eq!(l["verdict"], "would-drop");
        assert_eq!(l["reason"], "audit");
        assert_eq!(l["policy"], "x/lockdown, x/other");
    }
}
