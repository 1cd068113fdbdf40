//! Tests of the compiler against the reference evaluator: property tests over random clusters
//! and flows, and one focused test per semantic point.

use crate::model::shared;
use std::{net::IpAddr, sync::Arc};

use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_AUDIT, EP_EGRESS_ISOLATED, EP_INGRESS_AUDIT,
    EP_INGRESS_ISOLATED, IDENTITY_HOST, IDENTITY_SERVICE, IDENTITY_WORLD, NodePortKey, PROTO_ICMP,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use k8s_openapi::{
    api::networking::v1::NetworkPolicy, apimachinery::pkg::util::intstr::IntOrString,
};
use proptest::prelude::*;

use super::{
    compile::{Allocations, CompileError, CompileOptions, compile},
    decision::{self, Reason},
    evaluator::{self, Endpoint},
    model::Cluster,
};
use crate::state::{PodRef, RuleRef};

/// Builders for test objects.
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service,
                ServicePort, ServiceSpec,
            },
            networking::v1::{
                IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
                NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
            },
        },
        apimachinery::pkg::{
            apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
            util::intstr::IntOrString,
        },
    };

    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn namespace(name: &str, l: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(l)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A running pod on `node` with `ips` and named ports `(name, protocol, port)`.
    pub fn pod(
        ns: &str,
        name: &str,
        l: &[(&str, &str)],
        ips: &[&str],
        node: &str,
        ports: &[(&str, &str, i32)],
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(labels(l)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(n, p, num)| ContainerPort {
                                name: Some(n.to_string()),
                                protocol: Some(p.to_string()),
                                container_port: *num,
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|s| PodIP { ip: s.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    /// A Service of `type_` with `cluster_ips` (`spec.clusterIPs`), `selector` and `ports`.
    pub fn service(
        ns: &str,
        name: &str,
        type_: &str,
        cluster_ips: &[&str],
        selector: &[(&str, &str)],
        ports: Vec<ServicePort>,
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ips: Some(cluster_ips.iter().map(|s| s.to_string()).collect()),
                selector: (!selector.is_empty()).then(|| labels(selector)),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// A Service port: protocol (`None`: TCP), port, target port and node port.
    pub fn service_port(
        proto: Option<&str>,
        port: i32,
        target: Option<IntOrString>,
        node_port: Option<i32>,
    ) -> ServicePort {
        ServicePort {
            protocol: proto.map(Into::into),
            port,
            target_port: target,
            node_port,
            ..Default::default()
        }
    }

    pub fn sel(ml: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(ml)),
            match_expressions: None,
        }
    }

    pub fn sel_expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|s| s.to_string()).collect()),
            }]),
        }
    }

    pub fn pods_peer(ns: Option<LabelSelector>, pods: Option<LabelSelector>) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            namespace_selector: ns,
            pod_selector: pods,
            ip_block: None,
        }
    }

    pub fn block_peer(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.into(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|s| s.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    pub fn port(
        proto: Option<&str>,
        port: Option<IntOrString>,
        end: Option<i32>,
    ) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: proto.map(Into::into),
            port,
            end_port: end,
        }
    }

    pub fn tcp(n: i32) -> NetworkPolicyPort {
        port(None, Some(IntOrString::Int(n)), None)
    }

    pub fn named(proto: Option<&str>, name: &str) -> NetworkPolicyPort {
        port(proto, Some(IntOrString::String(name.into())), None)
    }

    pub type RuleSpec = (
        Option<Vec<NetworkPolicyPeer>>,
        Option<Vec<NetworkPolicyPort>>,
    );

    pub fn policy(
        ns: &str,
        name: &str,
        pod_selector: Option<LabelSelector>,
        types: Option<&[&str]>,
        ingress: Option<Vec<RuleSpec>>,
        egress: Option<Vec<RuleSpec>>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector,
                policy_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                ingress: ingress.map(|rs| {
                    rs.into_iter()
                        .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rs| {
                    rs.into_iter()
                        .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            }),
        }
    }

    /// `p` annotated `enforcer.dev/audit: "true"`.
    pub fn audited(mut p: NetworkPolicy) -> NetworkPolicy {
        p.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                crate::model::ANNOTATION_AUDIT.to_string(),
                "true".to_string(),
            );
        p
    }
}

use fixtures::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) fn opts() -> CompileOptions {
    CompileOptions {
        node_name: Some("node-a".into()),
        node_ips: vec![ip("10.0.9.1"), ip("fd00::9:1")],
        max_endpoints: 64,
        require_identity: false,
        audit: false,
    }
}

/// Asserts that the compiled lookup and the evaluator agree on every given flow at every local
/// endpoint, both directions.
fn check_agreement(
    cluster: &Cluster,
    opts: &CompileOptions,
    peers: &[IpAddr],
    flows: &[(u8, u16)],
) {
    let compiled = compile(cluster, opts, &mut Allocations::new());
    check_compiled(&compiled, cluster, opts, peers, flows);
}

/// Asserts that `compiled` (of `cluster`) and the evaluator agree on every given flow at every
/// local endpoint, both directions.
fn check_compiled(
    compiled: &super::Compiled,
    cluster: &Cluster,
    opts: &CompileOptions,
    peers: &[IpAddr],
    flows: &[(u8, u16)],
) {
    for ep in compiled.state.endpoints.keys() {
        for &dir in &[DIR_INGRESS, DIR_EGRESS] {
            for &peer in peers {
                // A Service frontend is judged after kube-proxy's translation, on its
                // backend: the evaluator (pod-to-pod) has no verdict for it.
                let identity = decision::resolve_peer(&compiled.state, peer);
                if identity == IDENTITY_SERVICE {
                    continue;
                }
                for &(proto, port) in flows {
                    let d = decision::decide(&compiled.state, ep, dir, peer, proto, port);
                    let v = evaluator::direction_verdict(
                        cluster,
                        opts,
                        ep,
                        dir == DIR_INGRESS,
                        peer,
                        proto,
                        port,
                    );
                    if identity == IDENTITY_HOST
                        && check_host((compiled, cluster, opts), (ep, dir, &d), (proto, port))
                    {
                        continue;
                    }
                    assert_eq!(
                        d.allowed,
                        v.allowed(),
                        "endpoint {ep} dir {dir} peer {peer} proto {proto} port {port}: lookup {d:?} evaluator {v:?}\nstate: {:#?}",
                        compiled.state
                    );
                    check_rule(compiled, cluster, opts, ep, dir, &d, &v);
                    // The audit outcome too, naming the same audit policies.
                    let audited = compiled.state.endpoints[ep].info.id;
                    let named = compiled.state.audited.get(&(audited, dir));
                    let managed = tier_managed(cluster, ep, dir);
                    match &v {
                        evaluator::DirVerdict::WouldDrop { .. } if managed => {}
                        evaluator::DirVerdict::WouldDrop { policies } => assert!(
                            d.reason == decision::Reason::WouldDrop && named == Some(policies),
                            "endpoint {ep} dir {dir} peer {peer} proto {proto} port {port}: lookup {d:?} (audited {named:?}) evaluator {v:?}"
                        ),
                        _ => assert_ne!(
                            d.reason,
                            decision::Reason::WouldDrop,
                            "endpoint {ep} dir {dir} peer {peer} proto {proto} port {port}: evaluator {v:?}"
                        ),
                    }
                }
            }
        }
    }
}

/// The node's own addresses, one identity for all: checked here when the evaluator judges them
/// apart (then each is denied wherever one is: the lookup allows exactly where every address
/// is allowed) or when the endpoint's egress to the node is not looked up (then the evaluator
/// allows it). Returns false when the common check applies (every address has one verdict).
fn check_host(
    (compiled, cluster, opts): (&super::Compiled, &Cluster, &CompileOptions),
    (ep, dir, d): (&PodRef, u8, &decision::Decision),
    (proto, port): (u8, u16),
) -> bool {
    let all: Vec<evaluator::DirVerdict> = opts
        .node_ips
        .iter()
        .map(|ip| {
            evaluator::direction_verdict(cluster, opts, ep, dir == DIR_INGRESS, *ip, proto, port)
        })
        .collect();
    let allowed = all.iter().all(evaluator::DirVerdict::allowed);
    let msg =
        || format!("{ep} dir {dir} node proto {proto} port {port}: lookup {d:?} evaluator {all:?}");
    if d.reason == decision::Reason::Host {
        assert!(allowed, "{}", msg());
        return true;
    }
    if all
        .windows(2)
        .any(|w| w[0].after_pass() != w[1].after_pass())
    {
        assert_eq!(d.allowed, allowed, "{}", msg());
        // An address denied for another's sake is said.
        if !allowed && all.iter().any(evaluator::DirVerdict::allowed) {
            let reported = compiled.errors.iter().any(|e| {
                matches!(e, super::CompileError::NodeJudgedApart { pods, .. } if pods.contains(ep))
            });
            assert!(reported, "{}: not reported", msg());
        }
        return true;
    }
    false
}

/// Whether cluster policies manage `ep`'s direction (then its entries are the tiers').
fn tier_managed(cluster: &Cluster, ep: &PodRef, dir: u8) -> bool {
    let policies: Vec<&crate::tiers::ClusterPolicy> =
        cluster.cluster_policies.iter().map(|p| &**p).collect();
    cluster
        .policy_pods()
        .into_iter()
        .find(|(r, _)| r == ep)
        .is_some_and(|(_, pod)| {
            crate::compile_tiers::manages(
                &policies,
                dir,
                pod,
                &cluster.namespace_labels(&ep.namespace),
            )
        })
}

