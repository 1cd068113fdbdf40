//! The node-local attestation endpoint: `POST /v1/attest` with `Authorization: Bearer <token>`.
//!
//! Responses (JSON):
//! - 200 `{namespace, serviceAccount, pod, podUid, expiresAt}` (`expiresAt` in unix seconds): the
//!   token verified, its pod exists with the token's uid, and the caller IP belongs to that pod;
//!   the IP is now bound to the identity until `expiresAt`.
//! - 401 `{"error": "<reason>"}`: the token proves nothing: missing, malformed, not verifying,
//!   or invalidated because its pod is gone (`unknown-pod`) or was re-created (`pod-uid-mismatch`)
//!   (kube-apiserver treats a bound token whose object is gone the same way).
//! - 403 `{"error": "ip-mismatch"}`: the token is valid, but the caller is not its pod.
//! - 429 `{"error": "rate-limited"}` (per source IP token bucket, with `Retry-After`).
//! - 503 `{"error": "keys-unavailable" | "timeout"}`.
//!
//! The caller IP is taken from the TCP connection only, never from headers. The token is never
//! logged or echoed. Limits: headers at most 24 KiB in total (431 beyond), the token at most
//! [`VerifierConfig::max_token_bytes`](super::VerifierConfig), bodies are never read, header read
//! timeout 5 s, request timeout (default 5 s), connection lifetime 30 s, at most 256 connections.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tokio::net::TcpListener;

use super::bind::{canonical_ip, check_binding};
use super::{Bindings, IdentityMetrics, KeyStore, PodDirectory, Reason, Verifier};

/// Path of the attestation endpoint.
pub const ATTEST_PATH: &str = "/v1/attest";
/// Default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const MAX_HEADER_BYTES: usize = 24 * 1024;
const MAX_BUF_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_CONNECTIONS: usize = 256;
/// Buckets kept by the rate limiter before idle ones are pruned.
const MAX_BUCKETS: usize = 4096;

/// Per-source-IP token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

