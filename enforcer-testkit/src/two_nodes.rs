//! Two nodes joined by an underlay, one standalone agent per node (its own `--node-name`, health
//! port and pins, all reading one manifests folder, which stands for the API server), routed-veth
//! pods on each, serving TCP and UDP on port 80; and the workload side of identity: a token
//! presented to the pod's node from inside the pod. Namespaces, agents and the folder go away
//! even when a test fails.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::Result;

use crate::netns::{
    AgentProcess, Cluster, NODE_V4, NodeSpec, Proto, Servers, TestPod, in_netns, pod_manifest_on,
    probe,
};

/// How long a probe waits for a connection.
pub const PROBE: Duration = Duration::from_millis(600);
/// How long an agent may take to become ready or to apply a change.
pub const READY: Duration = Duration::from_secs(30);

/// A pod of the bed: name, node index, and labels beside `pod: <name>`.
pub type PodSpec<'a> = (&'a str, usize, &'a [(&'a str, &'a str)]);

/// Field order is drop order: agents, then servers, then the namespaces and the folder.
pub struct TwoNodes {
    pub agents: Vec<AgentProcess>,
    _servers: Vec<Servers>,
    pub cluster: Cluster,
    pub dir: tempfile::TempDir,
}

impl TwoNodes {
    /// Nodes `node-0` (10.244.1.0/24) and `node-1` (10.244.2.0/24); `pods` are (name, node), all
    /// in namespace `x` with label `pod: <name>`; an agent `bin` per node, ready.
    pub fn new(tag: &str, bin: &Path, pods: &[(&str, usize)]) -> Self {
        let specs: Vec<PodSpec<'_>> = pods.iter().map(|(n, i)| (*n, *i, &[][..])).collect();
        let mut bed = Self::without_agents(tag, &specs);
        bed.agents = bed
            .cluster
            .start_agents(bin, bed.dir.path(), &[], READY)
            .unwrap();
        bed
    }

    /// The nodes, pods, servers and manifests folder, no agent yet ([`TwoNodes::start_agent`]).
    pub fn without_agents(tag: &str, pods: &[PodSpec<'_>]) -> Self {
        Cluster::cleanup_stale(tag);
        let mut cluster = Cluster::new(
            tag,
            &[
                NodeSpec::routed("node-0", Ipv4Addr::new(10, 244, 1, 0), 24),
                NodeSpec::routed("node-1", Ipv4Addr::new(10, 244, 2, 0), 24),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
        )
        .unwrap();
        let mut servers = Vec::new();
        for (k, (name, node, labels)) in pods.iter().enumerate() {
            let ip = Ipv4Addr::new(10, 244, 1 + *node as u8, 10 + k as u8);
            let pod = cluster.add_pod(*node, name, ip).unwrap();
            let node_name = cluster.specs[*node].name.clone();
            let mut all = vec![("pod", *name)];
            all.extend_from_slice(labels);
            std::fs::write(
                dir.path().join(format!("pod-{name}.yaml")),
                pod_manifest_on(Some(&node_name), "x", &pod, &all, &[80]),
            )
            .unwrap();
            servers.push(Servers::start(&pod, &[80], name).unwrap());
        }
        Self {
            agents: Vec::new(),
            _servers: servers,
            cluster,
            dir,
        }
    }

    /// Starts node `node`'s agent (`bin`, with `extra` arguments) without waiting for it.
    pub fn start_agent(&self, bin: &Path, node: usize, extra: &[&str]) -> Result<AgentProcess> {
        AgentProcess::start_binary(bin, &self.cluster.nodes[node], self.dir.path(), extra)
    }

    pub fn pod(&self, name: &str) -> &TestPod {
        self.cluster.pod(name).expect("a pod of the bed").1
    }

    /// Whether a TCP connection from `from` to `to`'s port 80 completes.
    pub fn reach(&self, from: &str, to: &str) -> bool {
        let to = IpAddr::V4(self.pod(to).v4);
        probe(&self.pod(from).netns, to, 80, Proto::Tcp, PROBE).unwrap()
    }

    /// Writes a manifest atomically and waits until every agent has programmed it.
    pub fn apply(&mut self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
        for a in &mut self.agents {
            a.wait_applied(READY).unwrap();
        }
    }

    /// Packets dropped for `reason`, as node `node`'s agent counts them, once it counts at least
    /// `min` (packet counters are published once a second).
    pub fn dropped(&self, node: usize, reason: &str, min: u64) -> u64 {
        let text = self.agents[node]
            .metrics_until(Duration::from_secs(3), |t| dropped_in(t, reason) >= min);
        dropped_in(&text, reason)
    }
}

/// `enforcer_packets_total{verdict="dropped",reason}` in a `/metrics` text.
pub fn dropped_in(metrics: &str, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("enforcer_packets_total{{verdict=\"dropped\",reason=\"{reason}\"}}"),
    )
}

/// The value of the sample `name{labels}` (written out) in a `/metrics` text; 0 when absent.
pub fn metric(metrics: &str, sample: &str) -> u64 {
    let key = format!("{sample} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// POSTs a token to the attestation endpoint of the pod's node (port 9902) from inside `pod`'s
/// namespace: (status, body).
pub fn attest(pod: &TestPod, token: &str) -> (u16, String) {
    let token = token.to_string();
    in_netns(&pod.netns, move || {
        let addr: SocketAddr = (NODE_V4, 9902).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .expect("attestation endpoint reachable");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "POST /v1/attest HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .unwrap()
}

pub use crate::within;
