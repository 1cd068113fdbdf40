//! Verification keys: a JWKS document parsed into `kid -> (pinned algorithm, public key)`, the
//! sources it comes from (`--jwks FILE`, or the API server's OIDC discovery), and a [`KeyStore`]
//! that refreshes it so a key rotation needs no restart.
//!
//! Key selection rules (identity.md section 3): only `use: sig` (or no `use`) asymmetric keys with
//! a `kid`; `oct` (HMAC) keys are dropped, because `DecodingKey::from_jwk` would turn them into an
//! HMAC key; each kid's algorithm is pinned from the JWK (`kty`/`crv`/`alg`), never from a token
//! header. A kid that appears twice is dropped entirely (ambiguous).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::time::Instant;

use super::metrics::IdentityMetrics;

/// Largest JWKS / discovery document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 256;
/// Longest `kid` accepted (K8s kids are 43 characters).
pub const MAX_KID_LEN: usize = 256;
/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// base64url, padding optional (JWKS producers differ); strict on the alphabet.
const B64_JWK: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One usable verification key.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: String,
    /// The only algorithm this key verifies.
    pub alg: Algorithm,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// A key of the document that was not kept, and why (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    pub kid: Option<String>,
    pub why: &'static str,
}

/// A parsed JWKS: the usable keys by kid.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, VerificationKey>,
    skipped: Vec<SkippedKey>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum JwksError {
    #[error("JWKS document larger than {MAX_DOCUMENT_BYTES} bytes")]
    Oversized,
    #[error("JWKS document is not valid JSON with a \"keys\" array: {0}")]
    Json(String),
    #[error("JWKS document has more than {MAX_KEYS} keys")]
    TooManyKeys,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl Jwks {
    /// An empty key set (verifies nothing).
    pub fn empty() -> Jwks {
        Jwks::default()
    }

    /// Parse a JWKS document. Unusable keys are skipped (see [`Jwks::skipped`]), not errors; a
    /// document that is not JSON with a `keys` array is an error.
    pub fn parse(doc: &[u8]) -> Result<Jwks, JwksError> {
        if doc.len() > MAX_DOCUMENT_BYTES {
            return Err(JwksError::Oversized);
        }
        let raw: RawJwks =
            serde_json::from_slice(doc).map_err(|e| JwksError::Json(e.to_string()))?;
        if raw.keys.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys);
        }
        let mut keys: HashMap<String, VerificationKey> = HashMap::new();
        let mut duplicates: Vec<String> = Vec::new();
        let mut skipped = Vec::new();
        for value in raw.keys {
            match parse_key(value) {
                Ok(key) => {
                    if keys.contains_key(&key.kid) || duplicates.contains(&key.kid) {
                        keys.remove(&key.kid);
                        if !duplicates.contains(&key.kid) {
                            duplicates.push(key.kid.clone());
                        }
                    } else {
                        keys.insert(key.kid.clone(), key);
                    }
                }
                Err(s) => skipped.push(s),
            }
        }
        for kid in duplicates {
            skipped.push(SkippedKey {
                kid: Some(kid),
                why: "duplicate-kid",
            });
        }
        Ok(Jwks { keys, skipped })
    }

    pub fn get(&self, kid: &str) -> Option<&VerificationKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Kids of the usable keys, sorted.
    pub fn kids(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Keys of the document that were not kept, with the reason.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }
}

fn b64(s: &Option<String>) -> Option<Vec<u8>> {
    s.as_deref().and_then(|s| B64_JWK.decode(s).ok())
}

