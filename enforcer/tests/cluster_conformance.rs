//! Upstream network-policy-api's conformance scenarios for the cluster-wide kinds
//! (AdminNetworkPolicy, BaselineAdminNetworkPolicy; re-expressed as data in
//! `enforcer-policy/tests/data/cluster-policy-conformance/`, judged offline by
//! `enforcer_policy::tiers::conformance`) with real traffic through the real agent in
//! standalone mode.
//!
//! The cluster is the data's (`cluster.yaml`): two nodes `node-1` and `node-2` joined by an
//! underlay (routed veths, `enforcer_testkit::netns::Cluster`), each holding its data address
//! (172.18.0.2, 172.18.0.3) beside its underlay one and running its own agent
//! (`--node-name`); the StatefulSets' replicas are pods at the data's addresses on the data's
//! nodes, serving TCP and UDP on 80, 8080, 53, 5353 and the ports their containers declare. The host-network pods
//! (`forbidden-forrest/centaur-N`) are their node's namespace itself: servers there, probes
//! from there. The agents read one manifests folder holding the Namespaces, the Pods (from the
//! StatefulSets), the Node objects with their addresses, the NetworkPolicies and the cluster
//! policies of the step, all in one `List` file replaced whole at each step (the agents never see
//! half a step). The model is built once, by the first test; each step rewrites that file,
//! waits until both agents report it programmed, and runs the step's probes in parallel; a
//! probe that disagrees with upstream is probed again with a longer timeout before it counts as
//! a failure. The model is torn down (agents, namespaces,
//! folder) after the last test, also after a failure.
//!
//! One test per upstream file, named after it (as the offline tests are), e.g.
//! `admin_network_policy_standard_priority`; `cargo test --release -p enforcer --test
//! cluster_conformance -- --include-ignored priority` runs one. Not probed here: SCTP (no sctp
//! module on the test machines; the SCTP files' TCP and UDP probes run, and the
//! `*-sctp-rules` files, whose probes are all SCTP, check only that both agents program their
//! objects, none refused). Every upstream scenario runs; none is left out.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer_policy::tiers::scenario::{
    ClusterData, Objects, Probe, TestFile, key, mutate, node_objects, statefulset_pods,
};
use enforcer_testkit::netns::{
    AgentProcess, Cluster, NodeSpec, Proto, Servers, TestPod, Testbed, UPLINK, agent_binary,
    probe_all, trim_error, write_manifest,
};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use serde_json::{Value, json};

const TAG: &str = "cpc";
/// The ports agnhost serves in every scenario pod (TCP and UDP on each; the probes use TCP
/// 80/8080 and UDP 53/5353), besides the ports its containers declare.
const PORTS: [u16; 4] = [80, 8080, 53, 5353];
const PROBE_TIMEOUT: Duration = Duration::from_millis(600);
const RETRY_TIMEOUT: Duration = Duration::from_millis(1500);
const RETRIES: usize = 2;
const PARALLEL: usize = 48;
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../enforcer-policy/tests/data/cluster-policy-conformance")
}

fn yaml_docs(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(d).with_context(|| path.display().to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn load(file: &str) -> Result<Vec<(String, Value)>> {
    Ok(yaml_docs(&data_dir().join(file))?
        .into_iter()
        .map(|v| (key(&v), v))
        .collect())
}

/// Where a scenario pod lives: its namespace (a pod's own, or its node's for a host-network
/// pod) and address.
#[derive(Clone)]
struct Place {
    netns: String,
    ip: Ipv4Addr,
}

struct Model {
    // Field order is drop order: the agents go before the servers, the namespaces and the
    // folder.
    agents: Vec<AgentProcess>,
    _servers: Vec<Servers>,
    cluster: Cluster,
    dir: tempfile::TempDir,
    data: ClusterData,
    pods: BTreeMap<String, Place>,
    /// What the folder holds now.
    written: Option<Value>,
    probes_run: usize,
}

fn v4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => bail!("{a}: the model is IPv4"),
    }
}

