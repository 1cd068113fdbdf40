//! Who can talk to whom: the verdict of every pod to every other pod on chosen ports, both
//! directions (egress at the source, ingress at the destination), read from the compiled state
//! through [`decision`] (the programs' lookups), each cell checked against the reference
//! evaluator.
//!
//! Pods without an address (manifests kept in git, workload templates) are judged by their
//! labels, namespace and ports: they get a synthetic address from [`SYNTHETIC_V4`] /
//! [`SYNTHETIC_V6`], and every ipBlock is given an `except` for those ranges, so an ipBlock never
//! matches such a pod (its real address is unknown).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use enforcer_common::{DIR_EGRESS, DIR_INGRESS};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{
    cidr::Cidr,
    compile::{Allocations, CompileOptions, compile},
    decision::{Reason, decide},
    evaluator::{DirVerdict, Endpoint, direction_verdict, resolve_flow},
    model::{Cluster, PodInfo, pod_ips, pod_ref},
    state::{PodRef, RuleRef},
    validate::protocol_number,
};

/// The range pods without an address get theirs from (class E: never a pod's).
pub const SYNTHETIC_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 0, 0, 0), 16);
/// The IPv6 range pods without an address get theirs from (the discard prefix, RFC 6666).
pub const SYNTHETIC_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64);

/// One pod of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixPod {
    pub pod: PodRef,
    /// Its workload ([`workload_of`]).
    pub workload: String,
    /// Its addresses; synthetic when `address_known` is false.
    pub addresses: Vec<IpAddr>,
    pub address_known: bool,
}

/// Why one side (egress at the source, ingress at the destination) decided.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// This rule allows it.
    Rule(RuleRef),
    /// These policies isolate the pod and no rule of theirs allows it; `needs_identity`: a rule
    /// would allow it if the peer's address were verified.
    Denied {
        policies: Vec<String>,
        needs_identity: bool,
    },
    /// Allowed: no enforcing policy isolates the pod for this direction, and these audit
    /// policies do with no rule that allows it: enforcing them would drop it.
    WouldDrop(Vec<String>),
    /// The ends share no address family: no packet can flow.
    NoCommonFamily,
    /// Allowed for another reason of the programs (self traffic, the node, an unmanaged pod).
    Other(String),
}

impl Why {
    /// Short, for tables and edge labels.
    pub fn label(&self) -> String {
        match self {
            Self::NotIsolated => "not isolated".into(),
            Self::Rule(r) => r.to_string(),
            Self::Denied {
                policies,
                needs_identity: false,
            } => format!("denied by {}", policies.join(", ")),
            Self::Denied {
                policies,
                needs_identity: true,
            } => format!(
                "denied by {} (a rule asks for a verified identity)",
                policies.join(", ")
            ),
            Self::WouldDrop(policies) => {
                format!("would be dropped by {} (audit)", policies.join(", "))
            }
            Self::NoCommonFamily => "no common address family".into(),
            Self::Other(s) => s.clone(),
        }
    }
}

/// The verdict of one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    pub allowed: bool,
    pub why: Why,
}

/// One flow: `pods[src]` to `pods[dst]` on `protocol`/`port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: usize,
    pub dst: usize,
    pub protocol: u8,
    pub port: u16,
    pub egress: Side,
    pub ingress: Side,
}

impl Flow {
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }
}

/// The whole matrix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matrix {
    pub pods: Vec<MatrixPod>,
    /// `(protocol, port)`, in order.
    pub ports: Vec<(u8, u16)>,
    /// Every ordered pair of distinct pods, every port.
    pub flows: Vec<Flow>,
    /// Cells where the compiled state and the reference evaluator disagree (a bug): empty.
    pub disagreements: Vec<String>,
}

/// Which pods: those of `namespaces` (all when empty).
#[derive(Clone, Debug, Default)]
pub struct MatrixOptions {
    pub namespaces: Vec<String>,
    /// `(protocol, port)`; empty: [`default_ports`].
    pub ports: Vec<(u8, u16)>,
    /// As the agent's `--require-identity`.
    pub require_identity: bool,
}

/// At most this many ports by default: the matrix is read by people.
pub const DEFAULT_PORTS_CAP: usize = 12;

