//! The agent side of identity: the live-pod directory the attestation endpoint checks callers
//! against, the verified addresses handed to the compiler (this agent's own attestations and
//! the accepted identity records of every agent), and the writer that publishes this agent's
//! attestations as records.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use enforcer_policy::model::{Cluster, pod_ips, pod_is_policy_pod, pod_node, pod_ref};

use crate::identity::{
    self, Bindings, PodDirectory, VerifiedIdentity, identity_labels,
    records::{self, Evaluated, IdentityBinding, RecordMetrics},
};
use crate::source::records::{RecordsRx, RecordsSource, record_files};

/// Live pods by address and by name, from the latest cluster the agent enforces. Host-network,
/// terminating and terminated pods, and node addresses, are never in it: such a pod gets no
/// binding, and loses the one it had.
#[derive(Default)]
pub struct LivePods {
    inner: RwLock<Inner>,
    /// Set by the first update: until then "not in the directory" means "not known yet".
    updated: AtomicBool,
}

#[derive(Default)]
struct Inner {
    by_ip: BTreeMap<IpAddr, identity::LivePod>,
    /// (namespace, name) -> (uid, node).
    by_name: BTreeMap<(String, String), (String, String)>,
}

impl LivePods {
    /// Replaces the directory with the pods of `cluster`.
    pub fn update(&self, cluster: &Cluster, node_ips: &[IpAddr]) {
        let mut next = Inner::default();
        for pod in cluster.pods.iter().filter(|p| pod_is_policy_pod(p)) {
            if pod.terminating {
                continue;
            }
            let r = pod_ref(pod);
            let uid = pod.uid.as_deref().unwrap_or_default().to_string();
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
            let node = pod_node(pod).unwrap_or_default().to_string();
            next.by_name
                .entry((r.namespace, r.name))
                .or_insert((uid, node));
        }
        if let Ok(mut g) = self.inner.write() {
            *g = next;
        }
        self.updated.store(true, Ordering::Release);
    }

    /// Whether [`LivePods::update`] ran at least once.
    pub fn is_updated(&self) -> bool {
        self.updated.load(Ordering::Acquire)
    }

    /// `spec.nodeName` of the live pod `namespace/name`.
    pub fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.inner
            .read()
            .ok()?
            .by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(_, node)| node.clone())
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
            .by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(uid, _)| uid.clone())
    }
}

/// The records an agent reads, and which of them it accepts.
pub struct RecordsView {
    source: RecordsSource,
    records: Vec<Arc<IdentityBinding>>,
    evaluated: Evaluated,
}

impl RecordsView {
    pub fn new(source: RecordsSource) -> Self {
        Self {
            source,
            records: Vec::new(),
            evaluated: Evaluated::default(),
        }
    }
}

/// What the control loop needs of identity.
#[derive(Clone)]
pub struct Identity {
    /// This agent's own attestations (the attestation endpoint writes them).
    pub bindings: Arc<Bindings>,
    pub pods: Arc<LivePods>,
    /// Every agent's records, when records are on (they need the node's name).
    pub records: Option<Arc<Mutex<RecordsView>>>,
    pub record_metrics: Arc<RecordMetrics>,
}

impl Identity {
    /// Identity without records: bindings live in this agent only.
    pub fn local(bindings: Arc<Bindings>, pods: Arc<LivePods>) -> Self {
        Self {
            bindings,
            pods,
            records: None,
            record_metrics: Arc::new(RecordMetrics::default()),
        }
    }

    /// Drops bindings whose token expired or whose pod is gone; returns whether any went.
    pub fn sweep(&self) -> bool {
        !self
            .bindings
            .sweep(&*self.pods, identity::unix_now())
            .is_empty()
    }

    /// Reads new records, and evaluates them again when they, or the `cluster` they are checked
    /// against (`cluster_changed`), changed or one expired. Returns whether the addresses they
    /// bind changed.
    pub fn update_records(
        &self,
        cluster: Option<&Cluster>,
        cluster_changed: bool,
        node_ips: &[IpAddr],
    ) -> bool {
        let Some(view) = &self.records else {
            return false;
        };
        let Ok(mut guard) = view.lock() else {
            return false;
        };
        let v = &mut *guard;
        let fresh = v.source.poll(&self.record_metrics);
        let got = fresh.is_some();
        if let Some(r) = fresh {
            v.records = r;
        }
        let now = identity::unix_now();
        let expired = v.evaluated.next_expiry.is_some_and(|e| e <= now);
        let Some(cluster) = cluster else {
            return false;
        };
        if !(got || cluster_changed || expired) {
            return false;
        }
        v.evaluated
            .update(&v.records, cluster, node_ips, now, &self.record_metrics)
    }

