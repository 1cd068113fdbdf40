//! The agent binary end to end in standalone mode, over routed-veth pods in network namespaces:
//! health endpoints, edits applied within a second, a bad edit keeping the last good state,
//! pods coming and going, flows revoked by a policy change, and a SIGKILL + restart + upgrade
//! under traffic without a wrong verdict (with TCX links, and with tc filters upgraded to TCX),
//! and cluster-wide policy: an Admin deny that cuts an established flow and that NetworkPolicy
//! cannot loosen, an Admin pass, a Baseline deny, a deny kept across a restart, and the flow log
//! and metrics of a rule-denied drop.
//!
//! Needs root and `target/release/enforcer` (`cargo xtask test` builds it).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_testkit::netns::{
    AgentProcess, Conn, Proto, Servers, TestPod, Testbed, echo_server, pod_manifest, probe, run,
};

const T: Duration = Duration::from_millis(600);
const READY: Duration = Duration::from_secs(30);

fn ns_yaml() -> &'static str {
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n"
}

/// Ingress of `pod: b` allowed only from `pod: a` on TCP `port`.
fn allow_a_to_b(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-a-to-b\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          pod: a\n    ports:\n    - protocol: TCP\n      port: {port}\n"
    )
}

struct Setup {
    tb: Testbed,
    dir: tempfile::TempDir,
    pods: Vec<TestPod>,
    _servers: Vec<Servers>,
}

fn setup(tag: &str, names: &[&str]) -> Setup {
    Testbed::cleanup_stale(tag);
    let mut tb = Testbed::new(tag).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ns.yaml"), ns_yaml()).unwrap();
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let pod = tb
            .add_pod(
                n,
                Ipv4Addr::new(10, 241, 0, 10 + i as u8),
                Some(format!("fd00:241::{}", 10 + i).parse().unwrap()),
            )
            .unwrap();
        write_pod(dir.path(), &pod, n);
        servers.push(Servers::start(&pod, &[80, 81], n).unwrap());
        pods.push(pod);
    }
    Setup {
        tb,
        dir,
        pods,
        _servers: servers,
    }
}

fn write_pod(dir: &Path, pod: &TestPod, label: &str) {
    std::fs::write(
        dir.join(format!("pod-{}.yaml", pod.name)),
        pod_manifest("x", pod, &[("pod", label)], &[80, 81]),
    )
    .unwrap();
}

fn reach(from: &TestPod, to: &TestPod, port: u16) -> bool {
    probe(&from.netns, IpAddr::V4(to.v4), port, Proto::Tcp, T).unwrap()
}

fn reach6(from: &TestPod, to: &TestPod, port: u16) -> bool {
    probe(&from.netns, IpAddr::V6(to.v6.unwrap()), port, Proto::Tcp, T).unwrap()
}

