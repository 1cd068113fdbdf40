//! kube-proxy's Service rules, reproduced in a node namespace, and the `kind: Service` manifests
//! that describe the same Services to the agent.
//!
//! kube-proxy translates what a pod sends to a Service frontend (a ClusterIP and port, or a node
//! address and node port) into one of the Service's backends with netfilter NAT in the node's
//! network namespace: after the pod's veth (and so after the agent's `from_pod`), before the
//! packet is routed. [`KubeProxy`] writes the rules kube-proxy writes, in either of its two
//! netfilter modes ([`Mode`]), simplified to what decides the datapath:
//!
//! - **nftables** (`pkg/proxy/nftables/proxier.go`): tables `ip kube-proxy` and `ip6 kube-proxy`;
//!   base chains `nat-prerouting` (hook prerouting) and `nat-output` (hook output), both at
//!   priority `dstnat` (written `-100` at output, where nft 1.0.6 does not take the name), jump
//!   to `services`, which dispatches `daddr . l4proto . dport` through the verdict map
//!   `service-ips` to a chain per Service port (`service-<hash>-<ns>/<name>/<proto>/<port>`),
//!   and `fib daddr type local` (not loopback) `l4proto . dport` through `service-nodeports` to an
//!   `external-...` chain that marks for masquerade and goes on to the Service chain; a Service
//!   chain picks an endpoint with `numgen random mod N vmap`; an endpoint chain
//!   (`endpoint-...__<ip>/<port>`) marks hairpin traffic (`saddr` the endpoint itself) for
//!   masquerade and `dnat`s to the endpoint. `nat-postrouting` (priority `srcnat`) jumps to
//!   `masquerading`, which returns unless the mark `0x4000` is set, clears it and masquerades
//!   (`fully-random`).
//! - **iptables** (`pkg/proxy/iptables/proxier.go`), through `iptables-legacy` and
//!   `ip6tables-legacy` explicitly (the x_tables backend, never the nf_tables one): in table
//!   `nat`, `PREROUTING` and `OUTPUT` jump to `KUBE-SERVICES`, `POSTROUTING` to
//!   `KUBE-POSTROUTING`; `KUBE-SERVICES` matches each ClusterIP and port into `KUBE-SVC-<hash>`,
//!   and last `-m addrtype --dst-type LOCAL` into `KUBE-NODEPORTS`, which matches each node port
//!   into `KUBE-EXT-<hash>` (`KUBE-MARK-MASQ`, then the `KUBE-SVC-` chain); `KUBE-SVC-` picks an
//!   endpoint with `-m statistic --mode random --probability 1/(n-i)` into `KUBE-SEP-<hash>`,
//!   which marks hairpin traffic (`-s <endpoint>`) with `KUBE-MARK-MASQ` (`MARK --or-mark
//!   0x4000`) and `DNAT --to-destination`s; `KUBE-POSTROUTING` returns unless the mark is set,
//!   clears it and `MASQUERADE --random-fully`s. The chains are loaded as kube-proxy loads them,
//!   with one `iptables-legacy-restore --noflush`.
//!
//! Left out, as the datapath does not depend on them: the filter chains (rejecting Services
//! without endpoints, load-balancer source ranges), session affinity, traffic policies `Local`,
//! the local-traffic detector (`--cluster-cidr`: pods' traffic is never masqueraded here, as it
//! is not there, only node-originated traffic to a ClusterIP would be), conntrack cleanup of stale
//! UDP flows. Like kube-proxy, an update rewrites every rule in one transaction; flows already
//! translated keep their backend (conntrack).
//!
//! A Service with no backend gets no rule: its ClusterIP is then not translated at all.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Cluster, Proto, Testbed};

/// The Service CIDR of the tests (kubeadm's default): no pod CIDR, node or underlay address of
/// the testbeds falls in it.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);

/// The IPv6 Service CIDR of the tests: apart from the testbeds' IPv6 pod and node addresses.
pub const SERVICE_CIDR_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0), 112);

/// kube-proxy's masquerade mark (`--masquerade-bit 14`).
pub const MASQ_MARK: u32 = 0x4000;

/// The first node port of kube-proxy's default range (30000-32767).
pub const NODE_PORT_MIN: u16 = 30000;

