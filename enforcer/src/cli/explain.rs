//! `enforcer explain`: one flow's verdict and the policy and rule that decided it (offline), as
//! text, JSON or YAML; the exit code is the answer (0 allowed, 1 denied, 2 error), as with
//! `kubectl auth can-i`. A flow to a Service frontend (or to a node address on a node port) is
//! judged once per backend, as kube-proxy sends it to one of them.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use enforcer_policy::{
    compile::CompileOptions,
    evaluator::{DirVerdict, Endpoint, TierRuleRef},
    explain::{
        BackendOutcome, Backends, Explanation, ServiceFlow, ServiceVerdict, Side, Via, explain,
        explain_service, protocol_label,
    },
    state::PodRef,
};
use serde::Serialize;

use super::{
    input::{Input, load, require_pod},
    matrix::{Verdict, color, dot_str},
    output::{Exit, OutputFormat},
};

/// `enforcer explain -o`: text, JSON or YAML as every subcommand, or the flow drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainFormat {
    #[default]
    Text,
    Json,
    Yaml,
    // A doc comment here would make clap list every value on a line of its own.
    Dot,
}

/// `--protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Sctp => PROTO_SCTP,
        }
    }
}

/// Parses `NAMESPACE/POD` (or `NAMESPACE/WORKLOAD`) or an IP address.
pub fn parse_endpoint(s: &str) -> Result<Endpoint> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Endpoint::Ip(ip));
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Endpoint::Pod(PodRef::new(ns, name)))
        }
        _ => bail!("{s:?} is neither NAMESPACE/NAME nor an IP address"),
    }
}

/// What one flow is asked about.
#[derive(Clone, Debug)]
pub struct Query {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub require_identity: bool,
}

