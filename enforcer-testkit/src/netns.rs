//! Nodes and their pods built from network namespaces. A node ([`Testbed`]) is an `ip netns`
//! holding the host side of its pods' veths, their routes and a node address; each pod is an
//! `ip netns` whose `eth0` holds its address. Two pod-network layouts ([`Layout`]):
//!
//! - **routed** (kindnet's ptp plugin, Calico): the pod's `eth0` holds its /32 (/128) address
//!   and a default route via a link-local gateway; the node has a /32 (/128) route to the pod
//!   through the host end of its veth, proxy ARP and forwarding on;
//! - **bridge** (flannel's `cni0`, kubenet's `cbr0`): the host ends of the veths are ports of a
//!   bridge `cni0` that holds the pod CIDR's gateway address; the pod's `eth0` holds its address
//!   in that CIDR with a default route via the gateway; the node has no route per pod, only the
//!   CIDR's on the bridge.
//!
//! A [`Cluster`] is several nodes joined by an underlay: a bridge in a namespace of its own, one
//! veth from each node (`ul0`, with the node's underlay address), and on every node a route to
//! each other node's pod CIDR via that node's underlay address, as kindnet lays them out. Each
//! node has its own name, health port and pin folder for its agent ([`AgentProcess::start`]).
//!
//! The agent runs inside the node namespace, so the machine's own network is never touched and
//! cleanup is deleting namespaces. Used by the end-to-end tests, the demo and the benchmarks.

use std::{
    io::{BufRead as _, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
pub use enforcer::cli::status::http_get;

/// The node's own address: pods reach it through their default route.
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 250, 255, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfa, 0, 0, 0, 0, 0xffff, 1);
const GATEWAY_V4: &str = "169.254.1.1";
const GATEWAY_V6: &str = "fe80::1";

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// The ifindex of the interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One pod: a network namespace and its veth.
#[derive(Clone, Debug)]
pub struct TestPod {
    /// Name as given to [`Testbed::add_pod`].
    pub name: String,
    /// `ip netns` name.
    pub netns: String,
    /// Host-side veth name, inside the node namespace.
    pub host_if: String,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

impl TestPod {
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.v4)];
        v.extend(self.v6.map(IpAddr::V6));
        v
    }
}

/// How a node lays out its pods' network (see the top of this module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One routed veth per pod with a /32 (/128) route to it: kindnet (ptp), Calico.
    Routed,
    /// The pods' veths are ports of the bridge [`BRIDGE`], which holds `gateway/prefix_len`:
    /// flannel, kubenet. IPv4 only.
    Bridge { gateway: Ipv4Addr, prefix_len: u8 },
}

/// The bridge of the bridge layout, in the node namespace.
pub const BRIDGE: &str = "cni0";
/// A cluster node's underlay interface, in the node namespace.
pub const UPLINK: &str = "ul0";
/// Health port of the first node's agent; node `i` of a cluster gets `HEALTH_PORT + i`.
pub const HEALTH_PORT: u16 = 9901;

/// A node namespace with pods. Dropping it deletes every namespace it made (and with them the
/// veths), also when a test panics.
pub struct Testbed {
    /// Prefix of every namespace name, unique per testbed.
    pub prefix: String,
    /// The node namespace (`ip netns` name).
    pub node: String,
    pub pods: Vec<TestPod>,
    pub layout: Layout,
    /// The node's name in a [`Cluster`] (its agent's `--node-name`, the pods' `spec.nodeName`);
    /// `None` for a lone node, whose agent takes every pod as local.
    pub node_name: Option<String>,
    /// Where this node's agent serves `/healthz`, `/readyz`, `/metrics` (on 127.0.0.1 of the node
    /// namespace).
    pub health_port: u16,
    /// The node's address on the underlay of a [`Cluster`].
    pub underlay_v4: Option<Ipv4Addr>,
    next_if: u32,
}

