//! The manifests folder (standalone mode and the offline tools): every `*.yaml`, `*.yml` and
//! `*.json` file in a directory, multi-document YAML, `kind: List` (and `*List`) items, with
//! Namespace, Pod, Service, Node (v1) and NetworkPolicy objects, the cluster-wide policies
//! (ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1:
//! [`enforcer_policy::tiers`]), and the pod templates of workloads ([`Workload`], for the
//! offline tools only: the agent enforces real pods). A bad file or document is reported with
//! the file, the document index, the object and the field, and everything else still loads.
//! A cluster-wide policy with a bad field is not left out: it loads as its fail-closed
//! stand-in ([`enforcer_policy::tiers::ClusterPolicy::refused`] says why).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, PodTemplateSpec, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::Deserialize as _;
use serde_json::Value;

use enforcer_policy::{
    model::{Cluster, NAMESPACE_NAME_LABEL, NodeInfo, PodInfo},
    tiers::{self, TierError},
};

/// The kinds read without a namespace: the key of their objects has `""` for it.
const CLUSTER_SCOPED: [&str; 5] = [
    "Namespace",
    "Node",
    tiers::api::KIND_CNP,
    tiers::api::KIND_ANP,
    tiers::api::KIND_BANP,
];

/// A problem with one file, document or object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub file: PathBuf,
    /// Index of the YAML document in the file (0-based); `None` for the whole file.
    pub document: Option<usize>,
    /// `Kind namespace/name` when known, with `items[i]` inside a List.
    pub object: Option<String>,
    /// What is wrong, starting with the field path when there is one.
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " {o}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for FileError {}

/// What a folder holds.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    pub errors: Vec<FileError>,
    /// Objects of other kinds, left out (`file: Kind ns/name`).
    pub ignored: Vec<String>,
    /// The workloads' pod templates, in load order (not part of [`Loaded::cluster`]).
    pub workloads: Vec<Workload>,
    /// (kind, namespace, name) of the objects loaded so far.
    seen: BTreeSet<(String, String, String)>,
    /// Where each object loaded came from, by (kind, namespace or `""`, name): for the tools
    /// that point at a line (`lint`). Kept by [`load_text`], not by [`merge_all`].
    pub origins: BTreeMap<(String, String, String), Origin>,
    /// `(namespace, name)` of the ServiceAccount objects: which identities a workload can
    /// prove (`lint`); the agent reads no ServiceAccount.
    pub service_accounts: BTreeSet<(String, String)>,
    /// Peers of the cluster-wide policies loaded that fail closed (`domainNames`, a field this
    /// version does not know), by object and field: reported, the policy is enforced.
    pub cluster_policy_warnings: Vec<TierError>,
}

/// Where an object was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// Index of the YAML document in the file (0-based); `None` for JSON.
    pub document: Option<usize>,
    /// 1-based line where the object's document starts; `None` for JSON.
    pub line: Option<usize>,
    /// `items[i]` inside a List.
    pub item: Option<String>,
}

impl Loaded {
    /// Drops the bookkeeping of names seen and where each object came from, once nothing more
    /// is loaded into this `Loaded` (a file kept for later merges holds only its objects: at
    /// 100k pods the names and origins would cost more than the pods themselves).
    pub fn forget_seen(&mut self) {
        self.seen = BTreeSet::new();
        self.origins = BTreeMap::new();
    }
}

/// The kinds whose pod template the offline tools judge as one pod.
pub const WORKLOAD_KINDS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
];

/// A workload as written: its kind, name and pod template (for a CronJob, its job's).
#[derive(Clone, Debug)]
pub struct Workload {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `spec.selector`: the pods it manages, when it says.
    pub selector: Option<LabelSelector>,
    pub template: PodTemplateSpec,
    /// Managed by another object (a Deployment's ReplicaSet, a CronJob's Job): that object
    /// stands for it.
    pub owned: bool,
}

impl Workload {
    /// Reads a workload object (one of [`WORKLOAD_KINDS`]); `Err` names the field.
    pub fn from_value(kind: &str, v: &Value) -> Result<Self, String> {
        let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
            typed(v.get("metadata").cloned().unwrap_or(Value::Null))
                .map_err(|e| format!("metadata.{e}"))?;
        let (path, template) = if kind == "CronJob" {
            (
                "spec.jobTemplate.spec.template",
                v.pointer("/spec/jobTemplate/spec/template"),
            )
        } else {
            ("spec.template", v.pointer("/spec/template"))
        };
        let template: PodTemplateSpec = match template {
            Some(t) => typed(t.clone()).map_err(|e| format!("{path}.{e}"))?,
            None => return Err(format!("{path}: missing")),
        };
        let selector = match v.pointer("/spec/selector") {
            Some(s) if !s.is_null() => {
                Some(typed(s.clone()).map_err(|e| format!("spec.selector.{e}"))?)
            }
            _ => None,
        };
        Ok(Self {
            kind: kind.to_string(),
            namespace: enforcer_policy::validate::namespace_of(&meta),
            name: meta.name.clone().unwrap_or_default(),
            selector,
            template,
            owned: meta
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true)),
        })
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    !hidden && matches!(ext, "yaml" | "yml" | "json") && path.is_file()
}