/// Asserts that the entry that decided names the rule the evaluator names: the tier rule that
/// accepted or denied, after a Pass what decided next; in a tier-managed direction also the
/// first NetworkPolicy rule that allows, and the default allow.
fn check_rule(
    compiled: &super::Compiled,
    cluster: &Cluster,
    opts: &CompileOptions,
    ep: &PodRef,
    dir: u8,
    d: &decision::Decision,
    v: &evaluator::DirVerdict,
) {
    use evaluator::DirVerdict as V;
    let audits = |namespace: &str, name: &str| {
        cluster.policies.iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && p.metadata.name.as_deref() == Some(name)
                && cluster.policy_audits(p, opts.audit)
        })
    };
    let named = d.rule.and_then(|r| compiled.state.rules.get(&r));
    let managed = tier_managed(cluster, ep, dir);
    let expected = match v.after_pass() {
        V::TierAccepted(r) | V::TierDenied(r) => Some(RuleRef::Tier {
            tier: r.tier,
            policy: r.policy.clone(),
            direction: dir,
            rule: r.rule.clone(),
            index: u32::try_from(r.index).unwrap(),
            action: r.action,
        }),
        // Where the tiers leave it to the default, an audit policy's allow is reported (the
        // evaluator's would-drop check): the default allow decided.
        V::Allowed {
            namespace, policy, ..
        } if managed && audits(namespace, policy) => Some(RuleRef::DefaultAllow { direction: dir }),
        V::Allowed {
            namespace,
            policy,
            index,
        } if managed => Some(RuleRef::NetworkPolicy {
            namespace: namespace.clone(),
            policy: policy.clone(),
            direction: dir,
            index: u32::try_from(*index).unwrap(),
        }),
        V::NotIsolated | V::WouldDrop { .. } if managed => {
            Some(RuleRef::DefaultAllow { direction: dir })
        }
        V::Denied { .. } | V::NoIdentity { .. } => {
            assert!(
                named.is_none_or(|r| *r == RuleRef::Isolated { direction: dir }),
                "{ep} dir {dir}: NetworkPolicy denies, the entry names {named:?}"
            );
            None
        }
        _ => None,
    };
    if let Some(e) = expected {
        assert_eq!(
            named,
            Some(&e),
            "{ep} dir {dir}: decision {d:?}, evaluator {v:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests.
// ---------------------------------------------------------------------------------------------

/// Label keys of objects and selectors: the reserved one too, so that pods and namespaces
/// label themselves with it and selectors ask for it (only verification may give it).
const KEYS: [&str; 4] = ["a", "b", "c", "enforcer.dev/serviceaccount"];
const VALUES: [&str; 2] = ["1", "2"];

pub(crate) mod strategies {
    use k8s_openapi::{
        api::{
            core::v1::{Namespace, Pod},
            networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
        },
        apimachinery::pkg::{
            apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
            util::intstr::IntOrString,
        },
    };
    use proptest::{collection::vec, option, prelude::*, sample::select};

    use super::{KEYS, VALUES, fixtures::*};

    pub fn label_pairs() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
        vec((select(&KEYS[..]), select(&VALUES[..])), 0..3)
    }

    pub fn selector() -> impl Strategy<Value = LabelSelector> {
        let expr = (select(&KEYS[..]), 0..5usize, vec(select(&VALUES[..]), 0..3)).prop_map(
            |(k, op, vals)| {
                let op = ["In", "NotIn", "Exists", "DoesNotExist", "In"][op];
                let values = match op {
                    "In" | "NotIn" if vals.is_empty() => Some(vec!["1".to_string()]),
                    "In" | "NotIn" => Some(vals.iter().map(|s| s.to_string()).collect()),
                    _ => None,
                };
                LabelSelectorRequirement {
                    key: k.into(),
                    operator: op.into(),
                    values,
                }
            },
        );
        (option::of(label_pairs()), option::of(vec(expr, 0..3))).prop_map(|(ml, me)| {
            LabelSelector {
                match_labels: ml.map(|l| labels(&l)),
                match_expressions: me,
            }
        })
    }

    /// A selector that is rarely invalid (an unknown operator): its policy is refused.
    pub fn maybe_bad_selector() -> impl Strategy<Value = LabelSelector> {
        prop_oneof![
            20 => selector(),
            1 => Just(sel_expr("a", "Bogus", &["1"])),
        ]
    }

    const CIDRS: [&str; 9] = [
        "10.0.0.0/16",
        "10.0.1.0/24",
        "10.0.0.0/8",
        "0.0.0.0/0",
        "10.0.1.11/32",
        "10.0.2.77/20",
        "fd00::/64",
        "::/0",
        "192.168.0.0/16",
    ];
    const EXCEPTS: [&str; 10] = [
        "10.0.1.0/24",
        "10.0.0.0/24",
        "10.0.2.0/25",
        "10.0.1.11/32",
        "10.0.0.10/32",
        "10.0.9.0/24",
        "10.0.0.0/12",
        "fd00::11/128",
        "fd00::/100",
        "192.168.1.0/24",
    ];

    pub fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
        prop_oneof![
            // Rarely a CIDR that does not parse: the policy is refused.
            1 => select(&["10.0.0.0/33", "nonsense"][..]).prop_map(|c| block_peer(c, &[])),
            20 => (select(&CIDRS[..]), vec(select(&EXCEPTS[..]), 0..3)).prop_map(|(c, ex)| {
                let cidr = super::super::validate::parse_cidr(c).unwrap();
                let ex: Vec<&str> = ex
                    .into_iter()
                    .filter(|e| {
                        let e = super::super::validate::parse_cidr(e).unwrap();
                        cidr.covers(&e) && e.prefix_len() > cidr.prefix_len()
                    })
                    .collect();
                block_peer(c, &ex)
            }),
            20 => (option::of(maybe_bad_selector()), option::of(selector())).prop_map(
                |(ns, pods)| match (ns, pods) {
                    (None, None) => pods_peer(None, Some(LabelSelector::default())),
                    (ns, pods) => pods_peer(ns, pods),
                }
            ),
        ]
    }

    pub fn port() -> impl Strategy<Value = NetworkPolicyPort> {
        let proto = option::of(select(&["TCP", "UDP", "SCTP"][..]));
        let num = select(&[53, 80, 81, 1000, 8080][..]);
        let spec = prop_oneof![
            Just((None, None)),
            num.clone().prop_map(|n| (Some(IntOrString::Int(n)), None)),
            (num, 0..1100i32).prop_map(|(n, d)| (Some(IntOrString::Int(n)), Some(n + d))),
            select(&["http", "dns", "web", "nope"][..])
                .prop_map(|s| (Some(IntOrString::String(s.into())), None)),
        ];
        let good =
            (proto, spec).prop_map(|(proto, (port, end))| super::fixtures::port(proto, port, end));
        // Rarely an unknown protocol or an endPort below its port: the policy is refused.
        let bad = prop_oneof![
            Just(super::fixtures::port(Some("ICMP"), None, None)),
            Just(super::fixtures::port(
                None,
                Some(IntOrString::Int(80)),
                Some(70)
            )),
        ];
        prop_oneof![30 => good, 1 => bad]
    }

    pub fn rule() -> impl Strategy<Value = RuleSpec> {
        (option::of(vec(peer(), 0..3)), option::of(vec(port(), 0..3)))
    }

    pub fn policy_strategy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
        let types = prop_oneof![
            5 => Just(None),
            5 => Just(Some(vec!["Ingress"])),
            5 => Just(Some(vec!["Egress"])),
            5 => Just(Some(vec!["Ingress", "Egress"])),
            5 => Just(Some(vec![])),
            // Unreadable: refused, isolating both directions.
            1 => Just(Some(vec!["Ingress", "Sideways"])),
        ];
        // An unreadable podSelector more often than elsewhere: its refused policy isolates
        // every pod of the namespace.
        let pod_selector = prop_oneof![
            7 => selector(),
            1 => Just(sel_expr("a", "Bogus", &["1"])),
        ];
        (
            select(&["x", "y", "z"][..]),
            option::of(pod_selector),
            types,
            option::of(vec(rule(), 0..3)),
            option::of(vec(rule(), 0..3)),
        )
            .prop_map(move |(ns, sel, types, ing, eg)| {
                policy(ns, &format!("p{i}"), sel, types.as_deref(), ing, eg)
            })
    }

    pub fn namespaces() -> impl Strategy<Value = Vec<Namespace>> {
        (
            label_pairs(),
            label_pairs(),
            any::<bool>(),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(lx, ly, declare_y, audit_x)| {
                let mut x = namespace("x", &lx);
                if audit_x {
                    x.metadata.annotations = Some(
                        [(
                            crate::model::ANNOTATION_AUDIT.to_string(),
                            "true".to_string(),
                        )]
                        .into(),
                    );
                }
                let mut v = vec![x];
                if declare_y {
                    v.push(namespace("y", &ly));
                }
                v
            })
    }

    const NAMED: [(&str, &str, i32); 6] = [
        ("http", "TCP", 80),
        ("http", "TCP", 8080),
        ("dns", "UDP", 53),
        ("web", "TCP", 81),
        ("web", "SCTP", 80),
        ("dns", "TCP", 53),
    ];

    /// Pod `i`: 10.0.(i % 3).(10 + i), sometimes also fd00::(10 + i); on node-a or node-b; now
    /// and then host-network, finished or without address.
    pub fn pod_strategy(i: usize) -> impl Strategy<Value = Pod> {
        (
            select(&["x", "y", "z"][..]),
            label_pairs(),
            0..4u8,
            any::<bool>(),
            vec(select(&NAMED[..]), 0..3),
            0..12u8,
        )
            .prop_map(move |(ns, l, stack, remote, ports, kind)| {
                let v4 = format!("10.0.{}.{}", i % 3, 10 + i);
                let v6 = format!("fd00::{}", 10 + i);
                let ips: Vec<&str> = match stack {
                    0 => vec![v6.as_str()],
                    1 => vec![v4.as_str(), v6.as_str()],
                    _ => vec![v4.as_str()],
                };
                let mut p = pod(
                    ns,
                    &format!("pod{i}"),
                    &l,
                    &ips,
                    if remote { "node-b" } else { "node-a" },
                    &ports,
                );
                match kind {
                    0 => p.spec.as_mut().unwrap().host_network = Some(true),
                    1 => p.status.as_mut().unwrap().phase = Some("Succeeded".into()),
                    2 => p.status = None,
                    _ => {}
                }
                p
            })
    }
}

pub(crate) fn flow_peers() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (0..7)
        .map(|i| ip(&format!("10.0.{}.{}", i % 3, 10 + i)))
        .collect();
    v.extend((0..7).map(|i| ip(&format!("fd00::{}", 10 + i))));
    v.extend(
        [
            "10.0.9.1",
            "fd00::9:1",
            "10.0.9.7",
            "10.0.1.200",
            "10.0.2.1",
            "10.0.2.200",
            "10.0.200.1",
            "10.1.0.1",
            "10.16.0.1",
            "192.168.1.1",
            "192.168.7.7",
            "8.8.8.8",
            "fd00::1:0:0",
            "2001:db8::1",
        ]
        .iter()
        .map(|s| ip(s)),
    );
    v
}

pub(crate) fn cluster_strategy() -> impl Strategy<Value = Cluster> {
    let pods = (0..7usize)
        .map(strategies::pod_strategy)
        .collect::<Vec<_>>();
    let policies = (0..4usize)
        .map(strategies::policy_strategy)
        .collect::<Vec<_>>();
    // Some addresses are bound to a verified identity, and some policies require one.
    let pod_ips: Vec<IpAddr> = flow_peers().into_iter().take(14).collect();
    (
        strategies::namespaces(),
        pods,
        policies,
        0..=4usize,
        proptest::collection::vec(proptest::bool::weighted(0.3), 4),
        proptest::sample::subsequence(pod_ips, 0..8),
        proptest::collection::vec(proptest::bool::weighted(0.3), 4),
    )
        .prop_map(
            |(namespaces, pods, mut policies, n, require, verified_ips, audit)| {
                policies.truncate(n);
                for (p, a) in policies.iter_mut().zip(audit) {
                    if a {
                        *p = audited(p.clone());
                    }
                }
                for (p, r) in policies.iter_mut().zip(require) {
                    if r {
                        p.metadata
                            .annotations
                            .get_or_insert_with(Default::default)
                            .insert(
                                crate::model::ANNOTATION_REQUIRE_IDENTITY.to_string(),
                                "true".to_string(),
                            );
                    }
                }
                let verified = verified_ips
                    .into_iter()
                    .map(|ip| {
                        (
                            ip,
                            std::collections::BTreeMap::from([(
                                "enforcer.dev/serviceaccount".to_string(),
                                // A value selectors ask for, like the self-set ones.
                                "1".to_string(),
                            )]),
                        )
                    })
                    .collect();
                Cluster {
                    namespaces: shared(namespaces),
                    pods: shared(pods),
                    policies: shared(policies),
                    services: Vec::new(),
                    verified,
                    ..Default::default()
                }
            },
        )
}

pub(crate) fn flows_strategy() -> impl Strategy<Value = Vec<(u8, u16)>> {
    proptest::collection::vec(
        (
            proptest::sample::select(
                &[PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP][..],
            ),
            proptest::sample::select(&[53u16, 80, 81, 82, 1000, 1500, 8080, 8081, 2000][..]),
        ),
        2,
    )
    .prop_map(|mut extra| {
        // Every named port's number and protocol, plus a few others.
        extra.extend([
            (PROTO_TCP, 80),
            (PROTO_TCP, 8080),
            (PROTO_UDP, 53),
            (PROTO_TCP, 53),
            (PROTO_TCP, 81),
            (PROTO_SCTP, 80),
            (PROTO_ICMP, 0),
        ]);
        extra
    })
}

