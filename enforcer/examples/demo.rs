//! The demo (`cargo xtask demo`): two nodes and five pods made of network namespaces (the
//! nodes joined by an underlay, each routing the other's pod CIDR as kindnet does), the real
//! agent on each node in standalone mode, real NetworkPolicy objects applied in steps, and after
//! each step the reachability matrix measured with real TCP connections beside what the
//! policies say. Identity is proven with the real client, `enforcer attest --once`, run inside
//! the pod's network namespace with a token file, as an init container would.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use enforcer::source::manifests;
use enforcer_common::PROTO_TCP;
use enforcer_policy::{
    compile::CompileOptions,
    evaluator::{Endpoint, verdict},
    state::PodRef,
};
use enforcer_testkit::{
    issuer::TestIssuer,
    netns::{AgentProcess, Cluster, NODE_V4, NodeSpec, Proto, Servers, TestPod, probe_all},
};

/// (pod, namespace, labels, serving port, node)
const PODS: &[(&str, &str, &str, u16, usize)] = &[
    ("frontend", "shop", "app: frontend", 80, 0),
    ("backend", "shop", "app: backend", 8080, 0),
    ("database", "shop", "app: database", 5432, 1),
    ("client", "other", "app: client", 80, 1),
    // Same labels as the frontend, but no token for it: labels are not proof of who talks.
    ("impostor", "shop", "app: frontend", 80, 0),
];

const NODES: [&str; 2] = ["node-0", "node-1"];

const DEFAULT_DENY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: shop
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

/// The same allow, but only for the frontend's verified service account.
const ALLOW_VERIFIED_FRONTEND: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-frontend-to-backend
  namespace: shop
  annotations:
    enforcer.dev/require-identity: \"true\"
spec:
  podSelector:
    matchLabels:
      app: backend
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: frontend
          enforcer.dev/serviceaccount: frontend
    ports:
    - protocol: TCP
      port: 8080
";

const ALLOW_FRONTEND_TO_BACKEND: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-frontend-to-backend
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: backend
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: frontend
    ports:
    - protocol: TCP
      port: 8080
";

