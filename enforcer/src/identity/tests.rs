//! Identity tests with real cryptography: a corpus of bad tokens each rejected for its named
//! reason, good RSA/EC/PSS tokens, leeway edges, key rotation, key sources, binding and the
//! attestation endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use futures::future::BoxFuture;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::bind::check_binding;
use super::jwks::{ApiGet, B64URL, Refresh, jwks_path};
use super::testing::{TestIssuer, TestKey};
use super::verify::VerifiedToken;
use super::*;

// ---------------------------------------------------------------- fixtures

/// Key generation (RSA-2048 especially) is slow in debug builds: generate once per test binary.
fn issuer() -> &'static TestIssuer {
    static I: OnceLock<TestIssuer> = OnceLock::new();
    I.get_or_init(TestIssuer::new)
}

/// A second, unpublished RSA key: the attacker's, or the rotation target.
fn other_rsa() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(TestKey::rsa)
}

fn other_ec() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(TestKey::ec)
}

fn jwks_of(i: &TestIssuer) -> Jwks {
    Jwks::parse(i.jwks_json().as_bytes()).expect("test JWKS parses")
}

fn verifier() -> Verifier {
    Verifier::new(issuer().verifier_config()).expect("config")
}

fn now() -> u64 {
    unix_now()
}

/// The issuer's keys plus a `use: enc` key (which must be dropped).
fn corpus_keys() -> Jwks {
    let mut i = issuer().clone();
    i.add_key(enc_key());
    jwks_of(&i)
}

fn enc_key() -> TestKey {
    other_ec().with_jwk_field("use", json!("enc"))
}

fn verify(token: &str, keys: &Jwks) -> Result<VerifiedToken, Reason> {
    verifier().verify(token, keys, now())
}

fn flip_char(s: &str, idx: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[idx] = if b[idx] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).expect("ascii")
}

fn segments(t: &str) -> Vec<String> {
    t.split('.').map(str::to_string).collect()
}

#[derive(Default)]
struct FakePods {
    by_ip: Mutex<HashMap<IpAddr, LivePod>>,
}

impl FakePods {
    fn with(entries: &[(IpAddr, &str, &str, &str)]) -> Self {
        let f = FakePods::default();
        for (ip, ns, name, uid) in entries {
            f.add(*ip, ns, name, uid);
        }
        f
    }

    fn add(&self, ip: IpAddr, ns: &str, name: &str, uid: &str) {
        self.by_ip.lock().unwrap().insert(
            ip,
            LivePod {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
            },
        );
    }

    fn remove(&self, ip: IpAddr) {
        self.by_ip.lock().unwrap().remove(&ip);
    }
}

impl PodDirectory for FakePods {
    fn pod_by_ip(&self, ip: IpAddr) -> Option<LivePod> {
        self.by_ip.lock().unwrap().get(&ip).cloned()
    }

    fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.by_ip
            .lock()
            .unwrap()
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .map(|p| p.uid.clone())
    }
}

const POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6));
const POD_UID: &str = "6c1d0a3e-2a43-4f4e-9d1b-0b1f3f1c0a01";
const OTHER_UID: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";

// ---------------------------------------------------------------- the bad-token corpus

