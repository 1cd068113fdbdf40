//! What operators see: health, readiness and metrics over HTTP, and the flow log of verdict
//! events.

pub mod flowlog;
pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod report;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use enforcer_policy::{
    model::{
        Cluster, LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, PodInfo, pod_ips, pod_is_policy_pod,
        pod_ref,
    },
    state::DesiredState,
};

/// What the observers name things with: the state enforced now, the pods behind endpoint ids
/// and addresses, and the verified identities. The control loop publishes it after each
/// compile; the flow log and the per-pod metrics read it.
///
/// Built for every compile of a cluster that may have 100k pods, so it copies no string per
/// pod: pods are the cluster's own shared objects, and verified identities share one
/// `Arc<str>` per distinct namespace and service account.
#[derive(Default)]
pub struct View {
    /// The state enforced now (shared with the control loop, not copied).
    pub state: Arc<DesiredState>,
    /// Endpoint id -> pod, for the per-pod metrics (local pods only).
    pub pods_by_endpoint: BTreeMap<u32, String>,
    /// Address -> the pod that owns it, local or on another node (the compiler's owner: the
    /// first by namespace/name among pods in policy; never a node address).
    pub pods_by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    /// Addresses bound to a verified identity now.
    pub verified: HashMap<IpAddr, Verified>,
}

/// A verified identity, as the flow log and `/metrics` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

/// What the flow log says of one end: the verified identity of its address, or else what its
/// pod object claims (`spec.serviceAccountName`), marked unverified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndIdentity<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub verified: bool,
}

/// The verified pods the agent names on `/metrics` (local ones; remote ones are counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifiedPods {
    /// (namespace, pod, service account) of the local pods with a verified address.
    pub local: BTreeSet<(String, String, String)>,
    /// Pods on other nodes with a verified address.
    pub remote: u64,
}

/// `spec.serviceAccountName` as the pod object claims it: `default` when unset, as the API
/// server's ServiceAccount admission sets it (a manifests folder skips admission).
fn claimed_service_account(pod: &PodInfo) -> &str {
    pod.service_account.as_deref().unwrap_or("default")
}

/// The one `Arc<str>` of `s` in `names`.
fn intern<'a>(names: &mut HashMap<&'a str, Arc<str>>, s: &'a str) -> Arc<str> {
    Arc::clone(names.entry(s).or_insert_with(|| s.into()))
}

/// Whether `a` sorts before `b` by namespace/name, without building either name.
fn before(a: &PodInfo, b: &PodInfo) -> bool {
    (&*a.namespace, &*a.name) < (&*b.namespace, &*b.name)
}

impl View {
    /// The view of `state`, compiled from `cluster` for a node with addresses `node_ips`.
    pub fn build(state: &Arc<DesiredState>, cluster: &Cluster, node_ips: &[IpAddr]) -> Self {
        let pods_by_endpoint = state
            .endpoints
            .iter()
            .map(|(pod, ep)| (ep.info.id, pod.to_string()))
            .collect();
        let mut pods_by_ip: HashMap<IpAddr, Arc<PodInfo>> =
            HashMap::with_capacity(cluster.pods.len());
        for pod in cluster.pods.iter().filter(|p| pod_is_policy_pod(p)) {
            for ip in pod_ips(pod) {
                if node_ips.contains(&ip) {
                    continue;
                }
                // Two pods claiming one address (the compile warns): the one it resolves to.
                pods_by_ip
                    .entry(ip)
                    .and_modify(|kept| {
                        if before(pod, kept) {
                            *kept = Arc::clone(pod);
                        }
                    })
                    .or_insert_with(|| Arc::clone(pod));
            }
        }
        // One `Arc<str>` per distinct name: many pods share a service account.
        let mut names: HashMap<&str, Arc<str>> = HashMap::new();
        let verified = cluster
            .verified
            .iter()
            .map(|(ip, labels)| {
                let get = |k: &str| labels.get(k).map_or("", String::as_str);
                (
                    *ip,
                    Verified {
                        namespace: intern(&mut names, get(LABEL_NAMESPACE)),
                        service_account: intern(&mut names, get(LABEL_SERVICE_ACCOUNT)),
                    },
                )
            })
            .collect();
        Self {
            state: Arc::clone(state),
            pods_by_endpoint,
            pods_by_ip,
            verified,
        }
    }

    /// `namespace/name` of the pod at `ip`, local or remote.
    pub fn pod_name(&self, ip: IpAddr) -> Option<String> {
        self.pods_by_ip.get(&ip).map(|p| pod_ref(p).to_string())
    }

    /// The identity of the end at `ip`: verified, or as its pod claims it; `None` for an
    /// address that is neither verified nor a pod's.
    pub fn identity(&self, ip: IpAddr) -> Option<EndIdentity<'_>> {
        if let Some(v) = self.verified.get(&ip) {
            return Some(EndIdentity {
                namespace: &v.namespace,
                service_account: &v.service_account,
                verified: true,
            });
        }
        let pod = self.pods_by_ip.get(&ip)?;
        Some(EndIdentity {
            namespace: &pod.namespace,
            service_account: claimed_service_account(pod),
            verified: false,
        })
    }

    /// The pods with a verified address: the local ones (those with an endpoint) named, the
    /// others counted. A pod verified at two addresses counts once.
    pub fn verified_pods(&self) -> VerifiedPods {
        let local_ips: BTreeSet<IpAddr> = self
            .state
            .endpoints
            .values()
            .flat_map(|ep| ep.ips.iter().copied())
            .collect();
        let mut out = VerifiedPods::default();
        let mut remote: BTreeSet<*const PodInfo> = BTreeSet::new();
        for (ip, v) in &self.verified {
            let Some(pod) = self.pods_by_ip.get(ip) else {
                continue;
            };
            if local_ips.contains(ip) {
                out.local.insert((
                    pod.namespace.to_string(),
                    pod.name.to_string(),
                    v.service_account.to_string(),
                ));
            } else {
                remote.insert(Arc::as_ptr(pod));
            }
        }
        out.remote = remote.len() as u64;
        out
    }
}
