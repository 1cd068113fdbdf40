//! Services through kube-proxy: a pod's packet to a ClusterIP (or a node address and node port)
//! is translated to a backend pod by kube-proxy's rules in the node's namespace, after the
//! agent's `from_pod` saw it; policy must judge it on that backend. Each test builds nodes
//! (`Cluster`: one node or two joined by an underlay, routed veths), pods serving TCP and UDP on
//! port 80 (each answer names the pod and the client address it saw), kube-proxy's rules for the
//! test's Services in every node namespace (`KubeProxy`, nftables or iptables-legacy), the
//! matching `kind: Service` manifests in the agents' folder, and one agent per node.
//!
//! Two tests check the harness alone, without an agent: ClusterIPs (IPv4 and IPv6), node ports,
//! two backends, hairpin, a backend on the other node and an update, in both kube-proxy modes;
//! four more, without root, the rules' shape, the Service CIDRs and the manifests. The others
//! need the agent's Service support (issue #23 item 1); each says which assertion fails without
//! it.
//! Needs root; rules, agents, namespaces and folders go away even when an assertion fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use enforcer_testkit::kube_proxy::{
    KubeProxies, Mode, NODE_PORT_MIN, SERVICE_CIDR, SERVICE_CIDR_V6, ServiceSpec, cluster_ip,
    cluster_ip_v6, iptables_restore, nft_script,
};
use enforcer_testkit::netns::{
    AgentProcess, Cluster, NODE_V4, NODE_V6, NodeSpec, Proto, TestPod, Testbed, enter_netns,
    in_netns, pod_manifest_on,
};

/// A denied TCP or UDP exchange gives up after this long.
const T: Duration = Duration::from_millis(600);
const READY: Duration = Duration::from_secs(30);
/// Every pod serves TCP and UDP here, and every Service forwards its port 80 here.
const PORT: u16 = 80;
const NS_LABEL: &str = "kubernetes.io/metadata.name";

/// The agent built with these tests, unless `ENFORCER_BIN` names another.
fn agent_bin() -> PathBuf {
    std::env::var_os("ENFORCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_enforcer").into())
}

// ---------------------------------------------------------------------------------------------
// Servers that say who answered and whom they saw.

/// A pod's TCP and UDP servers on [`PORT`] (dual-stack sockets). TCP: for each line received,
/// the line `<pod> <client address> <the line>` back, on a connection kept open; UDP: the
/// datagram `<pod> <client address> <the datagram>` back. Stopped on drop.
struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    fn start(pod: &TestPod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (path, name, stop, tx) = (
                Testbed::netns_path(&pod.netns),
                pod.name.clone(),
                stop.clone(),
                tx.clone(),
            );
            threads.push(std::thread::spawn(move || {
                enter_netns(&path).unwrap();
                let bind: SocketAddr = (Ipv6Addr::UNSPECIFIED, PORT).into();
                if udp {
                    let s = UdpSocket::bind(bind).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    tx.send(()).unwrap();
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let _ = s.send_to(
                                format!("{name} {} {text}", from.ip().to_canonical()).as_bytes(),
                                from,
                            );
                        }
                    }
                } else {
                    let l = TcpListener::bind(bind).unwrap();
                    l.set_nonblocking(true).unwrap();
                    tx.send(()).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((s, from)) => {
                                let (name, stop) = (name.clone(), stop.clone());
                                std::thread::spawn(move || serve_lines(s, &name, from, &stop));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                }
            }));
        }
        rx.recv().unwrap();
        rx.recv().unwrap();
        Self { stop, threads }
    }
}

fn serve_lines(s: TcpStream, name: &str, from: SocketAddr, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if w.write_all(format!("{name} {} {line}", from.ip().to_canonical()).as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            // A timeout (keep what was read so far) or a partial line.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Who answered a request, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    pod: String,
    client: IpAddr,
    /// Where a UDP answer came from (the address the client sent to, once un-NATed).
    from: Option<SocketAddr>,
}

fn parse_answer(text: &str, from: Option<SocketAddr>) -> Option<Answer> {
    let mut w = text.split_whitespace();
    Some(Answer {
        pod: w.next()?.to_string(),
        client: w.next()?.parse().ok()?,
        from,
    })
}

/// One request from the calling thread's namespace to `to:port`: a TCP connection with one line
/// exchanged, or one UDP datagram and its answer. `None` when nothing came back within [`T`].
fn ask_here(to: IpAddr, port: u16, proto: Proto) -> Option<Answer> {
    let addr = SocketAddr::new(to, port);
    match proto {
        Proto::Tcp => {
            let mut c = Conn::connect(addr)?;
            c.exchange("hello")
        }
        Proto::Udp => {
            let any: IpAddr = if to.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let s = UdpSocket::bind((any, 0)).ok()?;
            s.set_read_timeout(Some(T)).ok()?;
            s.send_to(b"hello", addr).ok()?;
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).ok()?;
            parse_answer(&String::from_utf8_lossy(&buf[..n]), Some(from))
        }
    }
}

fn ask(from: &TestPod, to: IpAddr, port: u16, proto: Proto) -> Option<Answer> {
    in_netns(&from.netns, move || ask_here(to, port, proto)).unwrap()
}