/// Loads every manifest file of `dir` (not recursive), in file name order. `Err` only when the
/// folder itself cannot be read; problems with files are in [`Loaded::errors`].
pub fn load_dir(dir: &Path) -> anyhow::Result<Loaded> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifests folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p))
        .collect();
    files.sort();
    let mut loaded = Loaded::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut loaded),
            Err(e) => loaded.errors.push(FileError {
                file,
                document: None,
                object: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    finish(&mut loaded);
    Ok(loaded)
}

/// Loads the objects of one file's text into `loaded` (JSON when the name ends in `.json`,
/// YAML otherwise). Call [`finish`] after the last file.
pub fn load_text(file: &Path, text: &str, loaded: &mut Loaded) {
    let err = |document, object, message| FileError {
        file: file.to_path_buf(),
        document,
        object,
        message,
    };
    if file.extension().and_then(|e| e.to_str()) == Some("json") {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => load_value(file, (None, None), v, None, loaded),
            Err(e) => loaded
                .errors
                .push(err(None, None, format!("invalid JSON: {e}"))),
        }
        return;
    }
    let lines = document_lines(text);
    // A tag (`!name`) is read differently from a YAML tree than through JSON: a file that may
    // hold one takes the path through JSON for every object.
    let untagged = !text.contains('!');
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                loaded
                    .errors
                    .push(err(Some(i), None, format!("invalid YAML: {e}")));
                // A syntax error ends the stream: the parser cannot resynchronise.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let at = (Some(i), lines.get(i).copied());
        let value = match untagged {
            true => match load_bulk(file, at, value, loaded) {
                Some(v) => v,
                None => continue,
            },
            false => value,
        };
        match serde_json::to_value(&value) {
            Ok(v) => load_value(file, at, v, None, loaded),
            Err(e) => loaded
                .errors
                .push(err(Some(i), None, format!("unsupported YAML: {e}"))),
        }
    }
}

/// The 1-based line where each YAML document of `text` starts, in the order the parser yields
/// them: a `---` line starts a document, and text before the first one (other than comments and
/// blank lines) is a document too.
pub fn document_lines(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut content_before_marker = None;
    for (n, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            out.push(n + 2);
        } else if out.is_empty() && content_before_marker.is_none() {
            let t = line.trim_start();
            if !t.is_empty() && !t.starts_with('#') {
                content_before_marker = Some(n + 1);
            }
        }
    }
    if let Some(first) = content_before_marker {
        out.insert(0, first);
    }
    out
}

fn describe(v: &Value, kind: &str) -> String {
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<no name>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) if kind != "Namespace" => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

/// Where a document is, for its errors and [`Loaded::origins`].
struct Place<'a> {
    file: &'a Path,
    document: Option<usize>,
    line: Option<usize>,
    item: Option<String>,
    /// `Kind namespace/name` as written, with `items[i]` inside a List.
    object: String,
}

impl Place<'_> {
    fn fail(&self, loaded: &mut Loaded, message: String) {
        loaded.errors.push(FileError {
            file: self.file.to_path_buf(),
            document: self.document,
            object: Some(self.object.clone()),
            message,
        });
    }

    /// Records the object as loaded from here; `false`, and an error, when an earlier one had
    /// its kind and name.
    fn first(&self, loaded: &mut Loaded, kind: &str, meta: &ObjectMeta) -> bool {
        let ns = if CLUSTER_SCOPED.contains(&kind) {
            String::new()
        } else {
            enforcer_policy::validate::namespace_of(meta)
        };
        let key = (kind.to_string(), ns, meta.name.clone().unwrap_or_default());
        if loaded.seen.insert(key.clone()) {
            loaded.origins.insert(
                key,
                Origin {
                    file: self.file.to_path_buf(),
                    document: self.document,
                    line: self.line,
                    item: self.item.clone(),
                },
            );
            return true;
        }
        self.fail(
            loaded,
            "defined more than once; the first definition is used".into(),
        );
        false
    }
}

fn add_pod(loaded: &mut Loaded, place: &Place<'_>, mut o: Pod) {
    o.metadata.namespace.get_or_insert_with(|| "default".into());
    if place.first(loaded, "Pod", &o.metadata) {
        // Only the compact form is kept (a folder of 100k pods would otherwise hold 100k API
        // objects).
        loaded.cluster.pods.push(Arc::new(PodInfo::from(o)));
    }
}

fn add_policy(loaded: &mut Loaded, place: &Place<'_>, mut o: NetworkPolicy) {
    o.metadata.namespace.get_or_insert_with(|| "default".into());
    if place.first(loaded, "NetworkPolicy", &o.metadata) {
        loaded.cluster.policies.push(Arc::new(o));
    }
}

/// Pods and NetworkPolicies, which a folder holds by the thousand, deserialised straight from
/// the YAML tree (the round trip through JSON is most of a large folder's load). `Some` gives
/// the document back for [`load_value`]: another kind, or one that does not deserialise, whose
/// error the path through JSON words as for any other document.
fn load_bulk(
    file: &Path,
    (document, line): (Option<usize>, Option<usize>),
    v: serde_yaml::Value,
    loaded: &mut Loaded,
) -> Option<serde_yaml::Value> {
    let Some(kind @ ("Pod" | "NetworkPolicy")) = v.get("kind").and_then(serde_yaml::Value::as_str)
    else {
        return Some(v);
    };
    let meta = v.get("metadata");
    let field = |f: &str| {
        meta.and_then(|m| m.get(f))
            .and_then(serde_yaml::Value::as_str)
    };
    let name = field("name").unwrap_or("<no name>");
    let place = Place {
        file,
        document,
        line,
        item: None,
        object: match field("namespace") {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        },
    };
    if kind == "Pod" {
        match Pod::deserialize(&v) {
            Ok(o) => add_pod(loaded, &place, o),
            Err(_) => return Some(v),
        }
    } else {
        match NetworkPolicy::deserialize(&v) {
            Ok(o) => add_policy(loaded, &place, o),
            Err(_) => return Some(v),
        }
    }
    None
}

