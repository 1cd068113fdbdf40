//! The test scaffolding itself. The netns testbed, with no programs attached: pods reach each
//! other and the node over IPv4 and IPv6 (routed layout), on a bridge (bridge layout), and across
//! two nodes joined by an underlay; everything is gone after drop. The synthetic cluster of the
//! scale bench: deterministic, unique addresses, its folder the same objects as its values, and
//! all of it loaded and compiled without a problem.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use enforcer::source::manifests::load_dir;
use enforcer_policy::compile::{Allocations, CompileOptions, compile};
use enforcer_testkit::{
    netns::{Cluster, Layout, NODE_V4, NodeSpec, Proto, Servers, Testbed, probe},
    scale,
};
use serde_json::Value;

fn small_cluster() -> scale::Cluster {
    scale::Cluster::generate(scale::Spec {
        pods: 2_000,
        policies: 300,
        seed: 7,
        dual_stack: true,
    })
}

#[test]
fn scale_cluster_is_the_same_for_a_seed_and_differs_for_another() {
    let a = small_cluster();
    let b = small_cluster();
    assert_eq!(a.pods, b.pods);
    assert_eq!(a.policies, b.policies);
    let c = scale::Cluster::generate(scale::Spec { seed: 8, ..a.spec });
    assert_ne!(a.pods, c.pods);
}

#[test]
fn scale_cluster_addresses_are_unique_and_no_pod_is_on_the_measured_node() {
    let c = small_cluster();
    let v4: BTreeSet<_> = c.pods.iter().map(|p| p.v4).collect();
    let v6: BTreeSet<_> = c.pods.iter().filter_map(|p| p.v6).collect();
    assert_eq!(v4.len(), c.pods.len());
    assert_eq!(v6.len(), c.pods.len());
    assert!(c.pods.iter().all(|p| p.node != scale::MEASURED_NODE));
    assert!(!v4.contains(&c.extra_pod(0).v4));
    let nodes: BTreeSet<_> = c.pods.iter().map(|p| &p.node).collect();
    assert!(
        nodes.len() > scale::NODES * 9 / 10,
        "{} nodes used",
        nodes.len()
    );
}

/// The folder holds the same objects as the values; the agent's loader takes all of them, and
/// the compiler, for the measured node, refuses none and makes every pod a peer.
#[test]
fn scale_cluster_folder_loads_as_its_values_and_compiles_without_problems() {
    let c = small_cluster();
    let dir = tempfile::tempdir().unwrap();
    c.write_dir(dir.path(), 50).unwrap();
    let mut from_yaml: Vec<Value> = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            from_yaml.push(serde::Deserialize::deserialize(doc).unwrap());
        }
    }
    let text = |v: &Value| v.to_string();
    let mut a: Vec<String> = from_yaml.iter().map(text).collect();
    let mut b: Vec<String> = c.objects().map(|v| text(&v)).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    let loaded = load_dir(dir.path()).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let opts = CompileOptions {
        node_name: Some(scale::MEASURED_NODE.into()),
        ..CompileOptions::default()
    };
    let compiled = compile(&loaded.cluster, &opts, &mut Allocations::new());
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    assert!(compiled.refused.is_empty());
    assert!(compiled.state.endpoints.is_empty());
    for p in &c.pods {
        assert!(
            compiled.state.peers_v4.contains_key(&p.v4),
            "{} not a peer",
            p.name
        );
    }
}

#[test]
fn scale_policies_mix_default_deny_namespace_peers_named_ports_and_ip_blocks_with_except() {
    let c = small_cluster();
    let text: String = c.policies.iter().map(Value::to_string).collect();
    for needle in [
        "\"default-deny\"",
        "namespaceSelector",
        "\"port\":\"http\"",
        "\"except\"",
        "\"Egress\"",
    ] {
        assert!(text.contains(needle), "no policy has {needle}");
    }
}