/// Every case: (name, token, expected reason). Verified against the issuer's JWKS at `now`.
fn corpus() -> Vec<(&'static str, String, Reason)> {
    let i = issuer();
    let rsa = i.rsa_key();
    let ec = i.ec_key();
    let n = now();
    let good = i.token().sign();
    let seg = segments(&good);
    let attacker = other_rsa();
    let mut v: Vec<(&'static str, String, Reason)> = vec![
        (
            "alg none",
            i.token().unsigned("none"),
            Reason::AlgNotAllowed,
        ),
        (
            "alg None",
            i.token().unsigned("None"),
            Reason::AlgNotAllowed,
        ),
        (
            "alg none with a copied signature",
            format!("{}{}", i.token().unsigned("none"), seg[2]),
            Reason::AlgNotAllowed,
        ),
        (
            "HS256 keyed with the RSA public key PEM",
            i.token().sign_hs256(rsa.public_key_pem().as_bytes()),
            Reason::AlgNotAllowed,
        ),
        (
            "HS256 keyed with the EC public key PEM",
            i.token()
                .signing_key(ec)
                .sign_hs256(ec.public_key_pem().as_bytes()),
            Reason::AlgNotAllowed,
        ),
        (
            "alg EdDSA",
            i.token().header("alg", json!("EdDSA")).sign(),
            Reason::AlgNotAllowed,
        ),
        (
            "alg as a number",
            i.token().header("alg", json!(1)).sign(),
            Reason::Malformed,
        ),
        (
            "wrong issuer",
            i.token().issuer("https://evil.example.com").sign(),
            Reason::WrongIssuer,
        ),
        (
            "legacy issuer",
            i.token().issuer("kubernetes/serviceaccount").sign(),
            Reason::WrongIssuer,
        ),
        (
            "issuer missing",
            i.token().without_claim("iss").sign(),
            Reason::MissingClaim,
        ),
        (
            "issuer of wrong type",
            i.token().claim("iss", json!(5)).sign(),
            Reason::InvalidClaim,
        ),
        (
            "API-server audience (default mounted token replayed)",
            i.token()
                .audience("https://kubernetes.default.svc.cluster.local")
                .sign(),
            Reason::WrongAudience,
        ),
        (
            "audience empty list",
            i.token().audiences(&[]).sign(),
            Reason::WrongAudience,
        ),
        (
            "audience missing",
            i.token().without_claim("aud").sign(),
            Reason::MissingClaim,
        ),
        (
            "audience of wrong type",
            i.token().claim("aud", json!(5)).sign(),
            Reason::InvalidClaim,
        ),
        (
            "expired",
            i.token()
                .issued_at(n - 7200)
                .not_before(n - 7200)
                .expires_at(n - 3600)
                .sign(),
            Reason::Expired,
        ),
        (
            "nbf in the future",
            i.token().not_before(n + 3600).sign(),
            Reason::NotYetValid,
        ),
        (
            "iat in the future",
            i.token()
                .issued_at(n + 3600)
                .not_before(n)
                .expires_at(n + 7200)
                .sign(),
            Reason::IssuedInFuture,
        ),
        (
            "lifetime of a year (extended API token)",
            i.token().expires_at(n + 365 * 86400).sign(),
            Reason::LifetimeTooLong,
        ),
        (
            "exp before iat",
            i.token().issued_at(n).expires_at(n - 1).sign(),
            Reason::InvalidClaim,
        ),
        (
            "exp missing",
            i.token().without_claim("exp").sign(),
            Reason::MissingClaim,
        ),
        (
            "exp as a string",
            i.token().claim("exp", json!("9999999999")).sign(),
            Reason::InvalidClaim,
        ),
        (
            "exp as a float",
            i.token().claim("exp", json!(n as f64 + 0.5)).sign(),
            Reason::InvalidClaim,
        ),
        (
            "exp negative",
            i.token().claim("exp", json!(-1)).sign(),
            Reason::InvalidClaim,
        ),
        (
            "iat missing",
            i.token().without_claim("iat").sign(),
            Reason::MissingClaim,
        ),
        (
            "unknown kid",
            i.token().kid("no-such-kid").sign(),
            Reason::UnknownKid,
        ),
        (
            "kid missing",
            i.token().without_kid().sign(),
            Reason::MissingKid,
        ),
        ("kid empty", i.token().kid("").sign(), Reason::MissingKid),
        (
            "kid of 10 KiB",
            i.token().kid(&"k".repeat(10 * 1024)).sign(),
            Reason::UnknownKid,
        ),
        (
            "attacker key with its own kid",
            i.token_with(attacker).sign(),
            Reason::UnknownKid,
        ),
        (
            "attacker key claiming the published RSA kid",
            i.token_with(attacker).kid(rsa.kid()).sign(),
            Reason::BadSignature,
        ),
        (
            "ES256 token claiming the RSA kid",
            i.token_with(ec).kid(rsa.kid()).sign(),
            Reason::AlgMismatch,
        ),
        (
            "RS256 token claiming the EC kid",
            i.token_with(rsa).kid(ec.kid()).sign(),
            Reason::AlgMismatch,
        ),
        (
            "PS256 header on an RS256 key",
            i.token().header("alg", json!("PS256")).sign(),
            Reason::AlgMismatch,
        ),
        (
            "jku header pointing to an attacker JWKS",
            i.token_with(attacker)
                .kid(rsa.kid())
                .header("jku", json!("https://evil.example.com/jwks"))
                .sign(),
            Reason::ForbiddenHeader,
        ),
        (
            "embedded jwk header with the attacker key",
            i.token_with(attacker)
                .kid(rsa.kid())
                .header("jwk", attacker.jwk())
                .sign(),
            Reason::ForbiddenHeader,
        ),
        (
            "x5c header",
            i.token().header("x5c", json!(["MIIB"])).sign(),
            Reason::ForbiddenHeader,
        ),
        (
            "x5u header",
            i.token().header("x5u", json!("https://e/x")).sign(),
            Reason::ForbiddenHeader,
        ),
        (
            "crit header",
            i.token().header("crit", json!(["exp"])).sign(),
            Reason::ForbiddenHeader,
        ),
        (
            "tampered payload (namespace changed, signature kept)",
            {
                let evil = i.token().namespace("kube-system").sign();
                format!("{}.{}.{}", seg[0], segments(&evil)[1], seg[2])
            },
            Reason::BadSignature,
        ),
        (
            "tampered payload (one character flipped)",
            format!("{}.{}.{}", seg[0], flip_char(&seg[1], 10), seg[2]),
            Reason::BadSignature,
        ),
        (
            "tampered signature",
            format!("{}.{}.{}", seg[0], seg[1], flip_char(&seg[2], 5)),
            Reason::BadSignature,
        ),
        (
            "truncated signature",
            format!("{}.{}.{}", seg[0], seg[1], &seg[2][..168]),
            Reason::BadSignature,
        ),
        (
            "signature of another valid token",
            format!("{}.{}.{}", seg[0], seg[1], segments(&i.token().sign())[2]),
            Reason::BadSignature,
        ),
        (
            "kubernetes.io claim missing",
            i.token().without_claim("kubernetes.io").sign(),
            Reason::MissingClaim,
        ),
        (
            "kubernetes.io claim of wrong type",
            i.token().claim("kubernetes.io", json!("default")).sign(),
            Reason::InvalidClaim,
        ),
        (
            "not pod-bound",
            i.token().without_claim("kubernetes.io.pod").sign(),
            Reason::NotPodBound,
        ),
        (
            "secret-bound token",
            i.token()
                .without_claim("kubernetes.io.pod")
                .claim("kubernetes.io", {
                    let mut k = i.token().claims_json()["kubernetes.io"].clone();
                    k["secret"] = json!({"name": "s", "uid": "u"});
                    k.as_object_mut().unwrap().remove("pod");
                    k
                })
                .sign(),
            Reason::NotPodBound,
        ),
        (
            "pod uid missing",
            i.token()
                .pod("client", "")
                .claim("kubernetes.io", {
                    let mut k = i.token().claims_json()["kubernetes.io"].clone();
                    k["pod"] = json!({"name": "client"});
                    k
                })
                .sign(),
            Reason::MissingClaim,
        ),
        (
            "sub not matching the claim",
            i.token()
                .subject("system:serviceaccount:kube-system:admin")
                .sign(),
            Reason::SubjectMismatch,
        ),
        (
            "sub missing",
            i.token().without_claim("sub").sign(),
            Reason::MissingClaim,
        ),
        (
            "namespace not a DNS label",
            i.token().namespace("Kube_System").sign(),
            Reason::InvalidClaim,
        ),
        (
            "namespace with a colon (sub confusion)",
            i.token().namespace("a:b").sign(),
            Reason::InvalidClaim,
        ),
        (
            "service account missing",
            i.token()
                .without_claim("kubernetes.io.serviceaccount")
                .sign(),
            Reason::MissingClaim,
        ),
        (
            "duplicate exp (validly signed)",
            {
                let claims = i.token().claims_json().to_string();
                let dup = claims.replacen('{', &format!("{{\"exp\":{},", n + 3600), 1);
                i.token().sign_raw_payload(dup.as_bytes())
            },
            Reason::InvalidClaim,
        ),
        (
            "payload not JSON (validly signed)",
            i.token().sign_raw_payload(b"not json"),
            Reason::Malformed,
        ),
        (
            "malformed base64 in the header",
            format!("!!!{}.{}.{}", seg[0], seg[1], seg[2]),
            Reason::Malformed,
        ),
        (
            "header not JSON",
            format!("{}.{}.{}", B64URL.encode("nope"), seg[1], seg[2]),
            Reason::Malformed,
        ),
        ("padded signature", format!("{good}=="), Reason::Malformed),
        (
            "standard base64 alphabet",
            format!("{}.{}.{}+/", seg[0], seg[1], seg[2]),
            Reason::Malformed,
        ),
        (
            "whitespace inside",
            format!("{} .{}.{}", seg[0], seg[1], seg[2]),
            Reason::Malformed,
        ),
        (
            "two segments",
            format!("{}.{}", seg[0], seg[1]),
            Reason::Malformed,
        ),
        (
            "four segments",
            format!("{good}.{}", seg[2]),
            Reason::Malformed,
        ),
        (
            "JWE-like five segments",
            format!("{good}.a.b"),
            Reason::Malformed,
        ),
        (
            "empty signature",
            format!("{}.{}.", seg[0], seg[1]),
            Reason::Malformed,
        ),
        (
            "empty payload segment",
            format!("{}..{}", seg[0], seg[2]),
            Reason::Malformed,
        ),
        ("empty token", String::new(), Reason::Malformed),
        (
            "JSON serialization",
            format!("{{\"payload\":\"{}\"}}", seg[1]),
            Reason::Malformed,
        ),
        (
            "non-ASCII",
            format!("{}.{}é.{}", seg[0], seg[1], seg[2]),
            Reason::Malformed,
        ),
        (
            "token of 1 MiB",
            format!("{good}{}", "A".repeat(1 << 20)),
            Reason::Oversized,
        ),
        (
            "token of 16 KiB + 1",
            "A".repeat(16 * 1024 + 1),
            Reason::Oversized,
        ),
    ];
    // The corpus JWKS publishes `enc_key()` with `use: enc`: it is dropped, so its kid is unknown.
    v.push((
        "key with use: enc",
        i.token_with(&enc_key()).sign(),
        Reason::UnknownKid,
    ));
    v
}

