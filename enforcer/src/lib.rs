//! enforcer: an eBPF Kubernetes NetworkPolicy enforcer. The binary (`main.rs`) is a thin CLI over
//! these modules.
//!
//! Data flows one way: a source (`source` for a manifests folder, `kube_source` for the API
//! server) yields a `policy::model::Cluster`; the pure compiler (`policy`) turns it into a
//! `state::DesiredState`; the `reconcile`r writes that into the `datapath` maps through the
//! `maps::MapTable` seam, adding before removing. `agent` runs that loop; `health`, `flowlog`
//! and `identity`/`attestation` serve what operators and workloads see.

pub mod agent;
pub mod attestation;
pub mod datapath;
pub mod dataplane;
pub mod flowlog;
pub mod health;
pub mod identity;
pub mod kube_source;
pub mod manifests;
pub mod maps;
pub mod offline;
pub mod policy;
pub mod reconcile;
pub mod routes;
pub mod source;
pub mod state;
pub mod testbed;
