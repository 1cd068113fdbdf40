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
    Kube(KubeSource),
}

/// The kube watchers' snapshots, and the runtime that drives their channel (the control loop
/// runs on a thread of its own and waits on the channel through it).
pub struct KubeSource {
    pub rx: tokio::sync::watch::Receiver<Option<std::sync::Arc<Cluster>>>,
    pub runtime: tokio::runtime::Handle,
}

impl Source {
    /// Waits up to `timeout` for news: returns early when the manifests folder changes.
    pub fn wait(&mut self, timeout: Duration) {
        match self {
            Self::Manifests(m) => m.wait(timeout),
            // Woken by a new snapshot: an event is compiled as soon as it is published, not
            // at the next tick. A clone waits, so the loop's own receiver still sees the
            // change as new in `poll`.
            Self::Kube(k) => {
                let mut rx = k.rx.clone();
                let changed = k
                    .runtime
                    .block_on(async { tokio::time::timeout(timeout, rx.changed()).await });
                if let Ok(Err(_)) = changed {
                    // The watchers stopped (logged where they run): no busy loop meanwhile.
                    std::thread::sleep(timeout);
                }
            }
        }
    }

    /// `Some` when the cluster changed: the cluster and the problems found.
    pub fn poll(&mut self) -> Result<Option<(Cluster, Vec<Problem>)>> {
        match self {
            Self::Manifests(m) => m.poll(),
            Self::Kube(KubeSource { rx, .. }) => {
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
