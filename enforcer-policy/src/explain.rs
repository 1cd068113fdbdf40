//! `enforcer explain`: why a flow is allowed or denied, per direction, with the policy and rule
//! that decided it. Built on the reference evaluator, so it states the API's answer; the
//! compiled maps are tested to agree with it.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use super::{
    compile::CompileOptions,
    evaluator::{
        DirVerdict, Endpoint, Peer, ResolvedFlow, direction_verdict, direction_verdict_as_written,
        pods_as_written, resolve_flow,
    },
    model::{
        Cluster, Frontend, LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, RESERVED_LABEL_PREFIX,
        SelfSetLabel, ServicePortSpec, TargetPort, parse_service, pod_ips,
    },
};
use crate::state::PodRef;

/// The verdict of one side of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// The pod whose policies were checked; `None` when that end is not a pod (no policy applies).
    pub pod: Option<PodRef>,
    /// Whether this node enforces that pod (standalone mode: every pod).
    pub local: bool,
    pub verdict: DirVerdict,
}

impl Side {
    pub fn allowed(&self) -> bool {
        self.verdict.allowed()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: u8,
    pub port: u16,
    /// The addresses used (`None`: the ends could not be resolved to addresses of one family).
    pub addresses: Option<(IpAddr, IpAddr)>,
    /// Egress at the source.
    pub egress: Side,
    /// Ingress at the destination.
    pub ingress: Side,
    pub allowed: bool,
    /// The verified identity of the source's address, if it is bound to one.
    pub src_identity: Option<VerifiedAs>,
    /// The verified identity of the destination's address, if it is bound to one.
    pub dst_identity: Option<VerifiedAs>,
    /// The ends that are pods with no known address (as written, offline): judged by labels,
    /// namespace and ports, matching no ipBlock. Empty when both ends have addresses.
    pub unaddressed: Vec<PodRef>,
}

/// A verified identity, as the reserved labels of a verified address name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedAs {
    pub namespace: String,
    pub service_account: String,
}

impl VerifiedAs {
    /// The identity `ip` is verified as in `cluster`, if any.
    pub fn of(cluster: &Cluster, ip: IpAddr) -> Option<Self> {
        let labels = cluster.verified.get(&ip)?;
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Some(Self {
            namespace: get(LABEL_NAMESPACE),
            service_account: get(LABEL_SERVICE_ACCOUNT),
        })
    }
}

/// Explains the verdict for a flow `from` -> `to` on `protocol`/`port`.
pub fn explain(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    protocol: u8,
    port: u16,
) -> Explanation {
    let flow = resolve_flow(cluster, opts, from, to);
    if flow.is_none()
        && let Some(e) = as_written(cluster, opts, from, to, protocol, port)
    {
        return e;
    }
    judge(cluster, opts, from, to, flow, protocol, port)
}

/// A flow with a pod end that has no known address (a Pod without status, a workload's
/// template): judged by labels, namespace and ports. `None` when every pod end has an address
/// (the ends then share no family) or a pod is unknown.
fn as_written(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    protocol: u8,
    port: u16,
) -> Option<Explanation> {
    let pods = pods_as_written(cluster);
    let mut unaddressed = Vec::new();
    // Each end as the other side's peer, and the pod whose policies apply to it.
    let mut end = |e: &Endpoint| -> Option<(Peer, Option<PodRef>)> {
        match e {
            Endpoint::Ip(ip) => Some((
                Peer::Addr(*ip),
                cluster.pod_at(*ip, &opts.node_ips).map(|(r, _)| r),
            )),
            Endpoint::Pod(r) => {
                let (_, pod) = pods.iter().find(|(p, _)| p == r)?;
                match pod_ips(pod).first() {
                    Some(ip) => Some((Peer::Addr(*ip), Some(r.clone()))),
                    None => {
                        unaddressed.push(r.clone());
                        Some((Peer::Pod(r.clone()), Some(r.clone())))
                    }
                }
            }
        }
    };
    let (src_peer, src_pod) = end(from)?;
    let (dst_peer, dst_pod) = end(to)?;
    if unaddressed.is_empty() {
        return None;
    }
    let side = |pod: &Option<PodRef>, ingress: bool, peer: &Peer| match pod {
        Some(r) => Side {
            pod: Some(r.clone()),
            local: pods.iter().any(|(p, pod)| p == r && opts.is_local(pod)),
            verdict: direction_verdict_as_written(cluster, opts, r, ingress, peer, protocol, port),
        },
        None => Side {
            pod: None,
            local: false,
            verdict: DirVerdict::NotEnforced,
        },
    };
    let egress = side(&src_pod, false, &dst_peer);
    let ingress = side(&dst_pod, true, &src_peer);
    let allowed = egress.allowed() && ingress.allowed();
    let identity = |p: &Peer| match p {
        Peer::Addr(ip) => VerifiedAs::of(cluster, *ip),
        Peer::Pod(_) => None,
    };
    Some(Explanation {
        from: from.clone(),
        to: to.clone(),
        protocol,
        port,
        addresses: None,
        egress,
        ingress,
        allowed,
        src_identity: identity(&src_peer),
        dst_identity: identity(&dst_peer),
        unaddressed,
    })
}

