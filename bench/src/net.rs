//! The parts that need pods: throughput, TCP_RR and TCP_CRR with the real agent vs no programs,
//! the nftables layout at growing rule counts, policy-change latency and agent memory.
//!
//! Everything runs on a [`Testbed`] (a node netns and pod netns): deleting it on drop removes
//! veths, routes and nft tables with the namespaces; the agent, iperf3 and the servers are
//! stopped by their guards.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer_testkit::netns::{AgentProcess, NODE_V4, Testbed, enter_netns, in_netns};
use serde::Serialize;

use crate::{
    inputs::{self, NODE, PORT_CRR, PORT_DENIED, PORT_IPERF, PORT_RR, PORT_TOGGLE},
    interleave::{self, Cycle, Hooks, STATES, Switch, Windows},
    load::{self, Mode, Rate, Servers},
};

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub rounds: usize,
    pub iperf_secs: u32,
    pub rate_secs: f64,
    pub warmup_secs: f64,
    /// Policy counts of the sweep (ours and nftables).
    pub rule_counts: Vec<usize>,
    /// Pods on another node (peers) in every manifest set.
    pub remote_pods: usize,
    /// Policies while measuring throughput / RR / CRR and policy-change latency.
    pub policies: usize,
    /// Policy changes timed.
    pub toggles: usize,
    /// Which sections run: traffic rounds, policy-change latency (with agent memory at the
    /// largest rule count), the sweep against nftables.
    pub traffic: bool,
    pub latency: bool,
    pub sweep: bool,
    /// The Service path (TCP_CRR and TCP_RR through a ClusterIP beside directly), and its
    /// cycles of four windows per load.
    pub service: bool,
    pub service_cycles: usize,
    /// Interleaved runs per round (see [`Pair`]), and their windows.
    pub pairs: usize,
    pub windows: Windows,
    /// Run lengths of the real-path cost measurement (per-program run-time statistics).
    pub pair_iperf_secs: u32,
    pub pair_rate_secs: f64,
}

/// One interleaved run (the agent gone, our programs on its pinned maps): for each measure
/// (iperf3, TCP_RR, TCP_CRR) one continuous load under which the hooks switch between no
/// programs, the empty program and ours in cycles of three short windows (see `interleave`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pair {
    /// Means over the cycles.
    pub none: Sample,
    /// The empty program on our hooks.
    pub empty: Sample,
    pub programs: Sample,
    /// Every cycle: Gbit/s, TCP_RR/s, TCP_CRR/s.
    pub gbps: Vec<Cycle>,
    pub rr: Vec<Cycle>,
    pub crr: Vec<Cycle>,
}

/// Iperf3 Gbit/s, TCP_RR/s and TCP_CRR/s of one state of a run, and the share of CPU time
/// the hypervisor stole meanwhile (see `steal`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    pub gbps: f64,
    pub rr: f64,
    pub crr: f64,
    pub steal: f64,
}

/// A ratio to no programs over the cycles of all runs: the median of the per-cycle ratios and
/// its standard error (1.25 sd / sqrt(n), the median's for a normal spread). Taken over the
/// *quiet* cycles (no CPU time stolen by the hypervisor in any of their three windows) when
/// there are at least [`MIN_QUIET`]: a window that lost CPU to another guest is not comparable
/// with one that did not, whatever was on the hooks (steal does not depend on them).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CycleRatio {
    pub median: f64,
    pub se: f64,
    /// Cycles the median is over, and whether they are the quiet ones.
    pub n: usize,
    pub quiet: bool,
    /// The median over all cycles, quiet or not.
    pub all: f64,
}

pub const MIN_QUIET: usize = 12;

impl CycleRatio {
    fn of(cycles: &[&Cycle], state: Hooks) -> Self {
        let ratios: Vec<f64> = cycles.iter().map(|c| c.ratio(state)).collect();
        let quiet: Vec<bool> = cycles
            .iter()
            .map(|c| c.steal.iter().all(|s| *s == 0.0))
            .collect();
        Self::over(&ratios, &quiet)
    }

    /// Over the cycles' `ratios`, each cycle `quiet` or not.
    fn over(ratios: &[f64], quiet: &[bool]) -> Self {
        let quiet: Vec<f64> = ratios
            .iter()
            .zip(quiet)
            .filter(|(_, q)| **q)
            .map(|(r, _)| *r)
            .collect();
        let is_quiet = quiet.len() >= MIN_QUIET;
        let r = if is_quiet { quiet } else { ratios.to_vec() };
        let n = r.len() as f64;
        let mean = r.iter().sum::<f64>() / n;
        let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        Self {
            median: median(&r),
            se: 1.25 * sd / n.sqrt(),
            n: r.len(),
            quiet: is_quiet,
            all: median(ratios),
        }
    }
}

/// Ours / no programs and the empty program / no programs, over every cycle of every run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    pub pairs: usize,
    /// Cycles per measure, over all runs.
    pub cycles: usize,
    pub throughput: CycleRatio,
    pub rr: CycleRatio,
    pub crr: CycleRatio,
    /// What the hooks cost: the empty program on them / no programs.
    pub empty_throughput: CycleRatio,
    pub empty_rr: CycleRatio,
    pub empty_crr: CycleRatio,
}

