//! A real test issuer: RSA-2048 and P-256 key pairs generated at runtime, a real JWKS document
//! (kids computed like kube-apiserver: base64url(SHA-256(PKIX DER))), and tokens shaped exactly
//! like kubelet-projected service-account tokens, with builder methods for every bad variant.
//!
//! Used by unit tests, end-to-end tests and the demo. Never used on the verification path.
//! Constructors panic if the OS random source fails (test tooling).

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use rand::RngCore;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::jwks::B64URL;
use super::verify::{DEFAULT_AUDIENCE, VerifierConfig};

/// The issuer of a default kubeadm/kind cluster.
pub const TEST_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key pair with its public JWK.
#[derive(Clone)]
pub struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    public_pem: String,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

fn kid_of(pkix_der: &[u8]) -> String {
    B64URL.encode(Sha256::digest(pkix_der))
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

impl TestKey {
    /// A fresh RSA-2048 key signing RS256 (what kube-apiserver uses for RSA keys).
    pub fn rsa() -> TestKey {
        Self::rsa_with_alg(Algorithm::RS256)
    }

    /// A fresh RSA-2048 key pinned to `alg` (RS*/PS*) in its JWK.
    pub fn rsa_with_alg(alg: Algorithm) -> TestKey {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        use rsa::traits::PublicKeyParts;
        let private =
            rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("generate RSA-2048 key");
        let public = private.to_public_key();
        let der = public.to_public_key_der().expect("encode RSA public key");
        let kid = kid_of(der.as_bytes());
        let pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode RSA private key");
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("load RSA private key");
        let public_pem = public
            .to_public_key_pem(LineEnding::LF)
            .expect("encode RSA public key");
        let jwk = json!({
            "use": "sig",
            "kty": "RSA",
            "kid": kid,
            "alg": alg_name(alg),
            "n": B64URL.encode(public.n().to_bytes_be()),
            "e": B64URL.encode(public.e().to_bytes_be()),
        });
        TestKey {
            kid,
            alg,
            encoding,
            jwk,
            public_pem,
        }
    }

    /// A fresh P-256 key signing ES256.
    pub fn ec() -> TestKey {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let public = secret.public_key();
        let der = public.to_public_key_der().expect("encode EC public key");
        let kid = kid_of(der.as_bytes());
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode EC private key");
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).expect("load EC private key");
        let public_pem = public
            .to_public_key_pem(LineEnding::LF)
            .expect("encode EC public key");
        let point = public.to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            panic!("uncompressed P-256 point has coordinates")
        };
        let jwk = json!({
            "use": "sig",
            "kty": "EC",
            "kid": kid,
            "alg": "ES256",
            "crv": "P-256",
            "x": B64URL.encode(x),
            "y": B64URL.encode(y),
        });
        TestKey {
            kid,
            alg: Algorithm::ES256,
            encoding,
            jwk,
            public_pem,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The public JWK (`use: sig`, `alg`, `kid`), as kube-apiserver publishes it.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// The public key as SPKI PEM (e.g. as an attacker's HMAC secret).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// The same key pair published under another kid.
    pub fn with_kid(&self, kid: &str) -> TestKey {
        let mut k = self.clone();
        k.kid = kid.to_string();
        k.jwk["kid"] = Value::String(kid.to_string());
        k
    }

    /// The same key pair pinned to another algorithm of its family (e.g. PS256 for an RSA key),
    /// published under `kid`.
    pub fn with_alg(&self, alg: Algorithm, kid: &str) -> TestKey {
        let mut k = self.with_kid(kid);
        k.alg = alg;
        k.jwk["alg"] = json!(alg_name(alg));
        k
    }

    /// The same key pair with a modified public JWK (e.g. `"use": "enc"`).
    pub fn with_jwk_field(&self, field: &str, value: Value) -> TestKey {
        let mut k = self.clone();
        k.jwk[field] = value;
        k
    }
}

/// A test issuer: an issuer URL and its published keys.
#[derive(Debug, Clone)]
pub struct TestIssuer {
    issuer: String,
    keys: Vec<TestKey>,
}

impl Default for TestIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl TestIssuer {
    /// [`TEST_ISSUER`] with one fresh RSA-2048 key (first, the default signer) and one P-256 key.
    pub fn new() -> TestIssuer {
        TestIssuer {
            issuer: TEST_ISSUER.to_string(),
            keys: vec![TestKey::rsa(), TestKey::ec()],
        }
    }

    pub fn with_keys(issuer: &str, keys: Vec<TestKey>) -> TestIssuer {
        TestIssuer {
            issuer: issuer.to_string(),
            keys,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn keys(&self) -> &[TestKey] {
        &self.keys
    }

    /// The first RSA key. Panics if there is none.
    pub fn rsa_key(&self) -> &TestKey {
        self.keys
            .iter()
            .find(|k| k.jwk["kty"] == "RSA")
            .expect("issuer has an RSA key")
    }

    /// The first EC key. Panics if there is none.
    pub fn ec_key(&self) -> &TestKey {
        self.keys
            .iter()
            .find(|k| k.jwk["kty"] == "EC")
            .expect("issuer has an EC key")
    }

    /// Publish another key (rotation: new key first, signing later).
    pub fn add_key(&mut self, key: TestKey) {
        self.keys.push(key);
    }

    /// Stop publishing a key (rotation: old key removed).
    pub fn remove_key(&mut self, kid: &str) {
        self.keys.retain(|k| k.kid != kid);
    }

    /// The JWKS document (`{"keys": [...]}`).
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys.iter().map(TestKey::jwk).collect::<Vec<_>>() })
    }

    pub fn jwks_json(&self) -> String {
        self.jwks().to_string()
    }

    /// The OIDC discovery document kube-apiserver serves for this issuer.
    pub fn discovery_json(&self) -> String {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/openid/v1/jwks", self.issuer),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        })
        .to_string()
    }

    /// Verifier settings accepting this issuer and the default audience.
    pub fn verifier_config(&self) -> VerifierConfig {
        VerifierConfig::new(vec![self.issuer.clone()])
    }

    /// A good token signed with the first key, issued now, valid 1 h.
    pub fn token(&self) -> TokenBuilder {
        self.token_with(&self.keys[0])
    }

    /// A good token signed with `key` (need not be published).
    pub fn token_with(&self, key: &TestKey) -> TokenBuilder {
        TokenBuilder::new(&self.issuer, key)
    }
}

