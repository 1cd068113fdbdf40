//! Identity records: a binding verified by one node's agent, published for every agent.
//!
//! The agent that verified an attestation writes one `IdentityBinding` (`enforcer.dev/v1alpha1`,
//! namespaced, named after the pod) per attested pod: through the API server in a cluster
//! (server-side apply, owned by the Pod so the garbage collector removes it with the pod), or as
//! one YAML file per record in the `identity/` subfolder of the shared manifests folder in
//! standalone mode. Every agent (the writer too) reads the records and accepts one only when
//! what it sees of the pod now agrees with it ([`check`]): the pod exists with the record's uid,
//! is not terminating, terminated or host-network, runs on the record's node, still has the
//! record's addresses, and the record has not expired. Accepted records bind like local
//! attestations; the records are also what a restarted agent restores its bindings from.
//!
//! Readers checking `spec.node` against the pod's `spec.nodeName`, and the admission policy
//! (`manifests/vap-identitybinding.yaml`) confining each agent's writes to records naming its own
//! node, together mean a node's agent can vouch only for its own pods.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    chrono::{DateTime, SecondsFormat, Utc},
};
use serde::{Deserialize, Serialize};

use enforcer_policy::model::{Cluster, PodInfo, pod_ips, pod_node};

use super::VerifiedIdentity;

/// API group of the record.
pub const GROUP: &str = "enforcer.dev";
/// API version of the record.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the record.
pub const API_VERSION: &str = "enforcer.dev/v1alpha1";
/// Kind of the record.
pub const KIND: &str = "IdentityBinding";
/// Resource (plural) name of the record.
pub const PLURAL: &str = "identitybindings";
/// The server-side apply field manager of the agents' writes.
pub const FIELD_MANAGER: &str = "enforcer-agent";
/// Standalone mode: the subfolder of the manifests folder that holds the records.
pub const FOLDER: &str = "identity";