impl Paired {
    fn of(pairs: &[Pair]) -> Self {
        let all = |f: fn(&Pair) -> &Vec<Cycle>| pairs.iter().flat_map(f).collect::<Vec<_>>();
        let (gbps, rr, crr) = (all(|p| &p.gbps), all(|p| &p.rr), all(|p| &p.crr));
        Self {
            pairs: pairs.len(),
            cycles: rr.len(),
            throughput: CycleRatio::of(&gbps, Hooks::Ours),
            rr: CycleRatio::of(&rr, Hooks::Ours),
            crr: CycleRatio::of(&crr, Hooks::Ours),
            empty_throughput: CycleRatio::of(&gbps, Hooks::Empty),
            empty_rr: CycleRatio::of(&rr, Hooks::Empty),
            empty_crr: CycleRatio::of(&crr, Hooks::Empty),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub baseline_gbps: f64,
    pub enforced_gbps: f64,
    pub baseline_rr: Rate,
    pub enforced_rr: Rate,
    pub baseline_crr: Rate,
    pub enforced_crr: Rate,
    /// The agent killed, its pinned programs still attached (no agent process competing for
    /// the CPUs).
    pub programs_only_gbps: f64,
    pub programs_only_rr: Rate,
    pub programs_only_crr: Rate,
    /// CPU time of the agent process during the enforced measurements, % of one core.
    pub agent_cpu_pct: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratio {
    pub baseline: f64,
    pub enforced: f64,
    pub ratio: f64,
    pub programs_only: f64,
    pub programs_only_ratio: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepRow {
    pub rules: usize,
    pub baseline_crr: Rate,
    pub ours_crr: Rate,
    /// Agent killed, pinned programs still attached.
    pub ours_programs_only_crr: Rate,
    pub nft_crr: Rate,
    /// Time per connection added over the baseline, spread over its packets (segments seen by
    /// the client), in ns. Ours: two programs per packet (both veths); nft: the forward hook.
    pub ours_added_ns_per_packet: f64,
    pub ours_programs_only_added_ns_per_packet: f64,
    pub nft_added_ns_per_packet: f64,
    pub ours_ready_secs: f64,
    pub nft_load_secs: f64,
    pub nft_rules: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub pods: usize,
    pub policies: usize,
    /// File write/remove to the first probe that saw the new verdict, ms.
    pub allow_ms: Vec<f64>,
    pub deny_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub timeouts: usize,
    /// How long a probe may take to connect before it counts as dropped, ms.
    pub probe_timeout_ms: f64,
    /// Mean of the agent's own `enforcer_reconcile_seconds` (compile + program) over the
    /// changes, ms, from /metrics.
    pub reconcile_mean_ms: f64,
    /// Mean of its `enforcer_compile_seconds` (the compile part), ms.
    pub compile_mean_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    pub pods: usize,
    pub policies: usize,
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub ready_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub rounds: Vec<Round>,
    pub throughput: Ratio,
    pub rr: Ratio,
    pub crr: Ratio,
    pub pairs: Vec<Pair>,
    pub paired: Option<Paired>,
    pub real_cost: Option<RealCost>,
    pub sweep: Vec<SweepRow>,
    pub latency: Option<Latency>,
    pub memory: Vec<Memory>,
    pub service: Option<ServiceRates>,
    pub notes: Vec<String>,
}

/// Where the Service windows send the load: the server pod's address, or the ClusterIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Target {
    Direct = 0,
    Service = 1,
}

/// The states of the Service windows, by index.
pub const SERVICE_STATES: [(Hooks, Target); 4] = [
    (Hooks::None, Target::Direct),
    (Hooks::None, Target::Service),
    (Hooks::Ours, Target::Direct),
    (Hooks::Ours, Target::Service),
];

/// One load of the Service path: the rates of the four states of [`SERVICE_STATES`] and their
/// ratios, cycle by cycle (see [`CycleRatio`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceLoad {
    /// Means over the cycles, per state, per second.
    pub means: [f64; 4],
    /// Ours through the ClusterIP / ours to the pod's address.
    pub service_over_direct: CycleRatio,
    /// Ours / no programs, through the ClusterIP and directly.
    pub ours_service: CycleRatio,
    pub ours_direct: CycleRatio,
    /// The first over the second, cycle by cycle: what ours cost through the ClusterIP
    /// against what they cost directly, the translation's own cost taken out.
    pub ours_service_over_ours_direct: CycleRatio,
    /// The translation alone: no programs, through the ClusterIP / directly.
    pub dnat: CycleRatio,
    /// Every cycle: per state, the rate and the share of CPU time stolen.
    pub cycles: Vec<([f64; 4], [f64; 4])>,
}

impl ServiceLoad {
    fn of(cycles: Vec<([f64; 4], [f64; 4])>) -> Self {
        let quiet: Vec<bool> = cycles
            .iter()
            .map(|(_, st)| st.iter().all(|x| *x == 0.0))
            .collect();
        let ratio = |a: usize, b: usize| {
            let r: Vec<f64> = cycles.iter().map(|(r, _)| r[a] / r[b]).collect();
            CycleRatio::over(&r, &quiet)
        };
        let own: Vec<f64> = cycles
            .iter()
            .map(|(r, _)| (r[3] / r[1]) / (r[2] / r[0]))
            .collect();
        let n = cycles.len().max(1) as f64;
        Self {
            means: std::array::from_fn(|i| cycles.iter().map(|(r, _)| r[i]).sum::<f64>() / n),
            service_over_direct: ratio(3, 2),
            ours_service: ratio(3, 1),
            ours_direct: ratio(2, 0),
            ours_service_over_ours_direct: CycleRatio::over(&own, &quiet),
            dnat: ratio(1, 0),
            cycles,
        }
    }
}

/// The Service path on the real path: TCP_CRR and TCP_RR from the client pod (its egress
/// isolated, allowed to the server) through a ClusterIP that an nftables DNAT translates to the
/// server pod, as kube-proxy does, beside the same to the pod's address, with our programs (the
/// agent's, on its maps) and with none, in interleaved windows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceRates {
    pub vip: String,
    pub windows: Windows,
    pub crr: ServiceLoad,
    pub rr: ServiceLoad,
    /// In a second of TCP_CRR through the ClusterIP with ours after the windows, the
    /// connections completed and the packets our programs deferred (one per connection judged
    /// after the translation).
    pub crr_service_connections: u64,
    pub deferred: u64,
    /// Deferred packets dropped as unresolved over the section (their slot did not describe
    /// them): none when every translated packet kept its source.
    pub unresolved: u64,
}

/// A bpffs mounted on a temp dir in the bench's own mount namespace, for the agent's pins: they
/// outlive the agent process (which runs in a private mount namespace of `ip netns exec`), so
/// the programs stay attached after it exits. Cleaned (links detached) and unmounted on drop.
struct PinMount(PathBuf);

impl PinMount {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("enforcer-bench-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let m = Self(dir);
        enforcer::datapath::mount_bpffs(&m.0)?;
        Ok(m)
    }
    fn pin(&self) -> PathBuf {
        self.0.join("enforcer")
    }
}

impl Drop for PinMount {
    fn drop(&mut self) {
        let _ = enforcer::datapath::Datapath::cleanup(&self.pin());
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the comm: state is [0]; utime is field 14 of the line, [11] here.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Kills a child process (ours, by its pid) on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temp folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("enforcer-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deletes an nft table (node namespace, family, name) on drop.
struct NftGuard(String, &'static str, &'static str);

impl Drop for NftGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.0, "nft", "delete", "table", self.1, self.2,
            ])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a file on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

struct Bed {
    tb: Testbed,
    cli: String,
    srv: String,
    srv_ip: Ipv4Addr,
    cli_ip: Ipv4Addr,
    manifests: TempDir,
    pins: PinMount,
    _servers: Servers,
    iperf: ChildGuard,
}

impl Bed {
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.srv_ip), port)
    }

    fn reach(&self, port: u16) -> Result<bool> {
        self.reach_to(self.addr(port))
    }

    fn reach_to(&self, to: SocketAddr) -> Result<bool> {
        load::reachable_from(&self.cli, to, Duration::from_millis(300))
    }

    /// Writes the manifests for `policies` filler policies (plus the base ones).
    fn write_manifests(&self, policies: usize, remote: usize) -> Result<()> {
        let d = &self.manifests.0;
        std::fs::write(d.join("00-namespace.yaml"), inputs::namespace())?;
        let pods = format!(
            "{}---\n{}",
            inputs::local_pod("cli", self.cli_ip, "client"),
            inputs::local_pod("srv", self.srv_ip, "srv")
        );
        std::fs::write(d.join("10-pods.yaml"), pods)?;
        std::fs::write(d.join("11-remote-pods.yaml"), inputs::remote_pods(remote))?;
        std::fs::write(d.join("20-base-policies.yaml"), inputs::base_policies())?;
        std::fs::write(d.join("21-policies.yaml"), inputs::policies(policies))?;
        let _ = std::fs::remove_file(d.join("30-toggle.yaml"));
        Ok(())
    }

    /// Starts the agent and waits until it is ready and enforcing (bench ports open, the
    /// denied port closed).
    fn start_agent(&self) -> Result<(AgentProcess, f64)> {
        self.start_agent_with(&[])
    }

    /// [`Bed::start_agent`] with more arguments for the agent.
    fn start_agent_with(&self, extra: &[&str]) -> Result<(AgentProcess, f64)> {
        let t = Instant::now();
        let pin = self.pins.pin().to_string_lossy().to_string();
        let mut args = vec!["--node-name", NODE, "--pin-path", &pin];
        args.extend_from_slice(extra);
        let mut a = AgentProcess::start(&self.tb, &self.manifests.0, &args)?;
        a.wait_ready(Duration::from_secs(300))?;
        let ready = t.elapsed().as_secs_f64();
        let ok = self.reach(PORT_CRR)?;
        let denied = !self.reach(PORT_DENIED)?;
        if !ok || !denied {
            bail!(
                "agent ready but not enforcing as expected (allowed port reachable: {ok}, denied port blocked: {denied}):\n{}",
                tail(&a.log_text(), 30)
            );
        }
        Ok((a, ready))
    }

    /// Kills the agent; its pinned programs stay attached (checked).
    fn kill_agent_keep_programs(&self, a: AgentProcess) -> Result<()> {
        a.kill();
        if self.reach(PORT_DENIED)? || !self.reach(PORT_CRR)? {
            bail!("after the agent exited, its pinned programs do not enforce");
        }
        Ok(())
    }

    /// Stops the agent and removes its programs and pins.
    fn stop_agent(&self, a: AgentProcess) -> Result<()> {
        a.kill();
        enforcer::datapath::Datapath::cleanup(&self.pins.pin())?;
        self.expect_no_programs()
    }

    /// Attaches our programs again to `veths`, on the agent's pinned maps (the agent gone).
    fn reattach(&self, veths: &[u32]) -> Result<()> {
        let (pin, veths) = (self.pins.pin(), veths.to_vec());
        in_netns(&self.tb.node, move || -> Result<()> {
            let mut dp = enforcer::datapath::Datapath::open(enforcer::datapath::DatapathOptions {
                pin_path: pin,
                ..Default::default()
            })?;
            for v in veths {
                dp.attach(v)?;
            }
            Ok(())
        })?
    }

    /// Checks that no program is left on the path (the denied port is reachable).
    fn expect_no_programs(&self) -> Result<()> {
        for _ in 0..40 {
            if self.reach(PORT_DENIED)? && self.reach(PORT_CRR)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the denied port stays closed without the agent: programs or rules are still attached"
        )
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn iperf_server(netns: &str) -> Result<ChildGuard> {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "iperf3",
            "-s",
            "-p",
            &PORT_IPERF.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?;
    Ok(ChildGuard(child))
}

/// One iperf3 TCP stream: received Gbit/s.
fn iperf(netns: &str, to: Ipv4Addr, secs: u32) -> Result<f64> {
    let mut last = String::new();
    for _ in 0..10 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "iperf3",
                "-c",
                &to.to_string(),
                "-p",
                &PORT_IPERF.to_string(),
            ])
            .args(["-t", &secs.to_string(), "-O", "1", "-J"])
            .stdin(Stdio::null())
            .output()
            .context("running iperf3 -c")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success()
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(bps) = v
                .pointer("/end/sum_received/bits_per_second")
                .and_then(serde_json::Value::as_f64)
        {
            return Ok(bps / 1e9);
        }
        last = format!(
            "{}{}",
            text.chars().take(500).collect::<String>(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("iperf3 failed: {last}")
}

fn rss_kib(pid: u32) -> Result<(u64, u64, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok((field("VmRSS:"), field("VmHWM:"), comm))
}

fn memory(a: &AgentProcess, pods: usize, policies: usize, ready: f64) -> Result<Memory> {
    // Let it settle after ready (flow log, metrics, first resync).
    std::thread::sleep(Duration::from_millis(1500));
    let (rss, hwm, comm) = rss_kib(a.pid())?;
    if comm != "enforcer" {
        bail!("pid {} is {comm:?}, not the agent", a.pid());
    }
    Ok(Memory {
        pods,
        policies,
        vm_rss_kib: rss,
        vm_hwm_kib: hwm,
        ready_secs: ready,
    })
}

fn added_ns_per_packet(base: &Rate, other: &Rate) -> f64 {
    let added_s = 1.0 / other.per_sec - 1.0 / base.per_sec;
    added_s * 1e9 / base.segments_per_op.max(1.0)
}

pub fn run(s: &Settings, log: &mut dyn FnMut(&Results)) -> Result<Results> {
    Testbed::cleanup_stale("bnch");
    let mut tb = Testbed::new("bnch")?;
    let cli_ip = Ipv4Addr::new(10, 10, 1, 1);
    let srv_ip = Ipv4Addr::new(10, 10, 2, 1);
    let cli = tb.add_pod("cli", cli_ip, None)?.netns;
    let srv = tb.add_pod("srv", srv_ip, None)?.netns;
    // Connection-rate runs open many connections: let the client reuse TIME_WAIT ports.
    for kv in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        enforcer_testkit::netns::run("ip", &["netns", "exec", &cli, "sysctl", "-qw", kv])?;
    }
    let servers = Servers::start(
        &srv,
        &[
            (PORT_CRR, Mode::Inline),
            (PORT_RR, Mode::Threaded),
            (PORT_DENIED, Mode::Inline),
            (PORT_TOGGLE, Mode::Handshake),
            (inputs::PORT_SVC_CRR, Mode::Inline),
            (inputs::PORT_SVC_RR, Mode::Threaded),
        ],
    )?;
    let iperf_guard = iperf_server(&srv)?;
    let bed = Bed {
        tb,
        cli,
        srv,
        srv_ip,
        cli_ip,
        manifests: TempDir::new("manifests")?,
        pins: PinMount::new()?,
        _servers: servers,
        iperf: iperf_guard,
    };
    let _ = &bed.srv;
    let warm = Duration::from_secs_f64(s.warmup_secs);
    let dur = Duration::from_secs_f64(s.rate_secs);
    let mut res = Results::default();

    // 1. Throughput, TCP_RR, TCP_CRR: no programs vs the agent with `policies` policies, in
    //    alternating rounds.
    bed.write_manifests(s.policies, s.remote_pods)?;
    for round in 0..s.rounds.max(1) * usize::from(s.traffic) {
        // Odd rounds measure no programs last, so the order of the runs does not favour a side
        // (TIME_WAIT sockets, caches, a neighbour's load drifting over the run).
        let none_first = round % 2 == 0;
        let mut r = Round::default();
        let measure_none = |r: &mut Round| -> Result<()> {
            eprintln!("  round {}: no programs", round + 1);
            bed.expect_no_programs()?;
            r.baseline_gbps = iperf(&bed.cli, srv_ip, s.iperf_secs)?;
            r.baseline_rr = load::rr(&bed.cli, bed.addr(PORT_RR), warm, dur)?;
            r.baseline_crr = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
            Ok(())
        };
        if none_first {
            measure_none(&mut r)?;
        }
        eprintln!(
            "  round {}: agent, {} policies, {} remote pods",
            round + 1,
            s.policies,
            s.remote_pods
        );
        let (agent, ready) = bed.start_agent()?;
        let (c0, t0) = (cpu_ticks(agent.pid()), Instant::now());
        r.enforced_gbps = iperf(&bed.cli, srv_ip, s.iperf_secs)?;
        r.enforced_rr = load::rr(&bed.cli, bed.addr(PORT_RR), warm, dur)?;
        r.enforced_crr = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        r.agent_cpu_pct =
            (cpu_ticks(agent.pid()) - c0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
        if round == 0 {
            res.memory
                .push(memory(&agent, s.remote_pods + 2, s.policies + 2, ready)?);
            // The path really ran our programs: they counted the allowed packets.
            if let Ok((200, m)) = agent.get("/metrics") {
                let lines: Vec<&str> = m
                    .lines()
                    .filter(|l| l.contains("packets") && !l.starts_with('#'))
                    .take(12)
                    .collect();
                res.notes.push(format!(
                    "agent /metrics after the enforced round: {}",
                    lines.join(" | ")
                ));
            }
        }
        // Still enforcing after the load (a denied port stays closed).
        if bed.reach(PORT_DENIED)? {
            bail!(
                "the denied port opened during the enforced round:\n{}",
                tail(&agent.log_text(), 30)
            );
        }
        eprintln!(
            "  round {}: agent killed, its pinned programs still attached",
            round + 1
        );
        bed.kill_agent_keep_programs(agent)?;
        r.programs_only_gbps = iperf(&bed.cli, srv_ip, s.iperf_secs)?;
        r.programs_only_rr = load::rr(&bed.cli, bed.addr(PORT_RR), warm, dur)?;
        r.programs_only_crr = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        for k in 0..s.pairs {
            let p = pair(&bed, s, round * s.pairs + k)?;
            eprintln!(
                "    pair: Gbit/s {:.2} / {:.2} / {:.2}; RR/s {:.0} / {:.0} / {:.0}; CRR/s {:.0} / {:.0} / {:.0} (none / empty program / ours)",
                p.none.gbps,
                p.empty.gbps,
                p.programs.gbps,
                p.none.rr,
                p.empty.rr,
                p.programs.rr,
                p.none.crr,
                p.empty.crr,
                p.programs.crr
            );
            res.pairs.push(p);
        }
        if round == 0 && s.pairs > 0 {
            let c = real_cost(&bed, s)?;
            eprintln!(
                "    real path, ns per program run (kernel stats): ours {:.0} (RR) / {:.0} (iperf3), empty program {:.0} / {:.0}; ours JIT {} bytes",
                c.ours_rr_ns, c.ours_iperf_ns, c.empty_rr_ns, c.empty_iperf_ns, c.ours_jited_bytes
            );
            res.real_cost = Some(c);
        }
        if !res.pairs.is_empty() {
            res.paired = Some(Paired::of(&res.pairs));
        }
        enforcer::datapath::Datapath::cleanup(&bed.pins.pin())?;
        if !none_first {
            measure_none(&mut r)?;
        }
        eprintln!(
            "    Gbit/s {:.2} / {:.2} / {:.2}; RR/s {:.0} / {:.0} / {:.0}; CRR/s {:.0} / {:.0} / {:.0} (none / agent / programs only); agent CPU {:.0}%",
            r.baseline_gbps,
            r.enforced_gbps,
            r.programs_only_gbps,
            r.baseline_rr.per_sec,
            r.enforced_rr.per_sec,
            r.programs_only_rr.per_sec,
            r.baseline_crr.per_sec,
            r.enforced_crr.per_sec,
            r.programs_only_crr.per_sec,
            r.agent_cpu_pct
        );
        res.rounds.push(r);
        let pick = |f: &dyn Fn(&Round) -> (f64, f64, f64)| {
            let b = median(&res.rounds.iter().map(|r| f(r).0).collect::<Vec<_>>());
            let e = median(&res.rounds.iter().map(|r| f(r).1).collect::<Vec<_>>());
            let p = median(&res.rounds.iter().map(|r| f(r).2).collect::<Vec<_>>());
            Ratio {
                baseline: b,
                enforced: e,
                ratio: e / b,
                programs_only: p,
                programs_only_ratio: p / b,
            }
        };
        res.throughput = pick(&|r| (r.baseline_gbps, r.enforced_gbps, r.programs_only_gbps));
        res.rr = pick(&|r| {
            (
                r.baseline_rr.per_sec,
                r.enforced_rr.per_sec,
                r.programs_only_rr.per_sec,
            )
        });
        res.crr = pick(&|r| {
            (
                r.baseline_crr.per_sec,
                r.enforced_crr.per_sec,
                r.programs_only_crr.per_sec,
            )
        });
        log(&res);
    }

    // 2. Policy change to enforced, at `remote_pods` pods and `policies` policies.
    if s.latency {
        bed.expect_no_programs()?;
        eprintln!("  policy-change latency: {} toggles", s.toggles);
        bed.write_manifests(s.policies, s.remote_pods)?;
        let (agent, _) = bed.start_agent()?;
        let before = agent.get("/metrics").map(|(_, m)| m).unwrap_or_default();
        let mut lat = latency(&bed, s)?;
        let after = agent.get("/metrics").map(|(_, m)| m).unwrap_or_default();
        let (s0, n0) = (
            metric(&before, "enforcer_reconcile_seconds_sum"),
            metric(&before, "enforcer_reconcile_seconds_count"),
        );
        let (s1, n1) = (
            metric(&after, "enforcer_reconcile_seconds_sum"),
            metric(&after, "enforcer_reconcile_seconds_count"),
        );
        lat.reconcile_mean_ms = (s1 - s0) / (n1 - n0) * 1e3;
        let compile_sum = |m: &str| metric(m, "enforcer_compile_seconds_sum");
        lat.compile_mean_ms = (compile_sum(&after) - compile_sum(&before)) / (n1 - n0) * 1e3;
        res.notes.push(format!(
            "policy-change run: the agent's enforcer_reconcile_seconds moved by {} reconciles, {:.3} s in all",
            n1 - n0,
            s1 - s0
        ));
        eprintln!(
            "    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, timeouts {}",
            lat.p50_ms, lat.p99_ms, lat.max_ms, lat.timeouts
        );
        res.latency = Some(lat);
        bed.stop_agent(agent)?;
        let _ = std::fs::remove_file(bed.manifests.0.join("30-toggle.yaml"));
        log(&res);
        if !s.sweep
            && let Some(&n) = s.rule_counts.iter().max()
        {
            // The memory figure the sweep would take at its largest rule count.
            bed.write_manifests(n, s.remote_pods)?;
            let (agent, ready) = bed.start_agent()?;
            res.memory
                .push(memory(&agent, s.remote_pods + 2, n + 2, ready)?);
            bed.stop_agent(agent)?;
            log(&res);
        }
    }

    // 3. The sweep: connection rate at growing policy counts, ours vs the nftables layout.
    for &n in s.rule_counts.iter().filter(|_| s.sweep) {
        bed.expect_no_programs()?;
        eprintln!("  sweep: {n} policies: no programs");
        let baseline = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        eprintln!("  sweep: {n} policies: agent");
        bed.write_manifests(n, s.remote_pods)?;
        let (agent, ready) = bed.start_agent()?;
        let ours = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        if n >= 10_000 {
            res.memory
                .push(memory(&agent, s.remote_pods + 2, n + 2, ready)?);
        }
        bed.kill_agent_keep_programs(agent)?;
        let ours_po = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        enforcer::datapath::Datapath::cleanup(&bed.pins.pin())?;
        bed.expect_no_programs()?;
        eprintln!("  sweep: {n} policies: nftables");
        let text = inputs::nft_ruleset(n, s.remote_pods, cli_ip, srv_ip);
        let file = bed.manifests.0.join(".ruleset.nft");
        std::fs::write(&file, &text)?;
        let guard = NftGuard(bed.tb.node.clone(), "inet", inputs::NFT_TABLE);
        let t = Instant::now();
        bed.tb
            .node_exec(&["nft", "-f", &file.to_string_lossy()])
            .context("loading the nftables ruleset")?;
        let nft_load = t.elapsed().as_secs_f64();
        // Short TIME_WAIT tracking, so the conntrack table does not fill during the run.
        let _ = bed.tb.node_exec(&[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
        ]);
        if !bed.reach(PORT_CRR)? || bed.reach(PORT_DENIED)? {
            bail!("the nftables ruleset does not enforce as expected");
        }
        let nft = load::crr(&bed.cli, bed.addr(PORT_CRR), warm, dur)?;
        drop(guard);
        let row = SweepRow {
            rules: n,
            ours_added_ns_per_packet: added_ns_per_packet(&baseline, &ours),
            ours_programs_only_added_ns_per_packet: added_ns_per_packet(&baseline, &ours_po),
            ours_programs_only_crr: ours_po,
            nft_added_ns_per_packet: added_ns_per_packet(&baseline, &nft),
            baseline_crr: baseline,
            ours_crr: ours,
            nft_crr: nft,
            ours_ready_secs: ready,
            nft_load_secs: nft_load,
            nft_rules: text
                .lines()
                .filter(|l| {
                    l.trim_start().starts_with("ip ") || l.trim_start().starts_with("jump ")
                })
                .count(),
        };
        eprintln!(
            "    CRR/s: none {:.0}, ours {:.0} (programs only {:.0}), nft {:.0}; added ns/packet ours {:.0} ({:.0}), nft {:.0}",
            row.baseline_crr.per_sec,
            row.ours_crr.per_sec,
            row.ours_programs_only_crr.per_sec,
            row.nft_crr.per_sec,
            row.ours_added_ns_per_packet,
            row.ours_programs_only_added_ns_per_packet,
            row.nft_added_ns_per_packet
        );
        res.sweep.push(row);
        log(&res);
    }

    // 4. The Service path: through a ClusterIP beside directly, ours and no programs.
    if s.service {
        bed.expect_no_programs()?;
        eprintln!(
            "  Service path: TCP_CRR and TCP_RR through {} and directly, {} cycles each",
            inputs::SERVICE_VIP,
            s.service_cycles
        );
        let r = service_path(&bed, s)?;
        eprintln!(
            "    CRR/s none {:.0} / {:.0}, ours {:.0} / {:.0} (direct / ClusterIP): ours ClusterIP / direct {:.3}x (ours / none through it over directly {:.3}x); RR/s none {:.0} / {:.0}, ours {:.0} / {:.0}: {:.3}x ({:.3}x); {} packets deferred for {} connections through the ClusterIP",
            r.crr.means[0],
            r.crr.means[1],
            r.crr.means[2],
            r.crr.means[3],
            r.crr.service_over_direct.median,
            r.crr.ours_service_over_ours_direct.median,
            r.rr.means[0],
            r.rr.means[1],
            r.rr.means[2],
            r.rr.means[3],
            r.rr.service_over_direct.median,
            r.rr.ours_service_over_ours_direct.median,
            r.deferred,
            r.crr_service_connections
        );
        res.service = Some(r);
        log(&res);
    }
    Ok(res)
}

/// The Service path (see [`ServiceRates`]). Adds the Service manifest and kube-proxy's DNAT,
/// both removed on return, as the agent and its programs are.
fn service_path(bed: &Bed, s: &Settings) -> Result<ServiceRates> {
    use crate::testrun::pinned_counter_sum;
    let vip = |port| SocketAddr::new(IpAddr::V4(inputs::SERVICE_VIP), port);
    bed.write_manifests(s.policies, s.remote_pods)?;
    let manifest = RemoveOnDrop(bed.manifests.0.join("12-service.yaml"));
    std::fs::write(&manifest.0, inputs::service())?;
    let policies = RemoveOnDrop(bed.manifests.0.join("22-service-policies.yaml"));
    std::fs::write(&policies.0, inputs::service_policies())?;
    let rules = bed.manifests.0.join(".kube-proxy.nft");
    std::fs::write(&rules, inputs::kube_proxy_ruleset(bed.srv_ip))?;
    let _nft = NftGuard(bed.tb.node.clone(), "ip", inputs::NFT_KUBE_PROXY);
    bed.tb
        .node_exec(&["nft", "-f", &rules.to_string_lossy()])
        .context("loading the DNAT rules")?;
    // Short TIME_WAIT tracking, so the conntrack table does not fill during the runs.
    let _ = bed.tb.node_exec(&[
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
    ]);
    if !bed.reach_to(vip(PORT_CRR))? {
        bail!(
            "without programs, the ClusterIP does not reach the server: the DNAT does not translate"
        );
    }
    let maps = enforcer::datapath::versioned_root(&bed.pins.pin()).join("maps");
    let deferred = || {
        pinned_counter_sum(
            &maps,
            enforcer_common::DIR_EGRESS,
            enforcer_common::reason::ALLOW_SERVICE,
        )
    };
    // A connection-rate loop takes a client port again seconds after its last connection there
    // (tcp_tw_reuse, a second at the earliest), and a SYN that reopens a closed flow ours still
    // hold is no new flow. Closed flows kept half a second make every connection a new flow for
    // ours, through the ClusterIP (deferred and judged) as directly, as at a lower rate.
    let (agent, _) = bed.start_agent_with(&["--ct-timeout-tcp-closed", "500ms"])?;
    // The agent gave the ClusterIP the Service identity: each new connection through it is
    // deferred, then judged after the translation (it connects: the judge allowed it).
    let before = deferred()?;
    for _ in 0..10 {
        if !bed.reach_to(vip(PORT_CRR))? {
            bail!(
                "the agent drops connections through the ClusterIP:\n{}",
                tail(&agent.log_text(), 30)
            );
        }
    }
    let n = deferred()? - before;
    if n != 10 {
        bail!(
            "{n} packets deferred for 10 connections through the ClusterIP (want one each):\n{}",
            tail(&agent.log_text(), 30)
        );
    }
    bed.kill_agent_keep_programs(agent)?;

    let pin = bed.pins.pin();
    let veths = enforcer::datapath::Datapath::attached_at(&pin)?;
    if veths.len() != 2 {
        bail!("expected our programs on the 2 pod veths, found them on {veths:?}");
    }
    let w = Windows {
        cycles: s.service_cycles,
        ..s.windows
    };
    let mut out = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<ServiceRates> {
                enter_netns(&Testbed::netns_path(&bed.tb.node))?;
                let mut sw = Switch::take_over(&pin, &veths)?;
                for hooks in [Hooks::None, Hooks::Ours] {
                    sw.set(hooks)?;
                    let denied = bed.reach(PORT_DENIED)?;
                    let open = bed.reach(PORT_CRR)? && bed.reach_to(vip(PORT_CRR))?;
                    if !open || denied == (hooks == Hooks::Ours) {
                        bail!(
                            "{hooks:?} hooks: the allowed port (directly and through the ClusterIP) is {}, the denied one {}",
                            if open { "open" } else { "closed" },
                            if denied { "open" } else { "closed" }
                        );
                    }
                }
                let mut out = ServiceRates::default();
                for (kind, port, offset) in [(load::Kind::Crr, PORT_CRR, 0), (load::Kind::Rr, PORT_RR, 1)] {
                    let bg = load::Background::start_to(kind, &bed.cli, vec![bed.addr(port), vip(port)])?;
                    let alive = || {
                        if bg.ended() {
                            bail!("the {kind:?} load ended before it was stopped");
                        }
                        Ok(())
                    };
                    let cycles = interleave::windows::<4>(
                        &w,
                        offset,
                        &mut |i| {
                            sw.set(SERVICE_STATES[i].0)?;
                            bg.aim(SERVICE_STATES[i].1 as usize);
                            Ok(())
                        },
                        &|i| format!("{:?}", SERVICE_STATES[i]),
                        &|| Ok(bg.count()),
                        &alive,
                    )
                    .with_context(|| {
                        format!(
                            "{kind:?} through the ClusterIP and directly; {:?} packets dropped as unresolved (a deferred packet whose slot did not describe it)",
                            pinned_counter_sum(&maps, enforcer_common::DIR_EGRESS, enforcer_common::reason::DROP_UNRESOLVED)
                        )
                    })?;
                    bg.finish()?;
                    match kind {
                        load::Kind::Crr => out.crr = ServiceLoad::of(cycles),
                        load::Kind::Rr => out.rr = ServiceLoad::of(cycles),
                    }
                }
                // Every connection through the ClusterIP was a new flow for ours, deferred and
                // judged: counted apart from the windows, whose switches (a hook at a time)
                // defer some packets of the connections they cut through more than once.
                sw.set(Hooks::Ours)?;
                let bg = load::Background::start_to(load::Kind::Crr, &bed.cli, vec![vip(PORT_CRR)])?;
                std::thread::sleep(Duration::from_secs_f64(w.warmup_secs));
                let (c0, d0) = (bg.count(), deferred()?);
                std::thread::sleep(Duration::from_secs(1));
                let (c1, d1) = (bg.count(), deferred()?);
                bg.finish()?;
                out.crr_service_connections = c1 - c0;
                out.deferred = d1 - d0;
                out.unresolved = pinned_counter_sum(
                    &maps,
                    enforcer_common::DIR_EGRESS,
                    enforcer_common::reason::DROP_UNRESOLVED,
                )?;
                Ok(out)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the Service windows' thread panicked"))?
    })?;
    out.vip = inputs::SERVICE_VIP.to_string();
    out.windows = w;
    enforcer::datapath::Datapath::cleanup(&pin)?;
    bed.expect_no_programs()?;
    Ok(out)
}