fn main() -> Result<()> {
    Cluster::cleanup_stale("demo");
    let mut cluster = Cluster::new(
        "demo",
        &[
            NodeSpec::routed(NODES[0], Ipv4Addr::new(10, 244, 1, 0), 24),
            NodeSpec::routed(NODES[1], Ipv4Addr::new(10, 244, 2, 0), 24),
        ],
    )?;
    let dir = tempdir()?;
    println!(
        "== enforcer demo: 2 nodes, 5 pods in network namespaces, the real agent on each node, real policy ==\n"
    );
    for (k, name) in NODES.iter().enumerate() {
        println!(
            "  node {name}: pod CIDR 10.244.{}.0/24, underlay address {}",
            k + 1,
            Cluster::underlay_address(k)
        );
    }
    let mut pods = Vec::new();
    for (i, (name, ns, labels, port, node)) in PODS.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 244, 1 + *node as u8, 10 + i as u8);
        let pod = cluster.add_pod(*node, name, ip)?;
        std::fs::write(
            dir.join(format!("pod-{name}.yaml")),
            pod_yaml(ns, &pod, labels, *port, NODES[*node]),
        )?;
        println!(
            "  pod {ns}/{name:<9} {}  on {}  serves TCP {port}  ({labels})",
            pod.v4, NODES[*node]
        );
        pods.push((pod, *ns, *port));
    }
    std::fs::write(
        dir.join("namespaces.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n",
    )?;
    let _servers: Vec<Servers> = pods
        .iter()
        .map(|(p, _, port)| Servers::start(p, &[*port], &p.name))
        .collect::<Result<_>>()?;

    // A test issuer stands in for the API server: real keys, a real JWKS, real signed tokens.
    let issuer = TestIssuer::new();
    let jwks = dir.join("keys").join("jwks.json");
    std::fs::create_dir_all(jwks.parent().context("keys dir")?)?;
    std::fs::write(&jwks, issuer.jwks_json())?;
    let jwks_arg = jwks.display().to_string();
    let bin = enforcer_testkit::netns::agent_binary()?;
    let mut agents = cluster
        .start_agents(
            &bin,
            &dir,
            &["--jwks", &jwks_arg, "--issuer", issuer.issuer()],
            Duration::from_secs(30),
        )
        .context("starting the agents")?;
    println!(
        "\nan agent running in each node's namespace (standalone, --node-name, one --manifests {}): \
         each enforces its own pods, what a pod sends on its node, what it receives on the receiver's",
        dir.display()
    );

    let mut failures = 0;
    let mut verified = BTreeMap::new();
    failures += step(
        &mut agents,
        &dir,
        &pods,
        &verified,
        "1. no policy: every pod reaches every pod",
        None,
    )?;
    failures += step(
        &mut agents,
        &dir,
        &pods,
        &verified,
        "2. default-deny ingress in namespace shop",
        Some(("default-deny.yaml", DEFAULT_DENY)),
    )?;
    failures += step(
        &mut agents,
        &dir,
        &pods,
        &verified,
        "3. allow-frontend-to-backend: frontend may reach backend on TCP 8080 only \
         (so may the impostor: it has the frontend's labels)",
        Some(("allow-frontend-to-backend.yaml", ALLOW_FRONTEND_TO_BACKEND)),
    )?;
    failures += step(
        &mut agents,
        &dir,
        &pods,
        &verified,
        "4. the same policy requiring identity: nobody has proven to be the frontend yet",
        Some(("allow-frontend-to-backend.yaml", ALLOW_VERIFIED_FRONTEND)),
    )?;
    let frontend = &pods[0].0;
    let token = issuer
        .token()
        .namespace("shop")
        .service_account("frontend", "sa-uid-frontend")
        .pod("frontend", "uid-shop-frontend")
        .sign();
    // The kubelet's part: the token in the pod's projected volume (a file here).
    let token_file = jwks.with_file_name("frontend-token");
    std::fs::write(&token_file, &token)?;
    let (code, log) = attest(&bin, frontend, &token_file)?;
    println!(
        "\n-- the frontend proves who it is: `enforcer attest --once` in its namespace, with its \
         service-account token, to its node's agent: exit {code}\n{log}"
    );
    if code != 0 {
        bail!("the frontend's attestation failed");
    }
    let impostor = &pods[4].0;
    let (code, log) = attest(&bin, impostor, &token_file)?;
    println!(
        "-- the impostor runs it with the frontend's token (a replay from its own address): \
         exit {code}\n{log}"
    );
    if code != 1 {
        failures += 1;
        println!("  (!) the replayed token was not refused");
    }
    verified.insert(
        IpAddr::V4(frontend.v4),
        BTreeMap::from([
            (
                "enforcer.dev/serviceaccount".to_string(),
                "frontend".to_string(),
            ),
            ("enforcer.dev/namespace".to_string(), "shop".to_string()),
        ]),
    );
    std::thread::sleep(Duration::from_millis(500));
    failures += step(
        &mut agents,
        &dir,
        &pods,
        &verified,
        "5. after attestation: the verified frontend reaches the backend, the impostor does not",
        None,
    )?;

    println!("\n-- why is impostor -> backend:8080 dropped? (`enforcer explain`)");
    let out = std::process::Command::new(&bin)
        .args(["explain"])
        .arg(&dir)
        .args([
            "--from",
            "shop/impostor",
            "--to",
            "shop/backend",
            "--port",
            "8080",
        ])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    for (agent, node) in agents.iter().zip(NODES) {
        println!("\n-- {node}: flow log (drops, from its agent's ring buffer), last lines:");
        let log = agent.log_text();
        let drops: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with('{') && l.contains("\"dropped\""))
            .collect();
        for l in drops.iter().rev().take(3).rev() {
            println!("  {l}");
        }
        let (_, metrics) = agent.get("/metrics")?;
        println!("-- {node}: /metrics (drops by reason):");
        for l in metrics.lines().filter(|l| {
            l.starts_with("enforcer_packets_total") && l.contains("dropped") && !l.ends_with(" 0")
        }) {
            println!("  {l}");
        }
    }

    for agent in agents {
        agent.stop()?;
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nremoved every namespace, veth and pin the demo made");
    if failures > 0 {
        bail!("{failures} check(s) disagreed with the policies");
    }
    println!("every measured connection matched what the policies say");
    Ok(())
}

