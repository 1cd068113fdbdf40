//! What operators see: health, readiness and metrics over HTTP, and the flow log of verdict
//! events.

pub mod flowlog;
pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod report;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use enforcer_policy::{
    model::{
        Cluster, LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, PodInfo, pod_ips, pod_is_policy_pod,
        pod_ref, pods_changed,
    },
    state::DesiredState,
};

/// What the observers name things with: the state enforced now, the pods behind endpoint ids
/// and addresses, and the verified identities. The control loop publishes it after each
/// compile; the flow log and the per-pod metrics read it.
///
/// Updated for every compile of a cluster that may have 100k pods, so it copies no string per
/// pod and follows the pods that changed (see [`View::update`]): pods are the cluster's own shared objects, and verified identities share one
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
    /// The pods indexed, as of the last update.
    pods: Vec<Arc<PodInfo>>,
    /// The node's addresses the index leaves out.
    node_ips: Vec<IpAddr>,
    /// Addresses more than one pod claims (then an update indexes anew).
    shared_ips: HashSet<IpAddr>,
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

/// A changed pod list is indexed anew, rather than updated, when more than one pod in this many
/// came or went.
const REBUILD_SHARE: usize = 8;

impl View {
    /// The view of `state`, compiled from `cluster` for a node with addresses `node_ips`.
    pub fn build(state: &Arc<DesiredState>, cluster: &Cluster, node_ips: &[IpAddr]) -> Self {
        let mut view = Self::default();
        view.update(state, cluster, node_ips);
        view
    }

    /// Makes this the view of `state` compiled from `cluster`. The address index follows the
    /// pods that came and went since the last update (found by object, as the sources keep
    /// unchanged pods as the same shared objects in the same order), so one pod event costs
    /// its own addresses, not a walk of every pod; anything less simple is indexed anew.
    pub fn update(&mut self, state: &Arc<DesiredState>, cluster: &Cluster, node_ips: &[IpAddr]) {
        self.pods_by_endpoint = state
            .endpoints
            .iter()
            .map(|(pod, ep)| (ep.info.id, pod.to_string()))
            .collect();
        if self.node_ips != node_ips || !self.follow(&cluster.pods) {
            self.index(&cluster.pods, node_ips);
        }
        self.pods = cluster.pods.clone();
        // One `Arc<str>` per distinct name: many pods share a service account.
        let mut names: HashMap<&str, Arc<str>> = HashMap::new();
        self.verified = cluster
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
        self.state = Arc::clone(state);
    }

