//! `enforcer attest` end to end: the real client binary run inside pod network namespaces
//! (as a sidecar or an init container would), presenting real signed tokens from token files
//! to the real agent on the node (`--jwks`, a policy requiring identity). `--once` binds and
//! exits 0; a token of another pod or for another audience exits 1 naming the reason; the
//! sidecar keeps the binding alive across token rotations and an agent restart, presents a
//! rotated token at once, exits 1 when a later token is refused, and exits 0 on SIGTERM. The
//! configuration errors (exit 2) need no root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use enforcer::identity::unix_now;
use enforcer_testkit::{
    issuer::TestIssuer,
    netns::{
        AgentProcess, NODE_V4, NODE_V6, Proto, Servers, TestPod, Testbed, pod_manifest, probe,
    },
    within,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_enforcer");
const T: Duration = Duration::from_millis(600);

/// b admits pods of namespace x verified as service account `frontend`.
const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: b-from-verified-frontend\n  namespace: x\n  annotations:\n    enforcer.dev/require-identity: \"true\"\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          enforcer.dev/serviceaccount: frontend\n";

const ACCEPTED: &str = "enforcer_identity_attestations_total{outcome=\"accepted\",reason=\"ok\"}";

/// A node with the agent (identity on) and pods a (the frontend), b (serving TCP 80, admitting
/// verified frontends) and c (another pod); tokens are written into files under `tokens`.
struct Node {
    /// None only while it restarts.
    agent: Option<AgentProcess>,
    _servers: Servers,
    issuer: TestIssuer,
    a: TestPod,
    b: TestPod,
    c: TestPod,
    tb: Testbed,
    manifests: tempfile::TempDir,
    tokens: tempfile::TempDir,
    jwks: PathBuf,
}

impl Node {
    fn start(tag: &str, with_v6: bool, agent_args: &[&str]) -> Node {
        Testbed::cleanup_stale(tag);
        let mut tb = Testbed::new(tag).unwrap();
        let v6 = |n: u16| with_v6.then(|| Ipv6Addr::new(0xfd00, 0x242, 0, 0, 0, 0, 0, n));
        let a = tb
            .add_pod("a", Ipv4Addr::new(10, 242, 0, 10), v6(10))
            .unwrap();
        let b = tb
            .add_pod("b", Ipv4Addr::new(10, 242, 0, 11), v6(11))
            .unwrap();
        let c = tb
            .add_pod("c", Ipv4Addr::new(10, 242, 0, 12), v6(12))
            .unwrap();
        let manifests = tempfile::tempdir().unwrap();
        let m = manifests.path();
        std::fs::write(
            m.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
        )
        .unwrap();
        for (pod, labels) in [
            (&a, &[("pod", "a"), ("app", "frontend")][..]),
            (&b, &[("pod", "b")][..]),
            (&c, &[("pod", "c"), ("app", "frontend")][..]),
        ] {
            std::fs::write(
                m.join(format!("{}.yaml", pod.name)),
                pod_manifest("x", pod, labels, &[80]),
            )
            .unwrap();
        }
        std::fs::write(m.join("policy.yaml"), POLICY).unwrap();
        let servers = Servers::start(&b, &[80], "b").unwrap();
        let issuer = TestIssuer::new();
        let tokens = tempfile::tempdir().unwrap();
        let jwks = tokens.path().join("jwks.json");
        std::fs::write(&jwks, issuer.jwks_json()).unwrap();
        let agent = Self::start_agent(&tb, m, &jwks, &issuer, agent_args);
        Node {
            agent: Some(agent),
            _servers: servers,
            issuer,
            a,
            b,
            c,
            tb,
            manifests,
            tokens,
            jwks,
        }
    }

    fn start_agent(
        tb: &Testbed,
        manifests: &Path,
        jwks: &Path,
        issuer: &TestIssuer,
        extra: &[&str],
    ) -> AgentProcess {
        let mut args = vec![
            "--jwks",
            jwks.to_str().unwrap(),
            "--issuer",
            issuer.issuer(),
        ];
        args.extend_from_slice(extra);
        let mut agent = AgentProcess::start(tb, manifests, &args).unwrap();
        agent.wait_ready(Duration::from_secs(30)).unwrap();
        agent
    }

    fn frontend_token(&self, pod: &str) -> enforcer_testkit::issuer::TokenBuilder {
        self.issuer
            .token()
            .namespace("x")
            .service_account("frontend", "sa-uid-frontend")
            .pod(pod, &format!("uid-x-{pod}"))
    }

    /// A fresh token of pod `pod` (service account `frontend`) living `ttl` seconds.
    fn token(&self, pod: &str, ttl: u64) -> String {
        self.frontend_token(pod).issued(unix_now(), ttl).sign()
    }

    /// A token of pod a for another audience than the agent's.
    fn token_for_audience(&self, audience: &str) -> String {
        self.frontend_token("a").audience(audience).sign()
    }

    /// Writes `token` to the token file `name` as the kubelet does: a new file renamed over
    /// the old one, never a partly written file.
    fn write_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.tokens.path().join(name);
        let tmp = self.tokens.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, token).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// `enforcer attest --token-file FILE ARGS` inside `pod`'s namespace, the agent's address
    /// from NODE_IP (the downward API's status.hostIP); stderr into a log file.
    fn attest(&self, pod: &TestPod, token_file: &Path, node_ip: IpAddr, args: &[&str]) -> Client {
        let log = self
            .tokens
            .path()
            .join(format!("attest-{}-{}.log", pod.name, unix_now_nanos()));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pod.netns,
                CLIENT,
                "attest",
                "--token-file",
            ])
            .arg(token_file)
            .args(args)
            .env("NODE_IP", node_ip.to_string())
            .env_remove("ENFORCER_AGENT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Client { child, log }
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().unwrap()
    }

    fn reach(&self, from: &TestPod, to: IpAddr) -> bool {
        probe(&from.netns, to, 80, Proto::Tcp, T).unwrap()
    }

    fn accepted(&self, n: u32) -> bool {
        let line = format!("{ACCEPTED} {n}\n");
        self.agent()
            .metrics_until(Duration::from_secs(5), |m| m.contains(&line))
            .contains(&line)
    }
}

