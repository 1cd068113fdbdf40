//! Token verification, modelled on kube-apiserver's service-account authenticator
//! (`pkg/serviceaccount/jwt.go`, `claims.go`) and stricter where that costs nothing:
//!
//! 1. size limit before any parsing; compact JWS shape (three non-empty base64url segments);
//! 2. header parsed by us: `alg` must be an asymmetric algorithm the API server may use
//!    (RS256/384/512, PS256/384/512, ES256/384), `jku`/`jwk`/`x5u`/`x5c`/`crit` are refused,
//!    `kid` is required and selects the key; the header `alg` must equal the key's pinned alg;
//! 3. `jsonwebtoken::decode` with a `Validation` built from the *key's* algorithm: signature,
//!    then `exp`/`iss`/`aud`/`sub` presence and `iss`/`aud` membership (defence in depth);
//! 4. our own checks on strictly typed claims with an injected clock: `exp`/`nbf`/`iat` with
//!    leeway (go-jose semantics: expired iff `now - leeway > exp`, not yet valid iff
//!    `now + leeway < nbf`, issued in the future iff `now + leeway < iat`), maximum lifetime,
//!    `sub == system:serviceaccount:<ns>:<sa>` matching the `kubernetes.io` claim, pod binding.
//!
//! Errors are [`Reason`]s only: no token material ever ends up in an error or a log.

use std::collections::HashSet;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::jwks::{B64URL, Jwks, MAX_KID_LEN};
use super::{Reason, VerifiedIdentity};

/// Default audience a workload must request for its projected token.
pub const DEFAULT_AUDIENCE: &str = "enforcer";
/// Default token size limit.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock-skew leeway for `exp`/`nbf`/`iat` (go-jose `DefaultLeeway`).
pub const DEFAULT_LEEWAY_SECS: u64 = 60;
/// Default maximum `exp - iat`: kubelet rotates projected tokens at least daily; a longer-lived
/// token (e.g. the 1-year "extended" API-audience token) is refused.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 24 * 3600;

/// Verifier settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Accepted `iss` values (all of the API server's `--service-account-issuer`s).
    pub issuers: Vec<String>,
    /// Accepted audiences; the token's `aud` must contain one of them.
    pub audiences: Vec<String>,
    pub leeway_secs: u64,
    pub max_token_bytes: usize,
    /// Maximum `exp - iat`; `None` = unlimited.
    pub max_lifetime_secs: Option<u64>,
}

impl VerifierConfig {
    /// Defaults (audience `enforcer`, 60 s leeway, 16 KiB, 24 h) for the given issuers.
    pub fn new(issuers: Vec<String>) -> Self {
        VerifierConfig {
            issuers,
            audiences: vec![DEFAULT_AUDIENCE.to_string()],
            leeway_secs: DEFAULT_LEEWAY_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            max_lifetime_secs: Some(DEFAULT_MAX_LIFETIME_SECS),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("identity: at least one issuer is required")]
    NoIssuer,
    #[error("identity: at least one audience is required")]
    NoAudience,
    #[error("identity: empty issuer or audience string")]
    Empty,
}

/// A verified token: the identity plus facts useful for logs and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub identity: VerifiedIdentity,
    pub service_account_uid: String,
    /// `kubernetes.io.node.name` (informational: kube-apiserver does not verify it).
    pub node_name: Option<String>,
    pub issued_at: u64,
    /// `jti`, safe to log (it identifies, it does not authenticate).
    pub jti: Option<String>,
    pub kid: String,
}

/// Verifies service-account tokens against a key set.
#[derive(Debug, Clone)]
pub struct Verifier {
    config: VerifierConfig,
    issuers: HashSet<String>,
    audiences: HashSet<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    jku: Option<IgnoredAny>,
    jwk: Option<IgnoredAny>,
    x5u: Option<IgnoredAny>,
    x5c: Option<IgnoredAny>,
    crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct NameUid {
    name: Option<String>,
    uid: Option<String>,
}

#[derive(Deserialize)]
struct K8sClaim {
    namespace: Option<String>,
    serviceaccount: Option<NameUid>,
    pod: Option<NameUid>,
    node: Option<NameUid>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    jti: Option<String>,
    #[serde(rename = "kubernetes.io")]
    k8s: Option<K8sClaim>,
}

fn alg_from_header(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

fn map_jwt_error(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => Reason::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Reason::AlgMismatch,
        ErrorKind::MissingRequiredClaim(_) => Reason::MissingClaim,
        ErrorKind::InvalidClaimFormat(_) => Reason::InvalidClaim,
        ErrorKind::InvalidIssuer => Reason::WrongIssuer,
        ErrorKind::InvalidAudience => Reason::WrongAudience,
        ErrorKind::InvalidSubject => Reason::SubjectMismatch,
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::Json(e) if e.is_data() => Reason::InvalidClaim,
        _ => Reason::Malformed,
    }
}

/// A DNS-1123 label (namespace).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (service account, pod, node names).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn required(v: Option<String>) -> Result<String, Reason> {
    v.ok_or(Reason::MissingClaim)
}