/// One attested pod's verified identity, as its node's agent publishes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityBinding {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Every field defaults, so that one bad record never fails a whole list: [`check`] rejects
    /// it, naming the field.
    #[serde(default)]
    pub spec: IdentityBindingSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityBindingSpec {
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub pod: PodIdentity,
    /// The pod's addresses the token was verified at.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The token's `exp`, RFC 3339 (UTC).
    #[serde(default)]
    pub expires_at: String,
    /// The node whose agent verified the attestation.
    #[serde(default)]
    pub node: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl kube::Resource for IdentityBinding {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Unix seconds as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(unix: u64) -> String {
    let secs = i64::try_from(unix).unwrap_or(i64::MAX);
    DateTime::<Utc>::from_timestamp(secs, 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// RFC 3339 as unix seconds (`None` when it is not RFC 3339, or before 1970).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = DateTime::parse_from_rfc3339(s.trim()).ok()?;
    u64::try_from(t.timestamp()).ok()
}

impl IdentityBinding {
    /// The record of `id`, verified at `addresses` by the agent of `node`: owned by the pod (its
    /// uid), so the garbage collector deletes it with the pod, without blocking the pod's deletion.
    pub fn new(id: &VerifiedIdentity, addresses: &BTreeSet<IpAddr>, node: &str) -> Self {
        IdentityBinding {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: ObjectMeta {
                name: Some(id.pod_name.clone()),
                namespace: Some(id.namespace.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: id.pod_name.clone(),
                    uid: id.pod_uid.clone(),
                    block_owner_deletion: Some(false),
                    controller: Some(false),
                }]),
                ..ObjectMeta::default()
            },
            spec: IdentityBindingSpec {
                service_account: id.service_account.clone(),
                pod: PodIdentity {
                    name: id.pod_name.clone(),
                    uid: id.pod_uid.clone(),
                },
                addresses: addresses.iter().map(ToString::to_string).collect(),
                expires_at: rfc3339(id.expires_at),
                node: node.to_string(),
            },
        }
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Unix seconds of `spec.expiresAt` (`None` when unparsable).
    pub fn expires_at(&self) -> Option<u64> {
        parse_rfc3339(&self.spec.expires_at)
    }

    /// Whether two records say the same thing (addresses compared as sets).
    pub fn same_spec(&self, other: &IdentityBinding) -> bool {
        let set = |r: &IdentityBinding| -> BTreeSet<String> {
            r.spec
                .addresses
                .iter()
                .map(|a| a.trim().to_string())
                .collect()
        };
        self.metadata.namespace == other.metadata.namespace
            && self.metadata.name == other.metadata.name
            && self.spec.service_account == other.spec.service_account
            && self.spec.pod == other.spec.pod
            && self.spec.node == other.spec.node
            && self.expires_at() == other.expires_at()
            && set(self) == set(other)
    }

    /// Keeps what readers use: name, namespace, uid, deletion time and owners; the spec.
    /// `resourceVersion` and managed fields go, so an update that changes nothing read
    /// publishes nothing.
    pub fn trim(&mut self) {
        let m = &mut self.metadata;
        *m = ObjectMeta {
            name: m.name.take(),
            namespace: m.namespace.take(),
            uid: m.uid.take(),
            deletion_timestamp: m.deletion_timestamp.take(),
            owner_references: m.owner_references.take(),
            ..ObjectMeta::default()
        };
    }
}

/// Why a record binds nothing. The `as_str()` codes are the `reason` label of
/// `enforcer_identity_records_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// A field is missing or not what it must be (the message names it).
    Malformed,
    /// No pod `namespace/name`.
    UnknownPod,
    /// The pod has another uid (re-created with the same name).
    PodUidMismatch,
    /// The pod is terminating (deletionTimestamp) or terminated (Succeeded / Failed).
    Terminating,
    /// The pod shares the node's network: its address is the node's.
    HostNetwork,
    /// The record's node is not the pod's `spec.nodeName`.
    WrongNode,
    /// The record's service account is not the pod's `spec.serviceAccountName`.
    ServiceAccountMismatch,
    /// None of the record's addresses is the pod's now.
    NoAddress,
    /// `expiresAt` has passed.
    Expired,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Malformed,
        Rejection::UnknownPod,
        Rejection::PodUidMismatch,
        Rejection::Terminating,
        Rejection::HostNetwork,
        Rejection::WrongNode,
        Rejection::ServiceAccountMismatch,
        Rejection::NoAddress,
        Rejection::Expired,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnknownPod => "unknown-pod",
            Rejection::PodUidMismatch => "pod-uid-mismatch",
            Rejection::Terminating => "terminating",
            Rejection::HostNetwork => "host-network",
            Rejection::WrongNode => "wrong-node",
            Rejection::ServiceAccountMismatch => "service-account-mismatch",
            Rejection::NoAddress => "no-address",
            Rejection::Expired => "expired",
        }
    }
}

/// A rejected record: why, and the detail for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: Rejection,
    pub detail: String,
}

fn reject(reason: Rejection, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
    }
}

/// An accepted record: the identity, and the addresses it binds (the record's addresses that
/// are the pod's now; those that are not are dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub identity: VerifiedIdentity,
    pub addresses: Vec<IpAddr>,
    pub dropped: Vec<String>,
}

/// The pods of a cluster by `(namespace, name)` (the first object of a name, as the compiler).
pub struct PodIndex<'a> {
    pods: HashMap<(&'a str, &'a str), &'a PodInfo>,
    node_ips: &'a [IpAddr],
}

impl<'a> PodIndex<'a> {
    /// `node_ips` are never bound, whatever a pod's status says.
    pub fn new(cluster: &'a Cluster, node_ips: &'a [IpAddr]) -> Self {
        let mut pods = HashMap::new();
        for p in &cluster.pods {
            pods.entry((&*p.namespace, &*p.name)).or_insert(&**p);
        }
        PodIndex { pods, node_ips }
    }
}

