//! A pod that floods conntrack cannot make another pod's flows drop (the agent binary end to
//! end, standalone mode, routed-veth pods in network namespaces, small conntrack maps).
//!
//! Pod `x` sends 120,000 TCP SYNs (half IPv4, half IPv6) from a raw socket to addresses that
//! never answer, each a flow of its own. Meanwhile pod `v` holds an idle TCP connection (IPv4
//! and IPv6) to server `s`; `v`'s ingress is isolated, so what `s` sends on it passes only as
//! the reply of a tracked flow. After the flood, `s` pushes data on both connections first (the
//! first packet after the idle time is the reply direction's): `v` must receive it, and new
//! connections from `v` must open. `x` holds no more than its per-pod limit, and the rest of
//! its flood is dropped as `flow-limit`.
//!
//! Without the limit (`--ct-max-flows-per-endpoint 0`) the flood fills every conntrack map;
//! whether `v`'s idle flows then survive is up to the kernel LRU's second-chance heuristics
//! (they did in our runs: its entries were looked up more often than the flood's), so this
//! test fails there on the flow-limit count, not on `v`'s traffic. The limit is what makes the
//! outcome certain: `x` never holds more than its share.
//!
//! Needs root and the agent binary (`cargo test --release` builds it).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::mpsc,
    time::Duration,
};

use enforcer_testkit::netns::{
    AgentProcess, Proto, Servers, TestPod, Testbed, enter_netns, in_netns, pod_manifest, probe,
};

const TAG: &str = "ctflood";
const WAIT: Duration = Duration::from_secs(30);
const FLOOD: u32 = 60_000;
const SERVER_PORT: u16 = 9000;

fn write_pod(dir: &Path, pod: &TestPod) {
    std::fs::write(
        dir.join(format!("pod-{}.yaml", pod.name)),
        pod_manifest("x", pod, &[("pod", &pod.name)], &[80, SERVER_PORT]),
    )
    .unwrap();
}

/// Every pod's ingress isolated; `s` takes `v` on the server port. Egress is open, so every
/// flow a pod opens is tracked (its replies come through the isolated ingress).
const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: x
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: v-to-s
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: s
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: v
    ports:
    - protocol: TCP
      port: 9000
    - protocol: TCP
      port: 80
";

/// A connection `v` opened to `s`, from both ends: `s`'s side waits for a word to push.
struct Held {
    client: TcpStream,
    push: mpsc::Sender<()>,
    server: std::thread::JoinHandle<()>,
}

/// `v` connects to `s` at `addr` and exchanges a first message; `s` then waits on the
/// returned sender before it pushes "pushed" unprompted.
fn hold_connection(v: &TestPod, s: &TestPod, addr: IpAddr) -> Held {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (push_tx, push_rx) = mpsc::channel::<()>();
    let path = Testbed::netns_path(&s.netns);
    let bind = SocketAddr::new(
        if addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        },
        SERVER_PORT,
    );
    let server = std::thread::spawn(move || {
        enter_netns(&path).unwrap();
        let l = if bind.is_ipv6() {
            v6_only_listener(bind)
        } else {
            TcpListener::bind(bind).unwrap()
        };
        ready_tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        c.write_all(b"hello").unwrap();
        push_rx.recv().unwrap();
        let _ = c.write_all(b"pushed");
        // Keep the connection until the client has read (or given up).
        let _ = c.read(&mut buf);
    });
    ready_rx.recv_timeout(WAIT).unwrap();
    let client = in_netns(&v.netns, move || {
        let mut c = TcpStream::connect_timeout(&SocketAddr::new(addr, SERVER_PORT), WAIT).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        c
    })
    .unwrap();
    Held {
        client,
        push: push_tx,
        server,
    }
}

