//! The watches of what cluster-wide policy reads: the three kinds of `policy.networking.k8s.io`
//! (ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1)
//! and the Nodes (labels and addresses, for `nodes` peers). Each object is converted as it
//! arrives ([`tiers::parse`], [`NodeInfo`]) into a [`NamedStore`]: no API object is kept, and
//! an update that changes nothing read (a Node's conditions, a policy's status) publishes
//! nothing.
//!
//! The policy kinds are optional. A cluster without their CRD answers 404 to the list: that is
//! not an error. The kind counts as listed with no objects (the agent publishes and is ready),
//! it is logged once at info, and it is listed again every [`ABSENT_RECHECK`], so a CRD
//! installed later is picked up. Any other error (403 from RBAC, a list that does not decode)
//! is a watch failure like the other watchers': logged naming the kind and retried with
//! backoff; before its first list nothing is published (the pinned state keeps enforcing),
//! after it the last objects stay.
//!
//! An object that does not read is enforced as its fail-closed stand-in
//! ([`tiers::ClusterPolicy::refused`]) and logged with the object and field; so is a peer that
//! fails closed (`domainNames`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use enforcer_policy::{
    model::{Cluster, NodeInfo},
    tiers::{self, ClusterPolicy, Kind, TierError},
};

use super::liveness::WatchBeats;

/// How often a policy kind whose CRD is not installed is listed again.
pub const ABSENT_RECHECK: Duration = Duration::from_secs(60);

/// The cluster-wide policy kinds, with the resource (plural) each is served as.
pub const POLICY_RESOURCES: [(Kind, &str); 3] = [
    (Kind::ClusterNetworkPolicy, "clusternetworkpolicies"),
    (Kind::AdminNetworkPolicy, "adminnetworkpolicies"),
    (
        Kind::BaselineAdminNetworkPolicy,
        "baselineadminnetworkpolicies",
    ),
];

/// The resources this module watches, by the names their heartbeats have.
pub const WATCHED: [&str; 4] = [
    "clusternetworkpolicies",
    "adminnetworkpolicies",
    "baselineadminnetworkpolicies",
    "nodes",
];

/// How `kind` is served: its group, version and plural.
pub fn api_resource(kind: Kind, plural: &str) -> ApiResource {
    let api_version = kind.api_version();
    ApiResource {
        group: tiers::api::GROUP.to_string(),
        version: api_version
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string(),
        api_version: api_version.to_string(),
        kind: kind.as_str().to_string(),
        plural: plural.to_string(),
    }
}

/// Converted objects by name, filled by one watch; a (re)list is gathered apart and swapped in
/// whole, as a reflector's Store does.
pub struct NamedStore<V> {
    inner: Arc<std::sync::Mutex<Inner<V>>>,
    ready: Arc<watch::Sender<bool>>,
}

impl<V> Clone for NamedStore<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            ready: Arc::clone(&self.ready),
        }
    }
}

struct Inner<V> {
    live: BTreeMap<String, Arc<V>>,
    listing: Option<BTreeMap<String, Arc<V>>>,
}

impl<V> Default for NamedStore<V> {
    fn default() -> Self {
        Self {
            inner: Arc::new(std::sync::Mutex::new(Inner {
                live: BTreeMap::new(),
                listing: None,
            })),
            ready: Arc::new(watch::channel(false).0),
        }
    }
}

impl<V: PartialEq> NamedStore<V> {
    /// Applies one watch event, each object converted by `convert` (`None`: left out), and
    /// `noticed` called with each value that is new or changed. `true` when the live set
    /// changed.
    pub fn apply<K: Resource>(
        &self,
        event: &watcher::Event<K>,
        convert: impl Fn(&K) -> Option<V>,
        noticed: impl Fn(&V),
    ) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return true;
        };
        // An unchanged object keeps its value: the snapshot compares equal by address.
        let value = |live: &BTreeMap<String, Arc<V>>, name: &str, v: V| match live.get(name) {
            Some(old) if **old == v => Arc::clone(old),
            _ => {
                noticed(&v);
                Arc::new(v)
            }
        };
        match event {
            watcher::Event::Init => {
                g.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                let name = o.name_any();
                if let Some(v) = convert(o) {
                    let v = value(&g.live, &name, v);
                    g.listing.get_or_insert_with(BTreeMap::new).insert(name, v);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = g.listing.take().unwrap_or_default();
                let changed = listed != g.live;
                g.live = listed;
                drop(g);
                let was_ready = self.ready.send_replace(true);
                changed || !was_ready
            }
            watcher::Event::Apply(o) => {
                let name = o.name_any();
                let Some(v) = convert(o) else {
                    return g.live.remove(&name).is_some();
                };
                if g.live.get(&name).is_some_and(|old| **old == v) {
                    return false;
                }
                let v = value(&g.live, &name, v);
                g.live.insert(name, v);
                true
            }
            watcher::Event::Delete(o) => g.live.remove(&o.name_any()).is_some(),
        }
    }

    /// The kind is not served: no objects, and listed as far as publishing goes. `true` when
    /// that changed something.
    fn set_absent(&self) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return true;
        };
        g.listing = None;
        let had = !g.live.is_empty();
        g.live.clear();
        drop(g);
        let was_ready = self.ready.send_replace(true);
        had || !was_ready
    }

    /// Every value, by name.
    pub fn values(&self) -> Vec<Arc<V>> {
        self.inner
            .lock()
            .map(|g| g.live.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Returns once the first list is in (or the kind is known not to be served).
    pub async fn wait_until_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|ready| *ready).await;
    }
}