/// A TCP connection kept open (opened in a pod's namespace; the socket stays in it).
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn connect(addr: SocketAddr) -> Option<Self> {
        let s = TcpStream::connect_timeout(&addr, T).ok()?;
        s.set_read_timeout(Some(T)).ok()?;
        Some(Self {
            w: s.try_clone().ok()?,
            r: BufReader::new(s),
        })
    }

    fn open(from: &TestPod, addr: SocketAddr) -> Option<Self> {
        in_netns(&from.netns, move || Self::connect(addr)).unwrap()
    }

    /// Sends `line`, reads the answer, which must carry `line` back whole.
    fn exchange(&mut self, line: &str) -> Option<Answer> {
        self.w.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut got = String::new();
        let deadline = Instant::now() + T.max(Duration::from_secs(2));
        // A long line may take several reads.
        while !got.ends_with('\n') && Instant::now() < deadline {
            // On a timeout, what was read so far stays in `got`.
            match self.r.read_line(&mut got) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) if !got.is_empty() => {}
                Err(_) => return None,
            }
        }
        if !got.trim_end().ends_with(line) {
            return None;
        }
        parse_answer(&got, None)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.w.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// The bed: nodes, pods, Services, kube-proxy, agents.

/// A pod to build: name, namespace, node.
type PodDef = (&'static str, &'static str, usize);

/// A Service to build: name (in the namespace of its first backend), backend pods, a node port
/// for its TCP port, and its family (an IPv6 ClusterIP to the backends' IPv6 addresses).
struct SvcDef {
    name: &'static str,
    backends: &'static [&'static str],
    node_port: Option<u16>,
    v6: bool,
}

