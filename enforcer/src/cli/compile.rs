//! `enforcer compile`: a folder of manifests in, what each pod gets (and every map entry) out.
//! Same loader and compiler as the agent.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Result;
use enforcer_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_SERVICE};
use enforcer_policy::{
    compile::{Allocations, CompileOptions, compile},
    explain::protocol_label,
    model::{Cluster, self_set_labels},
};

use crate::source::{manifests, watch::LastGoodPolicies};

/// Loads a folder for the offline tools: problems are printed to stderr ([`load_warned`]).
pub(crate) fn load(dir: &Path) -> Result<Cluster> {
    let (cluster, warnings) = load_warned(dir)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(cluster)
}

/// Loads a folder for the offline tools, with its problems: unreadable objects, invalid
/// policies and the reserved labels objects set themselves (ignored, as the agent ignores
/// them). There is no last good version offline, so an invalid policy stays in, refused: it
/// isolates what it selects, as the agent would enforce it.
pub(crate) fn load_warned(dir: &Path) -> Result<(Cluster, Vec<String>)> {
    let loaded = manifests::load_dir(dir)?;
    let mut warnings: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let mut cluster = loaded.cluster;
    warnings.extend(LastGoodPolicies::default().apply(&mut cluster));
    warnings.extend(self_set_labels(&cluster).iter().map(ToString::to_string));
    Ok((cluster, warnings))
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
    let frontends = s
        .peers_v4
        .values()
        .chain(s.peers_v6.values())
        .filter(|p| p.identity == IDENTITY_SERVICE)
        .count();
    let _ = writeln!(
        o,
        "{} pods enforced, {} policies ({} refused), {} identities, {} policy entries, {} pod addresses, {} CIDR regions, {} Service frontends, {} node ports",
        s.endpoints.len(),
        cluster.policies.len(),
        compiled.refused.len(),
        compiled.identities.len(),
        s.policy.len(),
        s.peers_v4.len() + s.peers_v6.len() - frontends,
        s.cidrs_v4.len() + s.cidrs_v6.len(),
        frontends,
        s.node_ports.len()
    );
    for r in &compiled.refused {
        let f = &r.refusal;
        let pods: Vec<String> = r.pods.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            o,
            "\nrefused policy {}/{}: {}; isolates [{}]",
            f.namespace,
            f.name,
            f.consequence(),
            pods.join(", ")
        );
        for e in &f.errors {
            let _ = writeln!(o, "  {}: {}", e.field, e.message);
        }
    }
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
            // The refused policies isolating it: the isolation (or part of it) is theirs.
            let refused: Vec<String> = compiled
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
            let by_refused = if refused.is_empty() {
                String::new()
            } else {
                format!(" (isolated by refused policy {})", refused.join(", "))
            };
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
                let _ = writeln!(o, "  {name}: isolated, nothing allowed{by_refused}");
            } else {
                let _ = writeln!(o, "  {name}: isolated{by_refused}, allowed by:");
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
            "\nnode ports (judged on their Service's backend, as identity {IDENTITY_SERVICE} is):"
        );
        for k in &s.node_ports {
            let _ = writeln!(o, "  {}/{}", k.port, protocol_label(k.protocol));
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
        let why =
            crate::cli::explain::explain_report(
                dir.path(),
                "x/impostor",
                "x/b",
                80,
                "tcp",
                false,
                crate::cli::explain::ExplainFormat::Text,
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
