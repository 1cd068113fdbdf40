//! Cluster scale: the real agent on a node with no pods of its own, every pod of a large
//! synthetic cluster ([`enforcer_testkit::scale`]) a peer, in standalone mode (a manifests
//! folder) and in cluster mode (the agent's kube watches against [`ApiServer`] on loopback).
//! Per size: start → ready, RSS after ready and peak, event → programmed per kind of change,
//! and sustained churn (the agent's CPU and whether its lag grows).

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use enforcer_common::PeerInfo;
use enforcer_testkit::{
    netns::{AgentProcess, BpfMount, Testbed, in_netns},
    scale::{Cluster, MEASURED_NODE, Pod, Spec, namespace_name},
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::apiserver::ApiServer;

/// Agent flags every point adds to the defaults (none: the default peers maps hold a 100k-pod
/// cluster and grow past it).
pub const AGENT_FLAGS: &[&str] = &[];

/// The targets (issue: cluster scale).
pub const RSS_TARGET_MIB: f64 = 256.0;
pub const EVENT_P99_TARGET_MS: f64 = 100.0;
pub const READY_TARGET_SECS: f64 = 10.0;
pub const CHURN_CPU_TARGET_CORES: f64 = 1.0;

/// Pods of the generated cluster that sit in files of their own in standalone mode, so that
/// churn can remove them one file at a time.
const OWN_FILES: usize = 1_000;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Mode {
    /// `enforcer run --manifests DIR`.
    Standalone,
    /// `enforcer run` with a kubeconfig naming the stand-in API server.
    Kube,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Kube => "kube watch",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// (pods, policies).
    pub points: Vec<(usize, usize)>,
    pub modes: Vec<Mode>,
    /// Rounds of single events (add, relabel, re-address, remove, policy) at most per point…
    pub max_rounds: usize,
    /// …and no new round after this long (one round always runs).
    pub event_budget_secs: f64,
    /// A single event not programmed after this long counts as a timeout.
    pub event_timeout_secs: f64,
    /// Churn: pod events per second, for this long.
    pub churn_rate: f64,
    pub churn_secs: f64,
    /// Start → ready beyond this fails the point.
    pub ready_timeout_secs: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Events {
    pub kind: String,
    pub ms: Vec<f64>,
    pub timeouts: usize,
}

impl Events {
    pub fn p(&self, q: f64) -> f64 {
        crate::net::percentile(&self.ms, q)
    }

    pub fn pass(&self) -> bool {
        !self.ms.is_empty() && self.timeouts == 0 && self.p(99.0) <= EVENT_P99_TARGET_MS
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Churn {
    pub rate: f64,
    pub secs: f64,
    pub sent: usize,
    /// The agent's CPU time over the churn, in cores.
    pub cpu_cores: f64,
    /// (seconds since the churn started, ms since the oldest pod added and not yet in the
    /// pinned peers map was written), every 50 ms.
    pub lag_ms: Vec<(f64, f64)>,
    pub first_quarter_ms: f64,
    pub last_quarter_ms: f64,
    /// After the last event: until every added pod was in the peers map (`None`: not within
    /// the event timeout).
    pub drain_ms: Option<f64>,
    pub growing: bool,
}

impl Churn {
    pub fn pass(&self) -> bool {
        self.cpu_cores < CHURN_CPU_TARGET_CORES && !self.growing && self.drain_ms.is_some()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub mode: Mode,
    pub pods: usize,
    pub policies: usize,
    pub ready_secs: Option<f64>,
    /// Start → `/readyz` answering at all (programs loaded, health served), within ready.
    pub health_secs: Option<f64>,
    /// The agent's own histograms over the single events (from `/metrics`): mean ms per
    /// compile and per reconcile (compile + program).
    pub compile_mean_ms: f64,
    pub reconcile_mean_ms: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// VmHWM when the point ended (events and churn included).
    pub hwm_end_kib: u64,
    pub events: Vec<Events>,
    pub churn: Option<Churn>,
    pub error: Option<String>,
}

impl Point {
    /// Nothing measured yet.
    fn new(mode: Mode, pods: usize, policies: usize) -> Self {
        Self {
            mode,
            pods,
            policies,
            ready_secs: None,
            health_secs: None,
            compile_mean_ms: f64::NAN,
            reconcile_mean_ms: f64::NAN,
            rss_kib: 0,
            hwm_kib: 0,
            hwm_end_kib: 0,
            events: Vec::new(),
            churn: None,
            error: None,
        }
    }

    pub fn rss_pass(&self) -> bool {
        self.hwm_kib > 0 && (self.hwm_end_kib.max(self.hwm_kib) as f64 / 1024.0) <= RSS_TARGET_MIB
    }

    pub fn ready_pass(&self) -> bool {
        self.ready_secs.is_some_and(|r| r <= READY_TARGET_SECS)
    }

    /// The worst event p99 over the kinds (timeouts count as infinite).
    pub fn worst_p99(&self) -> f64 {
        self.events
            .iter()
            .map(|e| {
                if e.timeouts > 0 {
                    f64::INFINITY
                } else {
                    e.p(99.0)
                }
            })
            .fold(f64::NAN, f64::max)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub settings: Settings,
    pub points: Vec<Point>,
}

/// How the bench changes the cluster: files in the folder, or watch events.
trait Changes {
    fn put_pod(&self, pod: &Pod) -> Result<()>;
    fn delete_pod(&self, pod: &Pod) -> Result<()>;
    fn put_policy(&self, policy: &Value) -> Result<()>;
    fn delete_policy(&self, policy: &Value) -> Result<()>;
}

struct Folder {
    dir: PathBuf,
    /// Files are written here, then renamed into `dir`: the agent sees each change once, whole.
    stage: PathBuf,
}

impl Folder {
    fn put(&self, name: &str, v: &Value) -> Result<()> {
        let mut text = String::from("---\n");
        enforcer_testkit::scale::yaml(v, 0, &mut text);
        let tmp = self.stage.join(name);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }
}

fn policy_file(p: &Value) -> String {
    format!(
        "60-policy-{}-{}.yaml",
        p["metadata"]["namespace"].as_str().unwrap_or_default(),
        p["metadata"]["name"].as_str().unwrap_or_default()
    )
}

impl Changes for Folder {
    fn put_pod(&self, pod: &Pod) -> Result<()> {
        self.put(&pod.file_name(), &pod.object())
    }
    fn delete_pod(&self, pod: &Pod) -> Result<()> {
        Ok(std::fs::remove_file(self.dir.join(pod.file_name()))?)
    }
    fn put_policy(&self, policy: &Value) -> Result<()> {
        self.put(&policy_file(policy), policy)
    }
    fn delete_policy(&self, policy: &Value) -> Result<()> {
        Ok(std::fs::remove_file(self.dir.join(policy_file(policy)))?)
    }
}

/// Watch events; `known` tells ADDED from MODIFIED.
struct Api {
    server: ApiServer,
    known: Mutex<std::collections::BTreeSet<String>>,
}

impl Api {
    fn put(&self, v: Value) -> Result<()> {
        let id = format!(
            "{}/{}/{}",
            v["kind"].as_str().unwrap_or_default(),
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        );
        let added = self.known.lock().expect("lock").insert(id);
        self.server
            .change(if added { "ADDED" } else { "MODIFIED" }, v)
    }

    fn delete(&self, v: Value) -> Result<()> {
        let id = format!(
            "{}/{}/{}",
            v["kind"].as_str().unwrap_or_default(),
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        );
        self.known.lock().expect("lock").remove(&id);
        self.server.change("DELETED", v)
    }
}

impl Changes for Api {
    fn put_pod(&self, pod: &Pod) -> Result<()> {
        self.put(pod.object())
    }
    fn delete_pod(&self, pod: &Pod) -> Result<()> {
        self.delete(pod.object())
    }
    fn put_policy(&self, policy: &Value) -> Result<()> {
        self.put(policy.clone())
    }
    fn delete_policy(&self, policy: &Value) -> Result<()> {
        self.delete(policy.clone())
    }
}

/// The agent's pinned `PEERS_V4`, read with the project's own map types.
struct Peers(HashMap<MapData, [u8; 4], PeerInfo>);

impl Peers {
    fn open(pin: &Path) -> Result<Self> {
        let path = enforcer::datapath::versioned_root(pin)
            .join("maps")
            .join(enforcer_common::MAP_PEERS_V4);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(HashMap::try_from(Map::HashMap(data))?))
    }

    fn get(&self, a: Ipv4Addr) -> Option<PeerInfo> {
        self.0.get(&a.octets(), 0).ok()
    }
}

/// `/readyz`: (ready, programmed generation).
fn readyz(a: &AgentProcess) -> Option<(bool, u64)> {
    let (code, body) = a.get("/readyz").ok()?;
    let generation = body.split("generation=").nth(1)?.trim().parse().ok()?;
    Some((code == 200, generation))
}

/// The agent's compile and reconcile histograms: [compile sum s, count, reconcile sum s, count].
fn histograms(a: &AgentProcess) -> [f64; 4] {
    let text = a.get("/metrics").map(|(_, t)| t).unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    [
        value("enforcer_compile_seconds_sum"),
        value("enforcer_compile_seconds_count"),
        value("enforcer_reconcile_seconds_sum"),
        value("enforcer_reconcile_seconds_count"),
    ]
}

fn proc_status_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The process's user + system CPU time, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15: 11 and 12 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// A policy the bench adds and removes (its change touches a namespace's policies only).
fn toggle_policy() -> Value {
    let ns = namespace_name(0);
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": "scale-toggle", "uid": "uid-scale-toggle"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "app-02"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "app-01"}}}],
                "ports": [{"protocol": "TCP", "port": 9999}],
            }],
        },
    })
}

