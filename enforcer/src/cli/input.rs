//! The input of the offline tools, one loader for all of them: a folder of manifests or a live
//! cluster (a one-shot list through kube-rs), turned into the same [`Cluster`] the agent
//! compiles, with the problems found and where each object came from.
//!
//! Workloads are taken as written: a Pod without status, and the pod template of a Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, Job or CronJob, judged as one pod named after the
//! workload (`shop/frontend`) by its labels, namespace and ports. Only the offline tools see
//! templates; the agent enforces real pods.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Namespace, Pod, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use enforcer_policy::{
    model::{Cluster, PodInfo, pod_labels, pod_ref, self_set_labels, shared, validate_service},
    selector,
    state::PodRef,
};

use crate::source::{
    manifests::{self, Workload},
    watch::LastGoodPolicies,
};

/// Where the objects come from: a folder, or a live cluster.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct InputArgs {
    /// Folder of manifests: Namespaces, Pods, Services, Nodes, NetworkPolicies, cluster-wide
    /// policies (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy) and
    /// workloads (Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs).
    #[arg(required_unless_present_any = ["kubeconfig", "context"])]
    pub dir: Option<PathBuf>,
    /// Read a live cluster with this kubeconfig instead of a folder.
    #[arg(long, conflicts_with = "dir")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context); without --kubeconfig,
    /// the default kubeconfig ($KUBECONFIG or ~/.kube/config).
    #[arg(long, conflicts_with = "dir")]
    pub context: Option<String>,
}

/// The objects' source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Dir(PathBuf),
    Cluster {
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
    },
}

impl InputArgs {
    pub fn input(&self) -> Input {
        match &self.dir {
            Some(d) => Input::Dir(d.clone()),
            None => Input::Cluster {
                kubeconfig: self.kubeconfig.clone(),
                context: self.context.clone(),
            },
        }
    }
}

/// What a pod of the loaded cluster stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// `Pod`, or the workload kind whose template it is.
    pub kind: String,
    /// The file it came from; `None` from a live cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// The loaded input.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    /// Unreadable objects, invalid policies and Services, reserved labels set by hand, workloads
    /// left out: each names the object (and file and field when known).
    pub warnings: Vec<String>,
    /// Per object (`Kind namespace/name`, `Namespace name`), the file it came from (a folder).
    pub files: BTreeMap<String, PathBuf>,
    /// The pods standing for a workload's template, with the workload's kind.
    pub workloads: BTreeMap<PodRef, String>,
}

impl Loaded {
    /// What the pod `r` is: a Pod, or a workload's template (and its file).
    pub fn origin(&self, r: &PodRef) -> Origin {
        let kind = self
            .workloads
            .get(r)
            .cloned()
            .unwrap_or_else(|| "Pod".into());
        let file = self.files.get(&format!("{kind} {r}")).cloned();
        Origin { kind, file }
    }

    /// `pod` with its kind when it is a workload: `shop/frontend (Deployment)`.
    pub fn describe(&self, r: &PodRef) -> String {
        match self.workloads.get(r) {
            Some(kind) => format!("{r} ({kind})"),
            None => r.to_string(),
        }
    }
}

/// Reads the input as the loader left it (with its object errors and origins: `lint` wants
/// them apart), the workloads' templates already added as pods; with those pods' workload
/// kinds and the warnings about objects. `Err` only when it cannot be read at all.
pub fn read(input: &Input) -> Result<(manifests::Loaded, BTreeMap<PodRef, String>, Vec<String>)> {
    let mut raw = match input {
        Input::Dir(dir) => manifests::load_dir(dir)?,
        Input::Cluster {
            kubeconfig,
            context,
        } => list_cluster(kubeconfig.as_deref(), context.clone())?,
    };
    let mut warnings: Vec<String> = raw.errors.iter().map(ToString::to_string).collect();
    warnings.extend(manifests::cluster_policy_problems(&raw, None));
    let workloads = add_workloads(&mut raw, &mut warnings);
    manifests::finish(&mut raw);
    Ok((raw, workloads, warnings))
}