fn svc(name: &'static str, backends: &'static [&'static str]) -> SvcDef {
    SvcDef {
        name,
        backends,
        node_port: None,
        v6: false,
    }
}

/// An IPv6 Service (single-stack).
fn svc6(name: &'static str, backends: &'static [&'static str]) -> SvcDef {
    SvcDef {
        v6: true,
        ..svc(name, backends)
    }
}

/// Field order is drop order: agents first, then kube-proxy's rules, the servers, the
/// namespaces and the folder.
struct Bed {
    agents: Vec<AgentProcess>,
    proxies: KubeProxies,
    _servers: Vec<PodServer>,
    cluster: Cluster,
    dir: tempfile::TempDir,
    services: BTreeMap<String, ServiceSpec>,
}

impl Bed {
    /// `nodes` nodes (`node-i` with pod CIDR 10.244.(i+1).0/24), the pods of `pods` (label
    /// `pod: <name>`, plus `svc: <service>` on the backends of a Service with several; dual-stack,
    /// though IPv6 stays on its node), one
    /// Service per `services` entry (TCP and UDP port 80 to the backends' port 80) in kube-proxy's
    /// rules (`mode`) on every node and in the manifests folder, and, if `agents`, one agent per
    /// node, ready.
    fn new(
        tag: &str,
        nodes: usize,
        mode: Mode,
        pods: &[PodDef],
        services: &[SvcDef],
        agents: bool,
    ) -> Self {
        Cluster::cleanup_stale(tag);
        let specs: Vec<NodeSpec> = (0..nodes)
            .map(|i| {
                NodeSpec::routed(
                    &format!("node-{i}"),
                    Ipv4Addr::new(10, 244, 1 + i as u8, 0),
                    24,
                )
            })
            .collect();
        let mut cluster = Cluster::new(tag, &specs).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for ns in ["x", "y"] {
            std::fs::write(
                dir.path().join(format!("ns-{ns}.yaml")),
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    {NS_LABEL}: {ns}\n"
                ),
            )
            .unwrap();
        }
        let mut servers = Vec::new();
        let mut made: BTreeMap<&str, (TestPod, &str)> = BTreeMap::new();
        for (k, &(name, ns, node)) in pods.iter().enumerate() {
            let ip = Ipv4Addr::new(10, 244, 1 + node as u8, 10 + k as u8);
            let v6 = Ipv6Addr::new(0xfd00, 0x244, 1 + node as u16, 0, 0, 0, 0, 10 + k as u16);
            let pod = cluster.add_dual_stack_pod(node, name, ip, v6).unwrap();
            let mut labels = vec![("pod", name)];
            for s in services.iter().filter(|s| s.backends.len() > 1) {
                if s.backends.contains(&name) {
                    labels.push(("svc", s.name));
                }
            }
            std::fs::write(
                dir.path().join(format!("pod-{name}.yaml")),
                pod_manifest_on(Some(&specs[node].name), ns, &pod, &labels, &[PORT]),
            )
            .unwrap();
            servers.push(PodServer::start(&pod));
            made.insert(name, (pod, ns));
        }
        let mut specs_by_name = BTreeMap::new();
        for (k, s) in services.iter().enumerate() {
            let ns = made[s.backends[0]].1;
            let ip: IpAddr = if s.v6 {
                cluster_ip_v6(k as u16 + 10).into()
            } else {
                cluster_ip(k as u16 + 10).into()
            };
            let mut spec = ServiceSpec::new(ns, s.name, ip);
            spec = match s.node_port {
                Some(np) => spec.node_port(Proto::Tcp, PORT, PORT, np),
                None => spec.port(Proto::Tcp, PORT, PORT),
            };
            spec = spec.port(Proto::Udp, PORT, PORT);
            spec = if s.backends.len() > 1 {
                spec.selector("svc", s.name)
            } else {
                spec.selector("pod", s.backends[0])
            };
            for b in s.backends {
                let pod = &made[b].0;
                spec = match (s.v6, pod.v6) {
                    (true, Some(v6)) => spec.backend(v6),
                    _ => spec.backend(pod.v4),
                };
            }
            spec.write_manifest(dir.path()).unwrap();
            specs_by_name.insert(s.name.to_string(), spec);
        }
        let all: Vec<ServiceSpec> = specs_by_name.values().cloned().collect();
        let proxies = cluster.install_kube_proxy(mode, &all).unwrap();
        let agents = if agents {
            cluster
                .start_agents(&agent_bin(), dir.path(), &[], READY)
                .unwrap()
        } else {
            Vec::new()
        };
        Self {
            agents,
            proxies,
            _servers: servers,
            cluster,
            dir,
            services: specs_by_name,
        }
    }

    fn pod(&self, name: &str) -> &TestPod {
        self.cluster.pod(name).expect("a pod of the bed").1
    }

    fn cluster_ip(&self, service: &str) -> IpAddr {
        self.services[service].cluster_ip
    }

    /// `from` asks Service `service` on its port 80.
    fn ask_svc(&self, from: &str, service: &str, proto: Proto) -> Option<Answer> {
        ask(self.pod(from), self.cluster_ip(service), PORT, proto)
    }

    /// Which pod answered `from`'s request to `service` (`None`: nothing came back).
    fn who(&self, from: &str, service: &str, proto: Proto) -> Option<String> {
        self.ask_svc(from, service, proto).map(|a| a.pod)
    }

    /// Writes a policy and waits until every agent has programmed it.
    fn apply(&mut self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
        for a in &mut self.agents {
            a.wait_applied(READY).unwrap();
        }
    }

    /// Packets dropped for `reason`, as node `node`'s agent counts them, once it counts at least
    /// `min` (packet counters are published once a second).
    fn dropped(&self, node: usize, reason: &str, min: u64) -> u64 {
        let text = self.agents[node]
            .metrics_until(Duration::from_secs(3), |t| dropped_in(t, reason) >= min);
        dropped_in(&text, reason)
    }

    /// What to print when an assertion fails: kube-proxy's rules and the agents' logs.
    fn context(&self) -> String {
        let mut s = format!("kube-proxy rules:\n{}", self.proxies.ruleset());
        for (i, a) in self.agents.iter().enumerate() {
            let log = a.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s.push_str(&format!("\n--- agent of node-{i} (tail):\n"));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

fn dropped_in(metrics: &str, reason: &str) -> u64 {
    let key = format!("enforcer_packets_total{{verdict=\"dropped\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A NetworkPolicy in namespace `ns` selecting the pods whose label `pod` is one of `pods`
/// (every pod of the namespace when empty), isolating `types`, with one egress rule to the
/// peers `egress` and one ingress rule from the peers `ingress` (none when empty: the direction
/// allows nothing). Peers are YAML flow mappings; rules have no ports (all ports).
fn policy(
    name: &str,
    ns: &str,
    pods: &[&str],
    types: &[&str],
    egress: &[&str],
    ingress: &[&str],
) -> String {
    let selector = if pods.is_empty() {
        "{}".to_string()
    } else {
        format!(
            "{{matchExpressions: [{{key: pod, operator: In, values: [{}]}}]}}",
            pods.join(", ")
        )
    };
    let mut y = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  podSelector: {selector}\n  policyTypes: [{}]\n",
        types.join(", ")
    );
    for (field, peers_key, peers) in [("egress", "to", egress), ("ingress", "from", ingress)] {
        if !peers.is_empty() {
            y.push_str(&format!("  {field}:\n  - {peers_key}:\n"));
            for p in peers {
                y.push_str(&format!("    - {p}\n"));
            }
        }
    }
    y
}

fn pod_peer(name: &str) -> String {
    format!("podSelector: {{matchLabels: {{pod: {name}}}}}")
}

fn ns_peer(ns: &str) -> String {
    format!("namespaceSelector: {{matchLabels: {{{NS_LABEL}: {ns}}}}}")
}

/// Whether `ip` is one of node `node`'s own addresses (what kube-proxy masquerades to).
fn is_node_address(bed: &Bed, node: usize, ip: IpAddr) -> bool {
    ip == IpAddr::V4(NODE_V4)
        || ip == IpAddr::V6(NODE_V6)
        || Some(ip) == bed.cluster.nodes[node].underlay_v4.map(IpAddr::V4)
}

// ---------------------------------------------------------------------------------------------
// The harness alone, without an agent.

/// kube-proxy's rules in `mode`, with no agent: every kind of Service traffic the tests below
/// rely on is translated and answered, the backend sees what kube-proxy promises, and the rules
/// are gone after drop.
fn kube_proxy_alone(tag: &str, mode: Mode) {
    let netns;
    {
        let bed = Bed::new(
            tag,
            2,
            mode,
            &[("a", "x", 0), ("b", "x", 0), ("c", "x", 1)],
            &[
                svc("s-a", &["a"]),
                SvcDef {
                    node_port: Some(NODE_PORT_MIN + 80),
                    ..svc("s-b", &["b"])
                },
                svc("s-c", &["c"]),
                svc("s-bc", &["b", "c"]),
                svc6("s6-b", &["b"]),
            ],
            false,
        );
        let ctx = || bed.context();
        let a = bed.pod("a").v4;
        // A ClusterIP to a backend on the same node, TCP and UDP: the backend sees the client's
        // own address (kube-proxy masquerades no pod traffic), the UDP answer comes from the
        // ClusterIP (reverse NAT).
        let got = bed.ask_svc("a", "s-b", Proto::Tcp);
        assert_eq!(
            got.as_ref().map(|g| (g.pod.as_str(), g.client)),
            Some(("b", IpAddr::V4(a))),
            "{}",
            ctx()
        );
        let got = bed
            .ask_svc("a", "s-b", Proto::Udp)
            .expect("UDP through s-b");
        assert_eq!((got.pod.as_str(), got.client), ("b", IpAddr::V4(a)));
        assert_eq!(got.from, Some(SocketAddr::new(bed.cluster_ip("s-b"), PORT)));
        // An IPv6 ClusterIP (ip6 table, ip6tables-legacy), same node.
        let a6 = IpAddr::V6(bed.pod("a").v6.unwrap());
        for proto in [Proto::Tcp, Proto::Udp] {
            let got = bed.ask_svc("a", "s6-b", proto);
            assert_eq!(
                got.as_ref().map(|g| (g.pod.as_str(), g.client)),
                Some(("b", a6)),
                "IPv6 {proto:?}\n{}",
                ctx()
            );
        }
        // A backend on the other node, from either node.
        assert_eq!(
            bed.who("a", "s-c", Proto::Tcp).as_deref(),
            Some("c"),
            "{}",
            ctx()
        );
        assert_eq!(bed.who("a", "s-c", Proto::Udp).as_deref(), Some("c"));
        assert_eq!(bed.who("c", "s-b", Proto::Tcp).as_deref(), Some("b"));
        // Hairpin: a pod through its own Service reaches itself, masqueraded to a node address.
        let got = bed.ask_svc("a", "s-a", Proto::Tcp).expect("hairpin");
        assert_eq!(got.pod, "a");
        assert!(
            is_node_address(&bed, 0, got.client),
            "hairpin seen from {}",
            got.client
        );
        // A node port on the node's own addresses (its underlay address and the node address
        // pods route to), masqueraded too; a pod of the other node through this node's address.
        let np = NODE_PORT_MIN + 80;
        let underlay0 = bed.cluster.nodes[0].underlay_v4.unwrap();
        for to in [IpAddr::V4(underlay0), IpAddr::V4(NODE_V4)] {
            let got = ask(bed.pod("a"), to, np, Proto::Tcp).expect("node port");
            assert_eq!(got.pod, "b", "node port on {to}");
            assert!(
                is_node_address(&bed, 0, got.client),
                "node port seen from {}",
                got.client
            );
        }
        assert_eq!(
            ask(bed.pod("c"), IpAddr::V4(underlay0), np, Proto::Tcp).map(|g| g.pod),
            Some("b".to_string()),
            "node port of node-0 from node-1"
        );
        // Two backends: new connections land on both.
        let mut seen = BTreeMap::new();
        for _ in 0..24 {
            if let Some(p) = bed.who("a", "s-bc", Proto::Tcp) {
                *seen.entry(p).or_insert(0) += 1;
            }
        }
        assert_eq!(seen.values().sum::<i32>(), 24, "{seen:?}");
        assert_eq!(seen.len(), 2, "both backends answer: {seen:?}");
        // Not a Service port: nothing translated.
        assert!(ask(bed.pod("a"), bed.cluster_ip("s-b"), PORT + 1, Proto::Tcp).is_none());
        netns = bed.cluster.nodes[0].node.clone();
        // An update (kube-proxy's sync): s-b's backend moves to c, s-bc is gone (its chains
        // with it); new connections follow.
        let mut bed = bed;
        let mut moved: Vec<ServiceSpec> = bed
            .services
            .values()
            .filter(|s| s.name != "s-bc")
            .cloned()
            .collect();
        for s in moved.iter_mut().filter(|s| s.name == "s-b") {
            s.backends = vec![IpAddr::V4(bed.pod("c").v4)];
        }
        bed.proxies.update(&moved).unwrap();
        assert_eq!(
            bed.who("a", "s-b", Proto::Tcp).as_deref(),
            Some("c"),
            "{}",
            bed.context()
        );
        assert_eq!(bed.who("a", "s-bc", Proto::Tcp), None, "s-bc removed");
        let rules = bed.proxies.ruleset();
        assert!(!rules.contains("s-bc"), "s-bc's rules left:\n{rules}");
        // Rules are removed before the namespaces: check with them still there.
        drop(std::mem::take(&mut bed.proxies.0));
        let nft = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "nft", "list", "tables"])
            .output()
            .unwrap();
        let ipt = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "iptables-legacy-save", "-t", "nat"])
            .output()
            .unwrap();
        let (nft, ipt) = (
            String::from_utf8_lossy(&nft.stdout),
            String::from_utf8_lossy(&ipt.stdout),
        );
        assert!(!nft.contains("kube-proxy"), "nft tables left: {nft}");
        assert!(!ipt.contains("KUBE-"), "iptables chains left: {ipt}");
    }
    assert!(
        !std::path::Path::new(&Testbed::netns_path(&netns)).exists(),
        "node namespace left behind"
    );
}

#[test]
#[ignore = "needs root"]
fn kube_proxy_nftables_rules_alone_translate_cluster_ips_node_ports_and_hairpin() {
    kube_proxy_alone("svh", Mode::Nftables);
}

#[test]
#[ignore = "needs root"]
fn kube_proxy_iptables_legacy_rules_alone_translate_cluster_ips_node_ports_and_hairpin() {
    kube_proxy_alone("svhi", Mode::IptablesLegacy);
}

/// The Service CIDR of the tests is apart from every address the testbeds use.
#[test]
fn service_cidr_is_apart_from_pod_node_and_underlay_addresses() {
    let (net, len) = SERVICE_CIDR;
    let inside = |ip: Ipv4Addr| u32::from(ip) >> (32 - len) == u32::from(net) >> (32 - len);
    assert!(inside(cluster_ip(10)));
    let (net6, len6) = SERVICE_CIDR_V6;
    let inside6 = |ip: Ipv6Addr| u128::from(ip) >> (128 - len6) == u128::from(net6) >> (128 - len6);
    assert!(inside6(cluster_ip_v6(10)));
    for ip in [
        NODE_V6,
        "fd00:244:1::10".parse().unwrap(),
        "fd00:241::10".parse().unwrap(),
        "fd00:240::10".parse().unwrap(),
    ] {
        assert!(!inside6(ip), "{ip} is in the IPv6 Service CIDR");
    }
    for ip in [
        NODE_V4,
        Cluster::underlay_address(0),
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv4Addr::new(10, 1, 1, 1),
        Ipv4Addr::new(10, 10, 1, 1),
        Ipv4Addr::new(10, 11, 3, 3),
        Ipv4Addr::new(10, 241, 0, 10),
    ] {
        assert!(!inside(ip), "{ip} is in the Service CIDR");
    }
}

/// The Service manifest the tests write is a Service the API's types read back whole.
#[test]
fn service_manifest_reads_back_as_a_kubernetes_service() {
    let spec = ServiceSpec::new("x", "s-b", cluster_ip(10))
        .node_port(Proto::Tcp, 80, 8080, 30080)
        .port(Proto::Udp, 80, 8080)
        .selector("pod", "b")
        .backend(Ipv4Addr::new(10, 244, 1, 11));
    let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(&spec.manifest()).unwrap();
    let s = svc.spec.unwrap();
    assert_eq!(svc.metadata.namespace.as_deref(), Some("x"));
    assert_eq!(s.type_.as_deref(), Some("NodePort"));
    assert_eq!(s.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(s.cluster_ips, Some(vec!["10.96.0.10".to_string()]));
    assert_eq!(
        s.selector,
        Some([("pod".to_string(), "b".to_string())].into())
    );
    let ports = s.ports.unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(
        (
            ports[0].protocol.as_deref(),
            ports[0].port,
            ports[0].node_port,
            ports[0].target_port.clone()
        ),
        (
            Some("TCP"),
            80,
            Some(30080),
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
        )
    );
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
    assert_ne!(ports[0].name, ports[1].name);
}

// ---------------------------------------------------------------------------------------------
// The rules' shape, as kube-proxy writes them (no root).

/// A Service of two ports (one a node port) and two backends, for the rule shapes.
fn shape_svc() -> ServiceSpec {
    ServiceSpec::new("x", "s-x-a", cluster_ip(257))
        .node_port(Proto::Tcp, 80, 8080, 30080)
        .port(Proto::Udp, 81, 81)
        .selector("pod", "a")
        .backend(Ipv4Addr::new(10, 1, 1, 1))
        .backend(Ipv4Addr::new(10, 1, 1, 2))
}

/// kube-proxy's nftables shape: hooks and priorities, dispatch maps, numgen, marks, DNAT.
#[test]
fn kube_proxy_nftables_rules_have_kube_proxys_hooks_dispatch_and_marks() {
    let s = nft_script("ip", &[shape_svc()]);
    for want in [
        "type nat hook prerouting priority dstnat;",
        "type nat hook output priority -100;",
        "type nat hook postrouting priority srcnat;",
        "meta mark set meta mark or 0x004000",
        "meta mark and 0x004000 == 0 return",
        "masquerade fully-random",
        "10.96.1.1 . tcp . 80 : goto service-",
        "10.96.1.1 . udp . 81 : goto service-",
        "tcp . 30080 : goto external-",
        "numgen random mod 2 vmap { 0 : goto endpoint-",
        "ip saddr 10.1.1.1 jump mark-for-masquerade",
        "meta l4proto tcp dnat to 10.1.1.2:8080",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
    assert!(
        !nft_script("ip6", &[shape_svc()]).contains("10.96.1.1"),
        "an IPv4 Service stays out of the ip6 table"
    );
}

/// kube-proxy's iptables shape: chains, probabilities, marks, DNAT; stale chains deleted.
#[test]
fn kube_proxy_iptables_rules_have_kube_proxys_chains_probabilities_and_marks() {
    let (s, declared) = iptables_restore(false, &[shape_svc()], &BTreeSet::new());
    for want in [
        "-d 10.96.1.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-",
        "-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-",
        "-s 10.1.1.1/32 -j KUBE-MARK-MASQ",
        "-j DNAT --to-destination 10.1.1.2:8080",
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        "--dport 30080 -j KUBE-EXT-",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-j MASQUERADE --random-fully",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
    // Two ports, two endpoints each: 2 SVC, 4 SEP, 1 EXT, and the 4 top chains.
    assert_eq!(declared.len(), 11, "{declared:?}");
    assert!(declared.iter().all(|c| c.len() <= 28), "{declared:?}");
    // A Service gone: its chains are flushed and deleted.
    let (s, now) = iptables_restore(false, &[], &declared);
    assert_eq!(now.len(), 4);
    assert_eq!(s.matches("-X KUBE-").count(), 7, "{s}");
}

// ---------------------------------------------------------------------------------------------
// Enforcement through Services.

/// `a` may send only to `pod: b` and to namespace `y` (`d`): through their ClusterIPs it reaches
/// `b` and `d` (TCP and UDP); through `s-c` (backend `c`, named by neither) it gets nothing, and
/// the agent counts the drop.
///
/// Without the feature the allowed exchanges fail: `from_pod` judges the packet on the ClusterIP,
/// which no rule names. Judging a Service flow without its backend (letting every ClusterIP
/// through) fails the denied ones.
fn egress_rule_naming_pods_through_cluster_ips(tag: &str, mode: Mode) {
    let mut bed = Bed::new(
        tag,
        1,
        mode,
        &[("a", "x", 0), ("b", "x", 0), ("c", "x", 0), ("d", "y", 0)],
        &[svc("s-b", &["b"]), svc("s-c", &["c"]), svc("s-d", &["d"])],
        true,
    );
    assert_eq!(
        bed.who("a", "s-c", Proto::Tcp).as_deref(),
        Some("c"),
        "no policy yet"
    );
    bed.apply(
        "np.yaml",
        &policy(
            "a-egress",
            "x",
            &["a"],
            &["Egress"],
            &[&pod_peer("b"), &ns_peer("y")],
            &[],
        ),
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        assert_eq!(
            bed.who("a", "s-b", proto).as_deref(),
            Some("b"),
            "a -> s-b ({proto:?}): its backend b is named by podSelector\n{}",
            bed.context()
        );
        assert_eq!(
            bed.who("a", "s-d", proto).as_deref(),
            Some("d"),
            "a -> s-d ({proto:?}): its backend is in namespace y"
        );
        assert_eq!(
            bed.who("a", "s-c", proto),
            None,
            "a -> s-c ({proto:?}): its backend c is named by no rule"
        );
    }
    assert!(
        bed.dropped(0, "policy-denied", 1) >= 1,
        "the agent dropped a -> s-c\n{}",
        bed.context()
    );
    assert_eq!(
        bed.who("b", "s-c", Proto::Tcp).as_deref(),
        Some("c"),
        "b is not isolated"
    );
}

#[test]
#[ignore = "needs root"]
fn egress_rule_naming_pods_allows_their_cluster_ip_and_denies_others_with_nftables_rules() {
    egress_rule_naming_pods_through_cluster_ips("sven", Mode::Nftables);
}

#[test]
#[ignore = "needs root"]
fn egress_rule_naming_pods_allows_their_cluster_ip_and_denies_others_with_iptables_legacy_rules() {
    egress_rule_naming_pods_through_cluster_ips("svei", Mode::IptablesLegacy);
}

/// Everything in `x` isolated both ways; `a` may send to `b`, `b` accept from `a`, nothing more:
/// so every reply must pass as the reply of `a`'s flow, in both pods' programs. Through the
/// ClusterIP, a TCP connection carries 64 KiB lines both ways (three exchanges), and `b` sees
/// `a`'s own address; a UDP request gets its answer, from the ClusterIP.
///
/// Without the feature the connection does not open (`a`'s packet to the ClusterIP is denied);
/// a reply judged as a new flow (from the ClusterIP to `a`, or from `b` to `a`) is denied too.
#[test]
#[ignore = "needs root"]
fn replies_come_back_through_a_cluster_ip_for_tcp_both_ways_and_udp() {
    let mut bed = Bed::new(
        "svr",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0)],
        &[svc("s-b", &["b"])],
        true,
    );
    bed.apply(
        "deny.yaml",
        &policy("deny-all", "x", &[], &["Ingress", "Egress"], &[], &[]),
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    bed.apply(
        "np2.yaml",
        &policy(
            "b-from-a",
            "x",
            &["b"],
            &["Ingress"],
            &[],
            &[&pod_peer("a")],
        ),
    );
    let a = IpAddr::V4(bed.pod("a").v4);
    let to = SocketAddr::new(bed.cluster_ip("s-b"), PORT);
    let mut conn =
        Conn::open(bed.pod("a"), to).unwrap_or_else(|| panic!("a -> s-b opens\n{}", bed.context()));
    for k in 0..3 {
        let line: String = (0..65536)
            .map(|i| char::from(b'a' + ((i + k) % 26) as u8))
            .collect();
        let got = conn
            .exchange(&line)
            .unwrap_or_else(|| panic!("exchange {k}: 64 KiB each way\n{}", bed.context()));
        assert_eq!((got.pod.as_str(), got.client), ("b", a), "b saw a itself");
    }
    drop(conn);
    let got = bed
        .ask_svc("a", "s-b", Proto::Udp)
        .unwrap_or_else(|| panic!("UDP a -> s-b answered\n{}", bed.context()));
    assert_eq!((got.pod.as_str(), got.client), ("b", a));
    assert_eq!(got.from, Some(to), "the answer comes from the ClusterIP");
}

/// `s-bc` has two backends, `b` and `c`; `a` may send to `b` only. Of 24 new connections to
/// `s-bc` (each lands on a backend at random), those that land on `b` are answered by `b`, the
/// others get nothing: `c` never answers.
///
/// Without the feature none is answered; judging the flow on its ClusterIP (either way) gives
/// all or none.
#[test]
#[ignore = "needs root"]
fn a_service_with_an_allowed_and_a_denied_backend_is_answered_only_by_the_allowed_one() {
    let mut bed = Bed::new(
        "svt",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0), ("c", "x", 0)],
        &[svc("s-bc", &["b", "c"])],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    let (a, to) = (bed.pod("a").clone(), bed.cluster_ip("s-bc"));
    let answers: Vec<Option<String>> = (0..24)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || ask(&a, to, PORT, Proto::Tcp).map(|g| g.pod))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let count = |who: Option<&str>| answers.iter().filter(|x| x.as_deref() == who).count();
    assert_eq!(count(Some("c")), 0, "c answered: {answers:?}");
    assert!(
        count(Some("b")) > 0,
        "no connection landed on b and got through: {answers:?}\n{}",
        bed.context()
    );
    assert!(
        count(None) > 0,
        "every connection got an answer (none landed on c?): {answers:?}"
    );
    assert_eq!(count(Some("b")) + count(None), 24);
}

/// `a` is isolated both ways with no rule at all (nothing names `a` itself): through its own
/// Service it reaches itself (Kubernetes lets a pod's traffic to itself through; kube-proxy
/// masquerades the hairpin to a node address), while `s-b` stays denied.
///
/// Without the feature the hairpin is denied: `from_pod` judges it on the ClusterIP.
#[test]
#[ignore = "needs root"]
fn hairpin_a_pod_reaches_itself_through_its_own_service() {
    let mut bed = Bed::new(
        "svp",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0)],
        &[svc("s-a", &["a"]), svc("s-b", &["b"])],
        true,
    );
    bed.apply(
        "deny.yaml",
        &policy("deny-a", "x", &["a"], &["Ingress", "Egress"], &[], &[]),
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        let got = bed.ask_svc("a", "s-a", proto);
        assert_eq!(
            got.as_ref().map(|g| g.pod.as_str()),
            Some("a"),
            "a -> s-a ({proto:?}) reaches a\n{}",
            bed.context()
        );
        assert!(is_node_address(&bed, 0, got.unwrap().client), "masqueraded");
        assert_eq!(
            bed.who("a", "s-b", proto),
            None,
            "a -> s-b ({proto:?}) denied"
        );
    }
}