fn load_value(
    file: &Path,
    (document, line): (Option<usize>, Option<usize>),
    v: Value,
    item: Option<String>,
    loaded: &mut Loaded,
) {
    let Some(kind) = v.get("kind").and_then(Value::as_str).map(str::to_string) else {
        loaded.errors.push(FileError {
            file: file.to_path_buf(),
            document,
            object: item,
            message: "kind: missing (not a Kubernetes object)".into(),
        });
        return;
    };
    let object = match &item {
        Some(i) => format!("{i} {}", describe(&v, &kind)),
        None => describe(&v, &kind),
    };
    let place = Place {
        file,
        document,
        line,
        item: item.clone(),
        object,
    };
    let fail = |loaded: &mut Loaded, message: String| place.fail(loaded, message);
    let first = |loaded: &mut Loaded, meta: &ObjectMeta| place.first(loaded, &kind, meta);
    match kind.as_str() {
        "Namespace" => match typed::<Namespace>(v) {
            Ok(mut o) => {
                label_namespace(&mut o);
                if first(loaded, &o.metadata) {
                    loaded.cluster.namespaces.push(Arc::new(o));
                }
            }
            Err(m) => fail(loaded, m),
        },
        "Pod" => match typed::<Pod>(v) {
            Ok(o) => add_pod(loaded, &place, o),
            Err(m) => fail(loaded, m),
        },
        // A Service the compiler could only read in part (an address that is not one, an
        // unknown protocol) is refused with its file, so the file's last good version stays.
        "Service" if v.get("apiVersion").and_then(Value::as_str) == Some("v1") => {
            match typed::<Service>(v) {
                Ok(mut o) => {
                    o.metadata.namespace.get_or_insert_with(|| "default".into());
                    match enforcer_policy::model::validate_service(&o) {
                        Ok(()) => {
                            if first(loaded, &o.metadata) {
                                loaded.cluster.services.push(Arc::new(o));
                            }
                        }
                        Err(errors) => {
                            for e in errors {
                                fail(loaded, format!("{}: {}", e.field, e.message));
                            }
                        }
                    }
                }
                Err(m) => fail(loaded, m),
            }
        }
        "Node" if v.get("apiVersion").and_then(Value::as_str) == Some("v1") => {
            match typed::<Node>(v) {
                Ok(o) => {
                    if first(loaded, &o.metadata) {
                        loaded.cluster.nodes.push(Arc::new(NodeInfo::from(&o)));
                    }
                }
                Err(m) => fail(loaded, m),
            }
        }
        k @ (tiers::api::KIND_CNP | tiers::api::KIND_ANP | tiers::api::KIND_BANP)
            if v.get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|a| a.starts_with(tiers::api::GROUP)) =>
        {
            let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
            if !tiers::is_tier_kind(api_version, k) {
                // Another version of a guardrail would otherwise be silently left out.
                let read = if k == tiers::api::KIND_CNP {
                    tiers::api::V1ALPHA2
                } else {
                    tiers::api::V1ALPHA1
                };
                fail(
                    loaded,
                    format!("apiVersion: {api_version} is not read; {k} is read as {read}"),
                );
                return;
            }
            match tiers::parse(&v) {
                Ok(parsed) => {
                    let meta = ObjectMeta {
                        name: Some(parsed.policy.name.clone()),
                        ..Default::default()
                    };
                    if first(loaded, &meta) {
                        loaded.cluster_policy_warnings.extend(parsed.warnings);
                        loaded
                            .cluster
                            .cluster_policies
                            .push(Arc::new(parsed.policy));
                    }
                }
                Err(m) => fail(loaded, m),
            }
        }
        "NetworkPolicy" => match typed::<NetworkPolicy>(v) {
            Ok(o) => add_policy(loaded, &place, o),
            Err(m) => fail(loaded, m),
        },
        k if WORKLOAD_KINDS.contains(&k) => match Workload::from_value(k, &v) {
            Ok(w) => {
                let meta = ObjectMeta {
                    name: Some(w.name.clone()),
                    namespace: Some(w.namespace.clone()),
                    ..Default::default()
                };
                if first(loaded, &meta) {
                    loaded.workloads.push(w);
                }
            }
            Err(m) => fail(loaded, m),
        },
        "ServiceAccount" => match typed::<k8s_openapi::api::core::v1::ServiceAccount>(v) {
            Ok(o) => {
                let ns = enforcer_policy::validate::namespace_of(&o.metadata);
                if first(loaded, &o.metadata) {
                    let name = o.metadata.name.unwrap_or_default();
                    loaded.service_accounts.insert((ns, name));
                }
            }
            Err(m) => fail(loaded, m),
        },
        k if k == "List" || k.ends_with("List") => match v.get("items") {
            Some(Value::Array(items)) => {
                for (i, it) in items.iter().enumerate() {
                    let at = match &item {
                        Some(outer) => format!("{outer}.items[{i}]"),
                        None => format!("items[{i}]"),
                    };
                    load_value(file, (document, line), it.clone(), Some(at), loaded);
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => fail(loaded, "items: must be a list".into()),
        },
        _ => loaded.ignored.push(format!(
            "{}: {} (kind not used)",
            file.display(),
            place.object
        )),
    }
}

/// The key [`merge_all`] tells objects apart by, for each object of `part` in the order it merges
/// them: (where in the part, kind, namespace or `""` for cluster-scoped kinds, name).
fn merge_keys(part: &Loaded) -> impl Iterator<Item = (Slot, &'static str, &str, &str)> {
    let c = &part.cluster;
    let namespaces = c.namespaces.iter().enumerate().map(move |(i, o)| {
        let kind = "Namespace";
        let name = o.metadata.name.as_deref().unwrap_or_default();
        (
            (0, i),
            kind,
            ns_key(kind, o.metadata.namespace.as_deref()),
            name,
        )
    });
    let pods = c
        .pods
        .iter()
        .enumerate()
        .map(move |(i, o)| ((1, i), "Pod", ns_key("Pod", Some(&o.namespace)), &*o.name));
    let policies = c.policies.iter().enumerate().map(move |(i, o)| {
        let kind = "NetworkPolicy";
        let name = o.metadata.name.as_deref().unwrap_or_default();
        (
            (2, i),
            kind,
            ns_key(kind, o.metadata.namespace.as_deref()),
            name,
        )
    });
    let services = c.services.iter().enumerate().map(move |(i, o)| {
        let kind = "Service";
        let name = o.metadata.name.as_deref().unwrap_or_default();
        (
            (3, i),
            kind,
            ns_key(kind, o.metadata.namespace.as_deref()),
            name,
        )
    });
    let cluster_policies = c
        .cluster_policies
        .iter()
        .enumerate()
        .map(move |(i, o)| ((4, i), o.kind.as_str(), "", o.name.as_str()));
    let nodes = c
        .nodes
        .iter()
        .enumerate()
        .map(move |(i, o)| ((5, i), "Node", "", o.name.as_str()));
    namespaces
        .chain(pods)
        .chain(policies)
        .chain(services)
        .chain(cluster_policies)
        .chain(nodes)
}

/// An object's place in a [`Loaded`]: (which list, index), in the order [`merge_all`] takes
/// the lists.
type Slot = (u8, usize);

fn ns_key<'a>(kind: &str, namespace: Option<&'a str>) -> &'a str {
    if CLUSTER_SCOPED.contains(&kind) {
        ""
    } else {
        namespace.filter(|n| !n.is_empty()).unwrap_or("default")
    }
}