/// Polls `cond` until true or `timeout`; returns how long it took.
fn within(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// After a policy change: the established `conn` from `from` to `to` stops (its packets
/// dropped, retransmitted, never re-opening it) and no new connection opens.
fn assert_cut(
    agent: &AgentProcess,
    conn: &mut Conn,
    from: &TestPod,
    to: (Ipv4Addr, u16),
    why: &str,
) {
    assert!(
        !conn.ping(),
        "{why}: the established flow stops:\n{}",
        agent.log_text()
    );
    assert!(
        Conn::open(from, to.into()).is_none(),
        "{why}: and no new one opens"
    );
}

#[test]
#[ignore = "needs root"]
fn standalone_health_edits_bad_files_and_pod_lifecycle() {
    let s = setup("e2e-sa", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    let (code, metrics) = agent.get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("enforcer_pods_enforced 3"), "{metrics}");

    // No policy: all pods reach each other, both families.
    assert!(reach(a, b, 80) && reach(c, b, 80) && reach6(c, b, 81));

    // A policy edit applies within a second.
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    let took =
        within(Duration::from_secs(3), || !reach(c, b, 80)).expect("c -> b denied after the edit");
    assert!(took < Duration::from_millis(1000) + T, "took {took:?}");
    agent.wait_ready(READY).unwrap();
    assert!(reach(a, b, 80), "a -> b:80 allowed");
    assert!(!reach(a, b, 81), "a -> b:81 denied");
    assert!(!reach6(c, b, 80), "c -> b denied over IPv6 too");
    assert!(reach(b, c, 80), "c is not isolated");

    // A broken edit (endPort below port) keeps the last valid version enforced.
    let broken = allow_a_to_b(81).replace("port: 81\n", "port: 81\n      endPort: 70\n");
    std::fs::write(s.dir.path().join("policy.yaml"), broken).unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(reach(a, b, 80), "old version still allows a -> b:80");
    assert!(!reach(a, b, 81), "the broken version is not applied");
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        !metrics.contains("enforcer_input_problems 0"),
        "problems are reported: {metrics}"
    );
    assert!(
        agent.log_text().contains("endPort"),
        "the error names the field"
    );
    // A file that does not parse at all: same.
    std::fs::write(s.dir.path().join("policy.yaml"), "kind: [unclosed").unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(reach(a, b, 80) && !reach(c, b, 80), "last good file kept");

    // Relabel: c takes a's label and gains access; a loses it.
    write_pod(s.dir.path(), c, "a");
    write_pod(s.dir.path(), a, "z");
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(
        within(Duration::from_secs(2), || reach(c, b, 80)).is_some(),
        "relabelled c allowed"
    );
    assert!(!reach(a, b, 80), "relabelled a denied");

    // A pod whose manifest comes before its veth: pending (not ready), then enforced.
    let mut tb = s.tb;
    let d_ip = Ipv4Addr::new(10, 241, 0, 20);
    let d_stub = TestPod {
        name: "d".into(),
        netns: String::new(),
        host_if: String::new(),
        v4: d_ip,
        v6: None,
    };
    write_pod(s.dir.path(), &d_stub, "b");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.get("/readyz").unwrap().0,
        503,
        "a pod without its interface is not programmed yet"
    );
    let d = tb.add_pod("d", d_ip, None).unwrap();
    let _sd = Servers::start(&d, &[80], "d").unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(!reach(a, &d, 80), "new pod d (pod: b) is isolated");
    assert!(reach(c, &d, 80), "and allows pod: a");

    // Deleting the pod detaches and forgets it.
    std::fs::remove_file(s.dir.path().join("pod-d.yaml")).unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(
        within(Duration::from_secs(2), || reach(a, &d, 80)).is_some(),
        "a deleted pod is no longer enforced"
    );
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(metrics.contains("enforcer_pods_enforced 3"), "{metrics}");
    // Every enforced pod's veth has its endpoint slot (the fast path's copy of ENDPOINTS).
    if enforcer::datapath::slots::SLOTS_SUPPORTED {
        let slots = "enforcer_map_entries{map=\"ENDPOINT_SLOTS\"} 3";
        let m = agent.metrics_until(Duration::from_secs(5), |m| m.contains(slots));
        assert!(m.contains(slots), "{m}");
    }
    // Every pod and node address is in the peer cache (a handful of addresses: no bucket full).
    let entries = |m: &str, map: &str| -> Option<u64> {
        let key = format!("enforcer_map_entries{{map=\"{map}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str())?.parse().ok())
    };
    let peers = entries(&metrics, "PEERS_V4");
    assert!(peers.is_some_and(|n| n >= 4), "{metrics}");
    assert_eq!(entries(&metrics, "PEER_SLOTS"), peers, "{metrics}");

    // Deleting the policy opens everything again.
    std::fs::remove_file(s.dir.path().join("policy.yaml")).unwrap();
    assert!(
        within(Duration::from_secs(2), || reach(a, b, 80)
            && reach(a, b, 81))
        .is_some()
    );
    agent.stop().unwrap();
}

#[test]
#[ignore = "needs root"]
fn policy_change_revokes_established_flows_it_no_longer_allows() {
    let s = setup("e2e-rv", &["a", "b"]);
    let (a, b) = (&s.pods[0], &s.pods[1]);
    let stop = Arc::new(AtomicBool::new(false));
    echo_server(b, 7000, stop.clone());
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(7000)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let mut conn = Conn::open(a, (b.v4, 7000).into()).expect("a -> b:7000 allowed");
    assert!(conn.ping());
    // An unrelated edit keeps the flow.
    std::fs::write(
        s.dir.path().join("other.yaml"),
        allow_a_to_b(7001).replace("allow-a-to-b", "other"),
    )
    .unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(conn.ping(), "a flow still allowed survives a policy change");
    // Revoking the port cuts the established flow, not only new ones.
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(7002)).unwrap();
    agent.wait_applied(READY).unwrap();
    // The ping is dropped and retransmitted; b retransmits its unacknowledged last reply too.
    // Neither may re-open the flow (b's egress is not isolated: a forgotten flow would be
    // re-tracked from b's side, and a's packets would pass as its replies).
    assert_cut(&agent, &mut conn, a, (b.v4, 7000), "revoked");
    let revoked_counted = |m: &str| {
        m.lines()
            .any(|l| l.contains("reason=\"revoked\"") && !l.ends_with(" 0"))
    };
    let m = agent.metrics_until(Duration::from_secs(3), revoked_counted);
    assert!(revoked_counted(&m), "{m}");
    stop.store(true, Ordering::Relaxed);
    agent.stop().unwrap();
}