/// Loads the input. `Err` only when it cannot be read at all (no such folder, no cluster);
/// problems with objects are in [`Loaded::warnings`]. There is no last good version offline, so
/// an invalid policy stays in, refused: it isolates what it selects, as the agent enforces it.
pub fn load(input: &Input) -> Result<Loaded> {
    let (raw, workloads, mut warnings) = read(input)?;
    let mut cluster = raw.cluster;
    warnings.extend(LastGoodPolicies::default().apply(&mut cluster));
    warnings.extend(self_set_labels(&cluster).iter().map(ToString::to_string));
    Ok(Loaded {
        cluster,
        warnings,
        files: raw
            .origins
            .into_iter()
            .map(|((kind, ns, name), o)| {
                let key = if kind == "Namespace" {
                    format!("{kind} {name}")
                } else {
                    format!("{kind} {ns}/{name}")
                };
                (key, o.file)
            })
            .collect(),
        workloads,
    })
}

/// Adds a pod for each workload that no pod stands for: not managed by another object (that
/// one stands for it), and with no pod of the input matching its selector (its pods stand for
/// it; a live workload scaled to zero, or a CronJob between runs, is judged as it would run). The pod is named after the workload; a Pod of that name wins.
fn add_workloads(
    raw: &mut manifests::Loaded,
    warnings: &mut Vec<String>,
) -> BTreeMap<PodRef, String> {
    let mut out = BTreeMap::new();
    let real: Vec<(PodRef, selector::Labels)> = raw
        .cluster
        .pods
        .iter()
        .map(|p| (pod_ref(p), pod_labels(p)))
        .collect();
    for w in &raw.workloads {
        if w.owned {
            continue;
        }
        let selected = w.selector.as_ref().is_some_and(|s| {
            real.iter()
                .any(|(r, l)| r.namespace == w.namespace && selector::matches(s, l))
        });
        if selected {
            continue;
        }
        let r = PodRef::new(&w.namespace, &w.name);
        if real.iter().any(|(p, _)| *p == r) || out.contains_key(&r) {
            warnings.push(format!(
                "{} {r}: its pod template is not judged: a pod named {r} exists already",
                w.kind
            ));
            continue;
        }
        raw.cluster
            .pods
            .push(Arc::new(PodInfo::from(template_pod(w))));
        out.insert(r, w.kind.clone());
    }
    out
}

/// The pod a workload's template makes: its labels, namespace and ports, no address.
fn template_pod(w: &Workload) -> Pod {
    let meta = w.template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            labels: meta.labels,
            annotations: meta.annotations,
            ..ObjectMeta::default()
        },
        spec: w.template.spec.clone(),
        status: None,
    }
}

/// Lists the objects of a live cluster once, as a folder would give them.
fn list_cluster(kubeconfig: Option<&Path>, context: Option<String>) -> Result<manifests::Loaded> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let options = kube::config::KubeConfigOptions {
            context,
            ..Default::default()
        };
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &options).await
            }
            None => kube::Config::from_kubeconfig(&options).await,
        }
        .context("loading the kubeconfig")?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).context("creating the API client")?;
        list_all(client)
            .await
            .with_context(|| format!("listing objects from {server}"))
    })
}