impl Model {
    fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        anyhow::ensure!(
            unsafe { libc::geteuid() } == 0,
            "the model builds network namespaces: run it as root"
        );
        Testbed::cleanup_stale(TAG);
        let data: ClusterData = serde_yaml::from_str(
            &std::fs::read_to_string(data_dir().join("cluster.yaml")).context("cluster.yaml")?,
        )?;
        let base: Objects = load("base/manifests.yaml")?.into_iter().collect();
        // Each node's pod CIDR: the /24 of its (non-host-network) pods.
        let mut specs = Vec::new();
        for n in &data.nodes {
            let ip = data
                .pods
                .values()
                .filter(|p| p.node == n.name && !n.addresses.contains(&p.ip))
                .map(|p| v4(p.ip))
                .next()
                .with_context(|| format!("no pod on {}", n.name))??;
            let [a, b, c, _] = ip.octets();
            specs.push(NodeSpec::routed(&n.name, Ipv4Addr::new(a, b, c, 0), 24));
        }
        let mut cluster = Cluster::new(TAG, &specs)?;
        for (i, n) in data.nodes.iter().enumerate() {
            for a in &n.addresses {
                // On the underlay link: the nodes reach each other's data address directly.
                cluster.nodes[i].node_exec(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}/24"),
                    "dev",
                    UPLINK,
                ])?;
            }
        }
        let node_index = |name: &str| data.nodes.iter().position(|n| n.name == name);
        let mut pods = BTreeMap::new();
        let mut servers = Vec::new();
        let dir = tempfile::tempdir()?;
        for v in base.values() {
            if v["kind"] != "StatefulSet" {
                continue;
            }
            for (at, pod) in statefulset_pods(v, &data) {
                let place = &data.pods[&at];
                let node = node_index(&place.node).context("node")?;
                let ip = v4(place.ip)?;
                let tp = if pod["spec"]["hostNetwork"] == true {
                    // The node itself: no veth, its namespace serves and sends.
                    TestPod {
                        name: at.clone(),
                        netns: cluster.nodes[node].node.clone(),
                        host_if: String::new(),
                        v4: ip,
                        v6: None,
                    }
                } else {
                    let short = format!("p{}", pods.len());
                    cluster.add_pod(node, &short, ip)?
                };
                // The agnhost ports, and the ports the containers declare (the host-network
                // pods' own).
                let mut ports = PORTS.to_vec();
                ports.extend(
                    pod.pointer("/spec/containers/0/ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["containerPort"].as_u64())
                        .map(|p| p as u16),
                );
                ports.sort_unstable();
                ports.dedup();
                servers.push(Servers::start(&tp, &ports, &at)?);
                pods.insert(
                    at,
                    Place {
                        netns: tp.netns.clone(),
                        ip,
                    },
                );
            }
        }
        let mut model = Self {
            agents: Vec::new(),
            _servers: servers,
            cluster,
            dir,
            data,
            pods,
            written: None,
            probes_run: 0,
        };
        model.write(&base)?;
        model.agents = model
            .cluster
            .start_agents(
                &agent_binary()?,
                model.dir.path(),
                &[],
                Duration::from_secs(60),
            )
            .map_err(trim_error)?;
        Ok(model)
    }

    /// The folder for `objects`: one `List` (Pods for StatefulSets, the Nodes beside them) in
    /// one file replaced whole, so a step is one change the agents apply at once, never half.
    /// Returns whether anything changed.
    fn write(&mut self, objects: &Objects) -> Result<bool> {
        let mut items = node_objects(&self.data);
        for v in objects.values() {
            if v["kind"] == "StatefulSet" {
                items.extend(statefulset_pods(v, &self.data).into_iter().map(|(_, p)| p));
            } else {
                items.push(v.clone());
            }
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        if self.written.as_ref() == Some(&list) {
            return Ok(false);
        }
        write_manifest(self.dir.path(), "objects.yaml", &list)?;
        self.written = Some(list);
        Ok(true)
    }

    /// Writes the step's objects and waits until every agent has programmed them, none refused.
    fn apply(&mut self, objects: &Objects) -> Result<()> {
        if self.write(objects)? {
            for a in &mut self.agents {
                a.wait_applied(APPLY_TIMEOUT).map_err(trim_error)?;
                // Upstream's objects are all valid: none may be refused (run as a stand-in).
                let (_, ready) = a.get("/readyz")?;
                anyhow::ensure!(!ready.contains("refused"), "{ready}");
            }
        }
        Ok(())
    }

    /// The step's TCP and UDP probes, retried while they disagree with upstream: the ones
    /// that still do, described.
    fn probe(&mut self, probes: &[&Probe]) -> Result<Vec<String>> {
        let mut list = Vec::new();
        for p in probes {
            let from = self.pods.get(&p.from).with_context(|| p.from.clone())?;
            let to = self.pods.get(&p.to).with_context(|| p.to.clone())?;
            let proto = match p.protocol.as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => bail!("protocol {other}"),
            };
            list.push((from.netns.clone(), IpAddr::V4(to.ip), p.port, proto));
        }
        let mut pending: Vec<usize> = (0..list.len()).collect();
        let mut timeout = PROBE_TIMEOUT;
        for attempt in 0..=RETRIES {
            let batch: Vec<_> = pending.iter().map(|&i| list[i].clone()).collect();
            self.probes_run += batch.len();
            let got = probe_all(&batch, timeout, PARALLEL)?;
            pending = pending
                .into_iter()
                .zip(got)
                .filter(|&(i, ok)| ok != probes[i].allowed)
                .map(|(i, _)| i)
                .collect();
            if pending.is_empty() || attempt == RETRIES {
                break;
            }
            timeout = RETRY_TIMEOUT;
        }
        Ok(pending
            .into_iter()
            .map(|i| {
                let p = probes[i];
                format!(
                    "{} -> {} {}/{}: upstream expects {}, the traffic was {}",
                    p.from,
                    p.to,
                    p.protocol,
                    p.port,
                    if p.allowed { "allowed" } else { "denied" },
                    if p.allowed { "denied" } else { "allowed" },
                )
            })
            .collect())
    }

    fn log_tails(&self, lines: usize) -> String {
        self.agents
            .iter()
            .map(|a| {
                let text = a.log_text();
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// Runs every test of one upstream file on the model: its steps in order, mutations
/// cumulative, each step's TCP and UDP probes sent for real.
fn run_file(m: &mut Model, file: &str) -> Result<Vec<String>> {
    let tests: TestFile = serde_yaml::from_str(
        &std::fs::read_to_string(data_dir().join("tests").join(format!("{file}.yaml")))
            .context("test file")?,
    )?;
    let mut failures = Vec::new();
    let (mut sent, mut sctp) = (0, 0);
    for test in &tests.tests {
        let mut objects: Objects = load("base/manifests.yaml")?.into_iter().collect();
        for f in &test.manifests {
            objects.extend(load(f)?);
        }
        for step in &test.steps {
            mutate(&mut objects, &step.mutations, &m.data, &test.name);
            m.apply(&objects)
                .with_context(|| format!("{} / {}", test.name, step.name))?;
            let (probes, skipped): (Vec<&Probe>, Vec<&Probe>) =
                step.probes.iter().partition(|p| p.protocol != "sctp");
            sctp += skipped.len();
            sent += probes.len();
            for f in m.probe(&probes)? {
                failures.push(format!("{} / {:?}: {f}", test.name, step.name));
            }
        }
    }
    println!("    {sent} probes sent, {sctp} SCTP probes not sent");
    anyhow::ensure!(sent + sctp > 0, "{file}: no probe");
    Ok(failures)
}

static MODEL: Mutex<Option<Result<Model, String>>> = Mutex::new(None);

fn file_trial(file: &'static str) -> Result<(), Failed> {
    println!();
    let mut shared = MODEL.lock().unwrap_or_else(PoisonError::into_inner);
    if shared.is_none() {
        let started = Instant::now();
        let built = Model::new().map_err(|e| format!("{e:#}"));
        if built.is_ok() {
            println!("model ready in {:.1} s", started.elapsed().as_secs_f64());
        }
        *shared = Some(built);
    }
    let m = match shared.as_mut().expect("set above") {
        Ok(m) => m,
        Err(e) => return Err(format!("the model could not be built: {e}").into()),
    };
    let t = Instant::now();
    let outcome = run_file(m, file);
    println!("    {:.1} s", t.elapsed().as_secs_f64());
    match outcome {
        Ok(f) if f.is_empty() => Ok(()),
        Ok(f) => Err(format!(
            "{file}: {} probes differ from upstream:\n{}\nagent logs (tail):\n{}",
            f.len(),
            f.join("\n"),
            m.log_tails(25)
        )
        .into()),
        Err(e) => Err(format!("{file}: {e:#}").into()),
    }
}

/// The upstream files, one test each, named after the file.
const FILES: [&str; 22] = [
    "admin-network-policy-experimental-egress-rules",
    "admin-network-policy-experimental-ingress-rules",
    "admin-network-policy-standard-egress-inline-cidr-rules",
    "admin-network-policy-standard-egress-sctp-rules",
    "admin-network-policy-standard-egress-tcp-rules",
    "admin-network-policy-standard-egress-udp-rules",
    "admin-network-policy-standard-gress-rules",
    "admin-network-policy-standard-ingress-sctp-rules",
    "admin-network-policy-standard-ingress-tcp-rules",
    "admin-network-policy-standard-ingress-udp-rules",
    "admin-network-policy-standard-integration",
    "admin-network-policy-standard-priority",
    "baseline-admin-network-policy-experimental-egress-rules",
    "baseline-admin-network-policy-experimental-ingress-rules",
    "baseline-admin-network-policy-standard-egress-inline-cidr-rules",
    "baseline-admin-network-policy-standard-egress-sctp-rules",
    "baseline-admin-network-policy-standard-egress-tcp-rules",
    "baseline-admin-network-policy-standard-egress-udp-rules",
    "baseline-admin-network-policy-standard-gress-rules",
    "baseline-admin-network-policy-standard-ingress-sctp-rules",
    "baseline-admin-network-policy-standard-ingress-tcp-rules",
    "baseline-admin-network-policy-standard-ingress-udp-rules",
];

/// Every scenario file has its test here (a file added on refresh is not silently skipped).
fn file_table_trial() -> Result<(), Failed> {
    let mut files: Vec<String> = std::fs::read_dir(data_dir().join("tests"))
        .map_err(|e| format!("{e}"))?
        .filter_map(|e| e.ok())
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".yaml")
                .to_string()
        })
        .collect();
    files.sort();
    let mut known: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
    known.sort();
    if files != known {
        return Err(format!("scenario files {files:?}, tests for {known:?}").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    // The agent built with this test.
    enforcer_testkit::netns::use_built_agent(env!("CARGO_BIN_EXE_enforcer"));
    let mut args = Arguments::from_args();
    // The files share one model: one at a time.
    args.test_threads = Some(1);
    let mut trials = vec![Trial::test(
        "every_scenario_file_has_a_test",
        file_table_trial,
    )];
    trials.extend(
        FILES.iter().map(|&f| {
            Trial::test(f.replace('-', "_"), move || file_trial(f)).with_ignored_flag(true)
        }),
    );
    let started = Instant::now();
    let conclusion = libtest_mimic::run(&args, trials);
    // Tear the model down (agents, servers, namespaces, folder), whatever the outcome.
    let model = MODEL.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(Ok(m)) = model {
        println!(
            "model: {} probes; {:.1} s in all; tearing it down",
            m.probes_run,
            started.elapsed().as_secs_f64()
        );
        drop(m);
    }
    conclusion.exit_code()
}