/// The ports the policies name (numbers; names resolved on the pods' named container ports;
/// the first port of a range) and the pods' named container ports, sorted, at most
/// [`DEFAULT_PORTS_CAP`]; the bool says whether some were left out. None at all: 80/TCP
/// (nothing then tells ports apart).
pub fn default_ports(cluster: &Cluster) -> (Vec<(u8, u16)>, bool) {
    let mut named: BTreeMap<&str, BTreeSet<(u8, u16)>> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for pod in &cluster.pods {
        for (name, proto, port) in pod.named_ports.iter() {
            named.entry(name).or_default().insert((*proto, *port));
            out.insert((*proto, *port));
        }
    }
    for policy in &cluster.policies {
        let Some(spec) = &policy.spec else { continue };
        let ingress = spec.ingress.iter().flatten().map(|r| r.ports.as_ref());
        let egress = spec.egress.iter().flatten().map(|r| r.ports.as_ref());
        for p in ingress.chain(egress).flatten().flatten() {
            let Some(proto) = protocol_number(p.protocol.as_deref()) else {
                continue;
            };
            match &p.port {
                Some(IntOrString::Int(n)) => {
                    if let Ok(n) = u16::try_from(*n) {
                        out.insert((proto, n));
                    }
                }
                Some(IntOrString::String(name)) => out.extend(
                    named
                        .get(name.as_str())
                        .into_iter()
                        .flatten()
                        .filter(|(p, _)| *p == proto),
                ),
                None => {}
            }
        }
    }
    if out.is_empty() {
        out.insert((enforcer_common::PROTO_TCP, 80));
    }
    let capped = out.len() > DEFAULT_PORTS_CAP;
    (out.into_iter().take(DEFAULT_PORTS_CAP).collect(), capped)
}

/// The workload of a pod, from the labels its controller sets (`PodInfo` keeps no owner
/// references): a Deployment's pod (`pod-template-hash`) is its name up to `-HASH-`, a
/// StatefulSet's (`statefulset.kubernetes.io/pod-name`) up to its ordinal, a DaemonSet's
/// (`pod-template-generation`) up to its random suffix, a Job's its `job-name` label; else its
/// `app.kubernetes.io/name` or `app` label; else the pod itself.
pub fn workload_of(pod: &PodInfo) -> String {
    let labels = &pod.labels;
    let name: &str = &pod.name;
    let label = |k: &str| labels.get(k).map(String::as_str);
    let by_controller = if let Some(hash) = label("pod-template-hash") {
        name.split_once(&format!("-{hash}-")).map(|(w, _)| w)
    } else if label("statefulset.kubernetes.io/pod-name") == Some(name) {
        name.rsplit_once('-')
            .filter(|(_, ordinal)| ordinal.bytes().all(|b| b.is_ascii_digit()))
            .map(|(w, _)| w)
    } else if label("pod-template-generation").is_some() {
        name.rsplit_once('-').map(|(w, _)| w)
    } else {
        label("batch.kubernetes.io/job-name").or_else(|| label("job-name"))
    };
    by_controller
        .filter(|w| !w.is_empty())
        .or_else(|| label("app.kubernetes.io/name"))
        .or_else(|| label("app"))
        .unwrap_or(name)
        .to_string()
}

fn synthetic_ranges() -> [Cidr; 2] {
    [
        Cidr::new(IpAddr::V4(SYNTHETIC_V4.0), SYNTHETIC_V4.1).expect("valid prefix"),
        Cidr::new(IpAddr::V6(SYNTHETIC_V6.0), SYNTHETIC_V6.1).expect("valid prefix"),
    ]
}

