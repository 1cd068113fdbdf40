//! The in-cluster source: kube-rs reflectors on Namespaces, NetworkPolicies, Pods and Services,
//! turned into [`Cluster`] snapshots on a `tokio::sync::watch` channel that the agent compiles.
//!
//! # What is watched, and why all pods
//!
//! - **Namespaces**, all of them (namespaceSelector peers need every namespace's labels).
//! - **NetworkPolicies**, all of them (a policy in one namespace can name peers in any other).
//! - **Pods: one reflector on all pods of the cluster, no field selector.** A pod on this node
//!   is an endpoint, but a `podSelector` peer may run on any node, and the datapath needs that
//!   peer's address to give it the right identity. A node-local reflector
//!   (`spec.nodeName=<node>`) alone would leave every remote peer unresolved, i.e. cross-node
//!   traffic allowed by a podSelector would be dropped. A second, node-local reflector next to
//!   the all-pods one would add nothing: the compact all-pods values keep every field the
//!   compiler reads (labels, `spec.nodeName`, `hostNetwork`, container ports for named ports,
//!   `status.podIPs`, phase), and two stores of the same pods could briefly disagree. So the
//!   [`Cluster`] holds every pod, and the compiler's `CompileOptions { node_name: Some(node) }`
//!   picks this node's pods as endpoints. (DESIGN §4 says "Pods of this node": this is the
//!   superset it needs; RBAC is the same cluster-wide list/watch on pods either way.)
//! - **The cluster-wide policies** (ClusterNetworkPolicy, AdminNetworkPolicy,
//!   BaselineAdminNetworkPolicy) and **Nodes**, all of them: see [`super::cluster_wide`] (a kind
//!   whose CRD is not installed counts as listed, with no objects).
//! - **Services**, all of them: kube-proxy translates a pod's packet to a Service frontend (a
//!   cluster, external or load-balancer IP) or to a node port after the egress program has seen
//!   it, so the datapath defers such flows and judges them on the backend; it needs every
//!   frontend address and node port for that.
//!
//! Pods are converted at the watch to their compact form ([`PodStore`], [`PodInfo`]): no Pod
//! object is stored, and a pod update that only touched fields not kept (conditions, container
//! statuses) changes nothing and publishes nothing, so the agent does not recompile for it.
//! Every other object is trimmed by `.modify()` before it reaches its Store
//! ([`trim_namespace`], [`trim_policy`], [`trim_service`]): managed fields, `resourceVersion`,
//! most annotations and what the compiler does not read are dropped. That keeps the agent's
//! memory small on large clusters (every node holds every pod).
//!
//! # When a snapshot is published
//!
//! - Nothing is published until every Store has completed its first list
//!   ([`Store::wait_until_ready`]): an empty Store would compile to "no policies" and open
//!   every pod, so until then the agent keeps enforcing what is pinned.
//! - After that, every change (an applied or deleted object, or a completed relist) marks the
//!   view dirty and a full [`snapshot`] is taken from the Stores, level-triggered, never from
//!   the events themselves: at once after a quiet spell, else [`DEBOUNCE`] after the last one
//!   (a burst of changes is gathered). A relist after a watch gap (`410 Gone`) swaps the Store
//!   at `InitDone`, so objects deleted during the gap are simply absent from the next snapshot.
//! - A snapshot equal to the one published last is not published again.
//!
//! # Errors
//!
//! Every watch has kube's `default_backoff()` (exponential from 0.8 s to 30 s, with jitter).
//! Errors are logged and the watch resumes (re-watch from the last resourceVersion, or relist
//! when that is too old); meanwhile the last snapshot stays published, so the agent keeps
//! enforcing the last known state while the API server is unreachable.

use std::{fmt::Debug, hash::Hash, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Namespace, Pod, Service, ServicePort,
            ServiceSpec, ServiceStatus,
        },
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use enforcer_policy::model::{Cluster, PodInfo, pod_node};

use super::{cluster_wide::ClusterWide, liveness::WatchBeats};
use crate::identity::records::IdentityBinding;

/// Least time between two snapshots: a change after a quiet spell is published at once; the
/// changes that follow within this time are gathered into the next one.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Annotations with this prefix survive trimming (the project's own, e.g. identity settings).
pub const KEPT_ANNOTATION_PREFIX: &str = "enforcer.dev/";

/// What `kubectl apply` stores on each object: a second copy of it, dropped from policies.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The Stores the reflectors fill.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: PodStore,
    policies: Store<NetworkPolicy>,
    services: Store<Service>,
    cluster_wide: ClusterWide,
}

/// Watches the cluster and publishes a [`Cluster`] on `tx` after every change (see the module
/// doc). Runs until cancelled (drop the future / abort its task); returns `Err` only when a
/// watch stream ends, which kube's watchers never do on their own.
///
/// `node_name` is this node: it is only logged here (the snapshot holds every pod; the
/// compiler picks this node's pods by `CompileOptions::node_name`).
pub async fn run(
    client: Client,
    node_name: String,
    tx: watch::Sender<Option<Arc<Cluster>>>,
) -> Result<()> {
    run_with_records(client, node_name, tx, None).await
}

/// The identity records as published: every `IdentityBinding` of the cluster, trimmed, sorted.
pub type RecordsTx = watch::Sender<Option<Arc<Vec<Arc<IdentityBinding>>>>>;

/// [`run`], and with `records` also a reflector on the `IdentityBinding` records of every
/// namespace: nothing is published until they are listed too (the first compile has them, so
/// a restarted agent keeps every identity), and each change of the records is published on
/// `records` before the cluster it goes with.
pub async fn run_with_records(
    client: Client,
    node_name: String,
    tx: watch::Sender<Option<Arc<Cluster>>>,
    records: Option<RecordsTx>,
) -> Result<()> {
    run_watching(client, node_name, tx, records, &WatchBeats::default()).await
}

/// [`run_with_records`], each watch stream beating its resource's heartbeat in `beats` on every
/// event and error (the client beats them on every chunk: see [`super::liveness`]).
pub async fn run_watching(
    client: Client,
    node_name: String,
    tx: watch::Sender<Option<Arc<Cluster>>>,
    records: Option<RecordsTx>,
    beats: &WatchBeats,
) -> Result<()> {
    let (namespaces, ns_stream) = reflect(Api::<Namespace>::all(client.clone()), trim_namespace);
    let pods = PodStore::default();
    let pod_stream = {
        let store = pods.clone();
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .filter(move |event| {
                std::future::ready(match event {
                    Ok(e) => store.apply(e),
                    Err(_) => true,
                })
            })
    };
    let (policies, pol_stream) = reflect(Api::<NetworkPolicy>::all(client.clone()), trim_policy);
    let (services, svc_stream) = reflect(Api::<Service>::all(client.clone()), trim_service);
    let stores = Stores {
        namespaces,
        pods,
        policies,
        services,
        cluster_wide: ClusterWide::default(),
    };
    let (dirty_tx, dirty_rx) = watch::channel(());
    let cluster_wide = stores.cluster_wide.run(client.clone(), &dirty_tx, beats);
    let (record_store, record_drive) = match &records {
        Some(_) => {
            let (store, stream) = reflect(Api::<IdentityBinding>::all(client), trim_record);
            (
                Some(store),
                futures::future::Either::Left(drive("identitybindings", stream, &dirty_tx, beats)),
            )
        }
        None => (
            None,
            futures::future::Either::Right(futures::future::pending()),
        ),
    };
    let published_records = record_store.as_ref().zip(records.as_ref());
    tokio::select! {
        r = drive("namespaces", ns_stream, &dirty_tx, beats) => r,
        r = drive("pods", pod_stream, &dirty_tx, beats) => r,
        r = drive("networkpolicies", pol_stream, &dirty_tx, beats) => r,
        r = drive("services", svc_stream, &dirty_tx, beats) => r,
        r = record_drive => r,
        r = cluster_wide => r,
        r = publish(&stores, published_records, dirty_rx, &tx, &node_name) => r,
    }
}

/// A record keeps what readers check ([`IdentityBinding::trim`]).
pub fn trim_record(record: &mut IdentityBinding) {
    record.trim();
}

/// A Store and the stream that fills it: a watcher with default backoff, trimmed objects.
fn reflect<K>(
    api: Api<K>,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    (reader, stream)
}

/// Polls one reflector stream forever: changes mark the view dirty, errors are logged (the
/// stream itself backs off before it retries).
async fn drive<K>(
    what: &str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    dirty: &watch::Sender<()>,
    beats: &WatchBeats,
) -> Result<()> {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        beats.beat(what);
        match item {
            // The Store changed (InitDone: a (re)list was swapped in).
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                dirty.send_replace(());
            }
            // Buffered by the Store until InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                let hint = if what == "identitybindings" {
                    " (is manifests/crd-identitybinding.yaml applied, and may the agent list them?)"
                } else {
                    ""
                };
                log::warn!(
                    "watching {what}: {e}{hint}; retrying with backoff, enforcing the last known state"
                )
            }
        }
    }
    bail!("the {what} watch ended")
}