/// `enforcer explain -o json|yaml`: the documented shape (docs/cli.md).
#[derive(Clone, Debug, Serialize)]
pub struct ExplainReport {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    /// `allowed`, `denied`, `partly` (a Service flow allowed to some backends only) or
    /// `unknown` (a Service whose backends are not known).
    pub verdict: &'static str,
    /// An ordinary flow (absent for a flow to a Service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowReport>,
    /// A flow to a Service frontend or node port, judged per backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceReport>,
    #[serde(skip)]
    text: String,
    /// `-o dot`, for an ordinary flow.
    #[serde(skip)]
    dot: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowReport {
    pub allowed: bool,
    /// The addresses judged; absent when an end has no known address.
    pub addresses: Option<Addresses>,
    /// The pod ends with no known address: judged by labels, namespace and ports, matching no
    /// ipBlock.
    pub unaddressed: Vec<String>,
    /// Egress at the source.
    pub egress: SideReport,
    /// Ingress at the destination.
    pub ingress: SideReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct Addresses {
    pub source: IpAddr,
    pub destination: IpAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct SideReport {
    /// The pod whose policies were checked; absent when that end is not a pod.
    pub pod: Option<String>,
    pub allowed: bool,
    /// `not-a-pod`, `self`, `host`, `not-isolated`, `allowed-by-rule`, `denied`,
    /// `denied-no-identity`, `would-drop`, `accepted-by-tier`, `denied-by-tier`.
    pub decision: &'static str,
    /// The deciding policy (`namespace/name`, or `Kind/name` for a cluster policy) and rule
    /// index, for `allowed-by-rule`, `accepted-by-tier` and `denied-by-tier`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The deciding cluster policy rule, for `accepted-by-tier` and `denied-by-tier`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier_rule: Option<TierRuleReport>,
    /// The Admin tier rule that passed the flow on to NetworkPolicy and the Baseline tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed_by: Option<TierRuleReport>,
    /// The policies isolating the pod, for a denial.
    pub isolated_by: Vec<String>,
    /// The text explanation of this side.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    /// `namespace/name`.
    pub service: String,
    /// `cluster-ip`, `external-ip`, `load-balancer-ip` or `node-port`.
    pub via: &'static str,
    /// The Service port the flow arrives on; absent: no such port (not forwarded).
    pub service_port: Option<u16>,
    pub target_port: Option<String>,
    /// The backends; absent when the Service has no selector (unknown).
    pub backends: Option<Vec<BackendReport>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub pod: String,
    /// Why the pod is not a backend of this port, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_a_backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowReport>,
}

/// A cluster policy rule, as `explain` names it.
#[derive(Clone, Debug, Serialize)]
pub struct TierRuleReport {
    /// `Admin` or `Baseline`.
    pub tier: String,
    /// `Kind/name`.
    pub policy: String,
    /// The rule's name (`ingress[i]`/`egress[i]` when unnamed) and index.
    pub name: String,
    pub index: usize,
    /// As the policy's API version names it: `Accept`/`Allow`, `Deny` or `Pass`.
    pub action: &'static str,
}

fn tier_rule_report(r: &TierRuleRef) -> TierRuleReport {
    TierRuleReport {
        tier: r.tier.to_string(),
        policy: r.policy.clone(),
        name: r.rule.clone(),
        index: r.index,
        action: r.action,
    }
}

fn side_report(side: &Side) -> SideReport {
    let passed_by = match &side.verdict {
        DirVerdict::Passed { by, .. } => Some(tier_rule_report(by)),
        _ => None,
    };
    let decided = side.verdict.after_pass();
    let tier_rule = match decided {
        DirVerdict::TierAccepted(r) | DirVerdict::TierDenied(r) => Some(tier_rule_report(r)),
        _ => None,
    };
    let (decision, policy, rule, isolated_by) = match decided {
        _ if side.pod.is_none() => ("not-a-pod", None, None, Vec::new()),
        DirVerdict::NotEnforced => ("not-a-pod", None, None, Vec::new()),
        DirVerdict::SelfTraffic => ("self", None, None, Vec::new()),
        DirVerdict::Host => ("host", None, None, Vec::new()),
        DirVerdict::NotIsolated => ("not-isolated", None, None, Vec::new()),
        DirVerdict::Allowed {
            namespace,
            policy,
            index,
        } => (
            "allowed-by-rule",
            Some(format!("{namespace}/{policy}")),
            Some(*index),
            Vec::new(),
        ),
        DirVerdict::Denied { policies, .. } => ("denied", None, None, policies.clone()),
        DirVerdict::NoIdentity { policies, .. } => {
            ("denied-no-identity", None, None, policies.clone())
        }
        DirVerdict::WouldDrop { policies } => ("would-drop", None, None, policies.clone()),
        DirVerdict::TierAccepted(r) => (
            "accepted-by-tier",
            Some(r.policy.clone()),
            Some(r.index),
            Vec::new(),
        ),
        DirVerdict::TierDenied(r) => (
            "denied-by-tier",
            Some(r.policy.clone()),
            Some(r.index),
            Vec::new(),
        ),
        // Not reached: only the Admin tier passes, once (`after_pass` took it off).
        DirVerdict::Passed { .. } => ("passed", None, None, Vec::new()),
    };
    SideReport {
        pod: side.pod.as_ref().map(ToString::to_string),
        allowed: side.allowed(),
        decision,
        policy,
        rule,
        tier_rule,
        passed_by,
        isolated_by,
        reason: if side.pod.is_some() {
            side.verdict.to_string()
        } else {
            "allowed: that end is not a pod".into()
        },
    }
}

fn flow_report(e: &Explanation) -> FlowReport {
    FlowReport {
        allowed: e.allowed,
        addresses: e.addresses.map(|(source, destination)| Addresses {
            source,
            destination,
        }),
        unaddressed: e.unaddressed.iter().map(ToString::to_string).collect(),
        egress: side_report(&e.egress),
        ingress: side_report(&e.ingress),
    }
}

fn service_report(s: &ServiceFlow) -> ServiceReport {
    ServiceReport {
        service: s.service.clone(),
        via: match s.via {
            Via::Frontend(enforcer_policy::model::Frontend::ClusterIp) => "cluster-ip",
            Via::Frontend(enforcer_policy::model::Frontend::ExternalIp) => "external-ip",
            Via::Frontend(enforcer_policy::model::Frontend::LoadBalancer) => "load-balancer-ip",
            Via::NodePort => "node-port",
        },
        service_port: s.service_port.as_ref().map(|p| p.port),
        target_port: s.service_port.as_ref().map(|p| p.target.to_string()),
        backends: match &s.backends {
            Backends::Unknown => None,
            Backends::Pods(pods) => Some(
                pods.iter()
                    .map(|b| match &b.outcome {
                        BackendOutcome::NotABackend(why) => BackendReport {
                            pod: b.pod.to_string(),
                            not_a_backend: Some(why.clone()),
                            flow: None,
                        },
                        BackendOutcome::Judged(e) => BackendReport {
                            pod: b.pod.to_string(),
                            not_a_backend: None,
                            flow: Some(flow_report(e)),
                        },
                    })
                    .collect(),
            ),
        },
    }
}

impl ExplainReport {
    /// The answer as an exit code: 0 allowed, 1 denied (or allowed to some backends only),
    /// 2 when it cannot be known (a Service's backends unknown).
    pub fn exit(&self) -> Exit {
        match self.verdict {
            "allowed" => Exit::Yes,
            "unknown" => Exit::Error,
            _ => Exit::No,
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Explains one flow of the loaded input. An unknown pod or workload name is an error naming
/// it and the closest names, never a verdict.
pub fn explain_loaded(loaded: &super::input::Loaded, q: &Query) -> Result<ExplainReport> {
    let from = parse_endpoint(&q.from).context("--from")?;
    let to = parse_endpoint(&q.to).context("--to")?;
    for (flag, e) in [("--from", &from), ("--to", &to)] {
        if let Endpoint::Pod(r) = e {
            require_pod(loaded, r, flag)?;
        }
    }
    let protocol = q.protocol.number();
    let opts = CompileOptions {
        require_identity: q.require_identity,
        ..CompileOptions::default()
    };
    let cluster = &loaded.cluster;
    let mut report = ExplainReport {
        from: from.to_string(),
        to: to.to_string(),
        protocol: protocol_label(protocol),
        port: q.port,
        verdict: "denied",
        flow: None,
        service: None,
        text: String::new(),
        dot: None,
    };
    if let Some(s) = explain_service(cluster, &opts, &from, &to, protocol, q.port) {
        report.verdict = match s.verdict() {
            ServiceVerdict::Allowed => "allowed",
            ServiceVerdict::Denied => "denied",
            ServiceVerdict::Some { .. } => "partly",
            ServiceVerdict::Unknown => "unknown",
        };
        report.service = Some(service_report(&s));
        report.text = format!("{s}\n");
        return Ok(report);
    }
    let e = explain(cluster, &opts, &from, &to, protocol, q.port);
    report.verdict = if e.allowed { "allowed" } else { "denied" };
    report.flow = Some(flow_report(&e));
    report.text = format!("{e}\n");
    report.dot = Some(explain_dot(&e));
    Ok(report)
}

/// `enforcer explain`: the report in `format` and the answer as an exit code.
pub fn run(input: &Input, q: &Query, format: ExplainFormat) -> Result<(String, Exit)> {
    let loaded = load(input)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let report = explain_loaded(&loaded, q)?;
    let format = match format {
        ExplainFormat::Dot => {
            let Some(dot) = &report.dot else {
                bail!(
                    "-o dot draws a flow between pods or addresses; a flow to a Service is judged per backend: use -o text, json or yaml"
                );
            };
            return Ok((dot.clone(), report.exit()));
        }
        ExplainFormat::Text => OutputFormat::Text,
        ExplainFormat::Json => OutputFormat::Json,
        ExplainFormat::Yaml => OutputFormat::Yaml,
    };
    Ok((
        format.render(&report, || report.text.clone())?,
        report.exit(),
    ))
}

/// `enforcer explain DIR ...` as text (the tests' entry).
pub fn explain_report(
    dir: &Path,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
    require_identity: bool,
) -> Result<String> {
    let loaded = load(&Input::Dir(dir.to_path_buf()))?;
    let q = Query {
        from: from.into(),
        to: to.into(),
        port,
        protocol,
        require_identity,
    };
    Ok(explain_loaded(&loaded, &q)?.text)
}

/// One side's verdict in a few words, and the policies that selected the pod for it with what
/// each did (`allows` by a rule, `isolates`, or `would drop (audit)`).
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
        DirVerdict::WouldDrop { policies } => (
            format!("{dir}: allowed, would be dropped by audit policies"),
            policies
                .iter()
                .map(|p| (p.clone(), "would drop (audit)"))
                .collect(),
        ),
        DirVerdict::TierAccepted(r) => (
            format!("{dir}: allowed by {} tier {} {}", r.tier, r.policy, r.rule),
            vec![(format!("{}\n{}", r.policy, r.rule), "accepts")],
        ),
        DirVerdict::TierDenied(r) => (
            format!("{dir}: denied by {} tier {} {}", r.tier, r.policy, r.rule),
            vec![(format!("{}\n{}", r.policy, r.rule), "denies")],
        ),
        DirVerdict::Passed { by, then } => {
            let (summary, mut policies) = side_summary(dir, then);
            policies.insert(0, (format!("{}\n{}", by.policy, by.rule), "passes"));
            (
                format!("{summary} (passed by {} {})", by.policy, by.rule),
                policies,
            )
        }
    }
}

/// One flow's decision as a Graphviz graph: the source and the destination, the arrow between
/// them coloured by the verdict (denied: red and dashed), and on each side the policies that
/// selected that pod, the deciding rule among them.
pub fn explain_dot(e: &Explanation) -> String {
    let would_drop = [&e.egress, &e.ingress]
        .iter()
        .any(|s| matches!(s.verdict.after_pass(), DirVerdict::WouldDrop { .. }));
    let verdict = match (e.allowed, would_drop) {
        (true, false) => Verdict::Allowed,
        (true, true) => Verdict::WouldDrop,
        (false, _) => Verdict::Denied,
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
            _ if pod.as_ref().is_some_and(|p| e.unaddressed.contains(p)) => {
                format!("{name}\n(no address)")
            }
            _ => name,
        }
    };
    let (src_ip, dst_ip) = e
        .addresses
        .map_or((None, None), |(s, d)| (Some(s), Some(d)));
    let (egress, egress_policies) = side_summary("egress", &e.egress.verdict);
    let (ingress, ingress_policies) = side_summary("ingress", &e.ingress.verdict);
    let _ = writeln!(
        o,
        "  src [label={}];",
        dot_str(&format!(
            "{}\n{egress}",
            end(&e.from, &e.egress.pod, src_ip)
        ))
    );
    let _ = writeln!(
        o,
        "  dst [label={}];",
        dot_str(&format!(
            "{}\n{ingress}",
            end(&e.to, &e.ingress.pod, dst_ip)
        ))
    );
    for (side, node, policies) in [
        ("e", "src", egress_policies),
        ("i", "dst", ingress_policies),
    ] {
        for (i, (policy, what)) in policies.iter().enumerate() {
            let c = color(match *what {
                "allows" | "accepts" | "passes" => Verdict::Allowed,
                "isolates" | "denies" => Verdict::Denied,
                _ => Verdict::WouldDrop,
            });
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
    let word = match verdict {
        _ if e.addresses.is_none() && e.unaddressed.is_empty() => {
            "DENIED (no common address family)"
        }
        Verdict::Allowed => "ALLOWED",
        Verdict::WouldDrop => "ALLOWED (would drop once the audit policies enforce)",
        _ => "DENIED",
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
    fn endpoints_parse() {
        assert!(
            matches!(parse_endpoint("x/a").unwrap(), Endpoint::Pod(p) if p == PodRef::new("x", "a"))
        );
        assert!(matches!(
            parse_endpoint("10.0.0.1").unwrap(),
            Endpoint::Ip(_)
        ));
        assert!(parse_endpoint("nope").is_err());
    }

    #[test]
    fn json_names_the_admin_rule_that_passed_a_flow_and_the_deciding_tier_rule() {
        let rule = |tier, policy: &str, name: &str, index, action| TierRuleRef {
            tier,
            policy: policy.into(),
            rule: name.into(),
            index,
            action,
            refused: Vec::new(),
        };
        use enforcer_policy::tiers::Tier;
        let side = Side {
            pod: Some(PodRef::new("y", "b")),
            local: true,
            verdict: DirVerdict::Passed {
                by: rule(Tier::Admin, "ClusterNetworkPolicy/guard", "rest", 1, "Pass"),
                then: Box::new(DirVerdict::TierDenied(rule(
                    Tier::Baseline,
                    "ClusterNetworkPolicy/baseline",
                    "default-deny",
                    0,
                    "Deny",
                ))),
            },
        };
        let v = serde_json::to_value(side_report(&side)).unwrap();
        assert_eq!(v["allowed"], false);
        assert_eq!(v["decision"], "denied-by-tier");
        assert_eq!(v["policy"], "ClusterNetworkPolicy/baseline");
        assert_eq!(v["rule"], 0);
        assert_eq!(v["tier_rule"]["tier"], "Baseline");
        assert_eq!(v["tier_rule"]["name"], "default-deny");
        assert_eq!(v["passed_by"]["policy"], "ClusterNetworkPolicy/guard");
        assert_eq!(v["passed_by"]["name"], "rest");
        assert_eq!(v["passed_by"]["index"], 1);
        assert_eq!(v["passed_by"]["action"], "Pass");
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
        let report = explain_report(
            dir.path(),
            "x/client",
            "10.96.0.10",
            80,
            Protocol::Tcp,
            false,
        )
        .unwrap();
        for line in [
            "destination: Service x/web (cluster IP 10.96.0.10)",
            "backend x/web (10.0.0.1 -> 10.0.0.2 port 8080):",
            "  ingress at x/web: denied: isolated by policies [x/deny] and no rule allows it",
            "verdict: DENIED (to every backend)",
        ] {
            assert!(report.contains(line), "{line:?} in\n{report}");
        }
        // Any other address is an ordinary flow, as before.
        let report =
            explain_report(dir.path(), "x/client", "x/web", 8080, Protocol::Tcp, false).unwrap();
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
            format!(
                "{}---\n{}---\n{allow}",
                pod("client", "10.0.0.1"),
                pod("web", "10.0.0.2")
            ),
        )
        .unwrap();
        let loaded = load(&Input::Dir(dir.path().to_path_buf())).unwrap();
        let dot = |port| {
            let q = Query {
                from: "x/client".into(),
                to: "x/web".into(),
                port,
                protocol: Protocol::Tcp,
                require_identity: false,
            };
            explain_loaded(&loaded, &q).unwrap().dot.unwrap()
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
