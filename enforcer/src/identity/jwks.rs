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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
    /// A URL keys would be fetched from (or an issuer taken from a document) that is refused.
    #[error("{what} {value:?}: {why}")]
    BadUrl {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--issuer-ca-file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("GET {url}: {message}")]
    Http { url: String, message: String },
    #[error(
        "no CA certificate to trust: the system has none; give the issuer's CA with --issuer-ca-file"
    )]
    NoTrustedCa,
}

const NOT_HTTPS: &str = "not an https:// URL (keys are fetched over TLS only)";

/// An `https://` URL with a host, as an issuer or a key URL must be; a query or fragment is
/// refused too when `plain` (an issuer URL has neither: OpenID Connect Discovery 1.0, 3).
pub fn https_url(
    what: &'static str,
    value: &str,
    plain: bool,
) -> Result<axum::http::Uri, KeySourceError> {
    let bad = |why| KeySourceError::BadUrl {
        what,
        value: value.to_string(),
        why,
    };
    let Some(rest) = value.strip_prefix("https://") else {
        return Err(bad(NOT_HTTPS));
    };
    if plain && rest.contains(['?', '#']) {
        return Err(bad("has a query or a fragment"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("has no host (or has user information)"));
    }
    value.parse().map_err(|_| bad("not a valid URL"))
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

    /// Fetch the discovery document only, returning its issuer (checked as [`cluster_issuer`]
    /// checks it).
    pub async fn discover_issuer(&self) -> Result<String, KeySourceError> {
        checked_cluster_issuer(self.discover().await?.issuer)
    }

    async fn discover(&self) -> Result<Discovery, KeySourceError> {
        let d = discovery(&self.api).await?;
        if let Ok(mut g) = self.issuer.lock() {
            *g = Some(d.issuer.clone());
        }
        Ok(d)
    }
}

async fn discovery<G: ApiGet>(api: &G) -> Result<Discovery, KeySourceError> {
    let doc = api.get(DISCOVERY_PATH).await?;
    serde_json::from_slice(&doc).map_err(|e| KeySourceError::Discovery(e.to_string()))
}

/// The cluster's service-account issuer (`--issuer-from-cluster`): the `issuer` of the API
/// server's discovery document, which must be an `https://` URL without query or fragment (as
/// kube-apiserver requires of an issuer it serves discovery for).
pub async fn cluster_issuer<G: ApiGet>(api: &G) -> Result<String, KeySourceError> {
    checked_cluster_issuer(discovery(api).await?.issuer)
}

/// [`cluster_issuer`], asked again after each failure with the back-off of `schedule` until the
/// API server answers with a usable issuer; each failure is logged.
pub async fn cluster_issuer_retrying<G: ApiGet>(api: &G, schedule: RefreshSchedule) -> String {
    let mut failures = 0;
    loop {
        match cluster_issuer(api).await {
            Ok(issuer) => return issuer,
            Err(e) => {
                failures += 1;
                let wait = schedule.delay(failures, jitter_unit());
                tracing::warn!(
                    error = %e,
                    retry_in = ?wait,
                    "identity: the cluster's issuer is not known yet (--issuer-from-cluster); \
                     the attestation endpoint waits for it"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn checked_cluster_issuer(issuer: String) -> Result<String, KeySourceError> {
    https_url(
        "the API server's discovery document names the issuer",
        &issuer,
        true,
    )?;
    Ok(issuer)
}

/// The path (no query or fragment) of an `https://` `jwks_uri`, or of a bare path; only plain
/// path characters, no `..`.
pub fn jwks_path(jwks_uri: &str) -> Option<String> {
    let rest = if let Some(r) = jwks_uri.strip_prefix("https://") {
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
            if d.jwks_uri.starts_with("http://") {
                return Err(KeySourceError::BadUrl {
                    what: "the API server's discovery document has jwks_uri",
                    value: d.jwks_uri,
                    why: NOT_HTTPS,
                });
            }
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

/// Timeout of one HTTPS request of [`IssuerKeySource`] (connect, TLS, response, body).
pub const ISSUER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<axum::body::Bytes>,
>;

/// OIDC discovery at an issuer outside the cluster (`--issuer-discovery`): `GET
/// <issuer>/.well-known/openid-configuration`, then its `jwks_uri`, both over HTTPS only
/// (`http://` is refused, redirects are not followed), trusting the system's CA certificates
/// and those of `--issuer-ca-file`. The document must name the same issuer (OpenID Connect
/// Discovery 1.0, 4.3), so a document served for another issuer is refused.
pub struct IssuerKeySource {
    issuer: String,
    discovery: axum::http::Uri,
    client: HttpsClient,
}

impl IssuerKeySource {
    /// A source for `issuer` (an `https://` URL without query or fragment); `ca_file` is a PEM
    /// bundle of CA certificates trusted besides the system's.
    pub fn new(issuer: &str, ca_file: Option<&std::path::Path>) -> Result<Self, KeySourceError> {
        https_url("--issuer", issuer, true)?;
        let discovery = https_url(
            "--issuer",
            &format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')),
            true,
        )?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| KeySourceError::Http {
            url: issuer.to_string(),
            message: format!("TLS configuration: {e}"),
        })?
        .with_root_certificates(trust_roots(ca_file)?)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(IssuerKeySource {
            issuer: issuer.to_string(),
            discovery,
            client,
        })
    }

    /// GET `url`: 200 and at most [`MAX_DOCUMENT_BYTES`], within [`ISSUER_REQUEST_TIMEOUT`].
    async fn get(&self, url: &axum::http::Uri) -> Result<Vec<u8>, KeySourceError> {
        use http_body_util::BodyExt as _;
        let err = |message: String| KeySourceError::Http {
            url: url.to_string(),
            message,
        };
        let request = axum::http::Request::get(url.clone())
            .header(axum::http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::new())
            .map_err(|e| err(e.to_string()))?;
        let fetch = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| err(format!("{e:#}")))?;
            if response.status() != axum::http::StatusCode::OK {
                return Err(err(format!("answered {}", response.status())));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| err(format!("reading the body: {e}")))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(ISSUER_REQUEST_TIMEOUT, fetch)
            .await
            .map_err(|_| err(format!("no answer within {ISSUER_REQUEST_TIMEOUT:?}")))?
    }
}

/// The system's CA certificates and those of `ca_file`; an error names the file and what is
/// wrong with it, or says that no CA certificate is trusted at all.
fn trust_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, KeySourceError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "identity: reading the system's CA certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let ca_err = |message: String| KeySourceError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let pem = read_capped(path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(format!("not a PEM bundle: {e:?}")))?;
        if certs.is_empty() {
            return Err(ca_err("no CERTIFICATE in it".into()));
        }
        for (n, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("certificate {}: {e}", n + 1)))?;
        }
    }
    if roots.is_empty() {
        return Err(KeySourceError::NoTrustedCa);
    }
    Ok(roots)
}

impl KeySource for IssuerKeySource {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async move {
            let doc = self.get(&self.discovery).await?;
            let d: Discovery = serde_json::from_slice(&doc)
                .map_err(|e| KeySourceError::Discovery(e.to_string()))?;
            if d.issuer != self.issuer {
                return Err(KeySourceError::Discovery(format!(
                    "{} names the issuer {:?}, not {:?}",
                    self.discovery, d.issuer, self.issuer
                )));
            }
            let jwks = https_url(
                "the issuer's discovery document has jwks_uri",
                &d.jwks_uri,
                false,
            )?;
            self.get(&jwks).await
        })
    }

    fn describe(&self) -> String {
        format!("OIDC discovery at {}", self.discovery)
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

/// When a [`KeyStore`] refreshes by itself: every `interval` after a success; after a failure
/// (the previous keys are kept), first after `min_backoff`, then twice as long each time, up to
/// `max_backoff`. Each delay is moved by up to ±`jitter` of itself at random, so the agents of a
/// cluster, started together, do not ask together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshSchedule {
    pub interval: Duration,
    pub jitter: f64,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Default refresh interval of keys fetched over the network.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Default refresh interval of a `--jwks` file (a local read).
pub const DEFAULT_FILE_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

impl RefreshSchedule {
    /// `interval` with ±10 % jitter, back-off from 1 s up to `interval` or 5 min, whichever is
    /// shorter.
    pub fn every(interval: Duration) -> RefreshSchedule {
        RefreshSchedule {
            interval,
            jitter: 0.1,
            min_backoff: Duration::from_secs(1).min(interval),
            max_backoff: interval.min(Duration::from_secs(300)),
        }
    }

    /// The delay before the next refresh after `failures` consecutive failures (0: the last
    /// refresh succeeded); `unit` in [0, 1] places it in the jitter (0.5: none).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let base = if failures == 0 {
            self.interval
        } else {
            let doublings = (failures - 1).min(20);
            self.min_backoff
                .saturating_mul(1 << doublings)
                .min(self.max_backoff)
        };
        let jitter = self.jitter.clamp(0.0, 1.0) * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(1.0 + jitter)
    }
}