fn random_uid() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Builds one token. Defaults mirror a kubelet-projected token: header `{alg, kid}`; claims
/// `aud: ["enforcer"]`, `exp = iat + 3600`, `iat = nbf = now`, `iss`, `jti`, `kubernetes.io`
/// `{namespace: "default", node, pod: {name: "client", uid}, serviceaccount: {name: "default",
/// uid}}`, `sub = system:serviceaccount:default:default`.
#[derive(Clone)]
pub struct TokenBuilder {
    key: TestKey,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    derive_sub: bool,
}

impl TokenBuilder {
    fn new(issuer: &str, key: &TestKey) -> TokenBuilder {
        let now = super::unix_now();
        let mut header = Map::new();
        header.insert("alg".into(), json!(alg_name(key.alg)));
        header.insert("kid".into(), json!(key.kid));
        let claims = json!({
            "aud": [DEFAULT_AUDIENCE],
            "exp": now + 3600,
            "iat": now,
            "iss": issuer,
            "jti": random_uid(),
            "kubernetes.io": {
                "namespace": "default",
                "node": {"name": "node-1", "uid": random_uid()},
                "pod": {"name": "client", "uid": random_uid()},
                "serviceaccount": {"name": "default", "uid": random_uid()},
            },
            "nbf": now,
            "sub": "",
        });
        let Value::Object(claims) = claims else {
            unreachable!("json! object")
        };
        TokenBuilder {
            key: key.clone(),
            header,
            claims,
            derive_sub: true,
        }
    }

    fn k8s(&mut self) -> &mut Map<String, Value> {
        if !matches!(self.claims.get("kubernetes.io"), Some(Value::Object(_))) {
            self.claims.insert("kubernetes.io".into(), json!({}));
        }
        match self.claims.get_mut("kubernetes.io") {
            Some(Value::Object(m)) => m,
            _ => unreachable!("just inserted"),
        }
    }

    /// Sign with another key (header `alg` and `kid` follow the key unless overridden after).
    pub fn signing_key(mut self, key: &TestKey) -> Self {
        self.header.insert("alg".into(), json!(alg_name(key.alg)));
        self.header.insert("kid".into(), json!(key.kid));
        self.key = key.clone();
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.k8s().insert("namespace".into(), json!(ns));
        self
    }

    pub fn service_account(mut self, name: &str, uid: &str) -> Self {
        self.k8s()
            .insert("serviceaccount".into(), json!({"name": name, "uid": uid}));
        self
    }

    pub fn pod(mut self, name: &str, uid: &str) -> Self {
        self.k8s()
            .insert("pod".into(), json!({"name": name, "uid": uid}));
        self
    }

    pub fn node(mut self, name: &str, uid: &str) -> Self {
        self.k8s()
            .insert("node".into(), json!({"name": name, "uid": uid}));
        self
    }

    pub fn issuer(self, iss: &str) -> Self {
        self.claim("iss", json!(iss))
    }

    pub fn audience(self, aud: &str) -> Self {
        self.claim("aud", json!([aud]))
    }

    pub fn audiences(self, aud: &[&str]) -> Self {
        self.claim("aud", json!(aud))
    }