/// One list of every kind; the workload kinds may be forbidden (a warning, not an error).
pub async fn list_all(client: kube::Client) -> Result<manifests::Loaded> {
    use kube::{Api, ResourceExt as _, api::ListParams};
    async fn list<K>(client: &kube::Client) -> Result<Vec<K>, kube::Error>
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Ok(Api::<K>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items)
    }
    let mut out = manifests::Loaded::default();
    let c = &mut out.cluster;
    c.namespaces = shared(list::<Namespace>(&client).await.context("Namespaces")?);
    c.pods = shared(list::<Pod>(&client).await.context("Pods")?);
    c.policies = shared(
        list::<NetworkPolicy>(&client)
            .await
            .context("NetworkPolicies")?,
    );
    for s in list::<Service>(&client).await.context("Services")? {
        match validate_service(&s) {
            Ok(()) => c.services.push(Arc::new(s)),
            Err(errors) => out
                .errors
                .extend(errors.into_iter().map(|e| manifests::FileError {
                    file: PathBuf::from("cluster"),
                    document: None,
                    object: Some(format!("Service {}", e.service)),
                    message: format!("{}: {}", e.field, e.message),
                })),
        }
    }
    // Listed as JSON values so one reader (the folder's) takes every kind's template.
    async fn values<K>(client: &kube::Client, out: &mut manifests::Loaded, kind: &str) -> Result<()>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        match list::<K>(client).await {
            Ok(items) => {
                for o in items {
                    let name = format!(
                        "{kind} {}/{}",
                        o.namespace().unwrap_or_default(),
                        o.name_any()
                    );
                    let v = serde_json::to_value(&o)?;
                    match Workload::from_value(kind, &v) {
                        Ok(w) => out.workloads.push(w),
                        Err(m) => out.errors.push(manifests::FileError {
                            file: PathBuf::from("cluster"),
                            document: None,
                            object: Some(name),
                            message: m,
                        }),
                    }
                }
            }
            // Reading workloads is optional: without them only the pods are judged.
            Err(e) => out.errors.push(manifests::FileError {
                file: PathBuf::from("cluster"),
                document: None,
                object: Some(format!("{kind}s")),
                message: format!("not listed ({e}): their templates are not judged"),
            }),
        }
        Ok(())
    }
    // The cluster-wide policies (a kind whose CRD is not installed has none) and the nodes.
    for (kind, plural) in crate::source::cluster_wide::POLICY_RESOURCES {
        let resource = crate::source::cluster_wide::api_resource(kind, plural);
        let api = Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource);
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                for o in &list.items {
                    if let Some(e) = crate::source::cluster_wide::read_policy(kind, o) {
                        out.cluster_policy_warnings.extend(e.warnings);
                        out.cluster.cluster_policies.push(e.policy);
                    }
                }
            }
            Err(kube::Error::Api(r)) if r.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("{}s", kind.as_str())),
        }
    }
    match list::<k8s_openapi::api::core::v1::Node>(&client).await {
        Ok(nodes) => out.cluster.nodes = nodes.iter().map(|n| Arc::new(n.into())).collect(),
        // Without them a `nodes` peer matches no address; the rest is judged.
        Err(e) => out.errors.push(manifests::FileError {
            file: PathBuf::from("cluster"),
            document: None,
            object: Some("Nodes".into()),
            message: format!("not listed ({e}): `nodes` peers match no address"),
        }),
    }
    // Optional: which service accounts exist (`lint`'s identity rule); pods name theirs too.
    match list::<k8s_openapi::api::core::v1::ServiceAccount>(&client).await {
        Ok(sas) => {
            out.service_accounts = sas
                .iter()
                .map(|sa| (sa.namespace().unwrap_or_default(), sa.name_any()))
                .collect();
        }
        Err(e) => {
            tracing::warn!("ServiceAccounts not listed ({e}): only pods name service accounts")
        }
    }
    values::<Deployment>(&client, &mut out, "Deployment").await?;
    values::<StatefulSet>(&client, &mut out, "StatefulSet").await?;
    values::<DaemonSet>(&client, &mut out, "DaemonSet").await?;
    values::<ReplicaSet>(&client, &mut out, "ReplicaSet").await?;
    values::<Job>(&client, &mut out, "Job").await?;
    values::<CronJob>(&client, &mut out, "CronJob").await?;
    Ok(out)
}

/// The pods closest to an unknown `ns/name`, best first (at most 3), for "did you mean".
pub fn close_matches(cluster: &Cluster, name: &str) -> Vec<String> {
    let mut scored: Vec<(f64, String)> = cluster
        .pods
        .iter()
        .map(|p| pod_ref(p).to_string())
        .map(|r| (strsim::jaro_winkler(name, &r), r))
        .filter(|(s, _)| *s >= 0.8)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, r)| r).collect()
}

/// `Err` naming `r` (and the closest pods) when no pod of the input has that name.
pub fn require_pod(loaded: &Loaded, r: &PodRef, flag: &str) -> Result<()> {
    if loaded.cluster.pods.iter().any(|p| pod_ref(p) == *r) {
        return Ok(());
    }
    let close = close_matches(&loaded.cluster, &r.to_string());
    if close.is_empty() {
        bail!("{flag}: no pod or workload {r} in the input");
    }
    bail!(
        "{flag}: no pod or workload {r} in the input; did you mean {}?",
        close.join(", ")
    )
}
