//! `enforcer attest`: the workload's side of identity. Run inside the pod whose identity it
//! proves (a native sidecar, or an init container with `--once`), it reads the pod's projected
//! service-account token and presents it to the attestation endpoint of its node's agent
//! (`POST /v1/attest`, see docs/identity.md), which binds the pod's address to the verified
//! identity until the token expires. As a sidecar it keeps the binding alive: it presents every
//! token the kubelet rotates in as soon as the file changes, and presents again well before the
//! binding ends and at least every `--max-interval` (an agent that restarted learns the binding
//! again).
//!
//! Exit codes: 0 bound (`--once`), or stopped by SIGTERM/SIGINT; 1 refused by the agent (the
//! token proves nothing, or this is not its pod); 2 bad configuration (no agent address, a
//! missing, empty or unreadable token file; also every command-line error); 3 `--once` gave up:
//! only failures (agent unreachable, unavailable, rate-limiting) within `--timeout`.
//!
//! The token is never printed or logged, nor put into an error: only the agent's answers are.

use std::{
    collections::hash_map::RandomState,
    future::Future,
    hash::{BuildHasher, DefaultHasher, Hash, Hasher},
    io::Read as _,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, UNIX_EPOCH},
};

use hyper::{
    Request,
    body::Body as _,
    header::{self, HeaderValue},
};
use log::{error, info, warn};
use serde::Deserialize;
use tokio::{net::TcpStream, time::Instant};

use super::run::parse_duration;
use crate::identity::{server::ATTEST_PATH, unix_now};

/// Where the example workload mounts its projected token (volume path `token`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/enforcer/token";
/// The agent's default attestation port (`--attest-addr 0.0.0.0:9902`).
pub const DEFAULT_AGENT_PORT: u16 = 9902;
/// A service-account token is a few KiB; the agent refuses more than 16 KiB.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;
/// The agent's answers are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent gives a verification 5 s; the whole exchange gets a little more.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// How often the token file is checked for a rotated token.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Never present more often: the agent's rate limit refills one request every 2 s.
const MIN_INTERVAL: Duration = Duration::from_secs(2);
/// Present the same token again this long before its binding ends (seconds).
const EXPIRY_MARGIN: u64 = 30;
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A longer `Retry-After` is taken as this: an odd answer must not park the sidecar for hours.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug)]
pub struct AttestArgs {
    /// The pod's projected service-account token (audience `enforcer`). Re-read before every
    /// presentation: the kubelet rotates it at 80% of its lifetime.
    #[arg(long, default_value = DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// The node agent's attestation endpoint: `HOST[:PORT]`, an IPv6 address with a port as
    /// `[ADDR]:PORT`. Default: `NODE_IP` and --port.
    #[arg(long, env = "ENFORCER_AGENT")]
    pub agent: Option<String>,
    /// The node's address, from the downward API (`fieldRef: status.hostIP`); used when --agent
    /// is not given.
    #[arg(long, env = "NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// The attestation port, for NODE_IP or an --agent without a port.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    pub port: u16,
    /// Init-container mode: exit 0 once bound. Default: keep the binding alive (a sidecar).
    #[arg(long)]
    pub once: bool,
    /// With --once: give up (exit 3) when not bound within this time.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long refusals that the agent also gives while its view of the cluster lags behind a
    /// new pod (`unknown-pod`, `pod-uid-mismatch`, `ip-mismatch`, `unknown-kid`) are retried
    /// before they count.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Present the token at least this often while bound.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_interval: Duration,
}

/// How `enforcer attest` ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Bound (`--once`), or asked to stop.
    Done,
    /// The agent refused the token (HTTP 401 or 403) for `reason` (its answer's `error`).
    Refused { status: u16, reason: String },
    /// Bad configuration: what is wrong.
    Config(String),
    /// `--once` was not bound within `--timeout`: the last failure.
    GaveUp(String),
}

impl Exit {
    /// The process exit code (see the module documentation).
    pub fn code(&self) -> i32 {
        match self {
            Exit::Done => 0,
            Exit::Refused { .. } => 1,
            Exit::Config(_) => 2,
            Exit::GaveUp(_) => 3,
        }
    }