impl Default for RateLimit {
    /// 10 at once, then one every 2 s (a pod attests about once per token rotation).
    fn default() -> Self {
        RateLimit {
            burst: 10,
            per_second: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token-bucket rate limiter keyed by source IP, with bounded memory.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(cfg: RateLimit) -> Self {
        RateLimiter {
            cfg,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `ip`; false if none is left.
    pub fn check(&self, ip: IpAddr) -> bool {
        self.check_at(ip, Instant::now())
    }

    pub fn check_at(&self, ip: IpAddr, now: Instant) -> bool {
        let burst = f64::from(self.cfg.burst.max(1));
        let rate = if self.cfg.per_second.is_finite() {
            self.cfg.per_second.max(0.0)
        } else {
            0.0
        };
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let refill = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst)
        };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| refill(b) < burst);
            if buckets.len() >= MAX_BUCKETS {
                // Everyone is active: forget the state rather than grow without bound.
                buckets.clear();
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens = refill(b);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until `ip` has a token again (for `Retry-After`).
    fn retry_after_secs(&self) -> u64 {
        if self.cfg.per_second > 0.0 && self.cfg.per_second.is_finite() {
            (1.0 / self.cfg.per_second).ceil().clamp(1.0, 3600.0) as u64
        } else {
            60
        }
    }
}

type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Everything the endpoint needs.
#[derive(Clone)]
pub struct AttestState {
    pub verifier: Arc<Verifier>,
    pub keys: Arc<KeyStore>,
    pub pods: Arc<dyn PodDirectory>,
    pub bindings: Arc<Bindings>,
    pub metrics: Arc<IdentityMetrics>,
    pub(super) limiter: Arc<RateLimiter>,
    pub(super) clock: Clock,
    pub(super) request_timeout: Duration,
}

impl AttestState {
    /// Defaults: [`RateLimit::default`], system clock, [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(
        verifier: Arc<Verifier>,
        keys: Arc<KeyStore>,
        pods: Arc<dyn PodDirectory>,
        bindings: Arc<Bindings>,
        metrics: Arc<IdentityMetrics>,
    ) -> Self {
        AttestState {
            verifier,
            keys,
            pods,
            bindings,
            metrics,
            limiter: Arc::new(RateLimiter::new(RateLimit::default())),
            clock: Arc::new(super::unix_now),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = Arc::new(RateLimiter::new(limit));
        self
    }

    /// Clock in unix seconds (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Attested<'a> {
    namespace: &'a str,
    service_account: &'a str,
    pod: &'a str,
    pod_uid: &'a str,
    expires_at: u64,
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
}

fn reject_response(reason: Reason, retry_after: Option<u64>) -> Response {
    let status =
        StatusCode::from_u16(reason.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        status,
        axum::Json(ErrorBody {
            error: reason.as_str(),
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The bearer token of the request (exactly one `Authorization: Bearer` header).
fn bearer(headers: &HeaderMap, max_token_bytes: usize) -> Result<&str, Reason> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Reason::MissingToken)?;
    if values.next().is_some() {
        return Err(Reason::Malformed);
    }
    if value.len() > max_token_bytes.saturating_add(64) {
        return Err(Reason::Oversized);
    }
    let value = value.to_str().map_err(|_| Reason::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(Reason::MissingToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Reason::MissingToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Reason::MissingToken);
    }
    Ok(token)
}

async fn attest(
    State(st): State<AttestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let ip = canonical_ip(peer.ip());
    if !st.limiter.check(ip) {
        st.metrics.record_reject(Reason::RateLimited);
        tracing::debug!(peer = %ip, reason = Reason::RateLimited.as_str(), "identity: attestation rejected");
        return reject_response(Reason::RateLimited, Some(st.limiter.retry_after_secs()));
    }
    let work = async {
        let token = bearer(&headers, st.verifier.config().max_token_bytes)?;
        let now = (st.clock)();
        let verified = st.verifier.verify_with_store(token, &st.keys, now).await?;
        if let Err(r) = check_binding(st.pods.as_ref(), &verified.identity, ip) {
            let v = &verified;
            tracing::info!(
                peer = %ip,
                reason = r.as_str(),
                namespace = %v.identity.namespace,
                pod = %v.identity.pod_name,
                service_account = %v.identity.service_account,
                jti = ?v.jti,
                "identity: valid token refused for this caller"
            );
            return Err(r);
        }
        Ok::<_, Reason>(verified)
    };
    let result = match tokio::time::timeout(st.request_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Reason::Timeout),
    };
    match result {
        Ok(v) => {
            let id = &v.identity;
            st.bindings.bind(ip, id.clone());
            st.metrics.record_accept();
            tracing::info!(
                peer = %ip,
                namespace = %id.namespace,
                service_account = %id.service_account,
                pod = %id.pod_name,
                expires_at = id.expires_at,
                jti = ?v.jti,
                kid = %v.kid,
                "identity: attested"
            );
            let mut resp = axum::Json(Attested {
                namespace: &id.namespace,
                service_account: &id.service_account,
                pod: &id.pod_name,
                pod_uid: &id.pod_uid,
                expires_at: id.expires_at,
            })
            .into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(reason) => {
            st.metrics.record_reject(reason);
            tracing::info!(peer = %ip, reason = reason.as_str(), "identity: attestation rejected");
            reject_response(reason, None)
        }
    }
}

/// The attestation router (`POST /v1/attest`). Needs `ConnectInfo<SocketAddr>`: serve it with
/// [`serve`]/[`serve_listener`], `into_make_service_with_connect_info::<SocketAddr>()`, or
/// `MockConnectInfo` in tests.
pub fn router(state: AttestState) -> Router {
    Router::new()
        .route(ATTEST_PATH, post(attest))
        .layer(DefaultBodyLimit::max(4096))
        .with_state(state)
}

/// Serve the attestation endpoint on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, state: AttestState) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, state, std::future::pending()).await
}

/// Serve on an already bound listener until `shutdown` completes. Each connection gets hyper's
/// HTTP/1 limits (header size/count, header read timeout) and a lifetime cap.
pub async fn serve_listener(
    listener: TcpListener,
    state: AttestState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = router(state);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "identity: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let app = app.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = tower::ServiceExt::map_request(
                app,
                move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req
                },
            );
            let conn = builder.serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(svc),
            );
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}
