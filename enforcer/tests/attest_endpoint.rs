//! The attestation and health ports over real sockets on the loopback: connection caps per
//! source address and per port, the header timeout (slowloris) and the connection deadline, IPv6
//! and IPv4 callers on one dual-stack listener, one audit line per attestation without the
//! token, and signing keys fetched over HTTPS from an issuer whose CA only `--issuer-ca-file`
//! trusts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use enforcer::httpd::{self, Limits};
use enforcer::identity::server::audit::AuditLog;
use enforcer::identity::{
    AttestState, Bindings, IdentityMetrics, KeySource, KeySourceError, KeyStore, LivePod,
    PodDirectory, Verifier,
};
use enforcer::observe::{health, metrics::Status};
use enforcer_testkit::issuer::TestIssuer;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const UID: &str = "6c1d0a3e-2a43-4f4e-9d1b-0b1f3f1c0a01";
const V4_LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V4_OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const V6_LOCAL: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

fn issuer() -> &'static TestIssuer {
    static I: OnceLock<TestIssuer> = OnceLock::new();
    I.get_or_init(TestIssuer::new)
}

/// A token of pod `shop/<pod>` (uid [`UID`]), service account `checkout`.
fn token(pod: &str) -> String {
    issuer()
        .token()
        .namespace("shop")
        .service_account("checkout", "sa-1")
        .pod(pod, UID)
        .sign()
}

/// Pods by address: 127.0.0.1 is `shop/local-v4`, ::1 is `shop/local-v6`.
struct Pods;

impl Pods {
    fn all() -> [(IpAddr, &'static str); 2] {
        [(V4_LOCAL, "local-v4"), (V6_LOCAL, "local-v6")]
    }
}

impl PodDirectory for Pods {
    fn pod_by_ip(&self, ip: IpAddr) -> Option<LivePod> {
        let (_, name) = Pods::all().into_iter().find(|(a, _)| *a == ip)?;
        Some(LivePod {
            namespace: "shop".into(),
            name: name.into(),
            uid: UID.into(),
        })
    }

    fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        (namespace == "shop" && Pods::all().iter().any(|(_, n)| *n == name)).then(|| UID.into())
    }
}

/// The test issuer's JWKS, as is.
struct IssuerKeys;

impl KeySource for IssuerKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, KeySourceError>> {
        Box::pin(async { Ok(issuer().jwks_json().into_bytes()) })
    }
    fn describe(&self) -> String {
        "the test issuer".into()
    }
}

/// The attestation endpoint on a loopback port, its audit lines captured.
struct Endpoint {
    addr: SocketAddr,
    state: AttestState,
    audit: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn endpoint(bind: &str, limits: Limits) -> Endpoint {
    let metrics = Arc::new(IdentityMetrics::new());
    let keys = Arc::new(KeyStore::new(Arc::new(IssuerKeys)));
    keys.refresh().await.expect("keys");
    let audit = Arc::new(Mutex::new(Vec::new()));
    let sink = audit.clone();
    let state = AttestState::new(
        Arc::new(Verifier::new(issuer().verifier_config()).unwrap()),
        keys,
        Arc::new(Pods),
        Arc::new(Bindings::new()),
        metrics,
    )
    .with_limits(limits)
    .with_audit(AuditLog::new(
        Arc::new(move |line: &str| sink.lock().unwrap().push(line.to_string())),
        Some("node-a".into()),
    ));
    let listener = httpd::bind(bind.parse().unwrap()).expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(enforcer::identity::serve_listener(
        listener,
        state.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    Endpoint {
        addr,
        state,
        audit,
        stop: Some(stop),
    }
}

/// Caps that do not get in the way of a test about something else.
fn roomy() -> Limits {
    Limits {
        max_connections: 64,
        max_per_source: 16,
        header_read_timeout: Duration::from_secs(10),
        deadline: Duration::from_secs(20),
        ..Limits::default()
    }
}

/// A connection to `to` from the local address `from`.
async fn connect(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.expect("connect")
}

/// Everything the server sends until it closes (or 5 s pass).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn attest_request(auth: Option<&str>) -> String {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("POST /v1/attest HTTP/1.1\r\nHost: node\r\n{auth}Content-Length: 0\r\n\r\n")
}

/// One request from `from`: the whole answer.
async fn exchange(from: IpAddr, to: SocketAddr, request: &str) -> String {
    let mut s = connect(from, to).await;
    s.write_all(request.as_bytes()).await.unwrap();
    read_all(&mut s).await
}

/// Waits up to 3 s for `cond`.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_source_past_its_connection_cap_is_refused_while_another_gets_in() {
    let e = endpoint(
        "127.0.0.1:0",
        Limits {
            max_per_source: 2,
            ..roomy()
        },
    )
    .await;
    // Two connections from 127.0.0.1 that send nothing hold its two places.
    let mut held = vec![
        connect(V4_LOCAL, e.addr).await,
        connect(V4_LOCAL, e.addr).await,
    ];
    // A third from it is answered 429 at once and closed, without being read.
    let mut third = connect(V4_LOCAL, e.addr).await;
    let answer = read_all(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("too-many-connections"), "{answer}");
    // Another source is served meanwhile (the handler answers: no token).
    let answer = exchange(V4_OTHER, e.addr, &attest_request(None)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("missing-token"), "{answer}");
    // A place freed is a place again for the first source.
    held.pop();
    let mut served = String::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) && !served.starts_with("HTTP/1.1 401") {
        served = exchange(V4_LOCAL, e.addr, &attest_request(None)).await;
    }
    assert!(served.starts_with("HTTP/1.1 401"), "{served}");
    let c = &e.state.metrics.connections;
    assert!(c.refused_source_limit() >= 1);
    assert_eq!(c.refused_port_limit(), 0);
    drop(held);
}