/// Both sides of a flow whose ends are resolved (`None`: they could not be).
fn judge(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    flow: Option<ResolvedFlow>,
    protocol: u8,
    port: u16,
) -> Explanation {
    let not_a_pod = || Side {
        pod: None,
        local: false,
        verdict: DirVerdict::NotEnforced,
    };
    let Some(flow) = flow else {
        return Explanation {
            from: from.clone(),
            to: to.clone(),
            protocol,
            port,
            addresses: None,
            egress: not_a_pod(),
            ingress: not_a_pod(),
            allowed: false,
            src_identity: None,
            dst_identity: None,
            unaddressed: Vec::new(),
        };
    };
    let is_local = |r: &PodRef| {
        cluster
            .policy_pods()
            .iter()
            .any(|(p, pod)| p == r && opts.is_local(pod))
    };
    let side = |pod: &Option<PodRef>, ingress: bool, peer: IpAddr| match pod {
        Some(r) => Side {
            pod: Some(r.clone()),
            local: is_local(r),
            verdict: direction_verdict(cluster, opts, r, ingress, peer, protocol, port),
        },
        None => not_a_pod(),
    };
    let egress = side(&flow.src_pod, false, flow.dst);
    let ingress = side(&flow.dst_pod, true, flow.src);
    let allowed = egress.allowed() && ingress.allowed();
    Explanation {
        from: from.clone(),
        to: to.clone(),
        protocol,
        port,
        addresses: Some((flow.src, flow.dst)),
        egress,
        ingress,
        allowed,
        src_identity: VerifiedAs::of(cluster, flow.src),
        dst_identity: VerifiedAs::of(cluster, flow.dst),
        unaddressed: Vec::new(),
    }
}

/// How a flow's destination reaches a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// One of the Service's frontend addresses, on one of its ports.
    Frontend(Frontend),
    /// A node's address on one of the Service's node ports.
    NodePort,
}

/// One pod a Service's selector picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub pod: PodRef,
    pub outcome: BackendOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendOutcome {
    /// The flow as kube-proxy forwards it to this backend (its address, the target port).
    Judged(Box<Explanation>),
    /// Not an endpoint of the Service port, and why (a named target port it does not declare,
    /// no address of the flow's family).
    NotABackend(String),
}

/// The backends of a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backends {
    /// The Service has no selector: its endpoints are managed by someone else.
    Unknown,
    /// The pods its selector picks (running, with an address), in pod order.
    Pods(Vec<Backend>),
}

/// A flow to a Service frontend or node port: kube-proxy translates it to one backend per
/// connection, and that flow is what the policies judge (egress at the source towards the
/// backend, ingress at the backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFlow {
    pub from: Endpoint,
    pub to: IpAddr,
    pub protocol: u8,
    pub port: u16,
    /// `namespace/name`.
    pub service: String,
    pub via: Via,
    /// The Service port the flow arrives on; `None`: none has this port and protocol, so
    /// kube-proxy does not forward it.
    pub service_port: Option<ServicePortSpec>,
    pub backends: Backends,
}

/// The verdict of a Service flow over its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceVerdict {
    /// Allowed to every backend.
    Allowed,
    /// Denied to every backend, or there is none (or no such port).
    Denied,
    /// Allowed to `allowed` of `of` backends: it depends on the one kube-proxy picks.
    Some { allowed: usize, of: usize },
    /// The backends are unknown (no selector).
    Unknown,
}

impl ServiceFlow {
    pub fn verdict(&self) -> ServiceVerdict {
        if self.service_port.is_none() {
            return ServiceVerdict::Denied;
        }
        let Backends::Pods(pods) = &self.backends else {
            return ServiceVerdict::Unknown;
        };
        let judged: Vec<bool> = pods
            .iter()
            .filter_map(|b| match &b.outcome {
                BackendOutcome::Judged(e) => Some(e.allowed),
                BackendOutcome::NotABackend(_) => None,
            })
            .collect();
        let allowed = judged.iter().filter(|a| **a).count();
        if allowed == 0 {
            ServiceVerdict::Denied
        } else if allowed == judged.len() {
            ServiceVerdict::Allowed
        } else {
            ServiceVerdict::Some {
                allowed,
                of: judged.len(),
            }
        }
    }
}

/// The node addresses `explain` knows: the options' and, offline, the `status.hostIP(s)` the
/// pods of the folder name.
fn node_addresses(cluster: &Cluster, opts: &CompileOptions) -> BTreeSet<IpAddr> {
    let mut out: BTreeSet<IpAddr> = opts.node_ips.iter().copied().collect();
    for pod in &cluster.pods {
        out.extend(pod.host_ips.iter().copied());
    }
    out
}

