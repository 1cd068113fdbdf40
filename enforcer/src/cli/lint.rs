//! `enforcer lint`: policy mistakes found before they reach a cluster, for CI. A folder of
//! manifests (or a live cluster) in; findings naming the file, the object and the field out, as
//! text, JSON or SARIF 2.1.0 (what GitHub code scanning ingests). Exit codes: 0 clean, 1 a
//! finding at or above `--fail-on`, 2 input that cannot be read. The analysis itself is
//! [`enforcer_policy::lint`]; this file loads and prints.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::ValueEnum;
use enforcer_policy::{
    lint::{DefaultDeny, Finding, LintOptions, LintReport, ObjectRef, Rule, Severity, lint},
    model::Cluster,
};
use serde_json::{Value, json};

use crate::source::manifests::{self, FileError, Origin};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One line per finding: `file:line: severity[code name] Kind ns/name field: message`.
    Text,
    /// `{findings, errors, notes, summary}`.
    Json,
    /// SARIF 2.1.0, for GitHub code scanning and other SARIF viewers.
    Sarif,
}

/// The least severity that fails the run (exit 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    Info,
    Warning,
    Error,
    /// Never fail on findings (unreadable input still exits 2).
    Never,
}

impl FailOn {
    fn fails(self, s: Severity) -> bool {
        match self {
            Self::Info => true,
            Self::Warning => s >= Severity::Warning,
            Self::Error => s >= Severity::Error,
            Self::Never => false,
        }
    }
}

/// Which directions every namespace needs a default-deny policy for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RequireDefaultDeny {
    Ingress,
    Egress,
    Both,
    None,
}

/// `enforcer lint` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct LintArgs {
    /// Folder of manifests (Namespaces, Pods, NetworkPolicies, Services, ServiceAccounts).
    #[arg(required_unless_present = "kubeconfig", conflicts_with = "kubeconfig")]
    pub dir: Option<PathBuf>,
    /// Lint a live cluster instead: the objects listed once through this kubeconfig.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, requires = "kubeconfig")]
    pub context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Exit 1 when a finding is at least this severe.
    #[arg(long, value_enum, default_value_t = FailOn::Warning)]
    pub fail_on: FailOn,
    /// Directions every namespace needs a default deny for (rule L008).
    #[arg(long, value_enum, default_value_t = RequireDefaultDeny::Ingress)]
    pub require_default_deny: RequireDefaultDeny,
    /// Rules not to report, by code or name (`L007,allow-all`).
    #[arg(long, value_delimiter = ',')]
    pub disable: Vec<String>,
    /// As the agent's --require-identity: every policy requires verified peers.
    #[arg(long)]
    pub require_identity: bool,
    /// Node addresses (besides the pods' status.hostIP), for rule L004.
    #[arg(long = "node-ip", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
}

/// What was read: the objects, where each came from, and what could not be read.
#[derive(Debug, Default)]
pub struct Input {
    pub cluster: Cluster,
    /// By (kind, namespace or `""`, name).
    pub origins: BTreeMap<(String, String, String), Origin>,
    pub service_accounts: BTreeSet<(String, String)>,
    pub node_ips: Vec<IpAddr>,
    /// Peers of the cluster-wide policies that fail closed (rule L014).
    pub cluster_policy_warnings: Vec<enforcer_policy::tiers::TierError>,
    /// Objects that were read but refused (a field that does not parse, a duplicate): findings.
    pub refused: Vec<FileError>,
    /// Files or documents that could not be read at all: exit 2.
    pub unreadable: Vec<String>,
}

/// Reads a manifests folder. `Err` when the folder itself cannot be read.
pub fn load_folder(dir: &Path) -> anyhow::Result<Input> {
    load(&super::input::Input::Dir(dir.to_path_buf()))
}

/// Reads a folder or a live cluster (the offline tools' one loader: workload templates judged
/// as pods). `Err` when it cannot be read at all.
pub fn load(from: &super::input::Input) -> anyhow::Result<Input> {
    let (loaded, _, _) = super::input::read(from)?;
    let mut input = Input {
        cluster: loaded.cluster,
        origins: loaded.origins,
        service_accounts: loaded.service_accounts,
        cluster_policy_warnings: loaded.cluster_policy_warnings,
        ..Input::default()
    };
    for e in loaded.errors {
        if e.object.is_some() {
            input.refused.push(e);
        } else {
            input.unreadable.push(e.to_string());
        }
    }
    Ok(input)
}

