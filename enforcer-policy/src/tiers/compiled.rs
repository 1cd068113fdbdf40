//! Cluster policies compiled: what the datapath's lookup (`decision`) does with the entries of
//! a tier-managed direction, and which rule it names.

use std::{net::IpAddr, sync::Arc};

use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_HOST_JUDGED, PROTO_TCP, PROTO_UDP, RULE_DENY,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;
use crate::{
    compile::{Allocations, CompileOptions, Compiled, compile},
    decision::{Decision, Reason, decide},
    model::{Cluster, NodeInfo, shared},
    state::PodRef,
    tests::fixtures,
};

const A: &str = "10.0.0.1";
const B: &str = "10.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn cluster_policy(yaml: &str) -> ClusterPolicy {
    let v: serde_json::Value = serde_yaml::from_str(yaml).expect("test YAML");
    parse(&v).expect("a cluster policy kind").policy
}

fn network_policy(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).expect("test NetworkPolicy")
}

/// Pods `x/a` and `y/b` (`app: b`), both local, and the policies.
fn cluster(policies: &[&str], network_policies: &[&str]) -> Cluster {
    let mut ps: Vec<ClusterPolicy> = policies.iter().map(|y| cluster_policy(y)).collect();
    sort(&mut ps);
    Cluster {
        namespaces: shared([fixtures::namespace("x", &[]), fixtures::namespace("y", &[])]),
        pods: shared([
            fixtures::pod("x", "a", &[("app", "a")], &[A], "n", &[]),
            fixtures::pod("y", "b", &[("app", "b")], &[B], "n", &[]),
        ]),
        policies: shared(network_policies.iter().map(|y| network_policy(y))),
        cluster_policies: ps.into_iter().map(Arc::new).collect(),
        ..Default::default()
    }
}

fn compiled(c: &Cluster) -> Compiled {
    compile(c, &CompileOptions::default(), &mut Allocations::new())
}

/// The lookup at `ns/name` in `dir` with `peer`, TCP unless `protocol` says otherwise.
fn at(c: &Compiled, pod: (&str, &str), dir: u8, peer: &str, protocol: u8, port: u16) -> Decision {
    decide(
        &c.state,
        &PodRef::new(pod.0, pod.1),
        dir,
        ip(peer),
        protocol,
        port,
    )
}

/// The rule the decision names, as the flow log prints it.
fn named(c: &Compiled, d: &Decision) -> String {
    d.rule
        .and_then(|r| c.state.rules.get(&r))
        .map_or_else(|| "none".to_string(), ToString::to_string)
}

const ADMIN_DENY_X_TO_Y_8080: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard-y}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}
  ingress:
  - name: web
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}]
    protocols: [{tcp: {destinationPort: {number: 8080}}}]
  - name: rest
    action: Pass
    from: [{namespaces: {}}]
"#;

/// Isolates `y/b` for ingress, allowing TCP 80 and 8080 from `x`.
const NP_B_FROM_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: y, name: b-web}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}}]
    ports: [{port: 8080}, {port: 80}]
"#;

const BASELINE_DENY_Y: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}
  ingress:
  - name: default-deny
    action: Deny
    from: [{namespaces: {}}]
"#;

#[test]
fn an_admin_deny_beats_a_network_policy_allow() {
    let c = compiled(&cluster(&[ADMIN_DENY_X_TO_Y_8080], &[NP_B_FROM_X]));
    let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 8080);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(
        named(&c, &d),
        r#"ClusterNetworkPolicy/guard-y ingress[0] "web" (Admin, Deny)"#
    );
    // The entry that decided carries the deny bit.
    assert!(c.state.policy.values().any(|v| v.rule & RULE_DENY != 0));
}

#[test]
fn an_admin_pass_falls_to_network_policy() {
    let c = compiled(&cluster(&[ADMIN_DENY_X_TO_Y_8080], &[NP_B_FROM_X]));
    // Port 80: passed on; the NetworkPolicy allows it, and is named.
    let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 80);
    assert!(d.allowed, "{d:?}");
    assert_eq!(named(&c, &d), "y/b-web ingress[0]");
    // Port 81: passed on; the NetworkPolicy isolates `b` and allows nothing there.
    assert!(!at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 81).allowed);
}

