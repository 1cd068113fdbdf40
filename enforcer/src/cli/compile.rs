//! `enforcer compile`: a folder of manifests (or a live cluster) in, what each pod gets (and
//! every map entry) out, as text, JSON or YAML. Same loader and compiler as the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Result;
use enforcer_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_SERVICE};
use enforcer_policy::{
    compile::{Allocations, CompileOptions, compile},
    evaluator::pods_as_written,
    explain::protocol_label,
    model::{Cluster, pod_ips},
};
use serde::Serialize;

use super::{
    input::{Input, Loaded, load as load_input},
    output::{Exit, OutputFormat},
};

/// Loads a folder for the offline tools: problems are printed to stderr ([`load_warned`]).
pub fn load(dir: &Path) -> Result<Cluster> {
    let (cluster, warnings) = load_warned(dir)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(cluster)
}

/// Loads a folder for the offline tools, with its problems ([`super::input::load`]).
pub fn load_warned(dir: &Path) -> Result<(Cluster, Vec<String>)> {
    let loaded = load_input(&Input::Dir(dir.to_path_buf()))?;
    Ok((loaded.cluster, loaded.warnings))
}

/// `enforcer compile -o json|yaml`: the documented shape (docs/cli.md).
#[derive(Clone, Debug, Serialize)]
pub struct CompileReport {
    pub summary: Summary,
    /// Problems with the input: unreadable objects, bad Services, reserved labels set by hand.
    pub warnings: Vec<String>,
    /// Problems found compiling (invalid policies, duplicate addresses, too many pods).
    pub errors: Vec<String>,
    pub refused: Vec<RefusedReport>,
    pub pods: Vec<PodReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<Entries>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub pods_enforced: usize,
    pub policies: usize,
    pub policies_refused: usize,
    /// ClusterNetworkPolicies, AdminNetworkPolicies and BaselineAdminNetworkPolicies.
    pub cluster_policies: usize,
    /// Of those, the ones enforced as their fail-closed stand-in.
    pub cluster_policies_refused: usize,
    pub nodes: usize,
    pub identities: usize,
    pub policy_entries: usize,
    pub pod_addresses: usize,
    pub cidr_regions: usize,
    pub service_frontends: usize,
    pub node_ports: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RefusedReport {
    pub namespace: String,
    pub name: String,
    pub consequence: String,
    pub errors: Vec<FieldError>,
    /// The pods it isolates.
    pub isolates: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodReport {
    /// `namespace/name` (of the workload, for a template).
    pub pod: String,
    /// `Pod`, or the workload kind whose template this is.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Its addresses; empty when none is known (a pod as written, a template).
    pub addresses: Vec<IpAddr>,
    pub endpoint: u32,
    pub identity: u32,
    pub ingress: DirectionReport,
    pub egress: DirectionReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct DirectionReport {
    /// Whether a policy selects the pod for this direction (then only what a rule allows
    /// passes).
    pub isolated: bool,
    /// The refused policies isolating it.
    pub refused_by: Vec<String>,
    /// The rules allowing something, with their map entries.
    pub allowed_by: Vec<RuleEntries>,
    /// When only audit policies select the pod for this direction: those policies (what they
    /// deny passes, reported as would-drop).
    pub audited_by: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleEntries {
    pub rule: String,
    pub entries: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Entries {
    pub identities: Vec<IdentityEntry>,
    pub addresses: Vec<AddressEntry>,
    /// `port/PROTOCOL` of the node ports.
    pub node_ports: Vec<String>,
    pub policy: Vec<PolicyEntry>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityEntry {
    pub id: u32,
    /// What the identity stands for (pod facts and ipBlocks), informational.
    pub description: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct AddressEntry {
    /// An address or a CIDR.
    pub address: String,
    pub identity: u32,
    /// For an address standing in for a pod with no known address: that pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stands_for: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyEntry {
    pub endpoint: u32,
    pub direction: &'static str,
    /// `None`: any peer.
    pub peer_identity: Option<u32>,
    /// `None`: any protocol.
    pub protocol: Option<String>,
    pub port: u16,
    pub port_prefix_len: u8,
    pub rule: String,
}

/// The first of the addresses that stand in for pods with no known address: IPv6's
/// discard-only prefix (RFC 6666), never a pod's.
const STAND_IN_PREFIX: u128 = 0x0100_0000_0000_0000_0000_0000_0000_0000;

/// Gives each pod with no known address (a Pod as written, a workload's template) a stand-in
/// address, so the compiler (which works on addresses) compiles it as the pod it will be: what
/// its policies allow depends on labels, namespaces and ports, not on the address. Returns the
/// stand-ins.
fn with_stand_ins(cluster: &mut Cluster) -> BTreeMap<IpAddr, String> {
    let unaddressed: BTreeSet<_> = pods_as_written(cluster)
        .into_iter()
        .filter(|(_, p)| pod_ips(p).is_empty())
        .map(|(r, _)| r)
        .collect();
    let mut out = BTreeMap::new();
    for (i, pod) in cluster.pods.iter_mut().enumerate() {
        let r = enforcer_policy::model::pod_ref(pod);
        if !unaddressed.contains(&r) || out.values().any(|v: &String| *v == r.to_string()) {
            continue;
        }
        let ip = IpAddr::V6(Ipv6Addr::from(STAND_IN_PREFIX + i as u128 + 1));
        Arc::make_mut(pod).ips = Box::new([ip]);
        out.insert(ip, r.to_string());
    }
    out
}

/// Builds the report of `enforcer compile`.
pub fn compile_loaded(loaded: &Loaded, node_name: Option<String>, entries: bool) -> CompileReport {
    let mut cluster = loaded.cluster.clone();
    let stand_ins = with_stand_ins(&mut cluster);
    let opts = CompileOptions {
        node_name,
        ..CompileOptions::default()
    };
    let compiled = compile(&cluster, &opts, &mut Allocations::new());
    let s = &compiled.state;
    let frontends = s
        .peers_v4
        .values()
        .chain(s.peers_v6.values())
        .filter(|p| p.identity == IDENTITY_SERVICE)
        .count();
    let summary = Summary {
        pods_enforced: s.endpoints.len(),
        policies: cluster.policies.len(),
        policies_refused: compiled.refused.len(),
        cluster_policies: cluster.cluster_policies.len(),
        cluster_policies_refused: cluster
            .cluster_policies
            .iter()
            .filter(|p| !p.refused.is_empty())
            .count(),
        nodes: cluster.nodes.len(),
        identities: compiled.identities.len(),
        policy_entries: s.policy.len(),
        pod_addresses: s.peers_v4.len() + s.peers_v6.len() - frontends - stand_ins.len(),
        cidr_regions: s.cidrs_v4.len() + s.cidrs_v6.len(),
        service_frontends: frontends,
        node_ports: s.node_ports.len(),
    };
    let refused = compiled
        .refused
        .iter()
        .map(|r| RefusedReport {
            namespace: r.refusal.namespace.clone(),
            name: r.refusal.name.clone(),
            consequence: r.refusal.consequence(),
            errors: r
                .refusal
                .errors
                .iter()
                .map(|e| FieldError {
                    field: e.field.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            isolates: r.pods.iter().map(ToString::to_string).collect(),
        })
        .collect();
    let mut pods = Vec::new();
    for (pod, ep) in &s.endpoints {
        let direction = |dir: u8| {
            // Audit only: enforced as not isolated, so reported that way, naming the audit.
            if !ep.info.isolated(dir) || enforcer_common::audit_only_in(ep.info.flags, dir) {
                return DirectionReport {
                    isolated: false,
                    refused_by: Vec::new(),
                    allowed_by: Vec::new(),
                    audited_by: s
                        .audited
                        .get(&(ep.info.id, dir))
                        .cloned()
                        .unwrap_or_default(),
                };
            }
            // The refused policies isolating it: the isolation (or part of it) is theirs.
            let refused_by = compiled
                .refused
                .iter()
                .filter(|r| {
                    let f = &r.refusal;
                    (if dir == DIR_INGRESS {
                        f.ingress
                    } else {
                        f.egress
                    }) && r.pods.contains(pod)
                })
                .map(|r| format!("{}/{}", r.refusal.namespace, r.refusal.name))
                .collect();
            let mut rules: BTreeMap<String, usize> = BTreeMap::new();
            for (_, v) in s
                .policy
                .iter()
                .filter(|(k, _)| k.endpoint == ep.info.id && k.direction == dir)
            {
                let r = s
                    .rule(v.rule)
                    .map_or_else(|| format!("rule {}", v.rule), ToString::to_string);
                *rules.entry(r).or_default() += 1;
            }
            DirectionReport {
                isolated: true,
                audited_by: Vec::new(),
                refused_by,
                allowed_by: rules
                    .into_iter()
                    .map(|(rule, entries)| RuleEntries { rule, entries })
                    .collect(),
            }
        };
        let origin = loaded.origin(pod);
        pods.push(PodReport {
            pod: pod.to_string(),
            kind: origin.kind,
            file: origin.file,
            addresses: ep
                .ips
                .iter()
                .copied()
                .filter(|ip| !stand_ins.contains_key(ip))
                .collect(),
            endpoint: ep.info.id,
            identity: ep.info.identity,
            ingress: direction(DIR_INGRESS),
            egress: direction(DIR_EGRESS),
        });
    }
    let entries = entries.then(|| {
        let stands_for = |ip: &IpAddr| stand_ins.get(ip).cloned();
        let mut addresses: Vec<AddressEntry> = Vec::new();
        for (a, p) in &s.peers_v4 {
            addresses.push(AddressEntry {
                address: a.to_string(),
                identity: p.identity,
                stands_for: stands_for(&IpAddr::V4(*a)),
            });
        }
        for (a, p) in &s.peers_v6 {
            addresses.push(AddressEntry {
                address: a.to_string(),
                identity: p.identity,
                stands_for: stands_for(&IpAddr::V6(*a)),
            });
        }
        for (c, p) in &s.cidrs_v4 {
            addresses.push(AddressEntry {
                address: format!("{}/{}", c.addr, c.len),
                identity: p.identity,
                stands_for: None,
            });
        }
        for (c, p) in &s.cidrs_v6 {
            addresses.push(AddressEntry {
                address: format!("{}/{}", c.addr, c.len),
                identity: p.identity,
                stands_for: None,
            });
        }
        Entries {
            identities: compiled
                .identities
                .iter()
                .map(|(id, key)| IdentityEntry {
                    id: *id,
                    description: format!("{key:?}"),
                })
                .collect(),
            addresses,
            node_ports: s
                .node_ports
                .iter()
                .map(|k| format!("{}/{}", k.port, protocol_label(k.protocol)))
                .collect(),
            policy: s
                .policy
                .iter()
                .map(|(k, v)| PolicyEntry {
                    endpoint: k.endpoint,
                    direction: if k.direction == DIR_INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    },
                    peer_identity: (k.identity != 0).then_some(k.identity),
                    protocol: (k.protocol != 0).then(|| protocol_label(k.protocol)),
                    port: k.port,
                    port_prefix_len: k.port_prefix_len,
                    rule: s
                        .rule(v.rule)
                        .map_or_else(|| v.rule.to_string(), ToString::to_string),
                })
                .collect(),
        }
    });
    CompileReport {
        summary,
        warnings: loaded.warnings.clone(),
        errors: compiled.errors.iter().map(ToString::to_string).collect(),
        refused,
        pods,
        entries,
    }
}

impl CompileReport {
    /// Whether anything was refused or could not be read: `--strict` fails on it.
    pub fn clean(&self) -> bool {
        self.warnings.is_empty() && self.errors.is_empty() && self.refused.is_empty()
    }

    /// The text for people.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let m = &self.summary;
        let _ = writeln!(
            o,
            "{} pods enforced, {} policies ({} refused), {} cluster-wide policies ({} refused), {} nodes, {} identities, {} policy entries, {} pod addresses, {} CIDR regions, {} Service frontends, {} node ports",
            m.pods_enforced,
            m.policies,
            m.policies_refused,
            m.cluster_policies,
            m.cluster_policies_refused,
            m.nodes,
            m.identities,
            m.policy_entries,
            m.pod_addresses,
            m.cidr_regions,
            m.service_frontends,
            m.node_ports
        );
        for r in &self.refused {
            let _ = writeln!(
                o,
                "\nrefused policy {}/{}: {}; isolates [{}]",
                r.namespace,
                r.name,
                r.consequence,
                r.isolates.join(", ")
            );
            for e in &r.errors {
                let _ = writeln!(o, "  {}: {}", e.field, e.message);
            }
        }
        for p in &self.pods {
            let ips: Vec<String> = p.addresses.iter().map(ToString::to_string).collect();
            let what = match (p.kind.as_str(), ips.is_empty()) {
                ("Pod", false) => ips.join(", "),
                ("Pod", true) => "no address: judged by labels, namespace and ports".into(),
                (kind, _) => format!("{kind} template: judged by labels, namespace and ports"),
            };
            let _ = writeln!(
                o,
                "\n{} ({what}) endpoint {} identity {}",
                p.pod, p.endpoint, p.identity
            );
            for (name, d) in [("ingress", &p.ingress), ("egress", &p.egress)] {
                if !d.isolated && !d.audited_by.is_empty() {
                    let _ = writeln!(
                        o,
                        "  {name}: not isolated (audit only, by {}: denials pass as would-drop)",
                        d.audited_by.join(", ")
                    );
                    continue;
                }
                if !d.isolated {
                    let _ = writeln!(
                        o,
                        "  {name}: not isolated (no policy selects it for {name})"
                    );
                    continue;
                }
                let by_refused = if d.refused_by.is_empty() {
                    String::new()
                } else {
                    format!(" (isolated by refused policy {})", d.refused_by.join(", "))
                };
                if d.allowed_by.is_empty() {
                    let _ = writeln!(o, "  {name}: isolated, nothing allowed{by_refused}");
                } else {
                    let _ = writeln!(o, "  {name}: isolated{by_refused}, allowed by:");
                    for r in &d.allowed_by {
                        let _ = writeln!(o, "    {} ({} entries)", r.rule, r.entries);
                    }
                }
            }
        }
        if let Some(e) = &self.entries {
            let _ = writeln!(o, "\nidentities:");
            for i in &e.identities {
                let _ = writeln!(o, "  {}: {}", i.id, i.description);
            }
            let _ = writeln!(o, "\naddresses:");
            for a in &e.addresses {
                let note = a
                    .stands_for
                    .as_ref()
                    .map(|p| format!(" (stands in for {p}, which has no known address)"))
                    .unwrap_or_default();
                let _ = writeln!(o, "  {} -> identity {}{note}", a.address, a.identity);
            }
            let _ = writeln!(
                o,
                "\nnode ports (judged on their Service's backend, as identity {IDENTITY_SERVICE} is):"
            );
            for k in &e.node_ports {
                let _ = writeln!(o, "  {k}");
            }
            let _ = writeln!(
                o,
                "\npolicy entries (endpoint, direction, peer identity, protocol, port/prefix -> rule):"
            );
            for k in &e.policy {
                let peer = k
                    .peer_identity
                    .map_or_else(|| "any".to_string(), |i| i.to_string());
                let proto = k.protocol.clone().unwrap_or_else(|| "any".into());
                let _ = writeln!(
                    o,
                    "  {} {} {peer} {proto} {}/{} -> {}",
                    k.endpoint, k.direction, k.port, k.port_prefix_len, k.rule
                );
            }
        }
        o
    }
}

/// `enforcer compile`: the report in `format`, and the exit code (`strict`: 1 when anything
/// was refused or unreadable). Warnings go to stderr as well.
pub fn run(
    input: &Input,
    node_name: Option<String>,
    entries: bool,
    strict: bool,
    format: OutputFormat,
) -> Result<(String, Exit)> {
    let loaded = load_input(input)?;
    let report = compile_loaded(&loaded, node_name, entries);
    for w in report.warnings.iter().chain(&report.errors) {
        eprintln!("warning: {w}");
    }
    let exit = Exit::from_bool(!strict || report.clean());
    Ok((format.render(&report, || report.text())?, exit))
}

/// `enforcer compile DIR` as text (the tests' and the other tools' entry).
pub fn compile_report(dir: &Path, node_name: Option<String>, entries: bool) -> Result<String> {
    let loaded = load_input(&Input::Dir(dir.to_path_buf()))?;
    Ok(compile_loaded(&loaded, node_name, entries).text())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod and a namespace that set reserved labels themselves are named with each key, and
    /// what they set does not count: the pod is denied by a rule that asks for the label.
    #[test]
    fn self_set_reserved_labels_are_warned_about_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  labels:\n    enforcer.dev/trusted: \"yes\"\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: impostor\n  namespace: x\n  labels:\n    enforcer.dev/serviceaccount: frontend\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: 10.0.0.1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: x\n  labels:\n    app: b\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: 10.0.0.2\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: b-from-frontend\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      app: b\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          enforcer.dev/serviceaccount: frontend\n";
        std::fs::write(dir.path().join("all.yaml"), text).unwrap();
        let (_, warnings) = load_warned(dir.path()).unwrap();
        for w in [
            "Namespace x: label enforcer.dev/trusted=\"yes\" ignored",
            "Pod x/impostor: label enforcer.dev/serviceaccount=\"frontend\" ignored",
        ] {
            assert!(
                warnings.iter().any(|l| l.starts_with(w)),
                "{w:?} in {warnings:?}"
            );
        }
        let report = compile_report(dir.path(), None, false).unwrap();
        let b = report.split("x/b (").nth(1).unwrap();
        assert!(b.contains("ingress: isolated, nothing allowed"), "{report}");
        let why = crate::cli::explain::explain_report(
            dir.path(),
            "x/impostor",
            "x/b",
            80,
            crate::cli::explain::Protocol::Tcp,
            false,
        )
        .unwrap();
        assert!(
            why.contains("source x/impostor: not verified")
                && why.contains("the peer's own label(s) enforcer.dev/serviceaccount=\"frontend\" on Pod x/impostor")
                && why.contains("verdict: DENIED"),
            "{why}"
        );
    }

    /// The report names a refused policy, why, and the pods it isolates, and each pod's summary
    /// says its isolation comes from it.
    #[test]
    fn the_report_shows_refused_policies_and_what_they_isolate() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, app: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: x\n  labels:\n    app: {app}\nspec:\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        };
        let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      app: a\n  ingress:\n  - ports:\n    - port: 80\n      endPort: 70\n";
        std::fs::write(
            dir.path().join("all.yaml"),
            format!(
                "{}---\n{}---\n{bad}",
                pod("a", "a", "10.0.0.1"),
                pod("b", "b", "10.0.0.2")
            ),
        )
        .unwrap();
        let report = compile_report(dir.path(), None, false).unwrap();
        assert!(report.contains("1 policies (1 refused)"), "{report}");
        assert!(
            report.contains(
                "refused policy x/p: isolating the pods it selects (ingress) until it is fixed; isolates [x/a]"
            ),
            "{report}"
        );
        assert!(
            report.contains("spec.ingress[0].ports[0].endPort: 70 must be"),
            "{report}"
        );
        assert!(
            report.contains("ingress: isolated, nothing allowed (isolated by refused policy x/p)"),
            "{report}"
        );
        let b = report.split("x/b (").nth(1).unwrap();
        assert!(b.contains("ingress: not isolated"), "{report}");
    }
}