/// `a` may send to `b` only. Through node ports on its node's own addresses (its underlay
/// address, and the node address pods route to) it reaches `s-b`'s backend and not `s-c`'s.
///
/// Without the feature the denied ones pass: traffic to the node is always allowed, and
/// kube-proxy translates it only after `from_pod` let it through as such.
#[test]
#[ignore = "needs root"]
fn a_node_port_is_judged_on_its_backend() {
    let (np_b, np_c) = (NODE_PORT_MIN + 1, NODE_PORT_MIN + 2);
    let mut bed = Bed::new(
        "svn",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0), ("c", "x", 0)],
        &[
            SvcDef {
                node_port: Some(np_b),
                ..svc("s-b", &["b"])
            },
            SvcDef {
                node_port: Some(np_c),
                ..svc("s-c", &["c"])
            },
        ],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    let underlay = IpAddr::V4(bed.cluster.nodes[0].underlay_v4.unwrap());
    for node in [underlay, IpAddr::V4(NODE_V4)] {
        assert_eq!(
            ask(bed.pod("a"), node, np_b, Proto::Tcp)
                .map(|g| g.pod)
                .as_deref(),
            Some("b"),
            "a -> {node}:{np_b} (s-b) allowed\n{}",
            bed.context()
        );
        assert_eq!(
            ask(bed.pod("a"), node, np_c, Proto::Tcp).map(|g| g.pod),
            None,
            "a -> {node}:{np_c} (s-c) denied"
        );
    }
    assert!(
        bed.dropped(0, "policy-denied", 1) >= 1,
        "counted by the agent"
    );
}

