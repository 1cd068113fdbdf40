//! The upstream conformance scenarios for cluster policies (`network-policy-api`'s Go suite,
//! re-expressed as data in `tests/data/cluster-policy-conformance/`), judged by the reference
//! evaluator ([`direction_verdict`], which applies the tiers around NetworkPolicy): a flow is
//! allowed when egress at the source and ingress at the destination both allow it. Every probe
//! is judged a second time through the compiler: the compiled state, looked up as the
//! programs do ([`decide`]), must give upstream's verdict too. One test per upstream file.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::Deserialize;
use serde_json::Value;

use super::scenario::{ClusterData, Probe, TestFile, key, mutate, statefulset_pods};
use super::*;
use crate::{
    compile::{Allocations, CompileOptions, Compiled, compile},
    decision::decide,
    evaluator::direction_verdict,
    model::{Cluster, NodeInfo, shared},
    state::PodRef,
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
                "StatefulSet" => {
                    pods.extend(statefulset_pods(v, data).into_iter().map(|(at, pod)| {
                        let pod = serde_json::from_value::<Pod>(pod).expect("Pod");
                        (at, Arc::new(PodInfo::from(pod)))
                    }))
                }
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
            mutate(&mut objects, &step.mutations, &data, &test.name);
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