/// An IPv6-only listener on `addr`, so that the IPv4 one binds the same port (std sets no
/// `IPV6_V6ONLY` before binding).
fn v6_only_listener(addr: SocketAddr) -> TcpListener {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V6(a) = addr else {
        unreachable!()
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it hands it over.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let sa = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            sin6_port: a.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: a.ip().octets(),
            },
            sin6_scope_id: 0,
        };
        assert_eq!(
            libc::bind(
                fd,
                std::ptr::from_ref(&sa).cast(),
                size_of::<libc::sockaddr_in6>() as u32
            ),
            0
        );
        assert_eq!(libc::listen(fd, 16), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// `s` pushes on the held connection; whether `v` receives it.
fn push_arrives(held: Held) -> bool {
    let Held {
        mut client,
        push,
        server,
    } = held;
    push.send(()).unwrap();
    let mut buf = [0u8; 6];
    let got = client.read_exact(&mut buf).is_ok() && &buf == b"pushed";
    drop(client);
    let _ = server.join();
    got
}

/// `n` TCP SYNs from a raw socket in the calling thread's namespace, each from its own source
/// port to its own address (under 10.250.0.0/16 or fd00:250::/96) that never answers, and each
/// sent twice, as a client's retransmission would: the second is a conntrack hit, which gives
/// the flood's entries the same standing as a pod's live flows in the kernel's LRU (which
/// evicts entries never looked up again first).
fn syn_flood(v6: bool, n: u32) -> u32 {
    let mut tcp = [0u8; 20];
    tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // SAFETY: a raw socket owned by this function; `sendto` reads the header and an address of
    // the length given, both alive across the call.
    unsafe {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let fd = libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_TCP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut sent = 0;
        for i in 0..n {
            tcp[0..2].copy_from_slice(&(1024 + (i % 60_000) as u16).to_be_bytes());
            let mut a6 = [0u8; 16];
            a6[..4].copy_from_slice(&[0xfd, 0x00, 0x02, 0x50]);
            a6[12..].copy_from_slice(&i.to_be_bytes());
            let sa6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a6 },
                sin6_scope_id: 0,
            };
            let sa4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: (u32::from(Ipv4Addr::new(10, 250, 0, 0)) | (i & 0xffff)).to_be(),
                },
                sin_zero: [0; 8],
            };
            let (addr, len): (*const libc::sockaddr, usize) = if v6 {
                ((&raw const sa6).cast(), size_of::<libc::sockaddr_in6>())
            } else {
                ((&raw const sa4).cast(), size_of::<libc::sockaddr_in>())
            };
            for _ in 0..2 {
                if libc::sendto(fd, tcp.as_ptr().cast(), 20, 0, addr, len as u32) == 20 {
                    sent += 1;
                }
            }
        }
        libc::close(fd);
        sent / 2
    }
}

/// The packets dropped for `reason` in the /metrics `text`.
fn dropped(text: &str, reason: &str) -> u64 {
    let want = format!("enforcer_packets_total{{verdict=\"dropped\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root"]
fn a_half_open_flood_from_one_pod_leaves_other_pods_flows_working() {
    Testbed::cleanup_stale(TAG);
    let mut tb = Testbed::new(TAG).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
    )
    .unwrap();
    let mut pods = Vec::new();
    for (i, n) in ["x", "v", "s"].iter().enumerate() {
        let pod = tb
            .add_pod(
                n,
                Ipv4Addr::new(10, 244, 0, 10 + i as u8),
                Some(format!("fd00:244::{}", 10 + i).parse().unwrap()),
            )
            .unwrap();
        write_pod(dir.path(), &pod);
        pods.push(pod);
    }
    let (x, v, s) = (pods[0].clone(), pods[1].clone(), pods[2].clone());
    let _web = Servers::start(&s, &[80], "s").unwrap();
    // The flood's addresses go nowhere, quietly.
    tb.node_exec(&["ip", "route", "add", "blackhole", "10.250.0.0/16"])
        .unwrap();
    tb.node_exec(&["ip", "-6", "route", "add", "blackhole", "fd00:250::/32"])
        .unwrap();
    std::fs::write(dir.path().join("policies.yaml"), POLICIES).unwrap();
    let mut agent =
        AgentProcess::start(&tb, dir.path(), &["--conntrack-map-size", "4096"]).unwrap();
    agent.wait_ready(WAIT).unwrap();

    let held = [
        hold_connection(&v, &s, IpAddr::V4(s.v4)),
        hold_connection(&v, &s, IpAddr::V6(s.v6.unwrap())),
    ];
    let flooded = in_netns(&x.netns, || {
        syn_flood(false, FLOOD) + syn_flood(true, FLOOD)
    })
    .unwrap();
    assert_eq!(flooded, 2 * FLOOD, "every SYN of the flood was sent");
    // Idle a little longer than the flood took, so the LRU has recency to go by.
    std::thread::sleep(Duration::from_millis(500));

    let [held4, held6] = held;
    let pushed4 = push_arrives(held4);
    let pushed6 = push_arrives(held6);
    let new4 = probe(
        &v.netns,
        IpAddr::V4(s.v4),
        80,
        Proto::Tcp,
        Duration::from_secs(2),
    )
    .unwrap();
    let new6 = probe(
        &v.netns,
        IpAddr::V6(s.v6.unwrap()),
        80,
        Proto::Tcp,
        Duration::from_secs(2),
    )
    .unwrap();
    let log = agent.log_text();
    assert!(
        pushed4 && pushed6 && new4 && new6,
        "after the flood: push over IPv4 {pushed4}, IPv6 {pushed6}; new connections IPv4 {new4}, IPv6 {new6}\nagent log:\n{log}"
    );
    // x held at most its limit (2048 by default for 4096-entry maps): the rest was dropped.
    let most = u64::from(2 * FLOOD) - 2048;
    let text = agent.metrics_until(WAIT, |t| dropped(t, "flow-limit") >= most);
    let limited = dropped(&text, "flow-limit");
    assert!(
        limited >= most,
        "{limited} of {} SYNs dropped as flow-limit",
        2 * FLOOD
    );
    agent.stop().unwrap();
}
