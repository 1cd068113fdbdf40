//! Reading both API versions, failing closed, and the order of evaluation.

use std::{net::IpAddr, sync::Arc};

use enforcer_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use super::*;
use crate::{model::PodInfo, selector::Labels, tests::fixtures};

fn read(yaml: &str) -> Parsed {
    let v: serde_json::Value = serde_yaml::from_str(yaml).expect("test YAML");
    parse(&v).expect("a cluster policy kind")
}

fn policies(yamls: &[&str]) -> Vec<ClusterPolicy> {
    let mut ps: Vec<ClusterPolicy> = yamls
        .iter()
        .map(|y| {
            let p = read(y);
            assert!(p.policy.refused.is_empty(), "{:?}", p.policy.refused);
            p.policy
        })
        .collect();
    sort(&mut ps);
    ps
}

/// A pod in namespace `ns` (whose labels are its name's, as the API server sets them).
fn pod(ns: &str, name: &str, l: &[(&str, &str)], ip: &str) -> (Arc<PodInfo>, Labels) {
    let p = PodInfo::from(fixtures::pod(
        ns,
        name,
        l,
        &[ip],
        "n1",
        &[("web", "TCP", 8080)],
    ));
    (
        Arc::new(p),
        fixtures::labels(&[("kubernetes.io/metadata.name", ns)]),
    )
}

fn peer<'a>((p, l): &'a (Arc<PodInfo>, Labels)) -> PeerFacts<'a> {
    PeerFacts {
        pod: Some((p, l)),
        node: None,
        addr: p.ips.first().copied(),
    }
}

fn tcp(port: u16, dest: Option<&PodInfo>) -> Service<'_> {
    Service {
        protocol: PROTO_TCP,
        port,
        destination_pod: dest,
    }
}

/// The Admin tier's decision for ingress to `to` from `from`, as `(policy, rule, action)`.
fn admin_ingress(
    ps: &[ClusterPolicy],
    from: &(Arc<PodInfo>, Labels),
    to: &(Arc<PodInfo>, Labels),
    port: u16,
) -> Option<(String, String, Action)> {
    first_match(
        ps,
        Tier::Admin,
        Direction::Ingress,
        (&to.0, &to.1),
        &peer(from),
        &tcp(port, Some(&to.0)),
    )
    .map(|m| (m.policy.name.clone(), m.rule.name.clone(), m.rule.action))
}

const INGRESS_TCP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: ingress-tcp}
spec:
  tier: Admin
  priority: 3
  subject:
    namespaces: {matchLabels: {kubernetes.io/metadata.name: gryffindor}}
  ingress:
  - name: allow-from-ravenclaw-everything
    action: Accept
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ravenclaw}}}]
  - name: deny-from-ravenclaw-everything
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ravenclaw}}}]
  - name: deny-from-slytherin-at-port-80
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: slytherin}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - name: allow-from-hufflepuff-at-named-port
    action: Accept
    from: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: hufflepuff}}, podSelector: {}}}]
    protocols: [{destinationNamedPort: web}]
  - name: deny-from-hufflepuff-everything-else
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: hufflepuff}}}]
"#;

#[test]
fn the_first_matching_rule_in_written_order_decides() {
    let ps = policies(&[INGRESS_TCP]);
    let harry = pod("gryffindor", "harry", &[], "10.0.0.1");
    let luna = pod("ravenclaw", "luna", &[], "10.0.0.2");
    let draco = pod("slytherin", "draco", &[], "10.0.0.3");
    let cedric = pod("hufflepuff", "cedric", &[], "10.0.0.4");
    let accept = |r: &str| Some(("ingress-tcp".to_string(), r.to_string(), Action::Accept));
    let deny = |r: &str| Some(("ingress-tcp".to_string(), r.to_string(), Action::Deny));
    assert_eq!(
        admin_ingress(&ps, &luna, &harry, 80),
        accept("allow-from-ravenclaw-everything")
    );
    assert_eq!(
        admin_ingress(&ps, &draco, &harry, 80),
        deny("deny-from-slytherin-at-port-80")
    );
    assert_eq!(admin_ingress(&ps, &draco, &harry, 8081), None);
    // The named port resolves on the destination pod: harry's `web` is 8080.
    assert_eq!(
        admin_ingress(&ps, &cedric, &harry, 8080),
        accept("allow-from-hufflepuff-at-named-port")
    );
    assert_eq!(
        admin_ingress(&ps, &cedric, &harry, 80),
        deny("deny-from-hufflepuff-everything-else")
    );
    // Not a subject: no rule of the policy applies to traffic to ravenclaw.
    assert_eq!(admin_ingress(&ps, &harry, &luna, 80), None);
}

