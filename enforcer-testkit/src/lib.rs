//! Test scaffolding for enforcer's tests, demo and benchmarks; a dev-only crate, never in the
//! shipped binary.
//!
//! - [`netns`]: a node and its pods built from network namespaces, servers, probes, the agent
//!   process;
//! - [`forge`]: packets a hostile pod or node crafts, and the raw sockets that send them;
//! - [`two_nodes`]: two nodes with an agent each on one manifests folder, and a pod attesting
//!   to its node;
//! - [`kube_proxy`]: kube-proxy's Service rules (nftables or iptables-legacy) in a node namespace,
//!   and the matching `kind: Service` manifests;
//! - [`scale`]: a synthetic cluster of many pods and policies, as API objects and as a
//!   manifests folder;
//! - the in-memory fakes of the kernel seam and the test token issuer come from the agent crate's
//!   `testkit` feature, re-exported here as [`fake`] and [`issuer`].

pub mod forge;
pub mod kube_proxy;
pub mod netns;
pub mod scale;
pub mod two_nodes;

pub use enforcer::identity::testing as issuer;
pub use enforcer::reconcile::fake;

/// Whether `cond` holds within `timeout`, checked every 50 ms.
pub fn within(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
