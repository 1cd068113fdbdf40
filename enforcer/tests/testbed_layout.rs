//! The netns testbed itself, with no programs attached: pods reach each other and the node over
//! IPv4 and IPv6 (routed layout), on a bridge (bridge layout), and across two nodes joined by an
//! underlay; everything is gone after drop.

use std::{net::IpAddr, time::Duration};

use enforcer_testkit::netns::{Cluster, Layout, NODE_V4, NodeSpec, Proto, Servers, Testbed, probe};

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
