//! `enforcer explain`: one flow's verdict and the policy and rule that decided it (offline).

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use enforcer_policy::{
    compile::CompileOptions, evaluator::Endpoint, explain::explain, state::PodRef,
};

use super::compile::load;

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

#[cfg(test)]
mod tests {
    use super::*;

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
