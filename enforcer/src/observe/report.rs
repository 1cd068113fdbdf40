//! `/status`: the agent's state as one JSON document (the shape is documented in docs/cli.md),
//! read by `enforcer status` and by scripts, instead of scraping the Prometheus text.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the binary is: `--version` and `enforcer_build_info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    /// The git revision built (`-dirty` with uncommitted changes), "unknown" outside git.
    pub revision: String,
    pub rustc: String,
}

impl BuildInfo {
    /// This binary's.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").into(),
            revision: env!("ENFORCER_GIT_REVISION").into(),
            rustc: env!("ENFORCER_RUSTC").into(),
        }
    }
}

/// The agent's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The latest observed input is fully programmed (as `/readyz`).
    pub ready: bool,
    /// Input versions seen, and the latest fully programmed.
    pub generation: Generation,
    pub pods_enforced: u64,
    /// Local pods whose interface is not found yet.
    pub pods_pending: u64,
    /// Problems in the latest input (bad files, invalid policies).
    pub input_problems: u64,
    pub reconciles: Reconciles,
    /// Packets and bytes by verdict (`allowed`, `dropped`) and reason.
    pub packets: Vec<PacketCount>,
    pub maps: Vec<MapFill>,
    /// The refused policies, each `namespace/name: what it isolates`.
    pub refused_policies: Vec<String>,
    /// Local pods without programs: their traffic is not filtered.
    pub not_enforced: Vec<NotEnforced>,
    /// Pods (or peer addresses) not fully programmed for want of room in a map, one line each.
    pub not_programmed: Vec<String>,
    /// Per map: entries the desired state needs that the map does not hold.
    pub entries_missing: BTreeMap<String, u64>,
    /// Interfaces without the exit program, and why.
    pub exits_not_attached: Vec<ExitNotAttached>,
    pub verified: Verified,
    /// Pod and Namespace objects that set reserved `enforcer.dev/` labels themselves (ignored).
    pub reserved_labels_ignored: u64,
    /// Verdict events lost to a full ring buffer.
    pub events_lost: u64,
    pub build: BuildInfo,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub observed: u64,
    pub programmed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reconciles {
    pub total: u64,
    pub failed: u64,
    /// Mean time to compile and program a change, and of that to compile; absent before the
    /// first.
    pub mean_seconds: Option<f64>,
    pub mean_compile_seconds: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCount {
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
    /// entries / capacity.
    pub fill: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotEnforced {
    pub pod: String,
    /// `no-interface`, `not-own-veth` or `attach-failed`.
    pub reason: String,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitNotAttached {
    pub interface: String,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// The local pods with an address bound to a verified identity.
    pub local: Vec<VerifiedPod>,
    /// Pods on other nodes with a verified address.
    pub remote: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedPod {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
}