/// One interleaved run (see [`Pair`]); `offset` rotates the order of the states. On entry the
/// agent's programs are attached (the agent gone); so they are on return. Each state is checked
/// before the loads: the port the policies deny is closed with our programs only.
fn pair(bed: &Bed, s: &Settings, offset: usize) -> Result<Pair> {
    let pin = bed.pins.pin();
    let veths = enforcer::datapath::Datapath::attached_at(&pin)?;
    if veths.len() != 2 {
        bail!("expected our programs on the 2 pod veths, found them on {veths:?}");
    }
    let w = &s.windows;
    let mut out = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Pair> {
                enter_netns(&Testbed::netns_path(&bed.tb.node))?;
                let mut sw = Switch::take_over(&pin, &veths)?;
                for state in STATES {
                    sw.set(state)?;
                    let (denied, open) = (bed.reach(PORT_DENIED)?, bed.reach(PORT_CRR)?);
                    if !open || denied == (state == Hooks::Ours) {
                        bail!(
                            "{state:?} hooks: the allowed port is {}, the denied one {}",
                            if open { "open" } else { "closed" },
                            if denied { "open" } else { "closed" }
                        );
                    }
                }
                let mut p = Pair::default();
                let server = bed.iperf.0.id();
                let client = iperf_client(&bed.cli, bed.srv_ip, server)?;
                p.gbps = interleave::cycles(
                    &mut sw,
                    w,
                    offset,
                    &|| interleave::rx_bytes(server),
                    &|| client.alive(),
                )?;
                client.stop();
                for c in &mut p.gbps {
                    c.rate = c.rate.map(|bytes| bytes * 8.0 / 1e9);
                }
                for (kind, port, cycles) in [
                    (load::Kind::Rr, PORT_RR, &mut p.rr),
                    (load::Kind::Crr, PORT_CRR, &mut p.crr),
                ] {
                    let bg = load::Background::start(kind, &bed.cli, bed.addr(port))?;
                    let alive = || {
                        if bg.ended() {
                            bail!("the {kind:?} load ended before it was stopped");
                        }
                        Ok(())
                    };
                    *cycles =
                        interleave::cycles(&mut sw, w, offset + 1, &|| Ok(bg.count()), &alive)?;
                    bg.finish()?;
                }
                Ok(p)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the interleaving thread panicked"))?
    })?;
    bed.reattach(&veths)?;
    if bed.reach(PORT_DENIED)? || !bed.reach(PORT_CRR)? {
        bail!("re-attached programs do not enforce");
    }
    let mean = |v: &[Cycle], state: Hooks, steal: bool| {
        v.iter()
            .map(|c| {
                if steal {
                    c.steal[state as usize]
                } else {
                    c.rate[state as usize]
                }
            })
            .sum::<f64>()
            / v.len().max(1) as f64
    };
    for state in STATES {
        let sample = Sample {
            gbps: mean(&out.gbps, state, false),
            rr: mean(&out.rr, state, false),
            crr: mean(&out.crr, state, false),
            steal: (mean(&out.gbps, state, true)
                + mean(&out.rr, state, true)
                + mean(&out.crr, state, true))
                / 3.0,
        };
        match state {
            Hooks::None => out.none = sample,
            Hooks::Empty => out.empty = sample,
            Hooks::Ours => out.programs = sample,
        }
    }
    Ok(out)
}