#[test]
fn corpus_of_bad_tokens_is_rejected_for_the_named_reason() {
    let cases = corpus();
    assert!(cases.len() >= 20);
    let keys = corpus_keys();
    assert!(keys.skipped().iter().any(|s| s.why == "not-for-signing"));
    let mut failures = Vec::new();
    for (name, token, want) in &cases {
        match verify(token, &keys) {
            Err(got) if got == *want => {}
            other => failures.push(format!(
                "{name}: want {want}, got {:?}",
                other.map(|_| "ACCEPTED")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn good_tokens_rsa_ec_and_pss_are_accepted() {
    let i = issuer();
    let v = verifier();
    let keys = jwks_of(i);
    for key in [i.rsa_key(), i.ec_key()] {
        let b = i
            .token_with(key)
            .namespace("shop")
            .service_account("checkout", "sa-uid-1")
            .pod("checkout-7d9f", POD_UID);
        let exp = b.exp().unwrap();
        let got = v.verify(&b.sign(), &keys, now()).expect("good token");
        assert_eq!(
            got.identity,
            VerifiedIdentity {
                namespace: "shop".into(),
                service_account: "checkout".into(),
                pod_name: "checkout-7d9f".into(),
                pod_uid: POD_UID.into(),
                expires_at: exp,
            }
        );
        assert_eq!(got.service_account_uid, "sa-uid-1");
        assert_eq!(got.node_name.as_deref(), Some("node-1"));
        assert_eq!(got.kid, key.kid());
        assert!(got.jti.is_some());
    }
    // The same RSA key published for PS256 under another kid.
    let pss = i.rsa_key().with_alg(Algorithm::PS256, "pss-key");
    let mut i2 = i.clone();
    i2.add_key(pss.clone());
    assert!(
        v.verify(&i2.token_with(&pss).sign(), &jwks_of(&i2), now())
            .is_ok()
    );
    // ... and an RS256 token under the PS256 kid is refused.
    assert_eq!(
        v.verify(
            &i2.token_with(i.rsa_key()).kid("pss-key").sign(),
            &jwks_of(&i2),
            now()
        )
        .err(),
        Some(Reason::AlgMismatch)
    );
    // Several audiences, one of them ours; several issuers configured.
    let t = i.token().audiences(&["vault", "enforcer"]).sign();
    assert!(v.verify(&t, &keys, now()).is_ok());
    let mut cfg = i.verifier_config();
    cfg.issuers.insert(0, "https://old-issuer.example".into());
    let v2 = Verifier::new(cfg).unwrap();
    assert!(v2.verify(&i.token().sign(), &keys, now()).is_ok());
    assert!(
        v2.verify(
            &i.token().issuer("https://old-issuer.example").sign(),
            &keys,
            now()
        )
        .is_ok()
    );
    // Audience as a single string; nbf absent.
    let t = i
        .token()
        .claim("aud", json!("enforcer"))
        .without_claim("nbf")
        .sign();
    assert!(v.verify(&t, &keys, now()).is_ok());
}

#[test]
fn leeway_edges() {
    let i = issuer();
    let v = verifier();
    let keys = jwks_of(i);
    let t0 = 1_900_000_000u64;
    let tok = |iat: u64, nbf: u64, exp: u64| {
        i.token_with(i.ec_key())
            .issued_at(iat)
            .not_before(nbf)
            .expires_at(exp)
            .sign()
    };
    let at = |t: &str, now: u64| v.verify(t, &keys, now).map(|_| ());
    // exp: valid through exp + 60 s.
    let t = tok(t0 - 600, t0 - 600, t0);
    assert_eq!(at(&t, t0 + 60), Ok(()));
    assert_eq!(at(&t, t0 + 61), Err(Reason::Expired));
    // nbf: valid from nbf - 60 s.
    let t = tok(t0 - 600, t0, t0 + 600);
    assert_eq!(at(&t, t0 - 60), Ok(()));
    assert_eq!(at(&t, t0 - 61), Err(Reason::NotYetValid));
    // iat: valid from iat - 60 s.
    let t = tok(t0, t0 - 600, t0 + 600);
    assert_eq!(at(&t, t0 - 60), Ok(()));
    assert_eq!(at(&t, t0 - 61), Err(Reason::IssuedInFuture));
    // Maximum lifetime is inclusive.
    let t = tok(t0, t0, t0 + 24 * 3600);
    assert_eq!(at(&t, t0), Ok(()));
    let t = tok(t0, t0, t0 + 24 * 3600 + 1);
    assert_eq!(at(&t, t0), Err(Reason::LifetimeTooLong));
}

#[test]
fn config_errors() {
    use super::verify::ConfigError;
    assert_eq!(
        Verifier::new(VerifierConfig::new(vec![])).err(),
        Some(ConfigError::NoIssuer)
    );
    let mut c = VerifierConfig::new(vec!["x".into()]);
    c.audiences.clear();
    assert_eq!(Verifier::new(c).err(), Some(ConfigError::NoAudience));
    assert_eq!(
        Verifier::new(VerifierConfig::new(vec!["".into()])).err(),
        Some(ConfigError::Empty)
    );
}

#[test]
fn wrong_audience_with_custom_audience_config() {
    let i = issuer();
    let mut cfg = i.verifier_config();
    cfg.audiences = vec!["netpol-agent.prod".into()];
    let v = Verifier::new(cfg).unwrap();
    let keys = jwks_of(i);
    assert_eq!(
        v.verify(&i.token().sign(), &keys, now()).err(),
        Some(Reason::WrongAudience)
    );
    assert!(
        v.verify(
            &i.token().audience("netpol-agent.prod").sign(),
            &keys,
            now()
        )
        .is_ok()
    );
}

#[test]
fn empty_key_set_fails_closed() {
    let v = verifier();
    assert_eq!(
        v.verify(&issuer().token().sign(), &Jwks::empty(), now())
            .err(),
        Some(Reason::KeysUnavailable)
    );
}

#[test]
fn verifier_never_panics_on_mutated_tokens() {
    // Deterministic mutations of a good token: every single-byte substitution over a sample of
    // positions and characters must be rejected (or, for a no-op, accepted) without panicking.
    let good = issuer().token().sign();
    let v = verifier();
    let keys = jwks_of(issuer());
    let alphabet = b"A-_.=+/ \x00z9";
    let step = (good.len() / 97).max(1);
    for pos in (0..good.len()).step_by(step) {
        for c in alphabet {
            let mut b = good.as_bytes().to_vec();
            if b[pos] == *c {
                continue;
            }
            b[pos] = *c;
            let Ok(t) = String::from_utf8(b) else {
                continue;
            };
            assert!(
                v.verify(&t, &keys, now()).is_err(),
                "mutation at {pos} to {c} accepted"
            );
        }
    }
    // Truncations.
    for len in (0..good.len()).step_by(step) {
        assert!(v.verify(&good[..len], &keys, now()).is_err());
    }
}

// ---------------------------------------------------------------- JWKS parsing

#[test]
fn jwks_drops_non_signing_symmetric_and_weak_keys() {
    let i = issuer();
    let enc = other_ec().with_jwk_field("use", json!("enc"));
    let doc = json!({"keys": [
        i.rsa_key().jwk(),
        i.ec_key().jwk(),
        enc.jwk(),
        {"kty": "oct", "kid": "hmac", "alg": "RS256", "k": B64URL.encode(i.rsa_key().public_key_pem())},
        {"kty": "RSA", "kid": "small", "n": B64URL.encode([0xffu8; 128]), "e": "AQAB"},
        {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
        {"kty": "EC", "kid": "off-curve", "crv": "P-256", "x": B64URL.encode([1u8; 32]), "y": B64URL.encode([2u8; 32])},
        {"kty": "EC", "kid": "ec-says-rs", "crv": "P-256", "alg": "RS256", "x": i.ec_key().jwk()["x"], "y": i.ec_key().jwk()["y"]},
        {"kty": "RSA", "kid": "rsa-says-hs", "alg": "HS256", "n": i.rsa_key().jwk()["n"], "e": "AQAB"},
        {"kty": "RSA", "kid": "ops-sign-only", "key_ops": ["sign"], "n": i.rsa_key().jwk()["n"], "e": "AQAB"},
        {"kty": "RSA", "kid": "empty-n", "n": "", "e": "AQAB"},
        {"kty": "RSA", "kid": "zero-n", "n": "AAAA", "e": "AQAB"},
        {"kty": "RSA", "kid": "bad-b64", "n": "!!", "e": "AQAB"},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"},
        {"kty": "RSA", "n": i.rsa_key().jwk()["n"], "e": "AQAB"},
        "not an object",
    ]});
    let jwks = Jwks::parse(doc.to_string().as_bytes()).unwrap();
    let mut kids = jwks.kids();
    kids.sort();
    let mut want = vec![i.rsa_key().kid(), i.ec_key().kid()];
    want.sort();
    assert_eq!(kids, want);
    let why: HashMap<Option<String>, &str> = jwks
        .skipped()
        .iter()
        .map(|s| (s.kid.clone(), s.why))
        .collect();
    assert_eq!(why[&Some(enc.kid().to_string())], "not-for-signing");
    assert_eq!(why[&Some("hmac".into())], "symmetric");
    assert_eq!(why[&Some("small".into())], "weak-key");
    assert_eq!(why[&Some("p521".into())], "alg-unsupported");
    assert_eq!(why[&Some("off-curve".into())], "invalid-jwk");
    assert_eq!(why[&Some("ec-says-rs".into())], "alg-mismatch");
    assert_eq!(why[&Some("rsa-says-hs".into())], "alg-unsupported");
    assert_eq!(why[&Some("ops-sign-only".into())], "not-for-signing");
    assert_eq!(why[&Some("ed".into())], "kty-unsupported");
    assert_eq!(why[&Some("empty-n".into())], "weak-key");
    assert_eq!(why[&Some("zero-n".into())], "weak-key");
    assert_eq!(why[&Some("bad-b64".into())], "invalid-jwk");
    assert_eq!(why[&None], "invalid-jwk");
}

#[test]
fn key_with_use_enc_is_not_used() {
    let i = issuer();
    let enc = other_ec().with_jwk_field("use", json!("enc"));
    let mut i2 = i.clone();
    i2.add_key(enc.clone());
    let keys = jwks_of(&i2);
    assert_eq!(
        verifier()
            .verify(&i2.token_with(&enc).sign(), &keys, now())
            .err(),
        Some(Reason::UnknownKid)
    );
}

#[test]
fn oct_key_cannot_verify_hs256_with_its_secret() {
    // Even if an attacker got an `oct` key into the JWKS, it is dropped and HS256 is refused.
    let secret = b"attacker-secret";
    let doc = json!({"keys": [issuer().rsa_key().jwk(), {"kty": "oct", "kid": "hmac", "k": B64URL.encode(secret)}]});
    let keys = Jwks::parse(doc.to_string().as_bytes()).unwrap();
    let t = issuer().token().kid("hmac").sign_hs256(secret);
    assert_eq!(
        verifier().verify(&t, &keys, now()).err(),
        Some(Reason::AlgNotAllowed)
    );
}

#[test]
fn duplicate_kid_is_dropped() {
    let i = issuer();
    let dup = other_rsa().with_kid(i.rsa_key().kid());
    let doc = json!({"keys": [i.rsa_key().jwk(), dup.jwk(), i.ec_key().jwk()]});
    let keys = Jwks::parse(doc.to_string().as_bytes()).unwrap();
    assert_eq!(keys.kids(), vec![i.ec_key().kid()]);
    assert_eq!(
        verifier().verify(&i.token().sign(), &keys, now()).err(),
        Some(Reason::UnknownKid)
    );
}

#[test]
fn jwks_document_errors() {
    assert!(matches!(
        Jwks::parse(b"nope"),
        Err(jwks::JwksError::Json(_))
    ));
    assert!(matches!(Jwks::parse(b"{}"), Err(jwks::JwksError::Json(_))));
    assert!(matches!(
        Jwks::parse(&vec![b' '; (1 << 20) + 1]),
        Err(jwks::JwksError::Oversized)
    ));
    let many = json!({"keys": vec![json!({}); 300]});
    assert!(matches!(
        Jwks::parse(many.to_string().as_bytes()),
        Err(jwks::JwksError::TooManyKeys)
    ));
    assert!(Jwks::parse(br#"{"keys": []}"#).unwrap().is_empty());
}

#[test]
fn jwks_path_extraction() {
    assert_eq!(
        jwks_path("https://kubernetes.default.svc.cluster.local/openid/v1/jwks").as_deref(),
        Some("/openid/v1/jwks")
    );
    assert_eq!(
        jwks_path("https://oidc.example.com:8443/id/ABC/keys?x=1#f").as_deref(),
        Some("/id/ABC/keys")
    );
    assert_eq!(
        jwks_path("/openid/v1/jwks").as_deref(),
        Some("/openid/v1/jwks")
    );
    assert_eq!(jwks_path("https://host"), None);
    assert_eq!(jwks_path("https://host/../../api/v1/secrets"), None);
    assert_eq!(jwks_path("//evil.example.com/jwks"), None);
    assert_eq!(jwks_path("file:///etc/passwd"), None);
    assert_eq!(jwks_path("https://h/a%2e%2e/b"), None);
}

// ---------------------------------------------------------------- key sources and rotation

fn write_jwks(path: &std::path::Path, i: &TestIssuer) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, i.jwks_json()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn file_key_store_rotation_new_key_verifies_old_key_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let old = issuer().rsa_key().clone();
    let new = other_rsa().clone();
    let mut i = TestIssuer::with_keys(issuer().issuer(), vec![old.clone()]);
    write_jwks(&path, &i);

    let metrics = Arc::new(IdentityMetrics::new());
    let store = KeyStore::new(Arc::new(FileKeySource::new(&path)))
        .with_min_refresh_interval(Duration::from_secs(3600))
        .with_metrics(metrics.clone());
    assert!(!store.is_loaded());
    assert_eq!(store.refresh().await.unwrap(), Refresh::Updated);
    assert_eq!(store.refresh().await.unwrap(), Refresh::Unchanged);
    let v = verifier();
    let old_token = i.token_with(&old).sign();
    let new_token = i.token_with(&new).sign();
    assert!(v.verify_with_store(&old_token, &store, now()).await.is_ok());
    // Not yet published; the unknown-kid refresh is rate limited (last refresh just now).
    assert_eq!(
        v.verify_with_store(&new_token, &store, now()).await.err(),
        Some(Reason::UnknownKid)
    );

    // Rotation step 1: publish the new key next to the old one.
    i.add_key(new.clone());
    write_jwks(&path, &i);
    assert_eq!(store.refresh().await.unwrap(), Refresh::Updated);
    assert!(v.verify_with_store(&new_token, &store, now()).await.is_ok());
    assert!(v.verify_with_store(&old_token, &store, now()).await.is_ok());

    // Step 2: the old key is removed: it stops verifying at once.
    i.remove_key(old.kid());
    write_jwks(&path, &i);
    assert_eq!(store.refresh().await.unwrap(), Refresh::Updated);
    assert_eq!(
        v.verify_with_store(&old_token, &store, now()).await.err(),
        Some(Reason::UnknownKid)
    );
    assert_eq!(
        v.verify(&old_token, &store.keys(), now()).err(),
        Some(Reason::UnknownKid),
        "rotated-out key"
    );
    assert!(v.verify_with_store(&new_token, &store, now()).await.is_ok());

    // A broken file keeps the last good key set.
    std::fs::write(&path, "{ not json").unwrap();
    assert!(store.refresh().await.is_err());
    assert!(v.verify_with_store(&new_token, &store, now()).await.is_ok());
    // A missing file too.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.refresh().await,
        Err(KeySourceError::Io { .. })
    ));
    assert!(v.verify_with_store(&new_token, &store, now()).await.is_ok());

    let mut out = String::new();
    metrics.render_prometheus(&mut out);
    assert!(
        out.contains("enforcer_identity_key_refreshes_total{result=\"ok\"} 4"),
        "{out}"
    );
    assert!(
        out.contains("enforcer_identity_key_refreshes_total{result=\"error\"} 2"),
        "{out}"
    );
    assert!(out.contains("enforcer_identity_keys 1"), "{out}");
}

#[tokio::test]
async fn unknown_kid_triggers_one_rate_limited_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let a = issuer().ec_key().clone();
    let b = other_ec().clone();
    let mut i = TestIssuer::with_keys(issuer().issuer(), vec![a.clone()]);
    write_jwks(&path, &i);
    let store = KeyStore::new(Arc::new(FileKeySource::new(&path)))
        .with_min_refresh_interval(Duration::from_millis(300));
    let v = verifier();
    // Not loaded: the first verification loads the keys.
    assert!(
        v.verify_with_store(&i.token_with(&a).sign(), &store, now())
            .await
            .is_ok()
    );
    assert!(store.is_loaded());

    i.add_key(b.clone());
    write_jwks(&path, &i);
    let tb = i.token_with(&b).sign();
    // Within the interval: no refresh, rejected.
    assert_eq!(
        v.verify_with_store(&tb, &store, now()).await.err(),
        Some(Reason::UnknownKid)
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    // After it: one refresh finds the new key.
    assert!(v.verify_with_store(&tb, &store, now()).await.is_ok());
    // A random kid right after: no refresh storm (nothing to observe but no error).
    let junk = i.token_with(&b).kid("junk").sign();
    assert_eq!(
        v.verify_with_store(&junk, &store, now()).await.err(),
        Some(Reason::UnknownKid)
    );
}

#[tokio::test]
async fn key_store_without_keys_is_unavailable() {
    let store = KeyStore::new(Arc::new(FileKeySource::new("/nonexistent/jwks.json")));
    assert_eq!(
        verifier()
            .verify_with_store(&issuer().token().sign(), &store, now())
            .await
            .err(),
        Some(Reason::KeysUnavailable)
    );
}

struct FakeApi {
    docs: Mutex<HashMap<String, Vec<u8>>>,
    calls: Mutex<Vec<String>>,
}

impl FakeApi {
    fn new(i: &TestIssuer) -> Self {
        let f = FakeApi {
            docs: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
        };
        f.set(i);
        f
    }

    fn set(&self, i: &TestIssuer) {
        let mut d = self.docs.lock().unwrap();
        d.insert(jwks::DISCOVERY_PATH.into(), i.discovery_json().into_bytes());
        d.insert("/openid/v1/jwks".into(), i.jwks_json().into_bytes());
    }
}

impl ApiGet for Arc<FakeApi> {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(path.to_string());
            self.docs
                .lock()
                .unwrap()
                .get(path)
                .cloned()
                .ok_or_else(|| KeySourceError::Api {
                    path: path.into(),
                    message: "404".into(),
                })
        })
    }
}

#[tokio::test]
async fn oidc_discovery_source_and_rotation() {
    let old = issuer().rsa_key().clone();
    let new = other_ec().clone();
    let mut i = TestIssuer::with_keys(issuer().issuer(), vec![old.clone()]);
    let api = Arc::new(FakeApi::new(&i));
    let source = Arc::new(OidcKeySource::new(api.clone()));
    let store = KeyStore::new(source.clone());
    assert_eq!(store.refresh().await.unwrap(), Refresh::Updated);
    assert_eq!(
        source.discovered_issuer().as_deref(),
        Some(issuer().issuer())
    );
    assert_eq!(
        *api.calls.lock().unwrap(),
        vec![
            jwks::DISCOVERY_PATH.to_string(),
            "/openid/v1/jwks".to_string()
        ]
    );
    let v = verifier();
    assert!(
        v.verify_with_store(&i.token_with(&old).sign(), &store, now())
            .await
            .is_ok()
    );

    i.add_key(new.clone());
    i.remove_key(old.kid());
    api.set(&i);
    store.refresh().await.unwrap();
    assert!(
        v.verify_with_store(&i.token_with(&new).sign(), &store, now())
            .await
            .is_ok()
    );
    assert_eq!(
        v.verify_with_store(&i.token_with(&old).sign(), &store, now())
            .await
            .err(),
        Some(Reason::UnknownKid)
    );

    // A discovery document pointing outside the API server's path space is refused.
    api.docs.lock().unwrap().insert(
        jwks::DISCOVERY_PATH.into(),
        json!({"issuer": "x", "jwks_uri": "https://evil/../../api/v1/secrets"})
            .to_string()
            .into_bytes(),
    );
    assert!(matches!(
        store.refresh().await,
        Err(KeySourceError::Discovery(_))
    ));
    // ... and the keys are kept.
    assert!(
        v.verify_with_store(&i.token_with(&new).sign(), &store, now())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn oidc_source_over_a_kube_client() {
    // The real `kube::Client` implementation of `ApiGet`, against a mock API server.
    let i = issuer().clone();
    let (mock, mut handle) = tower_test::mock::pair::<
        Request<kube::client::Body>,
        axum::http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(mock, "default");
    let server = {
        let i = i.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (req, send) = handle.next_request().await.expect("request");
                assert_eq!(req.method(), "GET");
                let body = match req.uri().path() {
                    "/.well-known/openid-configuration" => i.discovery_json(),
                    "/openid/v1/jwks" => i.jwks_json(),
                    p => panic!("unexpected path {p}"),
                };
                send.send_response(axum::http::Response::new(kube::client::Body::from(
                    body.into_bytes(),
                )));
            }
        })
    };
    let store = KeyStore::new(Arc::new(OidcKeySource::new(client)));
    store.refresh().await.unwrap();
    server.await.unwrap();
    assert_eq!(store.keys().len(), 2);
}

// ---------------------------------------------------------------- binding

fn identity(pod: &str, uid: &str, exp: u64) -> VerifiedIdentity {
    VerifiedIdentity {
        namespace: "shop".into(),
        service_account: "checkout".into(),
        pod_name: pod.into(),
        pod_uid: uid.into(),
        expires_at: exp,
    }
}

#[test]
fn binding_stage_corpus() {
    let pods = FakePods::with(&[
        (POD_IP, "shop", "checkout", POD_UID),
        (OTHER_IP, "shop", "other", OTHER_UID),
    ]);
    let i = issuer();
    let v = verifier();
    let keys = jwks_of(i);
    let tok = |pod: &str, uid: &str| {
        let t = i
            .token()
            .namespace("shop")
            .service_account("checkout", "sa")
            .pod(pod, uid)
            .sign();
        v.verify(&t, &keys, now()).expect("verifies").identity
    };
    assert_eq!(
        check_binding(&pods, &tok("checkout", POD_UID), POD_IP),
        Ok(())
    );
    // IPv4-mapped IPv6 caller address.
    assert_eq!(
        check_binding(
            &pods,
            &tok("checkout", POD_UID),
            "::ffff:10.0.0.5".parse().unwrap()
        ),
        Ok(())
    );
    // Another pod's uid in the token (pod re-created with the same name).
    assert_eq!(
        check_binding(&pods, &tok("checkout", OTHER_UID), POD_IP),
        Err(Reason::PodUidMismatch)
    );
    // A deleted pod.
    assert_eq!(
        check_binding(&pods, &tok("gone", POD_UID), POD_IP),
        Err(Reason::UnknownPod)
    );
    // A valid token replayed from another pod's IP.
    assert_eq!(
        check_binding(&pods, &tok("checkout", POD_UID), OTHER_IP),
        Err(Reason::IpMismatch)
    );
    // From an IP that is no pod (e.g. the node).
    assert_eq!(
        check_binding(
            &pods,
            &tok("checkout", POD_UID),
            IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))
        ),
        Err(Reason::IpMismatch)
    );
}

