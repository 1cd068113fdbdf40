//! The reference evaluator's verdicts with cluster policies: which tier, policy and rule
//! decided, the Admin rule that passed a flow on, and how `explain` words them.

use std::{net::IpAddr, sync::Arc};

use enforcer_common::PROTO_TCP;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;
use crate::{
    compile::CompileOptions,
    evaluator::{
        DirVerdict, Endpoint, Peer, TierRuleRef, direction_verdict, direction_verdict_as_written,
    },
    explain::explain,
    model::{Cluster, NodeInfo, shared},
    state::PodRef,
    tests::fixtures,
};

const A: &str = "10.0.0.1";
const B: &str = "10.0.0.2";
const CONTROL_NODE: &str = "10.1.0.1";
const WORKER_NODE: &str = "10.1.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn cluster_policy(yaml: &str) -> Arc<ClusterPolicy> {
    let v: serde_json::Value = serde_yaml::from_str(yaml).expect("test YAML");
    Arc::new(parse(&v).expect("a cluster policy kind").policy)
}

fn network_policy(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).expect("test NetworkPolicy")
}

/// Pods `x/a` and `y/b` (`app: b`, named port `web` 8080), two nodes, and `policies`.
fn cluster(policies: &[&str], network_policies: &[&str]) -> Cluster {
    let mut ps: Vec<ClusterPolicy> = policies
        .iter()
        .map(|y| (*cluster_policy(y)).clone())
        .collect();
    sort(&mut ps);
    Cluster {
        namespaces: shared([fixtures::namespace("x", &[]), fixtures::namespace("y", &[])]),
        pods: shared([
            fixtures::pod("x", "a", &[("app", "a")], &[A], "control", &[]),
            fixtures::pod(
                "y",
                "b",
                &[("app", "b")],
                &[B],
                "worker",
                &[("web", "TCP", 8080)],
            ),
        ]),
        policies: shared(network_policies.iter().map(|y| network_policy(y))),
        cluster_policies: ps.into_iter().map(Arc::new).collect(),
        nodes: shared([
            NodeInfo {
                name: "control".into(),
                labels: fixtures::labels(&[("role", "control")]),
                addresses: vec![ip(CONTROL_NODE)],
            },
            NodeInfo {
                name: "worker".into(),
                labels: fixtures::labels(&[("role", "worker")]),
                addresses: vec![ip(WORKER_NODE)],
            },
        ]),
        ..Default::default()
    }
}

fn pod_ref(ns: &str, name: &str) -> PodRef {
    PodRef::new(ns.to_string(), name.to_string())
}

/// Ingress at `y/b` from `x/a`, TCP `port`.
fn ingress_at_b(c: &Cluster, port: u16) -> DirVerdict {
    let opts = CompileOptions::default();
    direction_verdict(c, &opts, &pod_ref("y", "b"), true, ip(A), PROTO_TCP, port)
}

/// Egress at `x/a` to `to`, TCP 443.
fn egress_at_a(c: &Cluster, opts: &CompileOptions, to: &str) -> DirVerdict {
    direction_verdict(c, opts, &pod_ref("x", "a"), false, ip(to), PROTO_TCP, 443)
}

fn rule(tier: Tier, policy: &str, rule: &str, index: usize, action: &'static str) -> TierRuleRef {
    TierRuleRef {
        tier,
        policy: policy.into(),
        rule: rule.into(),
        index,
        action,
        refused: Vec::new(),
    }
}

/// Admin, priority 10, ingress to namespace `y`: rule 0 `web` on port 8080 from `x` does
/// `action`; rule 1 `rest` passes everything from `x` on.
fn admin_ingress_to_y(action: &str) -> String {
    format!(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: guard-y}}
spec:
  tier: Admin
  priority: 10
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}}}
  ingress:
  - name: web
    action: {action}
    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}}}]
    protocols: [{{tcp: {{destinationPort: {{number: 8080}}}}}}]
  - name: rest
    action: Pass
    from: [{{namespaces: {{}}}}]
"#
    )
}

/// Baseline: deny ingress to namespace `y` from every pod.
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

/// A NetworkPolicy of `y` isolating `app: b` for ingress, allowing TCP 8080 from `x`.
const NP_B_FROM_X_8080: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: y, name: b-web}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}}]
    ports: [{port: 8080}]
"#;

#[test]
fn an_admin_accept_or_deny_decides_before_network_policy_and_names_its_rule() {
    // The NetworkPolicy allows port 8080 from `x`; the Admin Deny wins.
    let c = cluster(&[&admin_ingress_to_y("Deny")], &[NP_B_FROM_X_8080]);
    assert_eq!(
        ingress_at_b(&c, 8080),
        DirVerdict::TierDenied(rule(
            Tier::Admin,
            "ClusterNetworkPolicy/guard-y",
            "web",
            0,
            "Deny"
        ))
    );
    assert!(!ingress_at_b(&c, 8080).allowed());
    // An Accept allows where the NetworkPolicy (here: one allowing nothing) denies.
    let deny_all = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: y, name: deny-all}
