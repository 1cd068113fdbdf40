//! `enforcer lint` as CI runs it: the real binary on folders written here, its exit codes
//! (0 clean, 1 findings at or above --fail-on, 2 unreadable input) and its JSON.

use std::{path::Path, process::Command};

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

const TYPO: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: wbe}}\n";

fn lint(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .arg("lint")
        .arg(dir)
        .args(args)
        .output()
        .expect("run enforcer");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn a_clean_folder_exits_0() {
    let dir = folder(&[("a.yaml", NS)]);
    let (code, out, err) = lint(dir.path(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 findings"), "{out}");
}

#[test]
fn a_finding_exits_1_with_json_naming_file_object_and_field() {
    let dir = folder(&[("a.yaml", NS), ("b.yaml", TYPO)]);
    let (code, out, err) = lint(dir.path(), &["-o", "json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = &v["findings"][0];
    assert_eq!(f["rule"], "L001");
    assert_eq!(f["name"], "policy-selects-nothing");
    assert_eq!(f["severity"], "warning");
    assert!(f["file"].as_str().unwrap().ends_with("b.yaml"), "{f}");
    assert_eq!(f["line"], 1);
    assert_eq!(
        f["object"],
        serde_json::json!({"kind": "NetworkPolicy", "namespace": "shop", "name": "typo"})
    );
    assert_eq!(f["field"], "spec.podSelector");
    assert_eq!(v["summary"]["warning"], 1);
    assert_eq!(v["summary"]["failed"], true);
    // Below the threshold, or disabled: exit 0.
    assert_eq!(lint(dir.path(), &["--fail-on", "error"]).0, 0);
    assert_eq!(
        lint(dir.path(), &["--disable", "policy-selects-nothing"]).0,
        0
    );
}

#[test]
fn unreadable_input_exits_2() {
    let dir = folder(&[("a.yaml", NS), ("b.yaml", "kind: [unclosed")]);
    let (code, out, err) = lint(dir.path(), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("cannot read") && out.contains("b.yaml"),
        "{out}"
    );
    let (code, _, err) = lint(&dir.path().join("missing"), &[]);
    assert_eq!(code, 2);
    assert!(err.contains("missing"), "{err}");
    let (code, _, err) = lint(dir.path(), &["--disable", "L999"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown lint rule"), "{err}");
}

#[test]
fn sarif_output_is_sarif_2_1_0() {
    let dir = folder(&[("a.yaml", NS), ("b.yaml", TYPO)]);
    let (code, out, _) = lint(dir.path(), &["-o", "sarif"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], "2.1.0");
    assert_eq!(v["runs"][0]["results"][0]["ruleId"], "L001");
}

/// Two Admin policies at one priority selecting `shop/web`, and one whose `domainNames` peer
/// fails closed.
const CLUSTER_POLICIES: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: b-all}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  ingress: [{name: pass, action: Pass, from: [{namespaces: {}}]}]\n---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: a-shop}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}\n  ingress: [{name: deny, action: Deny, from: [{namespaces: {}}]}]\n---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: dns}\nspec:\n  tier: Admin\n  priority: 20\n  subject: {namespaces: {}}\n  egress: [{name: example, action: Accept, to: [{domainNames: [example.com]}]}]\n";

#[test]
fn cluster_policy_ties_and_peers_that_fail_closed_exit_1_naming_file_object_and_field() {
    let dir = folder(&[("a.yaml", NS), ("cluster.yaml", CLUSTER_POLICIES)]);
    let (code, out, err) = lint(dir.path(), &["-o", "json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let findings = v["findings"].as_array().unwrap();
    let find = |rule: &str| {
        findings
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap_or_else(|| panic!("no {rule} in {out}"))
    };
    let tie = find("L013");
    assert_eq!(tie["name"], "tier-priority-tie");
    assert!(
        tie["file"].as_str().unwrap().ends_with("cluster.yaml"),
        "{tie}"
    );
    assert_eq!(
        tie["object"],
        serde_json::json!({"kind": "ClusterNetworkPolicy", "namespace": null, "name": "b-all"})
    );
    assert_eq!(tie["field"], "spec.priority");
    assert!(
        tie["message"]
            .as_str()
            .unwrap()
            .contains("both select shop/web"),
        "{tie}"
    );
    let closed = find("L014");
    assert_eq!(closed["name"], "peer-fails-closed");
    assert_eq!(closed["severity"], "error");
    assert!(
        closed["file"].as_str().unwrap().ends_with("cluster.yaml"),
        "{closed}"
    );
    assert_eq!(
        closed["object"],
        serde_json::json!({"kind": "ClusterNetworkPolicy", "namespace": null, "name": "dns"})
    );
    assert_eq!(closed["field"], "spec.egress[0].to[0]");
    // Text too: each finding names its file and object.
    let (code, text, _) = lint(dir.path(), &[]);
    assert_eq!(code, 1);
    assert!(
        text.contains("L013") && text.contains("L014") && text.contains("cluster.yaml"),
        "{text}"
    );
}