struct Run<'a> {
    agent: &'a AgentProcess,
    peers: &'a Peers,
    timeout: Duration,
}

impl Run<'_> {
    fn generation(&self) -> Result<u64> {
        let end = Instant::now() + self.timeout;
        while Instant::now() < end {
            if let Some((true, g)) = readyz(self.agent) {
                return Ok(g);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the agent was not ready")
    }

    /// Makes `change`, then waits until the agent has programmed a newer input and `done`
    /// holds of the pinned peers map: ms, or `None` on timeout.
    fn timed(
        &self,
        change: impl FnOnce() -> Result<()>,
        done: impl Fn(&Peers) -> bool,
    ) -> Result<Option<f64>> {
        let before = self.generation()?;
        let t = Instant::now();
        change()?;
        while t.elapsed() < self.timeout {
            if readyz(self.agent).is_some_and(|(ready, g)| ready && g > before) && done(self.peers)
            {
                return Ok(Some(t.elapsed().as_secs_f64() * 1e3));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(None)
    }
}

fn record(events: &mut [Events], kind: &str, r: Option<f64>) {
    let e = events
        .iter_mut()
        .find(|e| e.kind == kind)
        .expect("a known kind");
    match r {
        Some(ms) => e.ms.push(ms),
        None => e.timeouts += 1,
    }
}

/// Rounds of single events: a pod added, relabelled, re-addressed and removed, and a policy
/// added or removed, each waited for before the next.
fn single_events(
    s: &Settings,
    cluster: &Cluster,
    changes: &dyn Changes,
    run: &Run<'_>,
) -> Result<Vec<Events>> {
    let mut events: Vec<Events> = [
        "pod added",
        "pod relabelled",
        "pod re-addressed",
        "pod removed",
        "policy added / removed",
    ]
    .iter()
    .map(|k| Events {
        kind: (*k).into(),
        ms: Vec::new(),
        timeouts: 0,
    })
    .collect();
    let policy = toggle_policy();
    let started = Instant::now();
    for r in 0..s.max_rounds {
        if r > 0 && started.elapsed().as_secs_f64() > s.event_budget_secs {
            break;
        }
        let pod = cluster.extra_pod(r);
        let v4 = pod.v4;
        let added = run.timed(|| changes.put_pod(&pod), |p| p.get(v4).is_some())?;
        record(&mut events, "pod added", added);
        let id = run.peers.get(v4).map(|i| i.identity);
        let relabelled = Pod {
            app: pod.app + 1,
            canary: !pod.canary,
            ..pod.clone()
        };
        let r2 = run.timed(|| changes.put_pod(&relabelled), |_| true)?;
        record(&mut events, "pod relabelled", r2);
        if id.is_some() && run.peers.get(v4).map(|i| i.identity) == id {
            eprintln!("    note: relabelled pod {v4} kept identity {id:?}");
        }
        let moved = Pod {
            v4: cluster.extra_pod(1_000_000 + r).v4,
            ..relabelled.clone()
        };
        let new = moved.v4;
        let r3 = run.timed(
            || changes.put_pod(&moved),
            |p| p.get(new).is_some() && p.get(v4).is_none(),
        )?;
        record(&mut events, "pod re-addressed", r3);
        let r4 = run.timed(|| changes.delete_pod(&moved), |p| p.get(new).is_none())?;
        record(&mut events, "pod removed", r4);
        let r5 = if r % 2 == 0 {
            run.timed(|| changes.put_policy(&policy), |_| true)?
        } else {
            run.timed(|| changes.delete_policy(&policy), |_| true)?
        };
        record(&mut events, "policy added / removed", r5);
    }
    Ok(events)
}

/// `rate` pod events a second for `secs`: even events add a new pod, odd ones remove a pod of
/// the generated cluster. A monitor reads the pinned peers map every 50 ms: the lag is the age
/// of the oldest added pod not in it yet.
fn churn(
    s: &Settings,
    cluster: &Cluster,
    changes: &dyn Changes,
    agent: &AgentProcess,
    pin: &Path,
) -> Result<Churn> {
    let n = (s.churn_rate * s.churn_secs) as usize;
    let adds: Arc<Mutex<Vec<(Ipv4Addr, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let lag: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let drained: Arc<Mutex<Option<Instant>>> = Arc::default();
    let start = Instant::now();
    let sending = Arc::new(AtomicBool::new(true));
    let monitor = {
        let (adds, stop, lag, drained, sending) = (
            adds.clone(),
            stop.clone(),
            lag.clone(),
            drained.clone(),
            sending.clone(),
        );
        let peers = Peers::open(pin)?;
        std::thread::spawn(move || {
            let mut done = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let list = adds.lock().expect("lock").clone();
                while done < list.len() && peers.get(list[done].0).is_some() {
                    done += 1;
                }
                let behind = list
                    .get(done)
                    .map_or(0.0, |(_, t)| now.duration_since(*t).as_secs_f64() * 1e3);
                if sending.load(Ordering::Relaxed) {
                    lag.lock()
                        .expect("lock")
                        .push((now.duration_since(start).as_secs_f64(), behind));
                } else if done == list.len() {
                    *drained.lock().expect("lock") = Some(now);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let cpu0 = cpu_secs(agent.pid());
    let mut sent = 0;
    for j in 0..n {
        let at = start + Duration::from_secs_f64(j as f64 / s.churn_rate);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        if j % 2 == 0 {
            let pod = cluster.extra_pod(10_000 + j / 2);
            changes.put_pod(&pod)?;
            adds.lock().expect("lock").push((pod.v4, Instant::now()));
        } else {
            changes.delete_pod(&cluster.pods[j / 2 % cluster.pods.len().min(OWN_FILES)])?;
        }
        sent += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_secs(agent.pid()) - cpu0) / elapsed;
    sending.store(false, Ordering::Relaxed);
    let last = Instant::now();
    let deadline = last + Duration::from_secs_f64(s.event_timeout_secs);
    while Instant::now() < deadline && !monitor.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = monitor.join();
    let lag = lag.lock().expect("lock").clone();
    let quarter = |q: usize| {
        let lo = elapsed * q as f64 / 4.0;
        let hi = elapsed * (q + 1) as f64 / 4.0;
        let v: Vec<f64> = lag
            .iter()
            .filter(|(t, _)| *t >= lo && *t < hi)
            .map(|(_, l)| *l)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (first, last_q) = (quarter(0), quarter(3));
    let drain_ms = drained
        .lock()
        .expect("lock")
        .map(|t| t.saturating_duration_since(last).as_secs_f64() * 1e3);
    Ok(Churn {
        rate: s.churn_rate,
        secs: s.churn_secs,
        sent,
        cpu_cores: cpu,
        growing: last_q > 1.5 * first + 100.0,
        first_quarter_ms: first,
        last_quarter_ms: last_q,
        drain_ms,
        lag_ms: lag,
    })
}

/// One size in one mode.
fn point(s: &Settings, mode: Mode, pods: usize, policies: usize) -> Result<Point> {
    let mut out = Point::new(mode, pods, policies);
    let t = Instant::now();
    let cluster = Cluster::generate(Spec {
        pods,
        policies,
        seed: s.seed,
        dual_stack: false,
    });
    let tb = Testbed::new("scl")?;
    let pins = BpfMount::new("scale");
    let pin = pins.0.join("enforcer");
    let pin_arg = pin.to_string_lossy().to_string();
    let mut args = vec!["--node-name", MEASURED_NODE, "--pin-path", &pin_arg];
    args.extend_from_slice(AGENT_FLAGS);
    let work = tempfile::tempdir()?;
    let (changes, agent): (Box<dyn Changes>, AgentProcess) = match mode {
        Mode::Standalone => {
            let dir = work.path().join("manifests");
            let stage = work.path().join("stage");
            std::fs::create_dir_all(&stage)?;
            cluster.write_dir(&dir, OWN_FILES)?;
            eprintln!(
                "    {} pods, {} policies: generated and written in {:.1} s",
                pods,
                policies,
                t.elapsed().as_secs_f64()
            );
            let a = AgentProcess::start(&tb, &dir, &args)?;
            (Box::new(Folder { dir, stage }), a)
        }
        Mode::Kube => {
            let listener = in_netns(&tb.node, || TcpListener::bind("127.0.0.1:0"))??;
            let server = ApiServer::start(listener, cluster.objects())?;
            let kubeconfig = work.path().join("kubeconfig");
            server.write_kubeconfig(&kubeconfig)?;
            eprintln!(
                "    {} pods, {} policies: generated and served in {:.1} s",
                pods,
                policies,
                t.elapsed().as_secs_f64()
            );
            let a = AgentProcess::start_in_cluster(&tb, &kubeconfig, &args)?;
            let known = cluster
                .objects()
                .map(|v| {
                    format!(
                        "{}/{}/{}",
                        v["kind"].as_str().unwrap_or_default(),
                        v["metadata"]["namespace"].as_str().unwrap_or_default(),
                        v["metadata"]["name"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            (
                Box::new(Api {
                    server,
                    known: Mutex::new(known),
                }),
                a,
            )
        }
    };
    let started = Instant::now();
    let ready_by = Duration::from_secs_f64(s.ready_timeout_secs);
    loop {
        let r = readyz(&agent);
        if r.is_some() && out.health_secs.is_none() {
            out.health_secs = Some(started.elapsed().as_secs_f64());
        }
        if r.is_some_and(|(ready, g)| ready && g > 0) {
            break;
        }
        if started.elapsed() > ready_by {
            out.error = Some(format!(
                "not ready after {} s: {}",
                s.ready_timeout_secs,
                tail(&agent.log_text(), 5)
            ));
            let (_, hwm) = proc_status_kib(agent.pid());
            out.hwm_kib = hwm;
            out.hwm_end_kib = hwm;
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    out.ready_secs = Some(started.elapsed().as_secs_f64());
    // Settled after ready (the first resync, counters, the allocator's returns).
    std::thread::sleep(Duration::from_millis(1500));
    (out.rss_kib, out.hwm_kib) = proc_status_kib(agent.pid());
    eprintln!(
        "    {}: ready in {:.1} s (health up at {:.1} s), RSS {:.0} MiB (peak {:.0})",
        mode.label(),
        out.ready_secs.unwrap_or(f64::NAN),
        out.health_secs.unwrap_or(f64::NAN),
        out.rss_kib as f64 / 1024.0,
        out.hwm_kib as f64 / 1024.0
    );
    let peers = Peers::open(&pin)?;
    let probe = cluster.pods[pods / 2].v4;
    if peers.get(probe).is_none() {
        bail!("ready, but pod address {probe} is not in the pinned peers map");
    }
    let run = Run {
        agent: &agent,
        peers: &peers,
        timeout: Duration::from_secs_f64(s.event_timeout_secs),
    };
    let before = histograms(&agent);
    match single_events(s, &cluster, changes.as_ref(), &run) {
        Ok(e) => out.events = e,
        Err(e) => out.error = Some(format!("single events: {e:#}")),
    }
    let after = histograms(&agent);
    let mean = |sum: f64, n: f64| if n > 0.0 { sum / n * 1e3 } else { f64::NAN };
    out.compile_mean_ms = mean(after[0] - before[0], after[1] - before[1]);
    out.reconcile_mean_ms = mean(after[2] - before[2], after[3] - before[3]);
    for e in &out.events {
        eprintln!(
            "    {}: n = {}, p50 {:.0} ms, p99 {:.0} ms, {} timeouts",
            e.kind,
            e.ms.len(),
            e.p(50.0),
            e.p(99.0),
            e.timeouts
        );
    }
    if out.error.is_none() && s.churn_secs > 0.0 {
        match churn(s, &cluster, changes.as_ref(), &agent, &pin) {
            Ok(c) => {
                eprintln!(
                    "    churn {} events/s: {:.2} cores, lag {:.0} → {:.0} ms, drained in {:?} ms",
                    c.rate, c.cpu_cores, c.first_quarter_ms, c.last_quarter_ms, c.drain_ms
                );
                out.churn = Some(c);
            }
            Err(e) => out.error = Some(format!("churn: {e:#}")),
        }
    }
    (_, out.hwm_end_kib) = proc_status_kib(agent.pid());
    agent.kill();
    drop(changes);
    drop(peers);
    Ok(out)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

pub fn run(s: &Settings, log: &mut dyn FnMut(&Results)) -> Results {
    Testbed::cleanup_stale("scl");
    let mut res = Results {
        settings: s.clone(),
        points: Vec::new(),
    };
    for &(pods, policies) in &s.points {
        for &mode in &s.modes {
            eprintln!(
                "  [scale] {pods} pods, {policies} policies, {}",
                mode.label()
            );
            let p = point(s, mode, pods, policies).unwrap_or_else(|e| Point {
                error: Some(format!("{e:#}")),
                ..Point::new(mode, pods, policies)
            });
            if let Some(e) = &p.error {
                eprintln!("    failed: {e}");
            }
            res.points.push(p);
            log(&res);
        }
    }
    res
}