    /// The one line that explains a failed exit, with what to check.
    pub fn message(&self) -> Option<String> {
        match self {
            Exit::Done => None,
            Exit::Refused { status, reason } => Some(format!(
                "the agent refused the token: {reason} (HTTP {status}). {}",
                refusal_hint(reason)
            )),
            Exit::Config(what) => Some(what.clone()),
            Exit::GaveUp(last) => Some(format!(
                "not bound within --timeout; last failure: {last}. Is the agent running on this \
                 node with identity on (its --attest-addr port reachable from the pod)?"
            )),
        }
    }
}

/// What to check for each refusal reason (docs/identity.md lists them).
fn refusal_hint(reason: &str) -> &'static str {
    match reason {
        "wrong-audience" => {
            "The token's audience is not the agent's --audience: the projected volume's \
             serviceAccountToken.audience must be `enforcer` (or what the agent's --audience says)."
        }
        "wrong-issuer" => {
            "The token's issuer is not one the agent accepts: compare the agent's --issuer (or \
             --issuer-from-cluster) with the API server's --service-account-issuer."
        }
        "ip-mismatch" => {
            "The token is valid, but this connection does not come from its pod: run `enforcer \
             attest` in the pod whose token it is (a sidecar or init container of that pod), not \
             with hostNetwork (a host-network pod has the node's address, which is never bound) \
             and not through a proxy or NAT."
        }
        "unknown-pod" | "pod-uid-mismatch" => {
            "The token's pod is not (or no longer) a live pod the agent knows: mount the pod's \
             own token from a projected serviceAccountToken volume (not one copied from another \
             pod or a Secret); a re-created pod gets a new token."
        }
        "not-pod-bound" => {
            "The token is not bound to a pod: use a projected serviceAccountToken volume, not a \
             Secret-based token or one made by `kubectl create token`."
        }
        "expired" | "not-yet-valid" | "issued-in-future" => {
            "The token file is stale, or the clocks disagree: the kubelet refreshes a projected \
             token at 80% of its lifetime; check that the file is a projected serviceAccountToken \
             and the node's clock."
        }
        "lifetime-too-long" => {
            "The token lives longer than 24 h: set the projected volume's expirationSeconds to \
             at most 86400 (3600 is the default)."
        }
        "missing-token" | "oversized" => {
            "The token file does not hold one service-account token: check --token-file."
        }
        _ => {
            "The token is not a service-account token the agent can verify: check that \
             --token-file is the projected serviceAccountToken (audience `enforcer`) and that the \
             agent has this cluster's keys (its log and `enforcer status` name the reason too)."
        }
    }
}

/// Refusals the agent also gives while its view of the pods (or keys) lags behind the cluster:
/// a new pod's address or uid not yet seen by its watch, a new signing key not yet fetched.
fn may_be_lag(reason: &str) -> bool {
    matches!(
        reason,
        "unknown-pod" | "pod-uid-mismatch" | "ip-mismatch" | "unknown-kid"
    )
}

/// What a run needs, resolved from the arguments.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: SocketAddr,
    pub token_file: PathBuf,
    pub once: bool,
    pub timeout: Duration,
    pub grace: Duration,
    pub max_interval: Duration,
}

impl Config {
    pub fn from_args(args: &AttestArgs) -> Result<Config, String> {
        Ok(Config {
            agent: agent_addr(args.agent.as_deref(), args.node_ip, args.port)?,
            token_file: args.token_file.clone(),
            once: args.once,
            timeout: args.timeout,
            grace: args.grace,
            max_interval: args.max_interval,
        })
    }
}