fn parse_key(value: serde_json::Value) -> Result<VerificationKey, SkippedKey> {
    let kid_hint = value.get("kid").and_then(|k| k.as_str()).map(|s| {
        let mut s = s.to_string();
        s.truncate(MAX_KID_LEN);
        s
    });
    let skip = |why: &'static str| SkippedKey {
        kid: kid_hint.clone(),
        why,
    };
    let raw: RawJwk = serde_json::from_value(value).map_err(|_| skip("invalid-jwk"))?;
    let kid = match raw.kid.as_deref() {
        Some(k) if !k.is_empty() && k.len() <= MAX_KID_LEN => k.to_string(),
        _ => return Err(skip("no-kid")),
    };
    if raw.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err(skip("not-for-signing"));
    }
    if raw
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
    {
        return Err(skip("not-for-signing"));
    }
    let (alg, key) = match raw.kty.as_str() {
        "RSA" => {
            let alg = match raw.alg.as_deref() {
                None | Some("RS256") => Algorithm::RS256,
                Some("RS384") => Algorithm::RS384,
                Some("RS512") => Algorithm::RS512,
                Some("PS256") => Algorithm::PS256,
                Some("PS384") => Algorithm::PS384,
                Some("PS512") => Algorithm::PS512,
                Some(_) => return Err(skip("alg-unsupported")),
            };
            let (n, e) = match (b64(&raw.n), b64(&raw.e)) {
                (Some(n), Some(e)) => (n, e),
                _ => return Err(skip("invalid-jwk")),
            };
            let n_trim: &[u8] = {
                let start = n.iter().position(|b| *b != 0).unwrap_or(n.len());
                &n[start..]
            };
            let bits = match n_trim.first() {
                None => 0,
                Some(b) => n_trim.len() * 8 - b.leading_zeros() as usize,
            };
            if bits < MIN_RSA_BITS {
                return Err(skip("weak-key"));
            }
            // Validates exponent and size limits (at most 4096 bits) up front.
            rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n_trim),
                rsa::BigUint::from_bytes_be(&e),
            )
            .map_err(|_| skip("invalid-jwk"))?;
            (alg, DecodingKey::from_rsa_raw_components(n_trim, &e))
        }
        "EC" => {
            let (alg, len) = match raw.crv.as_deref() {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                // P-521 / ES512 is not supported by jsonwebtoken.
                _ => return Err(skip("alg-unsupported")),
            };
            let alg_name = match alg {
                Algorithm::ES256 => "ES256",
                _ => "ES384",
            };
            if raw.alg.as_deref().is_some_and(|a| a != alg_name) {
                return Err(skip("alg-mismatch"));
            }
            let (x, y) = match (b64(&raw.x), b64(&raw.y)) {
                (Some(x), Some(y)) if x.len() == len && y.len() == len => (x, y),
                _ => return Err(skip("invalid-jwk")),
            };
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if alg == Algorithm::ES256 && p256::PublicKey::from_sec1_bytes(&point).is_err() {
                return Err(skip("invalid-jwk"));
            }
            // The rust_crypto ECDSA verifier takes the SEC1 uncompressed point.
            (alg, DecodingKey::from_ec_der(&point))
        }
        "oct" => return Err(skip("symmetric")),
        _ => return Err(skip("kty-unsupported")),
    };
    Ok(VerificationKey { kid, alg, key })
}

/// Why a key source could not produce a document.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Jwks(#[from] JwksError),
    #[error("API server request {path} failed: {message}")]
    Api { path: String, message: String },
    #[error("OIDC discovery document invalid: {0}")]
    Discovery(String),
}

/// Where the JWKS comes from.
pub trait KeySource: Send + Sync {
    /// Fetch the current JWKS document (raw bytes; the [`KeyStore`] parses it).
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>>;
    /// For logs.
    fn describe(&self) -> String;
}

/// `--jwks FILE`: the file is re-read on every poll of the [`KeyStore`] refresher; the store
/// re-parses only when the contents changed (so an mtime-preserving or same-second rewrite is
/// still noticed, and an unchanged file costs one small read).
#[derive(Debug, Clone)]
pub struct FileKeySource {
    path: PathBuf,
}

impl FileKeySource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileKeySource { path: path.into() }
    }
}

