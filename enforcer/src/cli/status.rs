//! `enforcer status`: the running agent at a glance, read from its `/metrics`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// `enforcer status`: the agent's Prometheus text turned into a short summary.
pub fn status_report(metrics: &str) -> String {
    let mut values: Vec<(String, BTreeMap<String, String>, f64)> = Vec::new();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter_map(|kv| kv.split_once("=\""))
                    .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                    .collect();
                (n.to_string(), labels)
            }
            None => (head.to_string(), BTreeMap::new()),
        };
        values.push((name, labels, value));
    }
    let one = |name: &str| {
        values
            .iter()
            .find(|(n, l, _)| n == name && l.is_empty())
            .map_or(0.0, |v| v.2)
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ready: {}   pods enforced: {}   pending: {}   input problems: {}   reconciles: {} ({} failed)",
        if one("enforcer_ready") > 0.0 {
            "yes"
        } else {
            "NO"
        },
        one("enforcer_pods_enforced"),
        one("enforcer_pods_pending"),
        one("enforcer_input_problems"),
        one("enforcer_reconciles_total"),
        one("enforcer_reconcile_errors_total"),
    );
    let mean_ms = |h: &str| {
        let n = one(&format!("{h}_count"));
        (n > 0.0).then(|| one(&format!("{h}_sum")) / n * 1e3)
    };
    if let Some(all) = mean_ms("enforcer_reconcile_seconds") {
        let _ = writeln!(
            o,
            "per change, mean: {all:.1} ms to compile and program, of which {:.1} ms compiling",
            mean_ms("enforcer_compile_seconds").unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(o, "\npackets by verdict and reason:");
    for (n, l, v) in values
        .iter()
        .filter(|(n, _, v)| n == "enforcer_packets_total" && *v > 0.0)
    {
        let _ = n;
        let _ = writeln!(
            o,
            "  {:<8} {:<14} {v:>12}",
            l.get("verdict").map_or("", String::as_str),
            l.get("reason").map_or("", String::as_str)
        );
    }
    let _ = writeln!(o, "\nmaps (entries, capacity, fill):");
    for (_, l, v) in values
        .iter()
        .filter(|(n, _, _)| n == "enforcer_map_entries")
    {
        let map = l.get("map").cloned().unwrap_or_default();
        let of = |metric: &str| {
            values
                .iter()
                .find(|(n, l2, _)| n == metric && l2.get("map") == Some(&map))
                .map(|x| x.2)
        };
        let fill = of("enforcer_map_fill_ratio").unwrap_or(0.0);
        let capacity =
            of("enforcer_map_capacity").map_or_else(|| "?".to_string(), |c| c.to_string());
        // The agent warns from the same fill on (and grows the peers maps there).
        let note = if fill >= 0.9 {
            "  NEARLY FULL"
        } else if fill >= 0.8 {
            "  filling up"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {map:<12} {v:>10} {capacity:>10}  {:>6.2}%{note}",
            fill * 100.0
        );
    }
    let not_enforced: Vec<_> = values
        .iter()
        .filter(|(n, _, v)| n == "enforcer_pod_not_enforced" && *v > 0.0)
        .collect();
    let not_enforced_total: f64 = values
        .iter()
        .filter(|(n, _, _)| n == "enforcer_pods_not_enforced")
        .map(|x| x.2)
        .sum();
    if not_enforced_total > 0.0 {
        let _ = writeln!(
            o,
            "\nNOT ENFORCED ({not_enforced_total} pods without programs: their traffic is not filtered; /readyz says why):"
        );
        for (_, l, _) in not_enforced {
            let _ = writeln!(
                o,
                "  {:<30} {}",
                l.get("pod").map_or("", String::as_str),
                l.get("reason").map_or("", String::as_str)
            );
        }
    }
    let unprogrammed: Vec<_> = values
        .iter()
        .filter(|(n, _, v)| n == "enforcer_pod_unprogrammed" && *v > 0.0)
        .collect();
    let missing: Vec<_> = values
        .iter()
        .filter(|(n, _, v)| n == "enforcer_map_entries_missing" && *v > 0.0)
        .collect();
    if !unprogrammed.is_empty() || !missing.is_empty() {
        let _ = writeln!(
            o,
            "\nNOT PROGRAMMED (a map is full; denied beyond their policies until there is room):"
        );
        for (_, l, _) in unprogrammed {
            let _ = writeln!(
                o,
                "  {:<30} {:<10} {}",
                l.get("pod").map_or("", String::as_str),
                l.get("map").map_or("", String::as_str),
                l.get("direction").map_or("", String::as_str)
            );
        }
        for (_, l, v) in missing {
            let map = l.get("map").map_or("", String::as_str);
            let pods = values
                .iter()
                .find(|(n, l2, _)| {
                    n == "enforcer_endpoints_unprogrammed"
                        && l2.get("map").map(String::as_str) == Some(map)
                })
                .map_or(0.0, |x| x.2);
            let _ = writeln!(
                o,
                "  {map}: {v} entries missing, {pods} pods (or addresses) affected"
            );
        }
    }
    let ids: Vec<_> = values
        .iter()
        .filter(|(n, _, v)| n == "enforcer_identity_attestations_total" && *v > 0.0)
        .collect();
    if !ids.is_empty() {
        let _ = writeln!(o, "\nattestations:");
        for (_, l, v) in ids {
            let _ = writeln!(
                o,
                "  {:<9} {:<18} {v:>8}",
                l.get("outcome").map_or("", String::as_str),
                l.get("reason").map_or("", String::as_str)
            );
        }
    }
    let scope = |s: &str| {
        values
            .iter()
            .find(|(n, l, _)| {
                n == "enforcer_identity_verified_pods"
                    && l.get("scope").map(String::as_str) == Some(s)
            })
            .map_or(0.0, |x| x.2)
    };
    let (local, remote) = (scope("local"), scope("remote"));
    if local + remote > 0.0 {
        let _ = writeln!(
            o,
            "\nverified identities ({local} pods on this node, {remote} on others):"
        );
        for (_, l, _) in values
            .iter()
            .filter(|(n, _, v)| n == "enforcer_identity_verified" && *v > 0.0)
        {
            let get = |k: &str| l.get(k).map_or("", String::as_str);
            let _ = writeln!(
                o,
                "  {:<30} service account {}/{}",
                format!("{}/{}", get("namespace"), get("pod")),
                get("namespace"),
                get("service_account")
            );
        }
    }
    let ignored = one("enforcer_reserved_labels_ignored");
    if ignored > 0.0 {
        let _ = writeln!(
            o,
            "\nreserved labels ignored: {ignored} pods or namespaces set enforcer.dev/ labels themselves; only a verified identity gives them (the log names each)"
        );
    }
    let _ = writeln!(
        o,
        "\nflow events lost: {}",
        one("enforcer_events_lost_total")
    );
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

    #[test]
    fn status_lists_verified_identities() {
        let m = "enforcer_ready 1\nenforcer_identity_verified_pods{scope=\"local\"} 1\nenforcer_identity_verified_pods{scope=\"remote\"} 4\nenforcer_identity_verified{namespace=\"x\",pod=\"a\",service_account=\"frontend\"} 1\nenforcer_reserved_labels_ignored 2\n";
        let s = status_report(m);
        assert!(
            s.contains("verified identities (1 pods on this node, 4 on others):"),
            "{s}"
        );
        assert!(
            s.lines()
                .any(|l| l.trim_start().starts_with("x/a ")
                    && l.ends_with("service account x/frontend")),
            "{s}"
        );
        assert!(
            s.contains("reserved labels ignored: 2 pods or namespaces"),
            "{s}"
        );
        let s = status_report(
            "enforcer_ready 1\nenforcer_identity_verified_pods{scope=\"local\"} 0\nenforcer_reserved_labels_ignored 0\n",
        );
        assert!(
            !s.contains("verified identities") && !s.contains("reserved labels"),
            "{s}"
        );
    }

    #[test]
    fn status_shows_capacity_and_a_nearly_full_map() {
        let m = "enforcer_ready 1\nenforcer_map_entries{map=\"PEERS_V4\"} 230000\nenforcer_map_capacity{map=\"PEERS_V4\"} 262144\nenforcer_map_fill_ratio{map=\"PEERS_V4\"} 0.8774\nenforcer_map_entries{map=\"POLICY\"} 10\nenforcer_map_capacity{map=\"POLICY\"} 100\nenforcer_map_fill_ratio{map=\"POLICY\"} 0.1\n";
        let s = status_report(m);
        let line = |map: &str| {
            s.lines()
                .find(|l| l.trim_start().starts_with(map))
                .unwrap_or_else(|| panic!("no {map} line in {s}"))
                .to_string()
        };
        let peers = line("PEERS_V4");
        assert!(
            peers.contains("230000") && peers.contains("262144") && peers.contains("87.74%"),
            "{peers}"
        );
        assert!(peers.ends_with("filling up"), "{peers}");
        assert!(line("POLICY").ends_with("10.00%"), "{s}");
        let s = status_report(&m.replace("0.8774", "0.95"));
        assert!(s.contains("NEARLY FULL"), "{s}");
    }

    #[test]
    fn status_summarises_metrics() {
        let m = "enforcer_ready 1\nenforcer_pods_enforced 3\nenforcer_packets_total{verdict=\"dropped\",reason=\"policy-denied\"} 7\nenforcer_map_entries{map=\"POLICY\"} 5\nenforcer_map_fill_ratio{map=\"POLICY\"} 0.5\nenforcer_reconcile_seconds_sum 0.04\nenforcer_reconcile_seconds_count 4\nenforcer_compile_seconds_sum 0.012\nenforcer_compile_seconds_count 4\n";
        let s = status_report(m);
        assert!(
            s.contains(
                "per change, mean: 10.0 ms to compile and program, of which 3.0 ms compiling"
            ),
            "{s}"
        );
        assert!(
            s.contains("ready: yes") && s.contains("pods enforced: 3"),
            "{s}"
        );
        assert!(
            s.contains("dropped") && s.contains("policy-denied") && s.contains('7'),
            "{s}"
        );
        assert!(s.contains("POLICY") && s.contains("50.00%"), "{s}");
        assert!(!s.contains("NOT PROGRAMMED"), "{s}");
        assert!(!s.contains("NOT ENFORCED"), "{s}");
        let m = "enforcer_ready 0\nenforcer_pods_not_enforced{reason=\"no-interface\"} 0\nenforcer_pods_not_enforced{reason=\"not-own-veth\"} 1\nenforcer_pod_not_enforced{pod=\"x/a\",reason=\"not-own-veth\"} 1\n";
        let s = status_report(m);
        assert!(
            s.contains("NOT ENFORCED (1 pods") && s.contains("x/a") && s.contains("not-own-veth"),
            "{s}"
        );
        let m = "enforcer_ready 0\nenforcer_pod_unprogrammed{pod=\"x/c\",map=\"POLICY\",direction=\"ingress\"} 1\nenforcer_map_entries_missing{map=\"POLICY\"} 2\nenforcer_map_entries_missing{map=\"ENDPOINTS\"} 0\nenforcer_endpoints_unprogrammed{map=\"POLICY\"} 1\n";
        let s = status_report(m);
        assert!(
            s.contains("ready: NO") && s.contains("NOT PROGRAMMED"),
            "{s}"
        );
        assert!(
            s.lines()
                .any(|l| l.contains("x/c") && l.contains("POLICY") && l.contains("ingress")),
            "{s}"
        );
        assert!(
            s.contains("POLICY: 2 entries missing, 1 pods (or addresses) affected")
                && !s.contains("ENDPOINTS:"),
            "{s}"
        );
    }
}