#[test]
fn bindings_extend_expire_and_follow_pods() {
    let pods = FakePods::with(&[
        (POD_IP, "shop", "checkout", POD_UID),
        (OTHER_IP, "shop", "other", OTHER_UID),
    ]);
    let b = Bindings::new();
    let mut rx = b.subscribe();
    assert!(b.bind(POD_IP, identity("checkout", POD_UID, 1000)));
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();
    // Re-attesting extends; an older token does not shorten; same token is a no-op.
    assert!(b.bind(POD_IP, identity("checkout", POD_UID, 2000)));
    assert!(!b.bind(POD_IP, identity("checkout", POD_UID, 1500)));
    assert!(!b.bind(POD_IP, identity("checkout", POD_UID, 2000)));
    assert_eq!(b.get(POD_IP, 1999).unwrap().expires_at, 2000);
    assert_eq!(b.get(POD_IP, 2000), None);
    assert!(b.bind(OTHER_IP, identity("other", OTHER_UID, 500)));
    assert_eq!(b.len(), 2);
    let snap = b.snapshot();
    assert_eq!(snap[&POD_IP].pod_name, "checkout");
    let labels = identity_labels(&snap[&POD_IP]);
    assert_eq!(labels["enforcer.dev/serviceaccount"], "checkout");
    assert_eq!(labels["enforcer.dev/namespace"], "shop");
    assert_eq!(labels.len(), 2);
    // Sweep at 600: the `other` binding expired.
    let g = b.generation();
    assert_eq!(b.expired(600), vec![OTHER_IP]);
    assert!(b.generation() > g);
    assert!(b.expired(600).is_empty());
    // The pod goes: its binding goes.
    assert!(b.retain_pods(&pods).is_empty());
    pods.remove(POD_IP);
    assert_eq!(b.retain_pods(&pods), vec![POD_IP]);
    assert!(b.is_empty());
    // IP reused by a new pod: the old binding does not carry over.
    b.bind(POD_IP, identity("checkout", POD_UID, 5000));
    pods.add(
        POD_IP,
        "shop",
        "newcomer",
        "11111111-2222-4333-8444-555555555555",
    );
    assert_eq!(b.sweep(&pods, 0), vec![POD_IP]);
    // A different identity on the same IP replaces the binding.
    b.bind(POD_IP, identity("checkout", POD_UID, 5000));
    assert!(b.bind(
        POD_IP,
        identity("newcomer", "11111111-2222-4333-8444-555555555555", 10)
    ));
    assert_eq!(b.snapshot()[&POD_IP].pod_name, "newcomer");
    assert!(b.remove(POD_IP).is_some());
}