/// The `n`-th address of [`SERVICE_CIDR`] (`n` ≥ 1; 10.96.0.1 is conventionally the API
/// server's `kubernetes` Service).
pub fn cluster_ip(n: u16) -> Ipv4Addr {
    let [hi, lo] = n.to_be_bytes();
    Ipv4Addr::new(10, 96, hi, lo)
}

/// The `n`-th address of [`SERVICE_CIDR_V6`] (`n` ≥ 1).
pub fn cluster_ip_v6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, n)
}

/// Which of kube-proxy's netfilter modes writes the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--proxy-mode nftables`: tables `ip kube-proxy` and `ip6 kube-proxy` through `nft`.
    Nftables,
    /// `--proxy-mode iptables` on the legacy (x_tables) backend: `iptables-legacy`,
    /// `ip6tables-legacy` and their `-restore`.
    IptablesLegacy,
}

impl Mode {
    pub const ALL: [Self; 2] = [Self::Nftables, Self::IptablesLegacy];

    pub fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// One port of a Service (`spec.ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `name` (unique within the Service).
    pub name: String,
    pub protocol: Proto,
    /// `port`: the frontend port on the ClusterIP.
    pub port: u16,
    /// `targetPort`: the backend's port.
    pub target_port: u16,
    /// `nodePort`: also served on every local address of every node.
    pub node_port: Option<u16>,
}

/// A Service: what kube-proxy translates (its ClusterIP, ports and backends) and what its
/// manifest says (name, namespace, selector, ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIP` (and the only entry of `spec.clusterIPs`); its family is the Service's.
    pub cluster_ip: IpAddr,
    pub ports: Vec<ServicePort>,
    /// `spec.selector`: should select exactly the pods of `backends`.
    pub selector: Vec<(String, String)>,
    /// The ready endpoints' addresses (what the EndpointSlices would list), in the family of
    /// `cluster_ip`.
    pub backends: Vec<IpAddr>,
}

fn proto_lower(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn proto_upper(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    }
}

impl ServiceSpec {
    /// A ClusterIP Service with no port, selector or backend yet.
    pub fn new(namespace: &str, name: &str, cluster_ip: impl Into<IpAddr>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            cluster_ip: cluster_ip.into(),
            ports: Vec::new(),
            selector: Vec::new(),
            backends: Vec::new(),
        }
    }

    /// Adds a port (`port` → `target_port`) named `service-port-<proto>-<port>`, as upstream's
    /// NetworkPolicy e2e model names them.
    pub fn port(mut self, protocol: Proto, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort {
            name: format!("service-port-{}-{port}", proto_lower(protocol)),
            protocol,
            port,
            target_port,
            node_port: None,
        });
        self
    }

    /// Adds a port that is also a node port (the Service becomes `type: NodePort`).
    pub fn node_port(
        mut self,
        protocol: Proto,
        port: u16,
        target_port: u16,
        node_port: u16,
    ) -> Self {
        self = self.port(protocol, port, target_port);
        if let Some(p) = self.ports.last_mut() {
            p.node_port = Some(node_port);
        }
        self
    }

    /// Adds `key: value` to the selector.
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        self.selector.push((key.into(), value.into()));
        self
    }

    /// Adds a backend (an endpoint's address).
    pub fn backend(mut self, ip: impl Into<IpAddr>) -> Self {
        self.backends.push(ip.into());
        self
    }

    /// `type`: `NodePort` when a port has a node port, else `ClusterIP`.
    pub fn service_type(&self) -> &'static str {
        if self.ports.iter().any(|p| p.node_port.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        }
    }

    /// The Service as the API server hands it out (`apiVersion: v1`, `kind: Service`).
    pub fn manifest(&self) -> String {
        let family = if self.cluster_ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\n  uid: uid-svc-{}-{}\nspec:\n  type: {}\n  clusterIP: \"{}\"\n  clusterIPs:\n  - \"{}\"\n  ipFamilies:\n  - {family}\n  ipFamilyPolicy: SingleStack\n  selector:\n",
            self.name,
            self.namespace,
            self.namespace,
            self.name,
            self.service_type(),
            self.cluster_ip,
            self.cluster_ip,
        );
        if self.selector.is_empty() {
            y.push_str("    {}\n");
        }
        for (k, v) in &self.selector {
            let _ = writeln!(y, "    {k}: \"{v}\"");
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = write!(
                y,
                "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
                p.name,
                proto_upper(p.protocol),
                p.port,
                p.target_port
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(y, "    nodePort: {np}");
            }
        }
        y
    }

    /// The file [`ServiceSpec::write_manifest`] writes in a manifests folder.
    pub fn manifest_file(&self) -> String {
        format!("svc-{}-{}.yaml", self.namespace, self.name)
    }

    /// Writes [`ServiceSpec::manifest`] into the manifests folder `dir` atomically (a hidden
    /// temporary file, then a rename: the agent never reads half of it). Returns its path.
    pub fn write_manifest(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(self.manifest_file());
        let tmp = dir.join(format!(".{}.tmp", self.manifest_file()));
        std::fs::write(&tmp, self.manifest())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(path)
    }

    fn check(&self) -> Result<()> {
        for b in &self.backends {
            if b.is_ipv4() != self.cluster_ip.is_ipv4() {
                bail!(
                    "service {}/{}: backend {b} is not of the ClusterIP's family",
                    self.namespace,
                    self.name
                );
            }
        }
        Ok(())
    }
}