impl Testbed {
    /// Creates a node namespace in the routed layout. `tag` should be short (namespace names are
    /// `<tag>-<pid>-..`).
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_layout(tag, Layout::Routed)
    }

    /// Creates a node namespace in `layout`.
    pub fn with_layout(tag: &str, layout: Layout) -> Result<Self> {
        Self::create(format!("{tag}-{}", std::process::id()), layout)
    }

    fn create(prefix: String, layout: Layout) -> Result<Self> {
        let node = format!("{prefix}-node");
        let _ = ip(&["netns", "del", &node]);
        ip(&["netns", "add", &node]).context("creating the node namespace")?;
        let tb = Self {
            prefix,
            node,
            pods: Vec::new(),
            layout,
            node_name: None,
            health_port: HEALTH_PORT,
            underlay_v4: None,
            next_if: 0,
        };
        tb.node_exec(&["ip", "link", "set", "lo", "up"])?;
        // The node address sits on lo (no dummy module needed); pods reach it by their route.
        tb.node_exec(&["ip", "addr", "add", &format!("{NODE_V4}/32"), "dev", "lo"])?;
        // Pods' default gateway: a node-local address, so the node answers their ARP for it.
        tb.node_exec(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY_V4}/32"),
            "dev",
            "lo",
        ])?;
        tb.node_exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{NODE_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            tb.node_exec(&["sysctl", "-qw", &format!("{k}={v}")])?;
        }
        if let Layout::Bridge {
            gateway,
            prefix_len,
        } = layout
        {
            tb.node_exec(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
            tb.node_exec(&[
                "ip",
                "addr",
                "add",
                &format!("{gateway}/{prefix_len}"),
                "dev",
                BRIDGE,
            ])?;
            tb.node_exec(&["ip", "link", "set", BRIDGE, "up"])?;
        }
        Ok(tb)
    }

    /// Runs a command in the node namespace.
    pub fn node_exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", self.node.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Adds a pod with `v4` (and `v6`, routed layout only) in the node's layout.
    pub fn add_pod(&mut self, name: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> Result<TestPod> {
        let netns = format!("{}-{}", self.prefix, name);
        let host_if = format!("veth{}", self.next_if);
        self.next_if += 1;
        if let Layout::Bridge {
            gateway,
            prefix_len,
        } = self.layout
        {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            if u32::from(v4) & mask != u32::from(gateway) & mask || v6.is_some() {
                bail!(
                    "pod {name}: the bridge layout takes an IPv4 address in {gateway}/{prefix_len}, no IPv6"
                );
            }
        }
        let _ = ip(&["netns", "del", &netns]);
        ip(&["netns", "add", &netns]).with_context(|| format!("creating pod namespace {netns}"))?;
        let pod = TestPod {
            name: name.to_string(),
            netns: netns.clone(),
            host_if: host_if.clone(),
            v4,
            v6,
        };
        // Register now, so Drop cleans up even if the rest fails.
        self.pods.push(pod.clone());
        let pexec = |args: &[&str]| -> Result<()> {
            let mut full = vec!["netns", "exec", netns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        // Create the pair in the node namespace, then move the pod end.
        self.node_exec(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        pexec(&["ip", "link", "set", "lo", "up"])?;
        pexec(&["ip", "link", "set", "eth0", "up"])?;
        if let Layout::Bridge {
            gateway,
            prefix_len,
        } = self.layout
        {
            pexec(&[
                "ip",
                "addr",
                "add",
                &format!("{v4}/{prefix_len}"),
                "dev",
                "eth0",
            ])?;
            pexec(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
                "dev",
                "eth0",
            ])?;
            self.node_exec(&["ip", "link", "set", &host_if, "master", BRIDGE, "up"])?;
            return Ok(pod);
        }
        pexec(&["ip", "addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        pexec(&[
            "ip", "route", "add", GATEWAY_V4, "dev", "eth0", "scope", "link",
        ])?;
        pexec(&[
            "ip", "route", "add", "default", "via", GATEWAY_V4, "dev", "eth0",
        ])?;
        self.node_exec(&["ip", "link", "set", &host_if, "up"])?;
        self.node_exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
        ])?;
        self.node_exec(&["ip", "route", "add", &format!("{v4}/32"), "dev", &host_if])?;
        if let Some(v6) = v6 {
            pexec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            pexec(&[
                "ip", "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", "eth0",
            ])?;
            self.node_exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{GATEWAY_V6}/64"),
                "dev",
                &host_if,
                "nodad",
            ])?;
            self.node_exec(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &host_if,
            ])?;
        }
        Ok(pod)
    }

    pub fn pod(&self, name: &str) -> Option<&TestPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Path of a namespace, for `setns`/`nsenter --net=`.
    pub fn netns_path(netns: &str) -> String {
        format!("/run/netns/{netns}")
    }

    /// Deletes every namespace of this testbed.
    pub fn cleanup(&mut self) {
        for p in self.pods.drain(..) {
            let _ = ip(&["netns", "del", &p.netns]);
        }
        let _ = ip(&["netns", "del", &self.node]);
    }

    /// Deletes namespaces left by earlier testbeds (and clusters) with `tag` whose process is
    /// gone.
    pub fn cleanup_stale(tag: &str) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix(&format!("{tag}-")) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if pid
                .parse::<u32>()
                .is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A node of a [`Cluster`] to build.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node's name (`spec.nodeName`, its agent's `--node-name`).
    pub name: String,
    /// The node's pod CIDR: the other nodes route it to this node's underlay address.
    pub pod_cidr: (Ipv4Addr, u8),
    /// Its pods on the bridge `cni0` (holding the CIDR's first address) rather than routed.
    pub bridge: bool,
}