/// Up to three Services in x, their frontends drawn from the flow peers (pod, node and other
/// addresses: some collide) and a few addresses of their own, of every type, with a node port.
fn services_strategy() -> impl Strategy<Value = Vec<k8s_openapi::api::core::v1::Service>> {
    let mut pool: Vec<String> = flow_peers().iter().map(ToString::to_string).collect();
    pool.extend(["10.96.0.1", "10.96.0.2", "fd00:96::1"].map(String::from));
    proptest::collection::vec(
        (
            proptest::sample::subsequence(pool, 0..3),
            proptest::sample::select(&["ClusterIP", "NodePort", "LoadBalancer"][..]),
            proptest::sample::select(&[None, Some("UDP"), Some("SCTP")][..]),
            30000..30004i32,
        ),
        0..4,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ips, ty, proto, node_port))| {
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                service(
                    "x",
                    &format!("s{i}"),
                    ty,
                    &ips,
                    &[("a", "1")],
                    vec![service_port(proto, 80, None, Some(node_port))],
                )
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Services change nothing but their own entries: each frontend no pod or node has
    /// resolves to IDENTITY_SERVICE, every other address as without them, every other map is
    /// the same, the node ports of NodePort and LoadBalancer Services are collected, and the
    /// compiled verdicts still agree with the evaluator's wherever a peer is not a frontend.
    #[test]
    fn services_add_only_their_frontends_and_node_ports(
        cluster in cluster_strategy(),
        services in services_strategy(),
        flows in flows_strategy(),
    ) {
        let o = opts();
        let without = compile(&cluster, &o, &mut Allocations::new());
        let with_services = Cluster { services: shared(services.clone()), ..cluster.clone() };
        let with = compile(&with_services, &o, &mut Allocations::new());
        prop_assert_eq!(&with.state.endpoints, &without.state.endpoints);
        prop_assert_eq!(&with.state.policy, &without.state.policy);
        prop_assert_eq!(&with.state.cidrs_v4, &without.state.cidrs_v4);
        prop_assert_eq!(&with.state.cidrs_v6, &without.state.cidrs_v6);
        prop_assert_eq!(&with.identities, &without.identities);
        let frontends: std::collections::BTreeSet<IpAddr> = services
            .iter()
            .flat_map(|s| crate::model::parse_service(s).0.addresses)
            .map(|(a, _)| a)
            .collect();
        let peers = |s: &crate::state::DesiredState| -> std::collections::BTreeMap<IpAddr, u32> {
            s.peers_v4
                .iter()
                .map(|(a, p)| (IpAddr::from(*a), p.identity))
                .chain(s.peers_v6.iter().map(|(a, p)| (IpAddr::from(*a), p.identity)))
                .collect()
        };
        let (before, after) = (peers(&without.state), peers(&with.state));
        for (a, id) in &before {
            prop_assert_eq!(after.get(a), Some(id), "{} changed", a);
        }
        for (a, id) in &after {
            if !before.contains_key(a) {
                prop_assert!(frontends.contains(a) && *id == IDENTITY_SERVICE, "{} -> {}", a, id);
            }
        }
        for a in &frontends {
            prop_assert!(after.contains_key(a), "frontend {} has no entry", a);
        }
        let taken = with
            .errors
            .iter()
            .filter(|e| matches!(e, CompileError::ServiceAddress { .. }))
            .count();
        // One per Service and address a pod or the node has.
        let collisions = services
            .iter()
            .flat_map(|s| crate::model::parse_service(s).0.addresses)
            .filter(|(a, _)| before.contains_key(a))
            .count();
        prop_assert_eq!(taken, collisions);
        let node_ports: std::collections::BTreeSet<NodePortKey> = services
            .iter()
            .filter(|s| s.spec.as_ref().unwrap().type_.as_deref() != Some("ClusterIP"))
            .map(|s| {
                let p = &s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
                NodePortKey {
                    protocol: super::validate::protocol_number(p.protocol.as_deref()).unwrap(),
                    _pad: 0,
                    port: p.node_port.unwrap() as u16,
                }
            })
            .collect();
        prop_assert_eq!(&with.state.node_ports, &node_ports);
        check_compiled(&with, &with_services, &o, &flow_peers(), &flows);
    }

    #[test]
    fn compiled_lookup_equals_evaluator(
        cluster in cluster_strategy(),
        flows in flows_strategy(),
        standalone in any::<bool>(),
        audit_all in proptest::bool::weighted(0.15),
    ) {
        let mut o = opts();
        if standalone {
            o.node_name = None;
        }
        o.audit = audit_all;
        check_agreement(&cluster, &o, &flow_peers(), &flows);
    }

    /// Audit policies never change what is enforced: every flow is allowed or dropped exactly
    /// as when they are left out (would-drop is allowed).
    #[test]
    fn audit_policies_change_no_enforced_verdict(cluster in cluster_strategy(), flows in flows_strategy()) {
        let o = opts();
        let mut without = cluster.clone();
        without.policies.retain(|p| !cluster.policy_audits(p, false));
        let with_audit = compile(&cluster, &o, &mut Allocations::new());
        let enforcing = compile(&without, &o, &mut Allocations::new());
        for ep in with_audit.state.endpoints.keys() {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for peer in flow_peers() {
                    for &(proto, port) in &flows {
                        let a = decision::decide(&with_audit.state, ep, dir, peer, proto, port);
                        let e = decision::decide(&enforcing.state, ep, dir, peer, proto, port);
                        prop_assert_eq!(a.allowed, e.allowed, "{} {} {} {}/{}: {:?} vs {:?}", ep, dir, peer, proto, port, a, e);
                    }
                }
            }
        }
    }

    /// The agent compiles every change with the `Allocations` of the previous compile, which
    /// reuses what it derived from unchanged objects (`memo.rs`): a sequence of clusters that
    /// share some objects and replace others must compile to the evaluator's verdicts each time,
    /// exactly like fresh compiles.
    #[test]
    fn carried_compiles_of_changing_clusters_agree_with_the_evaluator(
        a in cluster_strategy(),
        b in cluster_strategy(),
        flows in flows_strategy(),
        split in 0..8usize,
    ) {
        let o = opts();
        // Mixes: a's pods with b's policies (only policies change, as in most updates), then
        // b (pods, namespaces and verified addresses change under the same policies), then
        // some of b's pods with a's namespaces, verified addresses and policies, then a (pods
        // change again under the same policies), then a again (nothing changes).
        let policies_changed = Cluster { policies: b.policies.clone(), ..a.clone() };
        let mut pods_changed = a.clone();
        pods_changed.pods = b.pods.iter().take(split).chain(a.pods.iter().skip(split)).cloned().collect();
        let steps = [a.clone(), policies_changed, b.clone(), pods_changed, a.clone(), a.clone()];
        let mut alloc = Allocations::new();
        for c in &steps {
            let compiled = compile(c, &o, &mut alloc);
            check_compiled(&compiled, c, &o, &flow_peers(), &flows);
            let fresh = compile(c, &o, &mut Allocations::new());
            prop_assert_eq!(&compiled.errors, &fresh.errors);
            prop_assert_eq!(compiled.state.endpoints.len(), fresh.state.endpoints.len());
            prop_assert_eq!(compiled.state.policy.len(), fresh.state.policy.len());
        }
    }

    /// Pods added, removed, relabelled and re-addressed one small batch at a time update the
    /// identity stage in place (`update_stage`) instead of rebuilding it: after each step the
    /// carried compile is exactly a fresh compile's state (numbers aside: every entry names the
    /// same identity key, endpoint and rule) and agrees with the evaluator. With cluster
    /// policies too (their directions are compiled afresh each time).
    #[test]
    fn pod_changes_compiled_in_place_equal_fresh_compiles(
        a in tiered_cluster_strategy(),
        b in cluster_strategy(),
        flows in flows_strategy(),
        steps in proptest::collection::vec((0..8usize, 0..8usize, any::<bool>()), 1..6),
    ) {
        let o = opts();
        let mut alloc = Allocations::new();
        let mut c = a.clone();
        compile(&c, &o, &mut alloc);
        for (remove, take, replace) in steps {
            // A pod of `a` leaves (or is replaced by b's of the same index, a new object: a
            // relabel or re-address when the names match), one of b's joins.
            if !c.pods.is_empty() {
                let i = remove % c.pods.len();
                if replace && !b.pods.is_empty() {
                    let mut p = (*b.pods[take % b.pods.len()]).clone();
                    p.namespace = Arc::clone(&c.pods[i].namespace);
                    p.name = c.pods[i].name.clone();
                    c.pods[i] = Arc::new(p);
                } else {
                    c.pods.remove(i);
                }
            }
            if let Some(p) = b.pods.get(take) {
                let mut p = (**p).clone();
                p.name = format!("{}-{take}", p.name).into();
                c.pods.push(Arc::new(p));
            }
            let carried = compile(&c, &o, &mut alloc);
            let fresh = compile(&c, &o, &mut Allocations::new());
            prop_assert_eq!(canonical(&carried), canonical(&fresh));
            prop_assert_eq!(&carried.errors, &fresh.errors);
            check_compiled(&carried, &c, &o, &flow_peers(), &flows);
        }
    }

    /// Pod events between policy and namespace changes and audit toggles: a compile reuses the
    /// policy prelude while policies and namespaces are the same objects, and keeps the
    /// contributions of policies that select no local endpoint when only the identities
    /// changed. After each step the carried compile is exactly a fresh compile's state and
    /// agrees with the evaluator.
    #[test]
    fn policy_and_pod_changes_compiled_incrementally_equal_fresh_compiles(
        a in tiered_cluster_strategy(),
        b in cluster_strategy(),
        flows in flows_strategy(),
        steps in proptest::collection::vec((0..6u8, 0..8usize), 1..8),
    ) {
        let mut o = opts();
        let mut alloc = Allocations::new();
        let mut c = a.clone();
        compile(&c, &o, &mut alloc);
        for (n, (kind, i)) in steps.into_iter().enumerate() {
            match kind {
                // A pod of b's joins (often of new labels: a new identity).
                0 => if let Some(p) = b.pods.get(i % b.pods.len().max(1)) {
                    let mut p = (**p).clone();
                    p.name = format!("{}-{n}", p.name).into();
                    c.pods.push(Arc::new(p));
                },
                1 => if !c.pods.is_empty() {
                    c.pods.remove(i % c.pods.len());
                },
                // A policy of b's added, or replacing one (a new object of the same name).
                2 => if let Some(p) = b.policies.get(i % b.policies.len().max(1)) {
                    let mut p = (**p).clone();
                    match c.policies.get(i) {
                        Some(old) => {
                            p.metadata.namespace.clone_from(&old.metadata.namespace);
                            p.metadata.name.clone_from(&old.metadata.name);
                            c.policies[i] = Arc::new(p);
                        }
                        None => {
                            p.metadata.name = Some(format!("added-{n}"));
                            c.policies.push(Arc::new(p));
                        }
                    }
                },
                3 => if !c.policies.is_empty() {
                    c.policies.remove(i % c.policies.len());
                },
                // The namespaces relabelled (new objects).
                4 => c.namespaces = b.namespaces.clone(),
                _ => o.audit = !o.audit,
            }
            let carried = compile(&c, &o, &mut alloc);
            let fresh = compile(&c, &o, &mut Allocations::new());
            prop_assert_eq!(canonical(&carried), canonical(&fresh));
            prop_assert_eq!(&carried.errors, &fresh.errors);
            // What each audited direction names, by pod (endpoint numbers may differ).
            let audited = |c: &crate::compile::Compiled| {
                c.state.audited.iter().map(|((id, dir), names)| {
                    let pod = c.state.endpoints.iter().find(|(_, e)| e.info.id == *id).map(|(r, _)| r.clone());
                    (pod, *dir, names.clone())
                }).collect::<std::collections::BTreeSet<_>>()
            };
            prop_assert_eq!(audited(&carried), audited(&fresh));
            check_compiled(&carried, &c, &o, &flow_peers(), &flows);
        }
    }

    /// The reserved labels pods and namespaces set themselves change nothing: the cluster with
    /// them compiles to the very state of the cluster without them, and the evaluator gives
    /// every flow the same verdict (a self-labelled pod neither gains a peer nor escapes a
    /// NotIn / DoesNotExist selector).
    #[test]
    fn self_set_reserved_labels_change_no_verdict(cluster in cluster_strategy(), flows in flows_strategy()) {
        let o = opts();
        let mut clean = cluster.clone();
        let strip = |labels: &mut Option<std::collections::BTreeMap<String, String>>| {
            if let Some(l) = labels {
                l.retain(|k, _| !k.starts_with("enforcer.dev/"));
            }
        };
        clean.pods = clean.pods.iter().map(|p| {
            let mut p = (**p).clone();
            p.own_reserved = Box::default();
            Arc::new(p)
        }).collect();
        clean.namespaces = clean.namespaces.iter().map(|n| {
            let mut n = (**n).clone();
            strip(&mut n.metadata.labels);
            Arc::new(n)
        }).collect();
        let with = compile(&cluster, &o, &mut Allocations::new());
        let without = compile(&clean, &o, &mut Allocations::new());
        prop_assert_eq!(&with.state, &without.state);
        for ep in with.state.endpoints.keys() {
            for ingress in [true, false] {
                for &peer in &flow_peers() {
                    for &(proto, port) in &flows {
                        let a = evaluator::direction_verdict(&cluster, &o, ep, ingress, peer, proto, port);
                        let b = evaluator::direction_verdict(&clean, &o, ep, ingress, peer, proto, port);
                        prop_assert_eq!(a.allowed(), b.allowed(), "{} {} {} {}/{}: {:?} vs {:?}", ep, ingress, peer, proto, port, a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn recompile_is_identical_and_unrelated_policy_is_stable(cluster in cluster_strategy()) {
        let o = opts();
        let mut alloc = Allocations::new();
        let first = compile(&cluster, &o, &mut alloc);
        let again = compile(&cluster, &o, &mut alloc);
        prop_assert_eq!(&first.state, &again.state);
        let fresh = compile(&cluster, &o, &mut Allocations::new());
        prop_assert_eq!(&first.state, &fresh.state, "a fresh allocation gives the same numbers");
        // A policy in a namespace without pods, without ipBlocks.
        let mut more = cluster.clone();
        more.policies.push(policy("empty", "unrelated", None, None, Some(vec![(None, None)]), None).into());
        let after = compile(&more, &o, &mut alloc);
        prop_assert_eq!(&first.state, &after.state);
        // Removing a pod keeps every other endpoint id and peer identity.
        if let Some(victim) = first.state.endpoints.keys().next().cloned() {
            let mut fewer = cluster.clone();
            fewer.pods.retain(|p| super::model::pod_ref(p) != victim);
            let later = compile(&fewer, &o, &mut alloc);
            for (r, ep) in &later.state.endpoints {
                prop_assert_eq!(ep.info.id, first.state.endpoints[r].info.id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Focused tests, one per semantic point. Each checks the evaluator and the compiled lookup.
// ---------------------------------------------------------------------------------------------

fn pr(ns: &str, name: &str) -> PodRef {
    PodRef::new(ns, name)
}

/// x/a (10.0.0.1, app=a, port http=80), x/b (10.0.0.2, app=b), y/a (10.0.1.1, app=a, remote),
/// namespaces x {team: blue}, y {team: red}.
fn base(policies: Vec<NetworkPolicy>) -> Cluster {
    Cluster {
        namespaces: shared(vec![
            namespace("x", &[("team", "blue")]),
            namespace("y", &[("team", "red")]),
        ]),
        pods: shared(vec![
            pod(
                "x",
                "a",
                &[("app", "a")],
                &["10.0.0.1", "fd00::1"],
                "node-a",
                &[("http", "TCP", 80), ("dns", "UDP", 53)],
            ),
            pod(
                "x",
                "b",
                &[("app", "b")],
                &["10.0.0.2"],
                "node-a",
                &[("http", "TCP", 8080)],
            ),
            pod(
                "y",
                "a",
                &[("app", "a")],
                &["10.0.1.1"],
                "node-b",
                &[("http", "TCP", 81)],
            ),
        ]),
        policies: shared(policies),
        ..Default::default()
    }
}

/// Both oracles for one direction at `pod`; they must agree, and the result is returned.
fn allowed(cluster: &Cluster, pod: &PodRef, dir: u8, peer: &str, proto: u8, port: u16) -> bool {
    let o = opts();
    let compiled = compile(cluster, &o, &mut Allocations::new());
    let d = decision::decide(&compiled.state, pod, dir, ip(peer), proto, port);
    let v =
        evaluator::direction_verdict(cluster, &o, pod, dir == DIR_INGRESS, ip(peer), proto, port);
    assert_eq!(
        d.allowed,
        v.allowed(),
        "{pod} {dir} {peer} {proto}/{port}: {d:?} vs {v:?}"
    );
    d.allowed
}

const ALL_PEERS: [&str; 6] = [
    "10.0.0.2", "10.0.1.1", "8.8.8.8", "10.0.0.1", "10.0.9.1", "fd00::5",
];

#[test]
fn no_policy_means_not_isolated() {
    let c = base(vec![]);
    for p in ALL_PEERS {
        assert!(allowed(&c, &pr("x", "a"), DIR_INGRESS, p, PROTO_TCP, 80));
        assert!(allowed(&c, &pr("x", "a"), DIR_EGRESS, p, PROTO_UDP, 9));
    }
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert!(compiled.state.policy.is_empty());
    assert_eq!(compiled.state.endpoints.len(), 2, "y/a is on another node");
    assert_eq!(compiled.state.peers_v4.len(), 4, "three pods and the node");
    assert_eq!(
        compiled.state.peers_v4[&"10.0.9.1".parse().unwrap()].identity,
        IDENTITY_HOST
    );
}

#[test]
fn deny_all_ingress_but_self_and_host() {
    let c = base(vec![policy(
        "x",
        "deny",
        Some(sel(&[])),
        Some(&["Ingress"]),
        None,
        None,
    )]);
    let a = pr("x", "a");
    assert!(!allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_INGRESS, "8.8.8.8", PROTO_ICMP, 0));
    assert!(
        allowed(&c, &a, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80),
        "self"
    );
    assert!(
        allowed(&c, &a, DIR_INGRESS, "10.0.9.1", PROTO_TCP, 80),
        "host"
    );
    assert!(
        allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 80),
        "egress not isolated"
    );
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    let d = decision::decide(
        &compiled.state,
        &a,
        DIR_INGRESS,
        ip("10.0.0.2"),
        PROTO_TCP,
        80,
    );
    assert_eq!(d.reason, Reason::Denied);
}

/// The decision reads entries as the programs do: the node is allowed untouched unless the
/// endpoint's egress to it is judged (`EP_EGRESS_HOST_JUDGED`); then its entries (or their
/// absence) decide, a deny entry naming its rule; ingress from the node stays allowed.
#[test]
fn the_decision_judges_egress_to_the_node_only_when_the_endpoint_says_so() {
    let c = base(vec![policy(
        "x",
        "deny-egress",
        Some(sel(&[])),
        Some(&["Egress"]),
        None,
        None,
    )]);
    let a = pr("x", "a");
    let mut state = compile(&c, &opts(), &mut Allocations::new()).state;
    let node = ip("10.0.9.1");
    let decide = |state: &crate::state::DesiredState, dir| {
        decision::decide(state, &a, dir, node, PROTO_TCP, 22)
    };
    assert_eq!(decide(&state, DIR_EGRESS).reason, Reason::Host);
    let ep = state.endpoints.get_mut(&a).unwrap();
    ep.info.flags |= enforcer_common::EP_EGRESS_HOST_JUDGED | EP_INGRESS_ISOLATED;
    ep.info.port_masks[usize::from(DIR_EGRESS)] |= 1 << 16;
    let id = ep.info.id;
    let d = decide(&state, DIR_EGRESS);
    assert_eq!((d.allowed, d.reason, d.rule), (false, Reason::Denied, None));
    let key = enforcer_common::PolicyKey::new(id, IDENTITY_HOST, DIR_EGRESS, PROTO_TCP, 22, 16);
    let value = |rule| enforcer_common::PolicyValue { rule, _pad: 0 };
    state.policy.insert(key, value(7));
    let d = decide(&state, DIR_EGRESS);
    assert_eq!(
        (d.allowed, d.reason, d.rule),
        (true, Reason::Policy, Some(7))
    );
    state
        .policy
        .insert(key, value(7 | enforcer_common::RULE_DENY));
    let d = decide(&state, DIR_EGRESS);
    assert_eq!(
        (d.allowed, d.reason, d.rule),
        (false, Reason::Denied, Some(7))
    );
    assert_eq!(decide(&state, DIR_INGRESS).reason, Reason::Host);
}

#[test]
fn pod_selector_alone_is_own_namespace() {
    let c = base(vec![policy(
        "x",
        "p",
        Some(sel(&[("app", "b")])),
        None,
        Some(vec![(
            Some(vec![pods_peer(None, Some(sel(&[("app", "a")])))]),
            None,
        )]),
        None,
    )]);
    let b = pr("x", "b");
    assert!(
        allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80),
        "x/a"
    );
    assert!(
        allowed(&c, &b, DIR_INGRESS, "fd00::1", PROTO_UDP, 5),
        "x/a over v6"
    );
    assert!(
        !allowed(&c, &b, DIR_INGRESS, "10.0.1.1", PROTO_TCP, 80),
        "y/a has the label but another namespace"
    );
    assert!(
        allowed(&c, &pr("x", "a"), DIR_INGRESS, "10.0.1.1", PROTO_TCP, 80),
        "x/a is not selected"
    );
}

#[test]
fn namespace_selector_alone_and_anded_with_pod_selector() {
    let ns_only = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(
            Some(vec![pods_peer(Some(sel(&[("team", "red")])), None)]),
            None,
        )]),
        None,
    )]);
    let b = pr("x", "b");
    assert!(allowed(
        &ns_only,
        &b,
        DIR_INGRESS,
        "10.0.1.1",
        PROTO_TCP,
        80
    ));
    assert!(!allowed(
        &ns_only,
        &b,
        DIR_INGRESS,
        "10.0.0.1",
        PROTO_TCP,
        80
    ));
    let anded = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(
            Some(vec![pods_peer(Some(sel(&[])), Some(sel(&[("app", "b")])))]),
            None,
        )]),
        None,
    )]);
    let a = pr("x", "a");
    assert!(allowed(&anded, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&anded, &a, DIR_INGRESS, "10.0.1.1", PROTO_TCP, 80));
    // The automatic name label selects namespaces, declared or not.
    let by_name = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(
            Some(vec![pods_peer(
                Some(sel(&[("kubernetes.io/metadata.name", "y")])),
                None,
            )]),
            None,
        )]),
        None,
    )]);
    assert!(allowed(
        &by_name,
        &a,
        DIR_INGRESS,
        "10.0.1.1",
        PROTO_TCP,
        80
    ));
    assert!(!allowed(
        &by_name,
        &a,
        DIR_INGRESS,
        "10.0.0.2",
        PROTO_TCP,
        80
    ));
}

