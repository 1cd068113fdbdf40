//! The offline tools (`enforcer compile`, `enforcer explain`) as text reports, and node address
//! discovery. Same loader and compiler as the agent.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    manifests,
    policy::{
        compile::{Allocations, CompileOptions, compile},
        evaluator::Endpoint,
        explain::{explain, protocol_label},
        model::Cluster,
    },
    source::LastGoodPolicies,
    state::PodRef,
};

/// Loads a folder for the offline tools: problems are printed to stderr, invalid policies left
/// out (there is no last good version offline).
fn load(dir: &Path) -> Result<Cluster> {
    let loaded = manifests::load_dir(dir)?;
    for e in &loaded.errors {
        eprintln!("warning: {e}");
    }
    let mut cluster = loaded.cluster;
    for p in LastGoodPolicies::default().apply(&mut cluster) {
        eprintln!("warning: {p}");
    }
    Ok(cluster)
}

/// `enforcer compile DIR`: per pod, what is enforced; with `entries`, every map entry.
pub fn compile_report(dir: &Path, node_name: Option<String>, entries: bool) -> Result<String> {
    let cluster = load(dir)?;
    let opts = CompileOptions {
        node_name,
        ..CompileOptions::default()
    };
    let compiled = compile(&cluster, &opts, &mut Allocations::new());
    for e in &compiled.errors {
        eprintln!("warning: {e}");
    }
    let s = &compiled.state;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} pods enforced, {} policies, {} identities, {} policy entries, {} pod addresses, {} CIDR regions",
        s.endpoints.len(),
        cluster.policies.len(),
        compiled.identities.len(),
        s.policy.len(),
        s.peers_v4.len() + s.peers_v6.len(),
        s.cidrs_v4.len() + s.cidrs_v6.len()
    );
    for (pod, ep) in &s.endpoints {
        let ips: Vec<String> = ep.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            o,
            "\n{pod} ({}) endpoint {} identity {}",
            ips.join(", "),
            ep.info.id,
            ep.info.identity
        );
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let name = if dir == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            };
            if !ep.info.isolated(dir) {
                let _ = writeln!(
                    o,
                    "  {name}: not isolated (no policy selects it for {name})"
                );
                continue;
            }
            let mut rules: BTreeMap<String, usize> = BTreeMap::new();
            for (k, v) in s
                .policy
                .iter()
                .filter(|(k, _)| k.endpoint == ep.info.id && k.direction == dir)
            {
                let _ = k;
                let r = s
                    .rules
                    .get(&v.rule)
                    .map_or_else(|| format!("rule {}", v.rule), ToString::to_string);
                *rules.entry(r).or_default() += 1;
            }
            if rules.is_empty() {
                let _ = writeln!(o, "  {name}: isolated, nothing allowed");
            } else {
                let _ = writeln!(o, "  {name}: isolated, allowed by:");
                for (r, n) in rules {
                    let _ = writeln!(o, "    {r} ({n} entries)");
                }
            }
        }
    }
    if entries {
        let _ = writeln!(o, "\nidentities:");
        for (id, key) in compiled.identities.iter() {
            let _ = writeln!(o, "  {id}: {key:?}");
        }
        let _ = writeln!(o, "\naddresses:");
        for (a, p) in &s.peers_v4 {
            let _ = writeln!(o, "  {a} -> identity {}", p.identity);
        }
        for (a, p) in &s.peers_v6 {
            let _ = writeln!(o, "  {a} -> identity {}", p.identity);
        }
        for (c, p) in &s.cidrs_v4 {
            let _ = writeln!(o, "  {}/{} -> identity {}", c.addr, c.len, p.identity);
        }
        for (c, p) in &s.cidrs_v6 {
            let _ = writeln!(o, "  {}/{} -> identity {}", c.addr, c.len, p.identity);
        }
        let _ = writeln!(
            o,
            "\npolicy entries (endpoint, direction, peer identity, protocol, port/prefix -> rule):"
        );
        for (k, v) in &s.policy {
            let dir = if k.direction == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            };
            let peer = if k.identity == 0 {
                "any".to_string()
            } else {
                k.identity.to_string()
            };
            let proto = if k.protocol == 0 {
                "any".to_string()
            } else {
                protocol_label(k.protocol)
            };
            let rule = s
                .rules
                .get(&v.rule)
                .map_or_else(|| v.rule.to_string(), ToString::to_string);
            let _ = writeln!(
                o,
                "  {} {dir} {peer} {proto} {}/{} -> {rule}",
                k.endpoint, k.port, k.port_prefix_len
            );
        }
    }
    Ok(o)
}

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
    let _ = writeln!(o, "\nmaps (entries, fill):");
    for (_, l, v) in values
        .iter()
        .filter(|(n, _, _)| n == "enforcer_map_entries")
    {
        let map = l.get("map").cloned().unwrap_or_default();
        let fill = values
            .iter()
            .find(|(n, l2, _)| n == "enforcer_map_fill_ratio" && l2.get("map") == Some(&map))
            .map_or(0.0, |x| x.2);
        let _ = writeln!(o, "  {map:<12} {v:>10}  {:>6.2}%", fill * 100.0);
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
    let _ = writeln!(
        o,
        "\nflow events lost: {}",
        one("enforcer_events_lost_total")
    );
    o
}

/// Parses `NAMESPACE/POD` or an IP address.
pub fn parse_endpoint(s: &str) -> Result<Endpoint> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Endpoint::Ip(ip));
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Endpoint::Pod(PodRef::new(ns, name)))
        }
        _ => bail!("{s:?} is neither NAMESPACE/POD nor an IP address"),
    }
}

/// Parses tcp, udp or sctp (any case).
pub fn parse_protocol(s: &str) -> Result<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(PROTO_TCP),
        "udp" => Ok(PROTO_UDP),
        "sctp" => Ok(PROTO_SCTP),
        _ => bail!("unknown protocol {s:?}: use tcp, udp or sctp"),
    }
}

/// `enforcer explain DIR --from --to --port --protocol`.
pub fn explain_report(
    dir: &Path,
    from: &str,
    to: &str,
    port: u16,
    protocol: &str,
    require_identity: bool,
) -> Result<String> {
    let cluster = load(dir)?;
    let from = parse_endpoint(from).context("--from")?;
    let to = parse_endpoint(to).context("--to")?;
    let protocol = parse_protocol(protocol).context("--protocol")?;
    let opts = CompileOptions {
        require_identity,
        ..CompileOptions::default()
    };
    let e = explain(&cluster, &opts, &from, &to, protocol, port);
    Ok(format!("{e}\n"))
}

/// Every address on this network namespace's interfaces except loopback ones and IPv6
/// link-local ones: the node's own addresses.
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it states.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    out.push(IpAddr::V4(ip));
                }
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !ip.is_loopback() && !ip.is_unicast_link_local() {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn endpoints_and_protocols_parse() {
        assert!(
            matches!(parse_endpoint("x/a").unwrap(), Endpoint::Pod(p) if p == PodRef::new("x", "a"))
        );
        assert!(matches!(
            parse_endpoint("10.0.0.1").unwrap(),
            Endpoint::Ip(_)
        ));
        assert!(parse_endpoint("nope").is_err());
        assert_eq!(parse_protocol("UDP").unwrap(), PROTO_UDP);
        assert!(parse_protocol("icmp").is_err());
    }
}