/// The error for an object a file defines after an earlier file did.
fn duplicate(file: &Path, kind: &str, ns: &str, name: &str) -> FileError {
    FileError {
        file: file.to_path_buf(),
        document: None,
        object: Some(if ns.is_empty() {
            format!("{kind} {name}")
        } else {
            format!("{kind} {ns}/{name}")
        }),
        message: "defined more than once; the first definition is used".into(),
    }
}

/// Appends the objects of `part` not at `left_out` to `into`, as [`merge_all`] orders them.
fn extend_kept(into: &mut Cluster, part: &Cluster, left_out: &BTreeSet<Slot>) {
    fn kept<'a, T>(
        list: &'a [Arc<T>],
        slot: u8,
        left_out: &'a BTreeSet<Slot>,
    ) -> impl Iterator<Item = Arc<T>> + 'a {
        list.iter()
            .enumerate()
            .filter(move |(i, _)| left_out.is_empty() || !left_out.contains(&(slot, *i)))
            .map(|(_, o)| Arc::clone(o))
    }
    into.namespaces.extend(kept(&part.namespaces, 0, left_out));
    into.pods.extend(kept(&part.pods, 1, left_out));
    into.policies.extend(kept(&part.policies, 2, left_out));
    into.services.extend(kept(&part.services, 3, left_out));
    into.cluster_policies
        .extend(kept(&part.cluster_policies, 4, left_out));
    into.nodes.extend(kept(&part.nodes, 5, left_out));
}

/// Merges files loaded on their own, in order, as if they had been loaded into one [`Loaded`]:
/// an object already defined by an earlier file is reported and left out. Call [`finish`] after.
///
/// Names are compared borrowed, and the objects themselves are shared, not copied. The agent
/// keeps a [`Merge`] instead, which gives the same result for the work of the files changed.
pub fn merge_all<'a>(parts: impl IntoIterator<Item = (&'a Path, &'a Loaded)>) -> Loaded {
    let mut into = Loaded::default();
    let mut seen: std::collections::HashSet<(&str, &str, &str)> = std::collections::HashSet::new();
    for (file, part) in parts {
        into.errors.extend(part.errors.iter().cloned());
        into.ignored.extend(part.ignored.iter().cloned());
        into.cluster_policy_warnings
            .extend(part.cluster_policy_warnings.iter().cloned());
        let mut left_out = BTreeSet::new();
        for (slot, kind, ns, name) in merge_keys(part) {
            if !seen.insert((kind, ns, name)) {
                into.errors.push(duplicate(file, kind, ns, name));
                left_out.insert(slot);
            }
        }
        extend_kept(&mut into.cluster, &part.cluster, &left_out);
    }
    into
}

/// [`merge_all`] kept up to date file by file: which file defines each object first, and which
/// later files define it again. A changed file costs the work of its own objects (and of the
/// objects whose first definition it adds or takes away), not of the whole folder's: at 100k
/// pods, hashing every name on every change was most of an event's time.
#[derive(Debug, Default)]
pub struct Merge {
    /// `kind/namespace/name` → the file defining it first, and where in that file.
    first: std::collections::HashMap<Box<str>, (Arc<Path>, Slot)>,
    /// The same key → the later files defining it too (only keys defined more than once).
    again: std::collections::HashMap<Box<str>, BTreeMap<Arc<Path>, Slot>>,
    /// Per file, its objects left out because an earlier file defines them.
    left_out: BTreeMap<Arc<Path>, BTreeSet<Slot>>,
}

fn merge_key(kind: &str, ns: &str, name: &str) -> Box<str> {
    // Lengths first, so no two different triples give one key whatever their characters.
    format!("{}:{}:{kind}{ns}{name}", kind.len(), ns.len()).into_boxed_str()
}

impl Merge {
    /// `file`'s loaded objects go from `old` (`None`: not in the merge) to `new`.
    pub fn replace(&mut self, file: &Path, old: Option<&Loaded>, new: Option<&Loaded>) {
        if let Some(old) = old {
            self.remove(file, old);
        }
        if let Some(new) = new {
            self.add(file, new);
        }
    }

