//! A small load generator: TCP servers in a pod, and TCP_RR / TCP_CRR clients in another, each
//! on threads that entered the pod's network namespace (no extra processes).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use enforcer_testkit::netns::{Testbed, enter_netns, in_netns};
use serde::Serialize;

/// How a server port handles its connections.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// One connection at a time on the accept thread (connection-rate tests: no thread spawn
    /// per connection in the measured path).
    Inline,
    /// A thread per connection (long request/response connections).
    Threaded,
    /// Accepted and closed at once (probes that only need the handshake). Never waits on a
    /// peer: a probe whose RST the policy drops (its flow revoked mid-close) would otherwise
    /// hold an echo loop until its read timeout while the accept queue fills, and every probe
    /// after it would look dropped.
    Handshake,
}

/// Echo servers (each read is echoed back) on ports of one pod. Stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

/// Waits up to 100 ms for the listener to become readable.
fn readable(l: &TcpListener) -> bool {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

impl Servers {
    pub fn start(netns: &str, ports: &[(u16, Mode)]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        for &(port, mode) in ports {
            let path = Testbed::netns_path(netns);
            let (stop, tx) = (stop.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                let l = enter_netns(&path).and_then(|()| {
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                        .with_context(|| format!("bind :{port}"))
                });
                let l = match l {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    if !readable(&l) {
                        continue;
                    }
                    if let Ok((s, _)) = l.accept() {
                        match mode {
                            Mode::Inline => echo(s),
                            Mode::Handshake => drop(s),
                            Mode::Threaded => {
                                std::thread::spawn(move || echo(s));
                            }
                        }
                    }
                }
            }));
        }
        drop(tx);
        for r in rx.iter().take(ports.len()) {
            r?;
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A measured rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rate {
    /// Transactions (RR) or connections (CRR) per second.
    pub per_sec: f64,
    pub count: u64,
    pub secs: f64,
    pub errors: u64,
    /// TCP segments in + out of the client per transaction (from the pod's /proc/net/snmp).
    pub segments_per_op: f64,
}

/// (InSegs, OutSegs) of the calling thread's network namespace.
fn tcp_segments() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    if lines.len() < 2 {
        return (0, 0);
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let vals: Vec<&str> = lines[1].split_whitespace().collect();
    let get = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("InSegs"), get("OutSegs"))
}

/// One TCP_CRR transaction: connect, 1-byte request, 1-byte response, close.
fn crr_once(to: SocketAddr) -> bool {
    let mut b = [1u8; 1];
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok()
}

/// The connection of a TCP_RR load.
fn rr_connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// One TCP_RR transaction: 1-byte request, 1-byte response.
fn rr_once(s: &mut TcpStream) -> Result<()> {
    let mut b = [7u8; 1];
    s.write_all(&b)?;
    s.read_exact(&mut b)?;
    Ok(())
}

/// TCP_CRR: connect, 1-byte request, 1-byte response, close; one connection at a time.
pub fn crr(netns: &str, to: SocketAddr, warmup: Duration, dur: Duration) -> Result<Rate> {
    in_netns(netns, move || -> Result<Rate> {
        let end = Instant::now() + warmup;
        while Instant::now() < end {
            crr_once(to);
        }
        let mut errors = 0;
        let (i0, o0) = tcp_segments();
        let start = Instant::now();
        let mut count = 0u64;
        while start.elapsed() < dur {
            if crr_once(to) {
                count += 1;
            } else {
                errors += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let (i1, o1) = tcp_segments();
        Ok(Rate {
            per_sec: count as f64 / secs,
            count,
            secs,
            errors,
            segments_per_op: (i1 + o1 - i0 - o0) as f64 / count.max(1) as f64,
        })
    })?
}

/// TCP_RR: 1-byte request / 1-byte response over one connection.
pub fn rr(netns: &str, to: SocketAddr, warmup: Duration, dur: Duration) -> Result<Rate> {
    in_netns(netns, move || -> Result<Rate> {
        let mut s = rr_connect(to)?;
        let end = Instant::now() + warmup;
        while Instant::now() < end {
            rr_once(&mut s)?;
        }
        let (i0, o0) = tcp_segments();
        let start = Instant::now();
        let mut count = 0u64;
        while start.elapsed() < dur {
            rr_once(&mut s)?;
            count += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let (i1, o1) = tcp_segments();
        Ok(Rate {
            per_sec: count as f64 / secs,
            count,
            secs,
            errors: 0,
            segments_per_op: (i1 + o1 - i0 - o0) as f64 / count.max(1) as f64,
        })
    })?
}

/// Which transactions a [`Background`] load repeats.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Rr,
    Crr,
}

/// A TCP_RR or TCP_CRR load that runs until stopped, on a thread in the client pod, counting
/// its completed transactions where another thread can read them at any instant (the windows
/// of an interleaved measurement).
pub struct Background {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Which of the targets the transactions go to.
    target: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl Background {
    pub fn start(kind: Kind, netns: &str, to: SocketAddr) -> Result<Self> {
        Self::start_to(kind, netns, vec![to])
    }

    /// A load that sends to one of `targets` at a time, the first until [`Background::aim`]
    /// says otherwise (TCP_RR: a connection to each, opened at the start).
    pub fn start_to(kind: Kind, netns: &str, targets: Vec<SocketAddr>) -> Result<Self> {
        let (count, stop, target) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let path = Testbed::netns_path(netns);
        let (c, st, t) = (count.clone(), stop.clone(), target.clone());
        let thread = std::thread::spawn(move || -> Result<u64> {
            enter_netns(&path)?;
            let mut errors = 0u64;
            match kind {
                Kind::Rr => {
                    let mut conns = targets
                        .iter()
                        .map(|to| rr_connect(*to))
                        .collect::<Result<Vec<_>>>()?;
                    while !st.load(Ordering::Relaxed) {
                        rr_once(&mut conns[t.load(Ordering::Relaxed)])
                            .context("TCP_RR transaction")?;
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Kind::Crr => {
                    while !st.load(Ordering::Relaxed) {
                        if crr_once(targets[t.load(Ordering::Relaxed)]) {
                            c.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors += 1;
                        }
                    }
                }
            }
            Ok(errors)
        });
        Ok(Self {
            count,
            stop,
            target,
            thread: Some(thread),
        })
    }

    /// Sends the next transactions to target `i` of [`Background::start_to`].
    pub fn aim(&self, i: usize) {
        self.target.store(i, Ordering::Relaxed);
    }

    /// Transactions completed so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether the load thread has ended (an error: it runs until stopped).
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the load; the transactions that failed (CRR) or its error.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the load thread panicked")),
            None => Ok(0),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection + 1-byte echo to `to` succeeds within `timeout`, from the calling
/// thread's namespace.
pub fn reachable(to: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, timeout) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    let mut b = [1u8; 1];
    s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok()
}

/// [`reachable`] from inside `netns`.
pub fn reachable_from(netns: &str, to: SocketAddr, timeout: Duration) -> Result<bool> {
    in_netns(netns, move || reachable(to, timeout)).map_err(|e| anyhow!("{e:#}"))
}

/// The send time (since `t0`) of the first of a train of connection probes to `to` whose SYN
/// met the verdict `want`: a new non-blocking connect every `every`, each given `patience` to
/// complete. A probe that connects (or is refused: its SYN got through) saw "allowed"; one that
/// has not connected after `patience` (a dropped SYN is retransmitted only after a second) saw
/// "denied". Probes are judged in the order they were sent, so the answer is the first packet
/// that met the new verdict, however long its handshake took. `None` once no probe sent within
/// `limit` met it. Runs on the calling thread (in its network namespace).
pub fn first_verdict(
    to: std::net::SocketAddrV4,
    want: bool,
    t0: Instant,
    every: Duration,
    patience: Duration,
    limit: Duration,
) -> Result<Option<Duration>> {
    use std::{
        collections::VecDeque,
        os::fd::{FromRawFd, OwnedFd},
    };
    struct Probe {
        fd: OwnedFd,
        sent: Duration,
        outcome: Option<bool>,
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let open = || -> Result<OwnedFd> {
        // SAFETY: plain socket calls on a descriptor we own; pointers are to live locals.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("socket");
            }
            let fd = OwnedFd::from_raw_fd(fd);
            // Closing sends a RST: no TIME_WAIT pile-up over thousands of probes.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as u32,
            );
            let rc = libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            if rc != 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err).context("connect");
            }
            Ok(fd)
        }
    };
    let mut inflight: VecDeque<Probe> = VecDeque::new();
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        let sending = now.duration_since(t0) <= limit;
        if !sending && inflight.is_empty() {
            return Ok(None);
        }
        if sending && now >= next {
            inflight.push_back(Probe {
                fd: open()?,
                sent: now.duration_since(t0),
                outcome: None,
            });
            next = now + every;
        }
        let mut fds: Vec<libc::pollfd> = inflight
            .iter()
            .map(|p| libc::pollfd {
                fd: p.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a live array of pollfd of the length passed.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        let now = Instant::now();
        for (p, f) in inflight.iter_mut().zip(&fds) {
            if p.outcome.is_some() {
                continue;
            }
            if f.revents != 0 {
                let mut err: libc::c_int = 0;
                let mut len = size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: err and len are live locals of the sizes passed.
                unsafe {
                    libc::getsockopt(
                        p.fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&raw mut err).cast(),
                        &mut len,
                    )
                };
                p.outcome = Some(err == 0 || err == libc::ECONNREFUSED);
            } else if now.duration_since(t0) > p.sent + patience {
                p.outcome = Some(false);
            }
        }
        while let Some(p) = inflight.front() {
            match p.outcome {
                Some(o) if o == want => return Ok(Some(p.sent)),
                Some(_) => {
                    inflight.pop_front();
                }
                None => break,
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