/// `ns/name:port` (kube-proxy's ServicePortName).
fn port_name(svc: &ServiceSpec, p: &ServicePort) -> String {
    format!("{}/{}:{}", svc.namespace, svc.name, p.name)
}

/// 128 bits of FNV-1a (two seeds) in base32, as kube-proxy's chain names carry a base32 hash of
/// what they stand for (it uses SHA-256; any stable hash keeps the names unique).
fn hash32(s: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x6c62_272e_07bb_0142));
    (0..len)
        .map(|i| char::from(ALPHABET[((bits >> (5 * i)) & 31) as usize]))
        .collect()
}

/// An endpoint as `ip:port` (`[ip]:port` for IPv6).
fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

// ---------------------------------------------------------------------------------------------
// nftables mode.

const NFT_TABLE: &str = "kube-proxy";

fn nft_base(svc: &ServiceSpec, p: &ServicePort) -> String {
    let base = format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        proto_lower(p.protocol),
        p.name
    );
    format!("{}-{base}", hash32(&base, 8))
}

fn nft_endpoint_chain(svc: &ServiceSpec, p: &ServicePort, ip: IpAddr) -> String {
    let base = format!(
        "{}/{}/{}/{}__{}/{}",
        svc.namespace,
        svc.name,
        proto_lower(p.protocol),
        p.name,
        ip.to_string().replace(':', "."),
        p.target_port
    );
    format!("endpoint-{}-{base}", hash32(&base, 8))
}