    fn remove(&mut self, file: &Path, part: &Loaded) {
        for (_, kind, ns, name) in merge_keys(part) {
            let key = merge_key(kind, ns, name);
            let is_first = self.first.get(&key).is_some_and(|(f, _)| **f == *file);
            if is_first {
                // The next file defining it, if any, becomes its first definition.
                let next = self.again.get_mut(&key).and_then(|later| later.pop_first());
                match next {
                    Some((f, slot)) => {
                        if let Some(l) = self.left_out.get_mut(&f) {
                            l.remove(&slot);
                        }
                        if self.again.get(&key).is_some_and(BTreeMap::is_empty) {
                            self.again.remove(&key);
                        }
                        self.first.insert(key, (f, slot));
                    }
                    None => {
                        self.first.remove(&key);
                    }
                }
            } else if let Some(later) = self.again.get_mut(&key) {
                later.remove(file);
                if later.is_empty() {
                    self.again.remove(&key);
                }
            }
        }
        self.left_out.remove(file);
    }

    fn add(&mut self, file: &Path, part: &Loaded) {
        let file: Arc<Path> = Arc::from(file);
        let mut own_left_out = BTreeSet::new();
        for (slot, kind, ns, name) in merge_keys(part) {
            let key = merge_key(kind, ns, name);
            match self.first.get_mut(&key) {
                None => {
                    self.first.insert(key, (Arc::clone(&file), slot));
                }
                Some(first) if file < first.0 => {
                    // Defined earlier now: the file that had it first is left out for it.
                    let (was, was_slot) = std::mem::replace(first, (Arc::clone(&file), slot));
                    self.left_out
                        .entry(Arc::clone(&was))
                        .or_default()
                        .insert(was_slot);
                    self.again.entry(key).or_default().insert(was, was_slot);
                }
                Some(_) => {
                    own_left_out.insert(slot);
                    self.again
                        .entry(key)
                        .or_default()
                        .insert(Arc::clone(&file), slot);
                }
            }
        }
        self.left_out.entry(file).or_default().extend(own_left_out);
    }

    /// What [`merge_all`] gives for `parts`, which must be the files given to
    /// [`Merge::replace`], in order. Shares the objects; call [`finish`] after.
    pub fn merged<'a>(&self, parts: impl IntoIterator<Item = (&'a Path, &'a Loaded)>) -> Loaded {
        let mut into = Loaded::default();
        let none = BTreeSet::new();
        for (file, part) in parts {
            into.errors.extend(part.errors.iter().cloned());
            into.ignored.extend(part.ignored.iter().cloned());
            into.cluster_policy_warnings
                .extend(part.cluster_policy_warnings.iter().cloned());
            let left_out = self.left_out.get(file).unwrap_or(&none);
            if !left_out.is_empty() {
                for (slot, kind, ns, name) in merge_keys(part) {
                    if left_out.contains(&slot) {
                        into.errors.push(duplicate(file, kind, ns, name));
                    }
                }
            }
            extend_kept(&mut into.cluster, &part.cluster, left_out);
        }
        into
    }
}

/// The cluster-wide policies of `loaded` enforced otherwise than written, one line each naming
/// the file (`file`, else where [`Loaded::origins`] says the object came from), the object and
/// the field: refused ones (enforced as their fail-closed stand-in) and peers that fail closed.
pub fn cluster_policy_problems(loaded: &Loaded, file: Option<&Path>) -> Vec<String> {
    let at = |object: &str| {
        let (kind, name) = object.split_once('/').unwrap_or((object, ""));
        let key = (kind.to_string(), String::new(), name.to_string());
        file.or_else(|| loaded.origins.get(&key).map(|o| o.file.as_path()))
            .map(|f| format!("{}: ", f.display()))
            .unwrap_or_default()
    };
    let refused = loaded.cluster.cluster_policies.iter().flat_map(|p| {
        p.refused.iter().map(move |e| {
            format!(
                "{}{e}; {} is refused: enforcing its fail-closed stand-in",
                at(&e.object),
                p.display_name()
            )
        })
    });
    let degraded = loaded
        .cluster_policy_warnings
        .iter()
        .map(|w| format!("{}{w}", at(&w.object)));
    refused.chain(degraded).collect()
}

/// After loading: sort the cluster-wide policies into evaluation order, default namespaces to `default`, give every namespace the API server's
/// `kubernetes.io/metadata.name` label, and create the namespaces that are used but not declared.
pub fn finish(loaded: &mut Loaded) {
    let c = &mut loaded.cluster;
    // The order the tiers are evaluated in (priority, then name).
    c.cluster_policies
        .sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    // Objects are normalised as they load; these only touch (and so copy) one that is not.
    for p in &mut c.policies {
        if p.metadata.namespace.is_none() {
            Arc::make_mut(p).metadata.namespace = Some("default".into());
        }
    }
    for s in &mut c.services {
        if s.metadata.namespace.is_none() {
            Arc::make_mut(s).metadata.namespace = Some("default".into());
        }
    }
    // Borrowed, and a run of pods of one namespace counted once: this runs on every change.
    let declared: BTreeSet<&str> = c
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut last: Option<&str> = None;
    for ns in c
        .pods
        .iter()
        .map(|p| &*p.namespace)
        .chain(
            c.policies
                .iter()
                .filter_map(|p| p.metadata.namespace.as_deref()),
        )
        .chain(loaded.workloads.iter().map(|w| w.namespace.as_str()))
    {
        if last != Some(ns) {
            used.insert(ns);
            last = Some(ns);
        }
    }
    let missing: Vec<String> = used
        .difference(&declared)
        .map(|ns| (*ns).to_string())
        .collect();
    for ns in missing {
        let mut n = Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(ns),
                ..Default::default()
            },
            ..Default::default()
        };
        label_namespace(&mut n);
        c.namespaces.push(Arc::new(n));
    }
    for n in &mut c.namespaces {
        let name = n.metadata.name.as_deref().unwrap_or_default();
        let labelled = n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(NAMESPACE_NAME_LABEL))
            .map(String::as_str);
        if labelled != Some(name) {
            label_namespace(Arc::make_mut(n));
        }
    }
}

