//! The upstream conformance scenarios for cluster policies (`network-policy-api`'s Go suite,
//! re-expressed as data in `tests/data/cluster-policy-conformance/`), judged by the reference
//! evaluator ([`direction_verdict`], which applies the tiers around NetworkPolicy): a flow is
//! allowed when egress at the source and ingress at the destination both allow it. Every probe
//! is judged a second time through the compiler: the compiled state, looked up as the
//! programs do ([`decide`]), must give upstream's verdict too. One test per upstream file.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::{
    compile::{Allocations, CompileOptions, Compiled, compile},
    decision::decide,
    evaluator::direction_verdict,
    model::{Cluster, NodeInfo, shared},
    state::PodRef,
    tests::fixtures,
};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cluster-policy-conformance")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

#[derive(Deserialize)]
struct ClusterData {
    nodes: Vec<Node>,
    pods: BTreeMap<String, Placement>,
}

#[derive(Deserialize)]
struct Node {
    name: String,
    labels: Labels,
    addresses: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct Placement {
    node: String,
    ip: IpAddr,
}

#[derive(Deserialize)]
struct TestFile {
    tests: Vec<Test>,
}

#[derive(Deserialize)]
struct Test {
    name: String,
    manifests: Vec<String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    name: String,
    #[serde(default)]
    mutations: Vec<Mutation>,
    probes: Vec<Probe>,
}

/// A JSON Patch on a live object, or an object deleted or applied whole.
#[derive(Deserialize)]
#[serde(untagged)]
enum Mutation {
    Patch { object: String, patch: Vec<PatchOp> },
    Delete { delete: String },
    Apply { apply: Value },
}

/// An RFC 6902 operation (the ones the scenarios need).
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum PatchOp {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
    Move { from: String, path: String },
}

#[derive(Deserialize)]
struct Probe {
    from: String,
    to: String,
    protocol: String,
    port: u16,
    allowed: bool,
}

/// `Kind/name` for cluster-scoped objects, `Kind/namespace/name` for namespaced ones.
fn key(v: &Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    let kind = s("/kind").expect("an object has a kind");
    let name = s("/metadata/name").expect("an object has a name");
    match s("/metadata/namespace") {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

fn split_pointer(path: &str) -> (&str, String) {
    let (parent, last) = path.rsplit_once('/').expect("a JSON pointer");
    (parent, last.replace("~1", "/").replace("~0", "~"))
}

fn remove(doc: &mut Value, path: &str) -> Value {
    let (parent, last) = split_pointer(path);
    match doc.pointer_mut(parent) {
        Some(Value::Array(a)) => a.remove(last.parse::<usize>().expect("an index")),
        Some(Value::Object(o)) => o.remove(&last).unwrap_or_else(|| panic!("no {path}")),
        _ => panic!("no {path}"),
    }
}

fn add(doc: &mut Value, path: &str, value: Value) {
    let (parent, last) = split_pointer(path);
    match doc.pointer_mut(parent) {
        Some(Value::Array(a)) if last == "-" => a.push(value),
        Some(Value::Array(a)) => a.insert(last.parse::<usize>().expect("an index"), value),
        Some(Value::Object(o)) => {
            o.insert(last, value);
        }
        _ => panic!("no parent of {path}"),
    }
}

fn patch(doc: &mut Value, op: PatchOp) {
    match op {
        PatchOp::Add { path, value } => add(doc, &path, value),
        PatchOp::Remove { path } => {
            remove(doc, &path);
        }
        PatchOp::Replace { path, value } => {
            *doc.pointer_mut(&path)
                .unwrap_or_else(|| panic!("no {path} to replace")) = value;
        }
        PatchOp::Move { from, path } => {
            let v = remove(doc, &from);
            add(doc, &path, v);
        }
    }
}

/// Replaces `${ip:NAMESPACE/POD}` in every string of `v` with the pod's address.
fn resolve(v: &mut Value, ips: &BTreeMap<String, Placement>) {
    match v {
        Value::String(s) => {
            while let Some(start) = s.find("${ip:") {
                let end = start + s[start..].find('}').expect("a closed placeholder");
                let pod = &s[start + 5..end];
                let ip = ips.get(pod).unwrap_or_else(|| panic!("no pod {pod}")).ip;
                s.replace_range(start..=end, &ip.to_string());
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| resolve(v, ips)),
        Value::Object(o) => o.values_mut().for_each(|v| resolve(v, ips)),
        _ => {}
    }
}

/// The cluster as one step sees it.
struct World {
    pods: BTreeMap<String, Arc<PodInfo>>,
    cluster: Cluster,
    /// The cluster compiled for one node enforcing every pod.
    compiled: Compiled,
}

/// Which judge a verdict is from.
#[derive(Clone, Copy, Debug)]
enum Judge {
    Evaluator,
    Compiled,
}

impl World {
    fn build(objects: &BTreeMap<String, Value>, data: &ClusterData) -> Self {
        let mut ns_objects = Vec::new();
        let mut pods = BTreeMap::new();
        let mut nps = Vec::new();
        let mut policies = Vec::new();
        for v in objects.values() {
            let kind = v["kind"].as_str().unwrap_or("");
            let api_version = v["apiVersion"].as_str().unwrap_or("");
            match kind {
                "Namespace" => {
                    ns_objects.push(serde_json::from_value::<Namespace>(v.clone()).expect("NS"))
                }
                "StatefulSet" => pods.extend(statefulset_pods(v, data)),
                "NetworkPolicy" => {
                    nps.push(serde_json::from_value::<NetworkPolicy>(v.clone()).expect("NP"))
                }
                _ if is_tier_kind(api_version, kind) => {
                    let p = parse(v).expect("a cluster policy");
                    let refused = &p.policy.refused;
                    assert!(refused.is_empty() && p.warnings.is_empty(), "{refused:?}");
                    policies.push(p.policy);
                }
                _ => panic!("no model for {}", key(v)),
            }
        }
        sort(&mut policies);
        let nodes: Vec<NodeInfo> = data
            .nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name.clone(),
                labels: n.labels.clone(),
                addresses: n.addresses.clone(),
            })
            .collect();
        let cluster = Cluster {
            namespaces: ns_objects.into_iter().map(Arc::new).collect(),
            pods: pods.values().cloned().collect(),
            policies: nps.into_iter().map(Arc::new).collect(),
            cluster_policies: policies.into_iter().map(Arc::new).collect(),
            nodes: shared(nodes),
            ..Default::default()
        };
        let compiled = compile(
            &cluster,
            &CompileOptions::default(),
            &mut Allocations::new(),
        );
        Self {
            pods,
            cluster,
            compiled,
        }
    }

    fn pod(&self, name: &str) -> &Arc<PodInfo> {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// One direction at `subject` (egress: the source, ingress: the destination), by the
    /// reference evaluator or the compiled lookup. A host-network pod takes part in no
    /// policy: allowed.
    fn direction(
        &self,
        judge: Judge,
        ingress: bool,
        subject: &PodInfo,
        peer: &PodInfo,
        svc: (u8, u16),
    ) -> bool {
        let pod = PodRef::new(subject.namespace.to_string(), subject.name.to_string());
        let opts = CompileOptions::default();
        let (proto, port) = svc;
        match judge {
            Judge::Evaluator => direction_verdict(
                &self.cluster,
                &opts,
                &pod,
                ingress,
                peer.ips[0],
                proto,
                port,
            )
            .allowed(),
            Judge::Compiled => {
                let dir = if ingress {
                    enforcer_common::DIR_INGRESS
                } else {
                    enforcer_common::DIR_EGRESS
                };
                decide(&self.compiled.state, &pod, dir, peer.ips[0], proto, port).allowed
            }
        }
    }

    fn allowed(&self, judge: Judge, p: &Probe) -> bool {
        let (from, to) = (self.pod(&p.from), self.pod(&p.to));
        let protocol = match p.protocol.as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "sctp" => PROTO_SCTP,
            other => panic!("protocol {other}"),
        };
        let svc = (protocol, p.port);
        self.direction(judge, false, from, to, svc) && self.direction(judge, true, to, from, svc)
    }
}

/// The pods of a StatefulSet: `NAME-N` for each replica, placed and addressed by `data`.
fn statefulset_pods(v: &Value, data: &ClusterData) -> Vec<(String, Arc<PodInfo>)> {
    let ns = v["metadata"]["namespace"].as_str().expect("namespaced");
    let name = v["metadata"]["name"].as_str().expect("named");
    let template = &v["spec"]["template"];
    let labels: Vec<(String, String)> = template["metadata"]["labels"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (&**k, &**v)).collect();
    let mut ports = Vec::new();
    for c in template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(n) = p["name"].as_str() {
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                let port = p["containerPort"].as_i64().expect("containerPort") as i32;
                ports.push((n.to_string(), proto, port));
            }
        }
    }
    let ports: Vec<(&str, &str, i32)> = ports.iter().map(|(n, p, x)| (&**n, &**p, *x)).collect();
    let host_network = template["spec"]["hostNetwork"].as_bool().unwrap_or(false);
    (0..v["spec"]["replicas"].as_u64().unwrap_or(1))
        .map(|i| {
            let pod = format!("{name}-{i}");
            let at = format!("{ns}/{pod}");
            let place = data
                .pods
                .get(&at)
                .unwrap_or_else(|| panic!("no place for {at}"));
            let node = data.nodes.iter().find(|n| n.name == place.node);
            let node = node.unwrap_or_else(|| panic!("{at}: no node {}", place.node));
            assert!(
                !host_network || node.addresses.contains(&place.ip),
                "{at}: a host-network pod has its node's address"
            );
            let ip = place.ip.to_string();
            let mut info = PodInfo::from(fixtures::pod(
                ns,
                &pod,
                &labels,
                &[&ip],
                &place.node,
                &ports,
            ));
            info.host_network = host_network;
            (at, Arc::new(info))
        })
        .collect()
}

