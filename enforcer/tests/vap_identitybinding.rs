//! The admission policy confining identity-record writes (`manifests/vap-identitybinding.yaml`):
//! its CEL, loaded from the shipped file, evaluated as the API server does (match conditions,
//! then the variables in order, then every validation; an expression that fails to evaluate
//! denies, as `failurePolicy: Fail` does) against a table of requests. A change of the
//! manifest that changes what it admits fails here.

use std::path::Path;

use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::{Map, Value, json};

const AGENT: &str = "system:serviceaccount:enforcer-system:enforcer";
const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

/// The policy's expressions, from the shipped manifest.
struct Policy {
    match_conditions: Vec<String>,
    variables: Vec<(String, String)>,
    validations: Vec<String>,
}

fn policy() -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/vap-identitybinding.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("a ValidatingAdmissionPolicy");
    let spec = &doc["spec"];
    let strings = |list: &Value, field: &str| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|v| v[field].as_str().unwrap().to_string())
            .collect()
    };
    Policy {
        match_conditions: strings(&spec["matchConditions"], "expression"),
        variables: spec["variables"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["expression"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        validations: strings(&spec["validations"], "expression"),
    }
}

fn eval(expr: &str, vars: &Map<String, Value>) -> Result<Cel, String> {
    let program = Program::compile(expr).map_err(|e| format!("{expr}: {e}"))?;
    let mut ctx = Context::default();
    for (k, v) in vars {
        ctx.add_variable(k.as_str(), v.clone())
            .map_err(|e| e.to_string())?;
    }
    program.execute(&ctx).map_err(|e| format!("{expr}: {e}"))
}

fn truth(expr: &str, vars: &Map<String, Value>) -> bool {
    matches!(eval(expr, vars), Ok(Cel::Bool(true)))
}

/// A request of the table: name, expected verdict, operation, user, node claim, object, old object.
type Row<'a> = (
    &'a str,
    Verdict,
    &'a str,
    &'a str,
    Option<&'a [&'a str]>,
    Value,
    Value,
);

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The policy does not apply (not the agent's request).
    NotMatched,
    Allowed,
    Denied,
}

impl Policy {
    fn admit(
        &self,
        operation: &str,
        user: &str,
        node_claim: Option<&[&str]>,
        object: Value,
        old: Value,
    ) -> Verdict {
        let mut extra = Map::new();
        if let Some(nodes) = node_claim {
            extra.insert(NODE_CLAIM.into(), json!(nodes));
        }
        let mut vars = Map::new();
        vars.insert(
            "request".into(),
            json!({"operation": operation, "userInfo": {"username": user, "extra": extra}}),
        );
        vars.insert("object".into(), object);
        vars.insert("oldObject".into(), old);
        if !self.match_conditions.iter().all(|c| truth(c, &vars)) {
            return Verdict::NotMatched;
        }
        let mut variables = Map::new();
        for (name, expr) in &self.variables {
            vars.insert("variables".into(), Value::Object(variables.clone()));
            let value = eval(expr, &vars).ok().and_then(|v| v.json().ok());
            match value {
                Some(v) => {
                    variables.insert(name.clone(), v);
                }
                // A variable that fails to evaluate fails the validations that use it: deny.
                _ => return Verdict::Denied,
            }
        }
        vars.insert("variables".into(), Value::Object(variables));
        if self.validations.iter().all(|v| truth(v, &vars)) {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

fn record(node: &str, uid: &str, expires: &str) -> Value {
    json!({
        "apiVersion": "enforcer.dev/v1alpha1", "kind": "IdentityBinding",
        "metadata": {"namespace": "x", "name": "a"},
        "spec": {
            "serviceAccount": "frontend", "pod": {"name": "a", "uid": uid},
            "addresses": ["10.244.1.10"], "expiresAt": expires, "node": node,
        },
    })
}

const T1: &str = "2030-01-01T00:00:00Z";
const T2: &str = "2030-01-01T01:00:00Z";

#[test]
fn the_admission_policy_confines_each_agent_to_its_own_nodes_records() {
    use Verdict::*;
    let p = policy();
    assert!(!p.match_conditions.is_empty() && p.validations.len() >= 3);
    let own = Some(&["node-0"][..]);
    let other = Some(&["node-1"][..]);
    let rows: Vec<Row<'_>> = vec![
        (
            "create own node",
            Allowed,
            "CREATE",
            AGENT,
            own,
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "create for another node",
            Denied,
            "CREATE",
            AGENT,
            other,
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "create without the node claim",
            Denied,
            "CREATE",
            AGENT,
            None,
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "create with two node claims",
            Denied,
            "CREATE",
            AGENT,
            Some(&["node-0", "node-1"][..]),
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "create with an empty node claim",
            Denied,
            "CREATE",
            AGENT,
            Some(&[][..]),
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "another user (RBAC governs it)",
            NotMatched,
            "CREATE",
            "system:serviceaccount:kube-system:other",
            other,
            record("node-0", "u1", T1),
            Value::Null,
        ),
        (
            "an admin",
            NotMatched,
            "DELETE",
            "kubernetes-admin",
            None,
            Value::Null,
            record("node-0", "u1", T1),
        ),
        (
            "re-attest extends own record",
            Allowed,
            "UPDATE",
            AGENT,
            own,
            record("node-0", "u1", T2),
            record("node-0", "u1", T1),
        ),
        (
            "update another node's record",
            Denied,
            "UPDATE",
            AGENT,
            other,
            record("node-0", "u1", T2),
            record("node-0", "u1", T1),
        ),
        (
            "update moving a record to own node",
            Denied,
            "UPDATE",
            AGENT,
            own,
            record("node-0", "u1", T2),
            record("node-1", "u1", T1),
        ),
        (
            "update moving own record away",
            Denied,
            "UPDATE",
            AGENT,
            own,
            record("node-1", "u1", T2),
            record("node-0", "u1", T1),
        ),
        (
            "update changing the pod uid",
            Denied,
            "UPDATE",
            AGENT,
            own,
            record("node-0", "u2", T2),
            record("node-0", "u1", T1),
        ),
        (
            "delete own record",
            Allowed,
            "DELETE",
            AGENT,
            own,
            Value::Null,
            record("node-0", "u1", T1),
        ),
        (
            "delete another node's record",
            Denied,
            "DELETE",
            AGENT,
            other,
            Value::Null,
            record("node-0", "u1", T1),
        ),
        (
            "delete without the node claim",
            Denied,
            "DELETE",
            AGENT,
            None,
            Value::Null,
            record("node-0", "u1", T1),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, want, op, user, claim, object, old) in rows {
        let got = p.admit(op, user, claim, object, old);
        if got != want {
            wrong.push(format!("{name}: {got:?}, expected {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