/// `Some` when `to` is a Service frontend address (not also a pod's), or a node address on a
/// Service's node port: the flow judged for each backend. `None`: an ordinary flow
/// ([`explain`]).
pub fn explain_service(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    protocol: u8,
    port: u16,
) -> Option<ServiceFlow> {
    let Endpoint::Ip(dst) = to else { return None };
    let dst = *dst;
    // A pod's address is the pod's, as in the compiled state.
    if cluster.pod_at(dst, &opts.node_ips).is_some() {
        return None;
    }
    let mut seen = BTreeSet::new();
    let services: Vec<_> = cluster
        .services
        .iter()
        .map(|s| parse_service(s).0)
        .filter(|s| seen.insert(s.key()))
        .collect();
    let frontend = services.iter().find_map(|s| {
        let (_, kind) = s.addresses.iter().find(|(a, _)| *a == dst)?;
        let p = s
            .ports
            .iter()
            .find(|p| p.protocol == protocol && p.port == port);
        Some((s, Via::Frontend(*kind), p.cloned()))
    });
    let (svc, via, service_port) = match frontend {
        Some(f) => f,
        None if node_addresses(cluster, opts).contains(&dst) => services.iter().find_map(|s| {
            let p = s
                .ports
                .iter()
                .find(|p| p.protocol == protocol && p.node_port == Some(port))?;
            Some((s, Via::NodePort, Some(p.clone())))
        })?,
        None => return None,
    };
    let mut out = ServiceFlow {
        from: from.clone(),
        to: dst,
        protocol,
        port,
        service: svc.key(),
        via,
        service_port: service_port.clone(),
        backends: Backends::Unknown,
    };
    let (Some(sp), Some(selector)) = (service_port, &svc.selector) else {
        return Some(out);
    };
    // The source, by the address of the destination's family.
    let pods = cluster.policy_pods();
    let source: Option<(Option<PodRef>, IpAddr)> = match from {
        Endpoint::Ip(ip) => (ip.is_ipv4() == dst.is_ipv4())
            .then(|| (cluster.pod_at(*ip, &opts.node_ips).map(|(r, _)| r), *ip)),
        Endpoint::Pod(r) => pods.iter().find(|(p, _)| p == r).and_then(|(_, p)| {
            let ip = pod_ips(p)
                .into_iter()
                .find(|a| a.is_ipv4() == dst.is_ipv4())?;
            Some((Some(r.clone()), ip))
        }),
    };
    let mut backends = Vec::new();
    for (r, pod) in &pods {
        let labels = pod.labels_as_set();
        if r.namespace != svc.namespace || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let target = match &sp.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Named(name) => pod
                .named_ports
                .iter()
                .find(|(n, p, _)| n == name && *p == protocol)
                .map(|(_, _, num)| *num),
        };
        let Some(target) = target else {
            backends.push(Backend {
                pod: r.clone(),
                outcome: BackendOutcome::NotABackend(format!(
                    "it declares no {} container port named {}",
                    protocol_label(protocol),
                    sp.target
                )),
            });
            continue;
        };
        let Some(ip) = pod_ips(pod)
            .into_iter()
            .find(|a| a.is_ipv4() == dst.is_ipv4())
        else {
            backends.push(Backend {
                pod: r.clone(),
                outcome: BackendOutcome::NotABackend(format!(
                    "it has no {} address",
                    if dst.is_ipv4() { "IPv4" } else { "IPv6" }
                )),
            });
            continue;
        };
        let flow = source.clone().map(|(src_pod, src)| ResolvedFlow {
            src_pod,
            src,
            dst_pod: Some(r.clone()),
            dst: ip,
        });
        let e = judge(
            cluster,
            opts,
            from,
            &Endpoint::Pod(r.clone()),
            flow,
            protocol,
            target,
        );
        backends.push(Backend {
            pod: r.clone(),
            outcome: BackendOutcome::Judged(Box::new(e)),
        });
    }
    out.backends = Backends::Pods(backends);
    Some(out)
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(r) => write!(f, "{r}"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Protocol number to its name, for display.
pub fn protocol_label(protocol: u8) -> String {
    match protocol {
        enforcer_common::PROTO_TCP => "TCP".into(),
        enforcer_common::PROTO_UDP => "UDP".into(),
        enforcer_common::PROTO_SCTP => "SCTP".into(),
        enforcer_common::PROTO_ICMP => "ICMP".into(),
        enforcer_common::PROTO_ICMPV6 => "ICMPv6".into(),
        n => format!("proto {n}"),
    }
}

impl fmt::Display for DirVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotEnforced => f.write_str("allowed: no policy applies (not a pod in policy)"),
            Self::SelfTraffic => f.write_str("allowed: traffic of a pod to itself"),
            Self::Host => f.write_str("allowed: traffic with the pod's node"),
            Self::NotIsolated => {
                f.write_str("allowed: not isolated (no policy selects the pod for this direction)")
            }
            Self::Allowed {
                namespace,
                policy,
                index,
            } => write!(f, "allowed by {namespace}/{policy} rule [{index}]"),
            Self::Denied {
                policies,
                refused,
                ignored,
            } => {
                // Refused policies are named with what is wrong (object and field): the fix
                // is there, not in a rule.
                let mut refused_names: Vec<&str> = Vec::new();
                for e in refused {
                    if !refused_names.contains(&e.policy.as_str()) {
                        refused_names.push(&e.policy);
                    }
                }
                let others: Vec<&str> = policies
                    .iter()
                    .map(String::as_str)
                    .filter(|p| !refused_names.contains(p))
                    .collect();
                f.write_str("denied: ")?;
                let mut sep = "";
                if !others.is_empty() {
                    write!(
                        f,
                        "isolated by policies [{}] and no rule allows it",
                        others.join(", ")
                    )?;
                    sep = "; ";
                }
                for name in &refused_names {
                    let why: Vec<String> = refused
                        .iter()
                        .filter(|e| e.policy == *name)
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect();
                    write!(
                        f,
                        "{sep}isolated by refused policy {name}: {}",
                        why.join("; ")
                    )?;
                    sep = "; ";
                }
                if !refused_names.is_empty() {
                    f.write_str(
                        " (a policy the agent cannot understand isolates the pods it selects, \
                         allowing nothing, until it is fixed)",
                    )?;
                }
                write_ignored(f, ignored)
            }
            Self::NoIdentity { policies, ignored } => {
                write!(
                    f,
                    "denied for want of identity: isolated by policies [{}], which require a \
                     verified peer; the peer's address is not bound to a verified identity",
                    policies.join(", ")
                )?;
                write_ignored(f, ignored)
            }
            Self::WouldDrop { policies } => write!(
                f,
                "allowed, but would be dropped by {} (audit): only audit policies isolate the \
                 pod for this direction, and no rule of theirs allows it",
                policies.join(", ")
            ),
        }
    }
}