impl Default for RefreshSchedule {
    fn default() -> Self {
        RefreshSchedule::every(DEFAULT_REFRESH_INTERVAL)
    }
}

/// A number in [0, 1) that differs between calls and between processes, for jitter (std's
/// randomly keyed hasher; no randomness crate needed for this).
fn jitter_unit() -> f64 {
    use std::hash::BuildHasher as _;
    let r = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// The current key set, refreshed from a [`KeySource`]. A successful refresh replaces the whole
/// set: a key removed from the JWKS stops verifying at once. A failed refresh keeps the previous
/// set. Refreshes happen on the [`RefreshSchedule`] ([`KeyStore::spawn_refresher`]), and when a
/// token names an unknown kid: at most once per `min_refresh_interval`, and, while refreshes
/// fail, no sooner than the schedule's back-off.
pub struct KeyStore {
    source: Arc<dyn KeySource>,
    current: RwLock<Arc<Jwks>>,
    loaded: AtomicBool,
    /// Last document, also serializing refreshes.
    last_doc: tokio::sync::Mutex<Option<Vec<u8>>>,
    last_attempt: Mutex<Option<Instant>>,
    /// Consecutive failed refreshes.
    failures: AtomicU32,
    min_refresh_interval: Duration,
    schedule: RefreshSchedule,
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
            failures: AtomicU32::new(0),
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            schedule: RefreshSchedule::default(),
            metrics: None,
        }
    }

    pub fn with_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    pub fn with_schedule(mut self, schedule: RefreshSchedule) -> Self {
        self.schedule = schedule;
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

    /// Consecutive failed refreshes (0 after a success).
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    fn last_attempt(&self) -> Option<Instant> {
        match self.last_attempt.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Fetch and install the current document (unconditionally; not rate limited).
    pub async fn refresh(&self) -> Result<Refresh, KeySourceError> {
        let mut last = self.last_doc.lock().await;
        if let Ok(mut g) = self.last_attempt.lock() {
            *g = Some(Instant::now());
        }
        let result = self.refresh_locked(&mut last).await;
        if result.is_ok() {
            self.failures.store(0, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
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
    /// less than `min_refresh_interval` ago, or, while refreshes fail, less than the schedule's
    /// back-off ago. Returns whether a refresh installed a new key set.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        {
            let Ok(mut g) = self.last_attempt.lock() else {
                return false;
            };
            let failures = self.failures();
            let wait = if failures == 0 {
                self.min_refresh_interval
            } else {
                self.min_refresh_interval
                    .max(self.schedule.delay(failures, 0.5))
            };
            if let Some(t) = *g
                && t.elapsed() < wait
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

    /// Refresh in the background on the store's [`RefreshSchedule`], counted from the last
    /// attempt (one for an unknown kid included); failures are logged and keep the old keys.
    pub fn spawn_refresher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let last = self.last_attempt();
                let delay = self.schedule.delay(self.failures(), jitter_unit());
                tokio::time::sleep_until(last.map_or_else(Instant::now, |t| t + delay)).await;
                if self.last_attempt() != last {
                    continue;
                }
                if let Err(e) = self.refresh().await {
                    tracing::warn!(
                        error = %e,
                        failures = self.failures(),
                        source = %self.source.describe(),
                        "identity: key refresh failed; keeping the previous keys"
                    );
                }
            }
        })
    }
}

