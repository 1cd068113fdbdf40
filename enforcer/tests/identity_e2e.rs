//! Identity end to end: the agent binary with `--require-identity`, a real JWKS file, real
//! signed tokens presented from inside pod namespaces to the attestation endpoint on the node,
//! and real connections. A pod reaches its peer only once it attests; an impostor with the
//! same labels, a replayed token and a spoofed source address get nothing; an expired token
//! cuts the pod off; a key rotation keeps attesting pods working.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use enforcer::identity::unix_now;
use enforcer_testkit::{
    issuer::{TestIssuer, TestKey},
    netns::{AgentProcess, Proto, Servers, TestPod, Testbed, in_netns, pod_manifest, probe, run},
    two_nodes::{attest, within},
};

const T: Duration = Duration::from_millis(600);

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: b-from-frontend\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: frontend\n          enforcer.dev/serviceaccount: frontend\n";

fn reach(from: &TestPod, to: &TestPod) -> bool {
    probe(&from.netns, IpAddr::V4(to.v4), 80, Proto::Tcp, T).unwrap()
}

#[test]
#[ignore = "needs root"]
fn only_attested_workloads_match_identity_requiring_policy() {
    Testbed::cleanup_stale("e2e-id");
    let mut tb = Testbed::new("e2e-id").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = tb
        .add_pod("a", Ipv4Addr::new(10, 242, 0, 10), None)
        .unwrap();
    let b = tb
        .add_pod("b", Ipv4Addr::new(10, 242, 0, 11), None)
        .unwrap();
    let c = tb
        .add_pod("c", Ipv4Addr::new(10, 242, 0, 12), None)
        .unwrap();
    std::fs::write(
        dir.path().join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
    )
    .unwrap();
    // a and the impostor c carry the same labels; only a holds a token for its pod.
    std::fs::write(
        dir.path().join("a.yaml"),
        pod_manifest("x", &a, &[("pod", "a"), ("app", "frontend")], &[80]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        pod_manifest("x", &b, &[("pod", "b")], &[80]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        pod_manifest("x", &c, &[("pod", "c"), ("app", "frontend")], &[80]),
    )
    .unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let _sb = Servers::start(&b, &[80], "b").unwrap();

    let mut issuer = TestIssuer::new();
    let keys_dir = tempfile::tempdir().unwrap();
    let jwks = keys_dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks_json()).unwrap();
    let iss = issuer.issuer().to_string();
    let mut agent = AgentProcess::start(
        &tb,
        dir.path(),
        &[
            "--require-identity",
            "--jwks",
            jwks.to_str().unwrap(),
            "--issuer",
            &iss,
        ],
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();

    let token_for = |issuer: &TestIssuer, key: &TestKey, pod: &str, ttl: u64| {
        issuer
            .token_with(key)
            .namespace("x")
            .service_account("frontend", "sa-uid-frontend")
            .pod(pod, &format!("uid-x-{pod}"))
            .issued(unix_now(), ttl)
            .sign()
    };
    let rsa = issuer.rsa_key().clone();

    // Before attesting, the labels alone do not open anything.
    assert!(!reach(&a, &b), "unverified a is denied");
    assert!(!reach(&c, &b), "unverified impostor is denied");

    // Bad tokens are refused, with a reason and without echoing the token.
    let forged = issuer
        .token_with(&TestKey::rsa())
        .namespace("x")
        .pod("a", "uid-x-a")
        .sign();
    let (code, body) = attest(&a, &forged);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("error") && !body.contains(&forged), "{body}");

    // a attests with its own token: it reaches b within a second.
    let good = token_for(&issuer, &rsa, "a", 3600);
    let (code, body) = attest(&a, &good);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"serviceAccount\":\"frontend\"") && body.contains("\"pod\":\"a\""),
        "{body}"
    );
    assert!(
        within(Duration::from_secs(2), || reach(&a, &b)),
        "attested a is allowed"
    );

    // The impostor replays a's token from its own address: 403, still denied.
    let (code, body) = attest(&c, &good);
    assert_eq!(code, 403, "{body}");
    assert!(!reach(&c, &b), "impostor stays denied");

    // The impostor spoofs a's address: the datapath drops it at the source.
    let a_ip = a.v4.to_string();
    run(
        "ip",
        &[
            "netns",
            "exec",
            &c.netns,
            "ip",
            "addr",
            "add",
            &format!("{a_ip}/32"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let spoofed = in_netns(&c.netns, move || {
        let sock = socket2_connect(
            a_ip.parse().unwrap(),
            (Ipv4Addr::new(10, 242, 0, 11), 80).into(),
        );
        sock.is_some()
    })
    .unwrap();
    assert!(!spoofed, "a spoofed source address gets nothing");
    let spoof_counted = |m: &str| {
        m.lines()
            .any(|l| l.contains("reason=\"spoofed\"") && !l.ends_with(" 0"))
    };
    let m = agent.metrics_until(Duration::from_secs(3), spoof_counted);
    assert!(spoof_counted(&m), "{m}");
    assert!(
        m.contains("enforcer_identity_attestations_total{outcome=\"accepted\",reason=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "enforcer_identity_attestations_total{outcome=\"rejected\",reason=\"ip-mismatch\"} 1"
        ),
        "{m}"
    );

    // Key rotation: a new key is published, tokens signed with it verify; the old key is
    // withdrawn and its tokens stop verifying, while a's binding keeps it working.
    let new_key = TestKey::ec();
    issuer.add_key(new_key.clone());
    std::fs::write(&jwks, issuer.jwks_json()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = attest(&a, &token_for(&issuer, &new_key, "a", 3600));
    assert_eq!(code, 200, "a token of the new key verifies: {body}");
    issuer.remove_key(rsa.kid());
    std::fs::write(&jwks, issuer.jwks_json()).unwrap();
    assert!(
        within(Duration::from_secs(8), || attest(
            &a,
            &token_for(&issuer, &rsa, "a", 3600)
        )
        .0 == 401),
        "a token of the withdrawn key stops verifying"
    );
    assert!(reach(&a, &b), "a keeps working across the rotation");

    // Expiry: a re-attests with a token that expires in 3 s; once it has, a is cut off.
    // (Bindings keep the later expiry, so start from a fresh agent state: restart.)
    agent.stop().unwrap();
    let mut agent = AgentProcess::start(
        &tb,
        dir.path(),
        &[
            "--require-identity",
            "--jwks",
            jwks.to_str().unwrap(),
            "--issuer",
            &iss,
        ],
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();
    assert!(
        !reach(&a, &b),
        "bindings live in the agent: a fresh agent knows no identity yet"
    );
    let short = token_for(&issuer, &new_key, "a", 3);
    assert_eq!(attest(&a, &short).0, 200);
    assert!(
        within(Duration::from_secs(2), || reach(&a, &b)),
        "a attested again"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        within(Duration::from_secs(2), || !reach(&a, &b)),
        "a is cut off once its token expired"
    );
    agent.stop().unwrap();
}

/// Connects from `src` (an address of this namespace) to `dst`; `Some` when the handshake
/// completes.
fn socket2_connect(src: IpAddr, dst: SocketAddr) -> Option<()> {
    // std has no bind-before-connect; use libc directly.
    use std::os::fd::FromRawFd;
    let IpAddr::V4(src) = src else { return None };
    let SocketAddr::V4(dst) = dst else {
        return None;
    };
    // SAFETY: plain socket syscalls on a fresh fd that the TcpStream then owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return None;
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = sa(src, 0);
        if libc::bind(
            fd,
            (&raw const local).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return None;
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 700_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let remote = sa(*dst.ip(), dst.port());
        let ok = libc::connect(
            fd,
            (&raw const remote).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) == 0;
        drop(stream);
        ok.then_some(())
    }
}