// ---------------------------------------------------------------- endpoint

struct Endpoint {
    state: AttestState,
    pods: Arc<FakePods>,
}

async fn endpoint(limit: RateLimit) -> Endpoint {
    let i = issuer();
    let api = Arc::new(FakeApi::new(i));
    let metrics = Arc::new(IdentityMetrics::new());
    let keys =
        Arc::new(KeyStore::new(Arc::new(OidcKeySource::new(api))).with_metrics(metrics.clone()));
    keys.refresh().await.unwrap();
    let pods = Arc::new(FakePods::with(&[
        (POD_IP, "shop", "checkout", POD_UID),
        (OTHER_IP, "shop", "other", OTHER_UID),
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "shop",
            "checkout-local",
            POD_UID,
        ),
    ]));
    let state = AttestState::new(
        Arc::new(verifier()),
        keys,
        pods.clone(),
        Arc::new(Bindings::new()),
        metrics,
    )
    .with_rate_limit(limit);
    Endpoint { state, pods }
}

fn shop_token(pod: &str, uid: &str) -> String {
    issuer()
        .token()
        .namespace("shop")
        .service_account("checkout", "sa")
        .pod(pod, uid)
        .sign()
}

async fn call(
    state: &AttestState,
    from: IpAddr,
    auth: Option<&str>,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let app = router(state.clone()).layer(MockConnectInfo(SocketAddr::new(from, 40000)));
    let mut req = Request::post(server::ATTEST_PATH);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test]
