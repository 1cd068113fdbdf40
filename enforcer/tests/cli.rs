//! The command line as scripts use it: the real binary, its exit codes, its `-o json|yaml`
//! shapes, completion scripts, `--version`, and the offline tools on the manifests users keep in
//! git (workloads without addresses) and on a live cluster (a loopback API server). No root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn enforcer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running enforcer")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples")
        .display()
        .to_string()
}

fn explain(dir: &str, from: &str, to: &str, port: &str, extra: &[&str]) -> Output {
    let mut args = vec!["explain", dir, "--from", from, "--to", to, "--port", port];
    args.extend(extra);
    enforcer(&args)
}

/// The examples as written (Pods without status, a Deployment) give real verdicts, and the exit
/// code is the answer: 0 allowed, 1 denied.
#[test]
fn explain_on_the_examples_gives_real_verdicts_as_exit_codes() {
    let dir = examples();
    let o = explain(&dir, "shop/frontend", "shop/backend", "8080", &[]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(
            "ingress at shop/backend: allowed by shop/allow-frontend-to-backend rule [0]"
        ) && text.contains("judged by labels, namespace and ports")
            && text.contains("verdict: ALLOWED"),
        "{text}"
    );
    let o = explain(&dir, "shop/frontend", "shop/backend", "9090", &[]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("verdict: DENIED"), "{}", stdout(&o));
    // The Deployment's template, named after it: the policy admitting it requires a verified
    // peer, and offline nothing is verified.
    let o = explain(
        &dir,
        "shop/checkout",
        "shop/backend",
        "8080",
        &["-o", "json"],
    );
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["flow"]["ingress"]["decision"], "denied-no-identity");
    assert_eq!(v["flow"]["egress"]["decision"], "not-isolated");
    assert_eq!(
        v["flow"]["unaddressed"],
        serde_json::json!(["shop/checkout", "shop/backend"])
    );
}

/// An unknown name is an error (exit 2) naming it and the closest names, never a verdict; so is
/// an unreadable folder or a bad protocol.
#[test]
fn explain_errors_exit_2_and_name_close_matches() {
    let dir = examples();
    let o = explain(&dir, "shop/frontnd", "shop/backend", "8080", &[]);
    assert_eq!(code(&o), 2);
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "--from: no pod or workload shop/frontnd in the input; did you mean shop/frontend"
        ),
        "{err}"
    );
    let o = explain("/nonexistent", "shop/a", "shop/b", "80", &[]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = explain(
        &dir,
        "shop/frontend",
        "shop/backend",
        "80",
        &["--protocol", "icmp"],
    );
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("tcp, udp, sctp"), "{}", stderr(&o));
}

/// `compile` on the examples enforces their pods and the Deployment's template, in text, JSON
/// and YAML.
#[test]
fn compile_on_the_examples_enforces_every_workload() {
    let dir = examples();
    let o = enforcer(&["compile", &dir]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("4 pods enforced"), "{text}");
    assert!(
        text.contains("shop/checkout (Deployment template: judged by labels, namespace and ports)"),
        "{text}"
    );
    for format in ["json", "yaml"] {
        let o = enforcer(&["compile", &dir, "-o", format]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let v: Value = if format == "json" {
            serde_json::from_str(&stdout(&o)).unwrap()
        } else {
            serde_yaml::from_str(&stdout(&o)).unwrap()
        };
        assert_eq!(v["summary"]["pods_enforced"], 4, "{v}");
        let backend = v["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pod"] == "shop/backend")
            .unwrap();
        assert_eq!(backend["kind"], "Pod");
        assert_eq!(backend["addresses"], serde_json::json!([]));
        assert_eq!(backend["ingress"]["isolated"], true);
        let rules: Vec<&str> = backend["ingress"]["allowed_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert!(
            rules
                .iter()
                .any(|r| r.contains("allow-frontend-to-backend")),
            "{rules:?}"
        );
    }
}

