//! The flow log: verdict events from the datapath as JSON lines (one [`FlowRecord`] each) on
//! stdout or in a file, rate-limited so a flood of drops cannot take the agent down; what the
//! limit suppresses is counted. A file is rotated by size with a cap on the files kept, so a
//! node's disk cannot fill and a shipper tailing the file (Fluent Bit, Vector, Promtail) follows
//! the renames.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_common::{DIR_INGRESS, FAMILY_V4, REASON_NAMES, VerdictEvent, reason};
use serde::Serialize;

use enforcer_policy::{explain::protocol_label, model::pod_ref};

use super::View;

/// Where flow log lines go (`--flow-log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogTarget {
    /// The agent's stdout (its own logs go to stderr), for the container runtime's log.
    Stdout,
    /// Appended to this file, rotated by size.
    File(PathBuf),
    /// Not written (the events are still read and counted on `/metrics`).
    Off,
}

impl FromStr for FlowLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(format!("`{s}`: expected stdout, off or file:PATH")),
            },
        }
    }
}

/// Size-based rotation of a flow log file: past `max_bytes`, `PATH` becomes `PATH.1` (`PATH.1`
/// becomes `PATH.2`, and so on; the oldest beyond `keep` is removed) and a new `PATH` is begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    /// Rotated files kept besides the current one (0: the file is truncated when full).
    pub keep: u32,
}

/// An open flow log file and how much it holds.
struct FileSink {
    path: PathBuf,
    file: BufWriter<File>,
    written: u64,
    rotation: Rotation,
}

impl FileSink {
    fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
            written,
            rotation,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + line.len() as u64 > self.rotation.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let keep = self.rotation.keep;
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(keep));
            for n in (1..keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        *self = Self::open(&self.path, self.rotation)?;
        Ok(())
    }
}

enum Sink {
    Stdout,
    File(FileSink),
    Off,
}

/// Events logged and suppressed, for /metrics.
#[derive(Debug, Default)]
pub struct FlowLogStats {
    pub logged: AtomicU64,
    pub suppressed: AtomicU64,
    /// Lines that could not be written (a full disk, a removed folder).
    pub failed: AtomicU64,
}

impl FlowLogStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP enforcer_flow_events_total Verdict events by outcome in the flow log\n# TYPE enforcer_flow_events_total counter\nenforcer_flow_events_total{{outcome=\"logged\"}} {}\nenforcer_flow_events_total{{outcome=\"rate-limited\"}} {}\nenforcer_flow_events_total{{outcome=\"write-failed\"}} {}",
            self.logged.load(Ordering::Relaxed),
            self.suppressed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        );
    }
}

/// One end of a flow as the flow log names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityField {
    pub namespace: String,
    #[serde(rename = "serviceAccount")]
    pub service_account: String,
    pub verified: bool,
}

/// One line of the flow log. Each end is named by address and port, by its pod (`src_pod`:
/// `namespace/name`, and apart in `src_namespace` and `src_pod_name` for log queries) on this
/// node or another, and by identity; `null` where the address is no pod's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    /// When the line was written, RFC 3339 in UTC.
    pub time: String,
    /// The node whose agent saw the packet (`--node-name`).
    pub node: Option<String>,
    /// `dropped` or `allowed` (allowed new flows are logged with `--log-allowed`).
    pub verdict: String,
    /// Why (`policy-denied`, `spoofed`, `flow-limit`, ...; as on `/metrics`).
    pub reason: String,
    /// `ingress` (into a pod of this node) or `egress` (out of one).
    pub direction: &'static str,
    pub src: String,
    pub src_namespace: Option<String>,
    pub src_pod_name: Option<String>,
    pub src_pod: Option<String>,
    pub src_identity: Option<IdentityField>,
    pub dst: String,
    pub dst_namespace: Option<String>,
    pub dst_pod_name: Option<String>,
    pub dst_pod: Option<String>,
    pub dst_identity: Option<IdentityField>,
    pub protocol: String,
    pub sport: u16,
    pub dport: u16,
    /// The policy and rule that allowed the flow (`null` for a drop: no rule matched).
    pub policy: Option<String>,
    /// The datapath's number for the peer (its identity in the maps).
    pub peer_identity: u32,
    pub bytes: u32,
}

/// Turns events into log lines, at most `per_second` a second.
pub struct FlowLog {
    pub view: Arc<Mutex<View>>,
    pub stats: Arc<FlowLogStats>,
    pub per_second: u32,
    /// This node's name, on every line.
    pub node: Option<String>,
    sink: Sink,
    window: Instant,
    in_window: u32,
}

impl FlowLog {
    /// A flow log on stdout.
    pub fn new(view: Arc<Mutex<View>>, stats: Arc<FlowLogStats>, per_second: u32) -> Self {
        Self {
            view,
            stats,
            per_second,
            node: None,
            sink: Sink::Stdout,
            window: Instant::now(),
            in_window: 0,
        }
    }