async fn endpoint_200_binds_the_caller() {
    let e = endpoint(RateLimit::default()).await;
    let t = shop_token("checkout", POD_UID);
    let (status, body, headers) = call(&e.state, POD_IP, Some(&format!("Bearer {t}"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["namespace"], "shop");
    assert_eq!(body["serviceAccount"], "checkout");
    assert_eq!(body["pod"], "checkout");
    assert_eq!(body["podUid"], POD_UID);
    assert!(body["expiresAt"].as_u64().unwrap() > now());
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert!(!body.to_string().contains(&t));
    let bound = e.state.bindings.get(POD_IP, now()).expect("bound");
    assert_eq!(bound.service_account, "checkout");
    assert_eq!(e.state.metrics.accepted(), 1);
    // Lower-case scheme is accepted too.
    let (status, _, _) = call(&e.state, POD_IP, Some(&format!("bearer {t}"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn endpoint_401_403_and_reasons() {
    let e = endpoint(RateLimit {
        burst: 1000,
        per_second: 1000.0,
    })
    .await;
    let good = shop_token("checkout", POD_UID);
    let cases: Vec<(&str, IpAddr, Option<String>, StatusCode, &str)> = vec![
        (
            "no header",
            POD_IP,
            None,
            StatusCode::UNAUTHORIZED,
            "missing-token",
        ),
        (
            "basic auth",
            POD_IP,
            Some("Basic dXNlcjpwYXNz".into()),
            StatusCode::UNAUTHORIZED,
            "missing-token",
        ),
        (
            "empty bearer",
            POD_IP,
            Some("Bearer ".into()),
            StatusCode::UNAUTHORIZED,
            "missing-token",
        ),
        (
            "garbage",
            POD_IP,
            Some("Bearer abc".into()),
            StatusCode::UNAUTHORIZED,
            "malformed",
        ),
        (
            "expired",
            POD_IP,
            Some(format!(
                "Bearer {}",
                issuer()
                    .token()
                    .namespace("shop")
                    .service_account("checkout", "sa")
                    .pod("checkout", POD_UID)
                    .issued_at(now() - 7200)
                    .not_before(now() - 7200)
                    .expires_at(now() - 3600)
                    .sign()
            )),
            StatusCode::UNAUTHORIZED,
            "expired",
        ),
        (
            "alg none",
            POD_IP,
            Some(format!("Bearer {}", issuer().token().unsigned("none"))),
            StatusCode::UNAUTHORIZED,
            "alg-not-allowed",
        ),
        (
            "oversized",
            POD_IP,
            Some(format!("Bearer {}", "A".repeat(20 * 1024))),
            StatusCode::UNAUTHORIZED,
            "oversized",
        ),
        (
            "deleted pod",
            POD_IP,
            Some(format!("Bearer {}", shop_token("gone", POD_UID))),
            StatusCode::UNAUTHORIZED,
            "unknown-pod",
        ),
        (
            "another pod's uid",
            POD_IP,
            Some(format!("Bearer {}", shop_token("checkout", OTHER_UID))),
            StatusCode::UNAUTHORIZED,
            "pod-uid-mismatch",
        ),
        (
            "stolen token from another pod",
            OTHER_IP,
            Some(format!("Bearer {good}")),
            StatusCode::FORBIDDEN,
            "ip-mismatch",
        ),
        (
            "from a non-pod IP",
            IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
            Some(format!("Bearer {good}")),
            StatusCode::FORBIDDEN,
            "ip-mismatch",
        ),
    ];
    for (name, ip, auth, want_status, want_reason) in cases {
        let (status, body, headers) = call(&e.state, ip, auth.as_deref()).await;
        assert_eq!(status, want_status, "{name}: {body}");
        assert_eq!(body, json!({"error": want_reason}), "{name}");
        if status == StatusCode::UNAUTHORIZED {
            assert!(headers.contains_key(header::WWW_AUTHENTICATE), "{name}");
        }
        if let Some(a) = &auth {
            let token = a.split_once(' ').map(|x| x.1).unwrap_or("");
            if token.len() > 8 {
                assert!(!body.to_string().contains(token), "{name}: token echoed");
            }
        }
    }
    assert!(e.state.bindings.is_empty(), "nothing bound on rejection");
    assert_eq!(e.state.metrics.rejected(Reason::IpMismatch), 2);
    assert_eq!(e.state.metrics.rejected(Reason::MissingToken), 3);
    assert_eq!(e.state.metrics.accepted(), 0);
    // The pod goes away after binding: re-attesting is refused, and retain_pods drops it.
    let (status, _, _) = call(&e.state, POD_IP, Some(&format!("Bearer {good}"))).await;
    assert_eq!(status, StatusCode::OK);
    e.pods.remove(POD_IP);
    let (status, body, _) = call(&e.state, POD_IP, Some(&format!("Bearer {good}"))).await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, json!({"error": "unknown-pod"}))
    );
    assert_eq!(e.state.bindings.retain_pods(e.pods.as_ref()), vec![POD_IP]);
    // Wrong method.
    let app = router(e.state.clone()).layer(MockConnectInfo(SocketAddr::new(POD_IP, 1)));
    let resp = app
        .oneshot(
            Request::get(server::ATTEST_PATH)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn endpoint_429_per_source_ip() {
    let e = endpoint(RateLimit {
        burst: 2,
        per_second: 0.0,
    })
    .await;
    let good = format!("Bearer {}", shop_token("checkout", POD_UID));
    assert_eq!(call(&e.state, POD_IP, Some(&good)).await.0, StatusCode::OK);
    assert_eq!(
        call(&e.state, POD_IP, Some("Bearer x")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body, headers) = call(&e.state, POD_IP, Some(&good)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body, json!({"error": "rate-limited"}));
    assert!(headers.contains_key(header::RETRY_AFTER));
    // Another source IP has its own bucket.
    assert_eq!(
        call(&e.state, OTHER_IP, Some(&good)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(e.state.metrics.rejected(Reason::RateLimited), 1);
    let mut out = String::new();
    e.state.metrics.render_prometheus(&mut out);
    assert!(
        out.contains("enforcer_identity_attestations_total{outcome=\"accepted\",reason=\"ok\"} 1"),
        "{out}"
    );
    assert!(out.contains(
        "enforcer_identity_attestations_total{outcome=\"rejected\",reason=\"rate-limited\"} 1"
    ));
    assert!(out.contains(
        "enforcer_identity_attestations_total{outcome=\"rejected\",reason=\"ip-mismatch\"} 1"
    ));
    assert!(out.contains("# TYPE enforcer_identity_attestations_total counter"));
}

#[test]
fn rate_limiter_refills() {
    let l = server::RateLimiter::new(RateLimit {
        burst: 2,
        per_second: 1.0,
    });
    let t0 = std::time::Instant::now();
    assert!(l.check_at(POD_IP, t0));
    assert!(l.check_at(POD_IP, t0));
    assert!(!l.check_at(POD_IP, t0));
    assert!(!l.check_at(POD_IP, t0 + Duration::from_millis(500)));
    assert!(l.check_at(POD_IP, t0 + Duration::from_millis(1600)));
    assert!(l.check_at(OTHER_IP, t0));
}

#[tokio::test]
async fn endpoint_503_before_keys_load() {
    let e = endpoint(RateLimit::default()).await;
    let empty = Arc::new(KeyStore::new(Arc::new(FileKeySource::new(
        "/nonexistent/jwks",
    ))));
    let state = AttestState {
        keys: empty,
        ..e.state.clone()
    };
    let (status, body, _) = call(
        &state,
        POD_IP,
        Some(&format!("Bearer {}", shop_token("checkout", POD_UID))),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "keys-unavailable"})
        )
    );
}

/// A real socket: the caller IP comes from the TCP connection (127.0.0.1 is mapped to the pod
/// `shop/checkout-local` by the fake directory).
#[tokio::test]
async fn endpoint_over_a_real_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = endpoint(RateLimit::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve_listener(listener, e.state.clone(), async {
        let _ = stopped.await;
    }));
    let send = |raw: String| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let req = |auth: &str| {
        format!(
            "POST /v1/attest HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let t = shop_token("checkout-local", POD_UID);
    let resp = send(req(&format!("Bearer {t}"))).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"pod\":\"checkout-local\""), "{resp}");
    assert!(
        e.state
            .bindings
            .get(IpAddr::V4(Ipv4Addr::LOCALHOST), now())
            .is_some()
    );
    // A token for another pod from this socket: 403.
    let resp = send(req(&format!("Bearer {}", shop_token("checkout", POD_UID)))).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // X-Forwarded-For is ignored (the IP comes from the socket only).
    let resp = send(format!(
        "POST /v1/attest HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        shop_token("checkout", POD_UID)
    ))
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // Headers beyond the limit: 431 from hyper, before the handler.
    let resp = send(req(&format!("Bearer {}", "A".repeat(40 * 1024)))).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    stop.send(()).unwrap();
    srv.await.unwrap().unwrap();
}

#[test]
fn reason_codes_are_stable_and_indexed() {
    for (idx, r) in Reason::ALL.iter().enumerate() {
        assert_eq!(r.index(), idx);
        assert!(
            r.as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-')
        );
    }
    let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Reason::ALL.len());
    assert_eq!(Reason::IpMismatch.http_status(), 403);
    assert_eq!(Reason::BadSignature.http_status(), 401);
    assert_eq!(Reason::UnknownPod.http_status(), 401);
    assert_eq!(Reason::RateLimited.http_status(), 429);
}

#[test]
fn test_issuer_tokens_look_like_the_api_server_s() {
    let i = issuer();
    let t = i.token().sign();
    let seg = segments(&t);
    let header: Value = serde_json::from_slice(&B64URL.decode(&seg[0]).unwrap()).unwrap();
    assert_eq!(header, json!({"alg": "RS256", "kid": i.rsa_key().kid()}));
    let claims: Value = serde_json::from_slice(&B64URL.decode(&seg[1]).unwrap()).unwrap();
    for k in [
        "aud",
        "exp",
        "iat",
        "iss",
        "jti",
        "kubernetes.io",
        "nbf",
        "sub",
    ] {
        assert!(claims.get(k).is_some(), "{k}");
    }
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert_eq!(i.rsa_key().kid().len(), 43);
    let jwks = i.jwks();
    assert_eq!(jwks["keys"][0]["use"], "sig");
    assert_eq!(jwks["keys"][1]["crv"], "P-256");
}

struct SlowSource;

impl KeySource for SlowSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Vec::new())
        })
    }

    fn describe(&self) -> String {
        "slow".into()
    }
}

