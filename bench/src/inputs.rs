//! Generated inputs: manifests for the agent, and the same policies as an nftables ruleset laid
//! out the way iptables-based enforcers (kube-router, Calico iptables) lay theirs out.

use std::{fmt::Write as _, net::Ipv4Addr};

pub const NS: &str = "bench";
pub const NODE: &str = "bench-node";
pub const OTHER_NODE: &str = "other-node";
pub const PORT_IPERF: u16 = 5201;
/// Connection-rate server (inline handler).
pub const PORT_CRR: u16 = 7001;
/// Request/response server (thread per connection).
pub const PORT_RR: u16 = 7002;
/// Served, never allowed: tells "programs attached" from "no programs".
pub const PORT_DENIED: u16 = 7003;
/// Allowed only while the toggle policy exists (policy-change latency).
pub const PORT_TOGGLE: u16 = 7100;
pub const ALLOWED_PORTS: [u16; 3] = [PORT_IPERF, PORT_CRR, PORT_RR];
/// Remote pods are spread over this many label groups (one identity each).
pub const GROUPS: usize = 100;

pub fn namespace() -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n  labels:\n    kubernetes.io/metadata.name: {NS}\n"
    )
}

fn pod(name: &str, ip: Ipv4Addr, node: &str, labels: &[(&str, String)]) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}: \"{v}\""))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  uid: uid-{name}\n  labels: {{{}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: bench\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
        labels.join(", ")
    )
}

/// A pod of this node (it has a netns and a veth).
pub fn local_pod(name: &str, ip: Ipv4Addr, role: &str) -> String {
    pod(name, ip, NODE, &[("role", role.to_string())])
}

pub fn remote_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 0)) + i as u32 + 1)
}

/// `n` pods on another node: peers, not endpoints. Pod `i` is in group `g{i % GROUPS}`.
pub fn remote_pods(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str("---\n");
        s.push_str(&pod(
            &format!("r{i}"),
            remote_ip(i),
            OTHER_NODE,
            &[("grp", format!("g{}", i % GROUPS))],
        ));
    }
    s
}

/// Port of filler policy `i`.
pub fn filler_port(i: usize) -> u16 {
    8000 + ((i / GROUPS) % 1000) as u16
}

/// `n` filler policies, each selecting the server and allowing one group on one port: one
/// distinct (peer identity, port) per policy.
pub fn policies(n: usize) -> String {
    let mut s = String::with_capacity(n * 300);
    for i in 0..n {
        let _ = write!(
            s,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bp-{i}, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: srv}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{grp: g{}}}}}}}]\n    ports: [{{protocol: TCP, port: {}}}]\n",
            i % GROUPS,
            filler_port(i)
        );
    }
    s
}

/// `n` cluster policies (ClusterNetworkPolicy v1alpha2) of the kinds an administrator writes:
/// two thirds Admin (guardrails: deny a group or a network on a port range, accept monitoring,
/// pass the rest down to the namespace owners), one third Baseline (defaults: deny a group,
/// accept the namespace). Subjects are the bench namespace, the server's pods, or namespaces
/// of other teams that have no pod here (most of a real cluster's policies select other
/// namespaces); priorities spread over the API's range, with ties.
pub fn cluster_policies(n: usize) -> String {
    let mut s = String::with_capacity(n * 700);
    for i in 0..n {
        let admin = i % 3 != 2;
        let subject = match i % 4 {
            0 => format!(
                "pods: {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}, podSelector: {{matchLabels: {{role: srv}}}}}}"
            ),
            1 => format!("namespaces: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}"),
            _ => format!("namespaces: {{matchLabels: {{team: t{}}}}}", i % 50),
        };
        let group = format!(
            "{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{grp: g{}}}}}}}}}",
            i % GROUPS
        );
        let lo = 20_000 + (i % 400) as u16 * 100;
        let (ingress, egress) = if admin {
            (
                format!(
                    "  - name: deny-g\n    action: Deny\n    from: [{group}]\n    protocols: [{{tcp: {{destinationPort: {{range: {{start: {lo}, end: {}}}}}}}}}]\n  - name: monitoring\n    action: Accept\n    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}}}]\n    protocols: [{{tcp: {{destinationPort: {{number: 9090}}}}}}]\n  - name: rest\n    action: Pass\n    from: [{{namespaces: {{}}}}]\n",
                    lo + 99
                ),
                format!(
                    "  - name: no-net\n    action: Deny\n    to: [{{networks: [192.168.{}.0/24, 172.16.{}.0/24]}}]\n  - name: pass-pods\n    action: Pass\n    to: [{{namespaces: {{}}}}]\n",
                    i % 256,
                    (i / 256) % 256
                ),
            )
        } else {
            (
                format!(
                    "  - name: deny-g\n    action: Deny\n    from: [{group}]\n  - name: same-ns\n    action: Accept\n    from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}}}]\n"
                ),
                "  - name: dns\n    action: Accept\n    to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]\n    protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]\n".to_string(),
            )
        };
        let _ = write!(
            s,
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: cnp-{i}}}\nspec:\n  tier: {}\n  priority: {}\n  subject:\n    {subject}\n  ingress:\n{ingress}  egress:\n{egress}",
            if admin { "Admin" } else { "Baseline" },
            (i * 7) % 1000,
        );
    }
    s
}