/// `matrix` on the examples as written: every pod and the Deployment's template, the one
/// allowed flow among denials, in the table and as JSON and YAML of one shape; `explain -o dot`
/// draws one flow and keeps the exit code; an unknown namespace is an error.
#[test]
fn matrix_on_the_examples_shows_who_can_talk_to_whom() {
    let dir = examples();
    let o = enforcer(&["matrix", &dir]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
    };
    // Columns: backend, checkout, frontend, other.
    assert_eq!(
        row("shop/frontend"),
        ["shop/frontend (no address)", "✓8080/TCP", "✗", "-", "✗"],
        "{text}"
    );
    assert_eq!(
        row("shop/checkout"),
        ["shop/checkout (Deployment)", "✗", "-", "✗", "✗"],
        "{text}"
    );
    for format in ["json", "yaml"] {
        let o = enforcer(&["matrix", &dir, "-o", format, "--ports", "8080"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let v: Value = if format == "json" {
            serde_json::from_str(&stdout(&o)).unwrap()
        } else {
            serde_yaml::from_str(&stdout(&o)).unwrap()
        };
        assert_eq!(v["ports"], serde_json::json!(["8080/TCP"]));
        let checkout = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "shop/checkout")
            .unwrap();
        assert_eq!(checkout["kind"], "Deployment", "{v}");
        let edges = v["edges"].as_array().unwrap();
        assert_eq!(edges.len(), 12, "4 nodes, every ordered pair, one port");
        let allowed: Vec<(&str, &str)> = edges
            .iter()
            .filter(|e| e["verdict"] == "allowed")
            .map(|e| (e["from"].as_str().unwrap(), e["to"].as_str().unwrap()))
            .collect();
        assert_eq!(allowed, [("shop/frontend", "shop/backend")]);
    }
    let o = enforcer(&["matrix", &dir, "-n", "shpo"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--namespace shpo"), "{}", stderr(&o));
    let o = enforcer(&["matrix", &dir, "--ports", "80/icmp"]);
    assert_eq!(code(&o), 2);
    let o = explain(
        &dir,
        "shop/frontend",
        "shop/backend",
        "9090",
        &["-o", "dot"],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("digraph explain {") && stdout(&o).contains("9090/TCP\\nDENIED"),
        "{}",
        stdout(&o)
    );
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const DEPLOYMENTS: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: app}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        image: nginx\n        ports: [{name: http, containerPort: 8080}]\n---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: report, namespace: app}\nspec:\n  schedule: '@hourly'\n  jobTemplate:\n    spec:\n      template:\n        metadata: {labels: {app: report}}\n        spec: {containers: [{name: r, image: busybox}], restartPolicy: Never}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: report}}}]\n    ports: [{port: http}]\n  - from: [{ipBlock: {cidr: 0.0.0.0/0}}]\n    ports: [{port: 9999}]\n";

/// A folder of workloads only: their templates are judged by labels and named ports; an
/// ipBlock never matches a template (it has no address).
#[test]
fn a_folder_of_workloads_only_is_judged_by_their_templates() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "app.yaml", DEPLOYMENTS);
    let dir = tmp.path().to_str().unwrap();
    let o = explain(dir, "app/report", "app/web", "8080", &[]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("allowed by app/web rule [0]"),
        "{}",
        stdout(&o)
    );
    let o = explain(dir, "app/report", "app/web", "9999", &[]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("an ipBlock peer never matches a pod without a known address"),
        "{}",
        stdout(&o)
    );
    let o = enforcer(&["compile", dir]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("2 pods enforced"), "{text}");
    assert!(text.contains("app/report (CronJob template"), "{text}");
}

/// `--strict` fails (exit 1) on a refused policy, and on an object that cannot be read; without
/// it compile reports and exits 0.
#[test]
fn compile_strict_fails_on_anything_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "app.yaml", DEPLOYMENTS);
    let dir = tmp.path().to_str().unwrap();
    let o = enforcer(&["compile", "--strict", dir]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    write(
        tmp.path(),
        "bad.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: app}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n",
    );
    let o = enforcer(&["compile", dir]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = enforcer(&["compile", "--strict", "-o", "json", dir]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["refused"][0]["name"], "bad");
    std::fs::remove_file(tmp.path().join("bad.yaml")).unwrap();
    write(
        tmp.path(),
        "typo.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: app}\nspec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n",
    );
    let o = enforcer(&["compile", "--strict", dir]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("typo.yaml document 0 Pod app/p"),
        "{}",
        stderr(&o)
    );
    let o = enforcer(&["compile", "/nonexistent"]);
    assert_eq!(code(&o), 2);
}

/// Every shell's completion script is produced, and bash's (and zsh's, fish's where installed)
/// parses.
#[test]
fn completion_scripts_parse() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let o = enforcer(&["completion", shell]);
        assert_eq!(code(&o), 0, "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        assert!(
            script.contains("enforcer") && script.contains("explain"),
            "{shell}"
        );
        let check: Option<(&str, &[&str])> = match shell {
            "bash" => Some(("bash", &["-n"])),
            "zsh" => Some(("zsh", &["-n"])),
            "fish" => Some(("fish", &["--no-execute"])),
            _ => None,
        };
        let Some((prog, args)) = check else { continue };
        if shell != "bash" && Command::new(prog).arg("--version").output().is_err() {
            continue;
        }
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &script).unwrap();
        let o = Command::new(prog)
            .args(args)
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
    }
}