    /// Set `sub` explicitly (otherwise derived from the `kubernetes.io` claim at signing).
    pub fn subject(mut self, sub: &str) -> Self {
        self.derive_sub = false;
        self.claims.insert("sub".into(), json!(sub));
        self
    }

    pub fn issued_at(self, t: u64) -> Self {
        self.claim("iat", json!(t))
    }

    pub fn not_before(self, t: u64) -> Self {
        self.claim("nbf", json!(t))
    }

    pub fn expires_at(self, t: u64) -> Self {
        self.claim("exp", json!(t))
    }

    /// `iat = nbf = now`, `exp = now + ttl`.
    pub fn issued(self, now: u64, ttl: u64) -> Self {
        self.issued_at(now).not_before(now).expires_at(now + ttl)
    }

    /// The pod uid currently in the token.
    pub fn pod_uid(&self) -> Option<String> {
        self.claims
            .get("kubernetes.io")
            .and_then(|k| k.get("pod"))
            .and_then(|p| p.get("uid"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// The `exp` currently in the token.
    pub fn exp(&self) -> Option<u64> {
        self.claims.get("exp").and_then(Value::as_u64)
    }

    /// Set any top-level claim to a raw JSON value (wrong types included). Setting `sub` this way
    /// also stops deriving it.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        if name == "sub" {
            self.derive_sub = false;
        }
        self.claims.insert(name.into(), value);
        self
    }

    /// Remove a claim: top-level (`"exp"`) or inside `kubernetes.io` (`"kubernetes.io.pod"`).
    pub fn without_claim(mut self, name: &str) -> Self {
        if let Some(inner) = name.strip_prefix("kubernetes.io.") {
            self.k8s().remove(inner);
        } else {
            if name == "sub" {
                self.derive_sub = false;
            }
            self.claims.remove(name);
        }
        self
    }

    /// Set a raw header field (e.g. `jku`, `jwk`, `alg`, `kid`).
    pub fn header(mut self, name: &str, value: Value) -> Self {
        self.header.insert(name.into(), value);
        self
    }

    pub fn kid(self, kid: &str) -> Self {
        self.header("kid", json!(kid))
    }

    pub fn without_kid(mut self) -> Self {
        self.header.remove("kid");
        self
    }

    fn final_claims(&self) -> Map<String, Value> {
        let mut claims = self.claims.clone();
        if self.derive_sub {
            let k = claims.get("kubernetes.io");
            let ns = k
                .and_then(|k| k.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let sa = k
                .and_then(|k| k.get("serviceaccount"))
                .and_then(|s| s.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            claims.insert(
                "sub".into(),
                json!(format!("system:serviceaccount:{ns}:{sa}")),
            );
        }
        claims
    }

    /// The claims as they will be signed.
    pub fn claims_json(&self) -> Value {
        Value::Object(self.final_claims())
    }

    fn signing_input_with_header(&self, header: &Map<String, Value>) -> String {
        let h = B64URL.encode(Value::Object(header.clone()).to_string());
        let c = B64URL.encode(Value::Object(self.final_claims()).to_string());
        format!("{h}.{c}")
    }

    /// Signing input with an explicit raw payload (e.g. duplicate keys or invalid JSON).
    fn signing_input_raw(&self, payload: &[u8]) -> String {
        let h = B64URL.encode(Value::Object(self.header.clone()).to_string());
        format!("{h}.{}", B64URL.encode(payload))
    }

    /// Sign with the builder's key and algorithm (whatever the header says).
    pub fn sign(&self) -> String {
        let input = self.signing_input_with_header(&self.header);
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &self.key.encoding, self.key.alg)
            .expect("sign test token");
        format!("{input}.{sig}")
    }

    /// Sign an arbitrary payload (bytes as given) with the builder's header and key.
    pub fn sign_raw_payload(&self, payload: &[u8]) -> String {
        let input = self.signing_input_raw(payload);
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &self.key.encoding, self.key.alg)
            .expect("sign test token");
        format!("{input}.{sig}")
    }

    /// `alg: HS256`, HMAC-keyed with `secret` (the classic key-confusion attack uses the issuer's
    /// public key PEM as the secret). The `kid` header is kept.
    pub fn sign_hs256(&self, secret: &[u8]) -> String {
        let mut header = self.header.clone();
        header.insert("alg".into(), json!("HS256"));
        let input = self.signing_input_with_header(&header);
        let key = EncodingKey::from_secret(secret);
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256)
            .expect("sign HS256 test token");
        format!("{input}.{sig}")
    }

    /// `alg: none` with an empty signature (`header.payload.`).
    pub fn unsigned(&self, alg: &str) -> String {
        let mut header = self.header.clone();
        header.insert("alg".into(), json!(alg));
        format!("{}.", self.signing_input_with_header(&header))
    }
}
