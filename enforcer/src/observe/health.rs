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

async fn healthz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    liveness(&s, std::time::Instant::now())
}

/// `/healthz`: 200 `ok` while every heartbeat is within its bound; else 503 naming each part
/// that is stuck, so the kubelet restarts an agent whose control loop or watchers hang (its
/// pins keep enforcing meanwhile).
fn liveness(s: &Status, now: std::time::Instant) -> (StatusCode, String) {
    let stale = s.heartbeats.stale(now);
    if stale.is_empty() {
        return (StatusCode::OK, "ok\n".into());
    }
    let mut body = stale.join("\n");
    body.push('\n');
    (StatusCode::SERVICE_UNAVAILABLE, body)
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

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = router.oneshot(req).await.unwrap();
        let code = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (code, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn healthz_fails_naming_a_frozen_heartbeat_and_recovers_when_it_beats() {
        let s = Arc::new(Status::default());
        let control = s
            .heartbeats
            .register("control loop", Duration::from_secs(30));
        let pods = s
            .heartbeats
            .register("watch pods", Duration::from_secs(600));
        assert_eq!(
            get(router(s.clone()), "/healthz").await,
            (StatusCode::OK, "ok\n".into())
        );
        // Frozen: the last beat is older than the bound.
        let past = std::time::Instant::now()
            .checked_sub(Duration::from_secs(45))
            .expect("the clock is past 45 s");
        control.beat_at(past);
        let (code, body) = get(router(s.clone()), "/healthz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("control loop stuck: no progress for 45s (bound 30s)"),
            "{body}"
        );
        pods.beat_at(past);
        let (_, body) = get(router(s.clone()), "/healthz").await;
        assert_eq!(
            body.lines().count(),
            1,
            "within its bound, pods is alive: {body}"
        );
        control.beat();
        assert_eq!(
            get(router(s), "/healthz").await,
            (StatusCode::OK, "ok\n".into())
        );
    }

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