#[test]
fn lower_priority_values_go_first_and_ties_go_by_name() {
    let deny = |name: &str, prio: u32| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: {prio}\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - {{action: {}, from: [{{namespaces: {{}}}}]}}\n",
            if name.starts_with('a') {
                "Accept"
            } else {
                "Deny"
            }
        )
    };
    let a = pod("x", "a", &[], "10.0.0.1");
    let b = pod("y", "b", &[], "10.0.0.2");
    let ps = policies(&[&deny("deny-early", 5), &deny("accept-late", 6)]);
    assert_eq!(
        admin_ingress(&ps, &a, &b, 80).map(|m| m.0),
        Some("deny-early".into())
    );
    let ps = policies(&[&deny("deny-same", 5), &deny("accept-same", 5)]);
    assert_eq!(
        admin_ingress(&ps, &a, &b, 80).map(|m| m.0),
        Some("accept-same".into())
    );
}

#[test]
fn admin_decides_before_network_policy_and_baseline_only_where_network_policy_does_not_isolate() {
    let ps = policies(&[
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: pass-monitoring}
spec:
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - {name: pass-from-monitoring, action: Pass, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}
  - {name: deny-from-untrusted, action: Deny, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: untrusted}}}]}
  - {name: allow-from-ops, action: Allow, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: ops}}}]}
"#,
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - {name: baseline-deny-all, action: Deny, from: [{namespaces: {}}]}
"#,
    ]);
    let app = pod("shop", "app", &[], "10.0.0.1");
    let judge = |from: &(Arc<PodInfo>, Labels), np: NetworkPolicyOutcome<bool>| {
        let svc = tcp(80, Some(&app.0));
        let admin = first_match(
            &ps,
            Tier::Admin,
            Direction::Ingress,
            (&app.0, &app.1),
            &peer(from),
            &svc,
        );
        let t = combine(
            admin,
            || np,
            || {
                first_match(
                    &ps,
                    Tier::Baseline,
                    Direction::Ingress,
                    (&app.0, &app.1),
                    &peer(from),
                    &svc,
                )
            },
        );
        let allowed = t.allowed(|d| *d);
        let who = match &t {
            Tiered::Admin(m) => format!("admin {}", m.rule.name),
            Tiered::NetworkPolicy { passed, .. } => {
                format!(
                    "networkpolicy (passed by {:?})",
                    passed.map(|m| m.rule.name.as_str())
                )
            }
            Tiered::Baseline { rule, passed } => format!(
                "baseline {} (passed by {:?})",
                rule.rule.name,
                passed.map(|m| m.rule.name.as_str())
            ),
            Tiered::Default { .. } => "default".into(),
        };
        (allowed, who)
    };
    let untrusted = pod("untrusted", "u", &[], "10.0.0.2");
    let ops = pod("ops", "o", &[], "10.0.0.3");
    let monitoring = pod("monitoring", "m", &[], "10.0.0.4");
    // Admin Deny beats a NetworkPolicy that allows; Admin Allow beats one that denies.
    assert_eq!(
        judge(&untrusted, NetworkPolicyOutcome::Decided(true)),
        (false, "admin deny-from-untrusted".into())
    );
    assert_eq!(
        judge(&ops, NetworkPolicyOutcome::Decided(false)),
        (true, "admin allow-from-ops".into())
    );
    // Pass hands the flow to NetworkPolicy, which decides for the pods it isolates...
    assert_eq!(
        judge(&monitoring, NetworkPolicyOutcome::Decided(true)),
        (
            true,
            "networkpolicy (passed by Some(\"pass-from-monitoring\"))".into()
        )
    );
    // ...and to the Baseline tier where no NetworkPolicy isolates the pod.
    assert_eq!(
        judge(&monitoring, NetworkPolicyOutcome::NotIsolated),
        (
            false,
            "baseline baseline-deny-all (passed by Some(\"pass-from-monitoring\"))".into()
        )
    );
}