    /// Indexes every pod's addresses.
    fn index(&mut self, pods: &[Arc<PodInfo>], node_ips: &[IpAddr]) {
        self.node_ips = node_ips.to_vec();
        self.shared_ips.clear();
        self.pods_by_ip = HashMap::with_capacity(pods.len());
        for pod in pods.iter().filter(|p| pod_is_policy_pod(p)) {
            for ip in pod_ips(pod) {
                if node_ips.contains(&ip) {
                    continue;
                }
                // Two pods claiming one address (the compile warns): the one it resolves to.
                match self.pods_by_ip.entry(ip) {
                    std::collections::hash_map::Entry::Occupied(mut kept) => {
                        self.shared_ips.insert(ip);
                        if before(pod, kept.get()) {
                            kept.insert(Arc::clone(pod));
                        }
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Arc::clone(pod));
                    }
                }
            }
        }
    }

    /// Updates the address index from the last pods to `pods`; `false` when the change is not
    /// one it follows (many pods, or an address two pods claim), the index then untouched.
    fn follow(&mut self, pods: &[Arc<PodInfo>]) -> bool {
        if self.pods.is_empty() && !pods.is_empty() {
            return false;
        }
        let (gone, came) = pods_changed(&self.pods, pods);
        if (gone.len() + came.len()) * REBUILD_SHARE > pods.len().max(64) {
            return false;
        }
        let addresses = |p: &&Arc<PodInfo>| {
            pod_is_policy_pod(p)
                .then(|| pod_ips(p))
                .unwrap_or_default()
                .into_iter()
                .filter(|ip| !self.node_ips.contains(ip))
        };
        let gone: Vec<(&Arc<PodInfo>, IpAddr)> = gone
            .into_iter()
            .flat_map(|p| addresses(&p).map(move |ip| (p, ip)))
            .collect();
        let came: Vec<(&Arc<PodInfo>, IpAddr)> = came
            .into_iter()
            .flat_map(|p| addresses(&p).map(move |ip| (p, ip)))
            .collect();
        // Checked before anything changes: each address gone is its pod's alone, and no address
        // that comes is held by a pod that stays.
        let gone_ips: HashSet<IpAddr> = gone.iter().map(|(_, ip)| *ip).collect();
        let mut came_ips = HashSet::new();
        let simple = gone.iter().all(|(p, ip)| {
            !self.shared_ips.contains(ip)
                && self.pods_by_ip.get(ip).is_some_and(|k| Arc::ptr_eq(k, p))
        }) && came.iter().all(|(_, ip)| {
            came_ips.insert(*ip) && (!self.pods_by_ip.contains_key(ip) || gone_ips.contains(ip))
        });
        if !simple {
            return false;
        }
        for (_, ip) in &gone {
            self.pods_by_ip.remove(ip);
        }
        for (p, ip) in came {
            self.pods_by_ip.insert(ip, Arc::clone(p));
        }
        true
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Pod;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// A pod `p<n>` in namespace `ns<n % 3>` at 10.0.0.`ip` (`None`: no address yet).
    fn pod(n: u8, ip: Option<u8>, host_network: bool) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p{n}"), "namespace": format!("ns{}", n % 3)},
            "spec": {"nodeName": "node-b", "hostNetwork": host_network, "containers": []},
            "status": {"phase": "Running", "podIP": ip.map(|i| format!("10.0.0.{i}"))},
        }))
        .unwrap();
        Arc::new(PodInfo::from(&pod))
    }

    /// Address -> namespace/name of the pod the view names there.
    fn named(v: &View) -> BTreeMap<IpAddr, String> {
        v.pods_by_ip
            .iter()
            .map(|(ip, p)| (*ip, pod_ref(p).to_string()))
            .collect()
    }

    /// One step of a pod source: a pod added, removed or replaced by a new object (relabelled,
    /// re-addressed), at a position of the list.
    #[derive(Clone, Debug)]
    enum Step {
        Add(u8, Option<u8>, bool),
        Remove(usize),
        Replace(usize, Option<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Few addresses, so that pods often share one (the tie the index must keep).
        let ip = proptest::option::weighted(0.9, 0u8..12);
        prop_oneof![
            (0u8..40, ip.clone(), proptest::bool::weighted(0.1))
                .prop_map(|(n, i, h)| Step::Add(n, i, h)),
            any::<usize>().prop_map(Step::Remove),
            (any::<usize>(), ip).prop_map(|(at, i)| Step::Replace(at, i)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Updated through any sequence of pod changes, the view names every address as one
        /// built from the last pods does.
        #[test]
        fn an_updated_view_names_addresses_as_a_built_one(
            first in proptest::collection::vec((0u8..40, proptest::option::of(0u8..12)), 0..30),
            steps in proptest::collection::vec(proptest::collection::vec(step(), 1..3), 1..12),
        ) {
            let node_ips: Vec<IpAddr> = vec!["10.0.0.11".parse().unwrap()];
            let state = Arc::new(DesiredState::default());
            let mut cluster = Cluster {
                pods: first.iter().map(|(n, ip)| pod(*n, *ip, false)).collect(),
                ..Cluster::default()
            };
            let mut view = View::build(&state, &cluster, &node_ips);
            for change in steps {
                for s in change {
                    let len = cluster.pods.len();
                    match s {
                        Step::Add(n, ip, h) => cluster.pods.push(pod(n, ip, h)),
                        Step::Remove(at) if len > 0 => {
                            cluster.pods.remove(at % len);
                        }
                        Step::Replace(at, ip) if len > 0 => {
                            let old = &cluster.pods[at % len];
                            let n: u8 = old.name[1..].parse().unwrap();
                            cluster.pods[at % len] = pod(n, ip, old.host_network);
                        }
                        _ => {}
                    }
                }
                view.update(&state, &cluster, &node_ips);
                let built = View::build(&state, &cluster, &node_ips);
                prop_assert_eq!(named(&view), named(&built));
            }
        }
    }
}
