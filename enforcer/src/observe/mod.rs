//! What operators see: health, readiness and metrics over HTTP, and the flow log of verdict
//! events.

pub mod flowlog;
pub mod health;