    /// The verified addresses with their reserved labels, for [`Cluster::verified`]: this
    /// agent's attestations, then the accepted records (an address this agent verified itself
    /// keeps that binding).
    pub fn verified(&self) -> BTreeMap<IpAddr, BTreeMap<String, String>> {
        let now = identity::unix_now();
        let mut out: BTreeMap<IpAddr, BTreeMap<String, String>> = self
            .bindings
            .snapshot()
            .into_iter()
            .filter(|(_, id)| id.expires_at > now)
            .map(|(ip, id)| (ip, identity_labels(&id)))
            .collect();
        if let Some(view) = &self.records
            && let Ok(v) = view.lock()
        {
            for (ip, id) in &v.evaluated.bound {
                if id.expires_at > now {
                    out.entry(*ip).or_insert_with(|| identity_labels(id));
                }
            }
        }
        out
    }
}

/// Where this agent's records are written.
pub enum RecordStore {
    /// Standalone: the records folder shared by the agents.
    Folder(PathBuf),
    /// In a cluster: `IdentityBinding` objects, read back from the kube source's reflector.
    Kube {
        client: kube::Client,
        records: RecordsRx,
    },
}

impl RecordStore {
    /// Every record as the store has it now (`None` until the kube source has listed them).
    async fn list(&self) -> anyhow::Result<Option<Vec<IdentityBinding>>> {
        match self {
            Self::Folder(dir) => {
                let mut out = Vec::new();
                for f in record_files(dir).with_context(|| format!("listing {}", dir.display()))? {
                    // A file that does not parse is the readers' to report.
                    if let Ok(r) = std::fs::read_to_string(&f)
                        .map_err(|e| e.to_string())
                        .and_then(|t| records::parse_file(&t))
                    {
                        out.push(r);
                    }
                }
                Ok(Some(out))
            }
            Self::Kube { records, .. } => Ok(records
                .borrow()
                .as_ref()
                .map(|r| r.iter().map(|r| IdentityBinding::clone(r)).collect())),
        }
    }

    /// Creates or updates `record`. `existing` is the store's record of that name: one for
    /// another pod uid or node cannot be updated into this one (the admission policy refuses
    /// it), so it is deleted first.
    async fn put(
        &self,
        record: &IdentityBinding,
        existing: Option<&IdentityBinding>,
    ) -> anyhow::Result<()> {
        match self {
            Self::Folder(dir) => records::write_file(dir, record).map(|_| ()),
            Self::Kube { client, .. } => {
                use kube::api::{Api, Patch, PatchParams};
                let ns = record.metadata.namespace.as_deref().unwrap_or_default();
                let name = record.metadata.name.as_deref().unwrap_or_default();
                let api: Api<IdentityBinding> = Api::namespaced(client.clone(), ns);
                if let Some(old) = existing
                    && (old.spec.pod.uid != record.spec.pod.uid
                        || old.spec.node != record.spec.node)
                {
                    self.delete(old).await?;
                }
                api.patch(
                    name,
                    &PatchParams::apply(records::FIELD_MANAGER).force(),
                    &Patch::Apply(record),
                )
                .await
                .with_context(|| format!("applying IdentityBinding {ns}/{name}"))?;
                Ok(())
            }
        }
    }

    /// Deletes `record` (only that very object: a uid precondition in a cluster).
    async fn delete(&self, record: &IdentityBinding) -> anyhow::Result<()> {
        let ns = record.metadata.namespace.as_deref().unwrap_or_default();
        let name = record.metadata.name.as_deref().unwrap_or_default();
        match self {
            Self::Folder(dir) => {
                let path = dir.join(records::file_name(ns, name));
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                    _ => Ok(()),
                }
            }
            Self::Kube { client, .. } => {
                use kube::api::{Api, DeleteParams, Preconditions};
                let api: Api<IdentityBinding> = Api::namespaced(client.clone(), ns);
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: record.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => {
                        Err(e).with_context(|| format!("deleting IdentityBinding {ns}/{name}"))
                    }
                }
            }
        }
    }
}

/// How often the writer looks again without a change of the bindings: failed writes are
/// retried, and expired records deleted, at this pace.
pub const WRITER_PACE: Duration = Duration::from_secs(1);