/// A cluster-wide policy as read, with its peers that fail closed (logged when it changes).
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    pub policy: Arc<ClusterPolicy>,
    pub warnings: Vec<TierError>,
}

/// The Stores of this module.
#[derive(Clone, Default)]
pub struct ClusterWide {
    /// In [`POLICY_RESOURCES`] order.
    pub policies: [NamedStore<PolicyEntry>; 3],
    pub nodes: NamedStore<NodeInfo>,
}

impl ClusterWide {
    /// Runs the four watches, marking `dirty` on every change. Returns only when a watch
    /// stream ends, which kube's watchers never do on their own.
    pub async fn run(
        &self,
        client: Client,
        dirty: &watch::Sender<()>,
        beats: &WatchBeats,
    ) -> Result<()> {
        let [(k0, p0), (k1, p1), (k2, p2)] = POLICY_RESOURCES;
        let [s0, s1, s2] = &self.policies;
        tokio::select! {
            r = watch_policies(client.clone(), k0, p0, s0, dirty, beats) => r,
            r = watch_policies(client.clone(), k1, p1, s1, dirty, beats) => r,
            r = watch_policies(client.clone(), k2, p2, s2, dirty, beats) => r,
            r = watch_nodes(client, &self.nodes, dirty, beats) => r,
        }
    }

    /// Returns once every kind is listed (or known not to be served).
    pub async fn wait_until_ready(&self) {
        for s in &self.policies {
            s.wait_until_ready().await;
        }
        self.nodes.wait_until_ready().await;
    }

    /// Puts the Stores' contents into `cluster`: the policies in evaluation order, the nodes
    /// by name.
    pub fn fill(&self, cluster: &mut Cluster) {
        let mut policies: Vec<Arc<ClusterPolicy>> = self
            .policies
            .iter()
            .flat_map(NamedStore::values)
            .map(|e| Arc::clone(&e.policy))
            .collect();
        policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        cluster.cluster_policies = policies;
        cluster.nodes = self.nodes.values();
    }
}

/// Reads one object of `kind` into its model, as the folder does.
pub fn read_policy(kind: Kind, object: &DynamicObject) -> Option<PolicyEntry> {
    let mut value = serde_json::to_value(object).ok()?;
    // Watch events name the type; list items need not.
    value["apiVersion"] = kind.api_version().into();
    value["kind"] = kind.as_str().into();
    match tiers::parse(&value) {
        Ok(parsed) => Some(PolicyEntry {
            policy: Arc::new(parsed.policy),
            warnings: parsed.warnings,
        }),
        Err(e) => {
            log::error!("{} {}: {e}", kind.as_str(), object.name_any());
            None
        }
    }
}

/// Logs what a new or changed policy enforces otherwise than written.
fn report_policy(entry: &PolicyEntry) {
    let p = &entry.policy;
    for e in &p.refused {
        log::warn!(
            "{e}; {} is refused: enforcing its fail-closed stand-in (denying what it names for its subject)",
            p.display_name()
        );
    }
    for w in &entry.warnings {
        log::warn!("{w}");
    }
}

/// Whether a watch error says the resource is not served (its CRD is not installed).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r))
        | watcher::Error::WatchStartFailed(kube::Error::Api(r))
        | watcher::Error::WatchFailed(kube::Error::Api(r))
        | watcher::Error::WatchError(r) => r.code == 404,
        _ => false,
    }
}

async fn watch_policies(
    client: Client,
    kind: Kind,
    plural: &'static str,
    store: &NamedStore<PolicyEntry>,
    dirty: &watch::Sender<()>,
    beats: &WatchBeats,
) -> Result<()> {
    let resource = api_resource(kind, plural);
    let what = format!("{} ({})", kind.as_str(), kind.api_version());
    let mut absent = false;
    loop {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        loop {
            let Some(item) = stream.next().await else {
                bail!("the {plural} watch ended");
            };
            beats.beat(plural);
            match item {
                Ok(event) => {
                    if absent && matches!(event, watcher::Event::InitDone) {
                        log::info!("{what}: its CRD is installed now; watching them");
                        absent = false;
                    }
                    if store.apply(&event, |o| read_policy(kind, o), report_policy) {
                        dirty.send_replace(());
                    }
                }
                Err(e) if not_found(&e) => break,
                Err(e) => log::warn!(
                    "watching {what}: {e} (may the agent list and watch {plural}? manifests/rbac.yaml); \
                     retrying with backoff, enforcing the last known state"
                ),
            }
        }
        if store.set_absent() {
            dirty.send_replace(());
        }
        if !absent {
            log::info!(
                "{what} is not served by the API server (its CRD, manifests/crds/, is not installed): \
                 enforcing without them, looking again every {ABSENT_RECHECK:?}"
            );
            absent = true;
        }
        tokio::time::sleep(ABSENT_RECHECK).await;
    }
}

async fn watch_nodes(
    client: Client,
    store: &NamedStore<NodeInfo>,
    dirty: &watch::Sender<()>,
    beats: &WatchBeats,
) -> Result<()> {
    let stream = watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        beats.beat("nodes");
        match item {
            Ok(event) => {
                if store.apply(&event, |n| Some(NodeInfo::from(n)), |_| {}) {
                    dirty.send_replace(());
                }
            }
            Err(e) => log::warn!(
                "watching nodes: {e} (may the agent list and watch nodes? manifests/rbac.yaml); \
                 retrying with backoff, enforcing the last known state"
            ),
        }
    }
    bail!("the nodes watch ended")
}