/// The agent's address: `--agent` (`IP:PORT`, `[IPv6]:PORT`, a bare IP or `[IPv6]`, or a host
/// name with or without a port), else `NODE_IP` with `port`.
pub fn agent_addr(
    agent: Option<&str>,
    node_ip: Option<IpAddr>,
    port: u16,
) -> Result<SocketAddr, String> {
    let Some(agent) = agent.map(str::trim) else {
        return node_ip.map(|ip| SocketAddr::new(ip, port)).ok_or_else(|| {
            "no agent address: set NODE_IP from the downward API (env valueFrom fieldRef \
             status.hostIP) or pass --agent HOST:PORT"
                .to_string()
        });
    };
    if let Ok(addr) = agent.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = agent
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(agent);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let bad = || {
        format!(
            "--agent {agent}: not HOST[:PORT] (an IPv6 address with a port is written [ADDR]:PORT)"
        )
    };
    if agent.is_empty() || agent.contains(['[', ']', '/', ' ']) {
        return Err(bad());
    }
    let with_port = if agent.contains(':') {
        agent.to_string()
    } else {
        format!("{agent}:{port}")
    };
    let mut addrs = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", bad()))?;
    addrs
        .next()
        .ok_or_else(|| format!("--agent {agent}: the name has no address"))
}

/// `enforcer attest`: runs until bound (`--once`), refused, stopped or misconfigured; logs why
/// it ended and returns the exit code.
pub fn run(args: &AttestArgs) -> i32 {
    let exit = match Config::from_args(args) {
        Err(what) => Exit::Config(what),
        Ok(cfg) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Err(e) => Exit::Config(format!("starting the runtime: {e}")),
            Ok(rt) => rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(mut term), Ok(mut int)) => {
                        // A sidecar must not hold up its pod's termination: SIGTERM ends it at
                        // once, also in the middle of a presentation or a back-off.
                        let stop = async move {
                            tokio::select! {
                                _ = term.recv() => {}
                                _ = int.recv() => {}
                            }
                        };
                        attest(&cfg, stop).await
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        Exit::Config(format!("installing the signal handlers: {e}"))
                    }
                }
            }),
        },
    };
    if let Some(message) = exit.message() {
        error!("{message}");
    }
    exit.code()
}

/// The agent's 200 answer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attested {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// One presentation's outcome.
#[derive(Debug)]
enum Answer {
    /// Bound; the connection's own address (the one the agent bound).
    Bound(Attested, SocketAddr),
    Refused {
        status: u16,
        reason: String,
    },
    /// 429, with its `Retry-After`.
    RateLimited(Option<Duration>),
    /// Worth retrying: 503 (keys not loaded yet, a verification timeout), no connection, a
    /// timeout, an unexpected answer.
    Failed(String),
}

