//! NetworkPolicy semantics: the compiler from API objects to map entries, and the reference
//! evaluator it is tested against.
pub mod compile;
pub mod evaluator;
pub mod explain;
pub mod lookup;
mod memo;
pub mod model;
pub mod selector;
pub mod validate;

#[cfg(test)]
mod tests;

pub use compile::{Allocations, CompileError, CompileOptions, Compiled, IdentityKey, compile};
