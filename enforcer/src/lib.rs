//! enforcer: an eBPF Kubernetes NetworkPolicy enforcer. The node agent and its command line; the
//! pure NetworkPolicy semantics live in `enforcer_policy`, the programs in `enforcer-ebpf`.
//!
//! The pipeline, one folder a step:
//! [`source`] (a manifests folder or the API server) → cluster snapshot
//! (`enforcer_policy::model::Cluster`) → compile (pure, `enforcer_policy`) → desired state
//! (`enforcer_policy::state::DesiredState`) → [`reconcile`] (diff, through the kernel seam) →
//! [`datapath`] (pinned maps, attached programs) → events ([`observe`]: flow log, metrics,
//! health). [`agent`] runs the loop; [`identity`] verifies workloads; [`cli`] is the command.

pub mod agent;
pub mod cli;
pub mod datapath;
pub mod httpd;
pub mod identity;
pub mod observe;
pub mod reconcile;
pub mod source;