/// `--version` names the git revision; `--help` lists the values of enum flags.
#[test]
fn version_and_help_say_what_is_accepted() {
    let o = enforcer(&["--version"]);
    assert_eq!(code(&o), 0);
    let v = stdout(&o);
    assert!(
        v.starts_with(&format!(
            "enforcer {} (revision ",
            env!("CARGO_PKG_VERSION")
        )) && !v.contains("revision )"),
        "{v}"
    );
    let o = enforcer(&["explain", "--help"]);
    let help = stdout(&o);
    assert!(
        help.contains("[possible values: tcp, udp, sctp]")
            && help.contains("[possible values: text, json, yaml, dot]"),
        "{help}"
    );
    let o = enforcer(&["run", "--help"]);
    assert!(stdout(&o).contains("tcx"), "{}", stdout(&o));
}

/// A one-shot API server on loopback: answers each list with the given items (empty for the
/// other kinds), then closes the connection.
fn api_server(lists: Vec<(&'static str, Value)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let path = path.split('?').next().unwrap_or_default();
            let kind = path.rsplit('/').next().unwrap_or_default();
            let items = lists
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or_else(|| serde_json::json!([]), |(_, v)| v.clone());
            let body = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": "1"},
                "items": items,
            })
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

/// `--kubeconfig` (and `--context`) read a live cluster: its pods with addresses, and a
/// Deployment with no pods by its template.
#[test]
fn a_live_cluster_is_read_with_a_kubeconfig() {
    let server = api_server(vec![
        (
            "namespaces",
            serde_json::json!([{"metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "x"}}}]),
        ),
        (
            "pods",
            serde_json::json!([{
                "metadata": {"name": "db", "namespace": "x", "labels": {"app": "db"}},
                "spec": {"containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}
            }]),
        ),
        (
            "networkpolicies",
            serde_json::json!([{
                "metadata": {"name": "db", "namespace": "x"},
                "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                                      "ports": [{"port": 5432}]}]}
            }]),
        ),
        (
            "deployments",
            serde_json::json!([{
                "metadata": {"name": "api", "namespace": "x"},
                "spec": {"selector": {"matchLabels": {"app": "api"}},
                         "template": {"metadata": {"labels": {"app": "api"}},
                                      "spec": {"containers": [{"name": "c"}]}}}
            }]),
        ),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig: PathBuf = tmp.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: test\n  context: {{cluster: c, user: u}}\ncurrent-context: test\n"
        ),
    )
    .unwrap();
    let kc = kubeconfig.to_str().unwrap();
    let live = |from: &str, to: &str, port: &str| {
        enforcer(&[
            "explain",
            "--kubeconfig",
            kc,
            "--context",
            "test",
            "--from",
            from,
            "--to",
            to,
            "--port",
            port,
        ])
    };
    let o = live("x/api", "x/db", "5432");
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("allowed by x/db rule [0]"),
        "{}",
        stdout(&o)
    );
    let o = live("x/api", "x/db", "5433");
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    let o = live("x/ap", "x/db", "5432");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("did you mean x/api"), "{}", stderr(&o));
    let o = enforcer(&["compile", "--kubeconfig", kc, "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["pods_enforced"], 2, "{v}");
    // The matrix of the live cluster: the Deployment's template reaches the database.
    let o = enforcer(&["matrix", "--kubeconfig", kc, "-o", "csv", "--ports", "5432"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(
            "x/api,x/db,TCP,5432,allowed,1,0,1,not isolated,x/db ingress[0],x/db ingress[0]\n"
        ),
        "{}",
        stdout(&o)
    );
    let o = enforcer(&["compile", "--kubeconfig", kc, "--context", "nope"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

/// The README's `enforcer explain` examples on `manifests/examples/cluster-policy` are what the
/// CLI prints: each ```text block starting `$ enforcer explain manifests/examples/...` is run
/// and its output compared line for line.
#[test]
fn readme_cluster_policy_explain_output_is_what_the_cli_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut blocks = 0;
    for block in readme.split("```text\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        let mut lines = block.lines();
        let Some(command) = lines
            .next()
            .and_then(|l| l.strip_prefix("$ enforcer explain manifests/examples/cluster-policy"))
        else {
            continue;
        };
        let dir = root.join("manifests/examples/cluster-policy");
        let mut args = vec!["explain".to_string(), dir.display().to_string()];
        args.extend(command.split_whitespace().map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = enforcer(&args);
        let expected: Vec<&str> = lines.collect();
        let printed = stdout(&o);
        assert_eq!(
            printed.trim_end().lines().collect::<Vec<_>>(),
            expected,
            "README: `enforcer explain manifests/examples/cluster-policy{command}`\n{}",
            stderr(&o)
        );
        let denied = printed.contains("verdict: DENIED");
        assert_eq!(code(&o), i32::from(denied), "{printed}");
        blocks += 1;
    }
    assert!(
        blocks >= 2,
        "the README's cluster-policy explain examples: {blocks}"
    );
}
