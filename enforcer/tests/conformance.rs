//! The upstream Kubernetes NetworkPolicy e2e suite ("netpol": kubernetes/kubernetes
//! `test/e2e/network/netpol/network_policy.go`) against the real agent in standalone mode.
//!
//! The model is upstream's: namespaces `x`, `y`, `z` (label `kubernetes.io/metadata.name`), pods
//! `a`, `b`, `c` in each (label `pod: <name>`), every pod serving TCP and UDP on ports 80 and 81
//! with container ports named `serve-<port>-<proto>`. The suite runs four times, on four
//! clusters of network namespaces (`Layout`): one node with routed veths; two nodes joined by an
//! underlay with routed veths; two such nodes with their pods on a bridge `cni0` (flannel in
//! host-gw mode); and the two routed nodes again with every probe sent through the target pod's
//! Service, as upstream probes: one ClusterIP Service per pod (`s-<ns>-<pod>`, selecting it,
//! ports 80 and 81 on TCP and UDP), translated by kube-proxy's nftables rules in both node
//! namespaces (`enforcer_testkit::kube_proxy`), the Service manifests in the agents' folder. On
//! two nodes, pod i lives on node i % 2, so every namespace and every pod name has pods on both
//! (the Services run reaches backends on the sender's node and on the other), and each node runs
//! its own agent (`--node-name`), all reading one manifests folder. Expectations do not depend
//! on the layout: through a Service, the backend the ClusterIP is translated to decides. Each
//! case writes its policies (and relabels pods or namespaces) in that folder, waits for every
//! agent to report the state programmed, probes all 72 ordered pairs (loopback is ignored, as
//! upstream does) in parallel, and compares the observed matrix with the expected one built by
//! upstream's operators (`ExpectPeer`, `ExpectAllIngress`, `ExpectAllEgress`, `Expect`) from the
//! same truth tables. Pairs that disagree are probed again
//! (upstream retries too) before a case fails; a failure prints upstream-style expected /
//! observed / comparison tables, what the offline compiler (`enforcer explain`) says about the
//! wrong pairs, and the agents' logs.
//!
//! Cases follow the classic upstream revision (all 9 pods, full 9x9 matrix), with upstream's
//! current namespace label; each is named after its `ginkgo.It` text. Policies that mention SCTP
//! are applied as written, but only TCP and UDP are probed (no sctp module here).
//!
//! Each case is a test of its own, named after its `ginkgo.It` text in snake case (e.g.
//! `should_support_a_default_deny_ingress_policy`), prefixed by `two_nodes::`,
//! `two_bridge_nodes::` or `services::` on the other layouts; `--list` lists them. They need
//! root and are ignored unless asked for: `cargo test -p enforcer --test conformance --
//! --include-ignored endport` runs the cases whose name contains `endport` (on every layout),
//! `-- --include-ignored two_nodes::` the second run, `-- --include-ignored services::` the run
//! through Services. A layout's model is built by its first case that runs and torn
//! down (agents, namespaces, folder) before the next layout's, and after the last case, also
//! after a failure. A test that needs no root checks the case table itself.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, ExitCode},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use enforcer_testkit::kube_proxy::{self, KubeProxies, ServiceSpec};
use enforcer_testkit::netns::{
    AgentProcess, Cluster, NodeSpec, Proto, Servers, Testbed, agent_binary, probe_all, trim_error,
    write_manifest,
};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Map, Value, json};

const TAG: &str = "npc";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const N: usize = 9;
const PORTS: [u16; 2] = [80, 81];
/// Upstream's `namespaceLabelKey`, set on every namespace by the API server.
const NS_LABEL: &str = "kubernetes.io/metadata.name";
/// A denied TCP or UDP probe costs this much; allowed ones answer in well under a millisecond.
const PROBE_TIMEOUT: Duration = Duration::from_millis(600);
/// Timeout of the second look at pairs that disagreed.
const RETRY_TIMEOUT: Duration = Duration::from_millis(1500);
const RETRIES: usize = 2;
const PARALLEL: usize = 48;
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The suite must keep at least this many upstream cases.
const MIN_CASES: usize = 30;

type R = Result<()>;

// ---------------------------------------------------------------------------------------------
// The model: pod i is namespace NAMESPACES[i / 3], pod PODS[i % 3], in upstream's order
// x/a x/b x/c y/a y/b y/c z/a z/b z/c.

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn pod_index(pod: &str) -> usize {
    let (ns, name) = pod
        .split_once('/')
        .unwrap_or_else(|| panic!("pod {pod:?} is not ns/name"));
    let n = NAMESPACES
        .iter()
        .position(|x| *x == ns)
        .unwrap_or_else(|| panic!("no namespace {ns}"));
    let p = PODS
        .iter()
        .position(|x| *x == name)
        .unwrap_or_else(|| panic!("no pod {name}"));
    n * 3 + p
}

// ---------------------------------------------------------------------------------------------
// Where the nine pods live: the suite runs once per layout, each a test of its own per case.

/// The cluster a run of the suite builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// One node, routed veths (kindnet, Calico).
    OneNode,
    /// Two nodes joined by an underlay, routed veths; pod i on node i % 2.
    TwoNodes,
    /// Two nodes joined by an underlay, each with its pods on a bridge `cni0` (flannel in
    /// host-gw mode); pod i on node i % 2.
    TwoBridgeNodes,
    /// [`Layout::TwoNodes`], every probe to the target pod's ClusterIP, translated by kube-proxy
    /// (nftables mode) on the sender's node.
    Services,
}

impl Layout {
    const ALL: [Self; 4] = [
        Self::OneNode,
        Self::TwoNodes,
        Self::TwoBridgeNodes,
        Self::Services,
    ];

    /// The prefix of its tests' names (none for the first run, whose names are upstream's).
    fn prefix(self) -> &'static str {
        match self {
            Self::OneNode => "",
            Self::TwoNodes => "two_nodes::",
            Self::TwoBridgeNodes => "two_bridge_nodes::",
            Self::Services => "services::",
        }
    }

    fn nodes(self) -> usize {
        match self {
            Self::OneNode => 1,
            _ => 2,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::OneNode => "one node, routed veths",
            Self::TwoNodes => "two nodes, routed veths",
            Self::TwoBridgeNodes => "two nodes, pods on a bridge (cni0)",
            Self::Services => {
                "two nodes, routed veths, probes through each pod's ClusterIP (kube-proxy nftables)"
            }
        }
    }
}

/// The layout of the suite built last (its addresses are what `pod_ip` gives).
static LAYOUT: Mutex<Layout> = Mutex::new(Layout::OneNode);

