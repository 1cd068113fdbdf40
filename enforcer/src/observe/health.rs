//! `/healthz`, `/readyz` and `/metrics` on `--health-addr`, served from the [`Status`] the control
//! loop publishes.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::Status;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    // The body names the input version programmed, so a client that just changed the input
    // can wait for exactly its change.
    let generation = s.programmed.load(Ordering::Relaxed);
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, format!("ready generation={generation}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready generation={generation}\n"),
        )
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.render())
}

/// The health router.
pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(status)
}

/// Serves the health endpoints until the task is dropped.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --health-addr {addr}"))?;
    axum::serve(listener, router(status))
        .await
        .context("health server")
}