/// Applies `file` (if any), waits until the agent has programmed it, measures and prints the
/// matrix. Returns the number of disagreements.
fn step(
    agents: &mut [AgentProcess],
    dir: &Path,
    pods: &[(TestPod, &str, u16)],
    verified: &BTreeMap<IpAddr, BTreeMap<String, String>>,
    title: &str,
    file: Option<(&str, &str)>,
) -> Result<usize> {
    if let Some((name, text)) = file {
        std::fs::write(dir.join(name), text)?;
        for agent in agents.iter_mut() {
            agent.wait_applied(Duration::from_secs(10))?;
        }
    }
    let mut loaded = manifests::load_dir(dir)?;
    loaded.cluster.verified = verified.clone();
    let opts = CompileOptions::default();
    let mut probes = Vec::new();
    for (from, _, _) in pods {
        for (to, _, port) in pods {
            probes.push((from.netns.clone(), IpAddr::V4(to.v4), *port, Proto::Tcp));
        }
    }
    let measured = probe_all(&probes, Duration::from_millis(700), 8)?;
    println!("\n-- {title}");
    print!("  {:<14}", "from \\ to");
    for (to, _, port) in pods {
        print!("{:>15}", format!("{}:{port}", to.name));
    }
    println!();
    let mut bad = 0;
    for (i, (from, from_ns, _)) in pods.iter().enumerate() {
        print!("  {:<14}", format!("{from_ns}/{}", from.name));
        for (j, (to, to_ns, port)) in pods.iter().enumerate() {
            let got = measured[i * pods.len() + j];
            let cell = if from.name == to.name {
                "-".to_string()
            } else {
                let want = verdict(
                    &loaded.cluster,
                    &opts,
                    &Endpoint::Pod(PodRef::new(*from_ns, &from.name)),
                    &Endpoint::Pod(PodRef::new(*to_ns, &to.name)),
                    PROTO_TCP,
                    *port,
                );
                if got != want {
                    bad += 1;
                }
                let mark = if got { "allowed" } else { "DROPPED" };
                if got == want {
                    mark.to_string()
                } else {
                    format!("{mark}(!)")
                }
            };
            print!("{cell:>15}");
        }
        println!();
    }
    if bad > 0 {
        println!("  (!) = measured differs from what the policies say");
    }
    Ok(bad)
}

fn pod_yaml(ns: &str, pod: &TestPod, labels: &str, port: u16, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{ns}-{name}\n  labels:\n    {labels}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: demo\n    ports:\n    - containerPort: {port}\n      name: serve\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
        name = pod.name,
        ip = pod.v4
    )
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("enforcer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Runs `enforcer attest --once` (the real client) inside `pod`'s namespace with the token in
/// `token_file`, the agent's address from NODE_IP as the downward API gives it: (exit code, -1
/// when a signal ended it; its log lines without their prefixes).
fn attest(bin: &Path, pod: &TestPod, token_file: &Path) -> Result<(i32, String)> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .arg(bin)
        .args(["attest", "--once", "--grace", "2s", "--timeout", "20s"])
        .arg("--token-file")
        .arg(token_file)
        .env("NODE_IP", NODE_V4.to_string())
        .env("RUST_LOG", "info")
        .output()
        .context("running enforcer attest")?;
    let log = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| format!("   {}", l.split_once("] ").map_or(l, |(_, m)| m)))
        .collect::<Vec<_>>()
        .join("\n");
    Ok((out.status.code().unwrap_or(-1), log))
}