fn b64url_charset(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

impl Verifier {
    pub fn new(config: VerifierConfig) -> Result<Verifier, ConfigError> {
        if config.issuers.is_empty() {
            return Err(ConfigError::NoIssuer);
        }
        if config.audiences.is_empty() {
            return Err(ConfigError::NoAudience);
        }
        if config
            .issuers
            .iter()
            .chain(&config.audiences)
            .any(|s| s.is_empty())
        {
            return Err(ConfigError::Empty);
        }
        Ok(Verifier {
            issuers: config.issuers.iter().cloned().collect(),
            audiences: config.audiences.iter().cloned().collect(),
            config,
        })
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Verify `token` against `keys` at time `now` (unix seconds). Pure: no I/O.
    pub fn verify(&self, token: &str, keys: &Jwks, now: u64) -> Result<VerifiedToken, Reason> {
        // 1. Size and shape, before any parsing.
        if token.len() > self.config.max_token_bytes {
            return Err(Reason::Oversized);
        }
        let bytes = token.as_bytes();
        if !bytes.iter().all(|b| b64url_charset(*b) || *b == b'.') {
            return Err(Reason::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reason::Malformed);
        };
        // An empty signature is refused after the header check, so `alg: none` is reported as
        // such.
        if header_b64.is_empty() || payload_b64.is_empty() {
            return Err(Reason::Malformed);
        }

        // 2. Header (unverified: used only to pick the key and to refuse what we never accept).
        let header_json = B64URL.decode(header_b64).map_err(|_| Reason::Malformed)?;
        let header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| Reason::Malformed)?;
        let header_alg = alg_from_header(&header.alg).ok_or(Reason::AlgNotAllowed)?;
        if header.jku.is_some()
            || header.jwk.is_some()
            || header.x5u.is_some()
            || header.x5c.is_some()
            || header.crit.is_some()
        {
            return Err(Reason::ForbiddenHeader);
        }
        if sig_b64.is_empty() {
            return Err(Reason::Malformed);
        }
        let kid = match header.kid {
            Some(k) if !k.is_empty() => k,
            _ => return Err(Reason::MissingKid),
        };
        if keys.is_empty() {
            return Err(Reason::KeysUnavailable);
        }
        if kid.len() > MAX_KID_LEN {
            return Err(Reason::UnknownKid);
        }
        let key = keys.get(&kid).ok_or(Reason::UnknownKid)?;
        if key.alg != header_alg {
            return Err(Reason::AlgMismatch);
        }

        // 3. Signature and registered claims, with the key's pinned algorithm only.
        let mut validation = Validation::new(key.alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.config.leeway_secs;
        // Time checks are ours (injected clock, iat, leeway semantics of go-jose).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = true;
        validation.set_audience(&self.config.audiences);
        validation.set_issuer(&self.config.issuers);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        let c = data.claims;

        // 4. Our checks on the typed claims.
        let iss = required(c.iss)?;
        if !self.issuers.contains(&iss) {
            return Err(Reason::WrongIssuer);
        }
        let aud_ok = match c.aud.ok_or(Reason::MissingClaim)? {
            Audience::One(a) => self.audiences.contains(&a),
            Audience::Many(list) => list.iter().any(|a| self.audiences.contains(a)),
        };
        if !aud_ok {
            return Err(Reason::WrongAudience);
        }
        let exp = c.exp.ok_or(Reason::MissingClaim)?;
        let iat = c.iat.ok_or(Reason::MissingClaim)?;
        let leeway = self.config.leeway_secs;
        if now.saturating_sub(leeway) > exp {
            return Err(Reason::Expired);
        }
        if let Some(nbf) = c.nbf
            && now.saturating_add(leeway) < nbf
        {
            return Err(Reason::NotYetValid);
        }
        if now.saturating_add(leeway) < iat {
            return Err(Reason::IssuedInFuture);
        }
        if exp <= iat {
            return Err(Reason::InvalidClaim);
        }
        if let Some(max) = self.config.max_lifetime_secs
            && exp - iat > max
        {
            return Err(Reason::LifetimeTooLong);
        }

        let sub = required(c.sub)?;
        let k8s = c.k8s.ok_or(Reason::MissingClaim)?;
        let namespace = required(k8s.namespace)?;
        let sa = k8s.serviceaccount.ok_or(Reason::MissingClaim)?;
        let sa_name = required(sa.name)?;
        let sa_uid = required(sa.uid)?;
        if !is_dns_label(&namespace) || !is_dns_subdomain(&sa_name) || !is_uid(&sa_uid) {
            return Err(Reason::InvalidClaim);
        }
        if sub != format!("system:serviceaccount:{namespace}:{sa_name}") {
            return Err(Reason::SubjectMismatch);
        }
        let pod = k8s.pod.ok_or(Reason::NotPodBound)?;
        let pod_name = required(pod.name)?;
        let pod_uid = required(pod.uid)?;
        if !is_dns_subdomain(&pod_name) || !is_uid(&pod_uid) {
            return Err(Reason::InvalidClaim);
        }
        let node_name = k8s.node.and_then(|n| n.name);
        let jti = c.jti.filter(|j| j.len() <= 128);

        Ok(VerifiedToken {
            identity: VerifiedIdentity {
                namespace,
                service_account: sa_name,
                pod_name,
                pod_uid,
                expires_at: exp,
            },
            service_account_uid: sa_uid,
            node_name,
            issued_at: iat,
            jti,
            kid,
        })
    }

    /// [`Verifier::verify`] against a [`KeyStore`](super::KeyStore): if no keys are loaded yet, or
    /// the kid is unknown, one rate-limited refresh is tried before rejecting.
    pub async fn verify_with_store(
        &self,
        token: &str,
        store: &super::KeyStore,
        now: u64,
    ) -> Result<VerifiedToken, Reason> {
        match self.verify(token, &store.keys(), now) {
            Err(Reason::UnknownKid | Reason::KeysUnavailable) => {
                store.refresh_for_unknown_kid().await;
                self.verify(token, &store.keys(), now)
            }
            other => other,
        }
    }
}