/// The `nft -f` script that replaces table `<family> kube-proxy` with the rules of `services` of
/// that family (`ip` or `ip6`), in one transaction.
pub fn nft_script(family: &str, services: &[ServiceSpec]) -> String {
    let v6 = family == "ip6";
    let (addr_type, no_localhost) = if v6 {
        ("ipv6_addr", "ip6 daddr != ::1")
    } else {
        ("ipv4_addr", "ip daddr != 127.0.0.0/8")
    };
    let mark = format!("{MASQ_MARK:#08x}");
    let mut chains = String::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for svc in services
        .iter()
        .filter(|s| s.cluster_ip.is_ipv6() == v6 && !s.backends.is_empty())
    {
        for p in &svc.ports {
            let proto = proto_lower(p.protocol);
            let base = nft_base(svc, p);
            let service_chain = format!("service-{base}");
            let mut vmap = Vec::new();
            for (i, &ip) in svc.backends.iter().enumerate() {
                let ep = nft_endpoint_chain(svc, p, ip);
                vmap.push(format!("{i} : goto {ep}"));
                let _ = write!(
                    chains,
                    "\tchain {ep} {{\n\t\t{family} saddr {ip} jump mark-for-masquerade\n\t\tmeta l4proto {proto} dnat to {}\n\t}}\n",
                    endpoint(ip, p.target_port)
                );
            }
            let _ = write!(
                chains,
                "\tchain {service_chain} {{\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}\n",
                svc.backends.len(),
                vmap.join(", ")
            );
            service_ips.push(format!(
                "{} . {proto} . {} : goto {service_chain}",
                svc.cluster_ip, p.port
            ));
            if let Some(np) = p.node_port {
                let external = format!("external-{base}");
                let _ = write!(
                    chains,
                    "\tchain {external} {{\n\t\tjump mark-for-masquerade\n\t\tgoto {service_chain}\n\t}}\n"
                );
                node_ports.push(format!("{proto} . {np} : goto {external}"));
            }
        }
    }
    let elements = |list: &[String]| {
        if list.is_empty() {
            String::new()
        } else {
            format!("\t\telements = {{ {} }}\n", list.join(",\n\t\t\t"))
        }
    };
    format!(
        "add table {family} {NFT_TABLE}
delete table {family} {NFT_TABLE}
table {family} {NFT_TABLE} {{
\tcomment \"rules for kube-proxy\"
\tchain nat-prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}}
\tchain nat-output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}}
\tchain nat-postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tjump masquerading
\t}}
\tchain mark-for-masquerade {{
\t\tmeta mark set meta mark or {mark}
\t}}
\tchain masquerading {{
\t\tmeta mark and {mark} == 0 return
\t\tmeta mark set meta mark xor {mark}
\t\tmasquerade fully-random
\t}}
{chains}\tmap service-ips {{
\t\ttype {addr_type} . inet_proto . inet_service : verdict
\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"
{}\t}}
\tmap service-nodeports {{
\t\ttype inet_proto . inet_service : verdict
\t\tcomment \"NodePort traffic\"
{}\t}}
\tchain services {{
\t\t{family} daddr . meta l4proto . th dport vmap @service-ips
\t\tfib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports
\t}}
}}
",
        elements(&service_ips),
        elements(&node_ports),
    )
}

// ---------------------------------------------------------------------------------------------
// iptables mode (legacy backend).

/// kube-proxy's iptables chain name: a prefix and 16 base32 characters of a hash.
fn ipt_chain(prefix: &str, what: &str) -> String {
    format!("{prefix}{}", hash32(what, 16))
}

/// The chains kube-proxy always has in table `nat`.
const IPT_TOP_CHAINS: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

