//! The input of the compiler: the API objects one node needs, as plain values.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    ops::Bound,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::{selector::Labels, state::PodRef, validate::protocol_number};

/// Every object the compiler reads. Sources (the manifests folder, the kube watchers) produce
/// one of these per change; the compiler never does IO.
///
/// Objects are shared (`Arc`): a source's cache, the cluster being enforced and the last valid
/// version of each policy point at one parsed copy, so a change costs a clone of pointers and
/// 10k policies are held once, not three times.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Arc<Namespace>>,
    /// Every pod of the cluster (remote ones are peers), held compactly ([`PodInfo`]).
    pub pods: Vec<Arc<PodInfo>>,
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// The Services: their frontend addresses and node ports, where kube-proxy translates a
    /// pod's packet to a backend after the egress program has seen it.
    pub services: Vec<Arc<Service>>,
    /// Addresses bound to a verified workload identity (the attestation endpoint), with the
    /// reserved labels the identity adds to the pod's labels when it is matched as a peer.
    /// The only source of reserved labels: an object's own are ignored ([`selectable_labels`]).
    pub verified: BTreeMap<IpAddr, BTreeMap<String, String>>,
    /// The cluster-wide policies (Admin and Baseline tiers), in evaluation order
    /// ([`crate::tiers::sort`]).
    pub cluster_policies: Vec<Arc<crate::tiers::ClusterPolicy>>,
    /// The nodes, as far as a `nodes` peer of a cluster policy needs them.
    pub nodes: Vec<Arc<NodeInfo>>,
}

/// What a cluster policy's `nodes` peer reads of a Node: an address of the node is matched by
/// the node's labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` that parse as IP addresses.
    pub addresses: Vec<IpAddr>,
}

impl From<&Node> for NodeInfo {
    /// Name, labels, and the `InternalIP` and `ExternalIP` addresses (host names and DNS names
    /// are not addresses a packet carries), deduplicated in the order listed.
    fn from(node: &Node) -> Self {
        let mut addresses: Vec<IpAddr> = Vec::new();
        let listed = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
            .filter_map(|a| a.address.parse::<IpAddr>().ok());
        for ip in listed {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses,
        }
    }
}

/// Wraps objects for a [`Cluster`] list, converting them to the form it holds (a `Pod` to a
/// [`PodInfo`]).
pub fn shared<T, U: From<T>>(objects: impl IntoIterator<Item = T>) -> Vec<Arc<U>> {
    objects.into_iter().map(|o| Arc::new(U::from(o))).collect()
}

