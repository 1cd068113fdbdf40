//! Where the agent's view of the cluster comes from. The standalone source watches a folder of
//! manifests; the in-cluster source (kube watchers) produces the same [`Cluster`].
//!
//! Both keep the last good version of what breaks: a file that no longer parses keeps its last
//! parsed objects, and a policy that no longer validates keeps its last valid version, so a
//! broken edit never opens or closes traffic it does not name.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::{
    manifests::{self, FileError, Loaded},
    policy::{model::Cluster, validate::validate_policy},
};

/// One problem to report: where and what.
pub type Problem = String;

/// Where the cluster comes from: a folder, or the kube watchers (through a watch channel that
/// stays `None` until every store has listed, so nothing is reconciled before that and the
/// pinned state keeps enforcing).
pub enum Source {
    Manifests(ManifestsSource),
    Kube(tokio::sync::watch::Receiver<Option<std::sync::Arc<Cluster>>>),
}

impl Source {
    /// `Some` when the cluster changed: the cluster and the problems found.
    pub fn poll(&mut self) -> Result<Option<(Cluster, Vec<Problem>)>> {
        match self {
            Self::Manifests(m) => m.poll(),
            Self::Kube(rx) => {
                if !rx.has_changed().unwrap_or(false) {
                    return Ok(None);
                }
                Ok(rx.borrow_and_update().as_ref().map(|c| (Cluster::clone(c), Vec::new())))
            }
        }
    }
}

/// Reads a manifests folder when it changes, keeping the last good version of each file.
#[derive(Debug)]
pub struct ManifestsSource {
    dir: PathBuf,
    /// What the folder looked like at the last read: (name, modified, length).
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    /// What it looked like at the last poll: a change is read once it holds still for one
    /// poll, so a file caught half-written (truncated, then filled) is never applied.
    settling: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    read_once: bool,
    /// Last text of each file that parsed without error.
    good: BTreeMap<PathBuf, String>,
}

impl ManifestsSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), fingerprint: Vec::new(), settling: None, read_once: false, good: BTreeMap::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Some` when the folder changed since the last read (or on the first read) and has held
    /// still since the previous call: the cluster to enforce and the problems found. `Err` only
    /// when the folder cannot be listed.
    pub fn poll(&mut self) -> Result<Option<(Cluster, Vec<Problem>)>> {
        let files = manifest_files(&self.dir)?;
        let fingerprint: Vec<_> = files
            .iter()
            .map(|f| {
                let md = std::fs::metadata(f).ok();
                (f.clone(), md.as_ref().and_then(|m| m.modified().ok()), md.map_or(0, |m| m.len()))
            })
            .collect();
        if self.read_once && fingerprint == self.fingerprint {
            self.settling = None;
            return Ok(None);
        }
        if self.settling.as_ref() != Some(&fingerprint) {
            self.settling = Some(fingerprint);
            return Ok(None);
        }
        self.settling = None;
        self.read_once = true;
        self.fingerprint = fingerprint;
        let mut problems = Vec::new();
        let mut chosen: Vec<(PathBuf, String)> = Vec::new();
        for file in &files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{}: cannot read: {e}", file.display()));
                    if let Some(old) = self.good.get(file) {
                        chosen.push((file.clone(), old.clone()));
                    }
                    continue;
                }
            };
            let mut scratch = Loaded::default();
            manifests::load_text(file, &text, &mut scratch);
            if scratch.errors.is_empty() {
                self.good.insert(file.clone(), text.clone());
                chosen.push((file.clone(), text));
            } else {
                problems.extend(scratch.errors.iter().map(FileError::to_string));
                match self.good.get(file) {
                    Some(old) => {
                        problems.push(format!("{}: keeping its last good version", file.display()));
                        chosen.push((file.clone(), old.clone()));
                    }
                    None => problems.push(format!("{}: not applied (no earlier good version)", file.display())),
                }
            }
        }
        // Files that were deleted are deleted, not kept.
        self.good.retain(|f, _| files.contains(f));
        let mut loaded = Loaded::default();
        for (file, text) in &chosen {
            manifests::load_text(file, text, &mut loaded);
        }
        manifests::finish(&mut loaded);
        problems.extend(loaded.errors.iter().map(FileError::to_string));
        Ok(Some((loaded.cluster, problems)))
    }
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifests folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
            !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json") && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Replaces every policy that does not validate by its last valid version (or drops it when it
/// never was valid), and remembers valid ones. Returns the problems.
#[derive(Debug, Default)]
pub struct LastGoodPolicies {
    good: BTreeMap<(String, String), NetworkPolicy>,
}

impl LastGoodPolicies {
    pub fn apply(&mut self, cluster: &mut Cluster) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut out = Vec::with_capacity(cluster.policies.len());
        let mut present = std::collections::BTreeSet::new();
        for p in cluster.policies.drain(..) {
            let key = (
                p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                p.metadata.name.clone().unwrap_or_default(),
            );
            present.insert(key.clone());
            match validate_policy(&p) {
                Ok(()) => {
                    self.good.insert(key, p.clone());
                    out.push(p);
                }
                Err(errors) => {
                    for e in errors {
                        problems.push(e.to_string());
                    }
                    match self.good.get(&key) {
                        Some(old) => {
                            problems.push(format!(
                                "NetworkPolicy {}/{}: keeping its last valid version",
                                key.0, key.1
                            ));
                            out.push(old.clone());
                        }
                        None => problems.push(format!("NetworkPolicy {}/{}: not applied", key.0, key.1)),
                    }
                }
            }
        }
        self.good.retain(|k, _| present.contains(k));
        cluster.policies = out;
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";
    const GOOD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    const BAD_FIELD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n      endPort: 70\n";

    /// Polls until the folder has settled and been read.
    fn settled(src: &mut ManifestsSource) -> Option<(Cluster, Vec<Problem>)> {
        assert!(src.poll().unwrap().is_none(), "a change is read only once it holds still");
        src.poll().unwrap()
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("p.yaml"), GOOD).unwrap();
        let mut src = ManifestsSource::new(dir.path());
        let (c, problems) = settled(&mut src).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.policies.len(), 1);
        assert!(src.poll().unwrap().is_none(), "unchanged folder");
        std::fs::write(dir.path().join("p.yaml"), "kind: [unclosed").unwrap();
        let (c, problems) = settled(&mut src).unwrap();
        assert_eq!(c.policies.len(), 1, "last good policy kept");
        assert!(problems.iter().any(|p| p.contains("p.yaml")), "{problems:?}");
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        let (c, _) = settled(&mut src).unwrap();
        assert!(c.policies.is_empty(), "a deleted file is deleted");
    }

    #[test]
    fn an_invalid_policy_keeps_its_last_valid_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut lg = LastGoodPolicies::default();
        let load = |text: &str| {
            let mut l = Loaded::default();
            manifests::load_text(&dir.path().join("p.yaml"), text, &mut l);
            manifests::finish(&mut l);
            l.cluster
        };
        let mut c = load(GOOD);
        assert!(lg.apply(&mut c).is_empty());
        let mut c = load(BAD_FIELD);
        let problems = lg.apply(&mut c);
        assert!(problems.iter().any(|p| p.contains("endPort")), "{problems:?}");
        assert_eq!(c.policies.len(), 1);
        assert!(c.policies[0].spec.as_ref().unwrap().ingress.is_none(), "the old version is enforced");
    }
}
