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

use enforcer_common::{DIR_INGRESS, FAMILY_V4, REASON_NAMES, VerdictEvent};
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
        let name = |ip: IpAddr| view.as_ref().and_then(|v| v.pods_by_ip.get(&ip).cloned());
        let rule = view
            .as_ref()
            .and_then(|v| v.state.rules.get(&e.rule).map(ToString::to_string));
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
            "verdict": if enforcer_common::is_drop_reason(e.reason) { "dropped" } else { "allowed" },
            "reason": reason,
            "direction": if e.direction == DIR_INGRESS { "ingress" } else { "egress" },
            "src": src.to_string(),
            "src_pod": name(src),
            "dst": dst.to_string(),
            "dst_pod": name(dst),
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
    use enforcer_common::{DIR_EGRESS, PROTO_TCP, reason};

    use super::*;

    #[test]
    fn a_drop_becomes_a_json_line_and_floods_are_limited() {
        let view = Arc::new(Mutex::new(View::default()));
        view.lock()
            .unwrap()
            .pods_by_ip
            .insert("10.0.0.1".parse().unwrap(), "x/a".into());
        let stats = Arc::new(FlowLogStats::default());
        let mut log = FlowLog::new(view, stats.clone(), 2);
        let mut e = VerdictEvent {
            family: FAMILY_V4,
            protocol: PROTO_TCP,
            direction: DIR_EGRESS,
            reason: reason::DROP_POLICY,
            sport: 4000,
            dport: 80,
            ..Default::default()
        };
        e.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        e.dst[..4].copy_from_slice(&[10, 0, 0, 2]);
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
}