#[test]
fn ip_block_with_except_includes_pod_addresses() {
    let c = base(vec![policy(
        "x",
        "p",
        Some(sel(&[("app", "a")])),
        Some(&["Egress"]),
        None,
        Some(vec![(
            Some(vec![block_peer("10.0.0.0/16", &["10.0.1.0/24"])]),
            None,
        )]),
    )]);
    let a = pr("x", "a");
    assert!(
        allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 80),
        "pod inside the block"
    );
    assert!(
        allowed(&c, &a, DIR_EGRESS, "10.0.200.9", PROTO_TCP, 80),
        "non-pod inside"
    );
    assert!(
        !allowed(&c, &a, DIR_EGRESS, "10.0.1.1", PROTO_TCP, 80),
        "pod in the except"
    );
    assert!(
        !allowed(&c, &a, DIR_EGRESS, "10.0.1.99", PROTO_TCP, 80),
        "except"
    );
    assert!(
        !allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 80),
        "outside"
    );
    assert!(
        !allowed(&c, &a, DIR_EGRESS, "fd00::2", PROTO_TCP, 80),
        "other family"
    );
    assert!(
        allowed(&c, &a, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80),
        "ingress not isolated (policyTypes)"
    );
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert_eq!(
        decision::resolve_peer(&compiled.state, ip("8.8.8.8")),
        IDENTITY_WORLD
    );
    assert_eq!(
        decision::resolve_peer(&compiled.state, ip("10.0.1.99")),
        IDENTITY_WORLD,
        "the except region is world again"
    );
}

#[test]
fn host_bits_in_cidr_are_masked() {
    // Upstream sends `<pod ip>/4`.
    let c = base(vec![policy(
        "x",
        "p",
        Some(sel(&[("app", "a")])),
        Some(&["Ingress"]),
        Some(vec![(
            Some(vec![block_peer("10.0.0.2/4", &["10.0.0.2/32"])]),
            None,
        )]),
        None,
    )]);
    let a = pr("x", "a");
    assert!(
        compile(&c, &opts(), &mut Allocations::new())
            .errors
            .is_empty()
    );
    assert!(allowed(&c, &a, DIR_INGRESS, "10.0.1.1", PROTO_TCP, 80));
    assert!(allowed(&c, &a, DIR_INGRESS, "15.1.1.1", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_INGRESS, "16.0.0.1", PROTO_TCP, 80));
}

#[test]
fn ports_protocols_and_end_port() {
    let c = base(vec![policy(
        "x",
        "p",
        Some(sel(&[("app", "a")])),
        None,
        Some(vec![(
            None,
            Some(vec![
                tcp(80),
                port(
                    Some("UDP"),
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1000)),
                    Some(2000),
                ),
                port(Some("SCTP"), None, None),
            ]),
        )]),
        None,
    )]);
    let a = pr("x", "a");
    let p = "8.8.8.8";
    assert!(allowed(&c, &a, DIR_INGRESS, p, PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_INGRESS, p, PROTO_TCP, 81));
    assert!(!allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 80));
    assert!(allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 1000));
    assert!(allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 1500));
    assert!(allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 2000));
    assert!(!allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 2001));
    assert!(!allowed(&c, &a, DIR_INGRESS, p, PROTO_UDP, 999));
    assert!(allowed(&c, &a, DIR_INGRESS, p, PROTO_SCTP, 9));
    assert!(
        !allowed(&c, &a, DIR_INGRESS, p, PROTO_ICMP, 0),
        "ports given: ICMP does not match"
    );
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    let ep = &compiled.state.endpoints[&a];
    assert_eq!(
        ep.info.port_masks[usize::from(DIR_INGRESS)] & enforcer_common::PORT_MASK_ANY_PROTO,
        0
    );
    assert_ne!(ep.info.port_masks[usize::from(DIR_INGRESS)] & (1 << 16), 0);
    assert_ne!(
        ep.info.port_masks[usize::from(DIR_INGRESS)] & 1,
        0,
        "SCTP any port"
    );
    // Empty ports: any protocol, ICMP included.
    let any = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(None, Some(vec![]))]),
        None,
    )]);
    assert!(allowed(&any, &a, DIR_INGRESS, p, PROTO_ICMP, 0));
    assert!(allowed(&any, &a, DIR_INGRESS, p, 47, 0));
}

#[test]
fn named_ports_ingress_resolve_on_the_destination() {
    let c = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(None, Some(vec![named(None, "http")]))]),
        None,
    )]);
    assert!(allowed(
        &c,
        &pr("x", "a"),
        DIR_INGRESS,
        "8.8.8.8",
        PROTO_TCP,
        80
    ));
    assert!(!allowed(
        &c,
        &pr("x", "a"),
        DIR_INGRESS,
        "8.8.8.8",
        PROTO_TCP,
        8080
    ));
    assert!(allowed(
        &c,
        &pr("x", "b"),
        DIR_INGRESS,
        "8.8.8.8",
        PROTO_TCP,
        8080
    ));
    assert!(!allowed(
        &c,
        &pr("x", "b"),
        DIR_INGRESS,
        "8.8.8.8",
        PROTO_TCP,
        80
    ));
    let udp = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(None, Some(vec![named(None, "dns")]))]),
        None,
    )]);
    assert!(
        !allowed(&udp, &pr("x", "a"), DIR_INGRESS, "8.8.8.8", PROTO_UDP, 53),
        "dns is UDP, the rule TCP"
    );
    let udp = base(vec![policy(
        "x",
        "p",
        None,
        None,
        Some(vec![(None, Some(vec![named(Some("UDP"), "dns")]))]),
        None,
    )]);
    assert!(allowed(
        &udp,
        &pr("x", "a"),
        DIR_INGRESS,
        "8.8.8.8",
        PROTO_UDP,
        53
    ));
}