/// `cluster` with a synthetic address for every pod that has none (not host-network, not
/// finished), and an `except` for the synthetic ranges in every ipBlock that covers them;
/// also the pods so addressed.
pub fn with_synthetic_addresses(cluster: &Cluster) -> (Cluster, BTreeSet<PodRef>) {
    let mut out = cluster.clone();
    let mut synthetic = BTreeSet::new();
    let mut n: u32 = 0;
    for pod in &mut out.pods {
        if pod.host_network || pod.terminated || !pod.ips.is_empty() {
            continue;
        }
        n += 1;
        let v4 = Ipv4Addr::from(u32::from(SYNTHETIC_V4.0) + n);
        let v6 = Ipv6Addr::from(u128::from(SYNTHETIC_V6.0) + u128::from(n));
        Arc::make_mut(pod).ips = Box::new([IpAddr::V4(v4), IpAddr::V6(v6)]);
        synthetic.insert(pod_ref(pod));
    }
    if synthetic.is_empty() {
        return (out, synthetic);
    }
    let ranges = synthetic_ranges();
    for policy in &mut out.policies {
        let mut p = (**policy).clone();
        let mut changed = false;
        let Some(spec) = &mut p.spec else { continue };
        let ingress = spec
            .ingress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.from.iter_mut().flatten());
        let egress = spec
            .egress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.to.iter_mut().flatten());
        for peer in ingress.chain(egress) {
            let Some(block) = &mut peer.ip_block else {
                continue;
            };
            let Ok(cidr) = crate::validate::parse_cidr(&block.cidr) else {
                continue;
            };
            for r in &ranges {
                if cidr.covers(r) && r.prefix_len() > cidr.prefix_len() {
                    block.except.get_or_insert_with(Vec::new).push(format!(
                        "{}/{}",
                        r.network(),
                        r.prefix_len()
                    ));
                    changed = true;
                }
            }
        }
        if changed {
            *policy = Arc::new(p);
        }
    }
    (out, synthetic)
}

