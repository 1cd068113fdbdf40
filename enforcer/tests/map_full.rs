//! A full map does not stop the job (the agent binary end to end, standalone mode, routed-veth
//! pods in network namespaces): with a tiny `--policy-map-size` the pod whose allow rules do not
//! fit is denied (never open), `/readyz` is 503 and names it, pods that come afterwards are
//! still enforced, and once policies are deleted so that everything fits it converges; with a
//! small `--max-endpoints` the pod that gets no endpoint is attached all the same and denied
//! both ways, until an endpoint frees up. The peers maps grow (new maps filled, then swapped
//! in) under traffic without a gap, and are replaced by maps of another size across a restart
//! without one; at their ceiling, the addresses left out are denied what their pod selectors
//! would allow, while every other pod keeps being programmed.
//!
//! Needs root and the agent binary (`cargo test --release` builds it).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use enforcer_testkit::netns::{
    AgentProcess, BpfMount, Conn, Proto, Servers, TestPod, Testbed, echo_server, pod_manifest_on,
    probe,
};

const T: Duration = Duration::from_millis(600);
const WAIT: Duration = Duration::from_secs(30);
const GROW_WAIT: Duration = Duration::from_secs(90);

struct Setup {
    tb: Testbed,
    dir: tempfile::TempDir,
    pods: Vec<TestPod>,
    servers: Vec<Servers>,
}

impl Setup {
    fn new(tag: &str, names: &[&str]) -> Self {
        Testbed::cleanup_stale(tag);
        let tb = Testbed::new(tag).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
        )
        .unwrap();
        let mut s = Self {
            tb,
            dir,
            pods: Vec::new(),
            servers: Vec::new(),
        };
        for n in names {
            s.add(n);
        }
        s
    }

    /// A pod `name` labelled `pod: name`, serving TCP 80 and 81, and its manifest.
    fn add(&mut self, name: &str) -> TestPod {
        let i = u8::try_from(self.pods.len()).unwrap();
        let pod = self
            .tb
            .add_pod(name, Ipv4Addr::new(10, 242, 0, 10 + i), None)
            .unwrap();
        self.servers
            .push(Servers::start(&pod, &[80, 81], name).unwrap());
        write_pod(self.dir.path(), &pod);
        self.pods.push(pod.clone());
        pod
    }

    fn pod(&self, name: &str) -> &TestPod {
        self.tb.pod(name).unwrap()
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.path().join(file), text).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).unwrap();
    }
}

/// On node `here` (the agent's with `--node-name here`, and every pod's without it).
fn write_pod(dir: &Path, pod: &TestPod) {
    std::fs::write(
        dir.join(format!("pod-{}.yaml", pod.name)),
        pod_manifest_on(Some("here"), "x", pod, &[("pod", &pod.name)], &[80, 81]),
    )
    .unwrap();
}

/// Ingress of `pod: to` allowed from `pod: from` on TCP 80 and 81 (two policy entries).
fn allow(from: &str, to: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-{from}-to-{to}\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: {to}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          pod: {from}\n    ports:\n    - protocol: TCP\n      port: 80\n    - protocol: TCP\n      port: 81\n"
    )
}

/// Ingress of `pod: to` isolated, nothing allowed (no policy entry at all).
fn isolate(to: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: isolate-{to}\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: {to}\n  policyTypes: [Ingress]\n"
    )
}

fn reach(from: &TestPod, to: &TestPod, port: u16) -> bool {
    probe(&from.netns, IpAddr::V4(to.v4), port, Proto::Tcp, T).unwrap()
}