/// The loop of `enforcer attest` until it ends (the exit), or `stop` completes ([`Exit::Done`]).
pub async fn attest(cfg: &Config, stop: impl Future<Output = ()>) -> Exit {
    tokio::pin!(stop);
    let started = Instant::now();
    // Consecutive failures, for the back-off.
    let mut failures: u32 = 0;
    let mut lagging_since: Option<Instant> = None;
    let mut last_failure = String::from("none yet");
    loop {
        if cfg.once && started.elapsed() >= cfg.timeout {
            return Exit::GaveUp(last_failure);
        }
        let token = match read_token(&cfg.token_file) {
            Ok(t) => t,
            Err(what) => return Exit::Config(what),
        };
        let presented = fingerprint(&token);
        let answer = tokio::select! {
            a = present(cfg.agent, &token) => a,
            () = &mut stop => return Exit::Done,
        };
        drop(token);
        // How long to wait, and whether a new token in the file ends the wait early (only
        // while bound: a back-off is never cut short).
        let (delay, watch) = match answer {
            Answer::Bound(a, local) => {
                let now = unix_now();
                if cfg.once {
                    info!("{}", bound_line(&a, local, now));
                    return Exit::Done;
                }
                let next = next_presentation(now, a.expires_at, cfg.max_interval);
                if a.expires_at <= now {
                    warn!(
                        "{}; the binding has already ended: the token in {} is stale (is the \
                         kubelet refreshing it?)",
                        bound_line(&a, local, now),
                        cfg.token_file.display()
                    );
                } else {
                    info!(
                        "{}; presenting again in {} s",
                        bound_line(&a, local, now),
                        next.as_secs()
                    );
                }
                failures = 0;
                lagging_since = None;
                (next, Some(presented))
            }
            Answer::Refused { status, reason } => {
                let since = *lagging_since.get_or_insert_with(Instant::now);
                if !(may_be_lag(&reason) && since.elapsed() < cfg.grace) {
                    // Also after a first success: the binding can no longer be renewed, and it
                    // ends with the token. Exiting makes that visible (the container's restarts,
                    // its last message) instead of letting the pod lose its identity silently;
                    // the kubelet restarts the sidecar, which binds again once the cause is gone.
                    return Exit::Refused { status, reason };
                }
                let d = backoff(failures, jitter());
                failures = failures.saturating_add(1);
                last_failure = format!("refused: {reason} (HTTP {status})");
                warn!(
                    "the agent at {} refused the token: {reason} (HTTP {status}), which it also \
                     answers while its view of a new pod lags behind the cluster: retrying in \
                     {:.1} s, for up to {} s",
                    cfg.agent,
                    d.as_secs_f64(),
                    cfg.grace.as_secs()
                );
                (d, None)
            }
            Answer::RateLimited(retry_after) => {
                let d = after_rate_limit(failures, jitter(), retry_after);
                failures = failures.saturating_add(1);
                last_failure = "rate-limited (HTTP 429)".into();
                warn!(
                    "the agent at {} is rate-limiting this pod (HTTP 429, Retry-After {}): \
                     retrying in {:.1} s",
                    cfg.agent,
                    retry_after.map_or("none".into(), |r| format!("{} s", r.as_secs())),
                    d.as_secs_f64()
                );
                (d, None)
            }
            Answer::Failed(what) => {
                let d = backoff(failures, jitter());
                failures = failures.saturating_add(1);
                warn!(
                    "attestation at {} failed: {what}; retrying in {:.1} s",
                    cfg.agent,
                    d.as_secs_f64()
                );
                last_failure = what;
                (d, None)
            }
        };
        let delay = if cfg.once {
            delay.min(cfg.timeout.saturating_sub(started.elapsed()))
        } else {
            delay
        };
        if !wait(delay, watch, &cfg.token_file, stop.as_mut()).await {
            return Exit::Done;
        }
    }
}

/// One line naming the binding the agent made.
fn bound_line(a: &Attested, local: SocketAddr, now: u64) -> String {
    format!(
        "attested: {} is {}/{} (service account {}, pod uid {}) until {} (in {} s)",
        local.ip(),
        a.namespace,
        a.pod,
        a.service_account,
        a.pod_uid,
        a.expires_at,
        a.expires_at.saturating_sub(now)
    )
}

/// Waits `delay`, or until the token file holds a token other than `watch` (checked every
/// second). False when `stop` completed.
async fn wait(
    delay: Duration,
    watch: Option<u64>,
    token_file: &Path,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let until = Instant::now() + delay;
    loop {
        let now = Instant::now();
        if now >= until {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(FILE_POLL.min(until - now)) => {}
            () = &mut stop => return false,
        }
        if let Some(presented) = watch
            && let Ok(token) = read_token(token_file)
            && fingerprint(&token) != presented
        {
            info!(
                "the token in {} changed: presenting the new one",
                token_file.display()
            );
            return true;
        }
    }
}

/// The token in `path`, trimmed; errors name the file and what to check, never the content.
pub fn read_token(path: &Path) -> Result<String, String> {
    let file = path.display();
    let read = |e: std::io::Error| {
        format!(
            "reading the token file {file}: {e}: is the projected token volume (audience \
             `enforcer`) mounted there? (--token-file)"
        )
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "the token file {file} is larger than {} KiB: not a service-account token",
            MAX_TOKEN_FILE_BYTES / 1024
        ));
    }
    let text = String::from_utf8(bytes).unwrap_or_default();
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the token file {file} is empty or not text: is the projected token volume mounted \
             there? (--token-file)"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token file {file} holds more than one token, or characters a token never has"
        ));
    }
    Ok(token.to_string())
}

/// Tells tokens apart without keeping a copy.
fn fingerprint(token: &str) -> u64 {
    let mut h = DefaultHasher::new();
    token.hash(&mut h);
    h.finish()
}