fn ports_yaml(ports: &[u16]) -> String {
    let p: Vec<String> = ports
        .iter()
        .map(|p| format!("{{protocol: TCP, port: {p}}}"))
        .collect();
    format!("[{}]", p.join(", "))
}

/// The policies the measured traffic needs: the server admits the client on the bench ports;
/// the client's egress is isolated too and allowed to the server (bench ports and the toggle
/// port), so both veths run the full path.
pub fn base_policies() -> String {
    let mut egress = ALLOWED_PORTS.to_vec();
    egress.push(PORT_TOGGLE);
    egress.push(PORT_DENIED);
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: srv}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: {}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-egress, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: client}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{podSelector: {{matchLabels: {{role: srv}}}}}}]\n    ports: {}\n",
        ports_yaml(&ALLOWED_PORTS),
        ports_yaml(&egress)
    )
}

/// Allows the client to the toggle port while the file exists.
pub fn toggle_policy() -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: toggle, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: srv}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: {}\n",
        ports_yaml(&[PORT_TOGGLE])
    )
}

pub const NFT_TABLE: &str = "enforcer_bench";

/// The same policies as [`policies`] + [`base_policies`], as nftables rules laid out like
/// kube-router's iptables chains (KUBE-POD-FW-* per pod, KUBE-NWPLCY-* per policy, ipsets of
/// the selected peers): established/related first; then per pod and direction a chain that
/// jumps to every policy chain selecting the pod, each of which marks the packet when one of
/// its rules matches (peer set + port); unmarked packets are dropped. Every new connection to
/// the server walks all of its policy chains, as kube-router's do.
pub fn nft_ruleset(n: usize, remote: usize, client: Ipv4Addr, server: Ipv4Addr) -> String {
    let mut s = String::with_capacity(n * 200 + remote * 20);
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    for g in 0..GROUPS {
        let members: Vec<String> = (0..remote)
            .filter(|i| i % GROUPS == g)
            .map(|i| remote_ip(i).to_string())
            .collect();
        let _ = writeln!(s, "  set grp-g{g} {{\n    type ipv4_addr");
        if !members.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", members.join(", "));
        }
        s.push_str("  }\n");
    }
    let _ = writeln!(
        s,
        "  set role-client {{\n    type ipv4_addr\n    elements = {{ {client} }}\n  }}"
    );
    let _ = writeln!(
        s,
        "  set role-srv {{\n    type ipv4_addr\n    elements = {{ {server} }}\n  }}"
    );
    let ports = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let mut egress = ALLOWED_PORTS.to_vec();
    egress.push(PORT_TOGGLE);
    egress.push(PORT_DENIED);
    // Policy chains.
    for i in 0..n {
        let _ = writeln!(
            s,
            "  chain nwplcy-bp-{i} {{\n    ip saddr @grp-g{} tcp dport {} meta mark set meta mark | 0x10000\n  }}",
            i % GROUPS,
            filler_port(i)
        );
    }
    let _ = writeln!(
        s,
        "  chain nwplcy-allow-client {{\n    ip saddr @role-client tcp dport {{ {} }} meta mark set meta mark | 0x10000\n  }}",
        ports(&ALLOWED_PORTS)
    );
    let _ = writeln!(
        s,
        "  chain nwplcy-client-egress {{\n    ip daddr @role-srv tcp dport {{ {} }} meta mark set meta mark | 0x10000\n  }}",
        ports(&egress)
    );
    // Per-pod firewall chains.
    s.push_str("  chain pod-fw-srv-ingress {\n");
    for i in 0..n {
        let _ = writeln!(s, "    jump nwplcy-bp-{i}");
    }
    s.push_str("    jump nwplcy-allow-client\n    meta mark & 0x10000 != 0x10000 counter drop\n    meta mark set meta mark & 0xfffeffff\n  }\n");
    s.push_str("  chain pod-fw-cli-egress {\n    jump nwplcy-client-egress\n    meta mark & 0x10000 != 0x10000 counter drop\n    meta mark set meta mark & 0xfffeffff\n  }\n");
    // The hook.
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept\n    ip saddr {client} jump pod-fw-cli-egress\n    ip daddr {server} jump pod-fw-srv-ingress\n  }}"
    );
    s.push_str("}\n");
    s
}