#[test]
fn named_ports_egress_resolve_on_each_peer_pod() {
    let c = base(vec![policy(
        "x",
        "p",
        None,
        Some(&["Egress"]),
        None,
        Some(vec![(None, Some(vec![named(None, "http")]))]),
    )]);
    let a = pr("x", "a");
    assert!(
        allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 8080),
        "x/b declares http=8080"
    );
    assert!(!allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(
        allowed(&c, &a, DIR_EGRESS, "10.0.1.1", PROTO_TCP, 81),
        "remote pods count"
    );
    assert!(
        !allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 80),
        "not a pod: no named port"
    );
    let block = base(vec![policy(
        "x",
        "p",
        None,
        Some(&["Egress"]),
        None,
        Some(vec![(
            Some(vec![block_peer("10.0.0.0/24", &[])]),
            Some(vec![named(None, "http")]),
        )]),
    )]);
    assert!(allowed(&block, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 8080));
    assert!(
        !allowed(&block, &a, DIR_EGRESS, "10.0.1.1", PROTO_TCP, 81),
        "pod outside the block"
    );
    assert!(!allowed(
        &block,
        &a,
        DIR_EGRESS,
        "10.0.0.99",
        PROTO_TCP,
        8080
    ));
}

#[test]
fn policy_types_and_union() {
    // An egress-only policy does not isolate ingress; two policies add up.
    let c = base(vec![
        policy(
            "x",
            "eg",
            None,
            Some(&["Egress"]),
            None,
            Some(vec![(
                Some(vec![pods_peer(None, Some(sel(&[("app", "b")])))]),
                None,
            )]),
        ),
        policy(
            "x",
            "eg2",
            Some(sel(&[("app", "a")])),
            None,
            None,
            Some(vec![(None, Some(vec![tcp(53)]))]),
        ),
    ]);
    let a = pr("x", "a");
    assert!(allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_UDP, 1));
    assert!(
        allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 53),
        "from eg2"
    );
    assert!(!allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_UDP, 53));
    assert!(
        !allowed(&c, &a, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80),
        "eg2 has no policyTypes: Ingress with no rules"
    );
    assert!(
        allowed(&c, &pr("x", "b"), DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80),
        "eg is Egress only"
    );
    // Egress rules listed but only Ingress in policyTypes: egress not isolated.
    let c = base(vec![policy(
        "x",
        "p",
        None,
        Some(&["Ingress"]),
        None,
        Some(vec![(None, Some(vec![tcp(1)]))]),
    )]);
    assert!(allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 80));
}

#[test]
fn skipped_pods_and_refused_policies() {
    let mut c = base(vec![
        policy("x", "deny", None, Some(&["Ingress", "Egress"]), None, None),
        policy(
            "x",
            "bad",
            None,
            None,
            Some(vec![(None, Some(vec![port(Some("ICMP"), None, None)]))]),
            None,
        ),
    ]);
    let mut host = pod("x", "h", &[], &["10.0.9.1"], "node-a", &[]);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut done = pod("x", "d", &[], &["10.0.0.7"], "node-a", &[]);
    done.status.as_mut().unwrap().phase = Some("Failed".into());
    let mut no_ip = pod("x", "n", &[], &[], "node-a", &[]);
    no_ip.status.as_mut().unwrap().pod_ip = None;
    c.pods.extend(shared([host, done, no_ip]));
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert_eq!(
        compiled.state.endpoints.keys().cloned().collect::<Vec<_>>(),
        [pr("x", "a"), pr("x", "b")]
    );
    assert!(
        matches!(&compiled.errors[..], [CompileError::Policy(e)] if e.field == "spec.ingress[0].ports[0].protocol")
    );
    // The refused policy has no podSelector and no policyTypes: it isolates every local pod of
    // x for ingress.
    assert_eq!(compiled.refused.len(), 1);
    assert_eq!(compiled.refused[0].pods, [pr("x", "a"), pr("x", "b")]);
    assert!(compiled.errors[0].to_string().contains("isolated"));
    assert!(
        !compiled
            .state
            .peers_v4
            .contains_key(&"10.0.0.7".parse().unwrap())
    );
    assert!(!allowed(
        &c,
        &pr("x", "a"),
        DIR_EGRESS,
        "10.0.0.2",
        PROTO_TCP,
        80
    ));
    assert!(allowed(
        &c,
        &pr("x", "a"),
        DIR_EGRESS,
        "10.0.9.1",
        PROTO_TCP,
        80
    ));
}

/// A policy whose ports say `endPort: 70` below `port: 80`.
fn bad_end_port(
    name: &str,
    selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    types: Option<&[&str]>,
) -> NetworkPolicy {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    policy(
        "x",
        name,
        selector,
        types,
        Some(vec![(
            None,
            Some(vec![port(None, Some(IntOrString::Int(80)), Some(70))]),
        )]),
        None,
    )
}

/// Fail closed: a policy the agent refuses isolates the pods it selects in the directions it
/// names, with no rule of its own; other policies' rules still allow what they allow.
#[test]
fn refused_ingress_policy_isolates_its_pods_ingress_only() {
    let c = base(vec![bad_end_port("p", Some(sel(&[("app", "a")])), None)]);
    let (a, b) = (pr("x", "a"), pr("x", "b"));
    assert!(!allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(
        !allowed(&c, &a, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 75),
        "its own rule allows nothing"
    );
    assert!(
        allowed(&c, &a, DIR_INGRESS, "10.0.9.1", PROTO_TCP, 80),
        "host"
    );
    assert!(
        allowed(&c, &a, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 80),
        "egress not named"
    );
    assert!(
        allowed(&c, &b, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80),
        "not selected"
    );
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert_eq!(compiled.refused.len(), 1);
    let r = &compiled.refused[0];
    assert_eq!((r.refusal.ingress, r.refusal.egress), (true, false));
    assert_eq!(r.pods, std::slice::from_ref(&a));
    assert_eq!(
        r.refusal.errors[0].field,
        "spec.ingress[0].ports[0].endPort"
    );
    assert!(compiled.state.policy.is_empty() && compiled.state.rules.is_empty());
    assert_eq!(
        r.refusal.consequence(),
        "isolating the pods it selects (ingress) until it is fixed"
    );
    // `explain` names the object and the field.
    let e = super::explain::explain(
        &c,
        &opts(),
        &Endpoint::Pod(b.clone()),
        &Endpoint::Pod(a.clone()),
        PROTO_TCP,
        80,
    );
    let text = e.to_string();
    assert!(
        text.contains(
            "isolated by refused policy x/p: spec.ingress[0].ports[0].endPort: 70 must be"
        ),
        "{text}"
    );
    // A valid policy selecting the same pod still allows what it allows.
    let c = base(vec![
        bad_end_port("p", Some(sel(&[("app", "a")])), None),
        policy(
            "x",
            "q",
            Some(sel(&[("app", "a")])),
            None,
            Some(vec![(None, Some(vec![tcp(80)]))]),
            None,
        ),
    ]);
    assert!(allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 81));
    let v = evaluator::direction_verdict(&c, &opts(), &a, true, ip("10.0.0.2"), PROTO_TCP, 81);
    let text = v.to_string();
    assert!(
        text.contains("isolated by policies [x/q] and no rule allows it; isolated by refused policy x/p: spec.ingress[0]"),
        "{text}"
    );
}

#[test]
fn refused_policy_with_unreadable_pod_selector_isolates_every_pod_of_its_namespace() {
    // The selector would pick app=b if it could be read; both x pods are isolated for egress.
    let mut p = policy(
        "x",
        "p",
        Some(sel_expr("app", "Equals", &["b"])),
        Some(&["Egress"]),
        None,
        Some(vec![(None, None)]),
    );
    let c = base(vec![p.clone()]);
    for pod in [pr("x", "a"), pr("x", "b")] {
        assert!(
            !allowed(&c, &pod, DIR_EGRESS, "10.0.1.1", PROTO_TCP, 80),
            "{pod}"
        );
        assert!(
            !allowed(&c, &pod, DIR_EGRESS, "8.8.8.8", PROTO_UDP, 53),
            "{pod}"
        );
        assert!(
            allowed(&c, &pod, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80),
            "{pod}"
        );
    }
    let standalone = CompileOptions {
        node_name: None,
        ..opts()
    };
    assert!(
        evaluator::egress_allows(&c, &standalone, &pr("y", "a"), ip("8.8.8.8"), PROTO_TCP, 80),
        "another namespace"
    );
    let compiled = compile(&c, &standalone, &mut Allocations::new());
    let r = &compiled.refused[0];
    assert_eq!(r.refusal.pod_selector, None);
    assert_eq!(r.pods, [pr("x", "a"), pr("x", "b")]);
    assert!(
        r.refusal.consequence().contains("every pod of namespace x"),
        "{}",
        r.refusal.consequence()
    );
    assert!(
        !compiled.state.endpoints[&pr("y", "a")]
            .info
            .isolated(DIR_EGRESS)
    );
    // No spec at all: nothing can be read, every pod of the namespace both ways.
    p.spec = None;
    let c = base(vec![p]);
    for pod in [pr("x", "a"), pr("x", "b")] {
        assert!(!allowed(&c, &pod, DIR_EGRESS, "8.8.8.8", PROTO_TCP, 80));
        assert!(!allowed(&c, &pod, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80));
    }
}