/// What the compiler, the evaluator, `explain` and the identity code read of a pod, and nothing
/// more: every node holds every pod of the cluster, so a pod must cost a few hundred bytes,
/// not a whole API object. Values many pods share (namespace, node name, label set, named
/// ports) are interned ([`crate::intern`]): pods with the same labels point at one copy.
/// Sources convert at the edge (`From<Pod>`); no full Pod is kept.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodInfo {
    /// `metadata.namespace`, `default` when unset.
    pub namespace: Arc<str>,
    pub name: Box<str>,
    /// `metadata.uid`, when set.
    pub uid: Option<Box<str>>,
    /// `spec.nodeName`.
    pub node_name: Option<Arc<str>>,
    /// `spec.serviceAccountName` (or the deprecated `serviceAccount`), when set and not empty:
    /// identity records are checked against it.
    pub service_account: Option<Arc<str>>,
    /// The labels as selectors see them: without the reserved ones the pod sets itself.
    pub labels: Arc<Labels>,
    /// The reserved labels the pod sets itself (ignored for selection, reported), usually none.
    pub own_reserved: Box<[(String, String)]>,
    /// Named container ports ([`crate::compile::named_ports`]).
    pub named_ports: Arc<crate::intern::NamedPorts>,
    /// [`pod_ips`]: `status.podIPs`, then `status.podIP`, deduplicated, parsable ones.
    pub ips: Box<[IpAddr]>,
    /// `status.hostIP(s)`: addresses of its node (what `explain` offline knows of nodes).
    pub host_ips: Box<[IpAddr]>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.phase` is Succeeded or Failed.
    pub terminated: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

impl From<&Pod> for PodInfo {
    fn from(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let own_reserved: Box<[(String, String)]> = own_reserved_labels(meta.labels.as_ref())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Self {
            namespace: crate::intern::str(&super::validate::namespace_of(meta)),
            name: meta.name.as_deref().unwrap_or_default().into(),
            uid: meta.uid.as_deref().map(Into::into),
            node_name: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .map(crate::intern::str),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.service_account_name
                        .as_deref()
                        .or(s.service_account.as_deref())
                })
                .filter(|s| !s.is_empty())
                .map(crate::intern::str),
            labels: crate::intern::labels(selectable_labels(meta.labels.as_ref())),
            own_reserved,
            named_ports: crate::intern::named_ports(crate::compile::named_ports(pod)),
            ips: status_ips(pod).into_boxed_slice(),
            host_ips: pod
                .status
                .iter()
                .flat_map(|st| {
                    st.host_ips
                        .iter()
                        .flatten()
                        .map(|h| h.ip.as_str())
                        .chain(st.host_ip.as_deref())
                })
                .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
                .collect(),
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            terminated: matches!(phase, Some("Succeeded" | "Failed")),
            terminating: meta.deletion_timestamp.is_some(),
        }
    }
}

impl From<Pod> for PodInfo {
    fn from(pod: Pod) -> Self {
        Self::from(&pod)
    }
}

impl PodInfo {
    /// The labels as the object sets them: the selectable ones and its own reserved ones.
    pub fn labels_as_set(&self) -> Labels {
        let mut l = (*self.labels).clone();
        l.extend(self.own_reserved.iter().cloned());
        l
    }
}

/// A NetworkPolicy annotated `enforcer.dev/require-identity: "true"` matches a pod or namespace
/// peer only when that peer's address is bound to a verified identity.
pub const ANNOTATION_REQUIRE_IDENTITY: &str = "enforcer.dev/require-identity";

/// Whether `policy` asks for verified peers (itself, or every policy with `--require-identity`).
pub fn requires_identity(policy: &NetworkPolicy, require_all: bool) -> bool {
    require_all
        || policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REQUIRE_IDENTITY))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A NetworkPolicy annotated `enforcer.dev/audit: "true"`, or any policy of a Namespace so
/// annotated, audits: what it alone would deny is allowed and reported as would-drop, and
/// enforcement is exactly as if it did not exist.
pub const ANNOTATION_AUDIT: &str = "enforcer.dev/audit";

/// Whether `meta` carries [`ANNOTATION_AUDIT`] set to `true`.
pub fn audit_annotated(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_AUDIT))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

impl Cluster {
    /// Whether `policy` audits rather than enforces: every policy does with `--audit`
    /// (`audit_all`), else the policy's own annotation or its namespace's.
    pub fn policy_audits(&self, policy: &NetworkPolicy, audit_all: bool) -> bool {
        audit_all
            || audit_annotated(&policy.metadata)
            || self
                .namespace_object(&crate::validate::namespace_of(&policy.metadata))
                .is_some_and(|n| audit_annotated(&n.metadata))
    }
}

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Labels under this prefix are reserved for verified identity: they come only from
/// [`Cluster::verified`], never from the Pod or Namespace object that carries them, so a pod
/// cannot claim an identity by labelling itself (nor shed one: its own value is never seen).
pub const RESERVED_LABEL_PREFIX: &str = "enforcer.dev/";
/// The reserved label of a verified address naming its service account (as the agent's
/// identity module sets it).
pub const LABEL_SERVICE_ACCOUNT: &str = "enforcer.dev/serviceaccount";
/// The reserved label of a verified address naming its namespace.
pub const LABEL_NAMESPACE: &str = "enforcer.dev/namespace";

/// Whether `key` is a reserved label key.
pub fn is_reserved_label(key: &str) -> bool {
    key.starts_with(RESERVED_LABEL_PREFIX)
}

/// The reserved labels an object carries itself (ignored for selection), in key order. A range
/// of the sorted map, so an object without any costs one lookup.
pub fn own_reserved_labels(
    labels: Option<&BTreeMap<String, String>>,
) -> impl Iterator<Item = (&str, &str)> {
    labels.into_iter().flat_map(|l| {
        l.range::<str, _>((Bound::Included(RESERVED_LABEL_PREFIX), Bound::Unbounded))
            .take_while(|(k, _)| is_reserved_label(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    })
}

/// An object's labels as selectors see them: without the reserved ones it carries itself.
/// Compiler and evaluator both read pod and namespace labels through this.
pub fn selectable_labels(labels: Option<&BTreeMap<String, String>>) -> Labels {
    let mut out = labels.cloned().unwrap_or_default();
    if own_reserved_labels(labels).next().is_some() {
        out.retain(|k, _| !is_reserved_label(k));
    }
    out
}

/// A pod's labels as selectors see them ([`selectable_labels`]); a verified address adds the
/// reserved labels of its identity when the pod is matched as a peer.
pub fn pod_labels(pod: &PodInfo) -> Labels {
    (*pod.labels).clone()
}

/// A reserved label that a Pod or Namespace object carries itself: ignored for selection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SelfSetLabel {
    /// `Pod` or `Namespace`.
    pub kind: &'static str,
    /// `namespace/name` of a pod, the name of a namespace.
    pub object: String,
    pub key: String,
    pub value: String,
}

impl fmt::Display for SelfSetLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: label {}={:?} ignored: labels under {RESERVED_LABEL_PREFIX} come only from a verified identity, never from the object",
            self.kind, self.object, self.key, self.value
        )
    }
}

/// The self-set reserved labels of one object.
fn self_set(kind: &'static str, object: String, meta: &ObjectMeta) -> Vec<SelfSetLabel> {
    own_reserved_labels(meta.labels.as_ref())
        .map(|(k, v)| SelfSetLabel {
            kind,
            object: object.clone(),
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect()
}

/// The reserved labels of a pod's own object ([`SelfSetLabel`]).
pub fn pod_self_set_labels(pod: &PodInfo) -> Vec<SelfSetLabel> {
    if pod.own_reserved.is_empty() {
        return Vec::new();
    }
    let object = pod_ref(pod).to_string();
    pod.own_reserved
        .iter()
        .map(|(k, v)| SelfSetLabel {
            kind: "Pod",
            object: object.clone(),
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// The reserved labels of a namespace's own object ([`SelfSetLabel`]), of the first object of
/// that name.
pub fn namespace_self_set_labels(cluster: &Cluster, namespace: &str) -> Vec<SelfSetLabel> {
    cluster
        .namespace_object(namespace)
        .map(|n| self_set("Namespace", namespace.to_string(), &n.metadata))
        .unwrap_or_default()
}

/// Every reserved label that a Pod or Namespace object of `cluster` carries itself, namespaces
/// first: what `compile` and `explain` warn about and the agent logs.
pub fn self_set_labels(cluster: &Cluster) -> Vec<SelfSetLabel> {
    let namespaces = cluster.namespaces.iter().flat_map(|n| {
        let name = n.metadata.name.clone().unwrap_or_default();
        self_set("Namespace", name, &n.metadata)
    });
    let pods = cluster.pods.iter().flat_map(|p| pod_self_set_labels(p));
    namespaces.chain(pods).collect()
}

/// The pods of `old` not in `new` (gone) and those of `new` not in `old` (came), as objects.
/// Sources keep their pods in a stable order and unchanged pods as the same shared objects, so
/// they are found by address without hashing them, past the common head and tail at once.
pub fn pods_changed<'a>(
    old: &'a [Arc<PodInfo>],
    new: &'a [Arc<PodInfo>],
) -> (Vec<&'a Arc<PodInfo>>, Vec<&'a Arc<PodInfo>>) {
    let head = old
        .iter()
        .zip(new)
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let (o, n) = (&old[head..], &new[head..]);
    let tail = o
        .iter()
        .rev()
        .zip(n.iter().rev())
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let (o, n) = (&o[..o.len() - tail], &n[..n.len() - tail]);
    let ptr = |p: &Arc<PodInfo>| Arc::as_ptr(p) as usize;
    let before: std::collections::HashSet<usize> = o.iter().map(ptr).collect();
    let after: std::collections::HashSet<usize> = n.iter().map(ptr).collect();
    let gone = o.iter().filter(|p| !after.contains(&ptr(p))).collect();
    let came = n.iter().filter(|p| !before.contains(&ptr(p))).collect();
    (gone, came)
}

/// `PodRef` of a pod (namespace `default` when unset).
pub fn pod_ref(pod: &PodInfo) -> PodRef {
    PodRef::new(pod.namespace.to_string(), pod.name.to_string())
}

/// The pod's addresses: `status.podIPs`, then `status.podIP`, deduplicated, unparsable ones
/// left out.
pub fn pod_ips(pod: &PodInfo) -> Vec<IpAddr> {
    pod.ips.to_vec()
}

/// [`pod_ips`] of an API object.
fn status_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = Vec::new();
    let all = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref());
    for s in all {
        if let Ok(ip) = s.trim().parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Whether a pod takes part in policy at all: not host-network (its addresses are the node's),
/// not terminated (Succeeded / Failed: its address may already belong to another pod), and
/// with at least one address.
pub fn pod_is_policy_pod(pod: &PodInfo) -> bool {
    !pod.host_network && !pod.terminated && !pod.ips.is_empty()
}

/// `spec.nodeName` of a pod.
pub fn pod_node(pod: &PodInfo) -> Option<&str> {
    pod.node_name.as_deref()
}

impl Cluster {
    /// The first Namespace object named `namespace`.
    fn namespace_object(&self, namespace: &str) -> Option<&Namespace> {
        self.namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(namespace))
            .map(|n| &**n)
    }

    /// Labels of a namespace as selectors see them: the declared labels (of the first object of
    /// that name) without the reserved ones it sets itself ([`selectable_labels`]), plus
    /// `kubernetes.io/metadata.name`. Undeclared namespaces have only that label.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = selectable_labels(
            self.namespace_object(namespace)
                .and_then(|n| n.metadata.labels.as_ref()),
        );
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// [`Cluster::namespace_labels`] with the object's own reserved labels kept: only for
    /// explaining what ignoring them changed.
    pub fn namespace_labels_as_set(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespace_object(namespace)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// The pods that take part in policy ([`pod_is_policy_pod`]), one per `PodRef` (the first
    /// object of a name wins), ordered by `PodRef`.
    pub fn policy_pods(&self) -> Vec<(PodRef, &PodInfo)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for pod in &self.pods {
            let r = pod_ref(pod);
            if seen.insert(r.clone()) && pod_is_policy_pod(pod) {
                out.push((r, &**pod));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The labels of the node that owns `ip` (the first node listing it), if any.
    pub fn node_labels_at(&self, ip: IpAddr) -> Option<&Labels> {
        self.nodes
            .iter()
            .find(|n| n.addresses.contains(&ip))
            .map(|n| &n.labels)
    }

    /// The labels a `nodes` peer sees at `ip`. The node's own addresses (`node_ips`) are this
    /// node's, the Node named `node_name`, whether or not its object lists them (the agent's
    /// addresses come from its interfaces); without that Node, and for every other address,
    /// the first node listing the address.
    pub fn node_labels_seen(
        &self,
        ip: IpAddr,
        node_name: Option<&str>,
        node_ips: &[IpAddr],
    ) -> Option<&Labels> {
        let own = node_name
            .filter(|_| node_ips.contains(&ip))
            .and_then(|name| self.nodes.iter().find(|n| n.name == name));
        own.map(|n| &n.labels).or_else(|| self.node_labels_at(ip))
    }

    /// The pod that owns `ip`, if any: the first by `PodRef` among policy pods listing it.
    /// Node addresses (`node_ips`) belong to no pod.
    pub fn pod_at(&self, ip: IpAddr, node_ips: &[IpAddr]) -> Option<(PodRef, &PodInfo)> {
        if node_ips.contains(&ip) {
            return None;
        }
        self.policy_pods()
            .into_iter()
            .find(|(_, p)| p.ips.contains(&ip))
    }
}

/// How a Service frontend address is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frontend {
    /// `spec.clusterIPs` / `spec.clusterIP`.
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "cluster IP",
            Self::ExternalIp => "external IP",
            Self::LoadBalancer => "load-balancer IP",
        })
    }
}

/// A Service port's target on the backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per backend pod.
    Named(String),
}

impl std::fmt::Display for TargetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Named(n) => write!(f, "{n:?}"),
        }
    }
}

/// One element of `spec.ports`, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub protocol: u8,
    pub port: u16,
    /// Only for type NodePort and LoadBalancer (another type's is not opened by kube-proxy).
    pub node_port: Option<u16>,
    pub target: TargetPort,
}

/// A Service as the compiler and `explain` read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedService {
    pub namespace: String,
    pub name: String,
    /// Frontend addresses, in field order, each once.
    pub addresses: Vec<(IpAddr, Frontend)>,
    pub ports: Vec<ServicePortSpec>,
    /// `spec.selector`; `None` when absent or empty: the Service's endpoints are managed by
    /// someone else, so its backends are not known from the objects.
    pub selector: Option<BTreeMap<String, String>>,
}

impl ParsedService {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One problem in one Service: the object (`namespace/name`), the field path and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    pub service: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service {}: {}: {}",
            self.service, self.field, self.message
        )
    }
}

impl std::error::Error for ServiceError {}

/// Parses a Service; what cannot be read is left out of the result and named in the errors
/// (a frontend left out is judged as the address it is, never deferred to a backend).
pub fn parse_service(svc: &Service) -> (ParsedService, Vec<ServiceError>) {
    let namespace = crate::validate::namespace_of(&svc.metadata);
    let name = svc.metadata.name.clone().unwrap_or_default();
    let mut out = ParsedService {
        namespace,
        name,
        ..ParsedService::default()
    };
    let mut errors = Vec::new();
    let key = out.key();
    let mut err = |field: String, message: String| {
        errors.push(ServiceError {
            service: key.clone(),
            field,
            message,
        });
    };
    let add = |out: &mut ParsedService, ip: IpAddr, kind: Frontend| {
        if !out.addresses.iter().any(|(a, _)| *a == ip) {
            out.addresses.push((ip, kind));
        }
    };
    let spec = svc.spec.as_ref();
    // "clusterIPs ... If this field is not specified, it will be initialized from the
    // clusterIP field"; "None" (headless) and "" (ExternalName, not allocated) are no address.
    let cluster_ips: Vec<(String, &str)> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .and_then(|s| s.cluster_ip.as_deref())
            .map(|ip| ("spec.clusterIP".to_string(), ip))
            .into_iter()
            .collect(),
    };
    for (field, ip) in cluster_ips {
        let ip = ip.trim();
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(a) => add(&mut out, a, Frontend::ClusterIp),
            Err(_) => err(field, format!("{ip:?} is not an IP address (nor \"None\")")),
        }
    }
    for (i, ip) in spec
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        match ip.trim().parse::<IpAddr>() {
            Ok(a) => add(&mut out, a, Frontend::ExternalIp),
            Err(_) => err(
                format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            ),
        }
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    for (i, lb) in ingress.into_iter().flatten().enumerate() {
        // "Proxy": the load balancer itself forwards to the nodes and kube-proxy does not
        // translate the address, so a packet to it leaves the node as sent: judged as that
        // address, not deferred.
        if lb.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        let Some(ip) = &lb.ip else { continue };
        match ip.trim().parse::<IpAddr>() {
            Ok(a) => add(&mut out, a, Frontend::LoadBalancer),
            Err(_) => err(
                format!("status.loadBalancer.ingress[{i}].ip"),
                format!("{ip:?} is not an IP address"),
            ),
        }
    }
    let with_node_ports = matches!(
        spec.and_then(|s| s.type_.as_deref()),
        Some("NodePort" | "LoadBalancer")
    );
    for (i, p) in spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("spec.ports[{i}]");
        let number = |field: &str, n: i32, err: &mut dyn FnMut(String, String)| {
            let ok = u16::try_from(n).ok().filter(|n| *n != 0);
            if ok.is_none() {
                err(
                    format!("{at}.{field}"),
                    format!("{n} is not a port number (1-65535)"),
                );
            }
            ok
        };
        let Some(protocol) = protocol_number(p.protocol.as_deref()) else {
            err(
                format!("{at}.protocol"),
                format!(
                    "{:?} is not a protocol (TCP, UDP or SCTP)",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
            continue;
        };
        let Some(port) = number("port", p.port, &mut err) else {
            continue;
        };
        // 0 is "allocate one": nothing allocates in a manifests folder, so no node port.
        let node_port = match p.node_port.filter(|n| with_node_ports && *n != 0) {
            Some(n) => match number("nodePort", n, &mut err) {
                Some(n) => Some(n),
                None => continue,
            },
            None => None,
        };
        // "If this is not specified, the value of the 'port' field is used."
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match number("targetPort", *n, &mut err) {
                Some(n) => TargetPort::Number(n),
                None => continue,
            },
            Some(IntOrString::String(s)) if s.trim().is_empty() => {
                err(format!("{at}.targetPort"), "an empty port name".to_string());
                continue;
            }
            Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
        };
        out.ports.push(ServicePortSpec {
            name: p.name.clone(),
            protocol,
            port,
            node_port,
            target,
        });
    }
    out.selector = spec
        .and_then(|s| s.selector.clone())
        .filter(|s| !s.is_empty());
    (out, errors)
}

/// Validates a Service; `Err` lists every problem found.
pub fn validate_service(svc: &Service) -> Result<(), Vec<ServiceError>> {
    let (_, errors) = parse_service(svc);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