/// A long iperf3 stream from `netns` to the server (process `server`), stopped on drop.
struct IperfClient(ChildGuard);

/// Starts [`IperfClient`], retrying while the server is still busy with the previous test,
/// until the server's pod is receiving.
fn iperf_client(netns: &str, to: Ipv4Addr, server: u32) -> Result<IperfClient> {
    for _ in 0..10 {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-c", &to.to_string()])
            .args(["-p", &PORT_IPERF.to_string(), "-t", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -c")?;
        let c = IperfClient(ChildGuard(child));
        let before = interleave::rx_bytes(server)?;
        std::thread::sleep(Duration::from_millis(300));
        if c.alive().is_ok() && interleave::rx_bytes(server)? > before + 1_000_000 {
            return Ok(c);
        }
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("iperf3 -c to {to} did not start a stream in 10 tries")
}

impl IperfClient {
    fn alive(&self) -> Result<()> {
        // Exited but not reaped (we hold it): state Z.
        let pid = self.0.0.id();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            bail!("the iperf3 client exited during the windows");
        }
        Ok(())
    }

    /// Ends the stream with SIGINT (the client then closes the test cleanly, so the server is
    /// free for the next one).
    fn stop(self) {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.0.0.id() as libc::pid_t, libc::SIGINT) };
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Nanoseconds per program run on the real path, by the kernel's own run-time statistics: ours
/// and the empty program on the same hooks, under TCP_RR and under iperf3 traffic.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RealCost {
    pub ours_rr_ns: f64,
    pub ours_iperf_ns: f64,
    pub empty_rr_ns: f64,
    pub empty_iperf_ns: f64,
    /// JIT-compiled size of our programs (`from_pod` + `to_pod`), bytes.
    pub ours_jited_bytes: u32,
}

/// Measures `RealCost`. On entry and on return our programs are attached (the agent gone).
/// Stats are on only here: they add two clock reads to every run, which the empty program's
/// figure shows.
fn real_cost(bed: &Bed, s: &Settings) -> Result<RealCost> {
    use crate::testrun::{ProgStats, attach_empty, enable_run_stats, linked_prog, prog_stats};
    let pin = bed.pins.pin();
    let veths = enforcer::datapath::Datapath::attached_at(&pin)?;
    let mut ours = Vec::new();
    let mut ids = Vec::new();
    for &v in &veths {
        for hook in enforcer::datapath::Hook::ALL {
            let prog = linked_prog(&enforcer::datapath::link_pin(&pin, v, hook))?;
            let id = prog_stats(&prog)?.id;
            if !ids.contains(&id) {
                ids.push(id);
                ours.push(prog);
            }
        }
    }
    let dur = Duration::from_secs_f64(s.pair_rate_secs);
    let warm = Duration::from_secs_f64(s.warmup_secs);
    let total = |progs: &[&std::os::fd::OwnedFd]| -> Result<ProgStats> {
        let mut t = ProgStats::default();
        for p in progs {
            let x = prog_stats(p)?;
            t.run_time_ns += x.run_time_ns;
            t.run_cnt += x.run_cnt;
            t.jited_bytes += x.jited_bytes;
        }
        Ok(t)
    };
    let per_run = |progs: &[&std::os::fd::OwnedFd], run: &dyn Fn() -> Result<()>| -> Result<f64> {
        let a = total(progs)?;
        run()?;
        let b = total(progs)?;
        let runs = b.run_cnt.saturating_sub(a.run_cnt);
        if runs == 0 {
            bail!("the programs did not run");
        }
        Ok(b.run_time_ns.saturating_sub(a.run_time_ns) as f64 / runs as f64)
    };
    let rr = || load::rr(&bed.cli, bed.addr(PORT_RR), warm, dur).map(|_| ());
    let tcp = || iperf(&bed.cli, bed.srv_ip, s.pair_iperf_secs).map(|_| ());
    let _stats = enable_run_stats()?;
    let refs: Vec<&std::os::fd::OwnedFd> = ours.iter().collect();
    let mut out = RealCost {
        ours_rr_ns: per_run(&refs, &rr)?,
        ours_iperf_ns: per_run(&refs, &tcp)?,
        ours_jited_bytes: total(&refs)?.jited_bytes,
        ..RealCost::default()
    };
    for &v in &veths {
        enforcer::datapath::detach_at(&pin, v)?;
    }
    {
        let v = veths.clone();
        let empty = in_netns(&bed.tb.node, move || attach_empty(&v))??;
        bed.expect_no_programs()?;
        out.empty_rr_ns = per_run(&[&empty.prog], &rr)?;
        out.empty_iperf_ns = per_run(&[&empty.prog], &tcp)?;
    }
    bed.reattach(&veths)?;
    if bed.reach(PORT_DENIED)? || !bed.reach(PORT_CRR)? {
        bail!("re-attached programs do not enforce");
    }
    Ok(out)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Toggles the `toggle` policy `s.toggles` times; each time, from the file write (or removal)
/// to the first probe from the client that sees the new verdict.
fn latency(bed: &Bed, s: &Settings) -> Result<Latency> {
    let dir = bed.manifests.0.clone();
    let to = bed.addr(PORT_TOGGLE);
    let toggles = s.toggles;
    let probe_patience = Duration::from_millis(50);
    let (allow, deny, timeouts) =
        in_netns(&bed.cli, move || -> Result<(Vec<f64>, Vec<f64>, usize)> {
            let file = dir.join("30-toggle.yaml");
            let tmp = dir.join(".toggle.tmp");
            if std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok() {
                bail!("the toggle port is open before the toggle policy exists");
            }
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
            let (mut allow, mut deny, mut timeouts) = (Vec::new(), Vec::new(), 0);
            for k in 0..toggles {
                let want = k % 2 == 0;
                // A random pause, so writes fall at every phase of the agent's folder polling.
                std::thread::sleep(Duration::from_millis(150 + rng.next() % 200));
                let t0 = Instant::now();
                if want {
                    std::fs::write(&tmp, inputs::toggle_policy())?;
                    std::fs::rename(&tmp, &file)?;
                } else {
                    std::fs::remove_file(&file)?;
                }
                let SocketAddr::V4(to4) = to else {
                    bail!("the toggle port has an IPv4 address");
                };
                let every = Duration::from_millis(1);
                match load::first_verdict(
                    to4,
                    want,
                    t0,
                    every,
                    probe_patience,
                    Duration::from_secs(10),
                )? {
                    Some(sent) => {
                        let ms = sent.as_secs_f64() * 1e3;
                        if want { allow.push(ms) } else { deny.push(ms) }
                    }
                    None => timeouts += 1,
                }
            }
            Ok((allow, deny, timeouts))
        })??;
    let all: Vec<f64> = allow.iter().chain(deny.iter()).copied().collect();
    Ok(Latency {
        pods: s.remote_pods + 2,
        policies: s.policies + 2,
        p50_ms: percentile(&all, 50.0),
        p90_ms: percentile(&all, 90.0),
        p99_ms: percentile(&all, 99.0),
        max_ms: all.iter().copied().fold(f64::NAN, f64::max),
        allow_ms: allow,
        deny_ms: deny,
        timeouts,
        probe_timeout_ms: probe_patience.as_secs_f64() * 1e3,
        reconcile_mean_ms: f64::NAN,
        compile_mean_ms: f64::NAN,
    })
}

/// Compile time of many policies, pure and in-process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompileResult {
    pub policies: usize,
    pub pods: usize,
    pub parse_secs: f64,
    /// Median of `runs` compiles from fresh allocations.
    pub compile_secs: f64,
    pub compile_runs: Vec<f64>,
    /// A compile reusing the previous allocations (the agent's steady state).
    pub recompile_secs: f64,
    pub policy_entries: usize,
    pub peers: usize,
    pub endpoints: usize,
    pub errors: usize,
    /// The same input with every pod local (1k endpoints).
    pub all_local_compile_secs: f64,
    pub all_local_policy_entries: usize,
    pub all_local_endpoints: usize,
    /// The same input with cluster policies (Admin and Baseline tiers) added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TiersCompileResult>,
}

/// [`CompileResult`]'s input with cluster policies beside the NetworkPolicies.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TiersCompileResult {
    pub cluster_policies: usize,
    /// Median of the runs, fresh allocations each.
    pub compile_secs: f64,
    pub compile_runs: Vec<f64>,
    pub policy_entries: usize,
    /// Entries that deny (`RULE_DENY`).
    pub deny_entries: usize,
    pub errors: usize,
    pub all_local_compile_secs: f64,
    pub all_local_policy_entries: usize,
    pub all_local_deny_entries: usize,
}