#[test]
fn a_baseline_deny_applies_only_where_no_network_policy_isolates() {
    let c = compiled(&cluster(&[BASELINE_DENY_Y], &[]));
    let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 80);
    assert!(!d.allowed);
    assert_eq!(
        named(&c, &d),
        r#"BaselineAdminNetworkPolicy/default ingress[0] "default-deny" (Baseline, Deny)"#
    );
    // Egress of `b` and everything of `a` are no tier's: as without cluster policies.
    assert!(at(&c, ("y", "b"), DIR_EGRESS, A, PROTO_TCP, 80).allowed);
    assert!(at(&c, ("x", "a"), DIR_INGRESS, B, PROTO_TCP, 80).allowed);
    // A NetworkPolicy isolating `b` decides instead: its allow holds, its isolation denies.
    let c = compiled(&cluster(&[BASELINE_DENY_Y], &[NP_B_FROM_X]));
    let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 80);
    assert!(d.allowed);
    assert_eq!(named(&c, &d), "y/b-web ingress[0]");
    assert!(!at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_UDP, 80).allowed);
}

#[test]
fn one_identity_is_allowed_on_one_port_and_denied_on_a_range() {
    let anp = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: a-ports}
spec:
  priority: 1
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}
  ingress:
  - name: web
    action: Allow
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]
    ports: [{portNumber: {protocol: TCP, port: 1500}}]
  - name: high
    action: Deny
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]
    ports: [{portRange: {protocol: TCP, start: 1000, end: 2000}}]
"#;
    // `b` is isolated by a NetworkPolicy allowing everything but UDP: a default allow would
    // not show the Accept.
    let np = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: y, name: tcp-only}
spec:
  podSelector: {}
  ingress: [{ports: [{protocol: TCP}]}]
"#;
    let c = compiled(&cluster(&[anp], &[np]));
    let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, 1500);
    assert!(d.allowed);
    assert_eq!(
        named(&c, &d),
        r#"AdminNetworkPolicy/a-ports ingress[0] "web" (Admin, Allow)"#
    );
    for port in [1000, 1499, 1501, 2000] {
        let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, port);
        assert!(!d.allowed, "port {port}");
        assert_eq!(
            named(&c, &d),
            r#"AdminNetworkPolicy/a-ports ingress[1] "high" (Admin, Deny)"#
        );
    }
    for port in [999, 2001, 80] {
        let d = at(&c, ("y", "b"), DIR_INGRESS, A, PROTO_TCP, port);
        assert!(d.allowed, "port {port}");
        assert_eq!(named(&c, &d), "y/tcp-only ingress[0]");
    }
    // Another peer (the world) is not denied on the range.
    assert!(at(&c, ("y", "b"), DIR_INGRESS, "192.0.2.1", PROTO_TCP, 1000).allowed);
}

#[test]
fn a_networks_cidr_splits_an_ip_block_region() {
    let np = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: out}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 192.168.0.0/16}}]}]
"#;
    let cnp = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-lab}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: lab
    action: Deny
    to: [{networks: [192.168.7.0/24]}]
"#;
    let c = compiled(&cluster(&[cnp], &[np]));
    let d = at(&c, ("x", "a"), DIR_EGRESS, "192.168.7.7", PROTO_TCP, 443);
    assert!(!d.allowed);
    assert_eq!(
        named(&c, &d),
        r#"ClusterNetworkPolicy/no-lab egress[0] "lab" (Admin, Deny)"#
    );
    let d = at(&c, ("x", "a"), DIR_EGRESS, "192.168.1.1", PROTO_TCP, 443);
    assert!(d.allowed);
    assert_eq!(named(&c, &d), "x/out egress[0]");
    assert!(!at(&c, ("x", "a"), DIR_EGRESS, "192.0.2.1", PROTO_TCP, 443).allowed);
    // Two regions of the ipBlock now: the /24 inside the /16.
    assert_eq!(c.state.cidrs_v4.len(), 2, "{:?}", c.state.cidrs_v4);
}

#[test]
fn a_nodes_peer_matches_the_addresses_of_the_nodes_it_selects() {
    let anp = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: no-control-plane}
spec:
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: to-control
    action: Deny
    to: [{nodes: {matchLabels: {role: control}}}]