spec: {podSelector: {}}
"#;
    let c = cluster(&[&admin_ingress_to_y("Accept")], &[deny_all]);
    let v = ingress_at_b(&c, 8080);
    assert_eq!(
        v,
        DirVerdict::TierAccepted(rule(
            Tier::Admin,
            "ClusterNetworkPolicy/guard-y",
            "web",
            0,
            "Accept"
        ))
    );
    assert!(v.allowed());
}

#[test]
fn an_admin_pass_leaves_the_decision_to_network_policy_and_records_the_rule() {
    let c = cluster(&[&admin_ingress_to_y("Deny")], &[NP_B_FROM_X_8080]);
    let passed_by = rule(
        Tier::Admin,
        "ClusterNetworkPolicy/guard-y",
        "rest",
        1,
        "Pass",
    );
    // Port 80: passed on, and the NetworkPolicy isolating `b` allows only 8080.
    let v = ingress_at_b(&c, 80);
    assert!(
        matches!(&v, DirVerdict::Passed { by, then }
            if *by == passed_by && matches!(**then, DirVerdict::Denied { ref policies, .. }
                if policies == &["y/b-web"])),
        "{v:?}"
    );
    assert!(!v.allowed());
}

#[test]
fn baseline_decides_only_where_no_network_policy_isolates_the_pod() {
    let baseline = rule(
        Tier::Baseline,
        "BaselineAdminNetworkPolicy/default",
        "default-deny",
        0,
        "Deny",
    );
    let c = cluster(&[BASELINE_DENY_Y], &[]);
    assert_eq!(
        ingress_at_b(&c, 8080),
        DirVerdict::TierDenied(baseline.clone())
    );
    let c = cluster(&[BASELINE_DENY_Y], &[NP_B_FROM_X_8080]);
    assert!(
        matches!(ingress_at_b(&c, 8080), DirVerdict::Allowed { ref policy, index: 0, .. }
            if policy == "b-web")
    );
    // After an Admin Pass, with no NetworkPolicy: the Baseline rule, and who passed.
    let c = cluster(&[&admin_ingress_to_y("Accept"), BASELINE_DENY_Y], &[]);
    assert_eq!(
        ingress_at_b(&c, 80),
        DirVerdict::Passed {
            by: rule(
                Tier::Admin,
                "ClusterNetworkPolicy/guard-y",
                "rest",
                1,
                "Pass"
            ),
            then: Box::new(DirVerdict::TierDenied(baseline)),
        }
    );
}

#[test]
fn a_nodes_peer_matches_a_node_address_by_the_node_labels() {
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
    let c = cluster(&[anp], &[]);
    let opts = CompileOptions::default();
    assert_eq!(
        egress_at_a(&c, &opts, CONTROL_NODE),
        DirVerdict::TierDenied(rule(
            Tier::Admin,
            "AdminNetworkPolicy/no-control-plane",
            "to-control",
            0,
            "Deny"
        ))
    );
    assert_eq!(egress_at_a(&c, &opts, WORKER_NODE), DirVerdict::NotIsolated);
    // The pod's own node too: the tiers judge node traffic, which NetworkPolicy never does.
    let on_control = CompileOptions {
        node_ips: vec![ip(CONTROL_NODE)],
        ..CompileOptions::default()
    };
    assert!(matches!(
        egress_at_a(&c, &on_control, CONTROL_NODE),
        DirVerdict::TierDenied(_)
    ));
    let c = cluster(&[], &[]);
    assert_eq!(egress_at_a(&c, &on_control, CONTROL_NODE), DirVerdict::Host);
}

#[test]
fn traffic_of_a_pod_to_itself_is_judged_by_no_tier() {
    let deny_everything = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-egress}
spec:
  tier: Admin
  priority: 0
  subject: {namespaces: {}}
  egress:
  - {name: all, action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#;
    let c = cluster(&[deny_everything], &[]);
    let opts = CompileOptions::default();
    assert_eq!(egress_at_a(&c, &opts, A), DirVerdict::SelfTraffic);
    assert!(matches!(
        egress_at_a(&c, &opts, B),
        DirVerdict::TierDenied(_)
    ));
}

#[test]
fn audit_policies_report_would_drop_only_where_no_tier_decides() {
    let audit_deny_all = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: y, name: deny-all, annotations: {enforcer.dev/audit: "true"}}