impl NodeSpec {
    pub fn routed(name: &str, cidr: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            name: name.into(),
            pod_cidr: (cidr, prefix_len),
            bridge: false,
        }
    }

    pub fn bridged(name: &str, cidr: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            bridge: true,
            ..Self::routed(name, cidr, prefix_len)
        }
    }

    /// The layout of the node; a bridge holds the CIDR's first address.
    pub fn layout(&self) -> Layout {
        let (cidr, len) = self.pod_cidr;
        if self.bridge {
            Layout::Bridge {
                gateway: Ipv4Addr::from(u32::from(cidr) + 1),
                prefix_len: len,
            }
        } else {
            Layout::Routed
        }
    }
}

/// Several nodes joined by an underlay (see the top of this module). Dropping it deletes every
/// namespace of every node and the underlay's, also when a test panics.
pub struct Cluster {
    pub prefix: String,
    /// The namespace of the underlay bridge.
    pub underlay: String,
    pub nodes: Vec<Testbed>,
    pub specs: Vec<NodeSpec>,
}

impl Cluster {
    /// Node `i`'s address on the underlay (192.168.255.0/24).
    pub fn underlay_address(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 255, 1 + i as u8)
    }

    /// Builds the nodes of `specs`, the underlay and the routes between them.
    pub fn new(tag: &str, specs: &[NodeSpec]) -> Result<Self> {
        let prefix = format!("{tag}-{}", std::process::id());
        let underlay = format!("{prefix}-ul");
        let _ = ip(&["netns", "del", &underlay]);
        ip(&["netns", "add", &underlay]).context("creating the underlay namespace")?;
        let mut cluster = Self {
            prefix: prefix.clone(),
            underlay: underlay.clone(),
            nodes: Vec::new(),
            specs: specs.to_vec(),
        };
        let uexec = |args: &[&str]| -> Result<()> {
            let mut full = vec!["netns", "exec", underlay.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        uexec(&["ip", "link", "set", "lo", "up"])?;
        uexec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        uexec(&["ip", "link", "set", "br0", "up"])?;
        for (i, spec) in specs.iter().enumerate() {
            let mut tb = Testbed::create(format!("{prefix}-n{i}"), spec.layout())?;
            tb.node_name = Some(spec.name.clone());
            // Steps of 10 keep clear of the attestation endpoint's port (9902) in the node.
            tb.health_port = HEALTH_PORT + 10 * i as u16;
            let addr = Self::underlay_address(i);
            tb.underlay_v4 = Some(addr);
            cluster.nodes.push(tb);
            let tb = &cluster.nodes[i];
            let port = format!("n{i}");
            tb.node_exec(&[
                "ip", "link", "add", UPLINK, "type", "veth", "peer", "name", &port, "netns",
                &underlay,
            ])?;
            tb.node_exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", UPLINK])?;
            tb.node_exec(&["ip", "link", "set", UPLINK, "up"])?;
            uexec(&["ip", "link", "set", &port, "master", "br0", "up"])?;
        }
        for (i, tb) in cluster.nodes.iter().enumerate() {
            for (j, other) in specs.iter().enumerate() {
                if i == j {
                    continue;
                }
                let (cidr, len) = other.pod_cidr;
                tb.node_exec(&[
                    "ip",
                    "route",
                    "add",
                    &format!("{cidr}/{len}"),
                    "via",
                    &Self::underlay_address(j).to_string(),
                    "dev",
                    UPLINK,
                ])?;
            }
        }
        Ok(cluster)
    }

    /// Adds a pod on node `node`, at `v4` (which should be in the node's pod CIDR).
    pub fn add_pod(&mut self, node: usize, name: &str, v4: Ipv4Addr) -> Result<TestPod> {
        self.nodes
            .get_mut(node)
            .with_context(|| format!("no node {node}"))?
            .add_pod(name, v4, None)
    }

    /// [`Cluster::add_pod`] with an IPv6 address too (a routed node only). IPv6 stays on its
    /// node: the underlay routes IPv4 only.
    pub fn add_dual_stack_pod(
        &mut self,
        node: usize,
        name: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<TestPod> {
        self.nodes
            .get_mut(node)
            .with_context(|| format!("no node {node}"))?
            .add_pod(name, v4, Some(v6))
    }

    /// The node index and pod named `name`.
    pub fn pod(&self, name: &str) -> Option<(usize, &TestPod)> {
        self.nodes
            .iter()
            .enumerate()
            .find_map(|(i, n)| n.pod(name).map(|p| (i, p)))
    }

    /// Starts one agent (`bin`) per node, all reading `manifests`, each with its node's name,
    /// health port and pin folder, and waits until each is ready.
    pub fn start_agents(
        &self,
        bin: &std::path::Path,
        manifests: &std::path::Path,
        extra: &[&str],
        ready: Duration,
    ) -> Result<Vec<AgentProcess>> {
        let mut agents = self
            .nodes
            .iter()
            .map(|tb| AgentProcess::start_binary(bin, tb, manifests, extra))
            .collect::<Result<Vec<_>>>()?;
        for a in &mut agents {
            a.wait_ready(ready)?;
        }
        Ok(agents)
    }

    /// Deletes namespaces left by earlier clusters with `tag` whose process is gone.
    pub fn cleanup_stale(tag: &str) {
        Testbed::cleanup_stale(tag);
    }

    /// Deletes every namespace of the cluster.
    pub fn cleanup(&mut self) {
        for mut n in self.nodes.drain(..) {
            n.cleanup();
        }
        let _ = ip(&["netns", "del", &self.underlay]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Runs `f` on a new thread that has entered network namespace `netns` (only that thread moves:
/// `setns` acts on the calling thread).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = Testbed::netns_path(netns);
    let handle = std::thread::spawn(move || -> Result<T> {
        enter_netns(&path)?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid fd; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

/// TCP and UDP echo servers on the given ports in a pod, for probes. Stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts one TCP and one UDP server per port, on all addresses (IPv6 sockets are dual-stack
    /// when the pod has IPv6). Each answers with `reply`.
    pub fn start(pod: &TestPod, ports: &[u16], reply: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        for &port in ports {
            for udp in [false, true] {
                let path = Testbed::netns_path(&pod.netns);
                let stop = stop.clone();
                let tx = tx.clone();
                let reply = reply.to_string();
                let bind: SocketAddr = if pod.v6.is_some() {
                    (Ipv6Addr::UNSPECIFIED, port).into()
                } else {
                    (Ipv4Addr::UNSPECIFIED, port).into()
                };
                threads.push(std::thread::spawn(move || {
                    if let Err(e) = enter_netns(&path) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    if udp {
                        serve_udp(bind, &reply, &stop, &tx);
                    } else {
                        serve_tcp(bind, &reply, &stop, &tx);
                    }
                }));
            }
        }
        drop(tx);
        for r in rx.iter().take(ports.len() * 2) {
            r?;
        }
        Ok(Self { stop, threads })
    }
}

fn serve_tcp(
    bind: SocketAddr,
    reply: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
) {
    let listener = match TcpListener::bind(bind) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(
                anyhow::Error::new(e).context(format!("tcp bind {bind}"))
            ));
            return;
        }
    };
    let _ = listener.set_nonblocking(true);
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let reply = reply.to_string();
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(reply.as_bytes());
                    let _ = s.shutdown(Shutdown::Both);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_udp(
    bind: SocketAddr,
    reply: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
) {
    let sock = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(
                anyhow::Error::new(e).context(format!("udp bind {bind}"))
            ));
            return;
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(reply.as_bytes(), from);
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Connects from inside namespace `netns` to `to`:`port` and reads the reply: true when a reply
/// came back within `timeout` (TCP: handshake, request, reply; UDP: datagram and reply).
pub fn probe(netns: &str, to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> Result<bool> {
    in_netns(netns, move || probe_here(to, port, proto, timeout))
}

/// [`probe`] from the calling thread's current namespace.
pub fn probe_here(to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> bool {
    let addr = SocketAddr::new(to, port);
    let mut buf = [0u8; 256];
    match proto {
        Proto::Tcp => {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(timeout));
            if s.write_all(b"hello\n").is_err() {
                return false;
            }
            matches!(s.read(&mut buf), Ok(n) if n > 0)
        }
        Proto::Udp => {
            let bind: SocketAddr = if to.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(s) = UdpSocket::bind(bind) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(timeout));
            if s.send_to(b"hostname\n", addr).is_err() {
                return false;
            }
            matches!(s.recv_from(&mut buf), Ok((n, _)) if n > 0)
        }
    }
}

/// Runs many probes concurrently, each on its own thread in its source namespace. Returns the
/// results in the order of `probes` (source netns, destination, port, protocol).
pub fn probe_all(
    probes: &[(String, IpAddr, u16, Proto)],
    timeout: Duration,
    parallel: usize,
) -> Result<Vec<bool>> {
    let results = Arc::new(std::sync::Mutex::new(vec![false; probes.len()]));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let probes = Arc::new(probes.to_vec());
    let mut workers = Vec::new();
    for _ in 0..parallel.max(1) {
        let (results, next, probes) = (results.clone(), next.clone(), probes.clone());
        workers.push(std::thread::spawn(move || -> Result<()> {
            let mut current_ns = String::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((ns, to, port, proto)) = probes.get(i) else {
                    return Ok(());
                };
                if *ns != current_ns {
                    enter_netns(&Testbed::netns_path(ns))?;
                    current_ns = ns.clone();
                }
                let ok = probe_here(*to, *port, *proto, timeout);
                results.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i] = ok;
            }
        }));
    }
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("probe worker panicked"))??;
    }
    let r = results
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    Ok(r)
}

/// Makes [`agent_binary`] the agent cargo built with the calling test (`built`: its
/// `env!("CARGO_BIN_EXE_enforcer")`) unless `ENFORCER_BIN` names one. Call it first in a test
/// harness's `main`, before any thread starts.
pub fn use_built_agent(built: &str) {
    if std::env::var_os("ENFORCER_BIN").is_none() {
        // SAFETY: called before the harness starts any thread.
        unsafe { std::env::set_var("ENFORCER_BIN", built) };
    }
}

/// The agent binary (`target/release/enforcer`, built by `cargo xtask build`), overridable with
/// `ENFORCER_BIN`.
pub fn agent_binary() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("ENFORCER_BIN") {
        return Ok(p.into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let p = root.join("target/release/enforcer");
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --release` (or `cargo xtask build`) first",
            p.display()
        );
    }
    Ok(p)
}

/// The real agent running in a testbed's node namespace in standalone mode. Killed on drop.
pub struct AgentProcess {
    child: std::process::Child,
    node: String,
    pub health: SocketAddr,
    /// Where its stderr goes (read it when a test fails).
    pub log: std::path::PathBuf,
    /// Input generation programmed at the last wait.
    seen: u64,
}

impl AgentProcess {
    /// Starts `enforcer run --manifests DIR` inside the node namespace with `extra` arguments,
    /// serving health on the node's [`Testbed::health_port`]. The pins live under
    /// `/sys/fs/bpf/enforcer` of the private mount namespace `ip netns exec` makes, so they go
    /// away with the process. A cluster node's agent also gets `--node-name` and a pin folder
    /// named after the node (`/sys/fs/bpf/enforcer-<node>`, unless `extra` names one).
    pub fn start(tb: &Testbed, manifests: &std::path::Path, extra: &[&str]) -> Result<Self> {
        Self::start_binary(&agent_binary()?, tb, manifests, extra)
    }

    /// [`AgentProcess::start`] with another agent binary (an upgrade).
    pub fn start_binary(
        bin: &std::path::Path,
        tb: &Testbed,
        manifests: &std::path::Path,
        extra: &[&str],
    ) -> Result<Self> {
        let source = [std::ffi::OsStr::new("--manifests"), manifests.as_os_str()];
        Self::spawn(bin, tb, &source, None, extra)
    }

    /// [`AgentProcess::start`] in cluster mode: the agent watches the API server that
    /// `kubeconfig` names (`KUBECONFIG`) instead of a manifests folder.
    pub fn start_in_cluster(
        tb: &Testbed,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Result<Self> {
        Self::spawn(&agent_binary()?, tb, &[], Some(kubeconfig), extra)
    }

    fn spawn(
        bin: &std::path::Path,
        tb: &Testbed,
        source: &[&std::ffi::OsStr],
        kubeconfig: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Result<Self> {
        let health: SocketAddr = (Ipv4Addr::LOCALHOST, tb.health_port).into();
        let mut node_args = Vec::new();
        if let Some(name) = &tb.node_name {
            node_args.extend(["--node-name".to_string(), name.clone()]);
            if !extra.contains(&"--pin-path") {
                node_args.extend(["--pin-path".into(), format!("/sys/fs/bpf/enforcer-{name}")]);
            }
        }
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::SeqCst);
        let log = std::env::temp_dir().join(format!("{}-agent-{n}.log", tb.prefix));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("ip");
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let child = cmd
            .args(["netns", "exec", &tb.node])
            .arg(bin)
            .arg("run")
            .args(source)
            .args(["--health-addr", &health.to_string()])
            .args(&node_args)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting the agent")?;
        Ok(Self {
            child,
            node: tb.node.clone(),
            health,
            log,
            seen: 0,
        })
    }

    /// GETs `path` on the health address from inside the node namespace: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let (addr, path) = (self.health, path.to_string());
        in_netns(&self.node, move || http_get(addr, &path))?
    }

    /// `/metrics` once `holds` is true of it, or its last text after `timeout`: packet counters
    /// are published once a second, so a packet just sent may not show in the next scrape.
    pub fn metrics_until(&self, timeout: Duration, holds: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let text = self.get("/metrics").map(|(_, t)| t).unwrap_or_default();
            if holds(&text) || start.elapsed() >= timeout {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `/readyz` says ready (the latest state is programmed), or fails after
    /// `timeout` with the agent's log.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_generation(0, timeout)
    }

    /// Waits until the agent has programmed a newer input than at the last wait: call it after
    /// changing the manifests folder.
    pub fn wait_applied(&mut self, timeout: Duration) -> Result<()> {
        self.wait_generation(self.seen + 1, timeout)
    }

    /// Waits until `/readyz` is 200 with a programmed generation of at least `min`.
    fn wait_generation(&mut self, min: u64, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = self.child.try_wait()? {
                bail!("the agent exited ({st}):\n{}", self.log_text());
            }
            if let Ok((200, body)) = self.get("/readyz") {
                let generation = body
                    .split("generation=")
                    .nth(1)
                    .and_then(|g| g.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                if generation >= min {
                    self.seen = generation;
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the agent had not programmed input generation {min} after {timeout:?}:\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash or OOM kill would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: plain kill(2) of our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a pod manifest for a testbed pod (IP in `status.podIPs`), with named container ports
/// `serve-<port>-<proto>` for each of `ports` on TCP and UDP, as the upstream model names them.
pub fn pod_manifest(
    namespace: &str,
    pod: &TestPod,
    labels: &[(&str, &str)],
    ports: &[u16],
) -> String {
    pod_manifest_on(None, namespace, pod, labels, ports)
}

/// [`pod_manifest`] with `spec.nodeName` set to `node` (a [`Cluster`] node's name), when given.
pub fn pod_manifest_on(
    node: Option<&str>,
    namespace: &str,
    pod: &TestPod,
    labels: &[(&str, &str)],
    ports: &[u16],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {namespace}\n  uid: uid-{namespace}-{}\n  labels:\n",
        pod.name, pod.name
    );
    if labels.is_empty() {
        y.push_str("    {}\n");
    }
    for (k, v) in labels {
        y.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    y.push_str("spec:\n");
    if let Some(node) = node {
        y.push_str(&format!("  nodeName: {node}\n"));
    }
    y.push_str("  containers:\n");
    for p in ports {
        for proto in ["tcp", "udp"] {
            y.push_str(&format!(
                "  - name: cont-{p}-{proto}\n    image: agnhost\n    ports:\n    - containerPort: {p}\n      name: serve-{p}-{proto}\n      protocol: {}\n",
                proto.to_uppercase()
            ));
        }
    }
    if ports.is_empty() {
        y.push_str("  - name: main\n    image: agnhost\n");
    }
    y.push_str(&format!(
        "status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n",
        pod.v4, pod.v4
    ));
    if let Some(v6) = pod.v6 {
        y.push_str(&format!("  - ip: {v6}\n"));
    }
    y
}

/// A private bpffs on a temporary folder (pins of a test's own, so suites run side by side): on
/// drop, whatever the loader pinned under `<folder>/enforcer` is cleaned up, the bpffs unmounted
/// and the folder removed, also when a test panics.
pub struct BpfMount(pub std::path::PathBuf);

impl BpfMount {
    /// Mounts a bpffs on a new folder named after `tag` and this process (root).
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("enforcer-test-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        enforcer::datapath::mount_bpffs(&dir).expect("mounting a bpffs (run as root)");
        Self(dir)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = enforcer::datapath::Datapath::cleanup(&self.0.join("enforcer"));
        if let Ok(c) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How long a [`Conn`] waits to connect and for each reply.
const CONN_TIMEOUT: Duration = Duration::from_millis(600);

/// A line-echo server that keeps connections open (for established flows).
pub fn echo_server(pod: &TestPod, port: u16, stop: Arc<AtomicBool>) {
    let path = Testbed::netns_path(&pod.netns);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&path).unwrap();
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            if let Ok((s, _)) = l.accept() {
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                    let mut w = s;
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if w.write_all(line.as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    rx.recv().unwrap();
}

/// A long-lived connection from inside `from`'s namespace.
pub struct Conn(TcpStream, std::io::BufReader<TcpStream>);

impl Conn {
    pub fn open(from: &TestPod, to: SocketAddr) -> Option<Conn> {
        in_netns(&from.netns, move || {
            let s = TcpStream::connect_timeout(&to, CONN_TIMEOUT).ok()?;
            s.set_read_timeout(Some(CONN_TIMEOUT)).ok()?;
            Some(Conn(s.try_clone().ok()?, std::io::BufReader::new(s)))
        })
        .unwrap()
    }
    /// One request/response round trip.
    pub fn ping(&mut self) -> bool {
        if self.0.write_all(b"ping\n").is_err() {
            return false;
        }
        let mut line = String::new();
        matches!(self.1.read_line(&mut line), Ok(n) if n > 0)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Writes a manifest into an agent's folder atomically (a hidden temporary file, which the
/// agent ignores, then a rename), so the agent never reads half a file.
pub fn write_manifest(dir: &std::path::Path, file: &str, value: &serde_json::Value) -> Result<()> {
    let text = serde_yaml::to_string(value)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming to {file}"))?;
    Ok(())
}

/// An error from [`AgentProcess`] carries the agent's whole log: keeps its last 6000
/// characters.
pub fn trim_error(e: anyhow::Error) -> anyhow::Error {
    let s = format!("{e:#}");
    let keep = s.char_indices().rev().nth(6000).map_or(0, |(i, _)| i);
    anyhow::anyhow!("{}", &s[keep..])
}