#[test]
fn egress_peers_match_nodes_by_labels_and_networks_by_address_pods_included() {
    let ps = policies(&[r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guardrails}
spec:
  tier: Admin
  priority: 0
  subject: {pods: {namespaceSelector: {}, podSelector: {}}}
  egress:
  - name: no-metadata-service
    action: Deny
    to: [{networks: ["169.254.169.254/32"]}]
  - name: control-plane-api
    action: Accept
    to: [{nodes: {matchExpressions: [{key: node-role.kubernetes.io/control-plane, operator: Exists}]}}]
    protocols: [{tcp: {destinationPort: {number: 6443}}}]
  - name: no-other-10-8
    action: Deny
    to: [{networks: ["10.0.0.1/8"]}]
    protocols: [{udp: {}}, {tcp: {destinationPort: {range: {start: 1000, end: 2000}}}}]
"#]);
    let app = pod("shop", "app", &[], "10.1.0.1");
    let other = pod("db", "pg", &[], "10.2.0.1");
    let judge = |p: &PeerFacts, svc: &Service| {
        first_match(
            &ps,
            Tier::Admin,
            Direction::Egress,
            (&app.0, &app.1),
            p,
            svc,
        )
        .map(|m| m.rule.name.clone())
    };
    let imds = PeerFacts {
        addr: Some("169.254.169.254".parse::<IpAddr>().unwrap()),
        ..Default::default()
    };
    let icmp = Service {
        protocol: PROTO_ICMP,
        port: 0,
        destination_pod: None,
    };
    assert_eq!(judge(&imds, &icmp), Some("no-metadata-service".into()));
    let cp = fixtures::labels(&[("node-role.kubernetes.io/control-plane", "")]);
    let worker = fixtures::labels(&[("node-role.kubernetes.io/worker", "")]);
    let node = |l| PeerFacts {
        node: Some(l),
        addr: Some("192.168.0.10".parse().unwrap()),
        pod: None,
    };
    assert_eq!(
        judge(&node(&cp), &tcp(6443, None)),
        Some("control-plane-api".into())
    );
    assert_eq!(judge(&node(&worker), &tcp(6443, None)), None);
    assert_eq!(judge(&node(&cp), &tcp(22, None)), None);
    // A network covers pod addresses too (host bits of the written CIDR masked).
    let udp = Service {
        protocol: PROTO_UDP,
        port: 53,
        destination_pod: Some(&other.0),
    };
    assert_eq!(judge(&peer(&other), &udp), Some("no-other-10-8".into()));
    assert_eq!(
        judge(&peer(&other), &tcp(1500, Some(&other.0))),
        Some("no-other-10-8".into())
    );
    assert_eq!(judge(&peer(&other), &tcp(2001, Some(&other.0))), None);
}

#[test]
fn host_network_pods_are_neither_subjects_nor_pod_peers() {
    let ps = policies(&[r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-all}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
"#]);
    let mut host = fixtures::pod("kube-system", "proxy", &[], &["192.168.0.10"], "n1", &[]);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let host = (
        Arc::new(PodInfo::from(host)),
        fixtures::labels(&[("kubernetes.io/metadata.name", "kube-system")]),
    );
    let app = pod("shop", "app", &[], "10.1.0.1");
    let m = |from: &(Arc<PodInfo>, Labels), to: &(Arc<PodInfo>, Labels)| {
        first_match(
            &ps,
            Tier::Baseline,
            Direction::Ingress,
            (&to.0, &to.1),
            &peer(from),
            &tcp(80, Some(&to.0)),
        )
        .is_some()
    };
    assert!(!m(&host, &app));
    assert!(!m(&app, &host));
}

#[test]
fn a_peer_this_version_does_not_know_makes_accept_match_nothing_and_deny_or_pass_deny_everything() {
    let p = read(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: future}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - {name: accept-future, action: Accept, to: [{serviceAccounts: {name: x}}, {namespaces: {matchLabels: {team: a}}}]}
  - {name: pass-future, action: Pass, to: [{serviceAccounts: {name: x}}]}
  - {name: accept-dns-names, action: Accept, to: [{domainNames: ["*.example.com"]}]}
"#,
    );
    assert!(p.policy.refused.is_empty(), "{:?}", p.policy.refused);
    let rules = &p.policy.egress;
    assert_eq!(rules[0].peers[0], PeerSelector::Nothing);
    assert!(matches!(rules[0].peers[1], PeerSelector::Namespaces(_)));
    assert_eq!(
        (rules[1].action, &rules[1].peers[..]),
        (Action::Deny, &[PeerSelector::Everything][..])
    );
    assert_eq!(rules[2].peers[..], [PeerSelector::Nothing]);
    let fields: Vec<&str> = p.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.egress[0].to[0]",
            "spec.egress[1].to[0]",
            "spec.egress[2].to[0]"
        ]
    );
    assert!(p.warnings[0].to_string().starts_with(
        "ClusterNetworkPolicy/future: spec.egress[0].to[0]: unknown peer field serviceAccounts"
    ));
}

