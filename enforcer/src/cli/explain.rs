//! `enforcer explain`: one flow's verdict and the policy and rule that decided it (offline). A
//! flow to a Service frontend (or to a node address on a node port) is judged once per backend,
//! as kube-proxy sends it to one of them.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use enforcer_policy::{
    compile::CompileOptions,
    evaluator::Endpoint,
    explain::{explain, explain_service},
    state::PodRef,
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
    if let Some(s) = explain_service(&cluster, &opts, &from, &to, protocol, port) {
        return Ok(format!("{s}\n"));
    }
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

    #[test]
    fn a_flow_to_a_service_is_explained_for_each_backend() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, app: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {app}\nspec:\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        };
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: x\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: http}\n";
        let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: x\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            format!(
                "{}---\n{}---\n{svc}---\n{deny}",
                pod("client", "client", "10.0.0.1"),
                pod("web", "web", "10.0.0.2")
            ),
        )
        .unwrap();
        let report =
            explain_report(dir.path(), "x/client", "10.96.0.10", 80, "tcp", false).unwrap();
        for line in [
            "destination: Service x/web (cluster IP 10.96.0.10)",
            "backend x/web (10.0.0.1 -> 10.0.0.2 port 8080):",
            "  ingress at x/web: denied: isolated by policies [x/deny] and no rule allows it",
            "verdict: DENIED (to every backend)",
        ] {
            assert!(report.contains(line), "{line:?} in\n{report}");
        }
        // Any other address is an ordinary flow, as before.
        let report = explain_report(dir.path(), "x/client", "x/web", 8080, "tcp", false).unwrap();
        assert!(report.contains("verdict: DENIED\n"), "{report}");
    }
}