impl KeySource for FileKeySource {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async move {
            let path = self.path.clone();
            // Small file; read off the async threads (tokio's `fs` feature is not enabled).
            tokio::task::spawn_blocking(move || read_capped(&path))
                .await
                .map_err(|e| KeySourceError::Io {
                    path: self.path.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?
        })
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

fn read_capped(path: &std::path::Path) -> Result<Vec<u8>, KeySourceError> {
    use std::io::Read;
    let io = |source| KeySourceError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(JwksError::Oversized.into());
    }
    Ok(bytes)
}

/// A GET against the API server, by absolute path. Implemented for [`kube::Client`]; a fake in
/// tests.
pub trait ApiGet: Send + Sync {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, KeySourceError>>;
}

impl ApiGet for kube::Client {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async move {
            let api_err = |message: String| KeySourceError::Api {
                path: path.to_string(),
                message,
            };
            let req = axum::http::Request::get(path)
                .header(axum::http::header::ACCEPT, "application/json")
                .body(Vec::new())
                .map_err(|e| api_err(e.to_string()))?;
            let text = self
                .request_text(req)
                .await
                .map_err(|e| api_err(e.to_string()))?;
            if text.len() > MAX_DOCUMENT_BYTES {
                return Err(JwksError::Oversized.into());
            }
            Ok(text.into_bytes())
        })
    }
}

/// Path of the discovery document on the API server.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// OIDC discovery through the API server: `GET /.well-known/openid-configuration`, then the
/// *path* of its `jwks_uri` on the same API server (the advertised host may be an external URL
/// the node cannot reach; taking only the path also means we never fetch from a host named by a
/// document). Both URLs are readable by every service account (bootstrap ClusterRoleBinding
/// `system:service-account-issuer-discovery`).
pub struct OidcKeySource<G: ApiGet = kube::Client> {
    api: G,
    issuer: Mutex<Option<String>>,
}

impl<G: ApiGet> OidcKeySource<G> {
    pub fn new(api: G) -> Self {
        OidcKeySource {
            api,
            issuer: Mutex::new(None),
        }
    }

    /// The `issuer` of the last discovery document (the API server's first
    /// `--service-account-issuer`); a default for the verifier's issuer list.
    pub fn discovered_issuer(&self) -> Option<String> {
        self.issuer.lock().ok().and_then(|g| g.clone())
    }

    /// Fetch the discovery document only, returning its issuer.
    pub async fn discover_issuer(&self) -> Result<String, KeySourceError> {
        Ok(self.discover().await?.issuer)
    }

    async fn discover(&self) -> Result<Discovery, KeySourceError> {
        let doc = self.api.get(DISCOVERY_PATH).await?;
        let d: Discovery =
            serde_json::from_slice(&doc).map_err(|e| KeySourceError::Discovery(e.to_string()))?;
        if let Ok(mut g) = self.issuer.lock() {
            *g = Some(d.issuer.clone());
        }
        Ok(d)
    }
}

/// The path (no query or fragment) of a `jwks_uri`; only plain path characters, no `..`.
pub fn jwks_path(jwks_uri: &str) -> Option<String> {
    let rest = if let Some(r) = jwks_uri
        .strip_prefix("https://")
        .or_else(|| jwks_uri.strip_prefix("http://"))
    {
        &r[r.find('/')?..]
    } else if jwks_uri.starts_with('/') {
        jwks_uri
    } else {
        return None;
    };
    let path = rest.split(['?', '#']).next().unwrap_or("");
    let ok_chars = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~'));
    if !path.starts_with('/') || path.starts_with("//") || path.contains("..") || !ok_chars {
        return None;
    }
    Some(path.to_string())
}

impl<G: ApiGet> KeySource for OidcKeySource<G> {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async move {
            let d = self.discover().await?;
            let path = jwks_path(&d.jwks_uri).ok_or_else(|| {
                KeySourceError::Discovery(format!("unusable jwks_uri {:?}", d.jwks_uri))
            })?;
            self.api.get(&path).await
        })
    }

    fn describe(&self) -> String {
        format!("OIDC discovery via the API server ({DISCOVERY_PATH})")
    }
}