/// Runs every test of one upstream file: its steps in order, mutations cumulative, every
/// probe judged; fails with each probe whose verdict differs from upstream's.
fn run(file: &str) {
    let dir = data_dir();
    let data: ClusterData =
        serde_yaml::from_str(&fs::read_to_string(dir.join("cluster.yaml")).expect("cluster.yaml"))
            .expect("cluster.yaml");
    let path = dir.join("tests").join(format!("{file}.yaml"));
    let tests: TestFile =
        serde_yaml::from_str(&fs::read_to_string(&path).expect("test file")).expect("test file");
    let load = |m: &str| -> Vec<(String, Value)> {
        yaml_docs(&dir.join(m))
            .into_iter()
            .map(|v| (key(&v), v))
            .collect()
    };
    let mut failures = Vec::new();
    let mut probes = 0;
    for test in tests.tests {
        let mut objects: BTreeMap<String, Value> =
            load("base/manifests.yaml").into_iter().collect();
        for m in &test.manifests {
            objects.extend(load(m));
        }
        for step in test.steps {
            for m in step.mutations {
                match m {
                    Mutation::Patch { object, patch: ops } => {
                        let doc = objects
                            .get_mut(&object)
                            .unwrap_or_else(|| panic!("{}: no {object}", test.name));
                        for mut op in ops {
                            if let PatchOp::Add { value, .. } | PatchOp::Replace { value, .. } =
                                &mut op
                            {
                                resolve(value, &data.pods);
                            }
                            patch(doc, op);
                        }
                    }
                    Mutation::Delete { delete } => {
                        objects
                            .remove(&delete)
                            .unwrap_or_else(|| panic!("{}: no {delete}", test.name));
                    }
                    Mutation::Apply { mut apply } => {
                        resolve(&mut apply, &data.pods);
                        objects.insert(key(&apply), apply);
                    }
                }
            }
            let world = World::build(&objects, &data);
            for p in &step.probes {
                probes += 1;
                for judge in [Judge::Evaluator, Judge::Compiled] {
                    let got = world.allowed(judge, p);
                    if got != p.allowed {
                        failures.push(format!(
                            "{} / {:?}: {} -> {} {}/{}: upstream expects {}, {judge:?} says {}",
                            test.name,
                            step.name,
                            p.from,
                            p.to,
                            p.protocol,
                            p.port,
                            verdict(p.allowed),
                            verdict(got)
                        ));
                    }
                }
            }
        }
    }
    assert!(probes > 0, "{file}: no probe");
    assert!(
        failures.is_empty(),
        "{file}: {} of {probes} probes differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// One test per upstream file, named after it.
macro_rules! upstream {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                run($file);
            }
        )*

        /// Every scenario file has its test (a file added on refresh is not silently skipped).
        #[test]
        fn every_scenario_file_has_a_test() {
            let mut files: Vec<String> = fs::read_dir(data_dir().join("tests"))
                .expect("scenario folder")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let mut known: Vec<String> = [$($file),*].iter().map(|f| format!("{f}.yaml")).collect();
            known.sort();
            assert_eq!(files, known);
        }
    };
}

