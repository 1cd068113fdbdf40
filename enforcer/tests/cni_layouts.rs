//! The agent binary over the pod-network layouts it meets in clusters: a flannel-like bridge
//! (`cni0`), interfaces that are not a pod's own veth (reported, never attached to), and a
//! routed pod whose route disappears for a moment (a CNI restart), which must not open it.
//! Needs root; namespaces, agents and folders go away even when an assertion fails.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer_testkit::netns::{
    AgentProcess, BRIDGE, Layout, Proto, Servers, TestPod, Testbed, in_netns, pod_manifest, probe,
};

const T: Duration = Duration::from_millis(600);
const READY: Duration = Duration::from_secs(30);

/// The agent built with these tests, unless `ENFORCER_BIN` names another.
fn agent_bin() -> PathBuf {
    std::env::var_os("ENFORCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_enforcer").into())
}

/// Field order is drop order: the agent, the servers, the namespaces, the folder.
struct Bed {
    agent: Option<AgentProcess>,
    _servers: Vec<Servers>,
    tb: Testbed,
    dir: tempfile::TempDir,
}

impl Bed {
    /// A node in `layout` with `pods` (name, address) in namespace `x`, labelled `pod: <name>`,
    /// serving TCP and UDP on 80; the agent not started yet.
    fn new(tag: &str, layout: Layout, pods: &[(&str, Ipv4Addr)]) -> Self {
        Testbed::cleanup_stale(tag);
        let mut tb = Testbed::with_layout(tag, layout).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
        )
        .unwrap();
        let mut servers = Vec::new();
        for (name, ip) in pods {
            let pod = tb.add_pod(name, *ip, None).unwrap();
            write_pod(dir.path(), &pod);
            servers.push(Servers::start(&pod, &[80], name).unwrap());
        }
        Self {
            agent: None,
            _servers: servers,
            tb,
            dir,
        }
    }

    fn start(&mut self, extra: &[&str]) -> &mut AgentProcess {
        let agent = AgentProcess::start_binary(&agent_bin(), &self.tb, self.dir.path(), extra)
            .expect("starting the agent");
        self.agent.insert(agent)
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("started")
    }

    fn pod(&self, name: &str) -> &TestPod {
        self.tb.pod(name).expect("a pod of the bed")
    }

    fn reach(&self, from: &str, to: &str) -> bool {
        let to = IpAddr::V4(self.pod(to).v4);
        probe(&self.pod(from).netns, to, 80, Proto::Tcp, T).unwrap()
    }

    /// Writes a file into the manifests folder atomically.
    fn write(&self, file: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
    }

    /// ifindex of `name` in the node namespace.
    fn ifindex(&self, name: &str) -> u32 {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: a valid NUL-terminated name.
        in_netns(&self.tb.node, move || unsafe {
            libc::if_nametoindex(name.as_ptr())
        })
        .unwrap()
    }

    /// Every ifindex the agent's log says it attached to.
    fn attached(&mut self) -> BTreeSet<u32> {
        let log = self.agent().log_text();
        let mut out = BTreeSet::new();
        for l in log.lines() {
            if let Some(list) = l
                .split("attached [")
                .nth(1)
                .and_then(|r| r.split(']').next())
            {
                out.extend(
                    list.split(", ")
                        .filter_map(|i| i.trim().parse::<u32>().ok()),
                );
            }
        }
        out
    }
}

fn write_pod(dir: &Path, pod: &TestPod) {
    std::fs::write(
        dir.join(format!("pod-{}.yaml", pod.name)),
        pod_manifest("x", pod, &[("pod", &pod.name)], &[80]),
    )
    .unwrap();
}

/// One metric's value (its full name with labels, as rendered), or 0.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Ingress of `pod: <to>` only from `pod: <from>` on TCP 80.
fn only_from(to: &str, from: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: only-{from}-to-{to}\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: {to}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          pod: {from}\n    ports:\n    - protocol: TCP\n      port: 80\n"
    )
}

fn bridge_layout() -> Layout {
    Layout::Bridge {
        gateway: Ipv4Addr::new(10, 245, 0, 1),
        prefix_len: 24,
    }
}