/// What a refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// New key set installed.
    Updated,
    /// The document did not change.
    Unchanged,
}

/// The current key set, refreshed from a [`KeySource`]. A successful refresh replaces the whole
/// set: a key removed from the JWKS stops verifying at once. A failed refresh keeps the previous
/// set. An unknown kid may trigger one refresh, at most once per `min_refresh_interval`.
pub struct KeyStore {
    source: Arc<dyn KeySource>,
    current: RwLock<Arc<Jwks>>,
    loaded: AtomicBool,
    /// Last document, also serializing refreshes.
    last_doc: tokio::sync::Mutex<Option<Vec<u8>>>,
    last_attempt: Mutex<Option<Instant>>,
    min_refresh_interval: Duration,
    metrics: Option<Arc<IdentityMetrics>>,
}

/// Default minimum time between two refreshes triggered by unknown kids.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

impl KeyStore {
    /// A store with no keys yet (everything is rejected with `keys-unavailable` until the first
    /// successful [`KeyStore::refresh`]).
    pub fn new(source: Arc<dyn KeySource>) -> Self {
        KeyStore {
            source,
            current: RwLock::new(Arc::new(Jwks::empty())),
            loaded: AtomicBool::new(false),
            last_doc: tokio::sync::Mutex::new(None),
            last_attempt: Mutex::new(None),
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            metrics: None,
        }
    }

    pub fn with_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<IdentityMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<Jwks> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether a key set has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Fetch and install the current document (unconditionally; not rate limited).
    pub async fn refresh(&self) -> Result<Refresh, KeySourceError> {
        let mut last = self.last_doc.lock().await;
        if let Ok(mut g) = self.last_attempt.lock() {
            *g = Some(Instant::now());
        }
        let result = self.refresh_locked(&mut last).await;
        if let Some(m) = &self.metrics {
            m.record_key_refresh(result.is_ok(), self.keys().len());
        }
        result
    }

    async fn refresh_locked(&self, last: &mut Option<Vec<u8>>) -> Result<Refresh, KeySourceError> {
        let doc = self.source.fetch().await?;
        if last.as_deref() == Some(doc.as_slice()) && self.is_loaded() {
            return Ok(Refresh::Unchanged);
        }
        let jwks = Jwks::parse(&doc)?;
        for s in jwks.skipped() {
            tracing::warn!(kid = ?s.kid, why = s.why, source = %self.source.describe(), "identity: JWKS key skipped");
        }
        tracing::info!(keys = ?jwks.kids(), source = %self.source.describe(), "identity: verification keys loaded");
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(jwks),
            Err(p) => *p.into_inner() = Arc::new(jwks),
        }
        self.loaded.store(true, Ordering::Release);
        *last = Some(doc);
        Ok(Refresh::Updated)
    }

    /// Refresh because a token named an unknown kid, unless a refresh happened (or was tried)
    /// less than `min_refresh_interval` ago. Returns whether a refresh installed a new key set.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        {
            let Ok(mut g) = self.last_attempt.lock() else {
                return false;
            };
            if let Some(t) = *g
                && t.elapsed() < self.min_refresh_interval
            {
                return false;
            }
            // Claim the slot before awaiting so concurrent callers do not all refresh.
            *g = Some(Instant::now());
        }
        match self.refresh().await {
            Ok(Refresh::Updated) => true,
            Ok(Refresh::Unchanged) => false,
            Err(e) => {
                tracing::warn!(error = %e, "identity: key refresh failed");
                false
            }
        }
    }

    /// Refresh every `every` in the background (logs failures, keeps the old keys on failure).
    pub fn spawn_refresher(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, source = %self.source.describe(), "identity: key refresh failed");
                }
            }
        })
    }
}

/// base64url without padding, as used in JWS.
pub(crate) const B64URL: GeneralPurpose = general_purpose::URL_SAFE_NO_PAD;
