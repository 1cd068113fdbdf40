//! Where the agent's view of the cluster comes from: a folder of manifests ([`manifests`] parses,
//! [`watch`] watches it), or the API server ([`kube`]'s reflectors). Both yield the same
//! [`Cluster`] snapshot, which the pure compiler takes.

pub mod cluster_wide;
pub mod kube;
pub mod liveness;
pub mod manifests;
pub mod records;
pub mod watch;

use std::time::Duration;

use anyhow::Result;
use enforcer_policy::model::Cluster;

pub use watch::{ManifestsSource, Problem};

/// Where the cluster comes from: a folder, or the kube watchers (through a watch channel that
/// stays `None` until every store has listed, so nothing is reconciled before that and the
/// pinned state keeps enforcing).
pub enum Source {
    Manifests(ManifestsSource),
    Kube(tokio::sync::watch::Receiver<Option<std::sync::Arc<Cluster>>>),
}

impl Source {
    /// Waits up to `timeout` for news: returns early when the manifests folder changes.
    pub fn wait(&mut self, timeout: Duration) {
        match self {
            Self::Manifests(m) => m.wait(timeout),
            Self::Kube(_) => std::thread::sleep(timeout),
        }
    }

    /// `Some` when the cluster changed: the cluster and the problems found.
    pub fn poll(&mut self) -> Result<Option<(Cluster, Vec<Problem>)>> {
        match self {
            Self::Manifests(m) => m.poll(),
            Self::Kube(rx) => {
                if !rx.has_changed().unwrap_or(false) {
                    return Ok(None);
                }
                Ok(rx
                    .borrow_and_update()
                    .as_ref()
                    .map(|c| (Cluster::clone(c), Vec::new())))
            }
        }
    }
}