/// Presents `token` to the agent once.
async fn present(agent: SocketAddr, token: &str) -> Answer {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(agent, token)).await {
        Ok(Ok((local, status, retry_after, body))) => {
            interpret(status, retry_after.as_deref(), &body, local)
        }
        Ok(Err(what)) => Answer::Failed(what),
        Err(_) => Answer::Failed(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
    }
}

/// One HTTP/1.1 exchange: (own address, status, `Retry-After`, body of at most
/// [`MAX_RESPONSE_BYTES`]).
async fn exchange(
    agent: SocketAddr,
    token: &str,
) -> Result<(SocketAddr, u16, Option<String>, Vec<u8>), String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(agent))
        .await
        .map_err(|_| {
            format!(
                "connecting to {agent}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("connecting to {agent}: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("connecting to {agent}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_BYTES)
        .handshake::<_, String>(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("{agent}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut auth = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token has characters an HTTP header cannot carry".to_string())?;
    // Kept out of Debug output (and of header compression, were this ever HTTP/2).
    auth.set_sensitive(true);
    let request = Request::post(ATTEST_PATH)
        .header(header::HOST, agent.to_string())
        .header(header::AUTHORIZATION, auth)
        .header(
            header::USER_AGENT,
            concat!("enforcer-attest/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(String::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{agent}: {e}"))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("reading the answer of {agent}: {e}"))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
            if bytes.len() > MAX_RESPONSE_BYTES {
                conn.abort();
                return Err(format!(
                    "{agent} answered more than {MAX_RESPONSE_BYTES} bytes: not the agent?"
                ));
            }
        }
    }
    conn.abort();
    Ok((local, status, retry_after, bytes))
}

fn interpret(status: u16, retry_after: Option<&str>, body: &[u8], local: SocketAddr) -> Answer {
    match status {
        200 => match serde_json::from_slice::<Attested>(body) {
            Ok(a) => Answer::Bound(a, local),
            Err(e) => Answer::Failed(format!("HTTP 200 with an unreadable answer: {e}")),
        },
        401 | 403 => Answer::Refused {
            status,
            reason: error_reason(body).unwrap_or_else(|| "no reason given".into()),
        },
        429 => Answer::RateLimited(
            retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        ),
        503 => Answer::Failed(format!(
            "the agent is not ready to verify: {} (HTTP 503)",
            error_reason(body).unwrap_or_else(|| "no reason given".into())
        )),
        other => Answer::Failed(format!(
            "unexpected answer HTTP {other}{}: is this the agent's --attest-addr?",
            error_reason(body).map_or(String::new(), |r| format!(" ({r})"))
        )),
    }
}

/// The `error` of a JSON answer, cut to printable characters (it ends up in a terminal).
fn error_reason(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let e: ErrorBody = serde_json::from_slice(body).ok()?;
    let clean: String = e
        .error
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(100)
        .collect();
    (!clean.is_empty()).then_some(clean)
}

/// When to present again, at `now`, a binding that ends at `expires_at` (Unix seconds): at the
/// earlier of half the remaining time and [`EXPIRY_MARGIN`] before the end, but never sooner
/// than [`MIN_INTERVAL`] (no busy loop, and within the agent's rate limit) nor later than `max`.
pub fn next_presentation(now: u64, expires_at: u64, max: Duration) -> Duration {
    let remaining = expires_at.saturating_sub(now);
    let secs = (remaining / 2).min(remaining.saturating_sub(EXPIRY_MARGIN));
    Duration::from_secs(secs).clamp(MIN_INTERVAL, max.max(MIN_INTERVAL))
}

/// The wait before retry number `attempt + 1`: [`BACKOFF_INITIAL`] doubled per failure up to
/// [`BACKOFF_MAX`], half of it fixed and half random (`unit` in [0, 1)), so that the pods of a
/// node whose agent restarted do not all come back in step.
pub fn backoff(attempt: u32, unit: f64) -> Duration {
    let base = BACKOFF_INITIAL
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// The wait after a 429: the back-off, but at least the agent's `Retry-After` (up to
/// [`RETRY_AFTER_MAX`]).
pub fn after_rate_limit(attempt: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
    backoff(attempt, unit).max(retry_after.unwrap_or_default().min(RETRY_AFTER_MAX))
}

/// A random number in [0, 1) for the jitter (std's per-process random hash keys; nothing here
/// needs more).
fn jitter() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn presentations_come_at_half_the_remaining_time_within_bounds() {
        let max = Duration::from_secs(300);
        let hour = Duration::from_secs(3600);
        // A fresh 1 h binding: half the remaining time, unless --max-interval is sooner.
        assert_eq!(next_presentation(0, 3600, hour), Duration::from_secs(1800));
        assert_eq!(next_presentation(0, 3600, max), max);
        assert_eq!(next_presentation(1000, 1100, hour), Duration::from_secs(50));
        // Near the end the margin comes first: 30 s before it.
        assert_eq!(next_presentation(0, 50, hour), Duration::from_secs(20));
        // Within the margin, at the end, or past it: never more often than every 2 s.
        for (now, exp) in [(0, 20), (100, 100), (200, 100), (0, 3)] {
            assert_eq!(
                next_presentation(now, exp, hour),
                MIN_INTERVAL,
                "{now} {exp}"
            );
        }
        // A --max-interval below the floor does not make it a busy loop.
        assert_eq!(
            next_presentation(0, 3600, Duration::from_millis(1)),
            MIN_INTERVAL
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_a_cap() {
        for (attempt, base) in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (40, 60)] {
            let base = Duration::from_secs(base);
            assert_eq!(backoff(attempt, 0.0), base / 2, "attempt {attempt}");
            assert!(backoff(attempt, 0.999) < base && backoff(attempt, 0.999) > base * 99 / 100);
        }
        let samples: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(
            samples.iter().any(|u| *u < 0.5) && samples.iter().any(|u| *u >= 0.5),
            "{samples:?}"
        );
    }

    #[test]
    fn a_rate_limit_waits_at_least_retry_after_within_a_cap() {
        let s = Duration::from_secs;
        assert_eq!(after_rate_limit(0, 0.0, Some(s(7))), s(7));
        assert_eq!(after_rate_limit(0, 0.0, None), backoff(0, 0.0));
        // The back-off wins when it is longer.
        assert_eq!(after_rate_limit(6, 0.0, Some(s(2))), s(30));
        assert_eq!(after_rate_limit(0, 0.0, Some(s(86_400))), RETRY_AFTER_MAX);
    }

    #[test]
    fn agent_address_from_flag_or_node_ip_with_ipv6_bracketed() {
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let ok = |agent: Option<&str>, node: Option<IpAddr>| {
            agent_addr(agent, node, 9902).unwrap().to_string()
        };
        assert_eq!(ok(Some("10.0.0.1:9000"), None), "10.0.0.1:9000");
        assert_eq!(ok(Some("10.0.0.1"), None), "10.0.0.1:9902");
        assert_eq!(ok(Some("[fd00::1]:9000"), None), "[fd00::1]:9000");
        assert_eq!(ok(Some("fd00::1"), None), "[fd00::1]:9902");
        assert_eq!(ok(Some("[fd00::1]"), None), "[fd00::1]:9902");
        assert_eq!(
            ok(Some("localhost:9000"), None).rsplit_once(':').unwrap().1,
            "9000"
        );
        // --agent wins over NODE_IP; NODE_IP (status.hostIP: never bracketed) gets the port.
        assert_eq!(ok(Some("10.0.0.1"), Some(v6)), "10.0.0.1:9902");
        assert_eq!(ok(None, Some(v6)), "[fd00::1]:9902");
        assert_eq!(
            agent_addr(None, Some("10.1.2.3".parse().unwrap()), 1234).unwrap(),
            "10.1.2.3:1234".parse::<SocketAddr>().unwrap()
        );
        let err = agent_addr(None, None, 9902).unwrap_err();
        assert!(
            err.contains("NODE_IP") && err.contains("status.hostIP"),
            "{err}"
        );
        for bad in ["[fd00::1]:x", "", "a b", "[10.0.0.1"] {
            let err = agent_addr(Some(bad), None, 9902).unwrap_err();
            assert!(err.contains("--agent"), "{bad}: {err}");
        }
    }

    #[test]
    fn token_file_problems_are_configuration_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = read_token(&missing).unwrap_err();
        assert!(err.contains("nope") && err.contains("projected"), "{err}");
        let f = dir.path().join("token");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&f).unwrap_err().contains("empty"));
        std::fs::write(&f, "a.b.c\nd.e.f\n").unwrap();
        assert!(read_token(&f).unwrap_err().contains("more than one"));
        std::fs::write(&f, vec![b'a'; 70 * 1024]).unwrap();
        assert!(read_token(&f).unwrap_err().contains("larger"));
        std::fs::write(&f, "aaa.bbb.ccc\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "aaa.bbb.ccc");
    }

    /// A stand-in agent answering connections with `answers` in turn (the last one repeats) and
    /// recording (time, Authorization header) of each request.
    type Seen = Arc<Mutex<Vec<(Instant, String)>>>;

    async fn scripted_agent(answers: Vec<String>) -> (SocketAddr, Seen) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let text = String::from_utf8_lossy(&req).to_string();
                let auth = text
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .map(|l| l["authorization:".len()..].trim().to_string())
                    .collect::<Vec<_>>()
                    .join("|");
                record.lock().unwrap().push((Instant::now(), auth));
                let answer = &answers[n.min(answers.len() - 1)];
                n += 1;
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        (addr, seen)
    }

    fn answer(status: &str, extra: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn bound(expires_in: u64) -> String {
        answer(
            "200 OK",
            "",
            &format!(
                r#"{{"namespace":"x","serviceAccount":"frontend","pod":"a","podUid":"uid-a","expiresAt":{}}}"#,
                unix_now() + expires_in
            ),
        )
    }

    fn refused(status: &str, reason: &str) -> String {
        answer(status, "", &format!(r#"{{"error":"{reason}"}}"#))
    }

    fn config(agent: SocketAddr, token_file: &Path, once: bool) -> Config {
        Config {
            agent,
            token_file: token_file.to_path_buf(),
            once,
            timeout: Duration::from_secs(20),
            grace: Duration::from_secs(10),
            max_interval: Duration::from_secs(300),
        }
    }

    fn token_file(dir: &tempfile::TempDir, token: &str) -> PathBuf {
        let f = dir.path().join("token");
        std::fs::write(&f, token).unwrap();
        f
    }

    /// `attest --once` with `token` against a scripted agent: the exit and what it saw.
    async fn once_against(answers: Vec<String>, token: &str) -> (Exit, Vec<(Instant, String)>) {
        let (agent, seen) = scripted_agent(answers).await;
        let dir = tempfile::tempdir().unwrap();
        let f = token_file(&dir, token);
        let exit = attest(&config(agent, &f, true), std::future::pending()).await;
        let seen = seen.lock().unwrap().clone();
        (exit, seen)
    }

    #[tokio::test]
    async fn once_presents_the_bearer_token_and_ends_bound() {
        let (exit, seen) = once_against(vec![bound(3600)], "hdr.claims.sig\n").await;
        assert_eq!(exit, Exit::Done);
        assert_eq!(exit.code(), 0);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, "Bearer hdr.claims.sig", "exactly one header");
    }

    #[tokio::test]
    async fn a_rate_limited_presentation_waits_for_retry_after() {
        let rate_limited = answer(
            "429 Too Many Requests",
            "retry-after: 2\r\n",
            r#"{"error":"rate-limited"}"#,
        );
        let (exit, seen) = once_against(vec![rate_limited, bound(3600)], "t.t.t").await;
        assert_eq!(exit, Exit::Done);
        assert_eq!(seen.len(), 2);
        let gap = seen[1].0 - seen[0].0;
        // The first back-off alone would be 0.5-1 s.
        assert!(
            gap >= Duration::from_secs(2) && gap < Duration::from_secs(3),
            "{gap:?}"
        );
    }

    #[tokio::test]
    async fn an_unavailable_agent_is_retried_with_backoff() {
        let unavailable = refused("503 Service Unavailable", "keys-unavailable");
        let (exit, seen) =
            once_against(vec![unavailable.clone(), unavailable, bound(3600)], "t.t.t").await;
        assert_eq!(exit, Exit::Done);
        assert_eq!(seen.len(), 3);
        // 0.5-1 s, then 1-2 s.
        let (first, second) = (seen[1].0 - seen[0].0, seen[2].0 - seen[1].0);
        assert!(first >= Duration::from_millis(500), "{first:?}");
        assert!(second >= Duration::from_secs(1), "{second:?}");
    }

    #[tokio::test]
    async fn a_refusal_ends_with_the_agents_reason_and_what_to_check() {
        let (agent, seen) =
            scripted_agent(vec![refused("401 Unauthorized", "wrong-audience")]).await;
        let dir = tempfile::tempdir().unwrap();
        let f = token_file(&dir, "secret.token.value");
        let exit = attest(&config(agent, &f, false), std::future::pending()).await;
        assert_eq!(
            exit,
            Exit::Refused {
                status: 401,
                reason: "wrong-audience".into()
            }
        );
        assert_eq!(exit.code(), 1);
        assert_eq!(seen.lock().unwrap().len(), 1, "not retried");
        let message = exit.message().unwrap();
        assert!(
            message.contains("wrong-audience") && message.contains("audience must be `enforcer`"),
            "{message}"
        );
        assert!(!message.contains("secret.token.value"));
    }

    #[tokio::test]
    async fn lag_refusals_are_retried_within_the_grace_then_count() {
        let dir = tempfile::tempdir().unwrap();
        let f = token_file(&dir, "t.t.t");
        // The agent learns the pod after two refusals: bound.
        let (exit, seen) = once_against(
            vec![
                refused("401 Unauthorized", "unknown-pod"),
                refused("403 Forbidden", "ip-mismatch"),
                bound(3600),
            ],
            "t.t.t",
        )
        .await;
        assert_eq!(exit, Exit::Done);
        assert_eq!(seen.len(), 3);
        // It never does: refused once the grace is over.
        let (agent, seen) = scripted_agent(vec![refused("403 Forbidden", "ip-mismatch")]).await;
        let cfg = Config {
            grace: Duration::from_secs(2),
            ..config(agent, &f, true)
        };
        let start = Instant::now();
        let exit = attest(&cfg, std::future::pending()).await;
        assert_eq!(exit.code(), 1);
        assert!(exit.message().unwrap().contains("hostNetwork"));
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert!(seen.lock().unwrap().len() >= 2);
    }

    #[tokio::test]
    async fn once_gives_up_after_its_timeout_when_nothing_answers() {
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = closed.local_addr().unwrap();
        drop(closed);
        let dir = tempfile::tempdir().unwrap();
        let f = token_file(&dir, "t.t.t");
        let cfg = Config {
            timeout: Duration::from_secs(2),
            ..config(agent, &f, true)
        };
        let start = Instant::now();
        let exit = attest(&cfg, std::future::pending()).await;
        assert_eq!(exit.code(), 3, "{exit:?}");
        assert!(
            exit.message().unwrap().contains("refused"),
            "names the last failure: {exit:?}"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn the_sidecar_presents_a_rotated_token_at_once() {
        let (agent, seen) = scripted_agent(vec![bound(3600)]).await;
        let dir = tempfile::tempdir().unwrap();
        let f = token_file(&dir, "first.token.x");
        let cfg = config(agent, &f, false);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            attest(&cfg, async {
                let _ = rx.await;
            })
            .await
        });
        let count = || seen.lock().unwrap().len();
        let start = Instant::now();
        while count() < 1 && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count(), 1);
        // Bound for an hour: the next timed presentation is minutes away.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(count(), 1, "no busy loop");
        std::fs::write(&f, "second.token.x").unwrap();
        let rotated = Instant::now();
        while count() < 2 && rotated.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count(), 2);
        assert!(rotated.elapsed() < Duration::from_millis(1500));
        assert_eq!(seen.lock().unwrap()[1].1, "Bearer second.token.x");
        // Asked to stop (SIGTERM in the binary): it ends at once, exit 0.
        tx.send(()).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("stops at once")
            .unwrap();
        assert_eq!(exit, Exit::Done);
    }
}