"#;
    let mut c = cluster(&[anp], &[]);
    c.nodes = shared([
        NodeInfo {
            name: "control".into(),
            labels: fixtures::labels(&[("role", "control")]),
            addresses: vec![ip("10.1.0.1")],
        },
        NodeInfo {
            name: "worker".into(),
            labels: fixtures::labels(&[("role", "worker")]),
            addresses: vec![ip("10.1.0.2")],
        },
    ]);
    let c = compiled(&c);
    assert!(!at(&c, ("x", "a"), DIR_EGRESS, "10.1.0.1", PROTO_TCP, 6443).allowed);
    assert!(at(&c, ("x", "a"), DIR_EGRESS, "10.1.0.2", PROTO_TCP, 6443).allowed);
    assert!(at(&c, ("x", "a"), DIR_EGRESS, B, PROTO_TCP, 6443).allowed);
}

#[test]
fn without_cluster_policies_the_state_is_unchanged() {
    let plain = cluster(&[], &[NP_B_FROM_X]);
    let mut with_nodes = plain.clone();
    with_nodes.nodes = shared([NodeInfo {
        name: "n".into(),
        labels: fixtures::labels(&[("role", "control")]),
        addresses: vec![ip("10.1.0.1")],
    }]);
    let a = compiled(&plain);
    let b = compiled(&with_nodes);
    assert_eq!(a.state, b.state);
    assert!(
        a.state.policy.values().all(|v| v.rule & RULE_DENY == 0),
        "no deny entry"
    );
    // A cluster policy that selects no pod adds nothing either.
    let elsewhere = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: elsewhere}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: z}}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
"#;
    let c = compiled(&cluster(&[elsewhere], &[NP_B_FROM_X]));
    assert_eq!(c.state, a.state);
}

/// This node: `n` (`role: worker`) at `NODE` and `NODE6`, the compile's node addresses.
const NODE: &str = "10.1.0.9";
const NODE6: &str = "fd00::1:9";

fn on_node(c: &mut Cluster) -> CompileOptions {
    c.nodes = shared([NodeInfo {
        name: "n".into(),
        labels: fixtures::labels(&[("role", "worker")]),
        addresses: vec![ip(NODE), ip(NODE6)],
    }]);
    CompileOptions {
        node_name: Some("n".into()),
        node_ips: vec![ip(NODE), ip(NODE6)],
        ..Default::default()
    }
}

fn host_judged(c: &Compiled, pod: (&str, &str)) -> bool {
    c.state.endpoints[&PodRef::new(pod.0, pod.1)].info.flags & EP_EGRESS_HOST_JUDGED != 0
}

#[test]
fn egress_to_the_own_node_is_denied_by_a_nodes_deny() {
    let anp = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: no-nodes}
spec:
  priority: 1
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  egress:
  - name: workers
    action: Deny
    to: [{nodes: {matchLabels: {role: worker}}}]
"#;
    let mut c = cluster(&[anp], &[]);
    let opts = on_node(&mut c);
    let c = compile(&c, &opts, &mut Allocations::new());
    assert!(host_judged(&c, ("x", "a")));
    for node in [NODE, NODE6] {
        let d = at(&c, ("x", "a"), DIR_EGRESS, node, PROTO_TCP, 10250);
        assert!(!d.allowed, "{node}: {d:?}");
        assert_eq!(
            named(&c, &d),
            r#"AdminNetworkPolicy/no-nodes egress[0] "workers" (Admin, Deny)"#
        );
    }
    // `y/b` is no subject: its egress to the node is not looked up.
    assert!(!host_judged(&c, ("y", "b")));
    assert_eq!(
        at(&c, ("y", "b"), DIR_EGRESS, NODE, PROTO_TCP, 10250).reason,
        Reason::Host
    );
    // The node's traffic in is always let in.
    assert!(at(&c, ("x", "a"), DIR_INGRESS, NODE, PROTO_TCP, 80).allowed);
}

#[test]
fn egress_to_the_own_node_is_denied_by_a_networks_deny() {
    let cnp = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-infra}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: infra
    action: Deny
    to: [{networks: [10.1.0.0/16, "fd00::1:0/112"]}]
    protocols: [{tcp: {destinationPort: {range: {start: 10000, end: 10999}}}}]
"#;
    let mut c = cluster(&[cnp], &[]);
    let opts = on_node(&mut c);
    let c = compile(&c, &opts, &mut Allocations::new());
    assert!(host_judged(&c, ("x", "a")));
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    for node in [NODE, NODE6] {
        let d = at(&c, ("x", "a"), DIR_EGRESS, node, PROTO_TCP, 10250);
        assert!(!d.allowed, "{node}: {d:?}");
        assert_eq!(
            named(&c, &d),
            r#"ClusterNetworkPolicy/no-infra egress[0] "infra" (Admin, Deny)"#
        );
        assert!(at(&c, ("x", "a"), DIR_EGRESS, node, PROTO_TCP, 443).allowed);
    }
}

