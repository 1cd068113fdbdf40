//! A stand-in Kubernetes API server on loopback, enough for the agent's watches: list (paged by
//! `limit` and `continue`, as the API server pages it) and watch (chunked, one JSON event a
//! line, from a resourceVersion) of namespaces, pods, network policies
//! and services, over plain HTTP. The real agent binary connects to it through a kubeconfig, so
//! the scale bench measures the agent's own kube client, reflectors and compile.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// The kinds the agent watches, by collection path (nodes empty: every pod is remote). The
/// cluster-wide policy kinds are left out: answered 404, as when their CRDs are not installed.
const KINDS: [(&str, &str, &str); 5] = [
    ("/api/v1/namespaces", "v1", "NamespaceList"),
    ("/api/v1/pods", "v1", "PodList"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicyList",
    ),
    ("/api/v1/services", "v1", "ServiceList"),
    ("/api/v1/nodes", "v1", "NodeList"),
];

#[derive(Default)]
struct Collection {
    /// (namespace, name) → the object's JSON text, with its resourceVersion.
    items: BTreeMap<(String, String), String>,
    /// Every change since start: (resourceVersion, the watch event's line).
    log: Vec<(u64, String)>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    collections: [Collection; 5],
}

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
    stop: AtomicBool,
}

/// The server; stops (and closes every watch) on drop.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

fn kind_index(kind: &str) -> Option<usize> {
    match kind {
        "Namespace" => Some(0),
        "Pod" => Some(1),
        "NetworkPolicy" => Some(2),
        "Service" => Some(3),
        _ => None,
    }
}

fn key(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    let s = |f: &str| m[f].as_str().unwrap_or_default().to_string();
    (s("namespace"), s("name"))
}

impl ApiServer {
    /// Serves `objects` on `listener` (bound where the agent can reach it).
    pub fn start(listener: TcpListener, objects: impl Iterator<Item = Value>) -> Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        {
            let mut inner = state.inner.lock().expect("fresh lock");
            for mut v in objects {
                let i = kind_index(v["kind"].as_str().unwrap_or_default())
                    .context("an object of a kind the agent does not watch")?;
                inner.rv += 1;
                v["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
                inner.collections[i]
                    .items
                    .insert(key(&v), serde_json::to_string(&v)?);
            }
        }
        listener.set_nonblocking(true)?;
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || {
                            let _ = serve(conn, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, state })
    }

    /// Applies one change as the API server would and streams it to the watches:
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub fn change(&self, event: &str, mut object: Value) -> Result<()> {
        let i = kind_index(object["kind"].as_str().unwrap_or_default())
            .context("an object of a kind the agent does not watch")?;
        let mut inner = self.state.inner.lock().expect("lock");
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let text = serde_json::to_string(&object)?;
        let c = &mut inner.collections[i];
        if event == "DELETED" {
            c.items.remove(&key(&object));
        } else {
            c.items.insert(key(&object), text.clone());
        }
        c.log
            .push((rv, format!("{{\"type\":\"{event}\",\"object\":{text}}}\n")));
        self.state.changed.notify_all();
        Ok(())
    }

    /// A kubeconfig naming this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: scale\n  cluster:\n    server: http://{}\ncontexts:\n- name: scale\n  context:\n    cluster: scale\n    user: scale\ncurrent-context: scale\nusers:\n- name: scale\n  user: {{}}\n",
                self.addr
            ),
        )
        .with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.state.changed.notify_all();
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Answers requests on one connection until the client closes it or a watch ends.
fn serve(conn: TcpStream, st: &State) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        // Headers: nothing the answers depend on (GETs carry no body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let Some(i) = KINDS.iter().position(|(p, _, _)| *p == path) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string();
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        };
        if matches!(query_param(query, "watch"), Some("true" | "1")) {
            let from: u64 = query_param(query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return watch(out, st, i, from);
        }
        let body = list_page(st, i, query);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        out.write_all(body.as_bytes())?;
    }
}

/// One page of the list of collection `i`, as the API server pages it: at most `limit` items
/// (all when unset), and a `continue` token while more remain, the list's resourceVersion that
/// of its first page. The token is `RV-OFFSET` (nothing here changes objects while a list is
/// being paged, so an offset into the sorted items names the same place on every page).
fn list_page(st: &State, i: usize, query: &str) -> String {
    let inner = st.inner.lock().expect("lock");
    let (_, api_version, kind) = KINDS[i];
    let items = &inner.collections[i].items;
    let (rv, from) = query_param(query, "continue")
        .and_then(|t| t.split_once('-'))
        .and_then(|(rv, at)| Some((rv.parse().ok()?, at.parse().ok()?)))
        .unwrap_or((inner.rv, 0usize));
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&String> = items.values().skip(from).take(limit).collect();
    let next = from + page.len();
    let token = if next < items.len() {
        format!("{rv}-{next}")
    } else {
        String::new()
    };
    let mut body = String::with_capacity(page.iter().map(|s| s.len() + 1).sum::<usize>() + 200);
    body.push_str(&format!(
        "{{\"apiVersion\":\"{api_version}\",\"kind\":\"{kind}\",\"metadata\":{{\"resourceVersion\":\"{rv}\",\"continue\":\"{token}\"}},\"items\":["
    ));
    for (n, item) in page.into_iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    body
}

/// Streams the changes of collection `i` after resourceVersion `from`, as they come, until the
/// server stops or the client goes.
fn watch(mut out: TcpStream, st: &State, i: usize, from: u64) -> Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let mut sent = 0usize;
    let mut inner = st.inner.lock().expect("lock");
    // Skip what the client's list already had.
    while sent < inner.collections[i].log.len() && inner.collections[i].log[sent].0 <= from {
        sent += 1;
    }
    loop {
        if st.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let pending: Vec<String> = inner.collections[i].log[sent..]
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        sent += pending.len();
        if !pending.is_empty() {
            drop(inner);
            let mut chunk = Vec::new();
            for p in pending {
                chunk.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
                chunk.extend_from_slice(p.as_bytes());
                chunk.extend_from_slice(b"\r\n");
            }
            out.write_all(&chunk)?;
            out.flush()?;
            inner = st.inner.lock().expect("lock");
            continue;
        }
        inner = st
            .changed
            .wait_timeout(inner, Duration::from_millis(500))
            .expect("lock")
            .0;
    }
}
