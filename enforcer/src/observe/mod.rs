//! What operators see: health, readiness and metrics over HTTP, and the flow log of verdict
//! events.

pub mod flowlog;
pub mod health;
pub mod metrics;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use enforcer_policy::state::DesiredState;

/// What the observers name things with: the state enforced now and the pods behind endpoint ids
/// and addresses. The control loop publishes it after each change; the flow log and the per-pod
/// metrics read it.
#[derive(Default)]
pub struct View {
    /// The state enforced now (shared with the control loop, not copied).
    pub state: Arc<DesiredState>,
    /// Endpoint id -> pod, identity -> description, for the flow log.
    pub pods_by_endpoint: BTreeMap<u32, String>,
    pub pods_by_ip: BTreeMap<IpAddr, String>,
}