fn layout() -> Layout {
    *LAYOUT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The node of pod `i` in the current layout.
fn node_of(i: usize) -> usize {
    i % layout().nodes()
}

/// Pod addresses, so that upstream's `<x/a ip>/4` (host bits kept) holds them all: one node,
/// 10.1.<ns>.<pod>; two nodes, 10.<10 + node>.<ns>.<pod> in node's pod CIDR 10.<10 + node>.0.0/16.
fn pod_ip(i: usize) -> Ipv4Addr {
    let (ns, pod) = ((i / 3 + 1) as u8, (i % 3 + 1) as u8);
    match layout() {
        Layout::OneNode => Ipv4Addr::new(10, 1, ns, pod),
        _ => Ipv4Addr::new(10, 10 + node_of(i) as u8, ns, pod),
    }
}

fn ip_of(pod: &str) -> Ipv4Addr {
    pod_ip(pod_index(pod))
}

/// The ClusterIP of pod i's Service in the Services run: 10.96.<ns>.<pod>.
fn service_ip(i: usize) -> Ipv4Addr {
    kube_proxy::cluster_ip(((i / 3 + 1) as u16) << 8 | (i % 3 + 1) as u16)
}

/// Where a probe to pod i goes: its ClusterIP in the Services run, else its own address.
fn probe_target(i: usize) -> Ipv4Addr {
    match layout() {
        Layout::Services => service_ip(i),
        _ => pod_ip(i),
    }
}

/// Upstream's Service of a model pod (`Pod.Service()`): named `s-<ns>-<pod>`, selecting the
/// pod's labels, one port per served port and protocol (`service-port-<proto>-<port>`, the
/// target port the same); SCTP, never probed here, is left out.
fn service_of(i: usize) -> ServiceSpec {
    let (namespace, name) = (NAMESPACES[i / 3], PODS[i % 3]);
    let mut s = ServiceSpec::new(namespace, &format!("s-{namespace}-{name}"), service_ip(i));
    for port in PORTS {
        for proto in [Proto::Tcp, Proto::Udp] {
            s = s.port(proto, port, port);
        }
    }
    for (k, v) in default_pod_labels(i) {
        s = s.selector(&k, &v);
    }
    s.backend(pod_ip(i))
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream's Reachability: an expected matrix and the operators the cases edit it with.

/// A set of pods: a namespace and/or a pod name, `None` = any (upstream's `Peer`).
#[derive(Clone, Copy)]
struct Peer {
    ns: Option<&'static str>,
    pod: Option<&'static str>,
}

const ANY: Peer = Peer {
    ns: None,
    pod: None,
};

fn ns(ns: &'static str) -> Peer {
    Peer {
        ns: Some(ns),
        pod: None,
    }
}

fn pod(ns: &'static str, pod: &'static str) -> Peer {
    Peer {
        ns: Some(ns),
        pod: Some(pod),
    }
}

impl Peer {
    fn matches(&self, i: usize) -> bool {
        self.ns.is_none_or(|n| n == NAMESPACES[i / 3]) && self.pod.is_none_or(|p| p == PODS[i % 3])
    }
}

type Matrix = [[bool; N]; N];

#[derive(Clone)]
struct Reachability {
    expected: Matrix,
}

impl Reachability {
    fn new(default: bool) -> Self {
        Self {
            expected: [[default; N]; N],
        }
    }

    fn expect(&mut self, from: &str, to: &str, connected: bool) {
        self.expected[pod_index(from)][pod_index(to)] = connected;
    }

    fn expect_peer(&mut self, from: Peer, to: Peer, connected: bool) {
        for f in (0..N).filter(|&f| from.matches(f)) {
            for t in (0..N).filter(|&t| to.matches(t)) {
                self.expected[f][t] = connected;
            }
        }
    }

    /// Everything into `pod` (a column).
    fn expect_all_ingress(&mut self, pod: &str, connected: bool) {
        let t = pod_index(pod);
        for row in &mut self.expected {
            row[t] = connected;
        }
    }

    /// Everything out of `pod` (a row).
    fn expect_all_egress(&mut self, pod: &str, connected: bool) {
        self.expected[pod_index(pod)] = [connected; N];
    }
}

/// Upstream's truth-table rendering: `.` connected, `X` blocked (or, in a comparison, wrong).
fn table(title: &str, cell: impl Fn(usize, usize) -> char) -> String {
    let mut s = format!("{title}:\n-");
    for t in 0..N {
        let _ = write!(s, "\t{}", pod_name(t));
    }
    s.push('\n');
    for f in 0..N {
        s.push_str(&pod_name(f));
        for t in 0..N {
            let _ = write!(s, "\t{}", cell(f, t));
        }
        s.push('\n');
    }
    s
}

fn dot(b: bool) -> char {
    if b { '.' } else { 'X' }
}

// ---------------------------------------------------------------------------------------------
// Policies, built like upstream's GenNetworkPolicy* / SetSpec*Rules helpers and written the way
// the API server would hand them out (Go's omitempty: empty rule lists are left out).

#[derive(Clone)]
struct NetPol {
    name: String,
    spec: Map<String, Value>,
}

impl NetPol {
    /// `GenNetworkPolicyWithNameAndPodSelector`.
    fn with_pod_selector(name: &str, selector: Value) -> Self {
        let mut spec = Map::new();
        spec.insert("podSelector".into(), selector);
        Self {
            name: name.into(),
            spec,
        }
    }

    /// `GenNetworkPolicyWithNameAndPodMatchLabel`.
    fn with_pod_match_label(name: &str, labels: &[(&str, &str)]) -> Self {
        Self::with_pod_selector(name, match_labels(labels))
    }

    fn rules(mut self, field: &str, kind: &str, rules: Vec<Value>) -> Self {
        if !self.spec.contains_key(field) {
            self.spec.insert(field.into(), json!([]));
            let types = self.spec.entry("policyTypes").or_insert_with(|| json!([]));
            if let Some(t) = types.as_array_mut() {
                t.push(json!(kind));
            }
        }
        if let Some(list) = self.spec.get_mut(field).and_then(Value::as_array_mut) {
            list.extend(rules);
        }
        self
    }

    /// `SetSpecIngressRules(rules...)`: adds the rules and, the first time, policyType Ingress.
    fn ingress(self, rules: Vec<Value>) -> Self {
        self.rules("ingress", "Ingress", rules)
    }

    /// `SetSpecEgressRules(rules...)`.
    fn egress(self, rules: Vec<Value>) -> Self {
        self.rules("egress", "Egress", rules)
    }

    fn policy_types(mut self, types: &[&str]) -> Self {
        self.spec.insert("policyTypes".into(), json!(types));
        self
    }

    fn manifest(&self, namespace: &str) -> Value {
        let mut spec = self.spec.clone();
        spec.retain(|_, v| !matches!(v, Value::Array(a) if a.is_empty()));
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": { "name": self.name, "namespace": namespace },
            "spec": spec,
        })
    }
}

fn label_map(labels: &[(&str, &str)]) -> Map<String, Value> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

/// `metav1.LabelSelector{MatchLabels: labels}` (an empty map is omitted: `{}`).
fn match_labels(labels: &[(&str, &str)]) -> Value {
    if labels.is_empty() {
        json!({})
    } else {
        json!({ "matchLabels": label_map(labels) })
    }
}