/// One finding with where it is.
struct Located<'a> {
    finding: &'a Finding,
    file: Option<String>,
    line: Option<usize>,
}

/// `Kind ns/name` (possibly after `items[i] `) from a [`FileError`]'s object.
fn parse_object(object: &str) -> ObjectRef {
    let object = object
        .split(' ')
        .skip_while(|w| w.starts_with("items["))
        .collect::<Vec<_>>()
        .join(" ");
    let (kind, key) = object.split_once(' ').unwrap_or((&object, ""));
    match key.split_once('/') {
        Some((ns, name)) => ObjectRef::new(kind, Some(ns), name),
        None => ObjectRef::new(kind, None, key),
    }
}

/// A [`FileError`] about an object as a finding: the field when the message starts with one.
fn refused_finding(e: &FileError) -> Finding {
    let object = parse_object(e.object.as_deref().unwrap_or_default());
    let (field, message) = match e.message.split_once(": ") {
        Some((f, m)) if !f.contains(' ') && f.starts_with(|c: char| c.is_ascii_lowercase()) => {
            (Some(f.to_string()), m.to_string())
        }
        _ => (None, e.message.clone()),
    };
    Finding {
        object,
        field,
        rule: Rule::InvalidObject,
        severity: Rule::InvalidObject.severity(),
        message: format!("{message}; the object is left out"),
    }
}

fn display_path(p: &Path) -> String {
    let s = p.display().to_string();
    s.strip_prefix("./").map(str::to_string).unwrap_or(s)
}

/// Lints what was read; returns the output and the exit code.
pub fn report(input: &Input, args: &LintArgs) -> Result<(String, i32), String> {
    let disabled = args
        .disable
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse::<Rule>())
        .collect::<Result<BTreeSet<Rule>, String>>()?;
    let mut node_ips = args.node_ips.clone();
    node_ips.extend(&input.node_ips);
    let opts = LintOptions {
        require_default_deny: match args.require_default_deny {
            RequireDefaultDeny::Ingress => DefaultDeny {
                ingress: true,
                egress: false,
            },
            RequireDefaultDeny::Egress => DefaultDeny {
                ingress: false,
                egress: true,
            },
            RequireDefaultDeny::Both => DefaultDeny {
                ingress: true,
                egress: true,
            },
            RequireDefaultDeny::None => DefaultDeny::default(),
        },
        node_ips,
        service_accounts: input.service_accounts.clone(),
        require_identity: args.require_identity,
        disabled: disabled.clone(),
        cluster_policy_warnings: input.cluster_policy_warnings.clone(),
    };
    let LintReport {
        mut findings,
        notes,
    } = lint(&input.cluster, &opts);
    // Objects refused on loading are not in the cluster: their own findings, with their file.
    let mut file_of: BTreeMap<usize, (String, Option<usize>)> = BTreeMap::new();
    if !disabled.contains(&Rule::InvalidObject) {
        let mut lines: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
        for e in &input.refused {
            let line = e.document.and_then(|d| {
                lines
                    .entry(e.file.clone())
                    .or_insert_with(|| {
                        std::fs::read_to_string(&e.file)
                            .map(|t| manifests::document_lines(&t))
                            .unwrap_or_default()
                    })
                    .get(d)
                    .copied()
            });
            file_of.insert(findings.len(), (display_path(&e.file), line));
            findings.push(refused_finding(e));
        }
    }
    let located: Vec<Located<'_>> = findings
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (file, line) = file_of.remove(&i).map_or_else(
                || {
                    let key = (
                        f.object.kind.clone(),
                        f.object.namespace.clone().unwrap_or_default(),
                        f.object.name.clone(),
                    );
                    input
                        .origins
                        .get(&key)
                        .map_or((None, None), |o| (Some(display_path(&o.file)), o.line))
                },
                |(file, line)| (Some(file), line),
            );
            Located {
                finding: f,
                file,
                line,
            }
        })
        .collect();
    let failed = findings.iter().any(|f| args.fail_on.fails(f.severity));
    let code = if !input.unreadable.is_empty() {
        2
    } else {
        i32::from(failed)
    };
    let out = match args.output {
        Format::Text => text(&located, &notes, &input.unreadable, args.fail_on),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&json_report(
                &located,
                &notes,
                &input.unreadable,
                failed,
            ))
            .unwrap_or_default();
            s.push('\n');
            s
        }
        Format::Sarif => {
            let mut s = serde_json::to_string_pretty(&sarif(&located, &input.unreadable))
                .unwrap_or_default();
            s.push('\n');
            s
        }
    };
    Ok((out, code))
}