/// Publishes this agent's attestations as records, off the attestation response path: each
/// change of the bindings (and every [`WRITER_PACE`]) makes the store agree with them. It
/// never deletes a record only because this agent has no binding for it (a restarted agent
/// has none until pods attest again): its own records go when they expire, and, standalone,
/// when their pod is gone (in a cluster the garbage collector removes them with the pod).
pub struct RecordWriter {
    pub store: RecordStore,
    pub bindings: Arc<Bindings>,
    pub pods: Arc<LivePods>,
    pub node: String,
    pub metrics: Arc<RecordMetrics>,
    /// What failed last, so a write failing every second is logged once, not every time.
    failing: Mutex<BTreeSet<String>>,
}

impl RecordWriter {
    pub fn new(
        store: RecordStore,
        bindings: Arc<Bindings>,
        pods: Arc<LivePods>,
        node: String,
        metrics: Arc<RecordMetrics>,
    ) -> Self {
        Self {
            store,
            bindings,
            pods,
            node,
            metrics,
            failing: Mutex::new(BTreeSet::new()),
        }
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut changes = self.bindings.subscribe();
        loop {
            self.turn(identity::unix_now()).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tokio::time::sleep(WRITER_PACE) => {}
            }
        }
    }

    /// The records this agent's bindings call for: one per pod of this node, with every
    /// address it attested from and the latest expiry.
    pub fn desired(&self, now: u64) -> BTreeMap<(String, String), IdentityBinding> {
        let mut pods: BTreeMap<(String, String), (VerifiedIdentity, BTreeSet<IpAddr>)> =
            BTreeMap::new();
        for (ip, id) in self.bindings.snapshot() {
            if id.expires_at <= now {
                continue;
            }
            // A pod of another node may reach this node's endpoint; only its own node's agent
            // may vouch for it (and readers would reject the record).
            if self.pods.node_of(&id.namespace, &id.pod_name).as_deref() != Some(&self.node) {
                continue;
            }
            let key = (id.namespace.clone(), id.pod_name.clone());
            match pods.get_mut(&key) {
                Some((cur, ips)) if cur.pod_uid == id.pod_uid => {
                    cur.expires_at = cur.expires_at.max(id.expires_at);
                    ips.insert(ip);
                }
                // Bindings of an older pod of that name go with the sweep; the live uid wins.
                Some(_)
                    if self.pods.pod_uid(&id.namespace, &id.pod_name).as_deref()
                        != Some(&id.pod_uid) => {}
                _ => {
                    pods.insert(key, (id, BTreeSet::from([ip])));
                }
            }
        }
        pods.into_iter()
            .map(|(k, (id, ips))| (k, IdentityBinding::new(&id, &ips, &self.node)))
            .collect()
    }

    /// One pass: writes what is missing or different, deletes this node's records that expired
    /// (and, standalone, those whose pod is gone).
    pub async fn turn(&self, now: u64) {
        let existing = match self.store.list().await {
            Ok(Some(r)) => r,
            // Not listed yet: nothing is known to compare with (the next turn looks again).
            Ok(None) => return,
            Err(e) => {
                self.failed("list", &format!("identity records: {e:#}; retrying"));
                return;
            }
        };
        self.recovered("list");
        let by_key: HashMap<(String, String), &IdentityBinding> = existing
            .iter()
            .map(|r| {
                (
                    (
                        r.metadata.namespace.clone().unwrap_or_default(),
                        r.metadata.name.clone().unwrap_or_default(),
                    ),
                    r,
                )
            })
            .collect();
        let desired = self.desired(now);
        for (key, record) in &desired {
            let old = by_key.get(key).copied();
            if old.is_some_and(|o| o.same_spec(record)) {
                continue;
            }
            let what = format!("put {}", record.key());
            match self.store.put(record, old).await {
                Ok(()) => {
                    self.metrics.write(true);
                    self.recovered(&what);
                    log::info!(
                        "identity record {}: published (addresses {:?}, expires {})",
                        record.key(),
                        record.spec.addresses,
                        record.spec.expires_at
                    );
                }
                Err(e) => {
                    self.metrics.write(false);
                    self.failed(
                        &what,
                        &format!(
                            "identity record {}: {e:#}; retrying (this node still enforces the binding)",
                            record.key()
                        ),
                    );
                }
            }
        }
        let standalone = matches!(self.store, RecordStore::Folder(_));
        for r in &existing {
            if r.spec.node != self.node {
                continue;
            }
            let ns = r.metadata.namespace.as_deref().unwrap_or_default();
            let name = r.metadata.name.as_deref().unwrap_or_default();
            if desired.contains_key(&(ns.to_string(), name.to_string())) {
                continue;
            }
            let why = if r.expires_at().is_none_or(|e| e <= now) {
                "expired"
            } else if standalone
                && self.pods.is_updated()
                && self.pods.pod_uid(ns, name).as_deref() != Some(r.spec.pod.uid.as_str())
            {
                "its pod is gone"
            } else {
                continue;
            };
            let what = format!("delete {}", r.key());
            match self.store.delete(r).await {
                Ok(()) => {
                    self.metrics.delete(true);
                    self.recovered(&what);
                    log::info!("identity record {}: deleted ({why})", r.key());
                }
                Err(e) => {
                    self.metrics.delete(false);
                    self.failed(
                        &what,
                        &format!("identity record {}: {e:#}; retrying", r.key()),
                    );
                }
            }
        }
    }

    fn failed(&self, what: &str, message: &str) {
        let first = self
            .failing
            .lock()
            .map(|mut f| f.insert(what.to_string()))
            .unwrap_or(true);
        if first {
            log::warn!("{message}");
        } else {
            log::debug!("{message}");
        }
    }

    fn recovered(&self, what: &str) {
        if let Ok(mut f) = self.failing.lock() {
            f.remove(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LABEL_SERVICE_ACCOUNT;
    use crate::source::records::RecordsFolder;
    use enforcer_policy::model::shared;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn pod(name: &str, uid: &str, node: &str, ip: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": name, "uid": uid},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    fn cluster(pods: Vec<Pod>) -> Cluster {
        Cluster {
            pods: shared(pods),
            ..Cluster::default()
        }
    }

    fn id(name: &str, uid: &str, expires_at: u64) -> VerifiedIdentity {
        VerifiedIdentity {
            namespace: "x".into(),
            service_account: "frontend".into(),
            pod_name: name.into(),
            pod_uid: uid.into(),
            expires_at,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A terminating pod is not live: it cannot attest, and its binding goes at the sweep.
    #[test]
    fn a_terminating_pod_gets_no_binding_and_loses_the_one_it_had() {
        let pods = Arc::new(LivePods::default());
        let bindings = Arc::new(Bindings::new());
        let a = pod("a", "uid-a", "node-0", "10.0.0.1");
        pods.update(&cluster(vec![a.clone()]), &[]);
        let now = identity::unix_now();
        let verified = id("a", "uid-a", now + 600);
        assert_eq!(
            identity::check_binding(&*pods, &verified, ip("10.0.0.1")),
            Ok(())
        );
        bindings.bind(ip("10.0.0.1"), verified.clone());
        let mut terminating = a;
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::chrono::Utc::now()),
        );
        pods.update(&cluster(vec![terminating]), &[]);
        assert_eq!(
            identity::check_binding(&*pods, &verified, ip("10.0.0.1")),
            Err(identity::Reason::UnknownPod)
        );
        let identity = Identity::local(bindings.clone(), pods);
        assert!(identity.sweep());
        assert!(bindings.is_empty() && identity.verified().is_empty());
    }

    fn writer(dir: &std::path::Path, node: &str) -> (RecordWriter, Arc<Bindings>, Arc<LivePods>) {
        let bindings = Arc::new(Bindings::new());
        let pods = Arc::new(LivePods::default());
        let w = RecordWriter::new(
            RecordStore::Folder(dir.to_path_buf()),
            bindings.clone(),
            pods.clone(),
            node.into(),
            Arc::new(RecordMetrics::default()),
        );
        (w, bindings, pods)
    }

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Standalone: an attestation becomes a record in the shared folder; re-attesting extends
    /// it; a pod of another node is not vouched for; a restarted writer (no bindings) keeps the
    /// records until they expire or their pod goes.
    #[tokio::test]
    async fn the_writer_publishes_extends_and_cleans_up_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let now = identity::unix_now();
        let (w, bindings, pods) = writer(dir.path(), "node-0");
        let c = cluster(vec![
            pod("a", "uid-a", "node-0", "10.0.0.1"),
            pod("b", "uid-b", "node-1", "10.0.1.1"),
        ]);
        pods.update(&c, &[]);
        bindings.bind(ip("10.0.0.1"), id("a", "uid-a", now + 600));
        bindings.bind(ip("10.0.1.1"), id("b", "uid-b", now + 600));
        w.turn(now).await;
        assert_eq!(files(dir.path()), ["x.a.yaml"], "only its own node's pod");
        let read = |name: &str| {
            records::parse_file(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
        };
        let r = read("x.a.yaml");
        assert_eq!(r.spec.node, "node-0");
        assert_eq!(r.spec.addresses, ["10.0.0.1"]);
        assert_eq!(r.expires_at(), Some(now + 600));
        bindings.bind(ip("10.0.0.1"), id("a", "uid-a", now + 1200));
        w.turn(now).await;
        assert_eq!(
            read("x.a.yaml").expires_at(),
            Some(now + 1200),
            "re-attest extends"
        );

        // Restart: a new writer with no bindings deletes nothing that is still valid.
        let (w2, _, pods2) = writer(dir.path(), "node-0");
        pods2.update(&c, &[]);
        w2.turn(now).await;
        assert_eq!(files(dir.path()), ["x.a.yaml"]);
        // Another node's writer never touches node-0's records, even expired.
        let (w3, _, pods3) = writer(dir.path(), "node-1");
        pods3.update(&cluster(vec![]), &[]);
        w3.turn(now + 1300).await;
        assert_eq!(files(dir.path()), ["x.a.yaml"]);
        // Expired: deleted by its writer.
        w2.turn(now + 1200).await;
        assert!(files(dir.path()).is_empty());

        // Pod gone (standalone: no garbage collector): deleted by its writer.
        bindings.bind(ip("10.0.0.1"), id("a", "uid-a", now + 600));
        w.turn(now).await;
        assert_eq!(files(dir.path()), ["x.a.yaml"]);
        pods2.update(
            &cluster(vec![pod("a", "uid-a2", "node-0", "10.0.0.1")]),
            &[],
        );
        w2.turn(now).await;
        assert!(
            files(dir.path()).is_empty(),
            "a re-created pod's old record goes"
        );
        assert_eq!(w2.metrics.writes_failed(), 0);
    }

    /// A failed write is counted and retried; the agent's own binding holds meanwhile.
    #[tokio::test]
    async fn a_failed_write_is_counted_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        let (w, bindings, pods) = writer(&missing, "node-0");
        let now = identity::unix_now();
        pods.update(&cluster(vec![pod("a", "uid-a", "node-0", "10.0.0.1")]), &[]);
        bindings.bind(ip("10.0.0.1"), id("a", "uid-a", now + 600));
        // Listing fails first (the folder is missing): nothing written yet, retried.
        w.turn(now).await;
        std::fs::create_dir(&missing).unwrap();
        std::fs::create_dir(missing.join("x.a.yaml")).unwrap();
        w.turn(now).await;
        assert_eq!(w.metrics.writes_failed(), 1);
        let identity = Identity::local(bindings, pods);
        assert!(
            identity.verified().contains_key(&ip("10.0.0.1")),
            "the local binding holds"
        );
        std::fs::remove_dir(missing.join("x.a.yaml")).unwrap();
        w.turn(now).await;
        assert_eq!(files(&missing), ["x.a.yaml"]);
    }

    /// What a restarted agent sees: nothing of its own, but the records in the folder, which
    /// bind once checked against the pods; an expired one and a terminating pod bind nothing.
    #[test]
    fn records_restore_bindings_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let now = identity::unix_now();
        let ips = |s: &str| BTreeSet::from([ip(s)]);
        for (name, uid, addr, exp) in [
            ("a", "uid-a", "10.0.0.1", now + 600),
            ("b", "uid-b", "10.0.0.2", now - 1),
            ("c", "uid-c", "10.0.0.3", now + 600),
        ] {
            let r = IdentityBinding::new(&id(name, uid, exp), &ips(addr), "node-0");
            records::write_file(dir.path(), &r).unwrap();
        }
        let mut c_pod = pod("c", "uid-c", "node-0", "10.0.0.3");
        c_pod.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::chrono::Utc::now()),
        );
        let c = cluster(vec![
            pod("a", "uid-a", "node-0", "10.0.0.1"),
            pod("b", "uid-b", "node-0", "10.0.0.2"),
            c_pod,
        ]);
        let mut identity =
            Identity::local(Arc::new(Bindings::new()), Arc::new(LivePods::default()));
        identity.records = Some(Arc::new(Mutex::new(RecordsView::new(
            RecordsSource::Folder(RecordsFolder::new(dir.path())),
        ))));
        assert!(!identity.update_records(None, false, &[]), "no cluster yet");
        assert!(identity.update_records(Some(&c), true, &[]));
        let verified = identity.verified();
        assert_eq!(verified.keys().collect::<Vec<_>>(), [&ip("10.0.0.1")]);
        assert_eq!(verified[&ip("10.0.0.1")][LABEL_SERVICE_ACCOUNT], "frontend");
        assert!(
            !identity.update_records(Some(&c), false, &[]),
            "nothing new"
        );
        // The record goes: so does the binding.
        std::fs::remove_file(dir.path().join("x.a.yaml")).unwrap();
        let start = std::time::Instant::now();
        while !identity.update_records(Some(&c), false, &[]) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "deletion not seen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(identity.verified().is_empty());
    }

    /// In a cluster: the record goes to the API server by server-side apply with the agents'
    /// field manager, owned by the pod; a record of an older pod of that name (which the
    /// admission policy would not let it update) is deleted first, with a uid precondition;
    /// an expired record of this node is deleted; another node's is left alone.
    #[tokio::test]
    async fn in_a_cluster_the_writer_applies_and_deletes_through_the_api() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let now = identity::unix_now();
        let old = |name: &str, uid: &str, node: &str, exp: u64| {
            let mut r =
                IdentityBinding::new(&id(name, uid, exp), &BTreeSet::from([ip("10.0.0.1")]), node);
            r.metadata.uid = Some(format!("uid-record-{name}"));
            Arc::new(r)
        };
        let existing = vec![
            // a's name, an older pod: replaced.
            old("a", "uid-a-old", "node-0", now + 600),
            // b: this node's, expired.
            old("b", "uid-b", "node-0", now - 1),
            // c: another node's, expired: its writer's to delete.
            old("c", "uid-c", "node-1", now - 1),
        ];
        let (_rtx, records) = tokio::sync::watch::channel(Some(Arc::new(existing)));
        let bindings = Arc::new(Bindings::new());
        let pods = Arc::new(LivePods::default());
        pods.update(&cluster(vec![pod("a", "uid-a", "node-0", "10.0.0.1")]), &[]);
        bindings.bind(ip("10.0.0.1"), id("a", "uid-a", now + 600));
        let w = RecordWriter::new(
            RecordStore::Kube { client, records },
            bindings,
            pods,
            "node-0".into(),
            Arc::new(RecordMetrics::default()),
        );
        let turn = tokio::spawn(async move {
            w.turn(now).await;
            w
        });
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (req, reply) = tokio::time::timeout(Duration::from_secs(2), handle.next_request())
                .await
                .expect("a request")
                .unwrap();
            let (parts, body) = req.into_parts();
            let body = body.collect_bytes().await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            seen.push((
                parts.method.to_string(),
                parts.uri.to_string(),
                parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string()),
                body.clone(),
            ));
            let answer = if parts.method == http::Method::PATCH {
                body
            } else {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})
            };
            reply.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
        let w = turn.await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                .await
                .is_err(),
            "no other request (c is node-1's)"
        );
        let path = "/apis/enforcer.dev/v1alpha1/namespaces/x/identitybindings";
        // 1: the older pod's record, deleted by uid.
        assert_eq!(seen[0].0, "DELETE");
        assert_eq!(seen[0].1, format!("{path}/a?"));
        assert_eq!(seen[0].3["preconditions"], json!({"uid": "uid-record-a"}));
        // 2: the record, applied.
        assert_eq!(seen[1].0, "PATCH");
        assert_eq!(
            seen[1].1,
            format!("{path}/a?&force=true&fieldManager=enforcer-agent")
        );
        assert_eq!(seen[1].2.as_deref(), Some("application/apply-patch+yaml"));
        let body = &seen[1].3;
        assert_eq!(
            body["spec"],
            json!({
                "serviceAccount": "frontend", "pod": {"name": "a", "uid": "uid-a"},
                "addresses": ["10.0.0.1"], "expiresAt": records::rfc3339(now + 600), "node": "node-0",
            })
        );
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("enforcer.dev/v1alpha1"), Some("IdentityBinding"))
        );
        assert_eq!(
            body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Pod", "name": "a", "uid": "uid-a", "blockOwnerDeletion": false, "controller": false}])
        );
        // 3: b's expired record.
        assert_eq!(seen[2].0, "DELETE");
        assert_eq!(seen[2].1, format!("{path}/b?"));
        assert_eq!(seen[2].3["preconditions"], json!({"uid": "uid-record-b"}));
        assert_eq!(w.metrics.writes_failed(), 0);
    }
}
