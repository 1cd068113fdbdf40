//! The netns testbed itself: pods reach each other, the node, over IPv4 and IPv6, with no
//! programs attached; and everything is gone after drop.

use std::{net::IpAddr, time::Duration};

use enforcer_testkit::netns::{NODE_V4, Proto, Servers, Testbed, probe};

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