pub fn compile_bench(
    policies: usize,
    cluster_policies: usize,
    remote: usize,
    runs: usize,
) -> Result<CompileResult> {
    use enforcer::source::manifests;
    use enforcer_policy::{Allocations, CompileOptions, compile};
    let text = format!(
        "{}---\n{}---\n{}{}---\n{}{}",
        inputs::namespace(),
        inputs::local_pod("cli", Ipv4Addr::new(10, 10, 1, 1), "client"),
        inputs::local_pod("srv", Ipv4Addr::new(10, 10, 2, 1), "srv"),
        inputs::remote_pods(remote),
        inputs::base_policies(),
        inputs::policies(policies),
    );
    let t = Instant::now();
    let mut loaded = manifests::Loaded::default();
    manifests::load_text(Path::new("bench.yaml"), &text, &mut loaded);
    manifests::finish(&mut loaded);
    let parse_secs = t.elapsed().as_secs_f64();
    if !loaded.errors.is_empty() {
        bail!("generated manifests do not load: {}", loaded.errors[0]);
    }
    let opts = CompileOptions {
        node_name: Some(NODE.into()),
        node_ips: vec![IpAddr::V4(NODE_V4)],
        ..Default::default()
    };
    // `runs` compiles from fresh allocations: their times, the last one and its allocations.
    let timed = |cluster: &enforcer_policy::model::Cluster| {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..runs.max(1) {
            let mut alloc = Allocations::new();
            let t = Instant::now();
            let c = compile(cluster, &opts, &mut alloc);
            times.push(t.elapsed().as_secs_f64());
            last = Some((c, alloc));
        }
        let (c, alloc) = last.expect("one run");
        (times, c, alloc)
    };
    let (times, c, mut alloc) = timed(&loaded.cluster);
    let t = Instant::now();
    let _ = compile(&loaded.cluster, &opts, &mut alloc);
    let recompile_secs = t.elapsed().as_secs_f64();
    let all_opts = CompileOptions {
        node_name: None,
        node_ips: vec![IpAddr::V4(NODE_V4)],
        ..Default::default()
    };
    let mut alloc = Allocations::new();
    let t = Instant::now();
    let all = compile(&loaded.cluster, &all_opts, &mut alloc);
    let all_local_compile_secs = t.elapsed().as_secs_f64();

    // The same input with cluster policies beside the NetworkPolicies.
    let tiers = if cluster_policies > 0 {
        let mut loaded = loaded.clone();
        manifests::load_text(
            Path::new("cluster-policies.yaml"),
            &inputs::cluster_policies(cluster_policies),
            &mut loaded,
        );
        manifests::finish(&mut loaded);
        if !loaded.errors.is_empty() {
            bail!(
                "generated cluster policies do not load: {}",
                loaded.errors[0]
            );
        }
        if loaded.cluster.cluster_policies.len() != cluster_policies {
            bail!(
                "{} of {cluster_policies} generated cluster policies loaded",
                loaded.cluster.cluster_policies.len()
            );
        }
        let (times, tc, _) = timed(&loaded.cluster);
        let t = Instant::now();
        let all = compile(&loaded.cluster, &all_opts, &mut Allocations::new());
        let all_local_compile_secs = t.elapsed().as_secs_f64();
        let denies = |c: &enforcer_policy::Compiled| {
            c.state
                .policy
                .values()
                .filter(|v| v.rule & enforcer_common::RULE_DENY != 0)
                .count()
        };
        Some(TiersCompileResult {
            cluster_policies,
            compile_secs: median(&times),
            compile_runs: times,
            policy_entries: tc.state.policy.len(),
            deny_entries: denies(&tc),
            errors: tc.errors.len(),
            all_local_compile_secs,
            all_local_policy_entries: all.state.policy.len(),
            all_local_deny_entries: denies(&all),
        })
    } else {
        None
    };
    Ok(CompileResult {
        tiers,
        policies: policies + 2,
        pods: remote + 2,
        parse_secs,
        compile_secs: median(&times),
        compile_runs: times,
        recompile_secs,
        policy_entries: c.state.policy.len(),
        peers: c.state.peers_v4.len() + c.state.peers_v6.len(),
        endpoints: c.state.endpoints.len(),
        errors: c.errors.len(),
        all_local_compile_secs,
        all_local_policy_entries: all.state.policy.len(),
        all_local_endpoints: all.state.endpoints.len(),
    })
}