#[test]
fn refused_policy_with_unreadable_policy_types_isolates_both_directions() {
    let c = base(vec![bad_end_port(
        "p",
        Some(sel(&[("app", "a")])),
        Some(&["Ingress", "Sideways"]),
    )]);
    let a = pr("x", "a");
    assert!(!allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(allowed(
        &c,
        &pr("x", "b"),
        DIR_EGRESS,
        "10.0.0.1",
        PROTO_TCP,
        80
    ));
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert_eq!(compiled.refused[0].refusal.directions(), "ingress, egress");
    // Readable types are followed: Egress only.
    let c = base(vec![bad_end_port(
        "p",
        Some(sel(&[("app", "a")])),
        Some(&["Egress"]),
    )]);
    assert!(allowed(&c, &a, DIR_INGRESS, "10.0.0.2", PROTO_TCP, 80));
    assert!(!allowed(&c, &a, DIR_EGRESS, "10.0.0.2", PROTO_TCP, 80));
}

/// The fix of a refused policy takes effect like any change, in a compile carrying the last
/// one's allocations (and memo).
#[test]
fn a_refused_policy_that_becomes_valid_takes_effect_normally() {
    let a = pr("x", "a");
    let refused = base(vec![bad_end_port("p", Some(sel(&[("app", "a")])), None)]);
    let fixed = base(vec![policy(
        "x",
        "p",
        Some(sel(&[("app", "a")])),
        None,
        Some(vec![(None, Some(vec![tcp(80)]))]),
        None,
    )]);
    let mut alloc = Allocations::new();
    let first = compile(&refused, &opts(), &mut alloc);
    assert_eq!(first.refused.len(), 1);
    check_compiled(&first, &refused, &opts(), &flow_peers(), &[(PROTO_TCP, 80)]);
    let second = compile(&fixed, &opts(), &mut alloc);
    assert!(second.refused.is_empty() && second.errors.is_empty());
    check_compiled(
        &second,
        &fixed,
        &opts(),
        &flow_peers(),
        &[(PROTO_TCP, 80), (PROTO_TCP, 81)],
    );
    let d = decision::decide(&second.state, &a, DIR_INGRESS, ip("8.8.8.8"), PROTO_TCP, 80);
    assert!(d.allowed && d.reason == Reason::Policy);
    assert!(allowed(&fixed, &a, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 80));
    assert!(!allowed(&fixed, &a, DIR_INGRESS, "8.8.8.8", PROTO_TCP, 81));
}

#[test]
fn endpoint_limit_and_stable_ids() {
    let c = base(vec![]);
    let mut o = opts();
    o.max_endpoints = 1;
    let compiled = compile(&c, &o, &mut Allocations::new());
    assert_eq!(compiled.state.endpoints.len(), 1);
    assert!(matches!(
        &compiled.errors[..],
        [CompileError::TooManyEndpoints { .. }]
    ));
    // Ids survive other pods coming and going.
    let mut alloc = Allocations::new();
    let first = compile(&c, &opts(), &mut alloc);
    let b_id = first.state.endpoints[&pr("x", "b")].info.id;
    let mut without_a = c.clone();
    without_a.pods.remove(0);
    let second = compile(&without_a, &opts(), &mut alloc);
    assert_eq!(second.state.endpoints[&pr("x", "b")].info.id, b_id);
    let third = compile(&c, &opts(), &mut alloc);
    assert_eq!(third.state.endpoints[&pr("x", "b")].info.id, b_id);
    assert_ne!(third.state.endpoints[&pr("x", "a")].info.id, b_id);
}

#[test]
fn combined_verdict() {
    let c = base(vec![
        policy(
            "x",
            "in",
            Some(sel(&[("app", "b")])),
            None,
            Some(vec![(
                Some(vec![pods_peer(None, Some(sel(&[("app", "a")])))]),
                None,
            )]),
            None,
        ),
        policy(
            "x",
            "out",
            Some(sel(&[("app", "a")])),
            Some(&["Egress"]),
            None,
            Some(vec![(None, Some(vec![tcp(80)]))]),
        ),
    ]);
    let o = opts();
    let (a, b) = (Endpoint::Pod(pr("x", "a")), Endpoint::Pod(pr("x", "b")));
    assert!(evaluator::verdict(&c, &o, &a, &b, PROTO_TCP, 80));
    assert!(
        !evaluator::verdict(&c, &o, &a, &b, PROTO_TCP, 81),
        "egress of x/a"
    );
    assert!(
        !evaluator::verdict(&c, &o, &Endpoint::Ip(ip("8.8.8.8")), &b, PROTO_TCP, 80),
        "ingress of x/b"
    );
    assert!(
        evaluator::verdict(&c, &o, &Endpoint::Ip(ip("10.0.9.1")), &b, PROTO_TCP, 80),
        "host"
    );
    assert!(evaluator::verdict(&c, &o, &b, &b, PROTO_TCP, 80), "self");
    assert!(evaluator::verdict(
        &c,
        &o,
        &b,
        &Endpoint::Ip(ip("8.8.8.8")),
        PROTO_TCP,
        80
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary strings in every free-text field: compile, evaluate and explain never panic.
    #[test]
    fn garbage_never_panics(
        cidr in "\\PC{0,20}|[0-9./:a-f]{0,24}",
        except in "\\PC{0,20}|[0-9./:a-f]{0,24}",
        op in "\\PC{0,8}|In|NotIn|Exists",
        key in "\\PC{0,12}",
        value in "\\PC{0,12}",
        proto in "\\PC{0,5}|TCP|UDP",
        name in "\\PC{0,16}",
        num in any::<i32>(),
        end in proptest::option::of(any::<i32>()),
        pod_ip in "\\PC{0,20}|[0-9./:a-f]{0,24}",
    ) {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let mut p = pod("x", "a", &[(key.as_str(), value.as_str())], &[pod_ip.as_str(), "10.0.0.1"], "node-a", &[(name.as_str(), proto.as_str(), num)]);
        p.metadata.namespace = Some(key.clone());
        let pol = policy(
            &key,
            &name,
            Some(sel_expr(&key, &op, &[value.as_str()])),
            Some(&[proto.as_str(), "Egress"]),
            Some(vec![(Some(vec![block_peer(&cidr, &[except.as_str()]), pods_peer(Some(sel_expr(&value, &op, &[])), None)]), Some(vec![port(Some(&proto), Some(IntOrString::Int(num)), end), port(None, Some(IntOrString::String(name.clone())), end)]))]),
            Some(vec![(None, Some(vec![port(None, Some(IntOrString::Int(num)), end)]))]),
        );
        let cluster = Cluster { namespaces: shared(vec![namespace(&key, &[(value.as_str(), key.as_str())])]), pods: shared(vec![p.clone()]), policies: shared(vec![pol]), ..Default::default() };
        let o = opts();
        let compiled = compile(&cluster, &o, &mut Allocations::new());
        for r in compiled.state.endpoints.keys() {
            let _ = decision::decide(&compiled.state, r, DIR_EGRESS, ip("10.0.0.2"), PROTO_TCP, 80);
            let _ = super::explain::explain(&cluster, &o, &Endpoint::Pod(r.clone()), &Endpoint::Ip(ip("10.0.0.2")), PROTO_TCP, 80).to_string();
        }
        for e in &compiled.errors {
            let _ = e.to_string();
        }
    }
}

#[test]
fn identity_required_peers_match_only_verified_addresses() {
    // x/b admits pods `app: a` running as service account `sa-a`, and requires identity.
    let mut np = policy(
        "x",
        "from-verified-a",
        Some(sel(&[("app", "b")])),
        None,
        Some(vec![(
            Some(vec![pods_peer(
                None,
                Some(sel(&[
                    ("app", "a"),
                    ("enforcer.dev/serviceaccount", "sa-a"),
                ])),
            )]),
            None,
        )]),
        None,
    );
    np.metadata.annotations = Some(
        [(
            super::model::ANNOTATION_REQUIRE_IDENTITY.to_string(),
            "true".to_string(),
        )]
        .into(),
    );
    let mut c = base(vec![np.clone()]);
    let b = pr("x", "b");
    let verdict = |c: &Cluster| {
        evaluator::direction_verdict(c, &opts(), &b, true, ip("10.0.0.1"), PROTO_TCP, 80)
    };
    // Labels alone: denied, and explained as a want of identity.
    assert!(!allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    assert!(
        matches!(verdict(&c), evaluator::DirVerdict::NoIdentity { .. }),
        "{:?}",
        verdict(&c)
    );
    // Verified as another service account: denied, not for want of identity.
    let sa = |name: &str| {
        std::collections::BTreeMap::from([(
            "enforcer.dev/serviceaccount".to_string(),
            name.to_string(),
        )])
    };
    c.verified.insert(ip("10.0.0.1"), sa("sa-other"));
    assert!(!allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    assert!(matches!(verdict(&c), evaluator::DirVerdict::Denied { .. }));
    // Verified as sa-a, only at the verified address (v4), not at its other one (v6).
    c.verified.insert(ip("10.0.0.1"), sa("sa-a"));
    assert!(allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    assert!(!allowed(&c, &b, DIR_INGRESS, "fd00::1", PROTO_TCP, 80));
    // Without the annotation the reserved label still has to match, but --require-identity
    // makes every policy require it.
    np.metadata.annotations = None;
    let mut c2 = base(vec![np]);
    c2.verified.insert(ip("10.0.0.1"), sa("sa-a"));
    assert!(allowed(&c2, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    let strict = CompileOptions {
        require_identity: true,
        ..opts()
    };
    let compiled = compile(&c2, &strict, &mut Allocations::new());
    assert!(
        !decision::decide(
            &compiled.state,
            &b,
            DIR_INGRESS,
            ip("fd00::1"),
            PROTO_TCP,
            80
        )
        .allowed
    );
    assert!(
        !evaluator::direction_verdict(&c2, &strict, &b, true, ip("fd00::1"), PROTO_TCP, 80)
            .allowed()
    );
}

/// The reserved labels a verified address gets, as the agent's identity module makes them.
fn verified_as(ns: &str, sa: &str) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        ("enforcer.dev/serviceaccount".to_string(), sa.to_string()),
        ("enforcer.dev/namespace".to_string(), ns.to_string()),
    ])
}

/// [`base`] with a policy letting x/b receive from the pods of x that `peers` selects (no
/// identity required), and x/a labelled `enforcer.dev/serviceaccount: <sa>` by its own object.
fn b_from(
    peers: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    sa: &str,
) -> Cluster {
    let np = policy(
        "x",
        "b-from",
        Some(sel(&[("app", "b")])),
        None,
        Some(vec![(Some(vec![pods_peer(None, Some(peers))]), None)]),
        None,
    );
    let mut c = base(vec![np]);
    label_self(&mut c, 0, "enforcer.dev/serviceaccount", sa);
    c
}

/// Sets `key: value` on the object of pod `i` of `c`.
fn label_self(c: &mut Cluster, i: usize, key: &str, value: &str) {
    let mut p = (*c.pods[i]).clone();
    if crate::model::is_reserved_label(key) {
        let mut own = p.own_reserved.to_vec();
        own.push((key.into(), value.into()));
        own.sort();
        p.own_reserved = own.into();
    } else {
        Arc::make_mut(&mut p.labels).insert(key.into(), value.into());
    }
    c.pods[i] = Arc::new(p);
}

#[test]
fn a_self_labelled_pod_gets_nothing_a_verified_one_does() {
    let mut c = b_from(sel(&[("enforcer.dev/serviceaccount", "sa-a")]), "sa-a");
    let b = pr("x", "b");
    assert!(
        !allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80),
        "its own reserved label does not match"
    );
    let v = evaluator::direction_verdict(&c, &opts(), &b, true, ip("10.0.0.1"), PROTO_TCP, 80);
    let evaluator::DirVerdict::Denied { ignored, .. } = &v else {
        panic!("{v:?}")
    };
    assert_eq!(
        ignored
            .iter()
            .map(|l| (l.kind, l.object.as_str(), l.key.as_str(), l.value.as_str()))
            .collect::<Vec<_>>(),
        [("Pod", "x/a", "enforcer.dev/serviceaccount", "sa-a")],
        "the denial names the ignored label"
    );
    // Verified as sa-a: allowed; verified as another account, its own label still counts for
    // nothing (the verified value is the one seen).
    c.verified.insert(ip("10.0.0.1"), verified_as("x", "sa-a"));
    assert!(allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    c.verified
        .insert(ip("10.0.0.1"), verified_as("x", "sa-other"));
    assert!(!allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    // A pod without the label, denied, is not said to be self-labelled.
    c.verified.clear();
    let v = evaluator::direction_verdict(&c, &opts(), &b, true, ip("10.0.1.1"), PROTO_TCP, 80);
    assert!(
        matches!(&v, evaluator::DirVerdict::Denied { ignored, .. } if ignored.is_empty()),
        "{v:?}"
    );
}

/// A pod cannot escape a policy whose podSelector is NotIn / DoesNotExist on a reserved key by
/// setting that key on itself, nor shed a verified peer's identity: the object's own value is
/// never seen.
#[test]
fn self_set_reserved_labels_escape_no_not_in_or_does_not_exist() {
    let deny_all_but =
        |name: &str, selector| policy("x", name, Some(selector), Some(&["Ingress"]), None, None);
    for selector in [
        sel_expr("enforcer.dev/serviceaccount", "NotIn", &["trusted"]),
        sel_expr("enforcer.dev/serviceaccount", "DoesNotExist", &[]),
    ] {
        let mut c = base(vec![deny_all_but("isolate-untrusted", selector.clone())]);
        label_self(&mut c, 0, "enforcer.dev/serviceaccount", "trusted");
        let compiled = compile(&c, &opts(), &mut Allocations::new());
        assert!(
            compiled.state.endpoints[&pr("x", "a")]
                .info
                .isolated(DIR_INGRESS),
            "{selector:?}: the self-labelled pod is still isolated"
        );
        assert!(!allowed(
            &c,
            &pr("x", "a"),
            DIR_INGRESS,
            "10.0.0.2",
            PROTO_TCP,
            80
        ));
    }
    // As a peer: admitted unless verified as `evil`; x/a labels itself `good` but is verified
    // as `evil`: denied.
    let mut c = b_from(
        sel_expr("enforcer.dev/serviceaccount", "NotIn", &["evil"]),
        "good",
    );
    let b = pr("x", "b");
    assert!(allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    c.verified.insert(ip("10.0.0.1"), verified_as("x", "evil"));
    assert!(!allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
    // Unverified and labelled `evil` by itself: its own value is not seen either way.
    let c = b_from(
        sel_expr("enforcer.dev/serviceaccount", "NotIn", &["evil"]),
        "evil",
    );
    assert!(allowed(&c, &b, DIR_INGRESS, "10.0.0.1", PROTO_TCP, 80));
}

/// A Namespace object's reserved labels are ignored by namespaceSelectors too.
#[test]
fn a_namespace_s_own_reserved_labels_are_ignored() {
    let np = policy(
        "x",
        "from-blessed-namespaces",
        Some(sel(&[("app", "b")])),
        None,
        Some(vec![(
            Some(vec![pods_peer(
                Some(sel(&[("enforcer.dev/blessed", "yes")])),
                None,
            )]),
            None,
        )]),
        None,
    );
    let mut c = base(vec![np]);
    c.namespaces = shared(vec![
        namespace("x", &[("team", "blue")]),
        namespace("y", &[("team", "red"), ("enforcer.dev/blessed", "yes")]),
    ]);
    let b = pr("x", "b");
    assert!(!allowed(&c, &b, DIR_INGRESS, "10.0.1.1", PROTO_TCP, 80));
    assert!(!c.namespace_labels("y").contains_key("enforcer.dev/blessed"));
    let v = evaluator::direction_verdict(&c, &opts(), &b, true, ip("10.0.1.1"), PROTO_TCP, 80);
    assert!(
        matches!(&v, evaluator::DirVerdict::Denied { ignored, .. }
            if ignored.iter().any(|l| l.kind == "Namespace" && l.object == "y")),
        "{v:?}"
    );
    let listed: Vec<String> = crate::model::self_set_labels(&c)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        listed,
        [
            "Namespace y: label enforcer.dev/blessed=\"yes\" ignored: labels under enforcer.dev/ come only from a verified identity, never from the object"
        ]
    );
}

/// An agent restarted after a history of changes numbers the same cluster as the pinned maps
/// do, once it restores from them: a fresh numbering would differ, and a number the maps use for
/// another identity would lend that identity's policy entries to new addresses mid-update.
#[test]
fn restart_restores_identity_and_rule_numbers() {
    let from = |name: &str, app: &str, port: i32| {
        policy(
            "x",
            name,
            Some(sel(&[("app", "a")])),
            None,
            Some(vec![(
                Some(vec![pods_peer(Some(sel(&[])), Some(sel(&[("app", app)])))]),
                Some(vec![tcp(port)]),
            )]),
            None,
        )
    };
    let block = policy(
        "x",
        "blk",
        Some(sel(&[("app", "b")])),
        None,
        Some(vec![(Some(vec![block_peer("10.0.9.0/24", &[])]), None)]),
        None,
    );
    let c = base(vec![
        from("from-b", "b", 80),
        from("from-a", "a", 81),
        block.clone(),
    ]);
    // Earlier: a pod and a policy that sort first, since gone; identities and rules were
    // numbered around them.
    let mut early = base(vec![from("aaa", "zzz", 90), block, from("from-a", "a", 81)]);
    early.pods.push(Arc::new(crate::model::PodInfo::from(pod(
        "x",
        "old",
        &[("app", "0")],
        &["10.0.0.7"],
        "n",
        &[],
    ))));
    let mut running = Allocations::new();
    compile(&early, &opts(), &mut running);
    compile(&c, &opts(), &mut running);
    let pinned = compile(&c, &opts(), &mut running).state;
    let fresh = compile(&c, &opts(), &mut Allocations::new()).state;
    assert_ne!(
        fresh.peers_v4, pinned.peers_v4,
        "the history must have moved the numbers"
    );
    assert_ne!(
        fresh.policy, pinned.policy,
        "the history must have moved the rule ids"
    );

    let mut restarted = Allocations::new();
    for (pod, ep) in &pinned.endpoints {
        assert!(restarted.reserve_endpoint(pod, ep.info.id));
    }
    let (identities, rules) = restarted.restore(&c, &opts(), &pinned);
    assert!(
        identities >= 4 && rules >= 3,
        "restored {identities} identities, {rules} rules"
    );
    let again = compile(&c, &opts(), &mut restarted).state;
    assert_eq!(again.peers_v4, pinned.peers_v4);
    assert_eq!(again.peers_v6, pinned.peers_v6);
    assert_eq!(again.cidrs_v4, pinned.cidrs_v4);
    assert_eq!(again.policy, pinned.policy);
    assert_eq!(again.rules, pinned.rules);

    // A new pod of a known identity shares its number.
    let mut more = c.clone();
    more.pods.push(Arc::new(crate::model::PodInfo::from(pod(
        "x",
        "new",
        &[("app", "b")],
        &["10.0.0.9"],
        "n",
        &[("http", "TCP", 8080)],
    ))));
    let next = compile(&more, &opts(), &mut restarted).state;
    assert_eq!(
        next.peers_v4[&"10.0.0.9".parse().unwrap()],
        pinned.peers_v4[&"10.0.0.2".parse().unwrap()]
    );

    // Restarted into a cluster without y/a (the highest pinned number): nothing new takes its
    // number, which the pinned maps still use until the first reconcile removes it.
    let max_pinned = pinned.peers_v4.values().map(|p| p.identity).max().unwrap();
    assert_eq!(
        pinned.peers_v4[&"10.0.1.1".parse().unwrap()].identity,
        max_pinned
    );
    let mut without = c.clone();
    without.pods.retain(|p| &*p.namespace != "y");
    without.pods.push(Arc::new(crate::model::PodInfo::from(pod(
        "x",
        "q",
        &[("app", "q")],
        &["10.0.0.8"],
        "n",
        &[],
    ))));
    let mut restarted = Allocations::new();
    for (pod, ep) in &pinned.endpoints {
        restarted.reserve_endpoint(pod, ep.info.id);
    }
    restarted.restore(&without, &opts(), &pinned);
    let after = compile(&without, &opts(), &mut restarted).state;
    assert_eq!(
        after.peers_v4[&"10.0.0.2".parse().unwrap()],
        pinned.peers_v4[&"10.0.0.2".parse().unwrap()]
    );
    assert!(after.peers_v4[&"10.0.0.8".parse().unwrap()].identity > max_pinned);
}

/// Only unambiguous renumberings are restored.
#[test]
fn restore_skips_ambiguous_numbers() {
    let r = super::compile::renumbering_for_tests;
    assert_eq!(r(&[(300, 400), (301, 401)]), vec![(300, 400), (301, 401)]);
    // One fresh number, two pinned ones: the addresses were split; neither is kept.
    assert_eq!(r(&[(300, 400), (300, 401), (301, 402)]), vec![(301, 402)]);
    // Two fresh numbers claim one pinned number: neither gets it.
    assert_eq!(r(&[(300, 400), (301, 400), (302, 402)]), vec![(302, 402)]);
    // Reserved numbers (host, world) are never renumbered.
    assert_eq!(r(&[(2, 400), (300, 1)]), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Services.
// ---------------------------------------------------------------------------------------------

fn v4(s: &str) -> std::net::Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> std::net::Ipv6Addr {
    s.parse().unwrap()
}

fn with_services(services: Vec<k8s_openapi::api::core::v1::Service>) -> super::Compiled {
    let mut c = base(vec![]);
    c.services = shared(services);
    compile(&c, &opts(), &mut Allocations::new())
}

#[test]
fn service_frontends_resolve_to_the_service_identity() {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    let mut s = service(
        "x",
        "web",
        "LoadBalancer",
        &["10.96.0.10", "fd00:96::10"],
        &[("app", "a")],
        vec![service_port(None, 80, None, Some(30080))],
    );
    // clusterIPs wins over clusterIP (it is initialised from it).
    s.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
    s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.7".into()]);
    let lb = |ip: &str, mode: Option<&str>| LoadBalancerIngress {
        ip: Some(ip.into()),
        ip_mode: mode.map(Into::into),
        ..Default::default()
    };
    s.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![
                lb("198.51.100.1", Some("VIP")),
                lb("2001:db8::1", None),
                lb("198.51.100.2", Some("Proxy")),
            ]),
        }),
        ..Default::default()
    });
    let compiled = with_services(vec![s]);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let st = &compiled.state;
    for a in ["10.96.0.10", "192.0.2.7", "198.51.100.1"] {
        assert_eq!(st.peers_v4[&v4(a)].identity, IDENTITY_SERVICE, "{a}");
    }
    for a in ["fd00:96::10", "2001:db8::1"] {
        assert_eq!(st.peers_v6[&v6(a)].identity, IDENTITY_SERVICE, "{a}");
    }
    assert!(
        !st.peers_v4.contains_key(&v4("10.96.0.99")),
        "clusterIPs wins"
    );
    assert!(
        !st.peers_v4.contains_key(&v4("198.51.100.2")),
        "a Proxy-mode load balancer is not translated by kube-proxy"
    );
    // The pods and the node keep theirs; no identity is made for a Service.
    let plain = with_services(vec![]);
    assert_eq!(compiled.identities, plain.identities);
    assert_eq!(st.peers_v4.len(), plain.state.peers_v4.len() + 3);
    assert_eq!(st.peers_v6.len(), plain.state.peers_v6.len() + 2);
}

#[test]
fn a_service_with_only_a_cluster_ip_uses_it() {
    let mut s = service("x", "web", "ClusterIP", &[], &[], vec![]);
    let spec = s.spec.as_mut().unwrap();
    spec.cluster_ips = None;
    spec.cluster_ip = Some("10.96.0.11".into());
    let compiled = with_services(vec![s]);
    assert_eq!(
        compiled.state.peers_v4[&v4("10.96.0.11")].identity,
        IDENTITY_SERVICE
    );
}

#[test]
fn headless_and_external_name_services_have_no_frontend() {
    let headless = service("x", "h", "ClusterIP", &["None"], &[("app", "a")], vec![]);
    let mut external = service("x", "e", "ExternalName", &[], &[], vec![]);
    external.spec.as_mut().unwrap().external_name = Some("example.com".into());
    let mut empty = service("x", "z", "ClusterIP", &[], &[], vec![]);
    empty.spec.as_mut().unwrap().cluster_ip = Some(String::new());
    let compiled = with_services(vec![headless, external, empty]);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    assert_eq!(compiled.state, with_services(vec![]).state);
}

#[test]
fn node_ports_are_collected_with_their_protocol() {
    let ports = || {
        vec![
            service_port(None, 80, Some(IntOrString::Int(8080)), Some(30080)),
            service_port(Some("UDP"), 53, None, Some(30053)),
            service_port(Some("SCTP"), 90, None, Some(30090)),
            service_port(None, 81, None, None),
        ]
    };
    let node_port = service("x", "n", "NodePort", &["10.96.0.20"], &[], ports());
    let lb = service(
        "x",
        "l",
        "LoadBalancer",
        &["10.96.0.21"],
        &[],
        vec![service_port(None, 443, None, Some(30443))],
    );
    // A ClusterIP Service opens no node port, whatever the field says.
    let cluster_ip = service(
        "x",
        "c",
        "ClusterIP",
        &["10.96.0.22"],
        &[],
        vec![service_port(None, 80, None, Some(30999))],
    );
    let compiled = with_services(vec![node_port, lb, cluster_ip]);
    let key = |protocol, port| NodePortKey {
        protocol,
        _pad: 0,
        port,
    };
    assert_eq!(
        compiled.state.node_ports,
        [
            key(PROTO_TCP, 30080),
            key(PROTO_UDP, 30053),
            key(PROTO_SCTP, 30090),
            key(PROTO_TCP, 30443),
        ]
        .into_iter()
        .collect()
    );
}

/// Should never happen (separate ranges), but a pod's or the node's address keeps resolving to
/// the pod (the node), and the compile says so.
#[test]
fn a_pod_or_node_address_wins_over_a_service_address() {
    let s = service(
        "x",
        "odd",
        "ClusterIP",
        &["10.0.0.1", "10.0.9.1", "10.96.0.30"],
        &[],
        vec![],
    );
    let compiled = with_services(vec![s]);
    let plain = with_services(vec![]);
    let st = &compiled.state;
    assert_eq!(
        st.peers_v4[&v4("10.0.0.1")],
        plain.state.peers_v4[&v4("10.0.0.1")]
    );
    assert_eq!(st.peers_v4[&v4("10.0.9.1")].identity, IDENTITY_HOST);
    assert_eq!(st.peers_v4[&v4("10.96.0.30")].identity, IDENTITY_SERVICE);
    let text: Vec<String> = compiled.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "Service x/odd: cluster IP 10.0.0.1 is also the address of pod x/a; it resolves to pod x/a, not to the Service",
            "Service x/odd: cluster IP 10.0.9.1 is also the address of the node; it resolves to the node, not to the Service",
        ]
    );
}

#[test]
fn an_unreadable_service_field_is_named_and_left_out() {
    let mut s = service(
        "x",
        "bad",
        "NodePort",
        &["banana"],
        &[],
        vec![
            service_port(Some("ICMP"), 80, None, Some(30001)),
            service_port(None, 81, None, Some(70000)),
            service_port(None, 82, None, Some(30002)),
        ],
    );
    s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.8".into()]);
    let compiled = with_services(vec![s.clone()]);
    let text: Vec<String> = compiled.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "Service x/bad: spec.clusterIPs[0]: \"banana\" is not an IP address (nor \"None\") (left out)",
            "Service x/bad: spec.ports[0].protocol: \"ICMP\" is not a protocol (TCP, UDP or SCTP) (left out)",
            "Service x/bad: spec.ports[1].nodePort: 70000 is not a port number (1-65535) (left out)",
        ]
    );
    // What can be read still counts.
    assert_eq!(
        compiled.state.peers_v4[&v4("192.0.2.8")].identity,
        IDENTITY_SERVICE
    );
    assert_eq!(
        compiled.state.node_ports,
        [NodePortKey {
            protocol: PROTO_TCP,
            _pad: 0,
            port: 30002
        }]
        .into_iter()
        .collect()
    );
    assert_eq!(
        crate::model::validate_service(&s).unwrap_err().len(),
        3,
        "the manifests loader refuses it"
    );
}

