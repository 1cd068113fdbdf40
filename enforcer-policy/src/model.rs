//! The input of the compiler: the API objects one node needs, as plain values.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};

use crate::state::PodRef;

/// Every object the compiler reads. Sources (the manifests folder, the kube watchers) produce
/// one of these per change; the compiler never does IO.
///
/// Objects are shared (`Arc`): a source's cache, the cluster being enforced and the last valid
/// version of each policy point at one parsed copy, so a change costs a clone of pointers and
/// 10k policies are held once, not three times.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// Addresses bound to a verified workload identity (the attestation endpoint), with the
    /// reserved labels the identity adds to the pod's labels when it is matched as a peer.
    pub verified: BTreeMap<IpAddr, BTreeMap<String, String>>,
}

/// Wraps objects for a [`Cluster`] list.
pub fn shared<T>(objects: impl IntoIterator<Item = T>) -> Vec<Arc<T>> {
    objects.into_iter().map(Arc::new).collect()
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

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `PodRef` of a pod (namespace `default` when unset).
pub fn pod_ref(pod: &Pod) -> PodRef {
    PodRef::new(
        super::validate::namespace_of(&pod.metadata),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// The pod's addresses: `status.podIPs`, then `status.podIP`, deduplicated, unparsable ones
/// left out.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
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
pub fn pod_is_policy_pod(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_network && !matches!(phase, Some("Succeeded" | "Failed")) && !pod_ips(pod).is_empty()
}

/// `spec.nodeName` of a pod.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

impl Cluster {
    /// Labels of a namespace as the API server has them: the declared labels (of the first
    /// object of that name) plus `kubernetes.io/metadata.name`. Undeclared namespaces have only
    /// that label.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(namespace))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// The pods that take part in policy ([`pod_is_policy_pod`]), one per `PodRef` (the first
    /// object of a name wins), ordered by `PodRef`.
    pub fn policy_pods(&self) -> Vec<(PodRef, &Pod)> {
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

    /// The pod that owns `ip`, if any: the first by `PodRef` among policy pods listing it.
    /// Node addresses (`node_ips`) belong to no pod.
    pub fn pod_at(&self, ip: IpAddr, node_ips: &[IpAddr]) -> Option<(PodRef, &Pod)> {
        if node_ips.contains(&ip) {
            return None;
        }
        self.policy_pods()
            .into_iter()
            .find(|(_, p)| pod_ips(p).contains(&ip))
    }
}