#[test]
fn an_object_that_cannot_be_read_is_refused_field_by_field_and_denies_what_it_concerns() {
    let p = read(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: broken}
spec:
  tier: Admin
  priority: 1001
  subject: {namespaces: {matchLabels: {team: a}}}
  egress:
  - action: Allow
    to: [{networks: ["10.0.0.0/33"]}]
    protocols: [{tcp: {destinationPort: {range: {start: 90, end: 80}}}}, {udp: {}, tcp: {}}]
  - action: Deny
    to: [{namespaces: {}, nodes: {}}]
"#,
    );
    let errors: Vec<String> = p
        .policy
        .refused
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    assert_eq!(
        errors,
        [
            "spec.priority: 1001 is not in 0..=1000",
            "spec.egress[0].action: \"Allow\" is not one of Accept, Deny or Pass",
            "spec.egress[0].protocols[0].tcp.destinationPort.range: start 90 must be less than end 80",
            "spec.egress[0].protocols[1]: exactly one of tcp, udp, sctp and destinationNamedPort must be set",
            "spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\" is not a valid CIDR",
            "spec.egress[1].to[0]: exactly one peer field may be set, not namespaces and nodes",
        ]
    );
    // The stand-in: first in the Admin tier, its subject kept, every egress denied, no ingress.
    let ps = vec![p.policy];
    let team_a = (
        Arc::new(PodInfo::from(fixtures::pod(
            "a",
            "p",
            &[],
            &["10.0.0.1"],
            "n1",
            &[],
        ))),
        fixtures::labels(&[("team", "a")]),
    );
    let team_b = (team_a.0.clone(), fixtures::labels(&[("team", "b")]));
    let anywhere = PeerFacts {
        addr: Some("1.1.1.1".parse().unwrap()),
        ..Default::default()
    };
    let m = |s: &(Arc<PodInfo>, Labels), d| {
        first_match(
            &ps,
            Tier::Admin,
            d,
            (&s.0, &s.1),
            &anywhere,
            &tcp(443, None),
        )
        .map(|m| (ps[0].priority, m.rule.action))
    };
    assert_eq!(m(&team_a, Direction::Egress), Some((0, Action::Deny)));
    assert_eq!(m(&team_b, Direction::Egress), None);
    assert_eq!(m(&team_a, Direction::Ingress), None);
}

#[test]
fn v1alpha1_reads_allow_as_accept_ports_with_their_protocols_and_refuses_v1alpha2_fields() {
    let ps = policies(&[r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: dns}
spec:
  priority: 2
  subject: {namespaces: {}}
  egress:
  - name: allow-dns
    action: Allow
    to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
    ports: [{portNumber: {protocol: UDP, port: 53}}, {portRange: {start: 8000, end: 8100}}, {namedPort: web}]
"#]);
    assert_eq!(ps[0].egress[0].action, Action::Accept);
    assert_eq!(
        ps[0].egress[0].ports,
        Some(vec![
            PortSelector::Range {
                protocol: PROTO_UDP,
                start: 53,
                end: 53
            },
            PortSelector::Range {
                protocol: PROTO_TCP,
                start: 8000,
                end: 8100
            },
            PortSelector::Named("web".into()),
        ])
    );
    let p = read(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: not-default}
spec:
  tier: Baseline
  subject: {namespaces: {}}
  ingress: [{action: Pass, from: [{namespaces: {}}], protocols: [{tcp: {}}]}]
"#,
    );
    let fields: Vec<&str> = p.policy.refused.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.tier",
            "metadata.name",
            "spec.ingress[0].action",
            "spec.ingress[0].protocols"
        ]
    );
    assert_eq!(p.policy.tier, Tier::Baseline);
}

#[test]
fn other_kinds_are_not_read_as_cluster_policies() {
    let v = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"}});
    assert!(parse(&v).is_err());
    assert!(is_tier_kind(
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicy"
    ));
    assert!(!is_tier_kind(
        "policy.networking.k8s.io/v1alpha1",
        "ClusterNetworkPolicy"
    ));
}