// ---------------------------------------------------------------------------------------------
// Audit mode.
// ---------------------------------------------------------------------------------------------

/// The compiled decision and the evaluator's verdict for one direction at `pod`.
fn both(
    cluster: &Cluster,
    o: &CompileOptions,
    pod: &PodRef,
    dir: u8,
    peer: &str,
    port: u16,
) -> (decision::Decision, evaluator::DirVerdict) {
    let compiled = compile(cluster, o, &mut Allocations::new());
    let d = decision::decide(&compiled.state, pod, dir, ip(peer), PROTO_TCP, port);
    let v = evaluator::direction_verdict(
        cluster,
        o,
        pod,
        dir == DIR_INGRESS,
        ip(peer),
        PROTO_TCP,
        port,
    );
    (d, v)
}

/// x/a's ingress from app=b on TCP 80 only.
fn only_b_to_a(name: &str) -> NetworkPolicy {
    policy(
        "x",
        name,
        Some(sel(&[("app", "a")])),
        Some(&["Ingress"]),
        Some(vec![(
            Some(vec![pods_peer(None, Some(sel(&[("app", "b")])))]),
            Some(vec![tcp(80)]),
        )]),
        None,
    )
}

#[test]
fn an_audit_policy_allows_what_it_would_deny_and_names_itself() {
    let c = base(vec![audited(only_b_to_a("only-b"))]);
    let a = pr("x", "a");
    let (d, v) = both(&c, &opts(), &a, DIR_INGRESS, "8.8.8.8", 80);
    assert!(
        d.allowed && d.reason == decision::Reason::WouldDrop,
        "{d:?}"
    );
    assert_eq!(
        v,
        evaluator::DirVerdict::WouldDrop {
            policies: vec!["x/only-b".into()]
        }
    );
    // What it allows is allowed by its rule, not reported.
    let (d, v) = both(&c, &opts(), &a, DIR_INGRESS, "10.0.0.2", 80);
    assert!(d.allowed && d.reason == decision::Reason::Policy, "{d:?}");
    assert!(matches!(v, evaluator::DirVerdict::Allowed { ref policy, .. } if policy == "only-b"));
    // Egress, which it does not isolate, is untouched.
    let (d, _) = both(&c, &opts(), &a, DIR_EGRESS, "8.8.8.8", 80);
    assert_eq!(d.reason, decision::Reason::NotIsolated);
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    let info = compiled.state.endpoints[&a].info;
    assert_eq!(
        info.flags
            & (EP_INGRESS_ISOLATED | EP_INGRESS_AUDIT | EP_EGRESS_ISOLATED | EP_EGRESS_AUDIT),
        EP_INGRESS_ISOLATED | EP_INGRESS_AUDIT
    );
    assert_eq!(
        compiled.state.audited.get(&(info.id, DIR_INGRESS)),
        Some(&vec!["x/only-b".to_string()])
    );
    let text = super::explain::explain(
        &c,
        &opts(),
        &Endpoint::Ip(ip("8.8.8.8")),
        &Endpoint::Pod(a),
        PROTO_TCP,
        80,
    )
    .to_string();
    assert!(
        text.contains("would be dropped by x/only-b (audit)")
            && text.contains("verdict: ALLOWED (would be dropped by x/only-b (audit))"),
        "{text}"
    );
}

