//! Test scaffolding for enforcer's tests, demo and benchmarks; a dev-only crate, never in the
//! shipped binary.
//!
//! - [`netns`]: a node and its pods built from network namespaces, servers, probes, the agent
//!   process;
//! - the in-memory fakes of the kernel seam and the test token issuer come from the agent crate's
//!   `testkit` feature, re-exported here as [`fake`] and [`issuer`].

pub mod netns;

pub use enforcer::identity::testing as issuer;
pub use enforcer::reconcile::fake;