/// The peer's self-set reserved labels that a rule would have matched, if any.
fn write_ignored(f: &mut fmt::Formatter<'_>, ignored: &[SelfSetLabel]) -> fmt::Result {
    if ignored.is_empty() {
        return Ok(());
    }
    let labels: Vec<String> = ignored
        .iter()
        .map(|l| format!("{}={:?} on {} {}", l.key, l.value, l.kind, l.object))
        .collect();
    write!(
        f,
        "; a rule would match the peer's own label(s) {}, but labels under {RESERVED_LABEL_PREFIX} \
         are never taken from the object: they come only from a verified identity",
        labels.join(", ")
    )
}

/// What an end of a flow is, identity-wise, for the explanation.
fn write_identity(
    f: &mut fmt::Formatter<'_>,
    end: &str,
    who: &str,
    identity: Option<&VerifiedAs>,
) -> fmt::Result {
    match identity {
        Some(id) => writeln!(f, "{end} {who}: verified as {id}"),
        None => writeln!(
            f,
            "{end} {who}: not verified (its address is bound to no verified identity)"
        ),
    }
}

impl fmt::Display for VerifiedAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = protocol_label(self.protocol);
        let port = if matches!(
            self.protocol,
            enforcer_common::PROTO_TCP | enforcer_common::PROTO_UDP | enforcer_common::PROTO_SCTP
        ) {
            format!(" port {}", self.port)
        } else {
            String::new()
        };
        writeln!(f, "flow {} -> {} {proto}{port}", self.from, self.to)?;
        if !self.unaddressed.is_empty() {
            let names: Vec<String> = self.unaddressed.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "addresses: none known for {}: judged by labels, namespace and ports (an ipBlock peer never matches a pod without a known address)",
                names.join(", ")
            )?;
            self.write_sides(f, "")?;
            return writeln!(
                f,
                "verdict: {}",
                if self.allowed { "ALLOWED" } else { "DENIED" }
            );
        }
        let Some((src, dst)) = self.addresses else {
            return writeln!(
                f,
                "verdict: DENIED (the ends have no addresses of a common family, or a pod is unknown)"
            );
        };
        writeln!(f, "addresses: {src} -> {dst}")?;
        // Only the ends that are pods (or verified): an address outside the cluster has no
        // identity to speak of.
        for (end, pod, given, id) in [
            ("source", &self.egress.pod, &self.from, &self.src_identity),
            (
                "destination",
                &self.ingress.pod,
                &self.to,
                &self.dst_identity,
            ),
        ] {
            let who = pod
                .as_ref()
                .map_or_else(|| given.to_string(), ToString::to_string);
            if pod.is_some() || id.is_some() {
                write_identity(f, end, &who, id.as_ref())?;
            }
        }
        self.write_sides(f, "")?;
        let audit = self.would_drop_by();
        if self.allowed && !audit.is_empty() {
            return writeln!(
                f,
                "verdict: ALLOWED (would be dropped by {} (audit))",
                audit.join(", ")
            );
        }
        writeln!(
            f,
            "verdict: {}",
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )
    }
}

impl Explanation {
    /// The audit policies that would drop the flow if they enforced (either side), in order.
    pub fn would_drop_by(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for side in [&self.egress, &self.ingress] {
            if let DirVerdict::WouldDrop { policies } = &side.verdict {
                out.extend(policies.iter().map(String::as_str));
            }
        }
        out
    }