/// The matrix of `cluster` (compiled for every node, as the offline tools do).
pub fn matrix(cluster: &Cluster, options: &MatrixOptions) -> Matrix {
    let (cluster, synthetic) = with_synthetic_addresses(cluster);
    let pods: Vec<MatrixPod> = cluster
        .policy_pods()
        .into_iter()
        .filter(|(r, _)| options.namespaces.is_empty() || options.namespaces.contains(&r.namespace))
        .map(|(r, pod)| MatrixPod {
            workload: workload_of(pod),
            addresses: pod_ips(pod),
            address_known: !synthetic.contains(&r),
            pod: r,
        })
        .collect();
    let ports = if options.ports.is_empty() {
        default_ports(&cluster).0
    } else {
        options.ports.clone()
    };
    let opts = CompileOptions {
        node_name: None,
        max_endpoints: u32::try_from(cluster.pods.len())
            .unwrap_or(u32::MAX)
            .max(CompileOptions::default().max_endpoints),
        require_identity: options.require_identity,
        ..CompileOptions::default()
    };
    let compiled = compile(&cluster, &opts, &mut Allocations::new());
    let state = &compiled.state;
    let mut flows = Vec::new();
    let mut disagreements = Vec::new();
    for (si, s) in pods.iter().enumerate() {
        for (di, d) in pods.iter().enumerate() {
            if si == di {
                continue;
            }
            let resolved = resolve_flow(
                &cluster,
                &opts,
                &Endpoint::Pod(s.pod.clone()),
                &Endpoint::Pod(d.pod.clone()),
            );
            for &(protocol, port) in &ports {
                let Some(f) = &resolved else {
                    let no = Side {
                        allowed: false,
                        why: Why::NoCommonFamily,
                    };
                    flows.push(Flow {
                        src: si,
                        dst: di,
                        protocol,
                        port,
                        egress: no.clone(),
                        ingress: no,
                    });
                    continue;
                };
                let mut side = |pod: &PodRef, dir: u8, peer: IpAddr| {
                    let ingress = dir == DIR_INGRESS;
                    let c = decide(state, pod, dir, peer, protocol, port);
                    let v = direction_verdict(&cluster, &opts, pod, ingress, peer, protocol, port);
                    if c.allowed != v.allowed() {
                        disagreements.push(format!(
                            "{} at {pod} peer {peer} {protocol}/{port}: compiled {c:?}, evaluator {v:?}",
                            if ingress { "ingress" } else { "egress" }
                        ));
                    }
                    let why = match (c.reason, &v) {
                        (
                            Reason::NotIsolated | Reason::WouldDrop,
                            DirVerdict::WouldDrop { policies },
                        ) => Why::WouldDrop(policies.clone()),
                        (Reason::Policy, _) => c
                            .rule
                            .and_then(|r| state.rules.get(&r).cloned())
                            .map_or_else(|| Why::Other("policy".into()), Why::Rule),
                        (Reason::NotIsolated, _) => Why::NotIsolated,
                        (Reason::Denied, DirVerdict::Denied { policies, .. }) => Why::Denied {
                            policies: policies.clone(),
                            needs_identity: false,
                        },
                        (Reason::Denied, DirVerdict::NoIdentity { policies, .. }) => Why::Denied {
                            policies: policies.clone(),
                            needs_identity: true,
                        },
                        (Reason::Denied, _) => Why::Denied {
                            policies: Vec::new(),
                            needs_identity: false,
                        },
                        (r, _) => Why::Other(r.to_string()),
                    };
                    Side {
                        allowed: c.allowed,
                        why,
                    }
                };
                let egress = side(&s.pod, DIR_EGRESS, f.dst);
                let ingress = side(&d.pod, DIR_INGRESS, f.src);
                flows.push(Flow {
                    src: si,
                    dst: di,
                    protocol,
                    port,
                    egress,
                    ingress,
                });
            }
        }
    }
    Matrix {
        pods,
        ports,
        flows,
        disagreements,
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{PROTO_TCP, PROTO_UDP};
    use proptest::prelude::*;

    use super::*;
    use crate::{
        evaluator::verdict,
        model::shared,
        tests::{cluster_strategy, fixtures::*, flows_strategy},
    };

    fn find(m: &Matrix, src: &str, dst: &str, protocol: u8, port: u16) -> Flow {
        let idx = |s: &str| m.pods.iter().position(|p| p.pod.to_string() == s).unwrap();
        let (s, d) = (idx(src), idx(dst));
        m.flows
            .iter()
            .find(|f| f.src == s && f.dst == d && f.protocol == protocol && f.port == port)
            .unwrap()
            .clone()
    }

    proptest! {
        // Each case checks every pair on every port: fewer cases than the compiler's tests.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every cell, read from the compiled state, is the reference evaluator's verdict of
        /// the flow (both directions), pods without an address included.
        #[test]
        fn matrix_cells_equal_the_evaluator(cluster in cluster_strategy(), flows in flows_strategy()) {
            let options = MatrixOptions { ports: flows, ..MatrixOptions::default() };
            let m = matrix(&cluster, &options);
            prop_assert!(m.disagreements.is_empty(), "{:?}", m.disagreements);
            let (addressed, _) = with_synthetic_addresses(&cluster);
            let opts = CompileOptions::default();
            for f in &m.flows {
                let (s, d) = (&m.pods[f.src].pod, &m.pods[f.dst].pod);
                let v = verdict(
                    &addressed,
                    &opts,
                    &Endpoint::Pod(s.clone()),
                    &Endpoint::Pod(d.clone()),
                    f.protocol,
                    f.port,
                );
                prop_assert_eq!(f.allowed(), v, "{} -> {} {}/{}: {:?}", s, d, f.protocol, f.port, f);
                // The synthetic addresses judge as `explain` does a pod as written (by labels,
                // matching no ipBlock), on the cluster as loaded.
                let as_written = crate::explain::explain(
                    &cluster,
                    &opts,
                    &Endpoint::Pod(s.clone()),
                    &Endpoint::Pod(d.clone()),
                    f.protocol,
                    f.port,
                );
                prop_assert_eq!(f.allowed(), as_written.allowed, "as written {} -> {} {}/{}: {:?}", s, d, f.protocol, f.port, as_written);
            }
            let n = m.pods.len();
            prop_assert_eq!(m.flows.len(), n * n.saturating_sub(1) * m.ports.len());
        }
    }

    /// A pod without an address is judged by its labels (a podSelector matches it) and never
    /// by an ipBlock (0.0.0.0/0 does not), while a pod with an address is matched by both.
    #[test]
    fn pods_without_address_match_selectors_but_no_ip_block() {
        let mut unaddressed = pod("x", "tmpl", &[("app", "t")], &[], "node-a", &[]);
        unaddressed.status = None;
        let cluster = Cluster {
            namespaces: shared(vec![namespace("x", &[])]),
            pods: shared(vec![
                pod("x", "dst", &[("app", "d")], &["10.0.0.2"], "node-a", &[]),
                pod("x", "real", &[("app", "r")], &["10.0.0.3"], "node-a", &[]),
                unaddressed,
            ]),
            policies: shared(vec![
                policy(
                    "x",
                    "by-block",
                    Some(sel(&[("app", "d")])),
                    Some(&["Ingress"]),
                    Some(vec![(
                        Some(vec![block_peer("0.0.0.0/0", &[])]),
                        Some(vec![tcp(80)]),
                    )]),
                    None,
                ),
                policy(
                    "x",
                    "by-label",
                    Some(sel(&[("app", "d")])),
                    Some(&["Ingress"]),
                    Some(vec![(
                        Some(vec![pods_peer(None, Some(sel(&[("app", "t")])))]),
                        Some(vec![tcp(443)]),
                    )]),
                    None,
                ),
            ]),
            ..Cluster::default()
        };
        let m = matrix(
            &cluster,
            &MatrixOptions {
                ports: vec![(PROTO_TCP, 80), (PROTO_TCP, 443)],
                ..MatrixOptions::default()
            },
        );
        assert!(m.disagreements.is_empty(), "{:?}", m.disagreements);
        let tmpl = m.pods.iter().find(|p| p.pod.name == "tmpl").unwrap();
        assert!(!tmpl.address_known);
        assert!(find(&m, "x/real", "x/dst", PROTO_TCP, 80).allowed());
        assert!(!find(&m, "x/real", "x/dst", PROTO_TCP, 443).allowed());
        let blocked = find(&m, "x/tmpl", "x/dst", PROTO_TCP, 80);
        assert!(!blocked.allowed());
        assert_eq!(
            blocked.ingress.why,
            Why::Denied {
                policies: vec!["x/by-block".into(), "x/by-label".into()],
                needs_identity: false
            }
        );
        let by_label = find(&m, "x/tmpl", "x/dst", PROTO_TCP, 443);
        assert!(by_label.allowed());
        assert_eq!(
            by_label.ingress.why.label(),
            "x/by-label ingress[0]",
            "{by_label:?}"
        );
        assert_eq!(by_label.egress.why, Why::NotIsolated);
    }

    /// Default ports: the policies' numbers and named ports (resolved on the pods) and the
    /// container ports, deduplicated.
    #[test]
    fn default_ports_come_from_policies_and_container_ports() {
        let cluster = Cluster {
            pods: shared(vec![pod(
                "x",
                "a",
                &[],
                &["10.0.0.1"],
                "n",
                &[("dns", "UDP", 53), ("http", "TCP", 8080)],
            )]),
            policies: shared(vec![policy(
                "x",
                "p",
                None,
                None,
                Some(vec![(
                    None,
                    Some(vec![tcp(443), named(Some("UDP"), "dns")]),
                )]),
                None,
            )]),
            ..Cluster::default()
        };
        assert_eq!(
            default_ports(&cluster),
            (
                vec![(PROTO_TCP, 443), (PROTO_TCP, 8080), (PROTO_UDP, 53)],
                false
            )
        );
    }

    /// A controller's pods are one workload, by the labels it sets (a Deployment's template
    /// hash, a StatefulSet's ordinal, a DaemonSet's generation, a Job's name); a pod without
    /// them is its `app` label's, else its own.
    #[test]
    fn workloads_are_controllers_then_app_labels_then_pods() {
        let w = |name: &str, l: &[(&str, &str)]| {
            workload_of(&PodInfo::from(&pod("x", name, l, &[], "n", &[])))
        };
        assert_eq!(
            w(
                "web-5d8f9-abcde",
                &[("pod-template-hash", "5d8f9"), ("app", "shop")]
            ),
            "web"
        );
        assert_eq!(
            w("db-12", &[("statefulset.kubernetes.io/pod-name", "db-12")]),
            "db"
        );
        assert_eq!(
            w("agent-x7k2p", &[("pod-template-generation", "3")]),
            "agent"
        );
        assert_eq!(
            w("backup-29000-q2", &[("job-name", "backup-29000")]),
            "backup-29000"
        );
        assert_eq!(w("a-1", &[("app", "api")]), "api");
        assert_eq!(w("lonely", &[]), "lonely");
    }
}