fn unix_now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A running `enforcer attest`; killed on drop.
struct Client {
    child: Child,
    log: PathBuf,
}

impl Client {
    /// Its exit status within `timeout`, or None.
    fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        // `ip netns exec` execs the client: the child is the client itself.
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NODE: IpAddr = IpAddr::V4(NODE_V4);

#[test]
#[ignore = "needs root"]
fn once_binds_the_pod_and_exits_zero() {
    let n = Node::start("att-once", false, &[]);
    let b = IpAddr::V4(n.b.v4);
    assert!(!n.reach(&n.a, b), "unverified a is denied");
    let token = n.token("a", 3600);
    let file = n.write_token("a", &token);
    let mut client = n.attest(&n.a, &file, NODE, &["--once"]);
    let st = client.exit_within(Duration::from_secs(15));
    let log = client.stderr();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{log}");
    assert!(
        log.contains("attested: 10.242.0.10 is x/a (service account frontend"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token is never logged");
    assert!(
        within(Duration::from_secs(2), || n.reach(&n.a, b)),
        "bound a reaches b"
    );
}

#[test]
#[ignore = "needs root"]
fn once_binds_over_ipv6_from_an_unbracketed_node_ip() {
    let n = Node::start("att-v6", true, &["--attest-addr", "[::]:9902"]);
    let (b4, b6) = (IpAddr::V4(n.b.v4), IpAddr::V6(n.b.v6.unwrap()));
    let file = n.write_token("a", &n.token("a", 3600));
    // NODE_IP is a bare IPv6 address (as status.hostIP gives it): the client brackets it.
    let mut client = n.attest(&n.a, &file, IpAddr::V6(NODE_V6), &["--once"]);
    let st = client.exit_within(Duration::from_secs(15));
    let log = client.stderr();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("attested: fd00:242::a is x/a"), "{log}");
    // The address that attested is the one bound.
    assert!(within(Duration::from_secs(2), || n.reach(&n.a, b6)));
    assert!(!n.reach(&n.a, b4), "the IPv4 address did not attest");
}

#[test]
#[ignore = "needs root"]
fn a_token_of_another_pod_is_refused_with_exit_one() {
    let n = Node::start("att-replay", false, &[]);
    let token = n.token("a", 3600);
    let file = n.write_token("a", &token);
    // c presents a's token: ip-mismatch, retried for the grace (the agent also says it while
    // its watch lags behind a new pod), then refused.
    let start = Instant::now();
    let mut client = n.attest(&n.c, &file, NODE, &["--once", "--grace", "2s"]);
    let st = client.exit_within(Duration::from_secs(15));
    let log = client.stderr();
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "retried for the grace"
    );
    assert!(
        log.contains("the agent refused the token: ip-mismatch (HTTP 403)")
            && log.contains("hostNetwork"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token is never logged");
    assert!(!n.reach(&n.c, IpAddr::V4(n.b.v4)), "c stays denied");
}

#[test]
#[ignore = "needs root"]
fn a_token_for_another_audience_is_refused_at_once() {
    let n = Node::start("att-aud", false, &[]);
    let token = n.token_for_audience("https://kubernetes.default.svc.cluster.local");
    let file = n.write_token("a", &token);
    // A sidecar (no --once): a refusal that no lag explains ends it at once.
    let mut client = n.attest(&n.a, &file, NODE, &[]);
    let st = client.exit_within(Duration::from_secs(10));
    let log = client.stderr();
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("wrong-audience (HTTP 401)") && log.contains("audience must be `enforcer`"),
        "{log}"
    );
    assert!(!n.reach(&n.a, IpAddr::V4(n.b.v4)));
}

#[test]
#[ignore = "needs root"]
fn sidecar_keeps_the_binding_alive_across_token_rotations() {
    let n = Node::start("att-rot", false, &[]);
    let b = IpAddr::V4(n.b.v4);
    // Tokens living 8 s (their `exp` in whole seconds, so 7-8 s), rotated at half their
    // lifetime: the kubelet's 80% leaves minutes on an hour's token but well under a second
    // here, less than a busy shared machine may delay the rotating thread.
    let ttl = 8;
    let file = n.write_token("a", &n.token("a", ttl));
    let issued = Instant::now();
    let mut client = n.attest(&n.a, &file, NODE, &[]);
    assert!(
        within(Duration::from_secs(5), || n.reach(&n.a, b)),
        "{}",
        client.stderr()
    );
    let stop = AtomicBool::new(false);
    let kubelet = {
        let (stop, n) = (&stop, &n);
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let (mut rotated, mut issued) = (0, issued);
                while !stop.load(Ordering::SeqCst) {
                    let until = issued + Duration::from_millis(ttl * 500);
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if !stop.load(Ordering::SeqCst) {
                        n.write_token("a", &n.token("a", ttl));
                        issued = Instant::now();
                        rotated += 1;
                    }
                }
                rotated
            });
            // Traffic flows for three token lifetimes: every new connection is allowed.
            let start = Instant::now();
            let mut denied = Vec::new();
            while start.elapsed() < Duration::from_secs(3 * ttl) {
                if !n.reach(&n.a, b) {
                    denied.push(start.elapsed());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            stop.store(true, Ordering::SeqCst);
            let rotated = h.join().unwrap();
            (denied, rotated)
        })
    };
    let (denied, rotated) = kubelet;
    assert!(rotated >= 3, "{rotated} rotations");
    assert!(
        denied.is_empty(),
        "the binding lapsed at {denied:?}:\n{}\n{}",
        client.stderr(),
        n.agent().log_text()
    );
    assert!(
        client.exit_within(Duration::ZERO).is_none(),
        "still running"
    );

