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
    let opts = CompileOptions { node_name, ..CompileOptions::default() };
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
        let _ = writeln!(o, "\n{pod} ({}) endpoint {} identity {}", ips.join(", "), ep.info.id, ep.info.identity);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let name = if dir == DIR_INGRESS { "ingress" } else { "egress" };
            if !ep.info.isolated(dir) {
                let _ = writeln!(o, "  {name}: not isolated (no policy selects it for {name})");
                continue;
            }
            let mut rules: BTreeMap<String, usize> = BTreeMap::new();
            for (k, v) in s.policy.iter().filter(|(k, _)| k.endpoint == ep.info.id && k.direction == dir) {
                let _ = k;
                let r = s.rules.get(&v.rule).map_or_else(|| format!("rule {}", v.rule), ToString::to_string);
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
        for (id, key) in &compiled.identities {
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
        let _ = writeln!(o, "\npolicy entries (endpoint, direction, peer identity, protocol, port/prefix -> rule):");
        for (k, v) in &s.policy {
            let dir = if k.direction == DIR_INGRESS { "ingress" } else { "egress" };
            let peer = if k.identity == 0 { "any".to_string() } else { k.identity.to_string() };
            let proto = if k.protocol == 0 { "any".to_string() } else { protocol_label(k.protocol) };
            let rule = s.rules.get(&v.rule).map_or_else(|| v.rule.to_string(), ToString::to_string);
            let _ = writeln!(o, "  {} {dir} {peer} {proto} {}/{} -> {rule}", k.endpoint, k.port, k.port_prefix_len);
        }
    }
    Ok(o)
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
    let opts = CompileOptions { require_identity, ..CompileOptions::default() };
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
    fn endpoints_and_protocols_parse() {
        assert!(matches!(parse_endpoint("x/a").unwrap(), Endpoint::Pod(p) if p == PodRef::new("x", "a")));
        assert!(matches!(parse_endpoint("10.0.0.1").unwrap(), Endpoint::Ip(_)));
        assert!(parse_endpoint("nope").is_err());
        assert_eq!(parse_protocol("UDP").unwrap(), PROTO_UDP);
        assert!(parse_protocol("icmp").is_err());
    }
}