spec: {podSelector: {}}
"#;
    let c = cluster(&[BASELINE_DENY_Y], &[audit_deny_all]);
    assert!(matches!(
        ingress_at_b(&c, 8080),
        DirVerdict::TierDenied(ref r) if r.tier == Tier::Baseline
    ));
    // An Admin Pass on port 80, no Baseline: the default allows, and the audit policy would
    // drop it.
    let c = cluster(&[&admin_ingress_to_y("Accept")], &[audit_deny_all]);
    let v = ingress_at_b(&c, 80);
    assert!(
        matches!(&v, DirVerdict::Passed { then, .. }
            if matches!(**then, DirVerdict::WouldDrop { ref policies } if policies == &["y/deny-all"])),
        "{v:?}"
    );
    assert!(v.allowed());
}

#[test]
fn a_refused_cluster_policy_denies_with_its_errors_named() {
    let refused = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: broken}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {}}
  ingress:
  - {name: r, action: Reject, from: [{namespaces: {}}]}
"#;
    let c = cluster(&[refused], &[]);
    let DirVerdict::TierDenied(r) = ingress_at_b(&c, 8080) else {
        panic!("a refused policy denies");
    };
    assert_eq!(
        (r.policy.as_str(), r.rule.as_str()),
        ("ClusterNetworkPolicy/broken", "refused (ingress)")
    );
    assert!(
        r.refused
            .iter()
            .any(|e| e.field == "spec.ingress[0].action")
    );
    let text = DirVerdict::TierDenied(r).to_string();
    assert!(
        text.contains("refused policy (spec.ingress[0].action"),
        "{text}"
    );
}

#[test]
fn the_as_written_path_applies_the_tiers_to_pods_without_addresses() {
    let mut c = cluster(&[&admin_ingress_to_y("Deny")], &[]);
    c.pods = shared([
        fixtures::pod("x", "a", &[("app", "a")], &[], "control", &[]),
        fixtures::pod("y", "b", &[("app", "b")], &[], "worker", &[]),
    ]);
    let opts = CompileOptions::default();
    let v = direction_verdict_as_written(
        &c,
        &opts,
        &pod_ref("y", "b"),
        true,
        &Peer::Pod(pod_ref("x", "a")),
        PROTO_TCP,
        8080,
    );
    assert!(
        matches!(&v, DirVerdict::TierDenied(r) if r.rule == "web"),
        "{v:?}"
    );
}

#[test]
fn explain_names_the_admin_rule_that_passed_a_flow_before_the_network_policy_decision() {
    let c = cluster(&[&admin_ingress_to_y("Deny")], &[NP_B_FROM_X_8080]);
    let opts = CompileOptions::default();
    let (from, to) = (
        Endpoint::Pod(pod_ref("x", "a")),
        Endpoint::Pod(pod_ref("y", "b")),
    );
    let e = explain(&c, &opts, &from, &to, PROTO_TCP, 80);
    let text = e.to_string();
    assert!(
        text.contains(
            "ingress at y/b: passed by Admin tier ClusterNetworkPolicy/guard-y rule rest [1] \
             (Pass); then denied: isolated by policies [y/b-web]"
        ),
        "{text}"
    );
    assert!(text.contains("verdict: DENIED"), "{text}");
    let e = explain(&c, &opts, &from, &to, PROTO_TCP, 8080);
    let text = e.to_string();
    assert!(
        text.contains(
            "ingress at y/b: denied by Admin tier ClusterNetworkPolicy/guard-y rule web [0] (Deny)"
        ),
        "{text}"
    );
}

#[test]
fn explain_names_the_tier_rule_that_decided_a_flow_to_the_own_node() {
    // `x/a` runs on `control`; an Admin rule passes nodes on, a Baseline rule denies them.
    let admin = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: nodes-later}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: nodes, action: Pass, to: [{nodes: {}}]}]
"#;
    let baseline = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-control}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: control, action: Deny, to: [{nodes: {matchLabels: {role: control}}}]}]
"#;
    let c = cluster(&[admin, baseline], &[]);
    let opts = CompileOptions {
        node_name: Some("control".into()),
        node_ips: vec![ip(CONTROL_NODE)],
        ..CompileOptions::default()
    };
    let from = Endpoint::Pod(pod_ref("x", "a"));
    let e = explain(
        &c,
        &opts,
        &from,
        &Endpoint::Ip(ip(CONTROL_NODE)),
        PROTO_TCP,
        10250,
    );
    let text = e.to_string();
    assert!(
        text.contains(
            "egress  at x/a: passed by Admin tier ClusterNetworkPolicy/nodes-later rule nodes [0] \
             (Pass); then denied by Baseline tier ClusterNetworkPolicy/no-control rule control [0] \
             (Deny)"
        ),
        "{text}"
    );
    assert!(text.contains("verdict: DENIED"), "{text}");
}