/// Checks `record` against the pods as seen now (see the module doc).
pub fn check(
    record: &IdentityBinding,
    pods: &PodIndex<'_>,
    now: u64,
) -> Result<Accepted, Rejected> {
    let spec = &record.spec;
    let namespace = record
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| reject(Rejection::Malformed, "metadata.namespace: missing"))?;
    let name = record.metadata.name.as_deref().unwrap_or_default();
    for (field, value) in [
        ("spec.pod.name", &spec.pod.name),
        ("spec.pod.uid", &spec.pod.uid),
        ("spec.serviceAccount", &spec.service_account),
        ("spec.node", &spec.node),
        ("spec.expiresAt", &spec.expires_at),
    ] {
        if value.trim().is_empty() {
            return Err(reject(Rejection::Malformed, format!("{field}: missing")));
        }
    }
    if spec.pod.name != name {
        return Err(reject(
            Rejection::Malformed,
            format!(
                "spec.pod.name: {:?} is not the record's name {name:?} (one record per pod, named after it)",
                spec.pod.name
            ),
        ));
    }
    let expires_at = record.expires_at().ok_or_else(|| {
        reject(
            Rejection::Malformed,
            format!(
                "spec.expiresAt: {:?} is not an RFC 3339 time",
                spec.expires_at
            ),
        )
    })?;
    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        match a.trim().parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip.to_canonical()),
            Err(_) => {
                return Err(reject(
                    Rejection::Malformed,
                    format!("spec.addresses[{i}]: {a:?} is not an IP address"),
                ));
            }
        }
    }
    if expires_at <= now {
        return Err(reject(
            Rejection::Expired,
            format!("expired at {}", spec.expires_at),
        ));
    }
    let pod = pods
        .pods
        .get(&(namespace, spec.pod.name.as_str()))
        .ok_or_else(|| reject(Rejection::UnknownPod, "no such pod"))?;
    let uid = pod.uid.as_deref().unwrap_or_default();
    if uid != spec.pod.uid {
        return Err(reject(
            Rejection::PodUidMismatch,
            format!("the pod's uid is {uid:?}, the record's {:?}", spec.pod.uid),
        ));
    }
    if pod.terminating || pod.terminated {
        return Err(reject(Rejection::Terminating, "the pod is terminating"));
    }
    if pod.host_network {
        return Err(reject(Rejection::HostNetwork, "the pod is host-network"));
    }
    let node = pod_node(pod).unwrap_or_default();
    if node != spec.node {
        return Err(reject(
            Rejection::WrongNode,
            format!(
                "the record names node {:?}, the pod runs on {node:?}",
                spec.node
            ),
        ));
    }
    // The API server always sets it; a hand-written standalone pod may leave it out.
    if let Some(sa) = pod.service_account.as_deref()
        && !sa.is_empty()
        && sa != spec.service_account
    {
        return Err(reject(
            Rejection::ServiceAccountMismatch,
            format!(
                "the record names service account {:?}, the pod runs as {sa:?}",
                spec.service_account
            ),
        ));
    }
    let current: Vec<IpAddr> = pod_ips(pod)
        .into_iter()
        .map(|ip| ip.to_canonical())
        .filter(|ip| !pods.node_ips.contains(ip))
        .collect();
    let (kept, dropped): (Vec<IpAddr>, Vec<IpAddr>) =
        addresses.into_iter().partition(|ip| current.contains(ip));
    if kept.is_empty() {
        return Err(reject(
            Rejection::NoAddress,
            format!(
                "none of its addresses {:?} is the pod's now ({current:?})",
                spec.addresses
            ),
        ));
    }
    Ok(Accepted {
        identity: VerifiedIdentity {
            namespace: namespace.to_string(),
            service_account: spec.service_account.clone(),
            pod_name: spec.pod.name.clone(),
            pod_uid: spec.pod.uid.clone(),
            expires_at,
        },
        addresses: kept,
        dropped: dropped.iter().map(ToString::to_string).collect(),
    })
}

