//! `/healthz`, `/readyz`, `/metrics` and `/status` (JSON) on `--health-addr`, served from the [`Status`] the control
//! loop publishes, within [`LIMITS`]: a client that connects and sends nothing, or trickles,
//! cannot hold the port the kubelet's probes and the metrics scraper need.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::Status;
use crate::httpd::{self, ConnStats, Limits};

/// The health port's limits: 64 connections at once, 16 from one address, the request headers
/// within 5 s, every connection closed after 30 s (a large `/metrics` to a slow scraper).
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    max_per_source: 16,
    header_read_timeout: Duration::from_secs(5),
    deadline: Duration::from_secs(30),
    max_header_bytes: 16 * 1024,
    max_headers: 64,
};

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    readiness(&s)
}

/// `/readyz`: the body names the input version programmed, so a client that just changed the
/// input can wait for exactly its change. Lines before it name the refused policies (enforced as
/// isolation: ready all the same) and, when not ready, the pods not enforced at all (their own
/// interface not found), the interfaces without the exit program and what is not programmed
/// (pods denied for want of room in a map); the `generation=` line stays last.
fn readiness(s: &Status) -> (StatusCode, String) {
    let generation = s.programmed.load(Ordering::Relaxed);
    let mut body = String::new();
    for line in s.refused() {
        body.push_str("refused policy ");
        body.push_str(&line);
        body.push('\n');
    }
    if s.ready.load(Ordering::Relaxed) {
        body.push_str(&format!("ready generation={generation}\n"));
        (StatusCode::OK, body)
    } else {
        for line in s.not_enforced() {
            body.push_str("not enforced: ");
            body.push_str(&line);
            body.push('\n');
        }
        for line in s.exits_not_attached() {
            body.push_str(&line);
            body.push('\n');
        }
        for line in s.not_programmed() {
            body.push_str("not programmed: ");
            body.push_str(&line);
            body.push('\n');
        }
        body.push_str(&format!("not ready generation={generation}\n"));
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// `/status`: the state as JSON ([`super::report::StatusReport`]); 200 whether ready or not
/// (the document says), so a client reads it either way.
async fn status_json(State(s): State<Arc<Status>>) -> impl IntoResponse {
    axum::Json(s.report())
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
        .route("/status", get(status_json))
        .with_state(status)
}

/// Serves the health endpoints until the task is dropped; its connections are counted on
/// `/metrics` (`enforcer_health_connections_total`).
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let listener = httpd::bind(addr).with_context(|| format!("binding --health-addr {addr}"))?;
    serve_listener(listener, status, LIMITS, std::future::pending()).await
}

/// Serves on a bound listener within `limits` until `shutdown` completes.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let stats = Arc::new(ConnStats::default());
    {
        let stats = stats.clone();
        status.add_renderer(Arc::new(move |o: &mut String| {
            stats.render(
                "enforcer_health_connections_total",
                "Connections to the health port by what became of them.",
                o,
            )
        }));
    }
    httpd::serve(listener, router(status), limits, stats, "health", shutdown)
        .await
        .context("health server")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::Programming;

    #[test]
    fn readyz_names_what_is_not_programmed_and_keeps_the_generation_last() {
        let s = Status::default();
        s.programmed.store(4, Ordering::Relaxed);
        s.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            readiness(&s),
            (StatusCode::OK, "ready generation=4\n".into())
        );
        s.ready.store(false, Ordering::Relaxed);
        s.set_programming(Programming {
            lines: vec!["x/b ingress denied (allow rules not written: POLICY full)".into()],
            ..Programming::default()
        });
        let (code, body) = readiness(&s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "not programmed: x/b ingress denied (allow rules not written: POLICY full)\nnot ready generation=4\n"
        );
        let generation = body.split("generation=").nth(1).map(str::trim);
        assert_eq!(
            generation,
            Some("4"),
            "clients parse what follows generation="
        );
    }

    #[test]
    fn readyz_names_the_interfaces_without_the_exit_program() {
        let s = Status::default();
        s.set_programming(Programming {
            exits_not_attached: vec![("eth1".into(), "attaching svc_exit: busy".into())],
            ..Programming::default()
        });
        let (code, body) = readiness(&s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "exit eth1 not attached: attaching svc_exit: busy\nnot ready generation=0\n"
        );
    }

    #[test]
    fn readyz_and_metrics_name_refused_policies_while_ready() {
        let s = Status::default();
        s.programmed.store(7, Ordering::Relaxed);
        s.ready.store(true, Ordering::Relaxed);
        s.set_refused(vec![
            "x/p: isolating the pods it selects (ingress) until it is fixed".into(),
        ]);
        assert_eq!(
            readiness(&s),
            (
                StatusCode::OK,
                "refused policy x/p: isolating the pods it selects (ingress) until it is fixed\nready generation=7\n"
                    .into()
            )
        );
        assert!(s.render().contains("enforcer_policies_refused 1\n"));
        s.set_refused(Vec::new());
        assert!(s.render().contains("enforcer_policies_refused 0\n"));
    }
}