/// The jumps from the built-in chains, each ensured with `-C` / `-I` as kube-proxy does.
const IPT_JUMPS: [(&str, &str, &str); 3] = [
    ("PREROUTING", "kubernetes service portals", "KUBE-SERVICES"),
    ("OUTPUT", "kubernetes service portals", "KUBE-SERVICES"),
    (
        "POSTROUTING",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
];

/// The `iptables-restore --noflush` input for table `nat` with the rules of `services` of one
/// family (`v6`), and every chain it declares. Chains of `stale` that it no longer declares are
/// flushed and deleted in the same transaction.
pub fn iptables_restore(
    v6: bool,
    services: &[ServiceSpec],
    stale: &BTreeSet<String>,
) -> (String, BTreeSet<String>) {
    let host = if v6 { 128 } else { 32 };
    let mark = format!("{MASQ_MARK:#x}");
    let mut declared: BTreeSet<String> = IPT_TOP_CHAINS.iter().map(|c| c.to_string()).collect();
    let mut rules = String::new();
    let mut services_rules = String::new();
    let mut nodeport_rules = String::new();
    for svc in services
        .iter()
        .filter(|s| s.cluster_ip.is_ipv6() == v6 && !s.backends.is_empty())
    {
        for p in &svc.ports {
            let proto = proto_lower(p.protocol);
            let name = port_name(svc, p);
            let svc_chain = ipt_chain("KUBE-SVC-", &format!("{name}{proto}"));
            declared.insert(svc_chain.clone());
            let _ = writeln!(
                services_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -d {}/{host} -p {proto} -m {proto} --dport {} -j {svc_chain}",
                svc.cluster_ip, p.port
            );
            if let Some(np) = p.node_port {
                let ext_chain = ipt_chain("KUBE-EXT-", &format!("{name}{proto}"));
                declared.insert(ext_chain.clone());
                let _ = writeln!(
                    nodeport_rules,
                    "-A KUBE-NODEPORTS -m comment --comment {name} -p {proto} -m {proto} --dport {np} -j {ext_chain}"
                );
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A {ext_chain} -j {svc_chain}"
                );
            }
            let n = svc.backends.len();
            for (i, &ip) in svc.backends.iter().enumerate() {
                let ep = endpoint(ip, p.target_port);
                let sep_chain = ipt_chain("KUBE-SEP-", &format!("{name}{proto}{ep}"));
                declared.insert(sep_chain.clone());
                let statistic = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.11}",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{name} -> {ep}\"{statistic} -j {sep_chain}"
                );
                let _ = writeln!(
                    rules,
                    "-A {sep_chain} -m comment --comment {name} -s {ip}/{host} -j KUBE-MARK-MASQ\n-A {sep_chain} -m comment --comment {name} -p {proto} -m {proto} -j DNAT --to-destination {ep}"
                );
            }
        }
    }
    let mut out = String::from("*nat\n");
    for c in &declared {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // Stale chains: all flushed first (they may jump to each other), then deleted.
    for c in stale.difference(&declared) {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in stale.difference(&declared) {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str(&services_rules);
    let local = if v6 {
        String::new()
    } else {
        // kube-proxy leaves loopback out of node ports (route_localnet is not set here).
        " ! -d 127.0.0.0/8".to_string()
    };
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"{local} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    out.push_str(&nodeport_rules);
    out.push_str(&rules);
    let _ = writeln!(
        out,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}\n-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\nCOMMIT"
    );
    (out, declared)
}

// ---------------------------------------------------------------------------------------------
// Installing the rules.

/// Runs `cmd args` in network namespace `netns` with `input` on its stdin, failing with its
/// stderr (and the input, numbered, for a rejected script).
fn run_in(netns: &str, cmd: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, cmd])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} in {netns}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {cmd}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let numbered: String = input
            .unwrap_or_default()
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{:4} {l}\n", i + 1))
            .collect();
        bail!(
            "{cmd} {} in {netns}: {}\n{numbered}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// kube-proxy's rules in one node namespace. [`KubeProxy::update`] rewrites them for another set
/// of Services (one transaction per family, as kube-proxy syncs); dropping it removes every
/// table, chain and rule it made (the namespace may be gone already).
pub struct KubeProxy {
    netns: String,
    mode: Mode,
    /// The iptables chains declared, per family (v4, v6).
    ipt_chains: [BTreeSet<String>; 2],
    installed: bool,
}

impl KubeProxy {
    /// Writes the rules for `services` in the node namespace `node_netns` (`ip netns` name).
    pub fn install(node_netns: &str, mode: Mode, services: &[ServiceSpec]) -> Result<Self> {
        let mut kp = Self {
            netns: node_netns.into(),
            mode,
            ipt_chains: Default::default(),
            installed: true,
        };
        if mode == Mode::IptablesLegacy {
            for (v6, bin) in [(false, "iptables-legacy"), (true, "ip6tables-legacy")] {
                // The top chains first: a rule can only jump to a chain that exists.
                let (text, declared) = iptables_restore(v6, &[], &BTreeSet::new());
                run_in(
                    node_netns,
                    &format!("{bin}-restore"),
                    &["-w", "--noflush"],
                    Some(&text),
                )?;
                kp.ipt_chains[usize::from(v6)] = declared;
                for (chain, comment, target) in IPT_JUMPS {
                    let rule = ["-m", "comment", "--comment", comment, "-j", target];
                    let mut check = vec!["-w", "-t", "nat", "-C", chain];
                    check.extend(rule);
                    if run_in(node_netns, bin, &check, None).is_err() {
                        let mut insert = vec!["-w", "-t", "nat", "-I", chain];
                        insert.extend(rule);
                        run_in(node_netns, bin, &insert, None)?;
                    }
                }
            }
        }
        kp.update(services)?;
        Ok(kp)
    }

    /// Rewrites the rules for `services` (all of them, as kube-proxy's sync does).
    pub fn update(&mut self, services: &[ServiceSpec]) -> Result<()> {
        for s in services {
            s.check()?;
        }
        match self.mode {
            Mode::Nftables => {
                let script = format!(
                    "{}{}",
                    nft_script("ip", services),
                    nft_script("ip6", services)
                );
                run_in(&self.netns, "nft", &["-f", "-"], Some(&script))?;
            }
            Mode::IptablesLegacy => {
                for (v6, restore) in [
                    (false, "iptables-legacy-restore"),
                    (true, "ip6tables-legacy-restore"),
                ] {
                    let k = usize::from(v6);
                    let (text, declared) = iptables_restore(v6, services, &self.ipt_chains[k]);
                    run_in(&self.netns, restore, &["-w", "--noflush"], Some(&text))?;
                    self.ipt_chains[k] = declared;
                }
            }
        }
        Ok(())
    }

    /// The rules as the kernel holds them now (`nft list table`, `iptables-legacy-save -t nat`),
    /// for failure messages.
    pub fn ruleset(&self) -> String {
        let out = match self.mode {
            Mode::Nftables => ["ip", "ip6"]
                .iter()
                .map(|f| run_in(&self.netns, "nft", &["list", "table", f, NFT_TABLE], None))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.concat()),
            Mode::IptablesLegacy => ["iptables-legacy-save", "ip6tables-legacy-save"]
                .iter()
                .map(|b| run_in(&self.netns, b, &["-t", "nat"], None))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.concat()),
        };
        out.unwrap_or_else(|e| format!("(no ruleset: {e:#})"))
    }

    /// The node namespace it writes in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Removes every table, chain and rule it wrote. Also done on drop.
    pub fn remove(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.installed) {
            return Ok(());
        }
        match self.mode {
            Mode::Nftables => {
                let script = format!(
                    "add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\nadd table ip6 {NFT_TABLE}\ndelete table ip6 {NFT_TABLE}\n"
                );
                run_in(&self.netns, "nft", &["-f", "-"], Some(&script))?;
            }
            Mode::IptablesLegacy => {
                for (v6, bin) in [(false, "iptables-legacy"), (true, "ip6tables-legacy")] {
                    for (chain, comment, target) in IPT_JUMPS {
                        let mut delete = vec!["-w", "-t", "nat", "-D", chain];
                        delete.extend(["-m", "comment", "--comment", comment, "-j", target]);
                        while run_in(&self.netns, bin, &delete, None).is_ok() {}
                    }
                    let chains = std::mem::take(&mut self.ipt_chains[usize::from(v6)]);
                    if chains.is_empty() {
                        continue;
                    }
                    let mut text = String::from("*nat\n");
                    for c in &chains {
                        let _ = writeln!(text, ":{c} - [0:0]");
                    }
                    for c in &chains {
                        let _ = writeln!(text, "-X {c}");
                    }
                    text.push_str("COMMIT\n");
                    let restore = format!("{bin}-restore");
                    run_in(&self.netns, &restore, &["-w", "--noflush"], Some(&text))?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        // The namespace may be gone already (and its rules with it).
        if std::path::Path::new(&Testbed::netns_path(&self.netns)).exists() {
            let _ = self.remove();
        }
    }
}

/// kube-proxy on every node of a [`Cluster`], each with the same rules (kube-proxy runs on every
/// node and every node translates every Service). Removed from every node on drop.
pub struct KubeProxies(pub Vec<KubeProxy>);

impl KubeProxies {
    /// Rewrites the rules on every node.
    pub fn update(&mut self, services: &[ServiceSpec]) -> Result<()> {
        for kp in &mut self.0 {
            kp.update(services)?;
        }
        Ok(())
    }

    /// Every node's rules, for failure messages.
    pub fn ruleset(&self) -> String {
        self.0
            .iter()
            .map(|kp| format!("--- {}:\n{}", kp.netns, kp.ruleset()))
            .collect()
    }
}

impl Cluster {
    /// Installs kube-proxy's rules for `services` in every node namespace.
    pub fn install_kube_proxy(&self, mode: Mode, services: &[ServiceSpec]) -> Result<KubeProxies> {
        let mut all = Vec::new();
        for tb in &self.nodes {
            all.push(KubeProxy::install(&tb.node, mode, services)?);
        }
        Ok(KubeProxies(all))
    }
}

impl Testbed {
    /// Installs kube-proxy's rules for `services` in this node's namespace.
    pub fn install_kube_proxy(&self, mode: Mode, services: &[ServiceSpec]) -> Result<KubeProxy> {
        KubeProxy::install(&self.node, mode, services)
    }
}
