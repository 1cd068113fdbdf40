//! `enforcer explain`: one flow's verdict and the policy and rule that decided it (offline). A
//! flow to a Service frontend (or to a node address on a node port) is judged once per backend,
//! as kube-proxy sends it to one of them.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use std::fmt::Write as _;

use clap::ValueEnum;
use enforcer_policy::{
    compile::CompileOptions,
    evaluator::{DirVerdict, Endpoint},
    explain::{Explanation, explain, explain_service, protocol_label},
    state::PodRef,
};

use super::{
    compile::load,
    matrix::{Verdict, color, dot_str},
};

/// `enforcer explain -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainFormat {
    Text,
    /// One flow's decision as a Graphviz graph.
    Dot,
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
    format: ExplainFormat,
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
        if format == ExplainFormat::Dot {
            bail!("-o dot draws a flow between pods or addresses; a flow to a Service is explained per backend with -o text");
        }
        return Ok(format!("{s}\n"));
    }
    let e = explain(&cluster, &opts, &from, &to, protocol, port);
    Ok(match format {
        ExplainFormat::Text => format!("{e}\n"),
        ExplainFormat::Dot => explain_dot(&e),
    })
}

/// One side's verdict in a few words, and the policies that selected the pod for it with what
/// each did (`allows` by a rule, or `isolates`).
fn side_summary(dir: &str, v: &DirVerdict) -> (String, Vec<(String, &'static str)>) {
    match v {
        DirVerdict::NotEnforced => (format!("{dir}: no policy applies"), Vec::new()),
        DirVerdict::SelfTraffic => (format!("{dir}: allowed (itself)"), Vec::new()),
        DirVerdict::Host => (format!("{dir}: allowed (its node)"), Vec::new()),
        DirVerdict::NotIsolated => (format!("{dir}: allowed (not isolated)"), Vec::new()),
        DirVerdict::Allowed {
            namespace,
            policy,
            index,
        } => (
            format!("{dir}: allowed by {namespace}/{policy} {dir}[{index}]"),
            vec![(format!("{namespace}/{policy}\n{dir}[{index}]"), "allows")],
        ),
        DirVerdict::Denied { policies, .. } => (
            format!("{dir}: denied, no rule allows it"),
            policies.iter().map(|p| (p.clone(), "isolates")).collect(),
        ),
        DirVerdict::NoIdentity { policies, .. } => (
            format!("{dir}: denied, a rule asks for a verified identity"),
            policies.iter().map(|p| (p.clone(), "isolates")).collect(),
        ),
    }
}

/// One flow's decision as a Graphviz graph: the source and the destination, the arrow between
/// them coloured by the verdict (denied: red and dashed), and on each side the policies that
/// selected that pod, the deciding rule among them.
pub fn explain_dot(e: &Explanation) -> String {
    let verdict = if e.allowed {
        Verdict::Allowed
    } else {
        Verdict::Denied
    };
    let mut o = String::from(
        "digraph explain {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    let end = |given: &Endpoint, pod: &Option<PodRef>, ip: Option<std::net::IpAddr>| {
        let name = pod
            .as_ref()
            .map_or_else(|| given.to_string(), ToString::to_string);
        match ip {
            Some(ip) if name != ip.to_string() => format!("{name}\n{ip}"),
            _ => name,
        }
    };
    let (src_ip, dst_ip) = e.addresses.map_or((None, None), |(s, d)| (Some(s), Some(d)));
    let (egress, egress_policies) = side_summary("egress", &e.egress.verdict);
    let (ingress, ingress_policies) = side_summary("ingress", &e.ingress.verdict);
    let _ = writeln!(
        o,
        "  src [label={}];",
        dot_str(&format!("{}\n{egress}", end(&e.from, &e.egress.pod, src_ip)))
    );
    let _ = writeln!(
        o,
        "  dst [label={}];",
        dot_str(&format!("{}\n{ingress}", end(&e.to, &e.ingress.pod, dst_ip)))
    );
    for (side, node, policies) in [
        ("e", "src", egress_policies),
        ("i", "dst", ingress_policies),
    ] {
        for (i, (policy, what)) in policies.iter().enumerate() {
            let c = if *what == "allows" {
                color(Verdict::Allowed)
            } else {
                color(Verdict::Denied)
            };
            let _ = writeln!(
                o,
                "  {side}{i} [label={}, shape=note, color={}];\n  {side}{i} -> {node} [label={}, style=dotted, color={}, fontcolor={}, arrowhead=none];",
                dot_str(&format!("policy {policy}")),
                dot_str(c),
                dot_str(what),
                dot_str(c),
                dot_str(c)
            );
        }
    }
    let port = if matches!(e.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        format!("{}/{}", e.port, protocol_label(e.protocol))
    } else {
        protocol_label(e.protocol)
    };
    let word = if e.addresses.is_none() {
        "DENIED (no common address family, or a pod is unknown)"
    } else if e.allowed {
        "ALLOWED"
    } else {
        "DENIED"
    };
    let style = if e.allowed { "solid" } else { "dashed" };
    let _ = writeln!(
        o,
        "  src -> dst [label={}, color={}, fontcolor={}, style={style}, penwidth=2];\n}}",
        dot_str(&format!("{port}\n{word}")),
        dot_str(color(verdict)),
        dot_str(color(verdict))
    );
    o
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
            explain_report(dir.path(), "x/client", "10.96.0.10", 80, "tcp", false, ExplainFormat::Text).unwrap();
        for line in [
            "destination: Service x/web (cluster IP 10.96.0.10)",
            "backend x/web (10.0.0.1 -> 10.0.0.2 port 8080):",
            "  ingress at x/web: denied: isolated by policies [x/deny] and no rule allows it",
            "verdict: DENIED (to every backend)",
        ] {
            assert!(report.contains(line), "{line:?} in\n{report}");
        }
        // Any other address is an ordinary flow, as before.
        let report = explain_report(dir.path(), "x/client", "x/web", 8080, "tcp", false, ExplainFormat::Text).unwrap();
        assert!(report.contains("verdict: DENIED\n"), "{report}");
    }

    /// `-o dot` draws the two ends, the verdict on the arrow between them, and the policies
    /// that decided each side: the allowing rule, or the isolating policies of a denial.
    #[test]
    fn dot_draws_the_flow_and_the_policies_that_decided_it() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {name}\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        };
        let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-from-client\n  namespace: x\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            format!("{}---\n{}---\n{allow}", pod("client", "10.0.0.1"), pod("web", "10.0.0.2")),
        )
        .unwrap();
        let dot = |port| {
            explain_report(dir.path(), "x/client", "x/web", port, "tcp", false, ExplainFormat::Dot)
                .unwrap()
        };
        let allowed = dot(80);
        for line in [
            "src [label=\"x/client\\n10.0.0.1\\negress: allowed (not isolated)\"];",
            "dst [label=\"x/web\\n10.0.0.2\\ningress: allowed by x/web-from-client ingress[0]\"];",
            "i0 [label=\"policy x/web-from-client\\ningress[0]\", shape=note, color=\"#1a7f37\"];",
            "src -> dst [label=\"80/TCP\\nALLOWED\", color=\"#1a7f37\", fontcolor=\"#1a7f37\", style=solid, penwidth=2];",
        ] {
            assert!(allowed.contains(line), "{line} in\n{allowed}");
        }
        let denied = dot(443);
        for line in [
            "i0 [label=\"policy x/web-from-client\", shape=note, color=\"#cf222e\"];",
            "i0 -> dst [label=\"isolates\"",
            "src -> dst [label=\"443/TCP\\nDENIED\", color=\"#cf222e\", fontcolor=\"#cf222e\", style=dashed, penwidth=2];",
        ] {
            assert!(denied.contains(line), "{line} in\n{denied}");
        }
    }
}
