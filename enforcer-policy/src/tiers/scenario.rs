//! The data model of upstream network-policy-api's conformance scenarios, as re-expressed in
//! `enforcer-policy/tests/data/cluster-policy-conformance/` (see its README): the cluster they
//! run on, each test's steps (mutations, then probes) and the objects a step sees. Shared by the
//! evaluator/compiler judge (`tiers::conformance`) and the real-traffic runner
//! (`enforcer/tests/cluster_conformance.rs`). Pure: callers read the files and parse the YAML.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::selector::Labels;

/// `cluster.yaml`: what a live cluster decides and the manifests do not.
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterData {
    pub nodes: Vec<Node>,
    /// `namespace/pod` to its node and address.
    pub pods: BTreeMap<String, Placement>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Placement {
    pub node: String,
    pub ip: IpAddr,
}

/// One file of `tests/`.
#[derive(Debug, Deserialize)]
pub struct TestFile {
    pub tests: Vec<Test>,
}

#[derive(Debug, Deserialize)]
pub struct Test {
    pub name: String,
    /// Files (relative to the data folder) applied over `base/manifests.yaml`.
    pub manifests: Vec<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub mutations: Vec<Mutation>,
    pub probes: Vec<Probe>,
}

/// A JSON Patch on a live object, or an object deleted or applied whole.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Mutation {
    Patch { object: String, patch: Vec<PatchOp> },
    Delete { delete: String },
    Apply { apply: Value },
}

/// An RFC 6902 operation (the ones the scenarios need).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
    Move { from: String, path: String },
}

#[derive(Clone, Debug, Deserialize)]
pub struct Probe {
    /// `namespace/pod`.
    pub from: String,
    pub to: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
}

/// `Kind/name` for cluster-scoped objects, `Kind/namespace/name` for namespaced ones.
pub fn key(v: &Value) -> String {
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

/// The objects of one step, by [`key`]: `Namespace`, `StatefulSet`, `NetworkPolicy` and the
/// cluster-wide kinds, as upstream's cluster holds them then.
pub type Objects = BTreeMap<String, Value>;

/// Applies a step's mutations to the objects of the step before (cumulative, in order).
pub fn mutate(objects: &mut Objects, mutations: &[Mutation], data: &ClusterData, test: &str) {
    for m in mutations {
        match m {
            Mutation::Patch { object, patch: ops } => {
                let doc = objects
                    .get_mut(object)
                    .unwrap_or_else(|| panic!("{test}: no {object}"));
                for op in ops {
                    let mut op = op.clone();
                    if let PatchOp::Add { value, .. } | PatchOp::Replace { value, .. } = &mut op {
                        resolve(value, &data.pods);
                    }
                    patch(doc, op);
                }
            }
            Mutation::Delete { delete } => {
                objects
                    .remove(delete)
                    .unwrap_or_else(|| panic!("{test}: no {delete}"));
            }
            Mutation::Apply { apply } => {
                let mut apply = apply.clone();
                resolve(&mut apply, &data.pods);
                objects.insert(key(&apply), apply);
            }
        }
    }
}

/// The pods of a StatefulSet as Pod objects: `NAME-N` for each replica, with the template's
/// labels, host network and named container ports, placed and addressed by `data` (keyed
/// `namespace/pod`).
pub fn statefulset_pods(v: &Value, data: &ClusterData) -> Vec<(String, Value)> {
    let ns = v["metadata"]["namespace"].as_str().expect("namespaced");
    let name = v["metadata"]["name"].as_str().expect("named");
    let template = &v["spec"]["template"];
    let mut ports = Vec::new();
    for c in template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["name"].is_string() {
                ports.push(json!({
                    "name": p["name"],
                    "protocol": p["protocol"].as_str().unwrap_or("TCP"),
                    "containerPort": p["containerPort"].as_i64().expect("containerPort"),
                }));
            }
        }
    }
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
            let object = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": ns,
                    "uid": format!("uid-{ns}-{pod}"),
                    "labels": template["metadata"]["labels"],
                },
                "spec": {
                    "nodeName": place.node,
                    "hostNetwork": host_network,
                    "containers": [{"name": "c", "image": "agnhost", "ports": ports}],
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            });
            (at, object)
        })
        .collect()
}

/// Node objects for `data`'s nodes (labels and InternalIP addresses), as the API server serves
/// them.
pub fn node_objects(data: &ClusterData) -> Vec<Value> {
    data.nodes
        .iter()
        .map(|n| {
            let addresses: Vec<Value> = n
                .addresses
                .iter()
                .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": n.name, "labels": n.labels},
                "status": {"addresses": addresses},
            })
        })
        .collect()
}