    /// The egress and ingress lines, each after `indent`.
    fn write_sides(&self, f: &mut fmt::Formatter<'_>, indent: &str) -> fmt::Result {
        for (name, side) in [("egress ", &self.egress), ("ingress", &self.ingress)] {
            match &side.pod {
                Some(p) => {
                    let note = if side.local {
                        ""
                    } else {
                        " (not enforced on this node)"
                    };
                    writeln!(f, "{indent}{name} at {p}{note}: {}", side.verdict)?;
                }
                None => writeln!(f, "{indent}{name}: allowed: that end is not a pod")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for ServiceFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = protocol_label(self.protocol);
        writeln!(
            f,
            "flow {} -> {} {proto} port {}",
            self.from, self.to, self.port
        )?;
        let via = match self.via {
            Via::Frontend(kind) => format!("{kind} {}", self.to),
            Via::NodePort => format!("node port {} on node address {}", self.port, self.to),
        };
        writeln!(
            f,
            "destination: Service {} ({via}): kube-proxy translates it to one of the Service's backends, and the policies judge the flow to that backend",
            self.service
        )?;
        let Some(sp) = &self.service_port else {
            writeln!(
                f,
                "no port of the Service is {} {proto}: kube-proxy does not forward it",
                self.port
            )?;
            return writeln!(f, "verdict: DENIED (not forwarded)");
        };
        let name = sp
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        writeln!(
            f,
            "Service port {}{name} {proto} -> target port {}",
            sp.port, sp.target
        )?;
        if self.via == Via::NodePort {
            writeln!(
                f,
                "note: kube-proxy masquerades node-port traffic unless externalTrafficPolicy is Local; the backend then sees its node as the source, which its ingress always allows (judged below with the original source)"
            )?;
        }
        let Backends::Pods(pods) = &self.backends else {
            writeln!(
                f,
                "the Service has no selector: its endpoints are managed outside it, so its backends are unknown to explain (explain the flow to each backend's address)"
            )?;
            return writeln!(f, "verdict: UNKNOWN (backends unknown)");
        };
        if pods.is_empty() {
            writeln!(
                f,
                "no running pod with an address matches the Service's selector: no backend"
            )?;
        }
        for b in pods {
            match &b.outcome {
                BackendOutcome::NotABackend(why) => {
                    writeln!(f, "backend {}: not a backend of this port: {why}", b.pod)?;
                }
                BackendOutcome::Judged(e) => {
                    match e.addresses {
                        Some((src, dst)) => {
                            writeln!(f, "backend {} ({src} -> {dst} port {}):", b.pod, e.port)?
                        }
                        None => writeln!(
                            f,
                            "backend {} (port {}): the source has no address of the destination's family",
                            b.pod, e.port
                        )?,
                    }
                    if e.addresses.is_some() {
                        e.write_sides(f, "  ")?;
                    }
                    writeln!(f, "  -> {}", if e.allowed { "ALLOWED" } else { "DENIED" })?;
                }
            }
        }
        match self.verdict() {
            ServiceVerdict::Allowed => writeln!(f, "verdict: ALLOWED (to every backend)"),
            ServiceVerdict::Denied
                if !pods
                    .iter()
                    .any(|b| matches!(b.outcome, BackendOutcome::Judged(_))) =>
            {
                writeln!(f, "verdict: DENIED (no backend)")
            }
            ServiceVerdict::Denied => writeln!(f, "verdict: DENIED (to every backend)"),
            ServiceVerdict::Some { allowed, of } => writeln!(
                f,
                "verdict: ALLOWED to {allowed} of {of} backends, DENIED to the others (kube-proxy picks one per connection)"
            ),
            ServiceVerdict::Unknown => writeln!(f, "verdict: UNKNOWN (backends unknown)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::shared;
    use enforcer_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::tests::fixtures::*;

    /// A pod with no address (as written) is judged by labels, namespace and named ports, on
    /// either side, and matches no ipBlock, even one covering everything.
    #[test]
    fn a_pod_without_an_address_is_judged_by_labels_and_matches_no_ip_block() {
        let cluster = Cluster {
            namespaces: shared(vec![namespace("x", &[])]),
            pods: shared(vec![
                pod("x", "a", &[("app", "a")], &[], "n1", &[]),
                pod(
                    "x",
                    "b",
                    &[("app", "b")],
                    &[],
                    "n1",
                    &[("http", "TCP", 8080)],
                ),
                pod("x", "c", &[("app", "c")], &["10.0.0.3"], "n1", &[]),
            ]),
            policies: shared(vec![policy(
                "x",
                "b",
                Some(sel(&[("app", "b")])),
                None,
                Some(vec![
                    (
                        Some(vec![pods_peer(None, Some(sel(&[("app", "a")])))]),
                        Some(vec![named(None, "http")]),
                    ),
                    (
                        Some(vec![block_peer("0.0.0.0/0", &[])]),
                        Some(vec![tcp(9999)]),
                    ),
                ]),
                None,
            )]),
            ..Default::default()
        };
        let opts = CompileOptions::default();
        let ep = |n: &str| Endpoint::Pod(PodRef::new("x", n));
        let e = explain(&cluster, &opts, &ep("a"), &ep("b"), PROTO_TCP, 8080);
        assert!(e.allowed, "{e}");
        assert_eq!(
            e.unaddressed,
            [PodRef::new("x", "a"), PodRef::new("x", "b")]
        );
        assert!(
            e.to_string()
                .contains("an ipBlock peer never matches a pod without a known address"),
            "{e}"
        );
        assert!(!explain(&cluster, &opts, &ep("a"), &ep("b"), PROTO_TCP, 8081).allowed);
        assert!(!explain(&cluster, &opts, &ep("a"), &ep("b"), PROTO_TCP, 9999).allowed);
        // A peer with an address is matched by the ipBlock as usual.
        let e = explain(&cluster, &opts, &ep("c"), &ep("b"), PROTO_TCP, 9999);
        assert!(e.allowed, "{e}");
        assert_eq!(e.unaddressed, [PodRef::new("x", "b")]);
    }

    #[test]
    fn explains_each_side() {
        let cluster = Cluster {
            namespaces: shared(vec![namespace("x", &[])]),
            pods: shared(vec![
                pod("x", "a", &[("app", "a")], &["10.0.0.1"], "n1", &[]),
                pod("x", "b", &[("app", "b")], &["10.0.0.2"], "n2", &[]),
            ]),
            policies: shared(vec![policy(
                "x",
                "allow-a",
                Some(sel(&[("app", "b")])),
                None,
                Some(vec![(
                    Some(vec![pods_peer(None, Some(sel(&[("app", "a")])))]),
                    Some(vec![tcp(80)]),
                )]),
                None,
            )]),
            ..Default::default()
        };
        let opts = CompileOptions {
            node_name: Some("n2".into()),
            ..Default::default()
        };
        let (a, b) = (
            Endpoint::Pod(PodRef::new("x", "a")),
            Endpoint::Pod(PodRef::new("x", "b")),
        );
        let e = explain(&cluster, &opts, &a, &b, PROTO_TCP, 80);
        assert!(e.allowed);
        assert_eq!(e.egress.verdict, DirVerdict::NotIsolated);
        assert!(!e.egress.local);
        assert_eq!(
            e.ingress.verdict,
            DirVerdict::Allowed {
                namespace: "x".into(),
                policy: "allow-a".into(),
                index: 0
            }
        );
        let text = e.to_string();
        assert!(text.contains("allowed by x/allow-a rule [0]"), "{text}");
        assert!(text.contains("ALLOWED"), "{text}");
        let e = explain(&cluster, &opts, &a, &b, PROTO_UDP, 80);
        assert!(!e.allowed);
        let text = e.to_string();
        assert!(
            text.contains("isolated by policies [x/allow-a] and no rule allows it"),
            "{text}"
        );
        let e = explain(
            &cluster,
            &opts,
            &Endpoint::Ip("8.8.8.8".parse().unwrap()),
            &a,
            PROTO_TCP,
            80,
        );
        assert!(e.allowed);
        assert_eq!(e.egress.pod, None);
        let e = explain(
            &cluster,
            &opts,
            &Endpoint::Ip("fd00::1".parse().unwrap()),
            &a,
            PROTO_TCP,
            80,
        );
        assert!(!e.allowed && e.addresses.is_none());
    }

    /// x/b admits `enforcer.dev/serviceaccount: frontend`; x/a sets that label on itself, x/c
    /// is verified as x/frontend.
    fn impostor_and_verified() -> Cluster {
        let mut c = Cluster {
            namespaces: shared(vec![namespace("x", &[])]),
            pods: shared(vec![
                pod(
                    "x",
                    "a",
                    &[("enforcer.dev/serviceaccount", "frontend")],
                    &["10.0.0.1"],
                    "n1",
                    &[],
                ),
                pod("x", "b", &[("app", "b")], &["10.0.0.2"], "n1", &[]),
                pod("x", "c", &[], &["10.0.0.3"], "n1", &[]),
            ]),
            policies: shared(vec![policy(
                "x",
                "b-from-frontend",
                Some(sel(&[("app", "b")])),
                None,
                Some(vec![(
                    Some(vec![pods_peer(
                        None,
                        Some(sel(&[("enforcer.dev/serviceaccount", "frontend")])),
                    )]),
                    None,
                )]),
                None,
            )]),
            ..Default::default()
        };
        c.verified.insert(
            "10.0.0.3".parse().unwrap(),
            [
                (
                    "enforcer.dev/serviceaccount".to_string(),
                    "frontend".to_string(),
                ),
                ("enforcer.dev/namespace".to_string(), "x".to_string()),
            ]
            .into(),
        );
        c
    }

    #[test]
    fn explain_tells_verified_from_unverified_and_names_the_ignored_self_set_label() {
        let c = impostor_and_verified();
        let pod = |n: &str| Endpoint::Pod(PodRef::new("x", n));
        let opts = CompileOptions::default();
        let text = explain(&c, &opts, &pod("a"), &pod("b"), PROTO_TCP, 80).to_string();
        for line in [
            "source x/a: not verified (its address is bound to no verified identity)",
            "destination x/b: not verified",
            "ingress at x/b: denied: isolated by policies [x/b-from-frontend] and no rule allows it; a rule would match the peer's own label(s) enforcer.dev/serviceaccount=\"frontend\" on Pod x/a, but labels under enforcer.dev/ are never taken from the object: they come only from a verified identity",
            "verdict: DENIED",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        let text = explain(&c, &opts, &pod("c"), &pod("b"), PROTO_TCP, 80).to_string();
        for line in [
            "source x/c: verified as x/frontend",
            "ingress at x/b: allowed by x/b-from-frontend rule [0]",
            "verdict: ALLOWED",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        // Requiring identity: the impostor is denied for want of it, and its own label is
        // still named; the verified pod passes.
        let strict = CompileOptions {
            require_identity: true,
            ..CompileOptions::default()
        };
        let text = explain(&c, &strict, &pod("a"), &pod("b"), PROTO_TCP, 80).to_string();
        assert!(
            text.contains("denied for want of identity")
                && text.contains("the peer's own label(s) enforcer.dev/serviceaccount"),
            "{text}"
        );
        assert!(explain(&c, &strict, &pod("c"), &pod("b"), PROTO_TCP, 80).allowed);
        // An address outside the cluster has no identity line.
        let text = explain(
            &c,
            &opts,
            &Endpoint::Ip("8.8.8.8".parse().unwrap()),
            &pod("b"),
            PROTO_TCP,
            80,
        )
        .to_string();
        assert!(!text.contains("source 8.8.8.8"), "{text}");
        assert!(!text.contains("peer's own label"), "{text}");
    }

    /// x/client, and two backends of Service shop/web (app=web): b1 declares port "http" as
    /// 8080, b2 as 9090; a policy lets only b1 receive from the client on 8080. b3 (app=web)
    /// declares no "http"; other/b4 (app=web) is in another namespace.
    fn shop() -> Cluster {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let mut client = pod(
            "x",
            "client",
            &[("app", "client")],
            &["10.0.0.1"],
            "n1",
            &[],
        );
        client.status.as_mut().unwrap().host_ip = Some("172.18.0.2".into());
        Cluster {
            namespaces: shared(vec![
                namespace("x", &[]),
                namespace("shop", &[]),
                namespace("other", &[]),
            ]),
            pods: shared(vec![
                client,
                pod(
                    "shop",
                    "b1",
                    &[("app", "web")],
                    &["10.0.1.1"],
                    "n1",
                    &[("http", "TCP", 8080)],
                ),
                pod(
                    "shop",
                    "b2",
                    &[("app", "web")],
                    &["10.0.1.2"],
                    "n2",
                    &[("http", "TCP", 9090)],
                ),
                pod("shop", "b3", &[("app", "web")], &["10.0.1.3"], "n2", &[]),
                pod(
                    "other",
                    "b4",
                    &[("app", "web")],
                    &["10.0.2.4"],
                    "n2",
                    &[("http", "TCP", 8080)],
                ),
            ]),
            policies: shared(vec![policy(
                "shop",
                "web-from-client",
                Some(sel(&[("app", "web")])),
                None,
                Some(vec![(
                    Some(vec![pods_peer(
                        Some(sel(&[])),
                        Some(sel(&[("app", "client")])),
                    )]),
                    Some(vec![tcp(8080)]),
                )]),
                None,
            )]),
            services: shared(vec![
                service(
                    "shop",
                    "web",
                    "NodePort",
                    &["10.96.0.10"],
                    &[("app", "web")],
                    vec![service_port(
                        None,
                        80,
                        Some(IntOrString::String("http".into())),
                        Some(30080),
                    )],
                ),
                service(
                    "shop",
                    "manual",
                    "ClusterIP",
                    &["10.96.0.11"],
                    &[],
                    vec![service_port(None, 80, None, None)],
                ),
            ]),
            ..Default::default()
        }
    }

    fn client() -> Endpoint {
        Endpoint::Pod(PodRef::new("x", "client"))
    }

    fn ip(s: &str) -> Endpoint {
        Endpoint::Ip(s.parse().unwrap())
    }

    fn judged(s: &ServiceFlow) -> Vec<(String, Option<bool>)> {
        let Backends::Pods(pods) = &s.backends else {
            panic!("backends unknown")
        };
        pods.iter()
            .map(|b| {
                let allowed = match &b.outcome {
                    BackendOutcome::Judged(e) => Some(e.allowed),
                    BackendOutcome::NotABackend(_) => None,
                };
                (b.pod.to_string(), allowed)
            })
            .collect()
    }

    #[test]
    fn a_flow_to_a_cluster_ip_is_judged_for_each_backend_on_its_target_port() {
        let c = shop();
        let opts = CompileOptions::default();
        let s = explain_service(&c, &opts, &client(), &ip("10.96.0.10"), PROTO_TCP, 80)
            .expect("a Service frontend");
        assert_eq!(s.service, "shop/web");
        assert_eq!(s.via, Via::Frontend(Frontend::ClusterIp));
        assert_eq!(
            judged(&s),
            [
                ("shop/b1".to_string(), Some(true)),
                ("shop/b2".to_string(), Some(false)),
                ("shop/b3".to_string(), None),
            ],
            "the selector picks pods of the Service's namespace only"
        );
        let Backends::Pods(pods) = &s.backends else {
            unreachable!()
        };
        let BackendOutcome::Judged(b2) = &pods[1].outcome else {
            unreachable!()
        };
        assert_eq!(b2.port, 9090, "the named target port, resolved on b2");
        assert_eq!(s.verdict(), ServiceVerdict::Some { allowed: 1, of: 2 });
        let text = s.to_string();
        for line in [
            "destination: Service shop/web (cluster IP 10.96.0.10)",
            "Service port 80 TCP -> target port \"http\"",
            "backend shop/b1 (10.0.0.1 -> 10.0.1.1 port 8080):",
            "  ingress at shop/b1: allowed by shop/web-from-client rule [0]",
            "backend shop/b2 (10.0.0.1 -> 10.0.1.2 port 9090):",
            "  ingress at shop/b2: denied: isolated by policies [shop/web-from-client] and no rule allows it",
            "backend shop/b3: not a backend of this port: it declares no TCP container port named \"http\"",
            "verdict: ALLOWED to 1 of 2 backends, DENIED to the others",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn a_flow_to_a_node_address_on_a_node_port_is_a_service_flow() {
        let c = shop();
        // The node's address, known from a pod's status.hostIP offline.
        let s = explain_service(
            &c,
            &CompileOptions::default(),
            &client(),
            &ip("172.18.0.2"),
            PROTO_TCP,
            30080,
        )
        .expect("a node port");
        assert_eq!((s.via, s.service.as_str()), (Via::NodePort, "shop/web"));
        assert_eq!(s.service_port.as_ref().map(|p| p.port), Some(80));
        assert!(
            s.to_string()
                .contains("node port 30080 on node address 172.18.0.2")
        );
        // Another port of the node is the node, not a Service.
        assert!(
            explain_service(
                &c,
                &CompileOptions::default(),
                &client(),
                &ip("172.18.0.2"),
                PROTO_TCP,
                30081
            )
            .is_none()
        );
        // A node port is not one on an address that is no node's.
        assert!(
            explain_service(
                &c,
                &CompileOptions::default(),
                &client(),
                &ip("172.18.0.9"),
                PROTO_TCP,
                30080
            )
            .is_none()
        );
    }

    #[test]
    fn a_service_without_selector_has_backends_unknown_to_explain() {
        let c = shop();
        let s = explain_service(
            &c,
            &CompileOptions::default(),
            &client(),
            &ip("10.96.0.11"),
            PROTO_TCP,
            80,
        )
        .unwrap();
        assert_eq!(s.backends, Backends::Unknown);
        assert_eq!(s.verdict(), ServiceVerdict::Unknown);
        let text = s.to_string();
        assert!(text.contains("backends are unknown to explain"), "{text}");
        assert!(text.contains("verdict: UNKNOWN"), "{text}");
    }

    #[test]
    fn a_port_the_service_does_not_have_is_not_forwarded() {
        let c = shop();
        let s = explain_service(
            &c,
            &CompileOptions::default(),
            &client(),
            &ip("10.96.0.10"),
            PROTO_UDP,
            80,
        )
        .unwrap();
        assert_eq!(s.service_port, None);
        assert_eq!(s.verdict(), ServiceVerdict::Denied);
        assert!(
            s.to_string().contains("no port of the Service is 80 UDP"),
            "{s}"
        );
    }

    #[test]
    fn a_service_whose_selector_picks_no_running_pod_has_no_backend() {
        let mut c = shop();
        c.pods.retain(|p| &*p.namespace != "shop");
        let s = explain_service(
            &c,
            &CompileOptions::default(),
            &client(),
            &ip("10.96.0.10"),
            PROTO_TCP,
            80,
        )
        .unwrap();
        assert_eq!(s.verdict(), ServiceVerdict::Denied);
        assert!(
            s.to_string().contains("verdict: DENIED (no backend)"),
            "{s}"
        );
    }

    #[test]
    fn an_address_that_is_no_frontend_is_an_ordinary_flow() {
        let c = shop();
        let o = CompileOptions::default();
        for to in [
            ip("10.0.1.1"),
            ip("8.8.8.8"),
            Endpoint::Pod(PodRef::new("shop", "b1")),
        ] {
            assert!(
                explain_service(&c, &o, &client(), &to, PROTO_TCP, 80).is_none(),
                "{to}"
            );
        }
    }
}