    // SIGTERM: exit 0 at once (a sidecar must not hold up its pod's termination).
    client.sigterm();
    let st = client.exit_within(Duration::from_secs(2));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", client.stderr());
    // Without the sidecar the binding ends with the last token.
    assert!(
        within(Duration::from_secs(ttl + 3), || !n.reach(&n.a, b)),
        "the binding outlived its token"
    );
}

/// A node whose pod a runs the sidecar with a token living an hour, once bound.
fn bound_sidecar(tag: &str) -> (Node, Client) {
    let n = Node::start(tag, false, &[]);
    let file = n.write_token("a", &n.token("a", 3600));
    let client = n.attest(&n.a, &file, NODE, &[]);
    assert!(n.accepted(1), "{}", client.stderr());
    (n, client)
}

#[test]
#[ignore = "needs root"]
fn sidecar_presents_a_rotated_token_file_at_once() {
    let (n, mut client) = bound_sidecar("att-file");
    // Bound for an hour: the next timed presentation is minutes away.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(n.accepted(1));
    let rotated = Instant::now();
    n.write_token("a", &n.token("a", 3600));
    assert!(n.accepted(2), "{}", client.stderr());
    assert!(
        rotated.elapsed() < Duration::from_secs(3),
        "{:?}",
        rotated.elapsed()
    );
    assert!(
        client.stderr().contains("changed: presenting the new one"),
        "{}",
        client.stderr()
    );
    assert!(
        client.exit_within(Duration::ZERO).is_none(),
        "still running"
    );
}

