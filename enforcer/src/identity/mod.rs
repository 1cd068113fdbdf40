//! Workload identity from projected service-account tokens (docs/identity.md).
//!
//! A pod presents its projected service-account JWT (audience default `enforcer`) to the node-local
//! attestation endpoint (`POST /v1/attest`, [`server`]). The agent
//!
//! 1. verifies the token like kube-apiserver does ([`verify`]): asymmetric signature with a key
//!    chosen by `kid` from a JWKS ([`jwks`]; `--jwks FILE` or OIDC discovery, rotated without a
//!    restart), issuer from a configured list, audience, `exp`/`nbf`/`iat` with 60 s leeway, `sub`
//!    consistent with the `kubernetes.io` claim, pod-bound;
//! 2. checks the token's pod still exists with the same uid and that the caller's source IP belongs
//!    to that pod ([`bind`], via the agent's [`PodDirectory`]);
//! 3. binds the IP to a [`VerifiedIdentity`] until the token expires or the pod goes
//!    ([`Bindings`]); the compiler reads [`Bindings::snapshot`] and exposes the identity to
//!    selectors through the reserved labels of [`identity_labels`].
//!
//! Every rejection carries a stable [`Reason`] (counted in [`IdentityMetrics`], logged without
//! the token). Tokens are never logged, echoed or put into error values.
//!
//! `testing` (tests and the `testkit` feature only) is a real test issuer (RSA-2048 / P-256 keys generated at runtime, a real JWKS,
//! API-server-shaped tokens) used by unit tests, end-to-end tests and the demo.

pub mod attestation;
pub mod bind;
pub mod jwks;
pub mod metrics;
pub mod records;
pub mod server;
#[cfg(any(test, feature = "testkit"))]
pub mod testing;
pub mod verify;

#[cfg(test)]
mod tests;

pub use bind::{Bindings, LivePod, PodDirectory, check_binding, identity_labels};
pub use jwks::{
    ApiGet, FileKeySource, Jwks, JwksError, KeySource, KeySourceError, KeyStore, OidcKeySource,
    Refresh,
};
pub use metrics::IdentityMetrics;
pub use server::{AttestState, RateLimit, RateLimiter, router, serve, serve_listener};
pub use verify::{ConfigError, VerifiedToken, Verifier, VerifierConfig};

use std::time::{SystemTime, UNIX_EPOCH};

/// The reserved labels a binding gives its address (one definition, in the model the compiler reads).
pub use enforcer_policy::model::{LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT};

/// The identity a pod proved with a verified, pod-bound service-account token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerifiedIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// Token `exp`, unix seconds. The binding lasts until then (re-attesting extends it).
    pub expires_at: u64,
}

/// Why a token or an attestation was rejected. The `as_str()` codes are stable: they are metric
/// label values and appear in 401/403 bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No `Authorization: Bearer` token in the request.
    MissingToken,
    /// Token larger than the configured limit (checked before any parsing).
    Oversized,
    /// Not a compact JWS (three base64url segments), bad base64, bad JSON, bad header.
    Malformed,
    /// Header `alg` is not an asymmetric algorithm we accept (`none`, `HS*`, ...).
    AlgNotAllowed,
    /// Header `alg` differs from the algorithm pinned for the key `kid` names.
    AlgMismatch,
    /// Header carries `jku`/`jwk`/`x5u`/`x5c`/`crit`: never produced by the API server and never
    /// trusted to select a key.
    ForbiddenHeader,
    /// Header has no `kid` (every API-server token has one).
    MissingKid,
    /// `kid` not in the current key set (after at most one rate-limited refresh).
    UnknownKid,
    /// No verification key has been loaded yet (fail closed).
    KeysUnavailable,
    /// Signature does not verify with the key named by `kid`.
    BadSignature,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    IssuedInFuture,
    /// `exp - iat` longer than the configured maximum token lifetime.
    LifetimeTooLong,
    /// A required claim (`exp`, `iat`, `iss`, `aud`, `sub`, `kubernetes.io`, ...) is absent.
    MissingClaim,
    /// A claim has the wrong type, is empty, or is not a valid name.
    InvalidClaim,
    /// `sub` is not `system:serviceaccount:<namespace>:<serviceaccount.name>`.
    SubjectMismatch,
    /// The token is not bound to a pod (no `kubernetes.io.pod`).
    NotPodBound,
    /// The token's pod does not exist (deleted).
    UnknownPod,
    /// A pod with the token's name exists but with another uid (re-created).
    PodUidMismatch,
    /// The caller's source IP does not belong to the token's pod.
    IpMismatch,
    /// Per-source-IP rate limit exceeded.
    RateLimited,
    /// Verification did not finish within the request timeout.
    Timeout,
}

impl Reason {
    pub const ALL: [Reason; 25] = [
        Reason::MissingToken,
        Reason::Oversized,
        Reason::Malformed,
        Reason::AlgNotAllowed,
        Reason::AlgMismatch,
        Reason::ForbiddenHeader,
        Reason::MissingKid,
        Reason::UnknownKid,
        Reason::KeysUnavailable,
        Reason::BadSignature,
        Reason::WrongIssuer,
        Reason::WrongAudience,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::IssuedInFuture,
        Reason::LifetimeTooLong,
        Reason::MissingClaim,
        Reason::InvalidClaim,
        Reason::SubjectMismatch,
        Reason::NotPodBound,
        Reason::UnknownPod,
        Reason::PodUidMismatch,
        Reason::IpMismatch,
        Reason::RateLimited,
        Reason::Timeout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MissingToken => "missing-token",
            Reason::Oversized => "oversized",
            Reason::Malformed => "malformed",
            Reason::AlgNotAllowed => "alg-not-allowed",
            Reason::AlgMismatch => "alg-mismatch",
            Reason::ForbiddenHeader => "forbidden-header",
            Reason::MissingKid => "missing-kid",
            Reason::UnknownKid => "unknown-kid",
            Reason::KeysUnavailable => "keys-unavailable",
            Reason::BadSignature => "bad-signature",
            Reason::WrongIssuer => "wrong-issuer",
            Reason::WrongAudience => "wrong-audience",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not-yet-valid",
            Reason::IssuedInFuture => "issued-in-future",
            Reason::LifetimeTooLong => "lifetime-too-long",
            Reason::MissingClaim => "missing-claim",
            Reason::InvalidClaim => "invalid-claim",
            Reason::SubjectMismatch => "subject-mismatch",
            Reason::NotPodBound => "not-pod-bound",
            Reason::UnknownPod => "unknown-pod",
            Reason::PodUidMismatch => "pod-uid-mismatch",
            Reason::IpMismatch => "ip-mismatch",
            Reason::RateLimited => "rate-limited",
            Reason::Timeout => "timeout",
        }
    }

    /// HTTP status of the attestation endpoint for this rejection:
    /// - 401: the token itself proves nothing (verification failed, or its pod is gone / was
    ///   re-created, which is how kube-apiserver treats a bound token: "invalidated");
    /// - 403: the token is valid but the caller is not the pod it is bound to;
    /// - 429: rate limited; 503: no keys loaded yet or verification timed out.
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::IpMismatch => 403,
            Reason::RateLimited => 429,
            Reason::KeysUnavailable | Reason::Timeout => 503,
            _ => 401,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Reason {}

/// Current wall-clock time in unix seconds (0 if the clock is before the epoch).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