/// Gives a namespace the `kubernetes.io/metadata.name` label the API server sets.
fn label_namespace(n: &mut Namespace) {
    let name = n.metadata.name.clone().unwrap_or_default();
    n.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(NAMESPACE_NAME_LABEL.into(), name);
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {team: blue}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers:
  - name: c
    image: agnhost
    ports: [{name: serve-80-tcp, containerPort: 80}]
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
---
# an empty document
---
apiVersion: v1
kind: ConfigMap
metadata: {name: s, namespace: x}
data: {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

    #[test]
    fn loads_a_folder_and_reports_bad_documents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: x}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: eighty}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: []}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c.json"),
            r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"z"}},{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p","namespace":"z"},"spec":{"ingress":"nope"}}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("d.yaml"), "kind: [unclosed").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        let c = &loaded.cluster;
        let pods: Vec<_> = c
            .pods
            .iter()
            .map(|p| enforcer_policy::model::pod_ref(p).to_string())
            .collect();
        assert_eq!(pods, ["x/a", "default/b"]);
        assert_eq!(c.policies.len(), 1);
        let mut names: Vec<_> = c
            .namespaces
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["default", "x", "y", "z"],
            "undeclared namespaces exist implicitly"
        );
        assert_eq!(
            c.namespace_labels("x").get("team").map(String::as_str),
            Some("blue")
        );
        for n in &c.namespaces {
            let l = n.metadata.labels.as_ref().unwrap();
            assert_eq!(l.get(NAMESPACE_NAME_LABEL), n.metadata.name.as_ref());
        }
        assert_eq!(loaded.ignored.len(), 1, "{:?}", loaded.ignored);
        assert_eq!(loaded.errors.len(), 3, "{:#?}", loaded.errors);
        let e = &loaded.errors[0];
        assert!(e.file.ends_with("b.yml") && e.document == Some(0));
        assert_eq!(e.object.as_deref(), Some("Pod x/bad"));
        assert!(
            e.message
                .starts_with("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        let e = &loaded.errors[1];
        assert!(e.file.ends_with("c.json") && e.document.is_none());
        assert_eq!(e.object.as_deref(), Some("items[1] NetworkPolicy z/p"));
        assert!(e.message.starts_with("spec.ingress"), "{e}");
        let e = &loaded.errors[2];
        assert!(
            e.file.ends_with("d.yaml") && e.message.contains("invalid YAML"),
            "{e}"
        );
        assert!(e.to_string().contains("d.yaml"), "{e}");
        assert!(load_dir(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn duplicates_and_missing_kind() {
        let mut loaded = Loaded::default();
        let p = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n";
        load_text(
            Path::new("one.yaml"),
            &format!("{p}---\n{p}---\nfoo: bar\n"),
            &mut loaded,
        );
        finish(&mut loaded);
        assert_eq!(loaded.cluster.pods.len(), 1);
        assert_eq!(loaded.errors.len(), 2, "{:#?}", loaded.errors);
        assert!(loaded.errors[0].message.contains("more than once"));
        assert_eq!(
            (
                loaded.errors[0].document,
                loaded.errors[0].object.as_deref()
            ),
            (Some(1), Some("Pod x/a"))
        );
        assert!(loaded.errors[1].message.contains("kind"));
        assert_eq!(loaded.errors[1].document, Some(2));
    }

    /// Workloads load apart from the cluster (the agent never sees them), each kind's template
    /// from its field (a CronJob's from its job's), a bad one named with its field.
    #[test]
    fn workloads_load_as_templates_and_bad_ones_name_the_field() {
        let mut loaded = Loaded::default();
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: x}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c}]}\n---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        metadata: {labels: {app: nightly}}\n        spec: {containers: [{name: c}]}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db, namespace: x}\nspec:\n  template:\n    spec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n";
        load_text(Path::new("w.yaml"), text, &mut loaded);
        finish(&mut loaded);
        assert!(loaded.cluster.pods.is_empty());
        let names: Vec<String> = loaded
            .workloads
            .iter()
            .map(|w| format!("{} {}/{}", w.kind, w.namespace, w.name))
            .collect();
        assert_eq!(names, ["Deployment x/web", "CronJob default/nightly"]);
        let labels = loaded.workloads[1]
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref();
        assert_eq!(
            labels.unwrap().get("app").map(String::as_str),
            Some("nightly")
        );
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        let e = loaded.errors[0].to_string();
        assert!(
            e.starts_with("w.yaml document 2 StatefulSet x/db: spec.template.spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        assert_eq!(
            loaded
                .origins
                .get(&("Deployment".to_string(), "x".to_string(), "web".to_string()))
                .map(|o| o.file.display().to_string())
                .as_deref(),
            Some("w.yaml")
        );
    }

    /// Each object's file, document and first line are kept, ServiceAccounts are collected, and
    /// a leading comment or `---` does not shift the document count.
    #[test]
    fn origins_and_service_accounts_are_kept() {
        let text = "# a comment\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: x}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}}\n";
        assert_eq!(document_lines(text), [3, 7, 8]);
        assert_eq!(document_lines("a: 1\n---\nb: 2\n"), [1, 3]);
        let mut loaded = Loaded::default();
        load_text(Path::new("f.yaml"), text, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(
            loaded.service_accounts,
            BTreeSet::from([("x".to_string(), "sa".to_string())])
        );
        let key = |k: &str| (k.to_string(), "x".to_string(), "a".to_string());
        let o = &loaded.origins[&key("Pod")];
        assert_eq!(
            (o.file.as_path(), o.document, o.line, o.item.as_deref()),
            (Path::new("f.yaml"), Some(2), Some(8), Some("items[0]"))
        );
        let sa = &loaded.origins[&(
            "ServiceAccount".to_string(),
            "x".to_string(),
            "sa".to_string(),
        )];
        assert_eq!((sa.document, sa.line), (Some(0), Some(3)));
    }

    /// Pods and policies load straight from the YAML tree, and are refused for what the path
    /// through JSON refuses (a number where a string belongs), with the same field; a tagged file
    /// goes through JSON whole.
    #[test]
    fn bulk_kinds_are_as_strict_as_any_other_document() {
        let mut loaded = Loaded::default();
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {version: 1}}\nspec: {containers: []}\n";
        let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {on: true}}}\n";
        let tagged = "apiVersion: v1\nkind: Pod\nmetadata: {name: t, namespace: x, labels: {app: !custom web}}\n";
        let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {version: \"1\"}}\n";
        load_text(
            Path::new("f.yaml"),
            &format!("{pod}---\n{policy}---\n{good}"),
            &mut loaded,
        );
        load_text(Path::new("t.yaml"), tagged, &mut loaded);
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "f.yaml document 0 Pod x/a: metadata.labels.version: invalid type: integer"
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with(
                "f.yaml document 1 NetworkPolicy x/p: spec.podSelector.matchLabels.on: invalid type: boolean"
            ),
            "{errors:?}"
        );
        assert!(
            errors[2].starts_with("t.yaml document 0 Pod x/t: metadata.labels.app"),
            "{errors:?}"
        );
        let pods: Vec<String> = loaded
            .cluster
            .pods
            .iter()
            .map(|p| enforcer_policy::model::pod_ref(p).to_string())
            .collect();
        assert_eq!(pods, ["x/b"]);
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http, nodePort: 30080}\n";

    #[test]
    fn services_are_loaded() {
        let mut loaded = Loaded::default();
        load_text(Path::new("s.yaml"), SERVICE, &mut loaded);
        load_text(
            Path::new("t.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {clusterIP: None}\n",
            &mut loaded,
        );
        finish(&mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let names: Vec<String> = loaded
            .cluster
            .services
            .iter()
            .map(|s| enforcer_policy::model::parse_service(s).0.key())
            .collect();
        assert_eq!(names, ["x/web", "default/other"]);
        let web = enforcer_policy::model::parse_service(&loaded.cluster.services[0]).0;
        assert_eq!(web.addresses.len(), 2);
        assert_eq!(web.ports[0].node_port, Some(30080));
        let merged = merge_all([
            (Path::new("a.yaml"), &loaded),
            (Path::new("b.yaml"), &loaded),
        ]);
        assert_eq!(merged.cluster.services.len(), 2);
        assert!(
            merged
                .errors
                .iter()
                .any(|e| e.object.as_deref() == Some("Service x/web")
                    && e.message.contains("more than once")),
            "{:?}",
            merged.errors
        );
    }

    #[test]
    fn a_bad_service_is_named_with_its_file_object_and_field() {
        let mut loaded = Loaded::default();
        let bad = SERVICE
            .replace(
                "clusterIPs: [10.96.0.10, \"fd00:96::10\"]",
                "clusterIPs: [10.96.0.300]",
            )
            .replace("nodePort: 30080", "nodePort: 30080, protocol: ICMP");
        load_text(Path::new("s.yaml"), &bad, &mut loaded);
        load_text(
            Path::new("t.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: typo, namespace: x}\nspec: {ports: [{port: eighty}]}\n",
            &mut loaded,
        );
        assert!(loaded.cluster.services.is_empty());
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "s.yaml document 0 Service x/web: spec.clusterIPs[0]: \"10.96.0.300\" is not an IP address (nor \"None\")",
                "s.yaml document 0 Service x/web: spec.ports[0].protocol: \"ICMP\" is not a protocol (TCP, UDP or SCTP)",
            ]
            .iter()
            .map(ToString::to_string)
            .chain(std::iter::once(errors[2].clone()))
            .collect::<Vec<_>>()
        );
        assert!(
            errors[2].starts_with("t.yaml document 0 Service x/typo: spec.ports[0].port"),
            "{errors:?}"
        );
    }

    const CLUSTER_WIDE: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: z-guard}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  egress:\n  - {action: Deny, to: [{networks: [169.254.169.254/32]}]}\n  - {name: dns, action: Accept, to: [{domainNames: [example.com]}]}\n---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: a-first}\nspec:\n  priority: 5\n  subject: {namespaces: {}}\n  ingress: [{action: Pass, from: [{namespaces: {}}]}]\n---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec:\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: broken}\nspec:\n  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{namespaces: {}}]}]\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: a}}\nstatus:\n  addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: n1}]\n";

    /// The three cluster-wide kinds load into `cluster_policies` in evaluation order (a refused
    /// one as its stand-in, a fail-closed peer kept), Nodes into `nodes`; each is reported with
    /// its file and field without leaving the file out.
    #[test]
    fn cluster_wide_policies_and_nodes_load_and_their_problems_name_file_and_field() {
        let mut loaded = Loaded::default();
        load_text(Path::new("guard.yaml"), CLUSTER_WIDE, &mut loaded);
        finish(&mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let names: Vec<String> = loaded
            .cluster
            .cluster_policies
            .iter()
            .map(|p| p.display_name())
            .collect();
        assert_eq!(
            names,
            [
                "ClusterNetworkPolicy/broken",
                "AdminNetworkPolicy/a-first",
                "ClusterNetworkPolicy/z-guard",
                "BaselineAdminNetworkPolicy/default",
            ]
        );
        let broken = &loaded.cluster.cluster_policies[0];
        assert_eq!(broken.refused.len(), 1);
        let node = &loaded.cluster.nodes[0];
        assert_eq!(
            (node.name.as_str(), node.addresses.len()),
            ("n1", 1),
            "the host name is no address"
        );
        let origin = &loaded.origins[&(
            "ClusterNetworkPolicy".to_string(),
            String::new(),
            "z-guard".to_string(),
        )];
        assert_eq!((origin.document, origin.line), (Some(0), Some(1)));
        let problems = cluster_policy_problems(&loaded, None);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "guard.yaml: ClusterNetworkPolicy/broken: spec.priority: 1001 is not in 0..=1000"
            ) && problems[0].ends_with("enforcing its fail-closed stand-in"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(
                "guard.yaml: ClusterNetworkPolicy/z-guard: spec.egress[1].to[0]: domainNames"
            ),
            "{problems:?}"
        );
        // Merged files keep them, a second definition is reported.
        let merged = merge_all([
            (Path::new("a.yaml"), &loaded),
            (Path::new("b.yaml"), &loaded),
        ]);
        assert_eq!(merged.cluster.cluster_policies.len(), 4);
        assert_eq!(merged.cluster.nodes.len(), 1);
        assert_eq!(merged.cluster_policy_warnings.len(), 2);
        assert!(
            merged.errors.iter().any(|e| e.object.as_deref()
                == Some("ClusterNetworkPolicy z-guard")
                && e.message.contains("more than once")),
            "{:?}",
            merged.errors
        );
    }

    /// A cluster-wide kind of another version is an error naming the version read, not an
    /// object silently left out.
    #[test]
    fn a_cluster_wide_kind_of_another_version_is_reported() {
        let mut loaded = Loaded::default();
        load_text(
            Path::new("v.yaml"),
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: old}\nspec: {}\n",
            &mut loaded,
        );
        assert!(loaded.cluster.cluster_policies.is_empty());
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "v.yaml document 0 ClusterNetworkPolicy old: apiVersion: policy.networking.k8s.io/v1alpha1 is not read; ClusterNetworkPolicy is read as policy.networking.k8s.io/v1alpha2"
            ]
        );
    }

    /// The pool the merge property draws files from: objects of every kind the merge keys,
    /// with names that collide across files (and a pod and a policy of one name).
    fn pool_object(i: usize, variant: u8) -> String {
        let meta = |ns: &str, name: &str| {
            format!("metadata: {{name: {name}, namespace: {ns}, labels: {{v: \"{variant}\"}}}}")
        };
        match i {
            0 => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{v: \"{variant}\"}}}}\n"
            ),
            1 => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: y, labels: {{v: \"{variant}\"}}}}\n"
            ),
            2 | 3 | 4 => {
                let (ns, name) = [("x", "a"), ("x", "b"), ("y", "a")][i - 2];
                format!(
                    "apiVersion: v1\nkind: Pod\n{}\nspec: {{containers: []}}\nstatus: {{podIP: 10.0.0.{i}}}\n",
                    meta(ns, name)
                )
            }
            5 | 6 => {
                let ns = ["x", "y"][i - 5];
                format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{}\nspec: {{podSelector: {{}}}}\n",
                    meta(ns, "a")
                )
            }
            _ => format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{v: \"{variant}\"}}}}\n"
            ),
        }
    }

    fn same_merge(a: &Loaded, b: &Loaded) -> Result<(), String> {
        fn same<T>(what: &str, a: &[Arc<T>], b: &[Arc<T>]) -> Result<(), String> {
            if a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {} against {} objects, or others",
                    a.len(),
                    b.len()
                ))
            }
        }
        let (x, y) = (&a.cluster, &b.cluster);
        same("namespaces", &x.namespaces, &y.namespaces)?;
        same("pods", &x.pods, &y.pods)?;
        same("policies", &x.policies, &y.policies)?;
        same("services", &x.services, &y.services)?;
        same("cluster policies", &x.cluster_policies, &y.cluster_policies)?;
        same("nodes", &x.nodes, &y.nodes)?;
        if a.errors != b.errors {
            return Err(format!("errors: {:?} against {:?}", a.errors, b.errors));
        }
        if a.ignored != b.ignored {
            return Err(format!("ignored: {:?} against {:?}", a.ignored, b.ignored));
        }
        Ok(())
    }

    proptest::proptest! {
        /// The merge the agent keeps file by file gives what merging every file again gives
        /// (objects, their order, the duplicates named and in which order), over any sequence
        /// of files written, rewritten and removed.
        #[test]
        fn the_kept_merge_equals_merging_every_file(
            steps in proptest::collection::vec(
                (0usize..5, proptest::option::weighted(0.8, (1u8..=255, 0u8..3))),
                1..40,
            )
        ) {
            let dir = Path::new("/m");
            let mut files: BTreeMap<PathBuf, Loaded> = BTreeMap::new();
            let mut merge = Merge::default();
            for (f, write) in steps {
                let file = dir.join(format!("f{f}.yaml"));
                let new = write.map(|(mask, variant)| {
                    let text: Vec<String> = (0..8)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| pool_object(i, variant))
                        .collect();
                    let mut part = Loaded::default();
                    load_text(&file, &text.join("---\n"), &mut part);
                    assert!(part.errors.is_empty(), "{:?}", part.errors);
                    part.forget_seen();
                    part
                });
                let old = files.remove(&file);
                merge.replace(&file, old.as_ref(), new.as_ref());
                if let Some(new) = new {
                    files.insert(file, new);
                }
                let parts = || files.iter().map(|(f, l)| (f.as_path(), l));
                let kept = merge.merged(parts());
                let all = merge_all(parts());
                proptest::prop_assert!(same_merge(&kept, &all).is_ok(), "{:?}", same_merge(&kept, &all));
            }
        }
    }
}