/// Ingress of `pod: c` isolated with no rule: an audit policy when `audit`.
fn lock_c(audit: bool) -> String {
    let annotation = if audit {
        "  annotations:\n    enforcer.dev/audit: \"true\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: lock-c\n  namespace: x\n{annotation}spec:\n  podSelector:\n    matchLabels:\n      pod: c\n  policyTypes: [Ingress]\n"
    )
}

/// The flow log's would-drop lines naming `policy`, for traffic to `dst`.
fn would_drop_logged(log: &str, policy: &str, dst: Ipv4Addr) -> bool {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["verdict"] == "would-drop"
                && v["reason"] == "audit"
                && v["policy"] == policy
                && v["dst"] == dst.to_string()
        })
}

/// `enforcer_packets_total{verdict="would-drop",...}` above zero.
fn would_drop_counted(m: &str) -> bool {
    m.lines().any(|l| {
        l.starts_with("enforcer_packets_total{verdict=\"would-drop\"") && !l.ends_with(" 0")
    })
}

#[test]
#[ignore = "needs root"]
fn an_audit_policy_lets_traffic_through_and_switching_it_to_enforce_cuts_its_flows() {
    let s = setup("e2e-au", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    let stop = Arc::new(AtomicBool::new(false));
    echo_server(c, 7000, stop.clone());
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    std::fs::write(s.dir.path().join("lock-c.yaml"), lock_c(true)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    // The audit policy denies nothing: what it would deny passes, logged and counted as
    // would-drop naming it.
    assert!(reach(b, c, 80), "b -> c allowed under audit");
    let mut conn = Conn::open(a, (c.v4, 7000).into()).expect("a -> c:7000 allowed under audit");
    assert!(conn.ping());
    assert!(
        within(Duration::from_secs(3), || would_drop_logged(
            &agent.log_text(),
            "x/lock-c",
            c.v4
        ))
        .is_some(),
        "a would-drop line names the audit policy:\n{}",
        agent.log_text()
    );
    let m = agent.metrics_until(Duration::from_secs(3), would_drop_counted);
    assert!(would_drop_counted(&m), "{m}");
    // The enforcing policy beside it still drops, as drops.
    assert!(!reach(c, b, 80), "c -> b denied by the enforcing policy");
    assert!(reach(a, b, 80), "a -> b allowed by it");
    // Switched to enforce: the established would-drop flow is cut, new ones are denied.
    std::fs::write(s.dir.path().join("lock-c.yaml"), lock_c(false)).unwrap();
    agent.wait_applied(READY).unwrap();
    assert_cut(&agent, &mut conn, a, (c.v4, 7000), "its policy enforces");
    assert!(!reach(b, c, 80), "b -> c denied");
    stop.store(true, Ordering::Relaxed);
    agent.stop().unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_namespace_annotation_or_the_audit_flag_make_every_policy_audit() {
    let s = setup("e2e-an", &["a", "b", "c"]);
    let (b, c) = (&s.pods[1], &s.pods[2]);
    let audited_ns = format!(
        "{}metadata:\n  name: x\n  annotations:\n    enforcer.dev/audit: \"true\"\n",
        ns_yaml().split("metadata:").next().unwrap()
    );
    std::fs::write(s.dir.path().join("ns.yaml"), &audited_ns).unwrap();
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(reach(c, b, 80), "c -> b allowed: its namespace audits");
    assert!(
        within(Duration::from_secs(3), || would_drop_logged(
            &agent.log_text(),
            "x/allow-a-to-b",
            b.v4
        ))
        .is_some(),
        "{}",
        agent.log_text()
    );
    // The annotation gone, the policy enforces.
    std::fs::write(s.dir.path().join("ns.yaml"), ns_yaml()).unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(
        !reach(c, b, 80),
        "c -> b denied once the namespace enforces"
    );
    agent.stop().unwrap();
    // `--audit`: every policy audits.
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &["--audit"]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(reach(c, b, 80), "c -> b allowed with --audit");
    let m = agent.metrics_until(Duration::from_secs(3), would_drop_counted);
    assert!(would_drop_counted(&m), "{m}");
    agent.stop().unwrap();
}

/// A bpffs mounted outside /sys (which `ip netns exec` remounts), so pins outlive the agent.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!("/run/enforcer-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        run("mount", &["-t", "bpf", "bpf", p.to_str().unwrap()]).unwrap();
        Self(p)
    }
    fn pin_path(&self) -> String {
        self.0.join("enforcer").display().to_string()
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = run("umount", &[self.0.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "needs root"]
fn sigkill_restart_and_upgrade_keep_enforcing_without_a_wrong_verdict() {
    crash_restart_upgrade("rs", "auto", "auto");
}

/// The same with tc (clsact) filters, as on kernels without TCX; the upgrade switches to TCX
/// links under traffic.
#[test]
#[ignore = "needs root"]
fn tc_filters_through_crash_restart_and_an_upgrade_to_tcx() {
    crash_restart_upgrade("rt", "tc", "tcx");
}

/// Whether `pod`'s host-side veth has our tc (cls_bpf) filter on its egress hook.
fn has_tc_filter(tb: &Testbed, pod: &TestPod) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &tb.node, "tc", "filter", "show", "dev"])
        .args([pod.host_if.as_str(), "egress"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("to_pod")
}

/// Traffic throughout an agent in `mode` that is SIGKILLed and restarted, then upgraded to
/// another binary running in `upgrade_mode`: no wrong verdict, the established flow survives,
/// and `enforcer cleanup` removes everything.
fn crash_restart_upgrade(tag: &str, mode: &str, upgrade_mode: &str) {
    let s = setup(&format!("e2e-{tag}"), &["a", "b", "c"]);
    let (a, b, c) = (s.pods[0].clone(), s.pods[1].clone(), s.pods[2].clone());
    let bpf = BpfMount::new(tag);
    let pin = bpf.pin_path();
    let args = ["--pin-path", pin.as_str(), "--attach-mode", mode];
    let upgrade_args = ["--pin-path", pin.as_str(), "--attach-mode", upgrade_mode];
    let stop = Arc::new(AtomicBool::new(false));
    echo_server(&b, 7000, stop.clone());
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(7000)).unwrap();
    // A policy gone before the crash whose ipBlock region's identity sorted before the pods':
    // numbered afresh at the restart, theirs would all move.
    let gone = s.dir.path().join("policy-gone.yaml");
    std::fs::write(
        &gone,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: gone\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 10.99.0.0/16\n    ports:\n    - protocol: TCP\n      port: 9999\n",
    )
    .unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &args).unwrap();
    agent.wait_ready(READY).unwrap();
    assert_eq!(
        has_tc_filter(&s.tb, &b),
        mode == "tc",
        "tc filter on b's veth in {mode} mode"
    );
    std::fs::remove_file(&gone).unwrap();

    // Traffic throughout: an established flow, new allowed connections, new denied ones.
    let mut conn = Conn::open(&a, (b.v4, 7000).into()).expect("allowed");
    let wrong = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let looper = {
        let (stop, wrong, probes, a, b, c) = (
            stop.clone(),
            wrong.clone(),
            probes.clone(),
            a.clone(),
            b.clone(),
            c.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !reach(&a, &b, 7000) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    eprintln!("wrong verdict: a -> b:7000 denied");
                }
                if reach(&c, &b, 7000) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                    eprintln!("wrong verdict: c -> b:7000 allowed");
                }
                probes.fetch_add(2, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Crash.
    agent.kill();
    for _ in 0..5 {
        assert!(
            conn.ping(),
            "the established flow works while the agent is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Restart: adopts the pins, becomes ready.
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &args).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(conn.ping(), "established flow survives the restart");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        agent.log_text().contains("took over 3 pinned interfaces"),
        "{}",
        agent.log_text()
    );
    // a, b and c keep the identity numbers the pinned maps gave them, so the first reconcile
    // writes only the three endpoint entries (their epochs move: flows are re-checked once).
    assert!(
        agent
            .log_text()
            .contains("restored the numbers of 3 identities"),
        "{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("programmed: 3 written, 0 removed"),
        "{}",
        agent.log_text()
    );
    // Upgrade: another binary takes over the pinned links atomically.
    let new_bin =
        std::env::temp_dir().join(format!("enforcer-upgrade-{tag}-{}", std::process::id()));
    std::fs::copy(enforcer_testkit::netns::agent_binary().unwrap(), &new_bin).unwrap();
    agent.stop().unwrap();
    let mut agent =
        AgentProcess::start_binary(&new_bin, &s.tb, s.dir.path(), &upgrade_args).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(
        agent.log_text().contains("took over 3 pinned interfaces"),
        "{}",
        agent.log_text()
    );
    assert!(conn.ping(), "established flow survives the upgrade");
    assert_eq!(
        has_tc_filter(&s.tb, &b),
        upgrade_mode == "tc",
        "tc filter on b's veth after the upgrade to {upgrade_mode} mode"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let _ = std::fs::remove_file(&new_bin);
    assert!(probes.load(Ordering::Relaxed) >= 8, "the probe loop ran");
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "no wrong verdict during crash, restart and upgrade"
    );
    agent.stop().unwrap();
    // `enforcer cleanup` removes programs and pins: c reaches b again.
    assert!(!reach(&c, &b, 80), "enforced before cleanup");
    run(
        "ip",
        &[
            "netns",
            "exec",
            &s.tb.node,
            enforcer_testkit::netns::agent_binary()
                .unwrap()
                .to_str()
                .unwrap(),
            "cleanup",
            "--pin-path",
            &pin,
        ],
    )
    .unwrap();
    assert!(reach(&c, &b, 80), "no enforcement after cleanup");
    assert!(
        std::fs::read_dir(&pin).map_or(true, |mut d| d.next().is_none()),
        "pins removed"
    );
}

// ---------------------------------------------------------------------------------------------
// Cluster-wide policy (docs/cluster-policy.md): the Admin tier before NetworkPolicy, the
// Baseline tier after it.

/// An Admin-tier ClusterNetworkPolicy at `priority` on the ingress of `pod: to`: one rule
/// named `rule` with `action` from `pod: from` (any namespace), on TCP `port` or every port.
fn admin_rule(
    name: &str,
    priority: u32,
    rule: &str,
    action: &str,
    (from, to): (&str, &str),
    port: Option<u16>,
) -> String {
    let protocols = port
        .map(|p| format!("    protocols: [{{tcp: {{destinationPort: {{number: {p}}}}}}}]\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {priority}\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{pod: {to}}}}}}}}}\n  ingress:\n  - name: {rule}\n    action: {action}\n    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{pod: {from}}}}}}}}}]\n{protocols}"
    )
}

/// The guardrail of these tests: `ClusterNetworkPolicy/guard` denies `pod: a` to `pod: b`
/// on TCP `port`.
fn guard(port: u16) -> String {
    admin_rule("guard", 10, "no-a-to-b", "Deny", ("a", "b"), Some(port))
}

/// What the flow log prints for the guard's rule.
const GUARD_RULE: &str = r#"ClusterNetworkPolicy/guard ingress[0] "no-a-to-b" (Admin, Deny)"#;

#[test]
#[ignore = "needs root"]
fn an_admin_deny_cuts_an_established_flow_and_a_network_policy_cannot_loosen_it() {
    let s = setup("e2e-ad", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    let stop = Arc::new(AtomicBool::new(false));
    echo_server(b, 7000, stop.clone());
    // The NetworkPolicy allows a -> b:7000 (and isolates b to that).
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(7000)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let mut conn = Conn::open(a, (b.v4, 7000).into()).expect("a -> b:7000 allowed");
    assert!(conn.ping());
    // The guardrail written into the folder: the Admin tier decides before NetworkPolicy.
    std::fs::write(s.dir.path().join("guard.yaml"), guard(7000)).unwrap();
    agent.wait_applied(READY).unwrap();
    // The NetworkPolicy's allow does not keep it, nor let a new one open.
    assert_cut(&agent, &mut conn, a, (b.v4, 7000), "Admin deny");
    assert!(!reach6(a, b, 7000), "nor over IPv6");
    assert!(reach(b, a, 80), "what the guard does not name still passes");
    assert!(
        !reach(c, b, 7000),
        "c -> b stays denied by the NetworkPolicy"
    );
    let (_, status) = agent.get("/readyz").unwrap();
    assert!(
        !status.contains("refused"),
        "the guard is enforced: {status}"
    );
    stop.store(true, Ordering::Relaxed);
    agent.stop().unwrap();
}

#[test]
#[ignore = "needs root"]
fn an_admin_pass_hands_the_decision_to_network_policy() {
    let s = setup("e2e-ap", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    // A later Admin rule denies every port of a -> b.
    std::fs::write(
        s.dir.path().join("deny.yaml"),
        admin_rule("deny-a", 20, "all", "Deny", ("a", "b"), None),
    )
    .unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(!reach(a, b, 80), "the Admin deny beats the NetworkPolicy");
    // An earlier Pass skips the rest of the Admin tier: NetworkPolicy decides.
    std::fs::write(
        s.dir.path().join("pass.yaml"),
        admin_rule("pass-a", 5, "to-np", "Pass", ("a", "b"), None),
    )
    .unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(
        reach(a, b, 80),
        "passed: the NetworkPolicy allows a -> b:80"
    );
    assert!(
        !reach(a, b, 81),
        "passed: the NetworkPolicy isolates b to port 80"
    );
    assert!(
        !reach(c, b, 80),
        "c is not passed, nor allowed by the NetworkPolicy"
    );
    agent.stop().unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_baseline_deny_denies_where_no_network_policy_isolates() {
    let s = setup("e2e-bd", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    std::fs::write(s.dir.path().join("policy.yaml"), allow_a_to_b(80)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(reach(b, c, 80), "c is not isolated: allowed by default");
    // Baseline: deny every ingress from pods.
    std::fs::write(
        s.dir.path().join("baseline.yaml"),
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec:\n  subject: {namespaces: {}}\n  ingress:\n  - name: default-deny\n    action: Deny\n    from: [{namespaces: {}}]\n",
    )
    .unwrap();
    agent.wait_applied(READY).unwrap();
    assert!(
        !reach(b, c, 80),
        "no NetworkPolicy isolates c: the Baseline deny decides"
    );
    assert!(!reach(a, c, 81), "for every pod and port");
    assert!(
        reach(a, b, 80),
        "b is isolated by a NetworkPolicy, which decides before the Baseline"
    );
    assert!(!reach(c, b, 80), "and denies what it does not allow");
    agent.stop().unwrap();
}

#[test]
#[ignore = "needs root"]
fn an_admin_deny_keeps_holding_after_an_agent_restart() {
    let s = setup("e2e-ar", &["a", "b", "c"]);
    let (a, b, c) = (&s.pods[0], &s.pods[1], &s.pods[2]);
    let bpf = BpfMount::new("ar");
    let pin = bpf.pin_path();
    let args = ["--pin-path", pin.as_str()];
    std::fs::write(s.dir.path().join("guard.yaml"), guard(80)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &args).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(!reach(a, b, 80), "the guard denies a -> b:80");
    assert!(reach(a, b, 81) && reach(c, b, 80), "and nothing else");
    agent.kill();
    assert!(
        !reach(a, b, 80),
        "the pinned programs deny while the agent is down"
    );
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &args).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(
        !reach(a, b, 80),
        "the deny holds after the restart:\n{}",
        agent.log_text()
    );
    assert!(reach(a, b, 81) && reach(c, b, 80), "nothing else is denied");
    // The pins go with the bpffs mount, the links with the namespaces (also on a failure).
    agent.stop().unwrap();
}

/// The flow log's lines of a drop by a deny rule, for traffic to `dst`.
fn rule_denied_logged(log: &str, rule: &str, dst: Ipv4Addr) -> bool {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["verdict"] == "dropped"
                && v["reason"] == "rule-denied"
                && v["policy"] == rule
                && v["dst"] == dst.to_string()
        })
}

#[test]
#[ignore = "needs root"]
fn the_flow_log_and_metrics_name_a_drop_by_a_tier_deny_rule() {
    let s = setup("e2e-fl", &["a", "b"]);
    let (a, b) = (&s.pods[0], &s.pods[1]);
    std::fs::write(s.dir.path().join("guard.yaml"), guard(80)).unwrap();
    let mut agent = AgentProcess::start(&s.tb, s.dir.path(), &["--flow-log", "stdout"]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert!(!reach(a, b, 80), "the guard denies a -> b:80");
    assert!(
        within(Duration::from_secs(3), || rule_denied_logged(
            &agent.log_text(),
            GUARD_RULE,
            b.v4
        ))
        .is_some(),
        "a dropped/rule-denied line names the tier rule:\n{}",
        agent.log_text()
    );
    let counted = |m: &str| {
        m.lines().any(|l| {
            l.starts_with("enforcer_packets_total{verdict=\"dropped\",reason=\"rule-denied\"}")
                && !l.ends_with(" 0")
        })
    };
    let m = agent.metrics_until(Duration::from_secs(3), counted);
    assert!(counted(&m), "{m}");
    agent.stop().unwrap();
}
