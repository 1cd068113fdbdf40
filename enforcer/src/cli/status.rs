//! `enforcer status`: the running agent at a glance, read from its `/status` (JSON), as a short
//! summary, JSON or YAML; exit 0 when ready, 1 when not, 2 when the agent cannot be read.
//! `--wait` waits for ready.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::output::{Exit, OutputFormat};
use crate::observe::report::StatusReport;

/// Reads the agent's `/status`.
pub fn fetch(addr: SocketAddr) -> Result<StatusReport> {
    let (code, body) = http_get(addr, "/status")
        .with_context(|| format!("reading http://{addr}/status: is the agent running?"))?;
    anyhow::ensure!(code == 200, "http://{addr}/status answered {code}");
    serde_json::from_str(&body).with_context(|| format!("reading http://{addr}/status"))
}

/// `enforcer status`: the report in `format`; with `wait`, polls until the agent is ready
/// (or the time is up, then reports as it is: not ready, exit 1). An agent not answering yet
/// is waited for too.
pub fn run(
    addr: SocketAddr,
    wait: Option<Duration>,
    format: OutputFormat,
) -> Result<(String, Exit)> {
    let deadline = wait.map(|w| Instant::now() + w);
    let report = loop {
        let got = fetch(addr);
        match (&got, deadline) {
            (Ok(r), Some(d)) if !r.ready && Instant::now() < d => {}
            (Err(_), Some(d)) if Instant::now() < d => {}
            _ => break got?,
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let exit = Exit::from_bool(report.ready);
    Ok((format.render(&report, || status_report(&report))?, exit))
}

/// The summary for people.
pub fn status_report(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ready: {}   generation: {} ({} observed)   pods enforced: {}   pending: {}   input problems: {}   reconciles: {} ({} failed)",
        if r.ready { "yes" } else { "NO" },
        r.generation.programmed,
        r.generation.observed,
        r.pods_enforced,
        r.pods_pending,
        r.input_problems,
        r.reconciles.total,
        r.reconciles.failed,
    );
    let _ = writeln!(
        o,
        "build: {} (revision {})",
        r.build.version, r.build.revision
    );
    if let Some(all) = r.reconciles.mean_seconds {
        let _ = writeln!(
            o,
            "per change, mean: {:.1} ms to compile and program, of which {:.1} ms compiling",
            all * 1e3,
            r.reconciles.mean_compile_seconds.unwrap_or(f64::NAN) * 1e3
        );
    }
    for p in &r.refused_policies {
        let _ = writeln!(o, "refused policy {p}");
    }
    let _ = writeln!(o, "\npackets by verdict and reason:");
    for p in r.packets.iter().filter(|p| p.packets > 0) {
        let _ = writeln!(o, "  {:<8} {:<14} {:>12}", p.verdict, p.reason, p.packets);
    }
    let _ = writeln!(o, "\nmaps (entries, capacity, fill):");
    for m in &r.maps {
        // The agent warns from the same fill on (and grows the peers maps there).
        let note = if m.fill >= 0.9 {
            "  NEARLY FULL"
        } else if m.fill >= 0.8 {
            "  filling up"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {:<12} {:>10} {:>10}  {:>6.2}%{note}",
            m.map,
            m.entries,
            m.capacity,
            m.fill * 100.0
        );
    }
    if !r.not_enforced.is_empty() {
        let _ = writeln!(
            o,
            "\nNOT ENFORCED ({} pods without programs: their traffic is not filtered):",
            r.not_enforced.len()
        );
        for n in &r.not_enforced {
            let _ = writeln!(o, "  {:<30} {:<14} {}", n.pod, n.reason, n.why);
        }
    }
    if !r.not_programmed.is_empty() || !r.entries_missing.is_empty() {
        let _ = writeln!(
            o,
            "\nNOT PROGRAMMED (a map is full; denied beyond their policies until there is room):"
        );
        for l in &r.not_programmed {
            let _ = writeln!(o, "  {l}");
        }
        for (map, n) in &r.entries_missing {
            let _ = writeln!(o, "  {map}: {n} entries missing");
        }
    }
    for e in &r.exits_not_attached {
        let _ = writeln!(o, "\nexit {} not attached: {}", e.interface, e.why);
    }
    let v = &r.verified;
    if !v.local.is_empty() || v.remote > 0 {
        let _ = writeln!(
            o,
            "\nverified identities ({} pods on this node, {} on others):",
            v.local.len(),
            v.remote
        );
        for p in &v.local {
            let _ = writeln!(
                o,
                "  {:<30} service account {}/{}",
                format!("{}/{}", p.namespace, p.pod),
                p.namespace,
                p.service_account
            );
        }
    }
    if r.reserved_labels_ignored > 0 {
        let _ = writeln!(
            o,
            "\nreserved labels ignored: {} pods or namespaces set enforcer.dev/ labels themselves; only a verified identity gives them (the log names each)",
            r.reserved_labels_ignored
        );
    }
    let _ = writeln!(o, "\nflow events lost: {}", r.events_lost);
    o
}

/// Minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{
        VerifiedPods, health,
        metrics::{Programming, Status},
    };
    use std::sync::{Arc, atomic::Ordering};

    /// The agent's router serving `/status` on a loopback port, for `run` to read.
    fn serve(status: Arc<Status>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                health::serve_listener(listener, status, health::LIMITS, std::future::pending())
                    .await
                    .unwrap();
            });
        });
        addr
    }

    /// `/status` carries what the summary shows; `run` exits 1 while not ready, `--wait`
    /// returns 0 once the agent becomes ready, and JSON is the served document.
    #[test]
    fn status_reads_the_agents_json_and_waits_for_ready() {
        let s = Arc::new(Status::default());
        s.pods_enforced.store(3, Ordering::Relaxed);
        s.programmed.store(5, Ordering::Relaxed);
        s.set_maps(vec![("POLICY".into(), 5, 10)]);
        s.set_refused(vec![
            "x/p: isolating the pods it selects (ingress) until it is fixed".into(),
        ]);
        s.set_programming(Programming {
            lines: vec!["x/c ingress denied (allow rules not written: POLICY full)".into()],
            missing: [("POLICY".to_string(), 2)].into(),
            ..Programming::default()
        });
        s.set_verified(VerifiedPods {
            local: [("x".into(), "a".into(), "frontend".into())].into(),
            remote: 4,
        });
        let addr = serve(s.clone());
        let (text, exit) = run(addr, None, OutputFormat::Text).unwrap();
        assert_eq!(exit, Exit::No, "{text}");
        for line in [
            "ready: NO   generation: 5",
            "pods enforced: 3",
            "refused policy x/p: isolating",
            "POLICY: 2 entries missing",
            "x/c ingress denied",
            "verified identities (1 pods on this node, 4 on others):",
            "50.00%",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert!(
            text.contains(&format!("revision {}", env!("ENFORCER_GIT_REVISION"))),
            "{text}"
        );
        let s2 = s.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            s2.ready.store(true, Ordering::Relaxed);
        });
        let (json, exit) = run(addr, Some(Duration::from_secs(10)), OutputFormat::Json).unwrap();
        assert_eq!(exit, Exit::Yes);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["pods_enforced"], 3);
        assert_eq!(v["generation"]["programmed"], 5);
        assert_eq!(v["maps"][0]["fill"], 0.5);
        assert_eq!(v["verified"]["local"][0]["service_account"], "frontend");
        assert_eq!(v["build"]["revision"], env!("ENFORCER_GIT_REVISION"));
    }

    /// No agent: an error (exit 2 from `main`), even with a short `--wait`.
    #[test]
    fn status_without_an_agent_is_an_error() {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = run(addr, Some(Duration::from_millis(300)), OutputFormat::Text).unwrap_err();
        assert!(format!("{e:#}").contains("is the agent running?"), "{e:#}");
    }
}