    /// Writes to `target` instead (a file is opened, or created with its folder, now).
    pub fn to(mut self, target: &FlowLogTarget, rotation: Rotation) -> std::io::Result<Self> {
        self.sink = match target {
            FlowLogTarget::Stdout => Sink::Stdout,
            FlowLogTarget::Off => Sink::Off,
            FlowLogTarget::File(path) => Sink::File(FileSink::open(path, rotation)?),
        };
        Ok(self)
    }

    /// Names `node` on every line.
    pub fn on_node(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// Logs a batch of events.
    pub fn log(&mut self, events: &[VerdictEvent]) {
        if matches!(self.sink, Sink::Off) {
            return;
        }
        let mut buf = Vec::new();
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
            buf.clear();
            if serde_json::to_writer(&mut buf, &self.record(e)).is_err() {
                continue;
            }
            buf.push(b'\n');
            let written = match &mut self.sink {
                Sink::Stdout => std::io::stdout().lock().write_all(&buf),
                Sink::File(f) => f.write_line(&buf),
                Sink::Off => Ok(()),
            };
            match written {
                Ok(()) => self.stats.logged.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    if self.stats.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        log::error!("writing the flow log: {e} (counted from now on)");
                    }
                    0
                }
            };
        }
        let flushed = match &mut self.sink {
            Sink::Stdout => std::io::stdout().lock().flush(),
            Sink::File(f) => f.file.flush(),
            Sink::Off => Ok(()),
        };
        if let Err(e) = flushed
            && self.stats.failed.fetch_add(1, Ordering::Relaxed) == 0
        {
            log::error!("writing the flow log: {e} (counted from now on)");
        }
    }

    /// One event as a record.
    pub fn record(&self, e: &VerdictEvent) -> FlowRecord {
        let (src, dst) = addrs(e);
        let view = self.view.lock().ok();
        let pod = |ip: IpAddr| {
            view.as_ref().and_then(|v| v.pods_by_ip.get(&ip)).map(|p| {
                let r = pod_ref(p);
                (r.namespace, r.name)
            })
        };
        // Who each end is: verified now, or only as its pod object claims (`verified: false`);
        // null for an address that is no pod's.
        let identity = |ip: IpAddr| {
            view.as_ref()
                .and_then(|v| v.identity(ip))
                .map(|id| IdentityField {
                    namespace: id.namespace.to_string(),
                    service_account: id.service_account.to_string(),
                    verified: id.verified,
                })
        };
        let policy = view.as_ref().and_then(|v| {
            if e.reason == reason::ALLOW_AUDIT {
                // No rule decided a would-drop: the audit policies isolating that direction did.
                v.state
                    .audited
                    .get(&(e.endpoint, e.direction))
                    .map(|p| p.join(", "))
            } else {
                v.state.rule(e.rule).map(ToString::to_string)
            }
        });
        let reason = REASON_NAMES
            .get(e.reason as usize)
            .copied()
            .unwrap_or("unknown");
        let (src_ns, src_name) = pod(src).unzip();
        let (dst_ns, dst_name) = pod(dst).unzip();
        let joined = |ns: &Option<String>, name: &Option<String>| {
            ns.as_ref()
                .zip(name.as_ref())
                .map(|(n, p)| format!("{n}/{p}"))
        };
        FlowRecord {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            node: self.node.clone(),
            verdict: enforcer_common::verdict_name(e.reason).into(),
            reason: reason.into(),
            direction: if e.direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            src: src.to_string(),
            src_pod: joined(&src_ns, &src_name),
            src_namespace: src_ns,
            src_pod_name: src_name,
            src_identity: identity(src),
            dst: dst.to_string(),
            dst_pod: joined(&dst_ns, &dst_name),
            dst_namespace: dst_ns,
            dst_pod_name: dst_name,
            dst_identity: identity(dst),
            protocol: protocol_label(e.protocol),
            sport: e.sport,
            dport: e.dport,
            policy,
            peer_identity: e.peer_identity,
            bytes: e.bytes,
        }
    }

    /// One event as a JSON object (the record, serialized).
    pub fn line(&self, e: &VerdictEvent) -> serde_json::Value {
        serde_json::to_value(self.record(e)).unwrap_or_default()
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
    use serde_json::json;

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
            (&l["src_namespace"], &l["src_pod_name"]),
            (&json!("x"), &json!("a"))
        );
        assert_eq!(
            (&l["dst_namespace"], &l["dst_pod_name"]),
            (&json!("y"), &json!("b"))
        );
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
        assert_eq!(l["dst_namespace"], serde_json::Value::Null);
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.log");
        let rotation = Rotation {
            max_bytes: 1 << 20,
            keep: 1,
        };
        let mut log = FlowLog::new(view, stats.clone(), 2)
            .to(&FlowLogTarget::File(path.clone()), rotation)
            .unwrap()
            .on_node(Some("node-a".into()));
        let e = event([10, 0, 0, 1], [10, 0, 0, 2]);
        let l = log.line(&e);
        assert_eq!(l["node"], "node-a");
        let time = l["time"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "RFC 3339 in UTC: {time}"
        );
        assert_eq!(l["verdict"], "dropped");
        assert_eq!(l["reason"], "policy-denied");
        assert_eq!(l["src_pod"], "x/a");
        assert_eq!(l["dst"], "10.0.0.2");
        assert_eq!(l["protocol"], "TCP");
        log.log(&[e, e, e, e]);
        assert_eq!(stats.logged.load(Ordering::Relaxed), 2);
        assert_eq!(stats.suppressed.load(Ordering::Relaxed), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "one JSON object a line:\n{text}");
        assert!(lines.iter().all(|l| l["verdict"] == "dropped"));
    }

    #[test]
    fn a_full_flow_log_file_is_rotated_keeping_at_most_the_files_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/flows.log");
        let line_len = {
            let log = FlowLog::new(
                Arc::new(Mutex::new(view())),
                Arc::new(FlowLogStats::default()),
                1000,
            );
            serde_json::to_vec(&log.record(&event([10, 0, 0, 1], [10, 0, 0, 2])))
                .unwrap()
                .len() as u64
                + 1
        };
        // Three lines fit in a file, barely: the fourth begins a new one.
        let rotation = Rotation {
            max_bytes: 3 * line_len + 10,
            keep: 2,
        };
        let stats = Arc::new(FlowLogStats::default());
        let mut log = FlowLog::new(Arc::new(Mutex::new(view())), stats.clone(), 1000)
            .to(&FlowLogTarget::File(path.clone()), rotation)
            .unwrap();
        let e = event([10, 0, 0, 1], [10, 0, 0, 2]);
        let count = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        log.log(&[e; 4]);
        assert_eq!(
            (count(&path), count(&dir.path().join("sub/flows.log.1"))),
            (1, 3)
        );
        log.log(&[e; 9]);
        assert_eq!(
            (
                count(&path),
                count(&dir.path().join("sub/flows.log.1")),
                count(&dir.path().join("sub/flows.log.2"))
            ),
            (1, 3, 3)
        );
        assert!(
            !dir.path().join("sub/flows.log.3").exists(),
            "the oldest beyond --flow-log-keep is removed"
        );
        assert_eq!(stats.logged.load(Ordering::Relaxed), 13);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
        // A restarted agent appends to the current file and keeps its size in mind.
        let mut log = FlowLog::new(Arc::new(Mutex::new(view())), stats, 1000)
            .to(&FlowLogTarget::File(path.clone()), rotation)
            .unwrap();
        log.log(&[e; 2]);
        assert_eq!(count(&path), 3);
    }

    #[test]
    fn flow_log_targets_parse() {
        assert_eq!("stdout".parse(), Ok(FlowLogTarget::Stdout));
        assert_eq!("off".parse(), Ok(FlowLogTarget::Off));
        assert_eq!(
            "file:/var/log/enforcer/flows.log".parse(),
            Ok(FlowLogTarget::File("/var/log/enforcer/flows.log".into()))
        );
        for bad in ["file:", "stderr", "/var/log/x"] {
            assert!(bad.parse::<FlowLogTarget>().is_err(), "{bad} accepted");
        }
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

    #[test]
    fn a_rule_denied_drop_names_the_deny_rule() {
        let mut v = view();
        let mut state = (*v.state).clone();
        let ep = state.endpoints.values().next().unwrap().info.id;
        state.rules.insert(
            7,
            enforcer_policy::state::RuleRef::Tier {
                tier: enforcer_policy::tiers::Tier::Admin,
                policy: "AdminNetworkPolicy/lockdown".into(),
                direction: DIR_EGRESS,
                rule: "no-db".into(),
                index: 0,
                action: "Deny",
            },
        );
        v.state = Arc::new(state);
        let log = FlowLog::new(
            Arc::new(Mutex::new(v)),
            Arc::new(FlowLogStats::default()),
            10,
        );
        let mut e = event([10, 0, 0, 1], [10, 0, 1, 2]);
        e.endpoint = ep;
        e.reason = reason::DROP_DENY_RULE;
        let want = "AdminNetworkPolicy/lockdown egress[0] \"no-db\" (Admin, Deny)";
        // The programs report the rule id without the deny bit; one carrying it names the same.
        for rule in [7, 7 | enforcer_common::RULE_DENY] {
            e.rule = rule;
            let l = log.line(&e);
            assert_eq!(l["verdict"], "dropped");
            assert_eq!(l["reason"], "rule-denied");
            assert_eq!(l["policy"], want);
        }
    }
}