#[test]
fn egress_to_the_own_node_passed_by_admin_is_judged_by_baseline_not_network_policy() {
    // Admin passes the node on; NetworkPolicy isolates `a`'s egress and allows no node (it
    // never judges the node); the Baseline tier accepts it.
    let admin = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: nodes-later}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - {name: nodes, action: Pass, to: [{nodes: {}}]}
  - {name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#;
    let baseline = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: nodes-ok}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: kubelet
    action: Accept
    to: [{nodes: {matchLabels: {role: worker}}}]
    protocols: [{tcp: {destinationPort: {number: 10250}}}]
  - {name: other, action: Deny, to: [{nodes: {}}]}
"#;
    let np = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: no-egress}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#;
    let mut c = cluster(&[admin, baseline], &[np]);
    let opts = on_node(&mut c);
    let c = compile(&c, &opts, &mut Allocations::new());
    // The node is denied but on the kubelet's port: looked up, NetworkPolicy's isolation
    // left out.
    assert!(host_judged(&c, ("x", "a")));
    for node in [NODE, NODE6] {
        let d = at(&c, ("x", "a"), DIR_EGRESS, node, PROTO_TCP, 10250);
        assert!(d.allowed, "{node}: {d:?}");
        assert_eq!(
            named(&c, &d),
            r#"ClusterNetworkPolicy/nodes-ok egress[0] "kubelet" (Baseline, Accept)"#
        );
        let d = at(&c, ("x", "a"), DIR_EGRESS, node, PROTO_TCP, 22);
        assert!(!d.allowed, "{node}: {d:?}");
        assert_eq!(
            named(&c, &d),
            r#"ClusterNetworkPolicy/nodes-ok egress[1] "other" (Baseline, Deny)"#
        );
    }
    assert!(!at(&c, ("x", "a"), DIR_EGRESS, "192.0.2.1", PROTO_TCP, 80).allowed);
}

#[test]
fn no_host_flag_where_the_tiers_do_not_manage_egress_or_never_deny_the_node() {
    let mut c = cluster(&[ADMIN_DENY_X_TO_Y_8080, BASELINE_DENY_Y], &[NP_B_FROM_X]);
    let opts = on_node(&mut c);
    let out = compile(&c, &opts, &mut Allocations::new());
    // Ingress-only cluster policies: no egress is theirs.
    for pod in [("x", "a"), ("y", "b")] {
        assert!(!host_judged(&out, pod));
        assert_eq!(
            at(&out, pod, DIR_EGRESS, NODE, PROTO_TCP, 10250).reason,
            Reason::Host
        );
    }
    // Egress managed, but nothing denies the node: not looked up either.
    let world_only = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-lab}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - {name: lab, action: Deny, to: [{networks: [192.168.7.0/24]}]}
"#;
    let mut c = cluster(&[world_only], &[]);
    let opts = on_node(&mut c);
    let out = compile(&c, &opts, &mut Allocations::new());
    assert!(!at(&out, ("x", "a"), DIR_EGRESS, "192.168.7.7", PROTO_TCP, 80).allowed);
    assert!(!host_judged(&out, ("x", "a")));
}

#[test]
fn the_own_node_judged_apart_by_family_is_denied_at_both_and_reported() {
    let cnp = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: v4-infra}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - {name: infra, action: Deny, to: [{networks: [10.1.0.0/16]}]}
"#;
    let mut c = cluster(&[cnp], &[]);
    let opts = on_node(&mut c);
    let c = compile(&c, &opts, &mut Allocations::new());
    // One identity for the node: the IPv6 address is denied too, failing closed, and said.
    assert!(!at(&c, ("x", "a"), DIR_EGRESS, NODE, PROTO_TCP, 80).allowed);
    assert!(!at(&c, ("x", "a"), DIR_EGRESS, NODE6, PROTO_TCP, 80).allowed);
    assert!(
        c.errors.iter().any(|e| matches!(
            e,
            crate::compile::CompileError::NodeJudgedApart { pods, .. }
                if pods.contains(&PodRef::new("x", "a"))
        )),
        "{:?}",
        c.errors
    );
}