/// Two nodes; `a` on node-0 may send to `b` only; `b` and `c` live on node-1. node-0's
/// kube-proxy translates `a`'s packets to node-1's pods, which leave by the underlay: node-0
/// judges them on their backend (`s-b` answered, `s-c` not, TCP and UDP) and counts the drop;
/// node-1, whose pods no policy isolates, drops nothing.
///
/// Without the feature `s-b` is denied on node-0 as well.
#[test]
#[ignore = "needs root"]
fn cross_node_service_backend_is_judged_on_the_senders_node() {
    let mut bed = Bed::new(
        "svx",
        2,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 1), ("c", "x", 1)],
        &[svc("s-b", &["b"]), svc("s-c", &["c"])],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        assert_eq!(
            bed.who("a", "s-b", proto).as_deref(),
            Some("b"),
            "a -> s-b ({proto:?}), backend on node-1\n{}",
            bed.context()
        );
        assert_eq!(
            bed.who("a", "s-c", proto),
            None,
            "a -> s-c ({proto:?}) denied"
        );
    }
    assert!(
        bed.dropped(0, "policy-denied", 1) >= 1,
        "node-0 (the sender's) dropped it"
    );
    assert_eq!(
        bed.dropped(1, "policy-denied", 0),
        0,
        "node-1 never saw a flow to drop"
    );
}

