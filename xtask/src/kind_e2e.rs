//! `cargo xtask kind-e2e`: the agent as a DaemonSet in a kind cluster, with a reachability check
//! of the example policies.
//!
//! Needs Docker (a running daemon), `kind` and `kubectl` on PATH; the development machine this
//! was written on has no Docker, so there it stops with an error that says so. Use the Vagrant
//! VM (`manifests/Vagrantfile`: `vagrant up && vagrant ssh -c 'cd /vagrant && cargo xtask
//! kind-e2e'`) or any Docker host with a kernel >= 6.6 (kind nodes share the host's kernel).
//!
//! Steps:
//! 1. build the image (`manifests/Dockerfile`) as `enforcer:dev`;
//! 2. create the kind cluster of `manifests/kind-config.yaml` (kindnet, two workers) unless it
//!    exists, and mount a bpffs on `/sys/fs/bpf` in each node (a kind node is a container and
//!    has none; the DaemonSet mounts the node's, see the SYS_ADMIN note in daemonset.yaml);
//! 3. `kind load docker-image`, apply namespace, service account, RBAC and DaemonSet, and wait
//!    for the rollout;
//! 4. start the example workloads (`manifests/examples/shop.yaml`: frontend and backend on
//!    different nodes, and an unrelated pod) and check reachability with `agnhost connect`:
//!    everything open; then with `default-deny` + `allow-frontend-to-backend` only frontend to
//!    backend TCP 8080; then, the policies deleted, everything open again. The agent's own drop
//!    counter (`/metrics` on the backend's node) must have grown, so the drops are ours.
//!
//! The cluster is deleted at the end unless `ENFORCER_KEEP_CLUSTER=1`.
//!
//! Next step (not automated here): the upstream conformance run. Download the Kubernetes test
//! binaries of the cluster's version (`kubernetes-test-linux-amd64.tar.gz` from
//! dl.k8s.io/<version>/), then run the sig-network NetworkPolicy suite against this cluster:
//!
//! ```text
//! ./kubernetes/test/bin/e2e.test --provider=local --kubeconfig="$HOME/.kube/config" \
//!   --ginkgo.focus='\[sig-network\] Netpol' --ginkgo.skip='\[Feature:SCTPConnectivity\]'
//! ```
//!
//! (or `hydrophone --focus 'Netpol'` with the same focus). kindnet enforces NetworkPolicy itself
//! in recent kind releases, so for a run that measures this agent alone, turn kindnet's policy
//! controller off first (`kubectl -n kube-system edit ds kindnet`: `--network-policy=false`).

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const CLUSTER: &str = "enforcer";
const CONTEXT: &str = "kind-enforcer";
const IMAGE: &str = "enforcer:dev";
const NAMESPACE: &str = "shop";
/// How long a policy change may take to be enforced (the agent applies within a second).
const POLICY_DEADLINE: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(root());
    cmd
}