/// On a flannel-like node (the pods' veths are ports of `cni0`, no route per pod), every pod
/// gets its programs on its own bridge port, found through the bridge's neighbour and
/// forwarding entries, and none on `cni0`: each pod is enforced, and traffic bridged between
/// two pods of the bridge is judged on both of their veths.
#[test]
#[ignore = "needs root"]
fn bridge_layout_each_pod_is_enforced_on_its_own_bridge_port() {
    let ip = |k| Ipv4Addr::new(10, 245, 0, k);
    let mut bed = Bed::new(
        "cnb",
        bridge_layout(),
        &[("a", ip(10)), ("b", ip(11)), ("c", ip(12))],
    );
    bed.start(&["--per-pod-metrics"]).wait_ready(READY).unwrap();
    let (_, m) = bed.agent().get("/metrics").unwrap();
    assert_eq!(metric(&m, "enforcer_pods_enforced"), 3.0, "{m}");
    let ports: BTreeSet<u32> = ["a", "b", "c"]
        .iter()
        .map(|p| bed.ifindex(&bed.pod(p).host_if.clone()))
        .collect();
    assert_eq!(bed.attached(), ports, "each pod's own port, nothing else");
    assert!(!bed.attached().contains(&bed.ifindex(BRIDGE)));

    assert!(bed.reach("a", "b") && bed.reach("c", "b"), "no policy yet");
    bed.write("np.yaml", &only_from("b", "a"));
    bed.agent().wait_applied(READY).unwrap();
    assert!(bed.reach("a", "b"), "a -> b allowed");
    assert!(!bed.reach("c", "b"), "c -> b denied on b's port");
    assert!(
        bed.reach("b", "c") && bed.reach("a", "c"),
        "c is not isolated"
    );
    // What the programs counted, per pod: c's and b's ports both saw the bridged traffic.
    let m = bed.agent().metrics_until(Duration::from_secs(3), |t| {
        metric(
            t,
            "enforcer_pod_packets_total{pod=\"x/b\",verdict=\"dropped\",reason=\"policy-denied\"}",
        ) >= 1.0
    });
    assert!(
        metric(
            &m,
            "enforcer_pod_packets_total{pod=\"x/b\",verdict=\"dropped\",reason=\"policy-denied\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "enforcer_pod_packets_total{pod=\"x/c\",verdict=\"allowed\",reason=\"not-isolated\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_packets_total{verdict=\"dropped\",reason=\"spoofed\"}"
        ),
        0.0,
        "nothing routed is taken for spoofed: {m}"
    );
}

/// Pods whose address leads to an interface that is not their own veth (a veth whose other end
/// is on the node, a /24 routed through another pod's veth) and a pod whose interface is not
/// found at all (an address on a bridge that no pod answers on) are never attached to: each is
/// named, with why, on `/readyz` (503), on `/metrics`, in `enforcer status` and in a warning,
/// while the node's other pods are enforced.
#[test]
#[ignore = "needs root"]
fn pods_without_their_own_veth_are_reported_not_enforced() {
    let mut bed = Bed::new(
        "cnu",
        Layout::Routed,
        &[("a", Ipv4Addr::new(10, 246, 0, 10))],
    );
    let stub = |name: &str, k| TestPod {
        name: name.into(),
        netns: String::new(),
        host_if: String::new(),
        v4: Ipv4Addr::new(10, 246, k, 5),
        v6: None,
    };
    // u: a /32 through a veth whose both ends are on the node.
    bed.tb
        .node_exec(&[
            "ip", "link", "add", "vx0", "type", "veth", "peer", "name", "vx1",
        ])
        .unwrap();
    bed.tb
        .node_exec(&["ip", "link", "set", "vx0", "up"])
        .unwrap();
    bed.tb
        .node_exec(&["ip", "link", "set", "vx1", "up"])
        .unwrap();
    bed.tb
        .node_exec(&["ip", "route", "add", "10.246.1.5/32", "dev", "vx0"])
        .unwrap();
    // v: a /24 through pod a's veth.
    let a_if = bed.pod("a").host_if.clone();
    bed.tb
        .node_exec(&["ip", "route", "add", "10.246.2.0/24", "dev", &a_if])
        .unwrap();
    // w: an address on a bridge with no port answering for it.
    bed.tb
        .node_exec(&["ip", "link", "add", "br9", "type", "bridge"])
        .unwrap();
    bed.tb
        .node_exec(&["ip", "addr", "add", "10.246.3.1/24", "dev", "br9"])
        .unwrap();
    bed.tb
        .node_exec(&["ip", "link", "set", "br9", "up"])
        .unwrap();
    for (name, k) in [("u", 1), ("v", 2), ("w", 3)] {
        write_pod(bed.dir.path(), &stub(name, k));
    }
    let a_index = bed.ifindex(&a_if);
    bed.start(&[]);
    let readyz = {
        let start = Instant::now();
        loop {
            let (code, body) = bed.agent().get("/readyz").unwrap_or_default();
            if body.contains("not enforced: x/w") || start.elapsed() > READY {
                break (code, body);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(readyz.0, 503, "{}", readyz.1);
    for (pod, says) in [
        ("x/u", "other end is on the node"),
        ("x/v", "a /24 through veth"),
        ("x/w", "on bridge br9"),
    ] {
        assert!(
            readyz
                .1
                .lines()
                .any(|l| l.starts_with(&format!("not enforced: {pod}: ")) && l.contains(says)),
            "{pod} ({says}) in /readyz:\n{}",
            readyz.1
        );
    }
    let m = bed.agent().metrics_until(Duration::from_secs(3), |t| {
        metric(t, "enforcer_pods_not_enforced{reason=\"not-own-veth\"}") == 2.0
    });
    assert_eq!(
        metric(&m, "enforcer_pods_not_enforced{reason=\"not-own-veth\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "enforcer_pods_not_enforced{reason=\"no-interface\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_pod_not_enforced{pod=\"x/u\",reason=\"not-own-veth\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "enforcer_pods_enforced"), 1.0, "a is enforced");
    // `enforcer status` where the health address is: in the node namespace.
    let health = bed.agent().health.to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &bed.tb.node])
        .arg(agent_bin())
        .args(["status", "--health-addr", &health])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("NOT ENFORCED") && status.contains("x/u") && status.contains("x/w"),
        "{status}"
    );
    let log = bed.agent().log_text();
    assert!(
        log.contains("x/u is NOT ENFORCED") && log.contains("x/v is NOT ENFORCED"),
        "{log}"
    );
    assert_eq!(
        bed.attached(),
        BTreeSet::from([a_index]),
        "only a's own veth"
    );
}

/// Sends UDP datagrams from `from` to `to`:`port` every 20 ms until `stop`; counts the sends.
fn keep_sending(
    from: &TestPod,
    to: Ipv4Addr,
    port: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let netns = from.netns.clone();
    std::thread::spawn(move || {
        in_netns(&netns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if sock.send_to(b"leak", (to, port)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap();
    })
}

/// Counts the UDP datagrams `pod` receives on `port` until `stop`.
fn keep_counting(
    pod: &TestPod,
    port: u16,
    stop: Arc<AtomicBool>,
    got: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let netns = pod.netns.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .unwrap();
    });
    rx.recv().unwrap();
    h
}

const DENY_A: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-a\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: a\n  policyTypes: [Ingress, Egress]\n";

/// A default-deny pod whose /32 route is deleted for 3 s (as a CNI restart may) while it sends:
/// it keeps its programs and entries (its veth still exists), so nothing it sends passes,
/// during the gap or after; the agent says it kept them.
#[test]
#[ignore = "needs root"]
fn a_default_deny_pod_whose_route_disappears_for_3s_passes_nothing() {
    let mut bed = Bed::new(
        "cnr",
        Layout::Routed,
        &[
            ("a", Ipv4Addr::new(10, 247, 0, 10)),
            ("b", Ipv4Addr::new(10, 247, 0, 11)),
        ],
    );
    bed.write("deny.yaml", DENY_A);
    bed.start(&[]).wait_ready(READY).unwrap();
    assert!(!bed.reach("a", "b"), "a's egress is denied");
    let (stop, sent, got) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let counting = keep_counting(bed.pod("b"), 7000, stop.clone(), got.clone());
    let sending = keep_sending(
        bed.pod("a"),
        bed.pod("b").v4,
        7000,
        stop.clone(),
        sent.clone(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (a_route, a_if) = (
        format!("{}/32", bed.pod("a").v4),
        bed.pod("a").host_if.clone(),
    );
    bed.tb
        .node_exec(&["ip", "route", "del", &a_route, "dev", &a_if])
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    bed.tb
        .node_exec(&["ip", "route", "add", &a_route, "dev", &a_if])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    sending.join().unwrap();
    counting.join().unwrap();
    assert!(sent.load(Ordering::Relaxed) > 100, "a kept sending");
    assert_eq!(
        got.load(Ordering::Relaxed),
        0,
        "datagrams of a default-deny pod got through while its route was gone"
    );
    let log = bed.agent().log_text();
    assert!(log.contains("keeping its programs"), "{log}");
    assert!(
        log.lines()
            .all(|l| !l.contains("detached [") || l.contains("detached []")),
        "nothing detached:\n{log}"
    );
    assert!(!bed.reach("a", "b"), "still denied");
}

/// The converse: a pod that leaves the cluster (its manifest removed) while its veth stays is
/// detached, and its traffic is no longer judged.
#[test]
#[ignore = "needs root"]
fn a_pod_gone_from_the_cluster_is_detached() {
    let mut bed = Bed::new(
        "cng",
        Layout::Routed,
        &[
            ("a", Ipv4Addr::new(10, 248, 0, 10)),
            ("b", Ipv4Addr::new(10, 248, 0, 11)),
        ],
    );
    bed.write("deny.yaml", DENY_A);
    bed.start(&[]).wait_ready(READY).unwrap();
    assert!(!bed.reach("a", "b"));
    let a_index = bed.ifindex(&bed.pod("a").host_if.clone());
    std::fs::remove_file(bed.dir.path().join("pod-a.yaml")).unwrap();
    bed.agent().wait_applied(READY).unwrap();
    assert!(
        bed.agent()
            .log_text()
            .contains(&format!("detached [{a_index}]"))
    );
    assert!(bed.reach("a", "b"), "no longer judged");
}