/// `metav1.LabelSelector{MatchExpressions: [{key, operator, values}]}`.
fn match_expression(key: &str, operator: &str, values: &[&str]) -> Value {
    json!({ "matchExpressions": [{ "key": key, "operator": operator, "values": values }] })
}

fn ns_named(name: &str) -> Value {
    match_labels(&[(NS_LABEL, name)])
}

/// Upstream's DNS egress rule (UDP 53) that classic egress cases add; nothing here uses it.
fn dns_rule() -> Value {
    json!({ "ports": [{ "protocol": "UDP", "port": 53 }] })
}

// ---------------------------------------------------------------------------------------------
// Namespace and Pod manifests.

fn namespace_manifest(ns: &str, extra: &[(&str, &str)]) -> Value {
    let mut labels = label_map(&[(NS_LABEL, ns)]);
    labels.extend(label_map(extra));
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns, "labels": labels } })
}

fn default_pod_labels(i: usize) -> Vec<(String, String)> {
    vec![("pod".into(), PODS[i % 3].into())]
}

/// A pod of the model: one container per (port, protocol) with upstream's names (SCTP declared
/// too, as upstream's superset model does; it is never probed here).
fn pod_manifest(i: usize, labels: &[(String, String)]) -> Value {
    let (namespace, name) = (NAMESPACES[i / 3], PODS[i % 3]);
    let mut containers = Vec::new();
    for port in PORTS {
        for proto in ["tcp", "udp", "sctp"] {
            containers.push(json!({
                "name": format!("cont-{port}-{proto}"),
                "image": "registry.k8s.io/e2e-test-images/agnhost:2.47",
                "ports": [{
                    "containerPort": port,
                    "name": format!("serve-{port}-{proto}"),
                    "protocol": proto.to_uppercase(),
                }],
            }));
        }
    }
    let labels: Map<String, Value> = labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let ip = pod_ip(i).to_string();
    let mut spec = json!({ "containers": containers });
    if layout().nodes() > 1 {
        spec["nodeName"] = json!(node_name(node_of(i)));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"), "labels": labels },
        "spec": spec,
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn node_name(node: usize) -> String {
    format!("node-{node}")
}

// ---------------------------------------------------------------------------------------------
// The suite: its nodes, nine pods, their servers, one agent per node and the manifests folder.

/// The namespaces of a run, deleted on drop.
enum Net {
    One(#[allow(dead_code)] Testbed),
    Cluster(#[allow(dead_code)] Cluster),
}

struct Suite {
    // Field order is drop order: the agents go before the servers, kube-proxy's rules, the
    // namespaces and the folder.
    agents: Vec<AgentProcess>,
    _servers: Vec<Servers>,
    /// kube-proxy's rules on every node (the Services run only).
    kube_proxy: Option<KubeProxies>,
    _net: Net,
    layout: Layout,
    dir: tempfile::TempDir,
    netns: Vec<String>,
    policy_files: BTreeSet<PathBuf>,
    relabeled_pods: BTreeSet<usize>,
    relabeled_namespaces: BTreeSet<usize>,
    dirty: bool,
    /// Failures of the current case.
    failures: Vec<String>,
    probes_run: usize,
}

impl Suite {
    fn new(layout: Layout) -> Result<Self> {
        *LAYOUT.lock().unwrap_or_else(PoisonError::into_inner) = layout;
        Testbed::cleanup_stale(TAG);
        let dir = tempfile::tempdir()?;
        let mut servers = Vec::new();
        let mut netns = Vec::new();
        let mut net = match layout {
            Layout::OneNode => Net::One(Testbed::new(TAG)?),
            Layout::TwoNodes | Layout::TwoBridgeNodes | Layout::Services => {
                let specs: Vec<NodeSpec> = (0..2)
                    .map(|k| {
                        let cidr = Ipv4Addr::new(10, 10 + k as u8, 0, 0);
                        if layout == Layout::TwoBridgeNodes {
                            NodeSpec::bridged(&node_name(k), cidr, 16)
                        } else {
                            NodeSpec::routed(&node_name(k), cidr, 16)
                        }
                    })
                    .collect();
                Net::Cluster(Cluster::new(TAG, &specs)?)
            }
        };
        for i in 0..N {
            let name = pod_name(i).replace('/', "-");
            let p = match &mut net {
                Net::One(tb) => tb.add_pod(&name, pod_ip(i), None)?,
                Net::Cluster(c) => c.add_pod(node_of(i), &name, pod_ip(i))?,
            };
            servers.push(Servers::start(&p, &PORTS, &pod_name(i))?);
            netns.push(p.netns.clone());
        }
        let mut kube_proxy = None;
        if layout == Layout::Services {
            let services: Vec<ServiceSpec> = (0..N).map(service_of).collect();
            for s in &services {
                s.write_manifest(dir.path())?;
            }
            if let Net::Cluster(c) = &net {
                kube_proxy = Some(c.install_kube_proxy(kube_proxy::Mode::Nftables, &services)?);
            }
        }
        for (n, ns) in NAMESPACES.iter().enumerate() {
            write_manifest(
                dir.path(),
                &format!("ns-{ns}.yaml"),
                &namespace_manifest(ns, &[]),
            )?;
            for p in 0..3 {
                let i = n * 3 + p;
                write_manifest(
                    dir.path(),
                    &pod_file(i),
                    &pod_manifest(i, &default_pod_labels(i)),
                )?;
            }
        }
        let bin = agent_binary()?;
        let agents = match &net {
            Net::One(tb) => {
                let mut agent = AgentProcess::start_binary(&bin, tb, dir.path(), &[])?;
                agent
                    .wait_ready(Duration::from_secs(60))
                    .map_err(trim_error)?;
                vec![agent]
            }
            Net::Cluster(c) => c
                .start_agents(&bin, dir.path(), &[], Duration::from_secs(60))
                .map_err(trim_error)?,
        };
        Ok(Self {
            agents,
            _servers: servers,
            kube_proxy,
            _net: net,
            layout,
            dir,
            netns,
            policy_files: BTreeSet::new(),
            relabeled_pods: BTreeSet::new(),
            relabeled_namespaces: BTreeSet::new(),
            dirty: false,
            failures: Vec::new(),
            probes_run: 0,
        })
    }

    /// `CreatePolicy` / `UpdatePolicy` (a policy is a file named after it; an update replaces it).
    fn create_policy(&mut self, namespace: &str, policy: &NetPol) -> R {
        let file = format!("np-{namespace}-{}.yaml", policy.name);
        write_manifest(self.dir.path(), &file, &policy.manifest(namespace))?;
        self.policy_files.insert(self.dir.path().join(file));
        self.dirty = true;
        Ok(())
    }

    fn update_policy(&mut self, namespace: &str, policy: &NetPol) -> R {
        self.create_policy(namespace, policy)
    }

    /// `cleanNetworkPolicies`: deletes every policy of the case.
    fn delete_policies(&mut self) -> R {
        for f in std::mem::take(&mut self.policy_files) {
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
            self.dirty = true;
        }
        Ok(())
    }

    /// `AddPodLabels`: merges `labels` into the pod's labels.
    fn add_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) -> R {
        let i = pod_index(pod);
        let mut all = default_pod_labels(i);
        for (k, v) in labels {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
        }
        write_manifest(self.dir.path(), &pod_file(i), &pod_manifest(i, &all))?;
        self.relabeled_pods.insert(i);
        self.dirty = true;
        Ok(())
    }

    /// `AddNamespaceLabel` / `UpdateNamespaceLabels`: adds labels to a namespace.
    fn add_namespace_labels(&mut self, namespace: &str, labels: &[(&str, &str)]) -> R {
        let n = NAMESPACES
            .iter()
            .position(|x| *x == namespace)
            .context("unknown namespace")?;
        write_manifest(
            self.dir.path(),
            &format!("ns-{namespace}.yaml"),
            &namespace_manifest(namespace, labels),
        )?;
        self.relabeled_namespaces.insert(n);
        self.dirty = true;
        Ok(())
    }

    /// Back to the model: no policies, original labels.
    fn reset(&mut self) -> R {
        self.delete_policies()?;
        for i in std::mem::take(&mut self.relabeled_pods) {
            write_manifest(
                self.dir.path(),
                &pod_file(i),
                &pod_manifest(i, &default_pod_labels(i)),
            )?;
            self.dirty = true;
        }
        for n in std::mem::take(&mut self.relabeled_namespaces) {
            let ns = NAMESPACES[n];
            write_manifest(
                self.dir.path(),
                &format!("ns-{ns}.yaml"),
                &namespace_manifest(ns, &[]),
            )?;
            self.dirty = true;
        }
        self.sync()
    }

    /// Waits until the agent has programmed what the folder holds now.
    fn sync(&mut self) -> R {
        if self.dirty {
            for agent in &mut self.agents {
                agent.wait_applied(APPLY_TIMEOUT).map_err(trim_error)?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Probes every ordered pair but loopback on (port, proto): the observed matrix.
    fn probe(
        &mut self,
        pairs: &[(usize, usize)],
        port: u16,
        proto: Proto,
        timeout: Duration,
    ) -> Result<Vec<bool>> {
        let list: Vec<(String, IpAddr, u16, Proto)> = pairs
            .iter()
            .map(|&(f, t)| {
                (
                    self.netns[f].clone(),
                    IpAddr::V4(probe_target(t)),
                    port,
                    proto,
                )
            })
            .collect();
        self.probes_run += list.len();
        probe_all(&list, timeout, PARALLEL)
    }

    /// `ValidateOrFail`: probes the matrix on one port and protocol and records a failure (with
    /// upstream's tables) when a judged pair differs from `r` after the retries.
    fn validate(&mut self, port: u16, proto: Proto, r: &Reachability) -> R {
        self.sync()?;
        let started = Instant::now();
        let pairs: Vec<(usize, usize)> = (0..N)
            .flat_map(|f| (0..N).map(move |t| (f, t)))
            .filter(|(f, t)| f != t)
            .collect();
        let got = self.probe(&pairs, port, proto, PROBE_TIMEOUT)?;
        let mut observed: Matrix = r.expected;
        for (&(f, t), ok) in pairs.iter().zip(got) {
            observed[f][t] = ok;
        }
        let wrong = |o: &Matrix| -> Vec<(usize, usize)> {
            pairs
                .iter()
                .copied()
                .filter(|&(f, t)| o[f][t] != r.expected[f][t])
                .collect()
        };
        let first_wrong = wrong(&observed);
        for _ in 0..RETRIES {
            let w = wrong(&observed);
            if w.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            let again = self.probe(&w, port, proto, RETRY_TIMEOUT)?;
            for (&(f, t), ok) in w.iter().zip(again) {
                observed[f][t] = ok;
            }
        }
        let still = wrong(&observed);
        let label = format!("{}/{port}", proto_name(proto));
        if still.is_empty() {
            let note = if first_wrong.is_empty() {
                String::new()
            } else {
                let (allowed, blocked): (Vec<_>, Vec<_>) = first_wrong
                    .iter()
                    .copied()
                    .partition(|&(f, t)| r.expected[f][t]);
                let mut parts = Vec::new();
                if !allowed.is_empty() {
                    parts.push(format!(
                        "expected allowed, first blocked: {}",
                        pairs_text(&allowed)
                    ));
                }
                if !blocked.is_empty() {
                    parts.push(format!(
                        "expected blocked, first allowed: {}",
                        pairs_text(&blocked)
                    ));
                }
                format!(
                    " (after a retry: {} pair(s) first disagreed: {})",
                    first_wrong.len(),
                    parts.join("; ")
                )
            };
            println!(
                "    ok   {label} ({:.2} s){note}",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let listed: Vec<String> = still
            .iter()
            .take(12)
            .map(|&(f, t)| {
                format!(
                    "{}->{} expected {} observed {}",
                    pod_name(f),
                    pod_name(t),
                    verdict(r.expected[f][t]),
                    verdict(observed[f][t])
                )
            })
            .collect();
        let more = if still.len() > listed.len() {
            format!(", and {} more", still.len() - listed.len())
        } else {
            String::new()
        };
        let mut msg = format!(
            "{label}: {} of 72 pair(s) wrong: {}{more}\n",
            still.len(),
            listed.join(", ")
        );
        if self.layout == Layout::Services {
            msg.push_str(
                "(each probe to pod <ns>/<pod> went to the ClusterIP 10.96.<ns>.<pod> of its Service s-<ns>-<pod>, x=1 y=2 z=3, a=1 b=2 c=3)\n",
            );
        }
        msg.push_str(&table("expected", |f, t| dot(r.expected[f][t])));
        msg.push_str(&table("observed", |f, t| {
            if f == t { '-' } else { dot(observed[f][t]) }
        }));
        msg.push_str(&table("comparison", |f, t| {
            if f == t {
                '-'
            } else {
                dot(observed[f][t] == r.expected[f][t])
            }
        }));
        for &(f, t) in still.iter().take(3) {
            let _ = writeln!(
                msg,
                "enforcer explain {} -> {} {label}:\n{}",
                pod_name(f),
                pod_name(t),
                self.explain(f, t, port, proto)
            );
        }
        println!("    FAIL {label}\n{}", indent(&msg));
        self.failures.push(msg);
        Ok(())
    }

    /// What the offline compiler says about one flow, for failure reports.
    fn explain(&self, from: usize, to: usize, port: u16, proto: Proto) -> String {
        let Ok(bin) = agent_binary() else {
            return "(no binary)".into();
        };
        let out = Command::new(bin)
            .arg("explain")
            .arg(self.dir.path())
            .args([
                "--from",
                &pod_name(from),
                "--to",
                &pod_name(to),
                "--port",
                &port.to_string(),
            ])
            .args(["--protocol", &proto_name(proto).to_lowercase()])
            .output();
        match out {
            Ok(o) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines().take(20).collect::<Vec<_>>().join("\n")
            }
            Err(e) => format!("(explain failed: {e})"),
        }
    }

    /// The end of each agent's log (named by node when there are several).
    fn log_tail(&self, lines: usize) -> String {
        let mut out = Vec::new();
        for (k, agent) in self.agents.iter().enumerate() {
            let log = agent.log_text();
            let all: Vec<&str> = log.lines().collect();
            if self.agents.len() > 1 {
                out.push(format!("--- {}:", node_name(k)));
            }
            out.extend(
                all[all.len().saturating_sub(lines)..]
                    .iter()
                    .map(|l| l.to_string()),
            );
        }
        out.join("\n")
    }
}

fn verdict(b: bool) -> &'static str {
    if b { "allowed" } else { "blocked" }
}

fn pairs_text(pairs: &[(usize, usize)]) -> String {
    pairs
        .iter()
        .map(|&(f, t)| format!("{}->{}", pod_name(f), pod_name(t)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("      {l}\n")).collect()
}

fn pod_file(i: usize) -> String {
    format!("pod-{}.yaml", pod_name(i).replace('/', "-"))
}

// ---------------------------------------------------------------------------------------------
// The cases, in upstream's order, named after their `ginkgo.It` text. Expectations are upstream's
// truth tables, built with upstream's operators on the full 9x9 model.

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    run: fn(&mut Suite) -> R,
}

use Proto::{Tcp, Udp};

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "should support a 'default-deny-ingress' policy",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-ingress", json!({})).ingress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ANY, ns("x"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should support a 'default-deny-all' policy",
            run: |s| {
                let p = NetPol::with_pod_selector("deny-all-tcp-allow-dns", json!({}))
                    .ingress(vec![])
                    .egress(vec![dns_rule()]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_peer(ANY, ns("x"), false);
                r.expect_peer(ns("x"), ANY, false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            run: |s| {
                let rule = json!({ "from": [{ "podSelector": match_labels(&[("pod", "b")]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("x-a-allows-x-b", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("x/b", "x/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy to allow ingress traffic for a target",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-all", json!({})).ingress(vec![]),
                )?;
                let rule = json!({ "from": [{ "podSelector": {}, "namespaceSelector": {} }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-all-to-a", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", true);
                r.expect_all_ingress("x/b", false);
                r.expect_all_ingress("x/c", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy to allow ingress traffic from pods in all namespaces",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": match_labels(&[]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-from-another-ns", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                s.validate(80, Tcp, &Reachability::new(true))
            },
        },
        Case {
            name: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y") }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-ns-selector",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on PodSelector with MatchExpressions",
            run: |s| {
                let rule =
                    json!({ "from": [{ "podSelector": match_expression("pod", "In", &["b"]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("x-a-allows-x-b", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("x/b", "x/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on NamespaceSelector with MatchExpressions",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": match_expression(NS_LABEL, "In", &["y"]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ns-y-match-selector", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on PodSelector or NamespaceSelector",
            run: |s| {
                let rule = json!({ "from": [
                    { "namespaceSelector": match_expression(NS_LABEL, "NotIn", &["x"]) },
                    { "podSelector": match_labels(&[("pod", "b")]) },
                ] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ns-y-match-selector", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect("x/a", "x/a", false);
                r.expect("x/c", "x/a", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on PodSelector and NamespaceSelector",
            run: |s| {
                let rule = json!({ "from": [{
                    "namespaceSelector": match_expression(NS_LABEL, "NotIn", &["x"]),
                    "podSelector": match_labels(&[("pod", "b")]),
                }] });
                let p = NetPol::with_pod_match_label(
                    "allow-ns-y-podselector-and-nsselector",
                    &[("pod", "a")],
                )
                .ingress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("y/b", "x/a", true);
                r.expect("z/b", "x/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            run: |s| {
                let rule = json!({ "from": [{
                    "namespaceSelector": match_expression(NS_LABEL, "NotIn", &["x"]),
                    "podSelector": match_expression("pod", "In", &["b", "c"]),
                }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ns-y-z-pod-b-c", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect("y/a", "x/a", false);
                r.expect("z/a", "x/a", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on any PodSelectors",
            run: |s| {
                let rule = json!({ "from": [
                    { "podSelector": match_labels(&[("pod", "b")]) },
                    { "podSelector": match_labels(&[("pod", "c")]) },
                ] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ns-x-pod-b-c", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("x/b", "x/a", true);
                r.expect("x/c", "x/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y"), "podSelector": match_labels(&[("pod", "a")]) }] });
                let p = NetPol::with_pod_match_label(
                    "allow-ns-y-pod-a-via-namespace-pod-selector",
                    &[("pod", "a")],
                )
                .ingress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("y/a", "x/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on Ports",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y") }], "ports": [{ "port": 81, "protocol": "TCP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-ns-selector",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("y"), pod("x", "a"), true);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(81, Tcp, &r)
            },
        },
        Case {
            name: "should enforce multiple, stacked policies with overlapping podSelectors",
            run: |s| {
                let rule81 = json!({ "from": [{ "namespaceSelector": ns_named("y") }], "ports": [{ "port": 81, "protocol": "TCP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-ns-selector",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule81]),
                )?;
                let mut allow = Reachability::new(true);
                allow.expect_peer(ns("x"), pod("x", "a"), false);
                allow.expect_peer(ns("y"), pod("x", "a"), true);
                allow.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(81, Tcp, &allow)?;
                let mut deny = Reachability::new(true);
                deny.expect_all_ingress("x/a", false);
                s.validate(80, Tcp, &deny)?;
                let rule80 = json!({ "from": [{ "namespaceSelector": ns_named("y") }], "ports": [{ "port": 80, "protocol": "TCP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-ns-selector-80",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule80]),
                )?;
                s.validate(80, Tcp, &allow)
            },
        },
        Case {
            name: "should support allow-all policy",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-all", &[]).ingress(vec![json!({})]),
                )?;
                let r = Reachability::new(true);
                s.validate(80, Tcp, &r)?;
                s.validate(81, Tcp, &r)
            },
        },
        Case {
            name: "should allow ingress access on one named port",
            run: |s| {
                let rule = json!({ "ports": [{ "port": "serve-81-tcp" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-all", &[]).ingress(vec![rule]),
                )?;
                s.validate(81, Tcp, &Reachability::new(true))?;
                let mut r80 = Reachability::new(true);
                r80.expect_peer(ANY, ns("x"), false);
                s.validate(80, Tcp, &r80)
            },
        },
        Case {
            name: "should allow ingress access from namespace on one named port",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y") }], "ports": [{ "port": "serve-80-tcp", "protocol": "TCP" }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-ns-selector-80",
                    &[("pod", "a")],
                )
                .ingress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(80, Tcp, &r)?;
                let mut fail = Reachability::new(true);
                fail.expect_all_ingress("x/a", false);
                s.validate(81, Tcp, &fail)
            },
        },
        Case {
            name: "should allow egress access on one named port",
            run: |s| {
                let rule = json!({ "ports": [{ "port": "serve-80-tcp" }, { "protocol": "UDP", "port": 53 }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-egress", &[]).egress(vec![rule]),
                )?;
                s.validate(80, Tcp, &Reachability::new(true))?;
                let mut r81 = Reachability::new(true);
                r81.expect_peer(ns("x"), ANY, false);
                s.validate(81, Tcp, &r81)
            },
        },
        Case {
            name: "should enforce updated policy",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-all-mutate-to-deny-all", &[])
                        .ingress(vec![json!({})]),
                )?;
                s.validate(81, Tcp, &Reachability::new(true))?;
                // policy.Spec.Ingress = []NetworkPolicyIngressRule{}; UpdatePolicy
                s.update_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-all-mutate-to-deny-all", &[])
                        .ingress(vec![]),
                )?;
                let mut deny = Reachability::new(true);
                deny.expect_peer(ANY, ns("x"), false);
                s.validate(81, Tcp, &deny)
            },
        },
        Case {
            name: "should allow ingress access from updated namespace",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": match_labels(&[("ns2", "updated")]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-ns-selector",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                s.validate(80, Tcp, &r)?;
                s.add_namespace_labels("y", &[("ns2", "updated")])?;
                let mut with_label = Reachability::new(true);
                with_label.expect_all_ingress("x/a", false);
                with_label.expect_peer(ns("y"), ANY, true);
                s.validate(80, Tcp, &with_label)
            },
        },
        Case {
            name: "should allow ingress access from updated pod",
            run: |s| {
                let labels = [("pod", "b"), ("pod2", "updated")];
                let rule = json!({ "from": [{ "podSelector": match_labels(&labels) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-client-a-via-pod-selector",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                s.validate(80, Tcp, &r)?;
                s.add_pod_labels("x/b", &labels)?;
                let mut with_label = Reachability::new(true);
                with_label.expect_all_ingress("x/a", false);
                with_label.expect("x/b", "x/a", true);
                s.validate(80, Tcp, &with_label)
            },
        },
        Case {
            name: "should deny ingress from pods on other namespaces",
            run: |s| {
                let rule = json!({ "from": [{ "podSelector": match_labels(&[]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-empty-policy", json!({})).ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("y"), ns("x"), false);
                r.expect_peer(ns("z"), ns("x"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should deny ingress access to updated pod",
            run: |s| {
                let p = NetPol::with_pod_selector(
                    "deny-ingress-via-label-selector",
                    match_labels(&[("target", "isolated")]),
                )
                .ingress(vec![]);
                s.create_policy("x", &p)?;
                s.validate(80, Tcp, &Reachability::new(true))?;
                s.add_pod_labels("x/a", &[("target", "isolated")])?;
                let mut isolated = Reachability::new(true);
                isolated.expect_all_ingress("x/a", false);
                s.validate(80, Tcp, &isolated)
            },
        },
        Case {
            name: "should deny egress from pods based on PodSelector",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-egress-pod-a", match_labels(&[("pod", "a")]))
                        .egress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_egress("x/a", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should deny egress from all pods in a namespace",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-egress-ns-x", json!({})).egress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), ANY, false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should work with Ingress, Egress specified together",
            run: |s| {
                let ingress = json!({ "from": [{ "podSelector": match_labels(&[("pod", "b")]) }] });
                // Port 80 without a protocol: the API server defaults it to TCP.
                let egress =
                    json!({ "ports": [{ "port": 80 }, { "protocol": "UDP", "port": 53 }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-pod-selector",
                    &[("pod", "a")],
                )
                .ingress(vec![ingress])
                .egress(vec![egress])
                .policy_types(&["Egress", "Ingress"]);
                s.create_policy("x", &p)?;
                let mut r80 = Reachability::new(true);
                r80.expect_all_ingress("x/a", false);
                r80.expect("x/b", "x/a", true);
                s.validate(80, Tcp, &r80)?;
                let mut r81 = Reachability::new(true);
                r81.expect_all_ingress("x/a", false);
                r81.expect_all_egress("x/a", false);
                r81.expect("x/b", "x/a", true);
                s.validate(81, Tcp, &r81)
            },
        },
        Case {
            name: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            run: |s| {
                let egress = json!({ "to": [{ "namespaceSelector": ns_named("y"), "podSelector": match_labels(&[("pod", "a")]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-to-ns-y-pod-a", &[("pod", "a")])
                        .egress(vec![egress, dns_rule()]),
                )?;
                let ingress = json!({ "from": [{ "namespaceSelector": ns_named("x"), "podSelector": match_labels(&[("pod", "a")]) }] });
                let on_a = NetPol::with_pod_match_label(
                    "allow-from-xa-on-ya-match-selector",
                    &[("pod", "a")],
                )
                .ingress(vec![ingress.clone()]);
                let on_b = NetPol::with_pod_match_label(
                    "allow-from-xa-on-yb-match-selector",
                    &[("pod", "b")],
                )
                .ingress(vec![ingress]);
                s.create_policy("y", &on_a)?;
                s.create_policy("y", &on_b)?;
                let mut r = Reachability::new(true);
                r.expect_peer(pod("x", "a"), ANY, false);
                r.expect_peer(ANY, pod("y", "a"), false);
                r.expect_peer(pod("x", "a"), pod("y", "a"), true);
                r.expect_peer(ANY, pod("y", "b"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            run: |s| {
                let egress = json!({ "to": [{ "namespaceSelector": ns_named("y"), "podSelector": match_labels(&[("pod", "a")]) }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-to-ns-y-pod-a", &[("pod", "a")])
                        .egress(vec![egress, dns_rule()]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_egress("x/a", false);
                r.expect("x/a", "y/a", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            run: |s| {
                let rule = json!({ "ports": [{ "protocol": "TCP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ingress-by-proto", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                s.validate(80, Tcp, &Reachability::new(true))?;
                let mut udp = Reachability::new(true);
                udp.expect_peer(ANY, pod("x", "a"), false);
                s.validate(80, Udp, &udp)
            },
        },
        Case {
            name: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 80 }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ingress-port-80", &[]).ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ANY, ns("x"), false);
                s.validate(81, Tcp, &r)?;
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ingress", &[]).ingress(vec![json!({})]),
                )?;
                s.validate(81, Tcp, &Reachability::new(true))
            },
        },
        Case {
            name: "should enforce multiple egress policies with egress allow-all policy taking precedence",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 80 }, { "protocol": "UDP", "port": 53 }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-egress-port-80", &[]).egress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), ANY, false);
                s.validate(81, Tcp, &r)?;
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-egress", &[]).egress(vec![json!({})]),
                )?;
                s.validate(81, Tcp, &Reachability::new(true))
            },
        },
        Case {
            name: "should stop enforcing policies after they are deleted",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-all", json!({}))
                        .ingress(vec![])
                        .egress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), ANY, false);
                r.expect_peer(ANY, ns("x"), false);
                s.validate(80, Tcp, &r)?;
                s.delete_policies()?;
                s.validate(80, Tcp, &Reachability::new(true))
            },
        },
        Case {
            name: "should allow egress access to server in CIDR block",
            run: |s| {
                let egress =
                    json!({ "to": [{ "ipBlock": { "cidr": format!("{}/32", ip_of("y/b")) } }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-cidr-egress-rule",
                    &[("pod", "a")],
                )
                .egress(vec![egress, dns_rule()]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_all_egress("x/a", false);
                r.expect("x/a", "y/b", true);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce except clause while egress access to server in CIDR block",
            run: |s| {
                // Classic upstream: `<x/a ip>/4` with its host bits, except x/b's /32.
                let block = json!({ "cidr": format!("{}/4", ip_of("x/a")), "except": [format!("{}/32", ip_of("x/b"))] });
                let egress = json!({ "to": [{ "ipBlock": block }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-cidr-egress-rule",
                    &[("pod", "a")],
                )
                .egress(vec![egress, dns_rule()]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect("x/a", "x/b", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            run: |s| {
                let block = json!({ "cidr": format!("{}/4", ip_of("x/a")), "except": [format!("{}/32", ip_of("x/b"))] });
                let egress = json!({ "to": [{ "ipBlock": block }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-cidr-egress-rule",
                    &[("pod", "a")],
                )
                .egress(vec![egress, dns_rule()]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect("x/a", "x/b", false);
                s.validate(80, Tcp, &r)?;
                // The same policy, updated to allow x/b's /32 only.
                let egress =
                    json!({ "to": [{ "ipBlock": { "cidr": format!("{}/32", ip_of("x/b")) } }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-cidr-egress-rule",
                    &[("pod", "a")],
                )
                .egress(vec![egress, dns_rule()]);
                s.update_policy("x", &p)?;
                let mut allow = Reachability::new(true);
                allow.expect_all_egress("x/a", false);
                allow.expect("x/a", "x/b", true);
                s.validate(80, Tcp, &allow)
            },
        },
        Case {
            name: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
            run: |s| {
                let target = [("pod", "a")];
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("allow-egress-for-target", match_labels(&target))
                        .egress(vec![json!({})]),
                )?;
                s.validate(80, Tcp, &Reachability::new(true))?;
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector(
                        "deny-ingress-via-label-selector",
                        match_labels(&target),
                    )
                    .ingress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-ingress", json!({})).ingress(vec![]),
                )?;
                let rule = json!({ "ports": [{ "port": 81, "protocol": "SCTP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-only-sctp-ingress-on-port-81",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ANY, ns("x"), false);
                s.validate(81, Tcp, &r)
            },
        },
        Case {
            name: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 80, "protocol": "SCTP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-only-sctp-ingress-on-port-80",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                s.validate(81, Tcp, &r)
            },
        },
        Case {
            name: "should not allow access by TCP when a policy specifies only UDP",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 81, "protocol": "UDP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label(
                        "allow-only-udp-ingress-on-port-81",
                        &[("pod", "a")],
                    )
                    .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                s.validate(81, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y") }] });
                let p = NetPol::with_pod_match_label(
                    "allow-client-a-via-ns-selector-for-immutable-ns-label",
                    &[("pod", "a")],
                )
                .ingress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(80, Tcp, &r)
            },
        },
        Case {
            name: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
            run: |s| {
                let rule = json!({ "to": [{ "namespaceSelector": match_expression(NS_LABEL, "NotIn", &["y"]) }] });
                let p = NetPol::with_pod_match_label(
                    "allow-ns-y-match-selector-for-immutable-ns-label",
                    &[("pod", "a")],
                )
                .egress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_peer(pod("x", "a"), ns("y"), false);
                s.validate(80, Tcp, &r)
            },
        },
        // "NetworkPolicy between server and client using UDP"
        Case {
            name: "UDP: should support a 'default-deny-ingress' policy",
            run: |s| {
                s.create_policy(
                    "x",
                    &NetPol::with_pod_selector("deny-all", json!({})).ingress(vec![]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ANY, ns("x"), false);
                s.validate(80, Udp, &r)
            },
        },
        Case {
            name: "UDP: should enforce policy based on Ports",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y") }], "ports": [{ "port": 81, "protocol": "UDP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ingress-on-port-81-ns-x", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut r = Reachability::new(true);
                r.expect_peer(ns("x"), pod("x", "a"), false);
                r.expect_peer(ns("z"), pod("x", "a"), false);
                s.validate(81, Udp, &r)
            },
        },
        Case {
            name: "UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
            run: |s| {
                let rule = json!({ "from": [{ "namespaceSelector": ns_named("y"), "podSelector": match_labels(&[("pod", "a")]) }] });
                let p = NetPol::with_pod_match_label(
                    "allow-ns-y-pod-a-via-namespace-pod-selector",
                    &[("pod", "a")],
                )
                .ingress(vec![rule]);
                s.create_policy("x", &p)?;
                let mut r = Reachability::new(true);
                r.expect_all_ingress("x/a", false);
                r.expect("y/a", "x/a", true);
                s.validate(80, Udp, &r)
            },
        },
        // endPort: upstream's port-range cases (proposed with kubernetes#99551 on ports 111-115,
        // [Feature:NetworkPolicyEndPort]) on this model's ports: the range covers one of 80/81,
        // with a range edge on the port it covers. The UDP check (a range without a protocol is
        // TCP only) is this suite's addition, from the same defaulting rule as upstream's cases.
        Case {
            name: "should enforce policy to allow ingress traffic using port range (endPort)",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 70, "endPort": 80 }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-ingress-use-port-range", &[("pod", "a")])
                        .ingress(vec![rule]),
                )?;
                let mut in_range = Reachability::new(true);
                in_range.expect_all_ingress("x/a", true);
                s.validate(80, Tcp, &in_range)?;
                let mut out_of_range = Reachability::new(true);
                out_of_range.expect_all_ingress("x/a", false);
                s.validate(81, Tcp, &out_of_range)?;
                s.validate(80, Udp, &out_of_range)
            },
        },
        Case {
            name: "should enforce policy to allow egress traffic using port range (endPort)",
            run: |s| {
                let rule = json!({ "ports": [{ "port": 81, "endPort": 90, "protocol": "TCP" }] });
                s.create_policy(
                    "x",
                    &NetPol::with_pod_match_label("allow-egress-use-port-range", &[("pod", "a")])
                        .egress(vec![rule]),
                )?;
                let mut in_range = Reachability::new(true);
                in_range.expect_all_egress("x/a", true);
                s.validate(81, Tcp, &in_range)?;
                let mut out_of_range = Reachability::new(true);
                out_of_range.expect_all_egress("x/a", false);
                s.validate(80, Tcp, &out_of_range)
            },
        },
    ]
}

// ---------------------------------------------------------------------------------------------

/// Upstream checks, before a case, that every judged pair connects (the model is healthy and
/// nothing is left from an earlier case).
fn baseline(s: &mut Suite) -> R {
    let all = Reachability::new(true);
    for port in PORTS {
        for proto in [Tcp, Udp] {
            s.validate(port, proto, &all)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The harness: one test per case, named after it, sharing one model.

/// The model, built by the first case that runs and torn down when every case has run.
static SUITE: Mutex<Shared> = Mutex::new(Shared {
    suite: None,
    layout: None,
    broken: None,
});

struct Shared {
    suite: Option<Suite>,
    /// The layout of `suite` (or of the failed attempt to build it).
    layout: Option<Layout>,
    /// Why the model could not be built (then every case fails with it, without a retry).
    broken: Option<String>,
}

/// The test name of a case: its `ginkgo.It` text in snake case (`'` dropped, every other run of
/// non-alphanumerics an underscore), e.g. `should_support_a_default_deny_ingress_policy`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().filter(|&c| c != '\'') {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Runs `f` on the model in `layout`, building it first if no case of that layout has yet (and
/// tearing down the model of another layout).
fn with_suite(
    layout: Layout,
    f: impl FnOnce(&mut Suite) -> Result<(), Failed>,
) -> Result<(), Failed> {
    // After libtest's `test NAME ... `: this test's output on lines of its own.
    println!();
    let mut shared = SUITE.lock().unwrap_or_else(PoisonError::into_inner);
    if shared.layout != Some(layout) {
        if let Some(old) = shared.suite.take() {
            println!(
                "model ({}): {} probes; tearing it down",
                old.layout.describe(),
                old.probes_run
            );
            drop(old);
        }
        shared.broken = None;
        shared.layout = Some(layout);
    }
    if let Some(e) = &shared.broken {
        return Err(format!("the model could not be built: {e}").into());
    }
    if shared.suite.is_none() {
        match build_suite(layout) {
            Ok(s) => shared.suite = Some(s),
            Err(e) => {
                let e = format!("{e:#}");
                shared.broken = Some(e.clone());
                return Err(format!("setting up the model: {e}").into());
            }
        }
    }
    f(shared.suite.as_mut().expect("built above"))
}

fn build_suite(layout: Layout) -> Result<Suite> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the conformance suite builds network namespaces: run it as root"
    );
    let started = Instant::now();
    let s = Suite::new(layout)?;
    println!(
        "model ready in {:.1} s ({}): 9 pods, agent(s) {:?} ready",
        started.elapsed().as_secs_f64(),
        layout.describe(),
        s.agents.iter().map(AgentProcess::pid).collect::<Vec<_>>()
    );
    Ok(s)
}

/// The model before any policy: every pair connects on every port and protocol.
fn baseline_trial(layout: Layout) -> Result<(), Failed> {
    with_suite(layout, |s| {
        println!("--- baseline: no policies, everything connects");
        s.failures.clear();
        if let Err(e) = baseline(s) {
            s.failures.push(format!("{e:#}"));
        }
        if s.failures.is_empty() {
            return Ok(());
        }
        Err(format!(
            "baseline failed, the model or the agent is broken:\n{}\nagent log:\n{}{}",
            s.failures.join("\n"),
            s.log_tail(80),
            s.kube_proxy
                .as_ref()
                .map(|k| format!("\nkube-proxy rules:\n{}", k.ruleset()))
                .unwrap_or_default()
        )
        .into())
    })
}

/// One upstream case: the baseline (nothing left from an earlier case), the case, then the
/// model back as it was.
fn case_trial(layout: Layout, case: Case) -> Result<(), Failed> {
    with_suite(layout, |s| {
        println!("--- {}", case.name);
        let t = Instant::now();
        s.failures.clear();
        if let Err(e) = baseline(s).and_then(|()| {
            if s.failures.is_empty() {
                (case.run)(s)
            } else {
                s.failures.push(
                    "baseline before the case failed: state left over from an earlier case?".into(),
                );
                Ok(())
            }
        }) {
            println!("    ERROR {e:#}");
            s.failures.push(format!("error: {e:#}"));
        }
        if let Err(e) = s.reset() {
            s.failures
                .push(format!("cleaning up after the case: {e:#}"));
        }
        println!("    {:.1} s", t.elapsed().as_secs_f64());
        if s.failures.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{}\n{}\nagent log (tail):\n{}",
            case.name,
            s.failures.join("\n"),
            indent(&s.log_tail(25))
        )
        .into())
    })
}

/// The case table itself (no root needed): unique names and test names, enough cases.
fn case_table_trial() -> Result<(), Failed> {
    let all = cases();
    let names: BTreeSet<&str> = all.iter().map(|c| c.name).collect();
    if names.len() != all.len() {
        return Err("case names must be unique".into());
    }
    let slugs: BTreeSet<String> = all.iter().map(|c| slug(c.name)).collect();
    if slugs.len() != all.len() {
        return Err("case test names (slugs of the names) must be unique".into());
    }
    if all.len() < MIN_CASES {
        return Err(format!(
            "only {} upstream cases, want at least {MIN_CASES}",
            all.len()
        )
        .into());
    }
    Ok(())
}

fn main() -> ExitCode {
    // The agent built with this test (cargo builds the package's binary for integration tests).
    enforcer_testkit::netns::use_built_agent(env!("CARGO_BIN_EXE_enforcer"));
    let mut args = Arguments::from_args();
    // The cases share one model: one at a time.
    args.test_threads = Some(1);
    let needs_root = |t: Trial| t.with_ignored_flag(true);
    let mut trials = vec![Trial::test(
        "upstream_case_table_is_complete",
        case_table_trial,
    )];
    // Layout by layout (one model at a time, built by its first case): the cases in upstream's
    // order, each named after its `It` text, prefixed by the layout past the first.
    for layout in Layout::ALL {
        let prefix = layout.prefix();
        trials.push(needs_root(Trial::test(
            format!("{prefix}baseline_every_pair_connects_without_policies"),
            move || baseline_trial(layout),
        )));
        trials.extend(cases().into_iter().map(|case| {
            needs_root(Trial::test(
                format!("{prefix}{}", slug(case.name)),
                move || case_trial(layout, case),
            ))
        }));
    }
    let started = Instant::now();
    let conclusion = libtest_mimic::run(&args, trials);
    // Tear the model down (agents, servers, namespaces, folder), whatever the outcome.
    let suite = SUITE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .suite
        .take();
    if let Some(s) = suite {
        println!(
            "model ({}): {} probes; {:.1} s in all; tearing it down",
            s.layout.describe(),
            s.probes_run,
            started.elapsed().as_secs_f64()
        );
        drop(s);
    }
    conclusion.exit_code()
}