/// Counters and gauges of the records, rendered on `/metrics`.
#[derive(Debug)]
pub struct RecordMetrics {
    accepted: AtomicU64,
    rejected_now: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    writes_ok: AtomicU64,
    writes_failed: AtomicU64,
    deletes_ok: AtomicU64,
    deletes_failed: AtomicU64,
}

impl Default for RecordMetrics {
    fn default() -> Self {
        RecordMetrics {
            accepted: AtomicU64::new(0),
            rejected_now: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            writes_ok: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            deletes_ok: AtomicU64::new(0),
            deletes_failed: AtomicU64::new(0),
        }
    }
}

impl RecordMetrics {
    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    pub fn count_rejected(&self, reason: Rejection) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn write(&self, ok: bool) {
        let c = if ok {
            &self.writes_ok
        } else {
            &self.writes_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delete(&self, ok: bool) {
        let c = if ok {
            &self.deletes_ok
        } else {
            &self.deletes_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn writes_failed(&self) -> u64 {
        self.writes_failed.load(Ordering::Relaxed)
    }

    /// Appends the metrics in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_records Identity records seen now, by state (accepted ones bind their addresses)."
        );
        let _ = writeln!(out, "# TYPE enforcer_identity_records gauge");
        let _ = writeln!(
            out,
            "enforcer_identity_records{{state=\"accepted\"}} {}",
            load(&self.accepted)
        );
        let _ = writeln!(
            out,
            "enforcer_identity_records{{state=\"rejected\"}} {}",
            load(&self.rejected_now)
        );
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_records_rejected_total Identity records rejected, by reason (once per record and reason)."
        );
        let _ = writeln!(
            out,
            "# TYPE enforcer_identity_records_rejected_total counter"
        );
        for r in Rejection::ALL {
            let _ = writeln!(
                out,
                "enforcer_identity_records_rejected_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.rejected(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP enforcer_identity_record_writes_total Writes of this agent's identity records, by operation and result (failed ones are retried)."
        );
        let _ = writeln!(out, "# TYPE enforcer_identity_record_writes_total counter");
        for (op, ok, c) in [
            ("put", "ok", &self.writes_ok),
            ("put", "error", &self.writes_failed),
            ("delete", "ok", &self.deletes_ok),
            ("delete", "error", &self.deletes_failed),
        ] {
            let _ = writeln!(
                out,
                "enforcer_identity_record_writes_total{{op=\"{op}\",result=\"{ok}\"}} {}",
                load(c)
            );
        }
    }
}

/// The records as last evaluated: the addresses they bind, and what was rejected (each
/// rejection is logged and counted once, when it first appears).
#[derive(Default)]
pub struct Evaluated {
    pub bound: BTreeMap<IpAddr, VerifiedIdentity>,
    rejected: BTreeMap<String, (Rejection, String)>,
    /// The earliest `expiresAt` of an accepted record: evaluate again then.
    pub next_expiry: Option<u64>,
}

impl Evaluated {
    /// Evaluates `records` against `cluster` at `now`; returns whether the bound addresses
    /// changed.
    pub fn update(
        &mut self,
        records: &[Arc<IdentityBinding>],
        cluster: &Cluster,
        node_ips: &[IpAddr],
        now: u64,
        metrics: &RecordMetrics,
    ) -> bool {
        let pods = PodIndex::new(cluster, node_ips);
        let mut bound: BTreeMap<IpAddr, VerifiedIdentity> = BTreeMap::new();
        let mut rejected = BTreeMap::new();
        let mut next_expiry: Option<u64> = None;
        let mut accepted = 0u64;
        for r in records {
            let key = r.key();
            match check(r, &pods, now) {
                Ok(a) => {
                    accepted += 1;
                    if !a.dropped.is_empty() {
                        log::info!(
                            "identity record {key}: addresses {:?} are no longer the pod's; binding only {:?}",
                            a.dropped,
                            a.addresses
                        );
                    }
                    next_expiry = Some(
                        next_expiry.map_or(a.identity.expires_at, |e| e.min(a.identity.expires_at)),
                    );
                    for ip in a.addresses {
                        // Two records for one address cannot both be the pod's: the checks
                        // above name the pod that has it. Keep the first (records are sorted).
                        bound.entry(ip).or_insert_with(|| a.identity.clone());
                    }
                }
                Err(e) => {
                    let again = self
                        .rejected
                        .get(&key)
                        .is_some_and(|(reason, detail)| *reason == e.reason && *detail == e.detail);
                    if !again {
                        metrics.count_rejected(e.reason);
                        if e.reason == Rejection::Expired {
                            log::info!(
                                "identity record {key}: not bound ({}): {}",
                                e.reason.as_str(),
                                e.detail
                            );
                        } else {
                            log::warn!(
                                "identity record {key}: rejected ({}): {}",
                                e.reason.as_str(),
                                e.detail
                            );
                        }
                    }
                    rejected.insert(key, (e.reason, e.detail));
                }
            }
        }
        metrics.accepted.store(accepted, Ordering::Relaxed);
        metrics
            .rejected_now
            .store(rejected.len() as u64, Ordering::Relaxed);
        self.rejected = rejected;
        self.next_expiry = next_expiry;
        let changed = bound != self.bound;
        self.bound = bound;
        changed
    }
}

/// The file of a record in the records folder: `<namespace>.<name>.yaml` (a namespace has no
/// dot, so the name is everything after the first).
pub fn file_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}.yaml")
}