#[test]
#[ignore = "needs root"]
fn sidecar_exits_one_when_a_later_token_is_refused() {
    let (n, mut client) = bound_sidecar("att-later");
    // The next token the file holds is one for another audience.
    let wrong = n.token_for_audience("vault");
    n.write_token("a", &wrong);
    let st = client.exit_within(Duration::from_secs(5));
    let log = client.stderr();
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("wrong-audience"), "{log}");
}

#[test]
#[ignore = "needs root"]
fn sidecar_binds_again_after_the_agent_restarts() {
    let mut n = Node::start("att-restart", false, &[]);
    let b = IpAddr::V4(n.b.v4);
    let file = n.write_token("a", &n.token("a", 3600));
    let mut client = n.attest(&n.a, &file, NODE, &["--max-interval", "3s"]);
    assert!(within(Duration::from_secs(5), || n.reach(&n.a, b)));
    // Bindings live in the agent: a new one knows none until the sidecar presents again
    // (meanwhile it finds nothing listening, and backs off).
    n.agent.take().unwrap().stop().unwrap();
    n.agent = Some(Node::start_agent(
        &n.tb,
        n.manifests.path(),
        &n.jwks,
        &n.issuer,
        &[],
    ));
    assert!(
        within(Duration::from_secs(15), || n.reach(&n.a, b)),
        "{}",
        client.stderr()
    );
    assert!(n.accepted(1), "presented to the new agent");
    assert!(
        client.exit_within(Duration::ZERO).is_none(),
        "still running"
    );
}

/// Runs `enforcer attest ARGS` here (no namespace), with `env`.
fn client_here(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(CLIENT);
    cmd.arg("attest")
        .args(args)
        .env_remove("NODE_IP")
        .env_remove("ENFORCER_AGENT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
fn bad_configuration_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "a.b.c").unwrap();
    let file = file.to_str().unwrap();
    let out = client_here(&["--once", "--token-file", file], &[])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no agent address") && err.contains("NODE_IP"),
        "{err}"
    );

    let missing = dir.path().join("missing");
    let out = client_here(
        &["--once", "--token-file", missing.to_str().unwrap()],
        &[("NODE_IP", "127.0.0.1")],
    )
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    // A NODE_IP that is not an address is a usage error, also 2.
    let out = client_here(
        &["--once", "--token-file", file],
        &[("NODE_IP", "node-1:x")],
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigterm_stops_a_retrying_sidecar_with_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "a.b.c").unwrap();
    // Nothing listens there: the sidecar backs off and retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent: SocketAddr = closed.local_addr().unwrap();
    drop(closed);
    let mut child = client_here(
        &[
            "--token-file",
            file.to_str().unwrap(),
            "--agent",
            &agent.to_string(),
        ],
        &[],
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(child.try_wait().unwrap().is_none(), "still retrying");
    let sent = Instant::now();
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // One line per failure, naming it and the wait.
    let failures: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("attestation at") && l.contains("failed"))
        .collect();
    assert!(failures.len() >= 2, "{err}");
    assert!(
        failures
            .iter()
            .all(|l| l.contains("Connection refused") && l.contains("retrying in")),
        "{err}"
    );
}
