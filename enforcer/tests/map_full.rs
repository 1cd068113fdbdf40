//! A full map does not stop the job (the agent binary end to end, standalone mode, routed-veth
//! pods in network namespaces): with a tiny `--policy-map-size` the pod whose allow rules do not
//! fit is denied (never open), `/readyz` is 503 and names it, pods that come afterwards are
//! still enforced, and once policies are deleted so that everything fits it converges; with a
//! small `--max-endpoints` the pod that gets no endpoint is attached all the same and denied
//! both ways, until an endpoint frees up.
//!
//! Needs root and the agent binary (`cargo test --release` builds it).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use enforcer_testkit::netns::{
    AgentProcess, Proto, Servers, TestPod, Testbed, pod_manifest, probe,
};

const T: Duration = Duration::from_millis(600);
const WAIT: Duration = Duration::from_secs(30);

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

fn write_pod(dir: &Path, pod: &TestPod) {
    std::fs::write(
        dir.join(format!("pod-{}.yaml", pod.name)),
        pod_manifest("x", pod, &[("pod", &pod.name)], &[80, 81]),
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