/// How long the first publication waits for the identity records' first list.
const RECORDS_FIRST_LIST: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits for every Store's first list, then publishes a snapshot after each (debounced) change.
async fn publish(
    stores: &Stores,
    records: Option<(&Store<IdentityBinding>, &RecordsTx)>,
    mut dirty: watch::Receiver<()>,
    tx: &watch::Sender<Option<Arc<Cluster>>>,
    node_name: &str,
) -> Result<()> {
    tokio::try_join!(
        stores.namespaces.wait_until_ready(),
        async {
            stores.pods.wait_until_ready().await;
            Ok(())
        },
        stores.policies.wait_until_ready(),
        stores.services.wait_until_ready(),
        async {
            stores.cluster_wide.wait_until_ready().await;
            Ok(())
        },
        async {
            match records {
                // Bounded: without the CRD (or the right to list it) the records never come,
                // and an agent that waited for them would enforce nothing at all. Past the
                // bound it enforces without them, which only denies more (a peer verified on
                // another node is not matched until its record arrives) and says so.
                Some((store, _)) => {
                    match tokio::time::timeout(RECORDS_FIRST_LIST, store.wait_until_ready()).await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            log::error!(
                                "identity records (IdentityBinding) not listed after {RECORDS_FIRST_LIST:?}: \
                                 enforcing without them, so pods verified on other nodes (and, after a \
                                 restart, on this one until they attest again) are not matched by \
                                 identity-requiring rules; is manifests/crd-identitybinding.yaml applied?"
                            );
                            Ok(())
                        }
                    }
                }
                None => Ok(()),
            }
        },
    )
    .context("a reflector stopped before its first list")?;
    log::info!(
        "listed namespaces, pods, network policies, services, cluster-wide policies and nodes; publishing the cluster state for node {node_name}"
    );
    loop {
        dirty.borrow_and_update();
        if let Some((store, rtx)) = records {
            let next = sorted(store);
            rtx.send_if_modified(|current| {
                if current.as_deref().is_some_and(|c| *c == next) {
                    return false;
                }
                *current = Some(Arc::new(next));
                true
            });
        }
        let mut next = snapshot(
            &stores.namespaces,
            &stores.pods,
            &stores.policies,
            &stores.services,
        );
        stores.cluster_wide.fill(&mut next);
        let (namespaces, pods, policies, services) = (
            next.namespaces.len(),
            next.pods.len(),
            next.policies.len(),
            next.services.len(),
        );
        let (cluster_policies, nodes) = (next.cluster_policies.len(), next.nodes.len());
        let local = next
            .pods
            .iter()
            .filter(|p| pod_node(p) == Some(node_name))
            .count();
        let published = tx.send_if_modified(|current| {
            if current.as_deref().is_some_and(|c| same_cluster(c, &next)) {
                return false;
            }
            *current = Some(Arc::new(next));
            true
        });
        if published {
            log::debug!(
                "cluster state: {namespaces} namespaces, {pods} pods ({local} on {node_name}), {policies} network policies, {services} services, {cluster_policies} cluster-wide policies, {nodes} nodes"
            );
        }
        let taken = tokio::time::Instant::now();
        dirty.changed().await.context("the reflectors stopped")?;
        tokio::time::sleep_until(taken + DEBOUNCE).await;
    }
}

fn same_cluster(a: &Cluster, b: &Cluster) -> bool {
    a.namespaces == b.namespaces
        && a.pods == b.pods
        && a.policies == b.policies
        && a.services == b.services
        && a.cluster_policies == b.cluster_policies
        && a.nodes == b.nodes
}

/// The Stores' contents as a [`Cluster`], each list sorted by (namespace, name) so that the
/// same Stores always give the same value.
pub fn snapshot(
    ns: &Store<Namespace>,
    pods: &PodStore,
    pols: &Store<NetworkPolicy>,
    services: &Store<Service>,
) -> Cluster {
    Cluster {
        namespaces: sorted(ns),
        pods: pods.state(),
        policies: sorted(pols),
        services: sorted(services),
        ..Default::default()
    }
}

/// The pods of the cluster, held compactly ([`PodInfo`]): the pod watch converts each object as
/// it arrives, so no Pod object outlives its event. (A reflector Store would keep every Pod:
/// even trimmed, its many unset fields cost kilobytes, and every node holds every pod.)
/// Keyed by namespace/name like a Store; a relist is gathered apart and swapped in whole.
#[derive(Clone)]
pub struct PodStore {
    inner: Arc<std::sync::Mutex<PodStoreInner>>,
    ready: Arc<watch::Sender<bool>>,
}

type PodKey = (Arc<str>, Box<str>);

#[derive(Default)]
struct PodStoreInner {
    live: std::collections::BTreeMap<PodKey, Arc<PodInfo>>,
    /// A (re)list in progress.
    listing: Option<std::collections::BTreeMap<PodKey, Arc<PodInfo>>>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            ready: Arc::new(watch::channel(false).0),
        }
    }
}

impl PodStore {
    /// Applies one watch event; `false` when it changed nothing the compiler reads (an update
    /// of a field not kept, e.g. a condition), so nothing is published for it.
    pub fn apply(&self, event: &watcher::Event<Pod>) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return true;
        };
        let info = |p: &Pod| {
            let info = PodInfo::from(p);
            ((Arc::clone(&info.namespace), info.name.clone()), info)
        };
        match event {
            watcher::Event::Init => {
                g.listing = Some(Default::default());
                false
            }
            watcher::Event::InitApply(p) => {
                let (k, v) = info(p);
                // Unchanged pods keep their value: the compiler finds them equal by address.
                let v = match g.live.get(&k) {
                    Some(old) if **old == v => Arc::clone(old),
                    _ => Arc::new(v),
                };
                g.listing.get_or_insert_with(Default::default).insert(k, v);
                false
            }
            watcher::Event::InitDone => {
                let listed = g.listing.take().unwrap_or_default();
                g.live = listed;
                drop(g);
                self.ready.send_replace(true);
                true
            }
            watcher::Event::Apply(p) => {
                let (k, v) = info(p);
                if g.live.get(&k).is_some_and(|old| **old == v) {
                    return false;
                }
                g.live.insert(k, Arc::new(v));
                true
            }
            watcher::Event::Delete(p) => {
                let (k, _) = info(p);
                g.live.remove(&k).is_some()
            }
        }
    }

    /// Every pod, sorted by namespace/name.
    pub fn state(&self) -> Vec<Arc<PodInfo>> {
        self.inner
            .lock()
            .map(|g| g.live.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Returns once the first list is in.
    async fn wait_until_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|ready| *ready).await;
    }
}

/// The Store's objects, shared with it (no copy of each object per snapshot).
fn sorted<K>(store: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut objects: Vec<Arc<K>> = store.state();
    objects.sort_by(|a, b| sort_key(a.meta()).cmp(&sort_key(b.meta())));
    objects
}

fn sort_key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// Metadata every trimmed object keeps: name, namespace, uid, labels, creation and deletion
/// timestamps, and annotations under [`KEPT_ANNOTATION_PREFIX`]. `resourceVersion` goes too (the
/// watcher has read it before `.modify()` runs; the Store keys on namespace/name), so an update
/// that only touched dropped fields leaves the object equal to its last version.
fn trim_meta(meta: &mut ObjectMeta) {
    let annotations = meta.annotations.take().map(|a| {
        a.into_iter()
            .filter(|(k, _)| k.starts_with(KEPT_ANNOTATION_PREFIX))
            .collect::<std::collections::BTreeMap<_, _>>()
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        labels: meta.labels.take(),
        annotations: annotations.filter(|a| !a.is_empty()),
        creation_timestamp: meta.creation_timestamp.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// A namespace is its name and labels ([`trim_meta`]); spec and status go.
pub fn trim_namespace(ns: &mut Namespace) {
    trim_meta(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

/// Keeps what the compiler reads of a Service: [`trim_meta`]; `spec.type`, `clusterIP(s)`,
/// `externalIPs`, `selector` (for `explain`) and each port's name, protocol, port, target port
/// and node port; `status.loadBalancer.ingress[]`'s `ip` and `ipMode`. Session affinity,
/// traffic policies, conditions and the rest go, so an update of them publishes nothing.
pub fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata);
    let port = |p: ServicePort| ServicePort {
        name: p.name,
        protocol: p.protocol,
        port: p.port,
        target_port: p.target_port,
        node_port: p.node_port,
        ..ServicePort::default()
    };
    svc.spec = svc.spec.take().map(|s| ServiceSpec {
        type_: s.type_,
        cluster_ip: s.cluster_ip,
        cluster_ips: s.cluster_ips,
        external_ips: s.external_ips,
        selector: s.selector,
        ports: s.ports.map(|ps| ps.into_iter().map(port).collect()),
        ..ServiceSpec::default()
    });
    let ingress = svc
        .status
        .take()
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .filter(|i| !i.is_empty());
    svc.status = ingress.map(|ingress| ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                ingress
                    .into_iter()
                    .map(|i| LoadBalancerIngress {
                        ip: i.ip,
                        ip_mode: i.ip_mode,
                        ..LoadBalancerIngress::default()
                    })
                    .collect(),
            ),
        }),
        ..ServiceStatus::default()
    });
}

