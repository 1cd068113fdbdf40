//! enforcer: an eBPF Kubernetes NetworkPolicy enforcer. The binary (`main.rs`) is a thin CLI over
//! these modules.
pub mod identity;
pub mod datapath;
pub mod manifests;
pub mod maps;
pub mod policy;
pub mod state;
pub mod testbed;
pub mod routes;
pub mod reconcile;
pub mod agent;
pub mod dataplane;
pub mod flowlog;
pub mod health;
pub mod offline;
pub mod source;