/// Runs a command with inherited output; fails with its name when it fails.
fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("kind-e2e: {program} {}", args.join(" "));
    let st = command(program, args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !st.success() {
        bail!("{program} {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = quiet(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn quiet(program: &str, args: &[&str]) -> Result<Output> {
    command(program, args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))
}

fn kubectl(args: &[&str]) -> Result<()> {
    let mut all = vec!["--context", CONTEXT];
    all.extend_from_slice(args);
    run("kubectl", &all)
}

fn kubectl_out(args: &[&str]) -> Result<String> {
    let mut all = vec!["--context", CONTEXT];
    all.extend_from_slice(args);
    output("kubectl", &all)
}

/// Docker (with a reachable daemon), kind and kubectl must work.
fn check_tools() -> Result<()> {
    let lacking = |what: &str, why: String| {
        anyhow::anyhow!(
            "kind-e2e needs {what}: {why}.\nIt needs Docker (a running daemon), kind and kubectl; this development \
             machine has no Docker. Run it in the Vagrant VM (manifests/Vagrantfile: `vagrant up && vagrant ssh -c \
             'cd /vagrant && cargo xtask kind-e2e'`) or on a Docker host with a kernel >= 6.6."
        )
    };
    for (tool, args) in [
        (
            "docker",
            &["version", "--format", "{{.Server.Version}}"][..],
        ),
        ("kind", &["version"][..]),
        ("kubectl", &["version", "--client"][..]),
    ] {
        match quiet(tool, args) {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(lacking(
                    tool,
                    format!(
                        "`{tool} {}` failed: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                ));
            }
            Err(e) => return Err(lacking(tool, format!("{e:#}"))),
        }
    }
    Ok(())
}

pub fn kind_e2e() -> Result<()> {
    check_tools()?;
    run(
        "docker",
        &["build", "-f", "manifests/Dockerfile", "-t", IMAGE, "."],
    )?;

    let clusters = output("kind", &["get", "clusters"])?;
    if !clusters.lines().any(|c| c.trim() == CLUSTER) {
        run(
            "kind",
            &[
                "create",
                "cluster",
                "--config",
                "manifests/kind-config.yaml",
                "--wait",
                "120s",
            ],
        )?;
    }
    let result = in_cluster();
    if std::env::var_os("ENFORCER_KEEP_CLUSTER").is_some_and(|v| v == "1") {
        eprintln!("kind-e2e: keeping cluster {CLUSTER} (kubectl --context {CONTEXT})");
    } else if let Err(e) = run("kind", &["delete", "cluster", "--name", CLUSTER]) {
        eprintln!("kind-e2e: {e:#}");
    }
    result
}

fn in_cluster() -> Result<()> {
    let nodes = output("kind", &["get", "nodes", "--name", CLUSTER])?;
    for node in nodes.lines().map(str::trim).filter(|n| !n.is_empty()) {
        // A bpffs per node (each mount is its own instance), shared so the agent's
        // HostToContainer mount sees it.
        run(
            "docker",
            &[
                "exec",
                node,
                "sh",
                "-c",
                "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf",
            ],
        )?;
    }
    run("kind", &["load", "docker-image", IMAGE, "--name", CLUSTER])?;

    for m in [
        "namespace.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "crd-identitybinding.yaml",
        "vap-identitybinding.yaml",
        "daemonset.yaml",
    ] {
        kubectl(&["apply", "-f", &format!("manifests/{m}")])?;
    }
    // A rebuilt image under the same tag: restart so the nodes run it.
    kubectl(&[
        "-n",
        "enforcer-system",
        "rollout",
        "restart",
        "daemonset/enforcer",
    ])?;
    kubectl(&[
        "-n",
        "enforcer-system",
        "rollout",
        "status",
        "daemonset/enforcer",
        "--timeout=240s",
    ])?;

    kubectl(&["apply", "-f", "manifests/examples/shop.yaml"])?;
    kubectl(&[
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all",
        "--timeout=240s",
    ])?;
    let backend_ip = kubectl_out(&[
        "-n",
        NAMESPACE,
        "get",
        "pod",
        "backend",
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    let backend_node = kubectl_out(&[
        "-n",
        NAMESPACE,
        "get",
        "pod",
        "backend",
        "-o",
        "jsonpath={.spec.nodeName}",
    ])?;
    let frontend_node = kubectl_out(&[
        "-n",
        NAMESPACE,
        "get",
        "pod",
        "frontend",
        "-o",
        "jsonpath={.spec.nodeName}",
    ])?;
    eprintln!("kind-e2e: backend {backend_ip} on {backend_node}, frontend on {frontend_node}");
    if backend_node == frontend_node {
        bail!(
            "frontend and backend share node {backend_node}: the example's anti-affinity did not apply"
        );
    }

    let cases = [
        ("frontend", 8080, true),
        ("frontend", 9090, true),
        ("other", 8080, true),
    ];
    expect_all(&backend_ip, &cases, "without policies")?;

    let drops_before = drops(&backend_node)?;
    for p in ["default-deny.yaml", "allow-frontend-to-backend.yaml"] {
        kubectl(&["apply", "-f", &format!("manifests/examples/{p}")])?;
    }
    let with_policies = [
        ("frontend", 8080, true),
        ("frontend", 9090, false),
        ("other", 8080, false),
    ];
    expect_all(
        &backend_ip,
        &with_policies,
        "with default-deny + allow-frontend-to-backend",
    )?;
    let drops_after = drops(&backend_node)?;
    if drops_after <= drops_before {
        bail!(
            "the blocked connections were not dropped by enforcer on {backend_node} (its drop counter stayed at \
             {drops_after}): another enforcer (kindnet's own NetworkPolicy controller?) dropped them"
        );
    }
    eprintln!(
        "kind-e2e: enforcer on {backend_node} dropped {} packets",
        drops_after - drops_before
    );

    kubectl(&[
        "-n",
        NAMESPACE,
        "delete",
        "networkpolicy",
        "default-deny",
        "allow-frontend-to-backend",
    ])?;
    expect_all(&backend_ip, &cases, "after deleting the policies")?;
    kubectl(&["delete", "namespace", NAMESPACE, "--wait=false"])?;
    eprintln!("kind-e2e: ok");
    Ok(())
}

/// Whether `from` (a pod of the example namespace) connects to `ip:port` over TCP.
fn connects(from: &str, ip: &str, port: u16) -> Result<bool> {
    let target = format!("{ip}:{port}");
    let out = quiet(
        "kubectl",
        &[
            "--context",
            CONTEXT,
            "-n",
            NAMESPACE,
            "exec",
            from,
            "--",
            "/agnhost",
            "connect",
            &target,
            "--timeout=2s",
            "--protocol=tcp",
        ],
    )?;
    Ok(out.status.success())
}

/// Waits (up to [`POLICY_DEADLINE`]) until every case has its expected outcome.
fn expect_all(ip: &str, cases: &[(&str, u16, bool)], when: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut wrong = Vec::new();
        for &(from, port, expected) in cases {
            if connects(from, ip, port)? != expected {
                wrong.push(format!(
                    "{from} -> backend:{port} should be {}",
                    if expected { "allowed" } else { "blocked" }
                ));
            }
        }
        if wrong.is_empty() {
            eprintln!("kind-e2e: {when}: {} connections as expected", cases.len());
            return Ok(());
        }
        if started.elapsed() > POLICY_DEADLINE {
            bail!("{when}: {}", wrong.join("; "));
        }
        sleep(Duration::from_secs(1));
    }
}

/// The agent's dropped-packet count on `node` (`enforcer_packets_total{verdict="dropped"}`).
fn drops(node: &str) -> Result<u64> {
    let metrics = output(
        "docker",
        &["exec", node, "curl", "-sf", "http://127.0.0.1:9901/metrics"],
    )
    .with_context(|| format!("reading the agent's /metrics on {node}"))?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("enforcer_packets_total{") && l.contains("verdict=\"dropped\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}