/// base64url without padding, as used in JWS.
pub(crate) const B64URL: GeneralPurpose = general_purpose::URL_SAFE_NO_PAD;

#[cfg(test)]
mod refresh_tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::identity::testing::TestIssuer;

    /// Counts fetches; fails while `failing` is set.
    struct Counting {
        doc: Vec<u8>,
        calls: AtomicUsize,
        failing: AtomicBool,
    }

    impl Counting {
        fn new(failing: bool) -> Arc<Counting> {
            Arc::new(Counting {
                doc: TestIssuer::new().jwks_json().into_bytes(),
                calls: AtomicUsize::new(0),
                failing: AtomicBool::new(failing),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl KeySource for Counting {
        fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.failing.load(Ordering::SeqCst) {
                    return Err(KeySourceError::Http {
                        url: "https://issuer.test/keys".into(),
                        message: "down".into(),
                    });
                }
                Ok(self.doc.clone())
            })
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    #[test]
    fn the_schedule_backs_off_doubling_to_its_cap_and_jitters_both_ways() {
        let s = RefreshSchedule::every(Duration::from_secs(600));
        assert_eq!(s.delay(0, 0.5), Duration::from_secs(600));
        assert_eq!(s.delay(0, 0.0), Duration::from_secs(540));
        assert_eq!(s.delay(0, 1.0), Duration::from_secs(660));
        let backoff: Vec<u64> = (1..=12).map(|f| s.delay(f, 0.5).as_secs()).collect();
        assert_eq!(
            backoff,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300],
            "1 s doubling, capped at 5 min"
        );
        assert_eq!(s.delay(u32::MAX, 0.5), Duration::from_secs(300));
        // A short interval caps the back-off at itself.
        let file = RefreshSchedule::every(Duration::from_secs(5));
        assert_eq!(file.delay(10, 0.5), Duration::from_secs(5));
        let a = jitter_unit();
        assert!((0.0..1.0).contains(&a));
    }

    /// No jitter, so the times are exact.
    fn steady(interval: u64) -> RefreshSchedule {
        RefreshSchedule {
            jitter: 0.0,
            ..RefreshSchedule::every(Duration::from_secs(interval))
        }
    }

    /// Virtual time: the refresher asks every interval; when the source fails it retries with
    /// back-off, keeping the keys it has, and once the source answers again it goes back to
    /// the interval.
    #[tokio::test(start_paused = true)]
    async fn the_refresher_backs_off_on_failure_then_asks_every_interval() {
        let source = Counting::new(false);
        let store = Arc::new(KeyStore::new(source.clone()).with_schedule(steady(600)));
        store.refresh().await.unwrap();
        let keys = store.keys().len();
        source.failing.store(true, Ordering::SeqCst);
        let task = store.clone().spawn_refresher();
        let at = |secs: f64| tokio::time::sleep(Duration::from_secs_f64(secs));
        at(599.5).await;
        assert_eq!(source.calls(), 1, "nothing before the interval");
        at(1.0).await;
        assert_eq!(source.calls(), 2, "one refresh at 600 s");
        // It failed: again at 601, 603, 607, 615 s.
        at(15.0).await;
        assert_eq!((source.calls(), store.failures()), (6, 5));
        assert_eq!(store.keys().len(), keys, "the previous keys are kept");
        source.failing.store(false, Ordering::SeqCst);
        // 16 s later (631 s) it succeeds; then every 600 s: 1231, 1831, ..., 4231 s.
        at(16.0).await;
        assert_eq!((source.calls(), store.failures()), (7, 0));
        at(3600.0).await;
        assert_eq!(source.calls(), 13);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kids_do_not_refresh_faster_than_the_failure_back_off() {
        let source = Counting::new(true);
        let store = KeyStore::new(source.clone())
            .with_min_refresh_interval(Duration::from_secs(1))
            .with_schedule(steady(600));
        // A flood of tokens naming unknown kids, one every 100 ms for 60 s, while the source
        // is down: refreshes at 0, 1, 3, 7, 15 and 31 s (back-off), not every second.
        for _ in 0..600 {
            store.refresh_for_unknown_kid().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(source.calls(), 6);
        // Once the source answers, an unknown kid may refresh again once a second.
        source.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(store.refresh_for_unknown_kid().await);
        let before = source.calls();
        store.refresh_for_unknown_kid().await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        store.refresh_for_unknown_kid().await;
        assert_eq!(source.calls(), before + 1);
    }
}

#[cfg(test)]
mod url_tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn issuers_and_key_urls_must_be_https() {
        for (value, why) in [
            ("http://issuer.example", NOT_HTTPS),
            ("issuer.example", NOT_HTTPS),
            ("https://issuer.example/?a=1", "has a query or a fragment"),
            ("https://issuer.example/#f", "has a query or a fragment"),
            ("https:///path", "has no host (or has user information)"),
            (
                "https://user@issuer.example",
                "has no host (or has user information)",
            ),
        ] {
            let e = https_url("--issuer", value, true).unwrap_err();
            assert_eq!(e.to_string(), format!("--issuer {value:?}: {why}"));
        }
        assert!(https_url("--issuer", "https://issuer.example/id/1", true).is_ok());
        assert!(https_url("jwks_uri", "https://issuer.example/keys?v=2", false).is_ok());
        assert_eq!(
            jwks_path("http://kubernetes.default.svc/openid/v1/jwks"),
            None
        );
        let e = IssuerKeySource::new("http://issuer.example", None)
            .err()
            .expect("http issuer refused");
        assert!(e.to_string().contains("\"http://issuer.example\""), "{e}");
    }

    /// An API server whose documents are given by path.
    struct Docs(HashMap<&'static str, String>);

    impl ApiGet for Docs {
        fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, KeySourceError>> {
            let doc = self.0.get(path).cloned();
            Box::pin(async move {
                doc.map(String::into_bytes).ok_or(KeySourceError::Api {
                    path: path.into(),
                    message: "404".into(),
                })
            })
        }
    }

    fn discovery(issuer: &str, jwks_uri: &str) -> Docs {
        Docs(HashMap::from([
            (
                DISCOVERY_PATH,
                serde_json::json!({"issuer": issuer, "jwks_uri": jwks_uri}).to_string(),
            ),
            ("/openid/v1/jwks", r#"{"keys": []}"#.to_string()),
        ]))
    }

    #[tokio::test]
    async fn the_api_server_s_jwks_uri_must_be_https() {
        let source = OidcKeySource::new(discovery(
            "https://kubernetes.default.svc",
            "http://kubernetes.default.svc/openid/v1/jwks",
        ));
        let e = source.fetch().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the API server's discovery document has jwks_uri \"http://kubernetes.default.svc/openid/v1/jwks\": {NOT_HTTPS}"
            )
        );
    }

    /// `--issuer-from-cluster` through a real `kube::Client` against kube-rs's mocked API
    /// service: the first answer is an error (asked again after the back-off), the second the
    /// discovery document.
    #[tokio::test(start_paused = true)]
    async fn the_cluster_issuer_is_read_through_the_kube_client_until_it_answers() {
        use axum::http::{Request, Response};
        use kube::client::Body;
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("first request");
            assert_eq!(req.uri().path(), DISCOVERY_PATH);
            send.send_response(
                Response::builder()
                    .status(503)
                    .body(Body::from(b"unavailable".to_vec()))
                    .unwrap(),
            );
            let (req, send) = handle.next_request().await.expect("second request");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("GET", DISCOVERY_PATH)
            );
            let doc = serde_json::json!({
                "issuer": "https://kubernetes.default.svc.cluster.local",
                "jwks_uri": "https://172.18.0.2:6443/openid/v1/jwks",
            });
            send.send_response(Response::new(Body::from(doc.to_string().into_bytes())));
        });
        let started = tokio::time::Instant::now();
        let issuer =
            cluster_issuer_retrying(&client, RefreshSchedule::every(Duration::from_secs(60))).await;
        assert_eq!(issuer, "https://kubernetes.default.svc.cluster.local");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "backed off"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_cluster_issuer_must_be_a_plain_https_url() {
        for (issuer, ok) in [
            ("https://kubernetes.default.svc.cluster.local", true),
            ("https://oidc.example.com/id/ABC", true),
            ("http://kubernetes.default.svc", false),
            ("https://kubernetes.default.svc?x=1", false),
            ("kubernetes/serviceaccount", false),
        ] {
            let api = discovery(issuer, "https://x/openid/v1/jwks");
            let got = cluster_issuer(&api).await;
            assert_eq!(got.is_ok(), ok, "{issuer}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains(issuer), "{e}");
            }
        }
    }
}