fn counts(located: &[Located<'_>]) -> BTreeMap<Severity, usize> {
    let mut c = BTreeMap::new();
    for l in located {
        *c.entry(l.finding.severity).or_insert(0) += 1;
    }
    c
}

fn text(
    located: &[Located<'_>],
    notes: &[String],
    unreadable: &[String],
    fail_on: FailOn,
) -> String {
    let mut o = String::new();
    for u in unreadable {
        let _ = writeln!(o, "error: cannot read {u}");
    }
    for l in located {
        match (&l.file, l.line) {
            (Some(f), Some(n)) => {
                let _ = write!(o, "{f}:{n}: ");
            }
            (Some(f), None) => {
                let _ = write!(o, "{f}: ");
            }
            _ => {}
        }
        let _ = writeln!(o, "{}", l.finding);
    }
    for n in notes {
        let _ = writeln!(o, "note: {n}");
    }
    let c = counts(located);
    let n = |s| c.get(&s).copied().unwrap_or(0);
    let fail = match fail_on {
        FailOn::Never => "never failing on findings".to_string(),
        FailOn::Info => "failing on info and above".to_string(),
        FailOn::Warning => "failing on warning and above".to_string(),
        FailOn::Error => "failing on error".to_string(),
    };
    let _ = writeln!(
        o,
        "{} findings: {} errors, {} warnings, {} info ({fail})",
        located.len(),
        n(Severity::Error),
        n(Severity::Warning),
        n(Severity::Info)
    );
    o
}

fn object_json(o: &ObjectRef) -> Value {
    json!({"kind": o.kind, "namespace": o.namespace, "name": o.name})
}

fn json_report(
    located: &[Located<'_>],
    notes: &[String],
    unreadable: &[String],
    failed: bool,
) -> Value {
    let findings: Vec<Value> = located
        .iter()
        .map(|l| {
            let f = l.finding;
            json!({
                "rule": f.rule.code(),
                "name": f.rule.name(),
                "severity": f.severity.as_str(),
                "file": l.file,
                "line": l.line,
                "object": object_json(&f.object),
                "field": f.field,
                "message": f.message,
            })
        })
        .collect();
    let c = counts(located);
    let n = |s| c.get(&s).copied().unwrap_or(0);
    json!({
        "findings": findings,
        "errors": unreadable,
        "notes": notes,
        "summary": {
            "error": n(Severity::Error),
            "warning": n(Severity::Warning),
            "info": n(Severity::Info),
            "failed": failed,
        },
    })
}

fn sarif_level(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "note",
    }
}

/// SARIF 2.1.0: one run, every rule described, one result per finding located at its file's
/// document (and named as a logical location: kind/namespace/name, plus the field).
fn sarif(located: &[Located<'_>], unreadable: &[String]) -> Value {
    let rules: Vec<Value> = Rule::ALL
        .iter()
        .map(|r| {
            json!({
                "id": r.code(),
                "name": r.name(),
                "shortDescription": {"text": r.about()},
                "defaultConfiguration": {"level": sarif_level(r.severity())},
                "help": {"text": format!("docs/lint.md, {} {}", r.code(), r.name())},
            })
        })
        .collect();
    let index: BTreeMap<Rule, usize> = Rule::ALL.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    let results: Vec<Value> = located
        .iter()
        .map(|l| {
            let f = l.finding;
            let mut name = format!("{}/{}", f.object.kind, f.object.key());
            if let Some(field) = &f.field {
                name.push('/');
                name.push_str(field);
            }
            let mut location = json!({
                "logicalLocations": [{"fullyQualifiedName": name, "kind": "object"}],
            });
            if let Some(file) = &l.file {
                let mut physical = json!({"artifactLocation": {"uri": file}});
                if let Some(line) = l.line {
                    physical["region"] = json!({"startLine": line});
                }
                location["physicalLocation"] = physical;
            }
            let text = match &f.field {
                Some(field) => format!("{} {field}: {}", f.object, f.message),
                None => format!("{}: {}", f.object, f.message),
            };
            json!({
                "ruleId": f.rule.code(),
                "ruleIndex": index[&f.rule],
                "level": sarif_level(f.severity),
                "message": {"text": text},
                "locations": [location],
            })
        })
        .collect();
    let notifications: Vec<Value> = unreadable
        .iter()
        .map(|u| json!({"level": "error", "message": {"text": format!("cannot read {u}")}}))
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "enforcer lint",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "invocations": [{
                "executionSuccessful": unreadable.is_empty(),
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
        }],
    })
}

/// `enforcer lint`: prints the report, returns the exit code.
pub fn run(args: &LintArgs) -> i32 {
    let input = load(&match &args.dir {
        Some(dir) => super::input::Input::Dir(dir.clone()),
        None => super::input::Input::Cluster {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
        },
    });
    let input = match input {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    match report(&input, args) {
        Ok((out, code)) => {
            print!("{out}");
            code
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: LintArgs,
    }

    /// Namespace `shop` with a default deny both ways; pods `shop/web` (app=web, port `http`
    /// 8080/TCP, service account `web`) and `shop/db` (app=db).
    const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec:\n  serviceAccountName: web\n  containers:\n  - name: c\n    ports: [{name: http, containerPort: 8080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\nspec: {containers: [{name: c}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n";

    /// Lints a folder holding `base.yaml` (BASE) and `p.yaml` (`policies`) with the extra
    /// arguments; the JSON report and the exit code.
    fn lint_json(policies: &str, extra: &[&str]) -> (Value, i32) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.yaml"), BASE).unwrap();
        std::fs::write(dir.path().join("p.yaml"), policies).unwrap();
        let mut argv = vec!["lint", dir.path().to_str().unwrap(), "-o", "json"];
        argv.extend(extra);
        let args = Cmd::parse_from(argv).args;
        let input = load_folder(dir.path()).unwrap();
        let (out, code) = report(&input, &args).unwrap();
        (serde_json::from_str(&out).unwrap(), code)
    }

    /// (rule, object name, field) of each finding.
    fn found(v: &Value) -> Vec<(String, String, String)> {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["rule"].as_str().unwrap().to_string(),
                    f["object"]["name"].as_str().unwrap().to_string(),
                    f["field"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}---\n"
        )
    }

    fn one(rule: &str, name: &str, field: &str) -> Vec<(String, String, String)> {
        vec![(rule.to_string(), name.to_string(), field.to_string())]
    }

    #[test]
    fn the_base_folder_is_clean() {
        let (v, code) = lint_json("", &["--require-default-deny", "both"]);
        assert_eq!((found(&v), code), (vec![], 0), "{v:#}");
        assert_eq!(v["summary"]["failed"], false);
    }

    #[test]
    fn a_policy_selecting_no_pod_is_l001_with_its_file_and_line() {
        let p = policy("typo", "  podSelector: {matchLabels: {app: wbe}}\n");
        let (v, code) = lint_json(&format!("# leading comment\n---\n{p}"), &[]);
        assert_eq!(found(&v), one("L001", "typo", "spec.podSelector"), "{v:#}");
        assert_eq!(code, 1);
        let f = &v["findings"][0];
        assert!(f["file"].as_str().unwrap().ends_with("p.yaml"), "{f}");
        assert_eq!(
            (f["line"].as_u64(), f["severity"].as_str()),
            (Some(3), Some("warning"))
        );
        assert_eq!(f["object"]["kind"], "NetworkPolicy");
        assert_eq!(f["object"]["namespace"], "shop");
    }

    #[test]
    fn peers_selecting_nothing_are_l002() {
        let p = policy(
            "web-in",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: dbb}}\n    - namespaceSelector: {matchLabels: {team: nobody}}\n    - namespaceSelector: {matchLabels: {team: a}}\n      podSelector: {matchLabels: {app: db}}\n",
        );
        let (v, _) = lint_json(&p, &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L002".to_string(),
                    "web-in".to_string(),
                    "spec.ingress[0].from[0].podSelector".to_string()
                ),
                (
                    "L002".to_string(),
                    "web-in".to_string(),
                    "spec.ingress[0].from[1].namespaceSelector".to_string()
                ),
            ],
            "{v:#}"
        );
    }

    #[test]
    fn a_named_port_no_pod_declares_is_l003_both_ways() {
        let p = policy(
            "ports",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - ports: [{port: http}, {port: metrics}, {port: http, protocol: UDP}]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: http}]\n",
        );
        let (v, _) = lint_json(&p, &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L003".to_string(),
                    "ports".to_string(),
                    "spec.egress[0].ports[0].port".to_string()
                ),
                (
                    "L003".to_string(),
                    "ports".to_string(),
                    "spec.ingress[0].ports[1].port".to_string()
                ),
                (
                    "L003".to_string(),
                    "ports".to_string(),
                    "spec.ingress[0].ports[2].port".to_string()
                ),
            ],
            "{v:#}"
        );
        let udp = v["findings"][2]["message"].as_str().unwrap();
        assert!(udp.contains("they name it for TCP only"), "{udp}");
    }

    #[test]
    fn an_ip_block_over_a_pod_address_is_l004_naming_the_pod() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: addressed, namespace: shop, labels: {app: x}}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.244.1.5, hostIP: 192.168.0.10}\n---\n";
        let p = policy(
            "cidr",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.244.0.0/16}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16]}\n    - ipBlock: {cidr: 192.168.0.0/24}\n",
        );
        let (v, _) = lint_json(&format!("{pod}{p}"), &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L004".to_string(),
                    "cidr".to_string(),
                    "spec.ingress[0].from[0].ipBlock".to_string()
                ),
                (
                    "L004".to_string(),
                    "cidr".to_string(),
                    "spec.ingress[0].from[2].ipBlock".to_string()
                ),
            ],
            "{v:#}"
        );
        let m = |i: usize| v["findings"][i]["message"].as_str().unwrap().to_string();
        assert!(m(0).contains("pods shop/addressed"), "{}", m(0));
        assert!(m(1).contains("node addresses 192.168.0.10"), "{}", m(1));
    }

    #[test]
    fn an_explicit_allow_all_is_l005_info_and_disguised_ones_are_l006_warnings() {
        let explicit = policy(
            "explicit",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - {}\n",
        );
        let (v, code) = lint_json(&explicit, &[]);
        assert_eq!(
            found(&v),
            one("L005", "explicit", "spec.ingress[0]"),
            "{v:#}"
        );
        assert_eq!(
            (v["findings"][0]["severity"].as_str(), code),
            (Some("info"), 0)
        );
        let disguised = policy(
            "disguised",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: []\n    ports: [{port: 8080}]\n  - from: [{namespaceSelector: {}}]\n  egress:\n  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]\n",
        );
        let (v, code) = lint_json(&disguised, &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L006".to_string(),
                    "disguised".to_string(),
                    "spec.egress[0].to[0].ipBlock.cidr".to_string()
                ),
                (
                    "L006".to_string(),
                    "disguised".to_string(),
                    "spec.ingress[0].from".to_string()
                ),
                (
                    "L006".to_string(),
                    "disguised".to_string(),
                    "spec.ingress[1].from[0].namespaceSelector".to_string()
                ),
            ],
            "{v:#}"
        );
        assert_eq!(code, 1);
        let m = v["findings"][1]["message"].as_str().unwrap();
        assert!(m.contains("on 8080/TCP"), "{m}");
    }

    #[test]
    fn rules_covered_by_another_are_l007_in_one_policy_and_across_policies() {
        let a = policy(
            "a",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: 8000, endPort: 9000}]\n  - from: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: 8080}]\n",
        );
        let b = policy(
            "b",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: 8500}]\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n",
        );
        let (v, code) = lint_json(&format!("{a}{b}"), &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L007".to_string(),
                    "a".to_string(),
                    "spec.ingress[1]".to_string()
                ),
                (
                    "L007".to_string(),
                    "b".to_string(),
                    "spec.ingress[0]".to_string()
                ),
            ],
            "{v:#}"
        );
        assert_eq!(code, 0, "info does not fail by default");
        let across = v["findings"][1]["message"].as_str().unwrap();
        assert!(
            across.contains("spec.ingress[0] of NetworkPolicy shop/a"),
            "{across}"
        );
        let (_, code) = lint_json(&format!("{a}{b}"), &["--fail-on", "info"]);
        assert_eq!(code, 1);
    }

    #[test]
    fn namespaces_without_a_default_deny_are_l008_kube_system_included() {
        let pods = "apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: dev}\nspec:\n  podSelector: {}\n  ingress: [{}]\n---\n";
        let (v, _) = lint_json(pods, &["--disable", "L005,L001"]);
        let deny: Vec<_> = found(&v);
        assert_eq!(
            deny,
            [
                ("L008".to_string(), "dev".to_string(), String::new()),
                ("L008".to_string(), "kube-system".to_string(), String::new()),
            ],
            "an allow-all namespace-wide policy is no default deny: {v:#}"
        );
        let (v, _) = lint_json(
            pods,
            &["--disable", "L005,L001", "--require-default-deny", "both"],
        );
        assert_eq!(found(&v).len(), 4, "{v:#}");
        let (v, _) = lint_json(
            pods,
            &["--disable", "L005,L001", "--require-default-deny", "none"],
        );
        assert_eq!(found(&v), [], "{v:#}");
        let annotated = pods.replace(
            "metadata: {name: kube-system}",
            "metadata: {name: kube-system, annotations: {enforcer.dev/lint-ignore: no-default-deny}}",
        );
        let (v, _) = lint_json(&annotated, &["--disable", "L005,L001"]);
        assert_eq!(
            found(&v),
            [("L008".to_string(), "dev".to_string(), String::new())]
        );
    }

    #[test]
    fn identity_peers_no_workload_can_prove_are_l009() {
        let sa =
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: batch, namespace: shop}\n---\n";
        let p = policy(
            "verified",
            "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {enforcer.dev/serviceaccount: web}}\n    - podSelector: {matchLabels: {enforcer.dev/serviceaccount: wbe}}\n    - podSelector: {matchLabels: {enforcer.dev/serviceaccount: batch}}\n    - podSelector: {matchLabels: {app: db, enforcer.dev/serviceaccount: web}}\n",
        )
        .replace(
            "namespace: shop}",
            "namespace: shop, annotations: {enforcer.dev/require-identity: \"true\"}}",
        );
        let (v, _) = lint_json(&format!("{sa}{p}"), &[]);
        assert_eq!(
            found(&v),
            [
                (
                    "L009".to_string(),
                    "verified".to_string(),
                    "spec.ingress[0].from[1].podSelector".to_string()
                ),
                (
                    "L009".to_string(),
                    "verified".to_string(),
                    "spec.ingress[0].from[2].podSelector".to_string()
                ),
                (
                    "L009".to_string(),
                    "verified".to_string(),
                    "spec.ingress[0].from[3].podSelector".to_string()
                ),
            ],
            "web is a pod's account; batch exists but no pod runs as it; db runs as default: {v:#}"
        );
        let m = v["findings"][0]["message"].as_str().unwrap();
        assert!(
            m.contains("\"wbe\"") && m.contains("no ServiceAccount"),
            "{m}"
        );
    }

    #[test]
    fn reserved_labels_set_by_hand_are_l010() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: impostor, namespace: shop, labels: {enforcer.dev/serviceaccount: web}}\nspec: {containers: [{name: c}]}\n";
        let (v, _) = lint_json(pod, &[]);
        assert_eq!(
            found(&v),
            one(
                "L010",
                "impostor",
                "metadata.labels.enforcer.dev/serviceaccount"
            ),
            "{v:#}"
        );
        assert_eq!(v["findings"][0]["object"]["kind"], "Pod");
    }

    #[test]
    fn objects_the_agent_refuses_are_l011_errors_with_their_field() {
        let bad_policy = policy(
            "bad",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 90, endPort: 80}]\n",
        );
        let bad_pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nspec:\n  containers: [{name: c, ports: [{containerPort: eighty}]}]\n";
        let (v, code) = lint_json(&format!("{bad_policy}{bad_pod}"), &["--fail-on", "error"]);
        assert_eq!(
            found(&v),
            [
                (
                    "L011".to_string(),
                    "bad".to_string(),
                    "spec.ingress[0].ports[0].endPort".to_string()
                ),
                (
                    "L011".to_string(),
                    "broken".to_string(),
                    "spec.containers[0].ports[0].containerPort".to_string()
                ),
            ],
            "{v:#}"
        );
        assert_eq!(code, 1);
        let pod = &v["findings"][1];
        assert!(pod["file"].as_str().unwrap().ends_with("p.yaml"), "{pod}");
        assert_eq!(pod["line"].as_u64(), Some(9), "{pod}");
        let m = v["findings"][0]["message"].as_str().unwrap();
        assert!(
            m.contains("isolating every pod") || m.contains("isolating the pods it selects"),
            "{m}"
        );
    }

    #[test]
    fn two_pods_with_one_address_are_l012() {
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: one, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.244.0.9}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: two, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.244.0.9}\n";
        let (v, _) = lint_json(pods, &[]);
        assert_eq!(found(&v), one("L012", "two", "status.podIPs"), "{v:#}");
    }

    /// Text names the file and line; SARIF carries the rule table and a located result.
    #[test]
    fn text_and_sarif_name_file_line_object_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.yaml"), BASE).unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            policy("typo", "  podSelector: {matchLabels: {app: wbe}}\n"),
        )
        .unwrap();
        let input = load_folder(dir.path()).unwrap();
        let run = |format: &str| {
            let args = Cmd::parse_from(["lint", "x", "-o", format]).args;
            report(&input, &args).unwrap()
        };
        let (text, code) = run("text");
        assert_eq!(code, 1);
        let line = text.lines().next().unwrap();
        assert!(
            line.ends_with("p.yaml:1: warning[L001 policy-selects-nothing] NetworkPolicy shop/typo spec.podSelector: matches no pod of namespace shop: the policy enforces nothing"),
            "{text}"
        );
        let (sarif, _) = run("sarif");
        let v: Value = serde_json::from_str(&sarif).unwrap();
        assert_eq!(v["version"], "2.1.0");
        let run0 = &v["runs"][0];
        assert_eq!(
            run0["tool"]["driver"]["rules"].as_array().unwrap().len(),
            Rule::ALL.len()
        );
        let r = &run0["results"][0];
        assert_eq!(
            (r["ruleId"].as_str(), r["level"].as_str()),
            (Some("L001"), Some("warning"))
        );
        let loc = &r["locations"][0];
        assert!(
            loc["physicalLocation"]["artifactLocation"]["uri"]
                .as_str()
                .unwrap()
                .ends_with("p.yaml")
        );
        assert_eq!(loc["physicalLocation"]["region"]["startLine"], 1);
        assert_eq!(
            loc["logicalLocations"][0]["fullyQualifiedName"],
            "NetworkPolicy/shop/typo/spec.podSelector"
        );
    }

    /// Our own examples: the findings are the intended ones only. The identity example's
    /// checkout pods come from a Deployment template; where templates are not read as pods,
    /// its verified peer matches no pod yet.
    #[test]
    fn the_examples_lint_clean_but_for_intended_findings() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        let input = load_folder(&dir).unwrap();
        assert!(input.unreadable.is_empty(), "{:?}", input.unreadable);
        let args = Cmd::parse_from(["lint", "x", "-o", "json"]).args;
        let (out, code) = report(&input, &args).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        let intended = [(
            "L009".to_string(),
            "backend-from-verified-checkout".to_string(),
            "spec.ingress[0].from[0].podSelector".to_string(),
        )];
        let got = found(&v);
        assert!(got.iter().all(|f| intended.contains(f)), "{v:#}");
        assert_eq!(code, i32::from(!got.is_empty()));
    }
}