/// The ClusterIP of the bench's Service (kube-proxy's default range, apart from every pod and
/// node address of the testbed).
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The server pod's ports behind the Service: servers of their own, so that a connection
/// translated to the pod never takes the conntrack tuple of a direct one from the same client
/// port (conntrack would give it another source port, and the judge drops a deferred packet
/// whose source port changed).
pub const PORT_SVC_CRR: u16 = 7011;
pub const PORT_SVC_RR: u16 = 7012;
/// The Service's ports and their target ports: the connection-rate and request/response
/// servers.
pub const SERVICE_PORTS: [(u16, u16); 2] = [(PORT_CRR, PORT_SVC_CRR), (PORT_RR, PORT_SVC_RR)];
/// The nft table standing in for kube-proxy's translation.
pub const NFT_KUBE_PROXY: &str = "bench-kube-proxy";

/// The Service in front of the server pod: the agent gives its ClusterIP the Service identity,
/// so the client's new flows to it are judged after the translation.
pub fn service() -> String {
    let ports: Vec<String> = SERVICE_PORTS
        .iter()
        .map(|(p, t)| format!("  - {{name: p{p}, protocol: TCP, port: {p}, targetPort: {t}}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: srv, namespace: {NS}}}\nspec:\n  type: ClusterIP\n  clusterIP: {SERVICE_VIP}\n  clusterIPs: [{SERVICE_VIP}]\n  selector: {{role: srv}}\n  ports:\n{}",
        ports.concat()
    )
}

/// The policies of the Service's target ports, as [`base_policies`] has them for the others:
/// the server admits the client, the client's isolated egress is allowed to the server.
pub fn service_policies() -> String {
    let targets = ports_yaml(&SERVICE_PORTS.map(|(_, t)| t));
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client-svc, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: srv}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: {targets}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-egress-svc, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{role: client}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{podSelector: {{matchLabels: {{role: srv}}}}}}]\n    ports: {targets}\n"
    )
}

/// kube-proxy's translation of [`service`]: one DNAT rule per port in a `prerouting` chain at
/// priority `dstnat`, and a `postrouting` one at `srcnat` (empty here; kube-proxy masquerades
/// there), as kube-proxy's nftables mode lays them out.
pub fn kube_proxy_ruleset(backend: Ipv4Addr) -> String {
    let rules: Vec<String> = SERVICE_PORTS
        .iter()
        .map(|(p, t)| format!("    ip daddr {SERVICE_VIP} tcp dport {p} dnat to {backend}:{t}\n"))
        .collect();
    format!(
        "table ip {NFT_KUBE_PROXY} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{}  }}\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n  }}\n}}\n",
        rules.concat()
    )
}