#[test]
#[ignore = "needs root"]
fn routed_veth_pods_reach_each_other_and_clean_up() {
    let node;
    let names;
    {
        let mut tb = Testbed::new("tbl").unwrap();
        let a = tb
            .add_pod(
                "a",
                "10.240.0.10".parse().unwrap(),
                Some("fd00:240::10".parse().unwrap()),
            )
            .unwrap();
        let b = tb
            .add_pod(
                "b",
                "10.240.0.11".parse().unwrap(),
                Some("fd00:240::11".parse().unwrap()),
            )
            .unwrap();
        let _s = Servers::start(&b, &[80], "b").unwrap();
        let t = Duration::from_secs(2);
        for to in b.ips() {
            assert!(
                probe(&a.netns, to, 80, Proto::Tcp, t).unwrap(),
                "tcp a -> {to}"
            );
            assert!(
                probe(&a.netns, to, 80, Proto::Udp, t).unwrap(),
                "udp a -> {to}"
            );
        }
        assert!(
            !probe(&a.netns, b.v4.into(), 81, Proto::Tcp, t).unwrap(),
            "closed port refused"
        );
        // The node address is reachable from a pod (ping-free: a TCP refusal proves routing).
        let _ = probe(&a.netns, IpAddr::V4(NODE_V4), 1, Proto::Tcp, t).unwrap();
        node = tb.node.clone();
        names = vec![a.netns.clone(), b.netns.clone()];
    }
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&node), "node namespace left behind");
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
}

fn netns_list() -> String {
    String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

/// The flannel-like layout: the pods' veths are ports of `cni0`, which holds the gateway; pods
/// reach each other (bridged) and the node, with no route per pod on the node.
#[test]
#[ignore = "needs root"]
fn bridge_layout_pods_reach_each_other_and_clean_up() {
    let prefix;
    {
        let mut tb = Testbed::with_layout(
            "tbb",
            Layout::Bridge {
                gateway: "10.249.0.1".parse().unwrap(),
                prefix_len: 24,
            },
        )
        .unwrap();
        let a = tb
            .add_pod("a", "10.249.0.10".parse().unwrap(), None)
            .unwrap();
        let b = tb
            .add_pod("b", "10.249.0.11".parse().unwrap(), None)
            .unwrap();
        assert!(
            tb.add_pod("c", "10.1.0.1".parse().unwrap(), None).is_err(),
            "an address outside the bridge's CIDR is refused"
        );
        let _s = Servers::start(&b, &[80], "b").unwrap();
        let t = Duration::from_secs(2);
        assert!(probe(&a.netns, b.v4.into(), 80, Proto::Tcp, t).unwrap());
        assert!(probe(&a.netns, b.v4.into(), 80, Proto::Udp, t).unwrap());
        // The gateway is the node: a TCP refusal proves it answers.
        let _ = probe(&a.netns, "10.249.0.1".parse().unwrap(), 1, Proto::Tcp, t).unwrap();
        prefix = tb.prefix.clone();
    }
    assert!(!netns_list().contains(&prefix), "namespaces left behind");
}

/// Two nodes joined by the underlay, one routed and one bridged: each routes the other's pod
/// CIDR via its underlay address, so pods reach pods of the other node, both ways.
#[test]
#[ignore = "needs root"]
fn two_nodes_reach_each_others_pods_over_the_underlay_and_clean_up() {
    let prefix;
    {
        let mut c = Cluster::new(
            "tbc",
            &[
                NodeSpec::routed("node-0", "10.248.1.0".parse().unwrap(), 24),
                NodeSpec::bridged("node-1", "10.248.2.0".parse().unwrap(), 24),
            ],
        )
        .unwrap();
        let a = c.add_pod(0, "a", "10.248.1.10".parse().unwrap()).unwrap();
        let b = c.add_pod(1, "b", "10.248.2.10".parse().unwrap()).unwrap();
        assert_eq!(c.nodes[1].node_name.as_deref(), Some("node-1"));
        assert_ne!(c.nodes[0].health_port, c.nodes[1].health_port);
        let _sa = Servers::start(&a, &[80], "a").unwrap();
        let _sb = Servers::start(&b, &[80], "b").unwrap();
        let t = Duration::from_secs(2);
        for (from, to) in [(&a, &b), (&b, &a)] {
            assert!(
                probe(&from.netns, to.v4.into(), 80, Proto::Tcp, t).unwrap(),
                "{} -> {}",
                from.name,
                to.name
            );
        }
        prefix = c.prefix.clone();
    }
    assert!(!netns_list().contains(&prefix), "namespaces left behind");
}
