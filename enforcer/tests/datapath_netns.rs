//! The programs attached for real, through the loader, to the host-side veths of routed pods in
//! network namespaces (the kindnet/Calico layout of `enforcer_testkit::netns`), with real TCP and UDP
//! traffic between pods. Runs as root. Namespaces, links and the private bpffs are removed even
//! when an assertion fails (RAII guards).

use std::{net::IpAddr, time::Duration};

use enforcer::{
    datapath::{AttachMode, Datapath, DatapathOptions, Hook, link_pin},
    reconcile::MapTable,
};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6, EP_INGRESS_ISOLATED,
    EndpointInfo, IDENTITY_HOST, PROTO_TCP, PROTO_UDP, PeerInfo, PolicyKey, PolicyValue, reason,
};
use enforcer_testkit::netns::{
    BpfMount, NODE_V4, NODE_V6, Proto, Servers, TestPod, Testbed, enter_netns, in_netns, probe_all,
};

const ID_A: u32 = 1000;
const ID_B: u32 = 1001;
const ID_C: u32 = 1002;

fn ifindex_in(netns: &str, name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    in_netns(netns, move || {
        // SAFETY: valid NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })
    .unwrap()
}

fn endpoint(id: u32, identity: u32, flags: u32, pod: &TestPod, masks: [u32; 2]) -> EndpointInfo {
    EndpointInfo {
        id,
        flags: flags | EP_HAS_V4 | if pod.v6.is_some() { EP_HAS_V6 } else { 0 },
        epoch: 1,
        identity,
        port_masks: masks,
        ipv4: pod.v4.octets(),
        ipv6: pod.v6.map_or([0; 16], |a| a.octets()),
    }
}

fn allow(dp: &mut Datapath, ep: u32, id: u32, dir: u8, proto: u8, port: u16, rule: u32) {
    dp.policy
        .set(
            &PolicyKey::new(ep, id, dir, proto, port, 16),
            &PolicyValue { rule, _pad: 0 },
        )
        .unwrap();
}

type Probe = (String, IpAddr, u16, Proto);

fn check(label: &str, probes: &[(Probe, bool)], failures: &mut Vec<String>) {
    let list: Vec<Probe> = probes.iter().map(|(p, _)| p.clone()).collect();
    let got = probe_all(&list, Duration::from_millis(700), 8).unwrap();
    for ((p, want), got) in probes.iter().zip(got) {
        if got != *want {
            failures.push(format!(
                "{label}: {} -> {}:{} {:?}: got {got}, want {want}",
                p.0, p.1, p.2, p.3
            ));
        }
    }
}

/// Runs `f` on a thread inside network namespace `path` (setns moves only that thread).
fn in_node<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(path).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// The names of the tc (cls_bpf) filters on `dev`'s `hook` in namespace `netns`, as `tc` shows
/// them.
fn tc_filters(netns: &str, dev: &str, hook: Hook) -> String {
    let dir = match hook {
        Hook::Ingress => "ingress",
        Hook::Egress | Hook::Exit => "egress",
    };
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "tc", "filter", "show", "dev", dev, dir,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which kinds of hook `dev` (ifindex `ifindex`) has: (TCX links pinned, tc filters present).
fn hooks_of(pin: &std::path::Path, netns: &str, dev: &str, ifindex: u32) -> (bool, bool) {
    let tcx = Hook::ALL
        .iter()
        .all(|&h| link_pin(pin, ifindex, h).exists());
    let tc = tc_filters(netns, dev, Hook::Ingress).contains("from_pod")
        && tc_filters(netns, dev, Hook::Egress).contains("to_pod");
    (tcx, tc)
}

#[test]
#[ignore = "needs root"]
fn enforced_between_routed_veth_pods() {
    enforced_with(AttachMode::Tcx, AttachMode::Tc, "dpn");
}

/// The same with tc (clsact) filters, as on kernels without TCX; the restart moves to TCX links.
#[test]
#[ignore = "needs root"]
fn enforced_with_tc_filters() {
    enforced_with(AttachMode::Tc, AttachMode::Tcx, "dpt");
}

/// Pods a, b, c with policy, attached in `mode`; detaching, a restart that attaches in `then`
/// (every hook moves to the other kind), and cleanup, each checked with real traffic.
fn enforced_with(mode: AttachMode, then: AttachMode, tag: &str) {
    Testbed::cleanup_stale(tag);
    let mount = BpfMount::new(tag);
    let pin = mount.0.join("enforcer");
    let mut tb = Testbed::new(tag).unwrap();
    let a = tb
        .add_pod(
            "a",
            "10.241.0.10".parse().unwrap(),
            Some("fd00:241::10".parse().unwrap()),
        )
        .unwrap();
    let b = tb
        .add_pod(
            "b",
            "10.241.0.11".parse().unwrap(),
            Some("fd00:241::11".parse().unwrap()),
        )
        .unwrap();
    let c = tb
        .add_pod("c", "10.241.0.12".parse().unwrap(), None)
        .unwrap();
    let _sa = Servers::start(&a, &[80], "a").unwrap();
    let _sb = Servers::start(&b, &[80, 81], "b").unwrap();
    let (ia, ib, ic) = (
        ifindex_in(&tb.node, &a.host_if),
        ifindex_in(&tb.node, &b.host_if),
        ifindex_in(&tb.node, &c.host_if),
    );
    assert!(ia > 1 && ib > 1 && ic > 1);

    let opts = DatapathOptions {
        pin_path: pin.clone(),
        max_endpoints: 16,
        attach: mode,
        ..Default::default()
    };
    let mut dp = Datapath::open(opts).expect("loading the programs");

    // Identities.
    let peer = |identity| PeerInfo { identity, flags: 0 };
    for (pod, id) in [(&a, ID_A), (&b, ID_B), (&c, ID_C)] {
        dp.peers_v4.set(&pod.v4, &peer(id)).unwrap();
        if let Some(v6) = pod.v6 {
            dp.peers_v6.set(&v6, &peer(id)).unwrap();
        }
    }
    dp.peers_v4.set(&NODE_V4, &peer(IDENTITY_HOST)).unwrap();
    dp.peers_v6.set(&NODE_V6, &peer(IDENTITY_HOST)).unwrap();
    // a: egress isolated, may reach b on TCP/UDP 80. b: ingress isolated, accepts a on TCP/UDP
    // 80. c: not isolated.
    let ea = endpoint(1, ID_A, EP_EGRESS_ISOLATED, &a, [0, 1 << 16]);
    let eb = endpoint(2, ID_B, EP_INGRESS_ISOLATED, &b, [1 << 16, 0]);
    let ec = endpoint(3, ID_C, 0, &c, [0, 0]);
    for proto in [PROTO_TCP, PROTO_UDP] {
        allow(&mut dp, 1, ID_B, DIR_EGRESS, proto, 80, 1);
        allow(&mut dp, 2, ID_A, DIR_INGRESS, proto, 80, 2);
    }
    dp.endpoints.set(&ia, &ea).unwrap();
    dp.endpoints.set(&ib, &eb).unwrap();
    dp.endpoints.set(&ic, &ec).unwrap();

    // Attach from a thread inside the node namespace (netlink and ifindexes are per namespace).
    let node_path = Testbed::netns_path(&tb.node);
    in_node(&node_path, || {
        for i in [ia, ib, ic] {
            dp.attach(i).unwrap();
        }
    });
    assert_eq!(dp.attached().unwrap(), {
        let mut v = vec![ia, ib, ic];
        v.sort_unstable();
        v
    });
    let want_kind = |m: AttachMode| (m == AttachMode::Tcx, m == AttachMode::Tc);
    for (pod, i) in [(&a, ia), (&b, ib), (&c, ic)] {
        assert_eq!(
            hooks_of(&pin, &tb.node, &pod.host_if, i),
            want_kind(mode),
            "{} hooks after attaching in {mode} mode: (TCX, tc)",
            pod.host_if
        );
    }

    let mut failures = Vec::new();
    let p =
        |from: &TestPod, to: IpAddr, port: u16, proto: Proto| (from.netns.clone(), to, port, proto);
    let b6: IpAddr = b.v6.unwrap().into();
    let a6: IpAddr = a.v6.unwrap().into();
    let mut probes = vec![
        (p(&a, b.v4.into(), 80, Proto::Tcp), true),
        (p(&a, b.v4.into(), 80, Proto::Udp), true),
        (p(&a, b6, 80, Proto::Tcp), true),
        (p(&a, b6, 80, Proto::Udp), true),
        // a's egress allows only port 80.
        (p(&a, b.v4.into(), 81, Proto::Tcp), false),
        (p(&a, b6, 81, Proto::Udp), false),
        // b's ingress does not allow c.
        (p(&c, b.v4.into(), 80, Proto::Tcp), false),
        (p(&c, b.v4.into(), 80, Proto::Udp), false),
        // a's ingress and b's, c's egress are not isolated.
        (p(&b, a.v4.into(), 80, Proto::Tcp), true),
        (p(&b, a6, 80, Proto::Udp), true),
        (p(&c, a.v4.into(), 80, Proto::Tcp), true),
    ];
    check("initial policy", &probes, &mut failures);

    let drops = dp
        .counters
        .get(2, DIR_INGRESS, reason::DROP_POLICY)
        .unwrap()
        .packets;
    let allowed = dp
        .counters
        .get(2, DIR_INGRESS, reason::ALLOW_POLICY)
        .unwrap()
        .packets;
    let replies = dp
        .counters
        .get(1, DIR_INGRESS, reason::ALLOW_REPLY)
        .unwrap()
        .packets;
    let a_drops = dp
        .counters
        .get(1, DIR_EGRESS, reason::DROP_POLICY)
        .unwrap()
        .packets;
    if drops == 0 || allowed == 0 || replies == 0 || a_drops == 0 {
        failures.push(format!(
            "counters: b ingress drops {drops}, b ingress allowed {allowed}, a replies {replies}, a egress drops {a_drops}"
        ));
    }
    if dp.conntrack.count().unwrap() == 0 {
        failures.push("no conntrack entries after allowed flows".into());
    }

    // Policy change: b no longer accepts TCP from a. The epoch bump revokes tracked flows.
    dp.policy
        .remove(&PolicyKey::new(2, ID_A, DIR_INGRESS, PROTO_TCP, 80, 16))
        .unwrap();
    dp.endpoints
        .set(&ib, &EndpointInfo { epoch: 2, ..eb })
        .unwrap();
    probes = vec![
        (p(&a, b.v4.into(), 80, Proto::Tcp), false),
        (p(&a, b6, 80, Proto::Tcp), false),
        (p(&a, b.v4.into(), 80, Proto::Udp), true),
    ];
    check("after revoking tcp", &probes, &mut failures);

    // Detach b: its isolation no longer applies (c reaches it).
    in_node(&node_path, || dp.detach(ib).unwrap());
    if hooks_of(&pin, &tb.node, &b.host_if, ib) != (false, false) {
        failures.push(format!("{} still hooked after detach", b.host_if));
    }
    probes = vec![
        (p(&c, b.v4.into(), 80, Proto::Tcp), true),
        (p(&a, b.v4.into(), 81, Proto::Tcp), false),
    ];
    check("after detaching b", &probes, &mut failures);

    // Restart in the other mode: a new load reuses the pins and moves the remaining hooks to
    // the other kind (the new one first, so no hook is ever empty).
    drop(dp);
    let opts = DatapathOptions {
        pin_path: pin.clone(),
        max_endpoints: 16,
        attach: then,
        ..Default::default()
    };
    let mut dp = Datapath::open(opts).expect("second load");
    let reattached = in_node(&node_path, || dp.reattach_all().unwrap());
    let mut want = vec![ia, ic];
    want.sort_unstable();
    if reattached != want {
        failures.push(format!("reattach_all: {reattached:?}, want {want:?}"));
    }
    for (pod, i) in [(&a, ia), (&c, ic)] {
        let got = hooks_of(&pin, &tb.node, &pod.host_if, i);
        if got != want_kind(then) {
            failures.push(format!(
                "{} hooks after the restart in {then} mode: (TCX, tc) = {got:?}",
                pod.host_if
            ));
        }
    }
    if dp.attached().unwrap() != want {
        failures.push(format!("attached after the restart: {:?}", dp.attached()));
    }
    probes = vec![
        (p(&a, b.v4.into(), 81, Proto::Tcp), false),
        (p(&a, b.v4.into(), 80, Proto::Udp), true),
    ];
    check("after restart", &probes, &mut failures);

    drop(dp);
    in_node(&node_path, || Datapath::cleanup(&pin).unwrap());
    for (pod, i) in [(&a, ia), (&c, ic)] {
        if hooks_of(&pin, &tb.node, &pod.host_if, i) != (false, false) {
            failures.push(format!("{} still hooked after cleanup", pod.host_if));
        }
    }
    check(
        "after cleanup",
        &[(p(&a, b.v4.into(), 81, Proto::Tcp), true)],
        &mut failures,
    );

    let node = tb.node.clone();
    drop(tb);
    drop(mount);
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&node), "node namespace left behind");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
