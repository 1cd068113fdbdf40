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
//! logged or echoed: each attestation is one audit line ([`audit`]) with the verified claims only.
//! Limits: headers at most 24 KiB in total (431 beyond), the token at most
//! [`VerifierConfig::max_token_bytes`](super::VerifierConfig), bodies are never read, one request
//! per connection, the connection caps and timeouts of [`httpd::Limits`] (by default 256
//! connections, 8 per source address, headers within 5 s, the connection closed after 15 s),
//! request timeout (default 5 s).

pub mod audit;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tokio::net::TcpListener;

use self::audit::AuditLog;
use super::bind::{canonical_ip, check_binding};
use super::{Bindings, IdentityMetrics, KeyStore, PodDirectory, Reason, VerifiedToken, Verifier};
use crate::httpd;

/// Path of the attestation endpoint.
pub const ATTEST_PATH: &str = "/v1/attest";
/// Default request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Sources the rate limiter keeps a budget for at once.
pub const DEFAULT_RATE_LIMITER_SOURCES: usize = 4096;

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

/// What the rate limiter says of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Allowed,
    /// The source spent its budget; it has a token again after `retry_after`.
    Limited {
        retry_after: Duration,
    },
    /// A new source while every place in the table holds a budget still being refilled: it is
    /// refused rather than have another source's budget forgotten.
    TableFull {
        retry_after: Duration,
    },
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    /// While the table is full, the earliest time a bucket may have refilled (no scan before).
    full_until: Option<Instant>,
}

/// Token-bucket rate limiter keyed by source IP, in bounded memory. When its table is full, only
/// the buckets that have refilled completely are forgotten (they carry no information: a new
/// bucket starts full); if there are none, a new source is refused until one has. So filling
/// the table never gives a source that spent its budget a fresh one.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimit,
    capacity: usize,
    table: Mutex<Table>,
}

impl RateLimiter {
    pub fn new(cfg: RateLimit) -> Self {
        RateLimiter::with_capacity(cfg, DEFAULT_RATE_LIMITER_SOURCES)
    }

    /// A limiter keeping at most `capacity` sources (at least 1).
    pub fn with_capacity(cfg: RateLimit, capacity: usize) -> Self {
        RateLimiter {
            cfg,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                full_until: None,
            }),
        }
    }

    /// Take one token for `ip`; false if none is left.
    pub fn check(&self, ip: IpAddr) -> bool {
        self.check_at(ip, Instant::now())
    }

    pub fn check_at(&self, ip: IpAddr, now: Instant) -> bool {
        self.decide_at(ip, now) == Decision::Allowed
    }

    /// Sources with a budget in the table now.
    pub fn sources(&self) -> usize {
        self.table.lock().map(|t| t.buckets.len()).unwrap_or(0)
    }

    fn burst(&self) -> f64 {
        f64::from(self.cfg.burst.max(1))
    }

    fn rate(&self) -> f64 {
        if self.cfg.per_second.is_finite() {
            self.cfg.per_second.max(0.0)
        } else {
            0.0
        }
    }

    fn refill(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * self.rate())
            .min(self.burst())
    }

    /// Time until `tokens` grow to `want` (None: never, at rate 0).
    fn time_to(&self, tokens: f64, want: f64) -> Option<Duration> {
        let rate = self.rate();
        if tokens >= want {
            Some(Duration::ZERO)
        } else if rate > 0.0 {
            Duration::try_from_secs_f64((want - tokens) / rate).ok()
        } else {
            None
        }
    }

    /// Take one token for `ip` at `now`.
    pub fn decide_at(&self, ip: IpAddr, now: Instant) -> Decision {
        const NEVER: Duration = Duration::from_secs(3600);
        let burst = self.burst();
        let Ok(mut table) = self.table.lock() else {
            return Decision::TableFull { retry_after: NEVER };
        };
        if !table.buckets.contains_key(&ip) && table.buckets.len() >= self.capacity {
            if let Some(until) = table.full_until
                && now < until
            {
                return Decision::TableFull {
                    retry_after: until - now,
                };
            }
            table.buckets.retain(|_, b| self.refill(b, now) < burst);
            if table.buckets.len() >= self.capacity {
                let next = table
                    .buckets
                    .values()
                    .filter_map(|b| self.time_to(self.refill(b, now), burst))
                    .min();
                table.full_until = next.map(|d| now + d);
                return Decision::TableFull {
                    retry_after: next.unwrap_or(NEVER),
                };
            }
            table.full_until = None;
        }
        let b = table.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let tokens = self.refill(b, now);
        b.tokens = tokens;
        b.last = now;
        if tokens >= 1.0 {
            b.tokens -= 1.0;
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: self.time_to(tokens, 1.0).unwrap_or(NEVER),
            }
        }
    }
}

/// Whole seconds for `Retry-After`, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().clamp(1.0, 3600.0) as u64
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
    pub(super) limits: httpd::Limits,
    pub(super) audit: Arc<AuditLog>,
}