/// `a` may send to `b` only; `s6-b` and `s6-c` are IPv6 Services (single-stack): through
/// `s6-b` it reaches `b` (TCP and UDP, seen from its own IPv6 address), through `s6-c` nothing.
///
/// Without the feature `s6-b` is denied: `from_pod` judges the packet on the IPv6 ClusterIP.
#[test]
#[ignore = "needs root"]
fn an_ipv6_cluster_ip_is_judged_on_its_backend() {
    let mut bed = Bed::new(
        "sv6",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0), ("c", "x", 0)],
        &[svc6("s6-b", &["b"]), svc6("s6-c", &["c"])],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    let a6 = IpAddr::V6(bed.pod("a").v6.unwrap());
    for proto in [Proto::Tcp, Proto::Udp] {
        let got = bed.ask_svc("a", "s6-b", proto);
        assert_eq!(
            got.as_ref().map(|g| (g.pod.as_str(), g.client)),
            Some(("b", a6)),
            "a -> s6-b ({proto:?})\n{}",
            bed.context()
        );
        assert_eq!(
            bed.who("a", "s6-c", proto),
            None,
            "a -> s6-c ({proto:?}) denied"
        );
    }
    assert!(
        bed.dropped(0, "policy-denied", 1) >= 1,
        "counted by the agent"
    );
}