#[tokio::test]
async fn endpoint_request_timeout() {
    let e = endpoint(RateLimit::default()).await;
    let state = AttestState {
        keys: Arc::new(KeyStore::new(Arc::new(SlowSource))),
        ..e.state.clone()
    }
    .with_request_timeout(Duration::from_millis(100));
    let (status, body, _) = call(
        &state,
        POD_IP,
        Some(&format!("Bearer {}", shop_token("checkout", POD_UID))),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "timeout"}))
    );
    assert_eq!(state.metrics.rejected(Reason::Timeout), 1);
}

#[test]
fn test_issuer_clock_and_endpoint_clock_injection() {
    // The endpoint clock is injectable: a token valid now is expired two hours later.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let e = endpoint(RateLimit::default()).await;
        let state = e.state.clone().with_clock(|| unix_now() + 7200);
        let (status, body, _) = call(
            &state,
            POD_IP,
            Some(&format!("Bearer {}", shop_token("checkout", POD_UID))),
        )
        .await;
        assert_eq!(
            (status, body),
            (StatusCode::UNAUTHORIZED, json!({"error": "expired"}))
        );
    });
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> &'static Jwks {
        static K: OnceLock<Jwks> = OnceLock::new();
        K.get_or_init(|| jwks_of(issuer()))
    }

    fn es256_kid_k() -> &'static str {
        static T: OnceLock<String> = OnceLock::new();
        T.get_or_init(|| issuer().token_with(issuer().ec_key()).kid("k").sign())
    }

    fn good() -> &'static str {
        static T: OnceLock<String> = OnceLock::new();
        T.get_or_init(|| issuer().token().sign())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary strings: never a panic, never accepted.
        #[test]
        fn arbitrary_input_is_rejected(s in "\\PC{0,400}") {
            prop_assert!(verifier().verify(&s, keys(), now()).is_err());
        }

        /// Arbitrary base64url segments shaped like a JWS: never a panic, never accepted.
        #[test]
        fn arbitrary_jws_shapes_are_rejected(
            h in proptest::collection::vec(any::<u8>(), 0..200),
            p in proptest::collection::vec(any::<u8>(), 0..400),
            sig in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let t = format!("{}.{}.{}", B64URL.encode(&h), B64URL.encode(&p), B64URL.encode(&sig));
            prop_assert!(verifier().verify(&t, keys(), now()).is_err());
        }

        /// A real header and signature with an arbitrary JSON-ish payload.
        #[test]
        fn arbitrary_payloads_with_real_header_are_rejected(p in "\\PC{0,300}") {
            let seg = segments(good());
            let t = format!("{}.{}.{}", seg[0], B64URL.encode(p.as_bytes()), seg[2]);
            prop_assert!(verifier().verify(&t, keys(), now()).is_err());
        }

        /// JWKS parsing never panics on arbitrary documents or key material.
        #[test]
        fn arbitrary_jwks_never_panics(
            doc in "\\PC{0,300}",
            kty in prop_oneof![Just("RSA"), Just("EC"), Just("oct"), Just("OKP"), Just("x")],
            crv in prop_oneof![Just("P-256"), Just("P-384"), Just("P-521"), Just("")],
            n in proptest::collection::vec(any::<u8>(), 0..600),
            e in proptest::collection::vec(any::<u8>(), 0..16),
            x in proptest::collection::vec(any::<u8>(), 0..64),
            y in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = Jwks::parse(doc.as_bytes());
            let key = json!({"kty": kty, "kid": "k", "crv": crv, "n": B64URL.encode(&n),
                "e": B64URL.encode(&e), "x": B64URL.encode(&x), "y": B64URL.encode(&y)});
            let jwks = Jwks::parse(json!({"keys": [key]}).to_string().as_bytes()).unwrap();
            // Whatever was kept must not panic when verifying a token against it.
            let _ = verifier().verify(es256_kid_k(), &jwks, now());
        }
    }
}