upstream! {
    admin_network_policy_experimental_egress_rules => "admin-network-policy-experimental-egress-rules",
    admin_network_policy_experimental_ingress_rules => "admin-network-policy-experimental-ingress-rules",
    admin_network_policy_standard_egress_inline_cidr_rules => "admin-network-policy-standard-egress-inline-cidr-rules",
    admin_network_policy_standard_egress_sctp_rules => "admin-network-policy-standard-egress-sctp-rules",
    admin_network_policy_standard_egress_tcp_rules => "admin-network-policy-standard-egress-tcp-rules",
    admin_network_policy_standard_egress_udp_rules => "admin-network-policy-standard-egress-udp-rules",
    admin_network_policy_standard_gress_rules => "admin-network-policy-standard-gress-rules",
    admin_network_policy_standard_ingress_sctp_rules => "admin-network-policy-standard-ingress-sctp-rules",
    admin_network_policy_standard_ingress_tcp_rules => "admin-network-policy-standard-ingress-tcp-rules",
    admin_network_policy_standard_ingress_udp_rules => "admin-network-policy-standard-ingress-udp-rules",
    admin_network_policy_standard_integration => "admin-network-policy-standard-integration",
    admin_network_policy_standard_priority => "admin-network-policy-standard-priority",
    baseline_admin_network_policy_experimental_egress_rules => "baseline-admin-network-policy-experimental-egress-rules",
    baseline_admin_network_policy_experimental_ingress_rules => "baseline-admin-network-policy-experimental-ingress-rules",
    baseline_admin_network_policy_standard_egress_inline_cidr_rules => "baseline-admin-network-policy-standard-egress-inline-cidr-rules",
    baseline_admin_network_policy_standard_egress_sctp_rules => "baseline-admin-network-policy-standard-egress-sctp-rules",
    baseline_admin_network_policy_standard_egress_tcp_rules => "baseline-admin-network-policy-standard-egress-tcp-rules",
    baseline_admin_network_policy_standard_egress_udp_rules => "baseline-admin-network-policy-standard-egress-udp-rules",
    baseline_admin_network_policy_standard_gress_rules => "baseline-admin-network-policy-standard-gress-rules",
    baseline_admin_network_policy_standard_ingress_sctp_rules => "baseline-admin-network-policy-standard-ingress-sctp-rules",
    baseline_admin_network_policy_standard_ingress_tcp_rules => "baseline-admin-network-policy-standard-ingress-tcp-rules",
    baseline_admin_network_policy_standard_ingress_udp_rules => "baseline-admin-network-policy-standard-ingress-udp-rules",
}