/// `a` may send to `b` only. A Service added while the agent runs (its manifest written, then
/// kube-proxy's rules synced) is judged on its backend like the others: `s-b2` (backend `b`)
/// answers, `s-c2` (backend `c`) does not.
///
/// Without the agent taking up new Services (only those it started with), `s-b2` is denied: its
/// ClusterIP is an address no rule names.
#[test]
#[ignore = "needs root"]
fn a_service_added_while_the_agent_runs_is_judged_on_its_backend() {
    let mut bed = Bed::new(
        "sva",
        1,
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", 0), ("c", "x", 0)],
        &[svc("s-b", &["b"])],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-to-b", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    assert_eq!(bed.who("a", "s-b", Proto::Tcp).as_deref(), Some("b"));
    let mut all: Vec<ServiceSpec> = bed.services.values().cloned().collect();
    for (k, name, backend) in [(100, "s-b2", "b"), (101, "s-c2", "c")] {
        let spec = ServiceSpec::new("x", name, cluster_ip(k))
            .port(Proto::Tcp, PORT, PORT)
            .port(Proto::Udp, PORT, PORT)
            .selector("pod", backend)
            .backend(bed.pod(backend).v4);
        spec.write_manifest(bed.dir.path()).unwrap();
        for agent in &mut bed.agents {
            agent.wait_applied(READY).unwrap();
        }
        bed.services.insert(name.into(), spec.clone());
        all.push(spec);
    }
    bed.proxies.update(&all).unwrap();
    for proto in [Proto::Tcp, Proto::Udp] {
        assert_eq!(
            bed.who("a", "s-b2", proto).as_deref(),
            Some("b"),
            "a -> s-b2 ({proto:?})\n{}",
            bed.context()
        );
        assert_eq!(
            bed.who("a", "s-c2", proto),
            None,
            "a -> s-c2 ({proto:?}) denied"
        );
    }
}

/// `a` may send to `b`; an open connection through `s-b` carries data. The policy changes to
/// allow `c` instead: the connection stops carrying data and no new one opens to `s-b`, while
/// `s-c` now answers. On one node (`same_node`) or with the backends on the other node.
///
/// Without the feature the connection never opens.
fn revocation(tag: &str, same_node: bool) {
    let far = usize::from(!same_node);
    let mut bed = Bed::new(
        tag,
        2 - usize::from(same_node),
        Mode::Nftables,
        &[("a", "x", 0), ("b", "x", far), ("c", "x", far)],
        &[svc("s-b", &["b"]), svc("s-c", &["c"])],
        true,
    );
    bed.apply(
        "np.yaml",
        &policy("a-egress", "x", &["a"], &["Egress"], &[&pod_peer("b")], &[]),
    );
    let to = SocketAddr::new(bed.cluster_ip("s-b"), PORT);
    let mut conn =
        Conn::open(bed.pod("a"), to).unwrap_or_else(|| panic!("a -> s-b opens\n{}", bed.context()));
    assert!(conn.exchange("one").is_some(), "{}", bed.context());
    // An edit that still allows b keeps the connection.
    bed.apply(
        "other.yaml",
        &policy("other", "x", &["c"], &["Ingress"], &[], &[&pod_peer("a")]),
    );
    assert!(
        conn.exchange("two").is_some(),
        "a flow still allowed survives"
    );
    bed.apply(
        "np.yaml",
        &policy("a-egress", "x", &["a"], &["Egress"], &[&pod_peer("c")], &[]),
    );
    assert!(
        conn.exchange("three").is_none(),
        "the revoked connection stops\n{}",
        bed.context()
    );
    assert!(
        Conn::open(bed.pod("a"), to).is_none(),
        "and no new one opens"
    );
    assert_eq!(
        bed.who("a", "s-c", Proto::Tcp).as_deref(),
        Some("c"),
        "s-c is allowed now"
    );
}

#[test]
#[ignore = "needs root"]
fn revoking_the_backend_cuts_an_established_connection_through_a_cluster_ip() {
    revocation("svv", true);
}

#[test]
#[ignore = "needs root"]
fn revoking_a_backend_on_another_node_cuts_an_established_connection_through_a_cluster_ip() {
    revocation("svvx", false);
}

/// Two nodes: `a`, `d` on node-0; `b`, `c`, `e` on node-1. Every client may send to `b` (an
/// egress rule naming it), but `b` accepts only `a` and `e`: through `s-b`, `a` (from the other
/// node) and `e` (same node) are answered, and `b` sees their own addresses; `d` (other node)
/// and `c` (same node) get nothing, dropped by node-1 (the receiver's), not node-0.
///
/// Without the feature no client's packet leaves its veth (`a` and `e` fail); a Service flow
/// whose egress is allowed but that skips the backend's ingress lets `c` and `d` through.
#[test]
#[ignore = "needs root"]
fn ingress_rules_judge_the_real_client_of_traffic_through_a_service() {
    let mut bed = Bed::new(
        "svi",
        2,
        Mode::Nftables,
        &[
            ("a", "x", 0),
            ("d", "x", 0),
            ("b", "x", 1),
            ("c", "x", 1),
            ("e", "x", 1),
        ],
        &[svc("s-b", &["b"])],
        true,
    );
    bed.apply(
        "egress.yaml",
        &policy(
            "clients-to-b",
            "x",
            &["a", "c", "d", "e"],
            &["Egress"],
            &[&pod_peer("b")],
            &[],
        ),
    );
    bed.apply(
        "ingress.yaml",
        &policy(
            "b-from-a-e",
            "x",
            &["b"],
            &["Ingress"],
            &[],
            &[&pod_peer("a"), &pod_peer("e")],
        ),
    );
    for client in ["a", "e"] {
        let got = bed.ask_svc(client, "s-b", Proto::Tcp);
        assert_eq!(
            got.as_ref().map(|g| (g.pod.as_str(), g.client)),
            Some(("b", IpAddr::V4(bed.pod(client).v4))),
            "{client} -> s-b allowed, seen as itself\n{}",
            bed.context()
        );
    }
    for client in ["d", "c"] {
        assert_eq!(
            bed.who(client, "s-b", Proto::Tcp),
            None,
            "{client} -> s-b denied by b's ingress\n{}",
            bed.context()
        );
    }
    assert!(
        bed.dropped(1, "policy-denied", 2) >= 2,
        "node-1 (b's) dropped both"
    );
    assert_eq!(
        bed.dropped(0, "policy-denied", 0),
        0,
        "node-0 let d's packets leave"
    );
}