/// A policy keeps its spec and its annotations except `kubectl`'s last-applied copy; managed
/// fields, `resourceVersion` and generation go.
pub fn trim_policy(policy: &mut NetworkPolicy) {
    let meta = &mut policy.metadata;
    meta.managed_fields = None;
    meta.resource_version = None;
    meta.generation = None;
    if let Some(a) = &mut meta.annotations {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The source against kube-rs's mocked API service (`tower_test::mock::pair`), as in kube's
    //! own `mock_tests.rs` and controller-rs's fixtures: a router task hands each request to the
    //! queue of its resource, and each test plays the API server for each resource in turn,
    //! asserting the request URL and answering it. Every wait has a timeout, so a missing
    //! request fails the test instead of hanging it.

    use std::collections::BTreeMap;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::{sync::mpsc, task::JoinHandle, time::timeout};
    use tower_test::mock::SendResponse;

    use super::*;
    use enforcer_policy::compile::{Allocations, CompileOptions, compile};

    /// Wait for a request or a snapshot.
    const WAIT: Duration = Duration::from_secs(2);
    /// Wait for a request that comes after an error: `default_backoff` first waits 0.8 to 1.6 s.
    const AFTER_BACKOFF: Duration = Duration::from_millis(2600);
    const NODE: &str = "node-a";

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Res {
        Namespaces,
        Pods,
        Policies,
        Services,
        Records,
        Nodes,
        Cnp,
        Anp,
        Banp,
    }

    impl Res {
        const ALL: [Self; 9] = [
            Self::Namespaces,
            Self::Pods,
            Self::Policies,
            Self::Services,
            Self::Records,
            Self::Nodes,
            Self::Cnp,
            Self::Anp,
            Self::Banp,
        ];

        fn path(self) -> &'static str {
            match self {
                Self::Namespaces => "/api/v1/namespaces",
                Self::Pods => "/api/v1/pods",
                Self::Policies => "/apis/networking.k8s.io/v1/networkpolicies",
                Self::Services => "/api/v1/services",
                Self::Records => "/apis/enforcer.dev/v1alpha1/identitybindings",
                Self::Nodes => "/api/v1/nodes",
                Self::Cnp => "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
                Self::Anp => "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
                Self::Banp => {
                    "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies"
                }
            }
        }

        fn list_kind(self) -> (&'static str, &'static str) {
            match self {
                Self::Namespaces => ("v1", "NamespaceList"),
                Self::Pods => ("v1", "PodList"),
                Self::Policies => ("networking.k8s.io/v1", "NetworkPolicyList"),
                Self::Services => ("v1", "ServiceList"),
                Self::Records => ("enforcer.dev/v1alpha1", "IdentityBindingList"),
                Self::Nodes => ("v1", "NodeList"),
                Self::Cnp => (
                    "policy.networking.k8s.io/v1alpha2",
                    "ClusterNetworkPolicyList",
                ),
                Self::Anp => (
                    "policy.networking.k8s.io/v1alpha1",
                    "AdminNetworkPolicyList",
                ),
                Self::Banp => (
                    "policy.networking.k8s.io/v1alpha1",
                    "BaselineAdminNetworkPolicyList",
                ),
            }
        }

        fn kind(self) -> (&'static str, &'static str) {
            match self {
                Self::Namespaces => ("v1", "Namespace"),
                Self::Pods => ("v1", "Pod"),
                Self::Policies => ("networking.k8s.io/v1", "NetworkPolicy"),
                Self::Services => ("v1", "Service"),
                Self::Records => ("enforcer.dev/v1alpha1", "IdentityBinding"),
                Self::Nodes => ("v1", "Node"),
                Self::Cnp => ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy"),
                Self::Anp => ("policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy"),
                Self::Banp => (
                    "policy.networking.k8s.io/v1alpha1",
                    "BaselineAdminNetworkPolicy",
                ),
            }
        }
    }

    type Query = BTreeMap<String, String>;
    type Reply = SendResponse<Response<Body>>;

    /// The mocked API server: one queue of pending requests per resource.
    struct FakeApi {
        queues: BTreeMap<Res, mpsc::UnboundedReceiver<(Query, Reply)>>,
        unexpected: mpsc::UnboundedReceiver<String>,
        router: JoinHandle<()>,
    }

    impl Drop for FakeApi {
        fn drop(&mut self) {
            self.router.abort();
        }
    }

    fn start() -> (Client, FakeApi) {
        start_beating(WatchBeats::default())
    }

    /// The mocked API server behind a client beating `beats` (as the agent's does).
    fn start_beating(beats: WatchBeats) -> (Client, FakeApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(
            super::super::liveness::Beating::new(service, beats),
            "default",
        );
        let mut senders = BTreeMap::new();
        let mut queues = BTreeMap::new();
        for r in Res::ALL {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(r, tx);
            queues.insert(r, rx);
        }
        let (bad_tx, unexpected) = mpsc::unbounded_channel();
        let router = tokio::spawn(async move {
            while let Some((req, reply)) = handle.next_request().await {
                let uri = req.uri().clone();
                let res = Res::ALL.into_iter().find(|r| uri.path() == r.path());
                match res {
                    Some(r) if req.method() == http::Method::GET => {
                        let query = uri
                            .query()
                            .unwrap_or_default()
                            .split('&')
                            .filter(|kv| !kv.is_empty())
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                                (k.to_string(), v.replace("%3D", "=").replace("%2C", ","))
                            })
                            .collect();
                        let _ = senders[&r].send((query, reply));
                    }
                    _ => {
                        let _ = bad_tx.send(format!("{} {uri}", req.method()));
                    }
                }
            }
        });
        (
            client,
            FakeApi {
                queues,
                unexpected,
                router,
            },
        )
    }

    fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    fn status_body(code: u16, reason: &str) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("mock {reason}"), "reason": reason, "code": code,
        })
    }

    impl FakeApi {
        async fn next(&mut self, r: Res, wait: Duration) -> (Query, Reply) {
            let q = self.queues.get_mut(&r).unwrap();
            timeout(wait, q.recv())
                .await
                .unwrap_or_else(|_| panic!("no request for {r:?} within {wait:?}"))
                .expect("router stopped")
        }

        /// Expects a LIST of `r` (not a watch), answers it with `items` at `rv`.
        async fn list(&mut self, r: Res, rv: &str, items: Vec<Value>) -> Query {
            self.list_within(r, rv, items, WAIT).await
        }

        async fn list_within(
            &mut self,
            r: Res,
            rv: &str,
            items: Vec<Value>,
            wait: Duration,
        ) -> Query {
            let (q, reply) = self.next(r, wait).await;
            assert_list_query(r, &q);
            let (api_version, kind) = r.list_kind();
            let body = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items});
            reply.send_response(json_response(StatusCode::OK, &body));
            q
        }

        /// Expects a WATCH of `r` from `from_rv`, answers it with `events` and ends the body
        /// (the watcher then watches again from the last resourceVersion it saw).
        async fn watch(&mut self, r: Res, from_rv: &str, events: &[Value]) -> Query {
            self.watch_within(r, from_rv, events, WAIT).await
        }

        async fn watch_within(
            &mut self,
            r: Res,
            from_rv: &str,
            events: &[Value],
            wait: Duration,
        ) -> Query {
            let (q, reply) = self.next(r, wait).await;
            assert_watch_query(r, &q, from_rv);
            let mut body = Vec::new();
            for e in events {
                serde_json::to_writer(&mut body, e).unwrap();
                body.push(b'\n');
            }
            reply.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from(body))
                    .unwrap(),
            );
            q
        }

        /// Answers the next request of `r` (list or watch) with an HTTP error.
        async fn fail(&mut self, r: Res, code: u16, reason: &str) -> Query {
            self.fail_within(r, code, reason, WAIT).await
        }

        async fn fail_within(&mut self, r: Res, code: u16, reason: &str, wait: Duration) -> Query {
            let (q, reply) = self.next(r, wait).await;
            reply.send_response(json_response(
                StatusCode::from_u16(code).unwrap(),
                &status_body(code, reason),
            ));
            q
        }

        /// The first lists of every resource (no Services).
        async fn initial_lists(
            &mut self,
            namespaces: Vec<Value>,
            pods: Vec<Value>,
            policies: Vec<Value>,
        ) {
            self.list(Res::Namespaces, "100", namespaces).await;
            self.list(Res::Pods, "200", pods).await;
            self.list(Res::Policies, "300", policies).await;
            self.list(Res::Services, "400", vec![]).await;
            self.cluster_wide_absent().await;
        }

        /// The first lists of the cluster-wide kinds: no nodes, and no policy CRD installed.
        async fn cluster_wide_absent(&mut self) {
            self.list(Res::Nodes, "500", vec![]).await;
            for r in [Res::Cnp, Res::Anp, Res::Banp] {
                self.fail(r, 404, "NotFound").await;
            }
        }

        fn assert_nothing_unexpected(&mut self) {
            if let Ok(u) = self.unexpected.try_recv() {
                panic!("unexpected request: {u}");
            }
        }
    }

    fn assert_list_query(r: Res, q: &Query) {
        assert!(
            !q.contains_key("watch"),
            "{r:?}: expected a list, got a watch: {q:?}"
        );
        assert_eq!(
            q.get("limit").map(String::as_str),
            Some("500"),
            "{r:?}: {q:?}"
        );
        // All pods (see the module doc), all namespaces, all policies: no selectors.
        assert!(
            !q.contains_key("fieldSelector") && !q.contains_key("labelSelector"),
            "{r:?}: {q:?}"
        );
        // A fresh (quorum) list: no resourceVersion, no continue token on the first page.
        assert!(
            !q.contains_key("resourceVersion") && !q.contains_key("continue"),
            "{r:?}: {q:?}"
        );
    }

    fn assert_watch_query(r: Res, q: &Query, from_rv: &str) {
        assert_eq!(
            q.get("watch").map(String::as_str),
            Some("true"),
            "{r:?}: expected a watch: {q:?}"
        );
        assert_eq!(
            q.get("resourceVersion").map(String::as_str),
            Some(from_rv),
            "{r:?}: {q:?}"
        );
        assert_eq!(
            q.get("allowWatchBookmarks").map(String::as_str),
            Some("true"),
            "{r:?}: {q:?}"
        );
        assert_eq!(
            q.get("timeoutSeconds").map(String::as_str),
            Some("290"),
            "{r:?}: {q:?}"
        );
        assert!(
            !q.contains_key("fieldSelector") && !q.contains_key("labelSelector"),
            "{r:?}: {q:?}"
        );
        assert!(!q.contains_key("sendInitialEvents"), "{r:?}: {q:?}");
    }

    // ---- fixtures ----

    fn namespace(name: &str, labels: Value, rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": name, "uid": format!("uid-ns-{name}"), "resourceVersion": rv, "labels": labels,
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1"}],
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        })
    }

    fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value, rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "resourceVersion": rv,
                "labels": labels,
                "annotations": {"kubectl.kubernetes.io/restartedAt": "now", "enforcer.dev/keep": "yes"},
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u"}],
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "default",
                "containers": [{
                    "name": "app", "image": "registry.example/app:1",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                }],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "172.18.0.2",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })
    }

    fn policy(ns: &str, name: &str, spec: Value, rv: &str) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {
                "namespace": ns, "name": name, "resourceVersion": rv, "generation": 1,
                "annotations": {LAST_APPLIED: "{...}", "enforcer.dev/require-identity": "true"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "networking.k8s.io/v1"}],
            },
            "spec": spec,
        })
    }

    /// A NodePort Service at `cluster_ip` selecting `selector`, with the fields the API server
    /// fills in (and the agent drops).
    fn service(ns: &str, name: &str, cluster_ip: &str, selector: Value, rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "namespace": ns, "name": name, "uid": format!("uid-svc-{ns}-{name}"), "resourceVersion": rv,
                "annotations": {LAST_APPLIED: "{...}"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1"}],
            },
            "spec": {
                "type": "NodePort",
                "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "externalIPs": ["192.0.2.7"],
                "selector": selector,
                "sessionAffinity": "None", "externalTrafficPolicy": "Cluster",
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http", "nodePort": 30080, "appProtocol": "http"}],
            },
            "status": {"loadBalancer": {}},
        })
    }

    fn service_names(c: &Cluster) -> Vec<String> {
        c.services
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap(),
                    s.metadata.name.as_deref().unwrap()
                )
            })
            .collect()
    }

    fn deny_all() -> Value {
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    }

    fn event(kind: &str, object: &Value) -> Value {
        json!({"type": kind, "object": object})
    }

    fn bookmark(r: Res, rv: &str) -> Value {
        let (api_version, kind) = r.kind();
        json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}}})
    }

    fn gone() -> Value {
        json!({"type": "ERROR", "object": status_body(410, "Expired")})
    }

    // ---- helpers on the published value ----

    type Rx = watch::Receiver<Option<Arc<Cluster>>>;

    fn spawn_source(client: Client) -> (JoinHandle<Result<()>>, Rx) {
        let (tx, rx) = watch::channel(None);
        (tokio::spawn(run(client, NODE.to_string(), tx)), rx)
    }

    /// Waits (at most `WAIT`) until the published cluster satisfies `pred`.
    async fn until(rx: &mut Rx, what: &str, pred: impl Fn(&Cluster) -> bool) -> Arc<Cluster> {
        let got = timeout(WAIT, rx.wait_for(|c| c.as_deref().is_some_and(&pred)))
            .await
            .map(|r| r.map(|c| c.clone()));
        match got {
            Ok(Ok(Some(c))) => c,
            _ => panic!(
                "{what}: not published within {WAIT:?}; last: {:?}",
                rx.borrow().as_deref().map(names)
            ),
        }
    }

    fn pod_names(c: &Cluster) -> Vec<String> {
        c.pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    fn names(c: &Cluster) -> (Vec<String>, Vec<String>, Vec<String>) {
        let ns = c
            .namespaces
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        let pols = c
            .policies
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap(),
                    p.metadata.name.as_deref().unwrap()
                )
            })
            .collect();
        (ns, pod_names(c), pols)
    }

    fn labels_of(c: &Cluster, pod: &str) -> BTreeMap<String, String> {
        let p = c.pods.iter().find(|p| &*p.name == pod).unwrap();
        p.labels_as_set()
    }

    /// Lets the source run (the debounce and a little more) without expecting a change.
    async fn settle() {
        tokio::time::sleep(DEBOUNCE * 4).await;
    }

    // ---- tests ----

    /// A quiet watch (no object changes, only the API server's bookmark) keeps its heartbeat
    /// alive: the client beats on the watch's response and its chunks, which kube's watcher
    /// never shows as events.
    #[tokio::test]
    async fn a_quiet_watch_beats_its_heartbeat_with_a_bookmark() {
        use crate::observe::heartbeat::Heartbeats;
        let heartbeats = Heartbeats::default();
        let beats = WatchBeats::register(&heartbeats, &["pods"], Duration::from_secs(600));
        let (client, mut api) = start_beating(beats.clone());
        let (tx, mut rx) = watch::channel(None);
        let task = tokio::spawn({
            let beats = beats.clone();
            async move { run_watching(client, NODE.to_string(), tx, None, &beats).await }
        });
        api.initial_lists(vec![], vec![], vec![]).await;
        until(&mut rx, "the first snapshot", |_| true).await;
        let frozen = std::time::Instant::now()
            .checked_sub(Duration::from_secs(700))
            .expect("the clock is past 700 s");
        beats.heartbeat("pods").unwrap().beat_at(frozen);
        assert_eq!(
            heartbeats.stale(std::time::Instant::now()).len(),
            1,
            "frozen: stale"
        );
        api.watch(Res::Pods, "200", &[bookmark(Res::Pods, "250")])
            .await;
        let alive = timeout(WAIT, async {
            while !heartbeats.stale(std::time::Instant::now()).is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            alive.is_ok(),
            "{:?}",
            heartbeats.stale(std::time::Instant::now())
        );
        task.abort();
    }

    #[tokio::test]
    async fn initial_lists_publish_one_sorted_trimmed_snapshot_once_all_are_ready() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);

        api.list(
            Res::Namespaces,
            "100",
            vec![
                namespace("prod", json!({"env": "prod"}), "5"),
                namespace("default", json!({}), "4"),
            ],
        )
        .await;
        api.list(
            Res::Policies,
            "300",
            vec![policy("prod", "deny", deny_all(), "7")],
        )
        .await;
        api.list(Res::Services, "400", vec![]).await;
        api.cluster_wide_absent().await;
        // Pods not listed yet: nothing may be published (the agent keeps enforcing its pins).
        settle().await;
        assert!(
            rx.borrow().is_none(),
            "published before every Store was ready"
        );

        api.list(
            Res::Pods,
            "200",
            vec![
                pod(
                    "prod",
                    "web",
                    "node-b",
                    "10.244.2.5",
                    json!({"app": "web"}),
                    "9",
                ),
                pod(
                    "prod",
                    "api",
                    NODE,
                    "10.244.1.7",
                    json!({"app": "api"}),
                    "8",
                ),
                pod(
                    "default",
                    "client",
                    NODE,
                    "10.244.1.9",
                    json!({"app": "client"}),
                    "6",
                ),
            ],
        )
        .await;
        let c = until(&mut rx, "first snapshot", |c| c.pods.len() == 3).await;
        assert_eq!(
            names(&c),
            (
                vec!["default".into(), "prod".into()],
                vec![
                    "default/client".into(),
                    "prod/api".into(),
                    "prod/web".into()
                ],
                vec!["prod/deny".into()],
            )
        );

        // Held compactly: what the compiler and the identity checks read stays.
        let api_pod = &c.pods[1];
        assert_eq!(api_pod.uid.as_deref(), Some("uid-prod-api"));
        assert_eq!(api_pod.node_name.as_deref(), Some(NODE));
        assert_eq!(api_pod.service_account.as_deref(), Some("default"));
        assert_eq!(
            api_pod
                .named_ports
                .iter()
                .map(|(n, _, port)| (n.as_str(), *port))
                .collect::<Vec<_>>(),
            [("http", 8080)]
        );
        assert_eq!(
            &*api_pod.ips,
            ["10.244.1.7".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(!api_pod.terminated && !api_pod.terminating && !api_pod.host_network);
        let prod = &c.namespaces[1];
        assert_eq!(
            prod.metadata.labels,
            Some([("env".to_string(), "prod".to_string())].into())
        );
        assert!(
            prod.spec.is_none() && prod.status.is_none() && prod.metadata.managed_fields.is_none()
        );
        let deny = &c.policies[0];
        assert!(deny.metadata.managed_fields.is_none());
        assert_eq!(
            deny.metadata.annotations,
            Some(
                [(
                    "enforcer.dev/require-identity".to_string(),
                    "true".to_string()
                )]
                .into()
            )
        );
        assert!(deny.spec.is_some());

        // Then each resource is watched from its list's resourceVersion, with bookmarks.
        for (r, rv) in [
            (Res::Namespaces, "100"),
            (Res::Pods, "200"),
            (Res::Policies, "300"),
            (Res::Services, "400"),
        ] {
            let (q, _reply) = api.next(r, WAIT).await;
            assert_watch_query(r, &q, rv);
        }
        api.assert_nothing_unexpected();
        assert!(!task.is_finished());
        task.abort();
    }

    /// The pod list is read in pages (`limit` and `continue`, as the API server serves a large
    /// list), so a cluster's Pod objects are never in memory at once: nothing is published
    /// before the last page, and then the pods of every page are.
    #[tokio::test]
    async fn the_pod_list_is_read_page_by_page_and_published_whole() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        api.list(Res::Namespaces, "100", vec![]).await;
        api.list(Res::Policies, "300", vec![]).await;
        api.list(Res::Services, "400", vec![]).await;
        api.cluster_wide_absent().await;
        let page = |pods: std::ops::Range<usize>, next: &str| {
            let items: Vec<Value> = pods
                .map(|i| {
                    let ip = format!("10.244.2.{i}");
                    pod(
                        "prod",
                        &format!("p{i}"),
                        "node-b",
                        &ip,
                        json!({"app": "web"}),
                        "9",
                    )
                })
                .collect();
            json!({"apiVersion": "v1", "kind": "PodList",
                   "metadata": {"resourceVersion": "200", "continue": next}, "items": items})
        };
        let (q, reply) = api.next(Res::Pods, WAIT).await;
        assert_list_query(Res::Pods, &q);
        reply.send_response(json_response(StatusCode::OK, &page(0..3, "page-2")));
        let (q, reply) = api.next(Res::Pods, WAIT).await;
        assert_eq!(
            q.get("continue").map(String::as_str),
            Some("page-2"),
            "{q:?}"
        );
        assert_eq!(q.get("limit").map(String::as_str), Some("500"), "{q:?}");
        assert!(!q.contains_key("watch"), "{q:?}");
        assert!(rx.borrow().is_none(), "published before the last page");
        reply.send_response(json_response(StatusCode::OK, &page(3..5, "")));
        let c = until(&mut rx, "every page", |c| c.pods.len() == 5).await;
        assert_eq!(
            pod_names(&c),
            ["prod/p0", "prod/p1", "prod/p2", "prod/p3", "prod/p4"]
        );
        api.assert_nothing_unexpected();
        task.abort();
    }

    #[tokio::test]
    async fn watch_events_added_modified_deleted_and_bookmarks_update_the_snapshot() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        api.initial_lists(
            vec![namespace("prod", json!({"env": "prod"}), "5")],
            vec![
                pod("prod", "a", NODE, "10.244.1.2", json!({"app": "a"}), "10"),
                pod("prod", "b", NODE, "10.244.1.3", json!({"app": "b"}), "11"),
            ],
            vec![],
        )
        .await;
        let first = until(&mut rx, "first snapshot", |c| c.pods.len() == 2).await;
        assert!(first.policies.is_empty());

        // One watch answer carrying every kind of event, then a bookmark; the body ends.
        api.watch(
            Res::Pods,
            "200",
            &[
                event(
                    "ADDED",
                    &pod(
                        "prod",
                        "c",
                        "node-b",
                        "10.244.2.4",
                        json!({"app": "c"}),
                        "201",
                    ),
                ),
                event(
                    "MODIFIED",
                    &pod(
                        "prod",
                        "a",
                        NODE,
                        "10.244.1.2",
                        json!({"app": "a", "tier": "front"}),
                        "202",
                    ),
                ),
                event(
                    "DELETED",
                    &pod("prod", "b", NODE, "10.244.1.3", json!({"app": "b"}), "203"),
                ),
                bookmark(Res::Pods, "250"),
            ],
        )
        .await;
        let c = until(&mut rx, "pod events", |c| {
            pod_names(c) == ["prod/a", "prod/c"]
        })
        .await;
        assert_eq!(
            labels_of(&c, "a").get("tier").map(String::as_str),
            Some("front")
        );
        // The re-watch resumes from the bookmark's resourceVersion, not the last event's.
        let (q, _pods_watch) = api.next(Res::Pods, WAIT).await;
        assert_watch_query(Res::Pods, &q, "250");

        api.watch(
            Res::Namespaces,
            "100",
            &[
                event(
                    "MODIFIED",
                    &namespace("prod", json!({"env": "staging"}), "101"),
                ),
                event("ADDED", &namespace("dev", json!({}), "102")),
            ],
        )
        .await;
        api.watch(
            Res::Policies,
            "300",
            &[event("ADDED", &policy("prod", "deny", deny_all(), "301"))],
        )
        .await;
        let c = until(&mut rx, "namespace and policy events", |c| {
            c.namespaces.len() == 2 && c.policies.len() == 1
        })
        .await;
        assert_eq!(names(&c).0, ["dev", "prod"]);
        assert_eq!(
            c.namespace_labels("prod").get("env").map(String::as_str),
            Some("staging")
        );
        let (q, _ns_watch) = api.next(Res::Namespaces, WAIT).await;
        assert_watch_query(Res::Namespaces, &q, "102");
        let (q, _pol_watch) = api.next(Res::Policies, WAIT).await;
        assert_watch_query(Res::Policies, &q, "301");

        // A pod update that only touches trimmed fields (status conditions, resourceVersion)
        // publishes nothing new: the agent does not recompile for it.
        drop(_pods_watch);
        let published = rx.borrow_and_update().clone().unwrap();
        let mut noise = pod(
            "prod",
            "a",
            NODE,
            "10.244.1.2",
            json!({"app": "a", "tier": "front"}),
            "260",
        );
        noise["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        // The dropped reply made that watch fail; after the backoff it is retried from 250.
        api.watch_within(
            Res::Pods,
            "250",
            &[event("MODIFIED", &noise)],
            AFTER_BACKOFF,
        )
        .await;
        let (q, _pods_watch) = api.next(Res::Pods, WAIT).await;
        assert_watch_query(Res::Pods, &q, "260");
        settle().await;
        assert!(
            !rx.has_changed().unwrap(),
            "an update of trimmed fields was published"
        );
        assert!(Arc::ptr_eq(rx.borrow().as_ref().unwrap(), &published));

        api.assert_nothing_unexpected();
        task.abort();
    }

    #[tokio::test]
    async fn gone_leads_to_a_relist_that_drops_objects_deleted_during_the_gap() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        api.initial_lists(
            vec![namespace("prod", json!({}), "5")],
            vec![
                pod("prod", "a", NODE, "10.244.1.2", json!({"app": "a"}), "10"),
                pod(
                    "prod",
                    "b",
                    "node-b",
                    "10.244.2.3",
                    json!({"app": "b"}),
                    "11",
                ),
            ],
            vec![policy("prod", "deny", deny_all(), "7")],
        )
        .await;
        until(&mut rx, "first snapshot", |c| c.pods.len() == 2).await;

        // The watch window expired: 410 Gone inside the watch stream.
        api.watch(Res::Pods, "200", &[gone()]).await;
        // Until the relist completes, the last snapshot stays.
        settle().await;
        assert_eq!(
            pod_names(rx.borrow().as_ref().unwrap()),
            ["prod/a", "prod/b"]
        );

        // The relist (after the backoff): b was deleted and d created during the gap; no
        // DELETED event ever arrives for b.
        api.list_within(
            Res::Pods,
            "400",
            vec![
                pod("prod", "a", NODE, "10.244.1.2", json!({"app": "a"}), "10"),
                pod(
                    "prod",
                    "d",
                    "node-b",
                    "10.244.2.9",
                    json!({"app": "d"}),
                    "390",
                ),
            ],
            AFTER_BACKOFF,
        )
        .await;
        let c = until(&mut rx, "after the relist", |c| {
            pod_names(c) == ["prod/a", "prod/d"]
        })
        .await;
        assert_eq!(c.policies.len(), 1);
        let (q, _w) = api.next(Res::Pods, WAIT).await;
        assert_watch_query(Res::Pods, &q, "400");

        // The same for policies: a policy deleted during the gap is gone after the relist
        // (this is what keeps a deleted deny-all from staying enforced).
        api.watch(Res::Policies, "300", &[gone()]).await;
        api.list_within(Res::Policies, "500", vec![], AFTER_BACKOFF)
            .await;
        until(&mut rx, "policy gone after relist", |c| {
            c.policies.is_empty()
        })
        .await;

        api.assert_nothing_unexpected();
        task.abort();
    }

    #[tokio::test]
    async fn api_errors_back_off_and_the_last_snapshot_stays_until_recovery() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);

        // The first pods list fails: nothing is published, the list is retried after a backoff.
        api.list(
            Res::Namespaces,
            "100",
            vec![namespace("prod", json!({}), "5")],
        )
        .await;
        api.list(Res::Services, "400", vec![]).await;
        api.list(
            Res::Policies,
            "300",
            vec![policy("prod", "deny", deny_all(), "7")],
        )
        .await;
        api.cluster_wide_absent().await;
        let q = api.fail(Res::Pods, 500, "InternalError").await;
        assert_list_query(Res::Pods, &q);
        settle().await;
        assert!(rx.borrow().is_none(), "published without a pods list");
        api.list_within(
            Res::Pods,
            "200",
            vec![pod(
                "prod",
                "a",
                NODE,
                "10.244.1.2",
                json!({"app": "a"}),
                "10",
            )],
            AFTER_BACKOFF,
        )
        .await;
        let before = until(&mut rx, "first snapshot after the failed list", |c| {
            c.pods.len() == 1
        })
        .await;

        // The API server goes away: the watches of pods and policies fail to start (500, 503).
        let q = api.fail(Res::Pods, 500, "InternalError").await;
        assert_watch_query(Res::Pods, &q, "200");
        let q = api.fail(Res::Policies, 503, "ServiceUnavailable").await;
        assert_watch_query(Res::Policies, &q, "300");
        settle().await;
        // Still the same snapshot: the agent keeps enforcing it.
        assert!(Arc::ptr_eq(rx.borrow().as_ref().unwrap(), &before));

        // Recovery: the watches are retried from the same resourceVersions, no relist needed.
        api.watch_within(
            Res::Pods,
            "200",
            &[event(
                "ADDED",
                &pod(
                    "prod",
                    "b",
                    "node-b",
                    "10.244.2.3",
                    json!({"app": "b"}),
                    "210",
                ),
            )],
            AFTER_BACKOFF,
        )
        .await;
        api.watch_within(
            Res::Policies,
            "300",
            &[event("DELETED", &policy("prod", "deny", deny_all(), "310"))],
            AFTER_BACKOFF,
        )
        .await;
        let c = until(&mut rx, "after recovery", |c| {
            c.pods.len() == 2 && c.policies.is_empty()
        })
        .await;
        assert_eq!(pod_names(&c), ["prod/a", "prod/b"]);

        api.assert_nothing_unexpected();
        assert!(!task.is_finished());
        task.abort();
    }

    #[tokio::test]
    async fn pods_on_other_nodes_are_peers_and_only_local_pods_are_endpoints() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        let allow_frontend = json!({
            "podSelector": {"matchLabels": {"app": "backend"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}], "ports": [{"port": 8080}]}],
        });
        api.initial_lists(
            vec![namespace("shop", json!({}), "5")],
            vec![
                pod(
                    "shop",
                    "backend",
                    NODE,
                    "10.244.1.10",
                    json!({"app": "backend"}),
                    "10",
                ),
                pod(
                    "shop",
                    "frontend",
                    "node-b",
                    "10.244.2.20",
                    json!({"app": "frontend"}),
                    "11",
                ),
            ],
            vec![policy("shop", "allow-frontend", allow_frontend, "7")],
        )
        .await;
        let c = until(&mut rx, "snapshot", |c| c.pods.len() == 2).await;
        // Both pods are in the cluster: the remote one too.
        assert_eq!(pod_names(&c), ["shop/backend", "shop/frontend"]);

        let opts = CompileOptions {
            node_name: Some(NODE.to_string()),
            ..CompileOptions::default()
        };
        let compiled = compile(&c, &opts, &mut Allocations::new());
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        // Only the local pod is an endpoint of this node...
        let endpoints: Vec<String> = compiled
            .state
            .endpoints
            .keys()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        assert_eq!(endpoints, ["shop/backend"]);
        // ...and the remote frontend's address resolves to an identity, so the podSelector peer
        // on another node is recognised.
        let frontend: std::net::Ipv4Addr = "10.244.2.20".parse().unwrap();
        assert!(
            compiled.state.peers_v4.contains_key(&frontend),
            "remote peer not resolved"
        );

        // With a node-local view only, the peer would be unknown: the all-pods reflector is
        // what makes cross-node podSelector peers work.
        let local_only = Cluster {
            pods: c
                .pods
                .iter()
                .filter(|p| pod_node(p) == Some(NODE))
                .cloned()
                .collect(),
            ..Cluster::clone(&c)
        };
        let compiled = compile(&local_only, &opts, &mut Allocations::new());
        assert!(!compiled.state.peers_v4.contains_key(&frontend));

        api.assert_nothing_unexpected();
        task.abort();
    }

    #[tokio::test]
    async fn services_are_listed_trimmed_watched_and_compiled_to_frontends_and_node_ports() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        api.list(
            Res::Namespaces,
            "100",
            vec![namespace("shop", json!({}), "5")],
        )
        .await;
        api.list(Res::Pods, "200", vec![]).await;
        api.list(Res::Policies, "300", vec![]).await;
        api.cluster_wide_absent().await;
        // Services not listed yet: nothing is published (a snapshot without them would stop
        // deferring Service traffic).
        settle().await;
        assert!(rx.borrow().is_none(), "published before the services list");
        api.list(
            Res::Services,
            "400",
            vec![service(
                "shop",
                "web",
                "10.96.0.10",
                json!({"app": "web"}),
                "9",
            )],
        )
        .await;
        let c = until(&mut rx, "services listed", |c| c.services.len() == 1).await;
        let web = &c.services[0];
        assert!(web.metadata.managed_fields.is_none() && web.metadata.annotations.is_none());
        let spec = web.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(
            spec.cluster_ips.as_deref(),
            Some(&["10.96.0.10".to_string()][..])
        );
        assert!(spec.session_affinity.is_none() && spec.ip_families.is_none());
        assert!(spec.external_traffic_policy.is_none());
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!((port.port, port.node_port), (80, Some(30080)));
        assert!(port.app_protocol.is_none());
        assert!(web.status.is_none(), "an empty load-balancer status goes");
        // Trimming is idempotent.
        let mut again = Service::clone(web);
        trim_service(&mut again);
        assert_eq!(&again, &**web);

        let compiled = compile(
            &c,
            &CompileOptions {
                node_name: Some(NODE.to_string()),
                ..CompileOptions::default()
            },
            &mut Allocations::new(),
        );
        for ip in ["10.96.0.10", "192.0.2.7"] {
            assert_eq!(
                compiled.state.peers_v4[&ip.parse().unwrap()].identity,
                enforcer_common::IDENTITY_SERVICE
            );
        }
        assert_eq!(
            compiled
                .state
                .node_ports
                .iter()
                .map(|k| k.port)
                .collect::<Vec<_>>(),
            [30080]
        );

        // Watched: a load-balancer IP appears, another Service comes, the first goes.
        let mut lb = service("shop", "web", "10.96.0.10", json!({"app": "web"}), "401");
        lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]}]}});
        api.watch(
            Res::Services,
            "400",
            &[
                event("MODIFIED", &lb),
                event(
                    "ADDED",
                    &service("shop", "api", "10.96.0.11", json!({"app": "api"}), "402"),
                ),
            ],
        )
        .await;
        let c = until(&mut rx, "service events", |c| c.services.len() == 2).await;
        assert_eq!(service_names(&c), ["shop/api", "shop/web"]);
        let ingress = &c.services[1]
            .status
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap()
            .ingress
            .as_ref()
            .unwrap()[0];
        assert_eq!(ingress.ip.as_deref(), Some("198.51.100.1"));
        assert_eq!(ingress.ip_mode.as_deref(), Some("VIP"));
        assert!(ingress.ports.is_none());
        let (q, _w) = api.next(Res::Services, WAIT).await;
        assert_watch_query(Res::Services, &q, "402");
        drop(_w);
        api.watch_within(
            Res::Services,
            "402",
            &[event("DELETED", &lb)],
            AFTER_BACKOFF,
        )
        .await;
        until(&mut rx, "service deleted", |c| {
            service_names(c) == ["shop/api"]
        })
        .await;

        api.assert_nothing_unexpected();
        task.abort();
    }

    #[test]
    fn snapshot_is_sorted_whatever_the_store_order() {
        let (ns_store, mut ns_w) = reflector::store::<Namespace>();
        let pod_store = PodStore::default();
        let (pol_store, mut pol_w) = reflector::store::<NetworkPolicy>();
        let (svc_store, mut svc_w) = reflector::store::<Service>();
        for n in ["zeta", "alpha", "mid"] {
            let obj: Namespace = serde_json::from_value(namespace(n, json!({}), "1")).unwrap();
            ns_w.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        for (ns, name) in [("b", "x"), ("a", "y"), ("a", "x"), ("b", "a")] {
            let obj: Pod =
                serde_json::from_value(pod(ns, name, NODE, "10.0.0.1", json!({}), "1")).unwrap();
            pod_store.apply(&watcher::Event::Apply(obj));
            let obj: NetworkPolicy =
                serde_json::from_value(policy(ns, name, deny_all(), "1")).unwrap();
            pol_w.apply_watcher_event(&watcher::Event::Apply(obj));
            let obj: Service =
                serde_json::from_value(service(ns, name, "10.96.0.1", json!({}), "1")).unwrap();
            svc_w.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        let c = snapshot(&ns_store, &pod_store, &pol_store, &svc_store);
        let (ns, pods, pols) = names(&c);
        assert_eq!(ns, ["alpha", "mid", "zeta"]);
        assert_eq!(pods, ["a/x", "a/y", "b/a", "b/x"]);
        assert_eq!(pols, pods);
        assert_eq!(service_names(&c), pods);
        // Deterministic: the same Stores give an equal value.
        assert!(same_cluster(
            &c,
            &snapshot(&ns_store, &pod_store, &pol_store, &svc_store)
        ));
    }

    /// A policy the API server accepted but this agent's validation refuses (here: a named
    /// port that is not an IANA service name) is in the snapshot as listed, and once through
    /// the agent's last-good step it isolates the local pods it selects in the directions it
    /// names, allowing nothing: fail closed, not ignored.
    #[test]
    fn a_policy_the_agent_refuses_isolates_the_pods_it_selects() {
        use enforcer_common::{DIR_EGRESS, DIR_INGRESS};
        let (ns_store, mut ns_w) = reflector::store::<Namespace>();
        let pod_store = PodStore::default();
        let (pol_store, mut pol_w) = reflector::store::<NetworkPolicy>();
        let (svc_store, _) = reflector::store::<Service>();
        let obj: Namespace = serde_json::from_value(namespace("shop", json!({}), "1")).unwrap();
        ns_w.apply_watcher_event(&watcher::Event::Apply(obj));
        for (name, app, ip) in [
            ("backend", "backend", "10.244.1.10"),
            ("other", "x", "10.244.1.11"),
        ] {
            let obj: Pod =
                serde_json::from_value(pod("shop", name, NODE, ip, json!({"app": app}), "2"))
                    .unwrap();
            pod_store.apply(&watcher::Event::Apply(obj));
        }
        let spec = json!({
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [{"ports": [{"port": "Not_A_Name"}]}],
        });
        let mut obj: NetworkPolicy =
            serde_json::from_value(policy("shop", "odd", spec, "3")).unwrap();
        trim_policy(&mut obj);
        pol_w.apply_watcher_event(&watcher::Event::Apply(obj));
        let mut c = snapshot(&ns_store, &pod_store, &pol_store, &svc_store);
        let problems = crate::source::watch::LastGoodPolicies::default().apply(&mut c);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("shop/odd") && p.contains("spec.ingress[0].ports[0].port")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("isolating the pods it selects (ingress)")),
            "{problems:?}"
        );
        let opts = CompileOptions {
            node_name: Some(NODE.to_string()),
            ..CompileOptions::default()
        };
        let compiled = compile(&c, &opts, &mut Allocations::new());
        assert_eq!(compiled.refused.len(), 1);
        let info = |name: &str| {
            compiled.state.endpoints[&enforcer_policy::state::PodRef::new("shop", name)].info
        };
        assert!(info("backend").isolated(DIR_INGRESS) && !info("backend").isolated(DIR_EGRESS));
        assert!(!info("other").isolated(DIR_INGRESS), "not selected");
        assert!(compiled.state.policy.is_empty(), "nothing allowed");
    }

    /// Full Pod objects are not kept: the watch holds each pod as its compact form, with what
    /// the compiler reads (host-network pods stay out of policy), replicas share their label
    /// set, and an update of a field not kept (a condition, the image, managed fields) changes
    /// nothing and publishes nothing.
    #[test]
    fn pods_are_held_compactly_at_the_watch() {
        let full = |name: &str, ip: &str| -> Pod {
            serde_json::from_value(pod("prod", name, NODE, ip, json!({"app": "a"}), "1")).unwrap()
        };
        let store = PodStore::default();
        let mut host = full("host", "172.18.0.2");
        host.spec.as_mut().unwrap().host_network = Some(true);
        store.apply(&watcher::Event::Init);
        for p in [full("a", "10.244.1.2"), full("b", "10.244.1.3"), host] {
            store.apply(&watcher::Event::InitApply(p));
        }
        assert!(store.state().is_empty(), "a list is swapped in whole");
        assert!(store.apply(&watcher::Event::InitDone));
        let pods = store.state();
        assert_eq!(pods.len(), 3);
        let a = &pods[0];
        assert_eq!((&*a.namespace, &*a.name), ("prod", "a"));
        assert_eq!(a.uid.as_deref(), Some("uid-prod-a"));
        assert_eq!(a.node_name.as_deref(), Some(NODE));
        assert_eq!(
            *a.labels,
            BTreeMap::from([("app".to_string(), "a".to_string())])
        );
        assert_eq!(
            a.named_ports.iter().cloned().collect::<Vec<_>>(),
            [("http".to_string(), enforcer_common::PROTO_TCP, 8080)]
        );
        assert_eq!(&*a.ips, ["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]);
        assert!(
            Arc::ptr_eq(&a.labels, &pods[1].labels),
            "replicas share one label set"
        );
        let cluster = Cluster {
            pods: pods.clone(),
            ..Cluster::default()
        };
        let policy_pods: Vec<_> = cluster
            .policy_pods()
            .into_iter()
            .map(|(r, _)| r.name)
            .collect();
        assert_eq!(
            policy_pods,
            ["a", "b"],
            "the host-network pod takes no part"
        );

        // Only unkept fields changed: the same value, nothing to publish.
        let mut noisy = full("a", "10.244.1.2");
        noisy.metadata.resource_version = Some("9".into());
        noisy.spec.as_mut().unwrap().containers[0].image = Some("registry.example/app:2".into());
        noisy.status.as_mut().unwrap().conditions = None;
        assert!(!store.apply(&watcher::Event::Apply(noisy)));
        assert!(Arc::ptr_eq(&store.state()[0], a));
        // A kept field changed: published.
        let mut moved = full("a", "10.244.1.2");
        moved.metadata.labels = Some(BTreeMap::from([("app".into(), "z".into())]));
        assert!(store.apply(&watcher::Event::Apply(moved)));
        assert_eq!(
            store.state()[0].labels.get("app").map(String::as_str),
            Some("z")
        );
        assert!(store.apply(&watcher::Event::Delete(full("b", "10.244.1.3"))));
        assert_eq!(store.state().len(), 2);
    }

    /// An identity record as an agent writes it, with what the API server adds.
    fn record(name: &str, uid: &str, node: &str, ip: &str, rv: &str) -> Value {
        json!({
            "apiVersion": "enforcer.dev/v1alpha1", "kind": "IdentityBinding",
            "metadata": {
                "namespace": "shop", "name": name, "uid": format!("uid-record-{name}"),
                "resourceVersion": rv,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": false}],
                "managedFields": [{"manager": "enforcer-agent", "operation": "Apply", "apiVersion": "enforcer.dev/v1alpha1"}],
            },
            "spec": {
                "serviceAccount": "default", "pod": {"name": name, "uid": uid},
                "addresses": [ip], "expiresAt": "2099-01-01T00:00:00Z", "node": node,
            },
        })
    }

    /// Records that never list (no CRD) hold the first publication back only for a bound:
    /// then the cluster is enforced without them, rather than not at all.
    #[tokio::test(start_paused = true)]
    async fn records_that_never_list_delay_the_first_publication_only_for_a_bound() {
        let (client, mut api) = start();
        let (tx, mut rx) = watch::channel(None);
        let (rtx, rrx) = watch::channel(None);
        let task = tokio::spawn(run_with_records(client, NODE.to_string(), tx, Some(rtx)));
        let started = tokio::time::Instant::now();
        api.initial_lists(
            vec![namespace("shop", json!({}), "5")],
            vec![pod(
                "shop",
                "a",
                NODE,
                "10.244.1.10",
                json!({"app": "a"}),
                "10",
            )],
            vec![],
        )
        .await;
        settle().await;
        assert!(rx.borrow().is_none(), "published before the records' bound");
        // The records' list request is never answered.
        tokio::time::sleep(RECORDS_FIRST_LIST).await;
        let c = until(&mut rx, "snapshot after the bound", |c| c.pods.len() == 1).await;
        assert!(started.elapsed() >= RECORDS_FIRST_LIST);
        assert_eq!(c.pods.len(), 1);
        assert!(
            rrx.borrow().as_ref().is_none_or(|r| r.is_empty()),
            "no records"
        );
        task.abort();
    }

    /// With identity on, the records of every namespace are listed before anything is
    /// published (a restarted agent's first compile has them), then watched; each agent
    /// accepts only those that agree with the pods it sees: the right uid, node and address.
    #[tokio::test]
    async fn identity_records_are_listed_first_watched_and_checked_against_the_pods() {
        use crate::identity::records::{Evaluated, RecordMetrics, Rejection};
        let (client, mut api) = start();
        let (tx, mut rx) = watch::channel(None);
        let (rtx, mut rrx) = watch::channel(None);
        let task = tokio::spawn(run_with_records(client, NODE.to_string(), tx, Some(rtx)));
        api.initial_lists(
            vec![namespace("shop", json!({}), "5")],
            vec![
                pod("shop", "a", NODE, "10.244.1.10", json!({"app": "a"}), "10"),
                pod(
                    "shop",
                    "b",
                    "node-b",
                    "10.244.2.20",
                    json!({"app": "b"}),
                    "11",
                ),
            ],
            vec![],
        )
        .await;
        settle().await;
        assert!(rx.borrow().is_none(), "published before the records list");
        api.list(
            Res::Records,
            "500",
            vec![
                // a, verified by its own node's agent: accepted.
                record("a", "uid-shop-a", NODE, "10.244.1.10", "20"),
                // b, claimed by this node's agent although b runs on node-b: rejected.
                record("b", "uid-shop-b", NODE, "10.244.2.20", "21"),
                // a pod that is gone: rejected.
                record("c", "uid-shop-c", NODE, "10.244.1.30", "22"),
            ],
        )
        .await;
        let c = until(&mut rx, "first snapshot", |c| c.pods.len() == 2).await;
        let records = rrx
            .borrow_and_update()
            .clone()
            .expect("records published first");
        assert_eq!(records.len(), 3);
        assert!(
            records[0].metadata.managed_fields.is_none()
                && records[0].metadata.resource_version.is_none()
        );
        assert_eq!(records[0].metadata.uid.as_deref(), Some("uid-record-a"));
        let metrics = RecordMetrics::default();
        let mut evaluated = Evaluated::default();
        let now = crate::identity::unix_now();
        assert!(evaluated.update(&records, &c, &[], now, &metrics));
        let bound: Vec<String> = evaluated.bound.keys().map(ToString::to_string).collect();
        assert_eq!(bound, ["10.244.1.10"]);
        assert_eq!(metrics.rejected(Rejection::WrongNode), 1);
        assert_eq!(metrics.rejected(Rejection::UnknownPod), 1);

        // Watched: a's record is deleted (its pod went: the garbage collector), b's node
        // agent publishes b's.
        api.watch(
            Res::Records,
            "500",
            &[
                event(
                    "DELETED",
                    &record("a", "uid-shop-a", NODE, "10.244.1.10", "30"),
                ),
                event(
                    "MODIFIED",
                    &record("b", "uid-shop-b", "node-b", "10.244.2.20", "31"),
                ),
            ],
        )
        .await;
        timeout(
            WAIT,
            rrx.wait_for(|r| {
                r.as_ref()
                    .is_some_and(|r| r.len() == 2 && r.iter().any(|r| r.spec.node == "node-b"))
            }),
        )
        .await
        .expect("record events published")
        .unwrap();
        let records = rrx.borrow().clone().unwrap();
        assert!(evaluated.update(&records, &c, &[], now, &metrics));
        let bound: Vec<String> = evaluated.bound.keys().map(ToString::to_string).collect();
        assert_eq!(bound, ["10.244.2.20"], "a's binding went, b's came");
        api.assert_nothing_unexpected();
        task.abort();
    }

    // ---- cluster-wide policies and nodes ----

    fn cnp(name: &str, tier: &str, priority: Option<u32>, rv: &str) -> Value {
        let mut spec = json!({
            "tier": tier,
            "subject": {"namespaces": {}},
            "egress": [{"name": "metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}],
        });
        if let Some(p) = priority {
            spec["priority"] = p.into();
        }
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name, "resourceVersion": rv, "generation": 1},
            "spec": spec,
            "status": {"conditions": []},
        })
    }

    fn anp(name: &str, priority: u32, rv: &str) -> Value {
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": name, "resourceVersion": rv},
            "spec": {
                "priority": priority,
                "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
                "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}],
            },
        })
    }

    fn node(name: &str, zone: &str, ip: &str, rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": rv, "labels": {"zone": zone}},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": ip},
                    {"type": "Hostname", "address": name},
                    {"type": "ExternalIP", "address": "203.0.113.9"},
                ],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })
    }

    fn cluster_policy_names(c: &Cluster) -> Vec<String> {
        c.cluster_policies
            .iter()
            .map(|p| p.display_name())
            .collect()
    }

    /// The first lists of everything but the cluster-wide kinds, empty.
    async fn core_lists(api: &mut FakeApi) {
        api.list(Res::Namespaces, "100", vec![]).await;
        api.list(Res::Pods, "200", vec![]).await;
        api.list(Res::Policies, "300", vec![]).await;
        api.list(Res::Services, "400", vec![]).await;
    }

    /// A cluster without the policy CRDs (404 on their lists) is published (the agent is ready)
    /// with no cluster-wide policies, and a CRD installed later is found at the next look.
    #[tokio::test(start_paused = true)]
    async fn policy_kinds_without_a_crd_do_not_hold_the_snapshot_and_are_looked_for_again() {
        use super::super::cluster_wide::ABSENT_RECHECK;
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        api.initial_lists(vec![], vec![], vec![]).await;
        let c = until(&mut rx, "the first snapshot", |_| true).await;
        assert!(c.cluster_policies.is_empty() && c.nodes.is_empty());
        api.list_within(
            Res::Cnp,
            "600",
            vec![cnp("guard", "Admin", Some(10), "601")],
            ABSENT_RECHECK + WAIT,
        )
        .await;
        let c = until(&mut rx, "the policy of the CRD installed later", |c| {
            c.cluster_policies.len() == 1
        })
        .await;
        assert_eq!(cluster_policy_names(&c), ["ClusterNetworkPolicy/guard"]);
        api.assert_nothing_unexpected();
        task.abort();
    }

    /// The three kinds and the nodes are listed into the snapshot (policies in evaluation
    /// order: tier, priority, then name), and watch events update them; an object that does not
    /// read is there as its fail-closed stand-in, naming the field.
    #[tokio::test]
    async fn cluster_wide_policies_and_nodes_are_listed_in_order_and_watched() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        core_lists(&mut api).await;
        api.list(Res::Nodes, "500", vec![node("n1", "a", "172.18.0.2", "5")])
            .await;
        api.list(
            Res::Cnp,
            "600",
            vec![
                cnp("base", "Baseline", Some(0), "61"),
                cnp("b-guard", "Admin", Some(10), "62"),
                cnp("a-guard", "Admin", Some(10), "63"),
            ],
        )
        .await;
        api.list(Res::Anp, "700", vec![anp("first", 5, "71")]).await;
        api.fail(Res::Banp, 404, "NotFound").await;
        let c = until(&mut rx, "the cluster-wide policies", |c| {
            c.cluster_policies.len() == 4
        })
        .await;
        assert_eq!(
            cluster_policy_names(&c),
            [
                "AdminNetworkPolicy/first",
                "ClusterNetworkPolicy/a-guard",
                "ClusterNetworkPolicy/b-guard",
                "ClusterNetworkPolicy/base",
            ]
        );
        assert!(c.cluster_policies.iter().all(|p| p.refused.is_empty()));
        let n = &c.nodes[..];
        assert_eq!(n.len(), 1);
        assert_eq!(
            (
                n[0].name.as_str(),
                n[0].labels.get("zone").map(String::as_str)
            ),
            ("n1", Some("a"))
        );
        let want: Vec<std::net::IpAddr> = vec![
            "172.18.0.2".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
        ];
        assert_eq!(
            n[0].addresses, want,
            "InternalIP and ExternalIP, no host name"
        );

        api.watch(
            Res::Cnp,
            "600",
            &[
                event("MODIFIED", &cnp("a-guard", "Admin", Some(20), "64")),
                event("ADDED", &cnp("broken", "Admin", None, "65")),
            ],
        )
        .await;
        let c = until(&mut rx, "the watched changes", |c| {
            c.cluster_policies.len() == 5
        })
        .await;
        assert_eq!(
            cluster_policy_names(&c),
            [
                "ClusterNetworkPolicy/broken",
                "AdminNetworkPolicy/first",
                "ClusterNetworkPolicy/b-guard",
                "ClusterNetworkPolicy/a-guard",
                "ClusterNetworkPolicy/base",
            ],
            "a-guard moved after b-guard; the refused one stands in at the first priority"
        );
        let broken = &c.cluster_policies[0];
        assert_eq!(broken.refused[0].field, "spec.priority", "{broken:?}");

        api.watch(
            Res::Nodes,
            "500",
            &[event("MODIFIED", &node("n1", "b", "172.18.0.2", "6"))],
        )
        .await;
        until(&mut rx, "the node's new label", |c| {
            c.nodes[0].labels.get("zone").map(String::as_str) == Some("b")
        })
        .await;
        api.assert_nothing_unexpected();
        task.abort();
    }

    /// A policy kind that is installed but may not be listed (403) holds the first snapshot,
    /// as every other watch does: the agent keeps enforcing what is pinned until it lists.
    #[tokio::test]
    async fn a_forbidden_policy_kind_holds_the_first_snapshot_until_it_lists() {
        let (client, mut api) = start();
        let (task, mut rx) = spawn_source(client);
        core_lists(&mut api).await;
        api.list(Res::Nodes, "500", vec![]).await;
        api.fail(Res::Anp, 404, "NotFound").await;
        api.fail(Res::Banp, 404, "NotFound").await;
        api.fail(Res::Cnp, 403, "Forbidden").await;
        settle().await;
        assert!(
            rx.borrow().is_none(),
            "published without the forbidden kind"
        );
        api.list_within(Res::Cnp, "600", vec![], AFTER_BACKOFF)
            .await;
        until(&mut rx, "the first snapshot", |_| true).await;
        task.abort();
    }
}
