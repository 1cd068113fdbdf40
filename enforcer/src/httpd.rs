//! The HTTP/1 serving loop of the agent's ports (health and attestation), hardened against
//! clients that hold connections open: one request per connection, a cap on connections at once
//! and per source address, a header read timeout, and a deadline for the whole connection (a
//! client that trickles its headers or its body is cut off; bodies are never read anyway).
//!
//! A connection past a cap is answered at once with a fixed 429 (its source has too many) or 503
//! (the port has too many) and closed, without reading it; refusals and timeouts are counted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use tokio::net::{TcpListener, TcpSocket};

/// What one port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once on the port.
    pub max_connections: usize,
    /// Connections open at once from one source address (IPv4-mapped addresses count as IPv4).
    pub max_per_source: usize,
    /// Time from accepting a connection to the end of its request headers.
    pub header_read_timeout: Duration,
    /// Time from accepting a connection to closing it, whatever it is doing.
    pub deadline: Duration,
    /// Request headers in bytes (431 beyond) and in number.
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_per_source: 8,
            header_read_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
            max_header_bytes: 24 * 1024,
            max_headers: 32,
        }
    }
}

/// Connections by what became of them, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    served: AtomicU64,
    refused_port: AtomicU64,
    refused_source: AtomicU64,
    timed_out: AtomicU64,
}

impl ConnStats {
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
    pub fn refused_port_limit(&self) -> u64 {
        self.refused_port.load(Ordering::Relaxed)
    }
    pub fn refused_source_limit(&self) -> u64 {
        self.refused_source.load(Ordering::Relaxed)
    }
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Appends the counter `name{result=...}` in the Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (result, n) in [
            ("served", self.served()),
            ("refused-port-limit", self.refused_port_limit()),
            ("refused-source-limit", self.refused_source_limit()),
            ("timed-out", self.timed_out()),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {n}");
        }
    }
}

/// Binds a listening socket. The unspecified IPv6 address (`[::]:P`) is bound dual-stack
/// (`IPV6_V6ONLY` off, whatever the host's default), so it serves IPv4 callers too, as
/// IPv4-mapped addresses; on a host without IPv6 it falls back to `0.0.0.0:P`, said in the log.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match bind_exact(addr) {
        Err(e) if is_any_v6(addr) && no_ipv6(&e) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            log::warn!("{addr}: IPv6 is not available here ({e}); serving IPv4 only on {v4}");
            bind_exact(v4)
        }
        r => r,
    }
}

fn is_any_v6(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified())
}

fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

fn bind_exact(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if is_any_v6(addr) {
        set_v6_only(&socket, false)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

fn set_v6_only(socket: &TcpSocket, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::from(on);
    // SAFETY: a valid socket descriptor and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Open connections, in total and by source.
#[derive(Default)]
struct Slots {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Holds one connection's place in [`Slots`] until dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

enum Admit {
    Yes(Slot),
    PortFull,
    SourceFull,
}

fn admit(slots: &Arc<Mutex<Slots>>, source: IpAddr, limits: &Limits) -> Admit {
    let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
    if s.total >= limits.max_connections {
        return Admit::PortFull;
    }
    let n = s.by_source.entry(source).or_insert(0);
    if *n >= limits.max_per_source {
        return Admit::SourceFull;
    }
    *n += 1;
    s.total += 1;
    Admit::Yes(Slot {
        slots: slots.clone(),
        source,
    })
}

const SOURCE_FULL: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 34\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too-many-connections\"}\r\n";
const PORT_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 34\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too-many-connections\"}\r\n";

/// Serves `app` on `listener` within `limits` until `shutdown` completes. Requests carry
/// `ConnectInfo<SocketAddr>` with the peer address as the socket gives it. `what` names the port
/// in logs.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stats: Arc<ConnStats>,
    what: &'static str,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // One request per connection: a caller asks once in a while, and a connection that
        // cannot be reused cannot be held open between requests.
        .keep_alive(false);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    log::warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let slot = match admit(&slots, peer.ip().to_canonical(), &limits) {
            Admit::Yes(slot) => slot,
            refused => {
                let (answer, counter) = match refused {
                    Admit::SourceFull => (SOURCE_FULL, &stats.refused_source),
                    _ => (PORT_FULL, &stats.refused_port),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                // Best effort and never waiting: the answer fits an empty send buffer.
                let _ = stream.try_write(answer);
                continue;
            }
        };
        let app = app.clone();
        let builder = builder.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = tower::ServiceExt::map_request(
                app,
                move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req
                },
            );
            let conn = builder.serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(svc),
            );
            match tokio::time::timeout(limits.deadline, conn).await {
                Ok(Ok(())) => {
                    stats.served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) if e.is_timeout() => {
                    stats.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    stats.timed_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_each_source_and_the_port_and_free_on_drop() {
        let limits = Limits {
            max_connections: 3,
            max_per_source: 2,
            ..Limits::default()
        };
        let slots = Arc::new(Mutex::new(Slots::default()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = admit(&slots, a, &limits);
        let a2 = admit(&slots, a, &limits);
        assert!(matches!(admit(&slots, a, &limits), Admit::SourceFull));
        let b1 = admit(&slots, b, &limits);
        assert!(matches!(admit(&slots, c, &limits), Admit::PortFull));
        drop(a1);
        assert!(matches!(admit(&slots, c, &limits), Admit::Yes(_)));
        drop((a2, b1));
        let s = slots.lock().unwrap();
        assert_eq!(s.total, 0);
        assert!(s.by_source.is_empty(), "no source is remembered once gone");
    }
}