#[test]
fn an_enforcing_policy_beside_an_audit_one_decides_alone() {
    // The audit policy would allow 8.8.8.8 and deny x/b; the enforcing one allows x/b only.
    let open_to_world = audited(policy(
        "x",
        "world",
        Some(sel(&[("app", "a")])),
        Some(&["Ingress"]),
        Some(vec![(Some(vec![block_peer("8.0.0.0/8", &[])]), None)]),
        None,
    ));
    let c = base(vec![open_to_world, only_b_to_a("only-b")]);
    let a = pr("x", "a");
    let (d, v) = both(&c, &opts(), &a, DIR_INGRESS, "8.8.8.8", 80);
    assert!(!d.allowed && d.reason == decision::Reason::Denied, "{d:?}");
    assert!(
        matches!(&v, evaluator::DirVerdict::Denied { policies, .. } if policies == &["x/only-b"]),
        "{v:?}"
    );
    let (d, _) = both(&c, &opts(), &a, DIR_INGRESS, "10.0.0.2", 80);
    assert!(d.allowed && d.reason == decision::Reason::Policy);
    let compiled = compile(&c, &opts(), &mut Allocations::new());
    assert_eq!(
        compiled.state.endpoints[&a].info.flags & EP_INGRESS_AUDIT,
        0
    );
    assert!(
        compiled
            .state
            .rules
            .values()
            .all(|r| matches!(r, RuleRef::NetworkPolicy { policy, .. } if policy == "only-b")),
        "no entry of the audit policy: {:?}",
        compiled.state.rules
    );
    assert!(compiled.state.audited.is_empty());
}

#[test]
fn a_namespace_annotation_or_the_audit_flag_make_every_policy_audit() {
    let mut c = base(vec![only_b_to_a("only-b")]);
    let a = pr("x", "a");
    assert!(!both(&c, &opts(), &a, DIR_INGRESS, "8.8.8.8", 80).0.allowed);
    let global = CompileOptions {
        audit: true,
        ..opts()
    };
    let (d, v) = both(&c, &global, &a, DIR_INGRESS, "8.8.8.8", 80);
    assert!(
        d.reason == decision::Reason::WouldDrop && v.allowed(),
        "{d:?} {v:?}"
    );
    let mut x = namespace("x", &[("team", "blue")]);
    x.metadata.annotations = Some(
        [(
            crate::model::ANNOTATION_AUDIT.to_string(),
            "true".to_string(),
        )]
        .into(),
    );
    c.namespaces = shared(vec![x, namespace("y", &[("team", "red")])]);
    let (d, v) = both(&c, &opts(), &a, DIR_INGRESS, "8.8.8.8", 80);
    assert!(d.reason == decision::Reason::WouldDrop, "{d:?}");
    assert!(
        matches!(v, evaluator::DirVerdict::WouldDrop { .. }),
        "{v:?}"
    );
}

#[test]
fn a_refused_audit_policy_audits_too() {
    // Unreadable policyTypes: refused, isolating both directions, allowing nothing; as an
    // audit policy it only reports.
    let c = base(vec![audited(policy(
        "x",
        "broken",
        None,
        Some(&["Ingress", "Sideways"]),
        None,
        None,
    ))]);
    let (d, v) = both(&c, &opts(), &pr("x", "a"), DIR_EGRESS, "8.8.8.8", 80);
    assert!(d.reason == decision::Reason::WouldDrop, "{d:?}");
    assert!(
        matches!(v, evaluator::DirVerdict::WouldDrop { .. }),
        "{v:?}"
    );
}

/// A compiled state with every number replaced by what it stands for: carried and fresh
/// compiles number identities, endpoints and rules differently, and must agree on the rest.
fn canonical(c: &super::Compiled) -> String {
    use std::fmt::Write as _;
    let id = |n: u32| match c.identities.get(&n) {
        Some(k) => format!("{k:?}"),
        None => format!("reserved {n}"),
    };
    let eps: std::collections::BTreeMap<u32, &PodRef> = c
        .state
        .endpoints
        .iter()
        .map(|(r, e)| (e.info.id, r))
        .collect();
    let mut lines: Vec<String> = Vec::new();
    for (a, p) in &c.state.peers_v4 {
        lines.push(format!("peer {a} {}", id(p.identity)));
    }
    for (a, p) in &c.state.peers_v6 {
        lines.push(format!("peer {a} {}", id(p.identity)));
    }
    for (n, p) in &c.state.cidrs_v4 {
        lines.push(format!("cidr {n:?} {}", id(p.identity)));
    }
    for (n, p) in &c.state.cidrs_v6 {
        lines.push(format!("cidr {n:?} {}", id(p.identity)));
    }
    for (r, e) in &c.state.endpoints {
        let mut info = e.info;
        info.id = 0;
        let identity = id(info.identity);
        info.identity = 0;
        lines.push(format!("endpoint {r} {info:?} {identity} {:?}", e.ips));
    }
    for (k, v) in &c.state.policy {
        lines.push(format!(
            "policy {} {} {} {} {}/{} {} {}",
            eps.get(&k.endpoint)
                .map_or_else(|| "?".into(), |r| r.to_string()),
            id(k.identity),
            k.direction,
            k.protocol,
            k.port,
            k.port_prefix_len,
            c.state
                .rule(v.rule)
                .map_or_else(|| "?".into(), ToString::to_string),
            if v.rule & enforcer_common::RULE_DENY == 0 {
                "allow"
            } else {
                "deny"
            },
        ));
    }
    lines.sort();
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Cluster policies (Admin and Baseline tiers), compiled.
// ---------------------------------------------------------------------------------------------

pub(crate) mod tier_strategies {
    use std::sync::Arc;

    use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
    use proptest::{collection::vec, option, prelude::*, sample::select};

    use super::{fixtures::labels, strategies};
    use crate::{
        model::NodeInfo,
        selector::Selector,
        tiers::{
            Action, ClusterPolicy, Kind, PeerSelector, PortSelector, Subject, Tier, TierRule, sort,
        },
        validate::parse_cidr,
    };

    fn selector() -> impl Strategy<Value = Selector> {
        strategies::selector()
            .prop_map(|s| Selector::parse(&s).unwrap_or_else(|_| Selector::everything()))
    }

    const NETWORKS: [&str; 9] = [
        "10.0.0.0/16",
        "10.0.1.0/24",
        "10.0.2.0/25",
        "10.0.9.0/24",
        "10.0.1.11/32",
        "0.0.0.0/0",
        "fd00::/64",
        "192.168.0.0/16",
        "::/0",
    ];

    fn peer(egress: bool) -> impl Strategy<Value = PeerSelector> {
        let pods = prop_oneof![
            4 => selector().prop_map(PeerSelector::Namespaces),
            6 => (selector(), selector())
                .prop_map(|(namespaces, pods)| PeerSelector::Pods { namespaces, pods }),
            1 => Just(PeerSelector::Everything),
            1 => Just(PeerSelector::Nothing),
        ];
        let others = prop_oneof![
            4 => vec(select(&NETWORKS[..]), 1..3).prop_map(|n| {
                PeerSelector::Networks(n.iter().map(|c| parse_cidr(c).unwrap()).collect())
            }),
            2 => selector().prop_map(PeerSelector::Nodes),
        ];
        if egress {
            prop_oneof![3 => pods, 2 => others].boxed()
        } else {
            pods.boxed()
        }
    }

    fn port() -> impl Strategy<Value = PortSelector> {
        prop_oneof![
            4 => select(
                &[
                    (PROTO_TCP, 80, 80),
                    (PROTO_TCP, 80, 81),
                    (PROTO_TCP, 1000, 2000),
                    (PROTO_TCP, 0, 65535),
                    (PROTO_TCP, 8000, 8100),
                    (PROTO_UDP, 53, 53),
                    (PROTO_UDP, 1, 65535),
                    (PROTO_SCTP, 80, 80),
                ][..]
            )
            .prop_map(|(protocol, start, end)| PortSelector::Range { protocol, start, end }),
            1 => select(&["http", "dns", "web", "nope"][..])
                .prop_map(|n| PortSelector::Named(n.to_string())),
        ]
    }

    fn rule(egress: bool, index: usize) -> impl Strategy<Value = TierRule> {
        (
            select(&[Action::Accept, Action::Deny, Action::Pass][..]),
            vec(peer(egress), 1..3),
            option::weighted(0.6, vec(port(), 1..3)),
            any::<bool>(),
        )
            .prop_map(move |(action, peers, ports, named)| TierRule {
                name: if named {
                    format!("r{index}")
                } else {
                    format!("{}[{index}]", if egress { "egress" } else { "ingress" })
                },
                action,
                peers,
                ports,
            })
    }

    fn rules(egress: bool) -> impl Strategy<Value = Vec<TierRule>> {
        (0..3usize).prop_flat_map(move |n| (0..n).map(|i| rule(egress, i)).collect::<Vec<_>>())
    }

    /// Cluster policy `i`: either tier, either API version, priorities 0..3 (ties happen).
    fn policy(i: usize) -> impl Strategy<Value = ClusterPolicy> {
        (
            select(
                &[
                    (Kind::ClusterNetworkPolicy, Tier::Admin),
                    (Kind::ClusterNetworkPolicy, Tier::Baseline),
                    (Kind::AdminNetworkPolicy, Tier::Admin),
                    (Kind::BaselineAdminNetworkPolicy, Tier::Baseline),
                ][..],
            ),
            0..3u32,
            prop_oneof![
                selector().prop_map(Subject::Namespaces),
                (selector(), selector())
                    .prop_map(|(namespaces, pods)| Subject::Pods { namespaces, pods }),
            ],
            rules(false),
            rules(true),
        )
            .prop_map(move |((kind, tier), priority, subject, ingress, egress)| {
                ClusterPolicy {
                    kind,
                    name: format!("cp{}", i % 3),
                    tier,
                    priority,
                    subject,
                    ingress,
                    egress,
                    refused: Vec::new(),
                }
            })
    }

    /// Up to four cluster policies, in evaluation order.
    pub fn cluster_policies() -> impl Strategy<Value = Vec<Arc<ClusterPolicy>>> {
        ((0..4usize).map(policy).collect::<Vec<_>>(), 0..=4usize).prop_map(|(mut ps, n)| {
            ps.truncate(n);
            sort(&mut ps);
            // One object per kind and name.
            ps.dedup_by(|a, b| a.kind == b.kind && a.name == b.name);
            ps.into_iter().map(Arc::new).collect()
        })
    }

    /// This node (`node-a`, the compile options' node address) and `node-b`, a flow peer.
    pub fn nodes() -> impl Strategy<Value = Vec<Arc<NodeInfo>>> {
        (strategies::label_pairs(), strategies::label_pairs()).prop_map(|(a, b)| {
            vec![
                Arc::new(NodeInfo {
                    name: "node-a".into(),
                    labels: labels(&a),
                    addresses: vec!["10.0.9.1".parse().unwrap()],
                }),
                Arc::new(NodeInfo {
                    name: "node-b".into(),
                    labels: labels(&b),
                    addresses: vec!["10.0.9.7".parse().unwrap(), "10.0.2.200".parse().unwrap()],
                }),
            ]
        })
    }
}

/// [`cluster_strategy`] with cluster policies (none now and then) and nodes.
pub(crate) fn tiered_cluster_strategy() -> impl Strategy<Value = Cluster> {
    (
        cluster_strategy(),
        tier_strategies::cluster_policies(),
        tier_strategies::nodes(),
    )
        .prop_map(|(mut c, cluster_policies, nodes)| {
            c.cluster_policies = cluster_policies;
            c.nodes = nodes;
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The compiled lookup (the first entry found decides, allowing or denying) gives every
    /// flow the evaluator's verdict with cluster policies of both tiers around NetworkPolicy,
    /// and names the rule that decided.
    #[test]
    fn compiled_tiers_equal_evaluator(
        cluster in tiered_cluster_strategy(),
        flows in flows_strategy(),
        standalone in any::<bool>(),
    ) {
        let mut o = opts();
        if standalone {
            o.node_name = None;
        }
        check_agreement(&cluster, &o, &flow_peers(), &flows);
    }
}