#[tokio::test]
async fn a_port_past_its_connection_cap_refuses_every_source() {
    let e = endpoint(
        "127.0.0.1:0",
        Limits {
            max_connections: 2,
            max_per_source: 2,
            ..roomy()
        },
    )
    .await;
    let _held = [
        connect(V4_LOCAL, e.addr).await,
        connect(V4_LOCAL, e.addr).await,
    ];
    let mut other = connect(V4_OTHER, e.addr).await;
    let answer = read_all(&mut other).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(e.state.metrics.connections.refused_port_limit(), 1);
}

#[tokio::test]
async fn a_slowloris_trickling_headers_is_cut_at_the_header_timeout() {
    let e = endpoint(
        "127.0.0.1:0",
        Limits {
            header_read_timeout: Duration::from_millis(500),
            deadline: Duration::from_secs(10),
            ..roomy()
        },
    )
    .await;
    let s = connect(V4_LOCAL, e.addr).await;
    let (mut rx, mut tx) = s.into_split();
    let start = Instant::now();
    // A header line every 100 ms, for up to 5 s: never the end of the headers.
    let trickle = tokio::spawn(async move {
        let _ = tx
            .write_all(b"POST /v1/attest HTTP/1.1\r\nHost: node\r\n")
            .await;
        for n in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx
                .write_all(format!("X-{n}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.read_to_end(&mut got)).await;
    let cut_after = start.elapsed();
    trickle.abort();
    assert!(
        cut_after >= Duration::from_millis(450) && cut_after < Duration::from_millis(1500),
        "closed after {cut_after:?}"
    );
    let got = String::from_utf8_lossy(&got);
    assert!(!got.contains("HTTP/1.1 2"), "{got}");
    assert!(eventually(|| e.state.metrics.connections.timed_out() == 1).await);
    assert!(
        e.audit.lock().unwrap().is_empty(),
        "no request, no attestation"
    );
}

#[tokio::test]
async fn a_request_whose_body_never_comes_is_answered_and_closed() {
    let e = endpoint(
        "127.0.0.1:0",
        Limits {
            header_read_timeout: Duration::from_millis(500),
            deadline: Duration::from_secs(2),
            ..roomy()
        },
    )
    .await;
    let mut s = connect(V4_LOCAL, e.addr).await;
    let start = Instant::now();
    s.write_all(
        format!(
            "POST /v1/attest HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\n",
            token("local-v4")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The body is never read: the answer comes at once and the connection does not wait for
    // the rest (at most until the deadline).
    let answer = read_all(&mut s).await;
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn ipv6_and_ipv4_callers_are_served_on_one_dual_stack_port() {
    let e = endpoint("[::]:0", roomy()).await;
    let port = e.addr.port();
    let v6 = exchange(
        V6_LOCAL,
        SocketAddr::new(V6_LOCAL, port),
        &attest_request(Some(&format!("Bearer {}", token("local-v6")))),
    )
    .await;
    assert!(v6.starts_with("HTTP/1.1 200"), "{v6}");
    assert!(v6.contains("\"pod\":\"local-v6\""), "{v6}");
    // An IPv4 caller arrives as ::ffff:127.0.0.1 and is known by its IPv4 address.
    let v4 = exchange(
        V4_LOCAL,
        SocketAddr::new(V4_LOCAL, port),
        &attest_request(Some(&format!("Bearer {}", token("local-v4")))),
    )
    .await;
    assert!(v4.starts_with("HTTP/1.1 200"), "{v4}");
    let now = enforcer::identity::unix_now();
    assert_eq!(
        e.state.bindings.get(V6_LOCAL, now).map(|i| i.pod_name),
        Some("local-v6".to_string())
    );
    assert_eq!(
        e.state.bindings.get(V4_LOCAL, now).map(|i| i.pod_name),
        Some("local-v4".to_string())
    );
}

#[tokio::test]
async fn each_attestation_is_one_audit_line_without_the_token() {
    let e = endpoint("127.0.0.1:0", roomy()).await;
    let good = token("local-v4");
    let stolen = token("local-v6");
    let cases = [
        (
            "Bearer not.a.token".to_string(),
            "refused",
            "malformed",
            401,
        ),
        (format!("Bearer {stolen}"), "refused", "ip-mismatch", 403),
        (format!("Bearer {good}"), "accepted", "ok", 200),
    ];
    for (n, (auth, outcome, reason, status)) in cases.iter().enumerate() {
        let answer = exchange(V4_LOCAL, e.addr, &attest_request(Some(auth))).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        let lines = e.audit.lock().unwrap().clone();
        assert_eq!(lines.len(), n + 1, "one line per attestation: {lines:#?}");
        let line: Value = serde_json::from_str(&lines[n]).unwrap();
        assert_eq!(line["type"], "attestation");
        assert_eq!(line["node"], "node-a");
        assert_eq!(line["source"], "127.0.0.1");
        assert_eq!(line["outcome"], *outcome);
        assert_eq!(line["reason"], *reason);
        assert_eq!(line["status"], *status);
        let time = line["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        for t in [&good, &stolen] {
            let signature = t.rsplit('.').next().unwrap();
            assert!(!lines[n].contains(signature), "token in {}", lines[n]);
        }
    }
    let lines = e.audit.lock().unwrap().clone();
    let malformed: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (&malformed["pod"], &malformed["serviceAccount"]),
        (&Value::Null, &Value::Null)
    );
    // A valid token refused for its caller names whose it was, from its claims.
    let mismatch: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(mismatch["pod"]["name"], "local-v6");
    let accepted: Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(
        accepted["pod"],
        serde_json::json!({"namespace": "shop", "name": "local-v4", "uid": UID})
    );
    assert_eq!(accepted["serviceAccount"], "checkout");
}

#[tokio::test]
async fn the_health_port_caps_connections_and_closes_silent_ones_at_the_header_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(Status::default());
    let limits = Limits {
        max_connections: 2,
        max_per_source: 2,
        header_read_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(5),
        ..health::LIMITS
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(health::serve_listener(
        listener,
        status.clone(),
        limits,
        async {
            let _ = stopped.await;
        },
    ));
    let start = Instant::now();
    let mut silent = [connect(V4_LOCAL, addr).await, connect(V4_OTHER, addr).await];
    let mut third = connect(V4_OTHER, addr).await;
    assert!(read_all(&mut third).await.starts_with("HTTP/1.1 503"));
    // The silent ones are closed at the header timeout, freeing the port.
    for s in &mut silent {
        let _ = read_all(s).await;
    }
    let closed_after = start.elapsed();
    assert!(
        closed_after < Duration::from_millis(1500),
        "{closed_after:?}"
    );
    let ok = exchange(V4_LOCAL, addr, "GET /healthz HTTP/1.1\r\nHost: n\r\n\r\n").await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok\n"),
        "{ok}"
    );
    let metrics = status.render();
    assert!(
        metrics.contains("enforcer_health_connections_total{result=\"refused-port-limit\"} 1"),
        "{metrics}"
    );
    assert!(
        eventually(|| status
            .render()
            .contains("enforcer_health_connections_total{result=\"timed-out\"} 2"))
        .await
    );
    let _ = stop.send(());
}

/// A local HTTPS issuer: a CA of its own (trusted by nobody but `--issuer-ca-file`), a
/// certificate for `localhost` signed by it, serving the documents it is given.
struct HttpsIssuer {
    url: String,
    ca_pem: String,
    discovery: Arc<Mutex<String>>,
    jwks: Arc<Mutex<String>>,
}

async fn https_issuer() -> HttpsIssuer {
    use axum::routing::get;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "enforcer test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // Dual-stack, so `localhost` reaches it as ::1 or as 127.0.0.1.
    let listener = httpd::bind("[::]:0".parse().unwrap()).unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let discovery = Arc::new(Mutex::new(String::new()));
    let jwks = Arc::new(Mutex::new(String::new()));
    let (d, j) = (discovery.clone(), jwks.clone());
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { d.lock().unwrap().clone() }),
        )
        .route(
            "/openid/v1/jwks",
            get(move || async move { j.lock().unwrap().clone() }),
        );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA ends the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    HttpsIssuer {
        url,
        ca_pem: ca.pem(),
        discovery,
        jwks,
    }
}

#[tokio::test]
async fn keys_from_an_https_issuer_with_a_private_ca_verify_its_tokens() {
    use enforcer::identity::jwks::IssuerKeySource;
    let server = https_issuer().await;
    let issuer = TestIssuer::with_keys(&server.url, issuer().keys().to_vec());
    *server.discovery.lock().unwrap() = issuer.discovery_json();
    *server.jwks.lock().unwrap() = issuer.jwks_json();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &server.ca_pem).unwrap();

    let store = KeyStore::new(Arc::new(
        IssuerKeySource::new(&server.url, Some(&ca_file)).unwrap(),
    ));
    store
        .refresh()
        .await
        .expect("discovery and keys over HTTPS");
    let verifier = Verifier::new(issuer.verifier_config()).unwrap();
    let now = enforcer::identity::unix_now();
    let verified = verifier
        .verify(&issuer.token().sign(), &store.keys(), now)
        .expect("a token of the issuer verifies with the keys fetched");
    assert_eq!(verified.identity.namespace, "default");
    let ec = verifier.verify(
        &issuer.token_with(issuer.ec_key()).sign(),
        &store.keys(),
        now,
    );
    assert!(ec.is_ok(), "{ec:?}");

    // Without the CA file, the issuer's certificate is not trusted.
    let untrusted = KeyStore::new(Arc::new(IssuerKeySource::new(&server.url, None).unwrap()));
    let e = untrusted
        .refresh()
        .await
        .expect_err("untrusted certificate");
    assert!(e.to_string().contains(&server.url), "{e}");
    assert!(!untrusted.is_loaded());

    // A discovery document sending the keys over plain HTTP is refused, naming it; the keys
    // already loaded stay.
    let http_jwks = format!(
        "{}/openid/v1/jwks",
        server.url.replace("https://", "http://")
    );
    *server.discovery.lock().unwrap() =
        serde_json::json!({"issuer": server.url, "jwks_uri": http_jwks}).to_string();
    let e = store.refresh().await.expect_err("http jwks_uri");
    assert!(e.to_string().contains(&format!("{http_jwks:?}")), "{e}");
    assert!(
        verifier
            .verify(&issuer.token().sign(), &store.keys(), now)
            .is_ok()
    );

    // A document for another issuer is refused too.
    *server.discovery.lock().unwrap() =
        TestIssuer::with_keys("https://other.example", vec![]).discovery_json();
    let e = store.refresh().await.expect_err("another issuer");
    assert!(e.to_string().contains("https://other.example"), "{e}");

    // A CA file that is not PEM is refused by name.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    let e = IssuerKeySource::new(&server.url, Some(&ca_file))
        .err()
        .expect("bad CA file");
    assert!(e.to_string().contains("ca.pem"), "{e}");
}