/// Polls `cond` until true or `timeout`.
fn within(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `/readyz` once `holds` is true of it (status, body), or fails with the agent's log.
fn readyz_until(agent: &AgentProcess, holds: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let mut last = (0, String::new());
    let ok = within(WAIT, || {
        if let Ok(r) = agent.get("/readyz") {
            last = r;
        }
        holds(last.0, &last.1)
    });
    assert!(
        ok,
        "/readyz never matched; last {} {:?}\nagent log:\n{}",
        last.0,
        last.1,
        agent.log_text()
    );
    last
}

/// The value of the metric line starting with `key ` (e.g. `name{labels}`).
fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

#[test]
#[ignore = "needs root"]
fn policy_map_full_denies_what_does_not_fit_and_converges() {
    let mut s = Setup::new("mf-pol", &["a", "b", "c"]);
    // b and c each need two entries; the map holds three: one of them is programmed whole,
    // the other not at all.
    s.write("allow-b.yaml", &allow("a", "b"));
    s.write("allow-c.yaml", &allow("a", "c"));
    let agent = AgentProcess::start(&s.tb, s.dir.path(), &["--policy-map-size", "3"]).unwrap();
    let (code, body) = readyz_until(&agent, |code, body| {
        code == 503 && body.contains("POLICY full") && body.contains("generation=")
    });
    assert_eq!(code, 503);
    let (fits, left) = if body.contains("x/c ingress") {
        ("b", "c")
    } else {
        ("c", "b")
    };
    assert!(
        body.contains(&format!("x/{left} ingress denied")) && !body.contains(&format!("x/{fits} ")),
        "{body}"
    );
    let a = s.pod("a").clone();
    let (fits, left) = (s.pod(fits).clone(), s.pod(left).clone());
    // The programmed pod: as its policy says.
    assert!(
        reach(&a, &fits, 80) && reach(&a, &fits, 81),
        "a -> {}",
        fits.name
    );
    assert!(
        !reach(&left, &fits, 80),
        "{} -> {} denied by policy",
        left.name,
        fits.name
    );
    // The one whose rules did not fit: denied (isolated, its allow entries missing), not open.
    assert!(
        !reach(&a, &left, 80),
        "a -> {} must be denied, not open",
        left.name
    );
    assert!(!reach(&a, &left, 81));
    assert!(!reach(&fits, &left, 80));
    let m = agent.metrics_until(Duration::from_secs(5), |m| {
        metric(m, "enforcer_map_full_total{map=\"POLICY\"}").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        metric(&m, "enforcer_endpoints_unprogrammed{map=\"POLICY\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "enforcer_map_entries_missing{map=\"POLICY\"}"),
        Some(2.0),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "enforcer_pod_unprogrammed{{pod=\"x/{}\",map=\"POLICY\",direction=\"ingress\"}} 1",
            left.name
        )),
        "{m}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("POLICY full") && log.contains(&format!("x/{} (ingress)", left.name)),
        "the log names the map and the pod:\n{log}"
    );

    // A pod that comes afterwards is still attached and enforced: isolated for ingress (no
    // entry needed), open for egress.
    let d = s.add("d");
    s.write("isolate-d.yaml", &isolate("d"));
    assert!(
        within(WAIT, || !reach(&a, &d, 80) && reach(&d, &a, 80)),
        "d enforced: a -> d denied, d -> a allowed\n{}",
        agent.log_text()
    );
    assert_eq!(agent.get("/readyz").unwrap().0, 503, "still not programmed");

    // Room comes back: the programmed pod's policy is deleted, the other's rules fit now.
    s.remove(&format!("allow-{}.yaml", fits.name));
    let (code, body) = readyz_until(&agent, |code, _| code == 200);
    assert!(body.starts_with("ready generation="), "{body}");
    assert_eq!(code, 200);
    assert!(
        within(Duration::from_secs(5), || reach(&a, &left, 80)
            && reach(&a, &left, 81)),
        "a -> {} allowed once its rules are written",
        left.name
    );
    assert!(!reach(&fits, &left, 80), "and only from a");
    assert!(!reach(&a, &d, 80), "d still isolated");
    let m = agent.metrics_until(Duration::from_secs(5), |m| {
        metric(m, "enforcer_endpoints_unprogrammed{map=\"POLICY\"}") == Some(0.0)
    });
    assert_eq!(
        metric(&m, "enforcer_endpoints_unprogrammed{map=\"POLICY\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(agent.log_text().contains("POLICY: every entry written"));
    agent.stop().unwrap();
    drop(s);
}

#[test]
#[ignore = "needs root"]
fn endpoints_full_denies_the_extra_pod_both_ways_and_converges() {
    let s = Setup::new("mf-ep", &["a", "b", "c"]);
    let agent = AgentProcess::start(&s.tb, s.dir.path(), &["--max-endpoints", "2"]).unwrap();
    let (_, body) = readyz_until(&agent, |code, body| {
        code == 503 && body.contains("ENDPOINTS full")
    });
    // Two pods get an endpoint, the third none.
    let names = ["a", "b", "c"];
    let left: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| body.contains(&format!("x/{n} ingress and egress denied")))
        .collect();
    assert_eq!(left.len(), 1, "{body}");
    let left = s.pod(left[0]).clone();
    let fine: Vec<TestPod> = names
        .iter()
        .filter(|n| **n != left.name)
        .map(|n| s.pod(n).clone())
        .collect();
    // No policy: the programmed pods reach each other; the extra pod is denied both ways.
    assert!(reach(&fine[0], &fine[1], 80) && reach(&fine[1], &fine[0], 80));
    for other in &fine {
        assert!(
            !reach(other, &left, 80),
            "{} -> {} must be denied",
            other.name,
            left.name
        );
        assert!(
            !reach(&left, other, 80),
            "{} -> {} must be denied",
            left.name,
            other.name
        );
    }
    let m = agent.metrics_until(Duration::from_secs(5), |m| {
        metric(
            m,
            "enforcer_packets_total{verdict=\"dropped\",reason=\"unprogrammed\"}",
        )
        .is_some_and(|n| n > 0.0)
    });
    assert!(
        metric(
            &m,
            "enforcer_packets_total{verdict=\"dropped\",reason=\"unprogrammed\"}"
        )
        .is_some_and(|n| n > 0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "enforcer_endpoints_unprogrammed{map=\"ENDPOINTS\"}"),
        Some(1.0),
        "{m}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("ENDPOINTS full")
            && log.contains(&format!("x/{} (ingress and egress)", left.name)),
        "{log}"
    );

    // One programmed pod leaves: its endpoint goes to the extra pod.
    let gone = &fine[1];
    s.remove(&format!("pod-{}.yaml", gone.name));
    readyz_until(&agent, |code, _| code == 200);
    assert!(
        within(Duration::from_secs(5), || reach(&fine[0], &left, 80)
            && reach(&left, &fine[0], 80)),
        "{} programmed: open again (no policy)\n{}",
        left.name,
        agent.log_text()
    );
    let m = agent.metrics_until(Duration::from_secs(5), |m| {
        metric(m, "enforcer_endpoints_unprogrammed{map=\"ENDPOINTS\"}") == Some(0.0)
    });
    assert_eq!(
        metric(&m, "enforcer_endpoints_unprogrammed{map=\"ENDPOINTS\"}"),
        Some(0.0),
        "{m}"
    );
    agent.stop().unwrap();
    drop(s);
}

/// `n` pods on another node (peers only), labelled `pod: r<i>`, at 10.<net>.x.y: one manifest.
fn remote_pods(net: u8, n: u32) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: r{i}\n  namespace: x\n  uid: uid-r{i}\n  labels:\n    pod: r{i}\nspec:\n  nodeName: elsewhere\n  containers:\n  - name: main\n    image: agnhost\nstatus:\n  phase: Running\n  podIP: 10.{net}.{}.{}\n  podIPs:\n  - ip: 10.{net}.{}.{}\n",
                i / 200,
                i % 200 + 1,
                i / 200,
                i % 200 + 1
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Ingress of `pod: b` from `pod: a` on TCP 80 and 82 (82: a line-echo server).
const ALLOW_A_TO_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: a-to-b\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          pod: a\n    ports:\n    - protocol: TCP\n      port: 80\n    - protocol: TCP\n      port: 82\n";

/// Traffic that must keep its verdict all along: a's open connection to b and new ones from a
/// are answered, new ones from c are not. Counts every probe that got the other verdict.
struct Traffic {
    stop: Arc<AtomicBool>,
    wrong: Arc<AtomicUsize>,
    rounds: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(a: &TestPod, b: &TestPod, c: &TestPod) -> Self {
        let to = std::net::SocketAddr::from((b.v4, 82));
        let mut conn = Conn::open(a, to).expect("a -> b:82 connects");
        assert!(conn.ping(), "a -> b:82 answers");
        let stop = Arc::new(AtomicBool::new(false));
        let wrong = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (a, b, c) = (a.clone(), b.clone(), c.clone());
        let thread = {
            let (stop, wrong, rounds) = (stop.clone(), wrong.clone(), rounds.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let bad = usize::from(!conn.ping())
                        + usize::from(!reach(&a, &b, 80))
                        + usize::from(reach(&c, &b, 80));
                    wrong.fetch_add(bad, Ordering::Relaxed);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            stop,
            wrong,
            rounds,
            thread: Some(thread),
        }
    }

    /// Waits for `n` more rounds.
    fn rounds(&self, n: usize) {
        let until = self.rounds.load(Ordering::Relaxed) + n;
        assert!(
            within(WAIT, || self.rounds.load(Ordering::Relaxed) >= until),
            "traffic stalled"
        );
    }

    /// Stops; the probes that got the wrong verdict.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.wrong.load(Ordering::Relaxed)
    }
}

#[test]
#[ignore = "needs root"]
fn peers_maps_grow_and_change_size_across_a_restart_without_a_gap() {
    let s = Setup::new("mf-grow", &["a", "b", "c"]);
    let stop_echo = Arc::new(AtomicBool::new(false));
    echo_server(s.pod("b"), 82, stop_echo.clone());
    s.write("a-to-b.yaml", ALLOW_A_TO_B);
    let bpf = BpfMount::new("mf-grow");
    let pin = bpf.0.join("enforcer").display().to_string();
    let agent = AgentProcess::start(
        &s.tb,
        s.dir.path(),
        &[
            "--node-name",
            "here",
            "--pin-path",
            &pin,
            "--peers-map-size",
            "16",
            "--peers-map-max",
            "1024",
        ],
    )
    .unwrap();
    readyz_until(&agent, |code, _| code == 200);
    let capacity = |agent: &AgentProcess| {
        let m = agent.metrics_until(Duration::from_secs(5), |m| {
            metric(m, "enforcer_map_capacity{map=\"PEERS_V4\"}").is_some()
        });
        metric(&m, "enforcer_map_capacity{map=\"PEERS_V4\"}").unwrap()
    };
    let before = capacity(&agent);
    let (a, b, c) = (s.pod("a").clone(), s.pod("b").clone(), s.pod("c").clone());
    let traffic = Traffic::start(&a, &b, &c);
    traffic.rounds(2);

    // 300 more addresses: past 80 % of the maps, which grow to keep them at most half full.
    s.write("remote.yaml", &remote_pods(243, 300));
    // A growth loads the programs once more: seconds, more on a busy machine.
    let m = agent.metrics_until(GROW_WAIT, |m| {
        metric(m, "enforcer_peers_maps_grown_total").is_some_and(|n| n >= 1.0)
            && metric(m, "enforcer_map_entries{map=\"PEERS_V4\"}").is_some_and(|n| n >= 300.0)
    });
    let grown = metric(&m, "enforcer_map_capacity{map=\"PEERS_V4\"}").unwrap();
    assert!(
        grown >= 1024.0 && grown > before,
        "{before} -> {grown}\n{m}"
    );
    traffic.rounds(3);
    readyz_until(&agent, |code, _| code == 200);
    assert!(
        agent.log_text().contains("peers maps grown from"),
        "{}",
        agent.log_text()
    );

    // A restart asking for a fixed size: the pinned maps are replaced by maps of it, filled
    // from them, while the pinned programs keep enforcing.
    agent.stop().unwrap();
    traffic.rounds(1);
    let agent = AgentProcess::start(
        &s.tb,
        s.dir.path(),
        &[
            "--node-name",
            "here",
            "--pin-path",
            &pin,
            "--peers-map-size",
            "2048",
            "--peers-map-max",
            "2048",
        ],
    )
    .unwrap();
    readyz_until(&agent, |code, _| code == 200);
    assert_eq!(capacity(&agent), 2048.0);
    assert!(
        agent.log_text().contains("now have 2048 entries"),
        "{}",
        agent.log_text()
    );
    traffic.rounds(3);
    let wrong = traffic.stop();
    assert_eq!(
        wrong,
        0,
        "probes with the wrong verdict during the swaps\n{}",
        agent.log_text()
    );
    agent.stop().unwrap();
    stop_echo.store(true, Ordering::Relaxed);
    drop(s);
    drop(bpf);
}

#[test]
#[ignore = "needs root"]
fn peers_maps_at_their_ceiling_deny_what_pod_selectors_allow_and_the_rest_is_programmed() {
    let mut s = Setup::new("mf-peer", &["a", "b", "c"]);
    s.write("a-to-b.yaml", ALLOW_A_TO_B);
    // Remote pods at lower addresses than the local ones take the room first: a, b and c are
    // left out of a map of 40 that may not grow.
    s.write("remote.yaml", &remote_pods(241, 60));
    let agent = AgentProcess::start(
        &s.tb,
        s.dir.path(),
        &[
            "--node-name",
            "here",
            "--peers-map-size",
            "40",
            "--peers-map-max",
            "40",
        ],
    )
    .unwrap();
    let (code, body) = readyz_until(&agent, |code, body| {
        code == 503 && body.contains("has no peer entry")
    });
    assert_eq!(code, 503);
    let a = s.pod("a").clone();
    assert!(body.contains(&format!("x/a ({})", a.v4)), "{body}");
    let (b, c) = (s.pod("b").clone(), s.pod("c").clone());
    // a resolves as world: its pod selector no longer matches, so b denies it (never opens).
    assert!(
        !reach(&a, &b, 80),
        "a -> b denied while a has no peer entry"
    );
    assert!(!reach(&c, &b, 80), "c -> b denied by policy");
    // Nothing selects a or c: open as before.
    assert!(reach(&b, &a, 80) && reach(&b, &c, 80));
    let m = agent.metrics_until(Duration::from_secs(5), |m| {
        metric(m, "enforcer_map_entries_missing{map=\"PEERS_V4\"}").is_some_and(|n| n > 0.0)
    });
    assert_eq!(
        metric(&m, "enforcer_map_capacity{map=\"PEERS_V4\"}"),
        Some(40.0),
        "{m}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("PEERS_V4 full") && log.contains("x/a"),
        "the log names the map and the pod:\n{log}"
    );

    // Other pods keep being programmed: d, isolated, is enforced.
    let d = s.add("d");
    s.write("isolate-d.yaml", &isolate("d"));
    assert!(
        within(WAIT, || !reach(&b, &d, 80)),
        "d enforced\n{}",
        agent.log_text()
    );

    // Room comes back: a has its entry again, and b admits it.
    s.remove("remote.yaml");
    readyz_until(&agent, |code, _| code == 200);
    assert!(within(Duration::from_secs(5), || reach(&a, &b, 80)));
    assert!(!reach(&c, &b, 80));
    agent.stop().unwrap();
    drop(s);
}