/// Writes `record` into `dir` atomically (a temporary file renamed over the old one), so a
/// reader never sees half a record.
pub fn write_file(dir: &Path, record: &IdentityBinding) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let name = file_name(
        record.metadata.namespace.as_deref().unwrap_or_default(),
        record.metadata.name.as_deref().unwrap_or_default(),
    );
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let text = serde_yaml::to_string(record).context("serialising the record")?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })?;
    Ok(path)
}

/// Parses one record file (YAML).
pub fn parse_file(text: &str) -> Result<IdentityBinding, String> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
    let record: IdentityBinding = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })?;
    if record.kind != KIND || record.api_version != API_VERSION {
        return Err(format!(
            "not an {API_VERSION} {KIND} (apiVersion {:?}, kind {:?})",
            record.api_version, record.kind
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_policy::model::shared;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    const NOW: u64 = 1_900_000_000;

    fn pod(name: &str, uid: &str, node: &str, ips: &[&str]) -> Pod {
        let ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": name, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": "frontend", "containers": []},
            "status": {"phase": "Running", "podIPs": ips},
        }))
        .unwrap()
    }

    fn identity(name: &str, uid: &str, expires_at: u64) -> VerifiedIdentity {
        VerifiedIdentity {
            namespace: "x".into(),
            service_account: "frontend".into(),
            pod_name: name.into(),
            pod_uid: uid.into(),
            expires_at,
        }
    }

    fn record(name: &str, uid: &str, node: &str, ips: &[&str], expires_at: u64) -> IdentityBinding {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        IdentityBinding::new(&identity(name, uid, expires_at), &ips, node)
    }

    fn cluster(pods: Vec<Pod>) -> Cluster {
        Cluster {
            pods: shared(pods),
            ..Cluster::default()
        }
    }

    fn checked(r: &IdentityBinding, c: &Cluster) -> Result<Vec<IpAddr>, Rejection> {
        check(r, &PodIndex::new(c, &[]), NOW)
            .map(|a| a.addresses)
            .map_err(|e| e.reason)
    }

    #[test]
    fn a_record_binds_only_what_the_pod_it_names_has_now() {
        let a = pod("a", "uid-a", "node-0", &["10.0.0.1", "fd00::1"]);
        let c = cluster(vec![a.clone()]);
        let good = record("a", "uid-a", "node-0", &["10.0.0.1", "fd00::1"], NOW + 60);
        assert_eq!(
            checked(&good, &c),
            Ok(vec![
                "10.0.0.1".parse().unwrap(),
                "fd00::1".parse().unwrap()
            ])
        );
        let accepted = check(&good, &PodIndex::new(&c, &[]), NOW).unwrap();
        assert_eq!(accepted.identity, identity("a", "uid-a", NOW + 60));

        // An address the pod no longer has is dropped; none left rejects the record.
        let partly = record("a", "uid-a", "node-0", &["10.0.0.1", "10.0.0.9"], NOW + 60);
        let a1 = check(&partly, &PodIndex::new(&c, &[]), NOW).unwrap();
        assert_eq!(a1.addresses, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(a1.dropped, ["10.0.0.9"]);
        let moved = record("a", "uid-a", "node-0", &["10.0.0.9"], NOW + 60);
        assert_eq!(checked(&moved, &c), Err(Rejection::NoAddress));
        // A node address is never bound, whatever the pod's status says.
        let only_v4 = record("a", "uid-a", "node-0", &["10.0.0.1"], NOW + 60);
        let node_ips = ["10.0.0.1".parse().unwrap()];
        assert_eq!(
            check(&only_v4, &PodIndex::new(&c, &node_ips), NOW).map_err(|e| e.reason),
            Err(Rejection::NoAddress)
        );

        let rejected = |r: &IdentityBinding, c: &Cluster| checked(r, c).unwrap_err();
        assert_eq!(
            rejected(&record("a", "uid-a", "node-0", &["10.0.0.1"], NOW), &c),
            Rejection::Expired
        );
        assert_eq!(
            rejected(&record("a", "uid-a", "node-1", &["10.0.0.1"], NOW + 60), &c),
            Rejection::WrongNode
        );
        assert_eq!(
            rejected(&record("z", "uid-z", "node-0", &["10.0.0.1"], NOW + 60), &c),
            Rejection::UnknownPod
        );
        let mut other_sa = good.clone();
        other_sa.spec.service_account = "admin".into();
        assert_eq!(rejected(&other_sa, &c), Rejection::ServiceAccountMismatch);

        let mut terminating = a.clone();
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Utc::now()),
        );
        assert_eq!(
            rejected(&good, &cluster(vec![terminating])),
            Rejection::Terminating
        );
        let mut done = a.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(
            rejected(&good, &cluster(vec![done])),
            Rejection::Terminating
        );
        let mut host = a.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            rejected(&good, &cluster(vec![host])),
            Rejection::HostNetwork
        );
    }

    /// A pod re-created under the same name, or a new pod given an old pod's address, never
    /// inherits the old pod's record.
    #[test]
    fn a_new_pod_with_an_old_pods_name_or_address_inherits_nothing() {
        let old = record("a", "uid-a", "node-0", &["10.0.0.1"], NOW + 60);
        let same_name = cluster(vec![pod("a", "uid-a2", "node-0", &["10.0.0.1"])]);
        assert_eq!(checked(&old, &same_name), Err(Rejection::PodUidMismatch));
        let same_address = cluster(vec![pod("b", "uid-b", "node-0", &["10.0.0.1"])]);
        assert_eq!(checked(&old, &same_address), Err(Rejection::UnknownPod));
        let metrics = RecordMetrics::default();
        let mut e = Evaluated::default();
        let records = vec![Arc::new(old)];
        assert!(!e.update(&records, &same_address, &[], NOW, &metrics));
        assert!(e.bound.is_empty());
        assert_eq!(metrics.rejected(Rejection::UnknownPod), 1);
    }

    #[test]
    fn malformed_records_are_named_by_field() {
        let c = cluster(vec![pod("a", "uid-a", "node-0", &["10.0.0.1"])]);
        let good = record("a", "uid-a", "node-0", &["10.0.0.1"], NOW + 60);
        let detail = |f: &dyn Fn(&mut IdentityBinding)| {
            let mut r = good.clone();
            f(&mut r);
            let e = check(&r, &PodIndex::new(&c, &[]), NOW).unwrap_err();
            assert_eq!(e.reason, Rejection::Malformed);
            e.detail
        };
        assert!(detail(&|r| r.spec.expires_at = "tomorrow".into()).starts_with("spec.expiresAt"));
        assert!(
            detail(&|r| r.spec.addresses = vec!["10.0.0.300".into()])
                .starts_with("spec.addresses[0]")
        );
        assert!(detail(&|r| r.spec.node.clear()).starts_with("spec.node"));
        assert!(detail(&|r| r.spec.pod.uid.clear()).starts_with("spec.pod.uid"));
        assert!(detail(&|r| r.metadata.name = Some("b".into())).starts_with("spec.pod.name"));
        assert!(detail(&|r| r.metadata.namespace = None).starts_with("metadata.namespace"));
        // One bad field never fails a whole list: everything defaults, check rejects.
        let r: IdentityBinding =
            serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "x"}})).unwrap();
        assert_eq!(
            check(&r, &PodIndex::new(&c, &[]), NOW).unwrap_err().reason,
            Rejection::Malformed
        );
    }

    /// Each rejection is logged and counted once, not at every evaluation; accepted records
    /// bind their addresses, and the gauge says how many are accepted and rejected now.
    #[test]
    fn evaluation_binds_accepted_records_and_counts_each_rejection_once() {
        let c = cluster(vec![
            pod("a", "uid-a", "node-0", &["10.0.0.1"]),
            pod("b", "uid-b", "node-1", &["10.0.1.1"]),
        ]);
        let records: Vec<_> = [
            record("a", "uid-a", "node-0", &["10.0.0.1"], NOW + 60),
            record("b", "uid-b", "node-0", &["10.0.1.1"], NOW + 30),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let metrics = RecordMetrics::default();
        let mut e = Evaluated::default();
        assert!(e.update(&records, &c, &[], NOW, &metrics));
        assert_eq!(
            e.bound.keys().collect::<Vec<_>>(),
            [&"10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(e.next_expiry, Some(NOW + 60));
        assert!(
            !e.update(&records, &c, &[], NOW + 1, &metrics),
            "nothing changed"
        );
        assert_eq!(metrics.rejected(Rejection::WrongNode), 1, "counted once");
        let mut text = String::new();
        metrics.render_prometheus(&mut text);
        assert!(
            text.contains("enforcer_identity_records{state=\"accepted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_identity_records{state=\"rejected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_identity_records_rejected_total{reason=\"wrong-node\"} 1"),
            "{text}"
        );
        // Expiry ends the binding on time.
        assert!(e.update(&records, &c, &[], NOW + 60, &metrics));
        assert!(e.bound.is_empty());
        // Both: b's reason changed from wrong-node to expired, a new rejection.
        assert_eq!(metrics.rejected(Rejection::Expired), 2);
    }

    #[test]
    fn record_files_round_trip_and_are_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let r = record("a.b", "uid-a", "node-0", &["10.0.0.1"], NOW + 60);
        let path = write_file(dir.path(), &r).unwrap();
        assert_eq!(path.file_name().unwrap(), "x.a.b.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("expiresAt: 2030-03-17T17:47:40Z"), "{text}");
        let back = parse_file(&text).unwrap();
        assert_eq!(back, r);
        assert!(back.same_spec(&r));
        // Only the record is left: the temporary file was renamed over it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["x.a.b.yaml"]);
        assert!(
            parse_file("kind: Pod\napiVersion: v1\n")
                .unwrap_err()
                .contains("not an")
        );
        assert!(
            parse_file("spec: [")
                .unwrap_err()
                .starts_with("invalid YAML")
        );
        assert_eq!(parse_rfc3339("2030-03-17T17:47:40Z"), Some(NOW + 60));
        assert_eq!(parse_rfc3339("2030-03-17T18:47:40+01:00"), Some(NOW + 60));
        assert_eq!(rfc3339(NOW + 60), "2030-03-17T17:47:40Z");
    }
}