impl AttestState {
    /// Defaults: [`RateLimit::default`], system clock, [`DEFAULT_REQUEST_TIMEOUT`], the default
    /// [`httpd::Limits`], audit lines on stdout without a node name.
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
            limits: httpd::Limits::default(),
            audit: Arc::new(AuditLog::stdout(None)),
        }
    }

    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = Arc::new(RateLimiter::new(limit));
        self
    }

    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Arc::new(limiter);
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

    /// Connection caps and timeouts of the port (see [`serve_listener`]).
    pub fn with_limits(mut self, limits: httpd::Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = Arc::new(audit);
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
    let retry_after = match st.limiter.decide_at(ip, Instant::now()) {
        Decision::Allowed => None,
        Decision::Limited { retry_after } => Some(retry_after),
        Decision::TableFull { retry_after } => {
            st.metrics.record_rate_limiter_full();
            Some(retry_after)
        }
    };
    if let Some(wait) = retry_after {
        st.metrics.record_reject(Reason::RateLimited);
        st.audit
            .refused(ip, Reason::RateLimited, None, st.metrics.as_ref());
        return reject_response(Reason::RateLimited, Some(retry_after_secs(wait)));
    }
    // A refusal after verification keeps the verified token, for the audit line.
    let work = async {
        let token =
            bearer(&headers, st.verifier.config().max_token_bytes).map_err(|r| (r, None))?;
        let now = (st.clock)();
        let verified = st
            .verifier
            .verify_with_store(token, &st.keys, now)
            .await
            .map_err(|r| (r, None))?;
        match check_binding(st.pods.as_ref(), &verified.identity, ip) {
            Ok(()) => Ok(verified),
            Err(r) => Err((r, Some(verified))),
        }
    };
    let result: Result<VerifiedToken, (Reason, Option<VerifiedToken>)> =
        match tokio::time::timeout(st.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err((Reason::Timeout, None)),
        };
    match result {
        Ok(v) => {
            let id = &v.identity;
            st.bindings.bind(ip, id.clone());
            st.metrics.record_accept();
            st.audit.accepted(ip, &v);
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
        Err((reason, verified)) => {
            st.metrics.record_reject(reason);
            st.audit
                .refused(ip, reason, verified.as_ref(), st.metrics.as_ref());
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

/// Serve the attestation endpoint on `addr` until the task is dropped. `[::]:P` serves IPv4 and
/// IPv6 callers ([`httpd::bind`]).
pub async fn serve(addr: SocketAddr, state: AttestState) -> std::io::Result<()> {
    let listener = httpd::bind(addr)?;
    serve_listener(listener, state, std::future::pending()).await
}

/// Serve on an already bound listener until `shutdown` completes, within the state's
/// [`httpd::Limits`]: one request per connection, connections capped in all and per source
/// address, the headers read within a timeout and every connection closed by a deadline.
pub async fn serve_listener(
    listener: TcpListener,
    state: AttestState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let limits = state.limits;
    let stats = state.metrics.connections.clone();
    httpd::serve(
        listener,
        router(state),
        limits,
        stats,
        "attestation endpoint",
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// burst 2, one token every 2 s, room for 3 sources.
    fn limiter() -> RateLimiter {
        RateLimiter::with_capacity(
            RateLimit {
                burst: 2,
                per_second: 0.5,
            },
            3,
        )
    }

    #[test]
    fn filling_the_table_never_gives_an_exhausted_source_a_fresh_budget() {
        let l = limiter();
        let t0 = Instant::now();
        let attacker = ip(1);
        assert_eq!(l.decide_at(attacker, t0), Decision::Allowed);
        assert_eq!(l.decide_at(attacker, t0), Decision::Allowed);
        assert!(matches!(
            l.decide_at(attacker, t0),
            Decision::Limited { .. }
        ));
        // The attacker fills the table from other addresses, each spending a token...
        assert_eq!(l.decide_at(ip(2), t0), Decision::Allowed);
        assert_eq!(l.decide_at(ip(3), t0), Decision::Allowed);
        // ... and a new source now finds no place: refused, not a reason to forget budgets.
        let d = l.decide_at(ip(4), t0);
        assert!(
            matches!(d, Decision::TableFull { retry_after } if retry_after == Duration::from_secs(2)),
            "{d:?}"
        );
        assert_eq!(l.sources(), 3);
        // The exhausted source is still exhausted.
        assert!(matches!(
            l.decide_at(attacker, t0 + Duration::from_millis(100)),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn only_sources_whose_bucket_refilled_are_forgotten() {
        let l = limiter();
        let t0 = Instant::now();
        for n in 1..=3 {
            assert_eq!(l.decide_at(ip(n), t0), Decision::Allowed);
        }
        // Source 1 spends its whole budget later than the others.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.decide_at(ip(1), t1), Decision::Allowed);
        assert!(matches!(l.decide_at(ip(1), t1), Decision::Limited { .. }));
        // At t0 + 2 s sources 2 and 3 are full again (they carry nothing); source 1 is not.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(l.decide_at(ip(4), t2), Decision::Allowed);
        assert_eq!(l.sources(), 2, "2 and 3 forgotten, 1 and 4 kept");
        // Source 1 has the one token it earned since, not a fresh budget of two.
        assert_eq!(l.decide_at(ip(1), t2), Decision::Allowed);
        assert!(matches!(l.decide_at(ip(1), t2), Decision::Limited { .. }));
    }

    #[test]
    fn retry_after_says_when_the_source_has_a_token_again() {
        let l = limiter();
        let t0 = Instant::now();
        l.decide_at(ip(1), t0);
        l.decide_at(ip(1), t0);
        assert_eq!(
            l.decide_at(ip(1), t0 + Duration::from_millis(500)),
            Decision::Limited {
                retry_after: Duration::from_millis(1500)
            }
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
