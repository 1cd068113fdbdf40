//! NetworkPolicy semantics as pure functions: the cluster snapshot ([`model`]), validation, the
//! compiler from API objects to the desired contents of the datapath maps ([`state`]), the
//! reference evaluator the compiler is property-tested against, `explain`, and [`decision`], the
//! programs' decision done over a desired state instead of kernel maps.
//!
//! No IO: this crate depends only on the API types and the shared map types, so the compiler
//! cannot reach a file, a socket or the kernel.
pub mod cidr;
pub mod compile;
mod compile_tiers;
pub mod decision;
pub mod evaluator;
pub mod explain;
pub mod intern;
pub mod lint;
pub mod matrix;
mod memo;
pub mod model;
pub mod selector;
pub mod state;
pub mod tiers;
pub mod validate;

#[cfg(test)]
mod tests;

pub use compile::{
    Allocations, CompileError, CompileOptions, Compiled, IdentityKey, RefusedPolicy, compile,
};
