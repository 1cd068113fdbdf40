//! The agent side of identity: the live-pod directory the attestation endpoint checks callers
//! against, and the verified addresses the compiler turns into peer identities.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use enforcer_policy::model::{Cluster, pod_ips, pod_is_policy_pod, pod_ref};

use crate::identity::{self, Bindings, PodDirectory, identity_labels};

/// Live pods by address and by name, from the latest cluster the agent enforces. Host-network
/// and terminated pods, and node addresses, are never in it.
#[derive(Default)]
pub struct LivePods {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_ip: BTreeMap<IpAddr, identity::LivePod>,
    uid: BTreeMap<(String, String), String>,
}

impl LivePods {
    /// Replaces the directory with the pods of `cluster`.
    pub fn update(&self, cluster: &Cluster, node_ips: &[IpAddr]) {
        let mut next = Inner::default();
        for pod in cluster.pods.iter().filter(|p| pod_is_policy_pod(p)) {
            let r = pod_ref(pod);
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if uid.is_empty() {
                continue;
            }
            let id = identity::LivePod {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                uid: uid.clone(),
            };
            for ip in pod_ips(pod).into_iter().filter(|ip| !node_ips.contains(ip)) {
                next.by_ip.insert(ip, id.clone());
            }
            next.uid.insert((r.namespace, r.name), uid);
        }
        if let Ok(mut g) = self.inner.write() {
            *g = next;
        }
    }
}

impl PodDirectory for LivePods {
    fn pod_by_ip(&self, ip: IpAddr) -> Option<identity::LivePod> {
        self.inner.read().ok()?.by_ip.get(&ip).cloned()
    }
    fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.inner
            .read()
            .ok()?
            .uid
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}

/// What the control loop needs of identity.
#[derive(Clone)]
pub struct Identity {
    pub bindings: Arc<Bindings>,
    pub pods: Arc<LivePods>,
}

impl Identity {
    /// Drops bindings whose token expired or whose pod is gone; returns whether any went.
    pub fn sweep(&self) -> bool {
        !self
            .bindings
            .sweep(&*self.pods, identity::unix_now())
            .is_empty()
    }

    /// The verified addresses with their reserved labels, for [`Cluster::verified`].
    pub fn verified(&self) -> BTreeMap<IpAddr, BTreeMap<String, String>> {
        let now = identity::unix_now();
        self.bindings
            .snapshot()
            .into_iter()
            .filter(|(_, id)| id.expires_at > now)
            .map(|(ip, id)| (ip, identity_labels(&id)))
            .collect()
    }
}
