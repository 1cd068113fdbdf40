//! A synthetic cluster the size of a large real one, deterministic from a seed: for the scale
//! benchmark and for tests that need many pods and policies.
//!
//! Pods are spread over [`NODES`] nodes (never the measured node, [`MEASURED_NODE`]: every pod
//! is a peer there) and [`NAMESPACES`] namespaces, each pod with three labels (`app`, `tier`,
//! `track`) and one named container port (`http`, whose number depends on the app), addresses
//! unique in 10.0.0.0/8 (and fd00:10::/64 when dual-stack). Policies mix what real clusters
//! have: a default-deny per namespace, ingress from namespaces chosen by label, app → app with
//! a named or numbered port, egress to an ipBlock with `except`.
//!
//! The same objects come as JSON values (what an API server serves, see [`Cluster::objects`])
//! and as a folder of manifests for standalone mode ([`Cluster::write_dir`]).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// Nodes the pods are spread over.
pub const NODES: usize = 500;
/// Namespaces the pods and policies are spread over.
pub const NAMESPACES: usize = 100;
/// Apps (deployments) per namespace: pods of one app share `app` and `tier`.
pub const APPS: usize = 20;
/// The node the agent under measure runs as: no pod is scheduled there.
pub const MEASURED_NODE: &str = "scale-measured";

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub pods: usize,
    pub policies: usize,
    pub seed: u64,
    /// Each pod also gets an IPv6 address.
    pub dual_stack: bool,
}

/// One pod, as the generator placed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub app: usize,
    /// `track` label: `stable` or `canary`.
    pub canary: bool,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// The generated cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub spec: Spec,
    pub namespaces: Vec<Value>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Value>,
}

/// splitmix64: a small, well-mixed generator; enough for placement.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn namespace_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn team(ns: usize) -> String {
    format!("team-{}", ns % 10)
}

fn tier(app: usize) -> &'static str {
    ["web", "api", "worker", "db"][app % 4]
}

/// The number behind the `http` port name of `app`'s pods: apps differ, so a named port
/// resolves per pod.
pub fn http_port(app: usize) -> u16 {
    8080 + (app % 3) as u16
}

/// The IPv4 address of the `i`th address of the generator's space (10.0.0.0/8, from 10.0.0.1):
/// `base` offsets it, so a seed moves every pod.
pub fn address(base: u32, i: usize) -> Ipv4Addr {
    let span = (1u32 << 24) - 2;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + (base + i as u32) % span)
}

fn address_v6(v4: Ipv4Addr) -> Ipv6Addr {
    let o = v4.octets();
    Ipv6Addr::new(
        0xfd00,
        0x10,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    )
}

impl Pod {
    /// The pod as the API server serves it (the fields a kubelet and the scheduler fill in,
    /// which the agent must skip, included).
    pub fn object(&self) -> Value {
        let mut ips = vec![json!({"ip": self.v4.to_string()})];
        if let Some(v6) = self.v6 {
            ips.push(json!({"ip": v6.to_string()}));
        }
        let app = format!("app-{:02}", self.app);
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "namespace": self.namespace,
                "name": self.name,
                "uid": format!("uid-{}-{}", self.namespace, self.name),
                "labels": {
                    "app": app,
                    "tier": tier(self.app),
                    "track": if self.canary { "canary" } else { "stable" },
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": app, "uid": "rs"}],
            },
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": "default",
                "containers": [{
                    "name": "main",
                    "image": "registry.example/app:1",
                    "ports": [{"name": "http", "containerPort": http_port(self.app), "protocol": "TCP"}],
                }],
            },
            "status": {"phase": "Running", "podIP": self.v4.to_string(), "podIPs": ips},
        })
    }

    /// The file this pod lives in when it is one of its own (see [`Cluster::write_dir`]).
    pub fn file_name(&self) -> String {
        format!("50-pod-{}-{}.yaml", self.namespace, self.name)
    }
}

impl Cluster {
    pub fn generate(spec: Spec) -> Self {
        let mut rng = Rng(spec.seed);
        let base = (rng.next() % (1 << 20)) as u32;
        let namespaces = (0..NAMESPACES)
            .map(|i| {
                let name = namespace_name(i);
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "uid": format!("uid-ns-{name}"),
                        "labels": {
                            "kubernetes.io/metadata.name": name,
                            "team": team(i),
                            "env": if i % 3 == 0 { "staging" } else { "prod" },
                        },
                    },
                })
            })
            .collect();
        let pods = (0..spec.pods)
            .map(|i| {
                let node = rng.below(NODES);
                placed(&spec, base, i, format!("pod-{i}"), node, rng.below(10) == 0)
            })
            .collect();
        let policies = (0..spec.policies)
            .map(|i| policy(i, &mut rng, base, spec.pods))
            .collect();
        Self {
            spec,
            namespaces,
            pods,
            policies,
        }
    }

    /// Every object: namespaces, pods, policies.
    pub fn objects(&self) -> impl Iterator<Item = Value> + '_ {
        self.namespaces
            .iter()
            .cloned()
            .chain(self.pods.iter().map(Pod::object))
            .chain(self.policies.iter().cloned())
    }

    /// A pod that is not in the cluster yet (for churn): the `n`th extra pod, at an address
    /// past every generated one.
    pub fn extra_pod(&self, n: usize) -> Pod {
        let mut rng = Rng(self.spec.seed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let base = (Rng(self.spec.seed).next() % (1 << 20)) as u32;
        let node = rng.below(NODES);
        placed(
            &self.spec,
            base,
            self.spec.pods + n,
            format!("extra-{n}"),
            node,
            false,
        )
    }

    /// Writes the cluster as manifests into `dir`: the namespaces, pods by namespace and
    /// policies by namespace, one multi-document YAML file each (as `kubectl get -o yaml`
    /// would give them), except the first `own_files` pods, each in a file of its own
    /// ([`Pod::file_name`], as pods added later go): a pod removed is a file removed.
    pub fn write_dir(&self, dir: &Path, own_files: usize) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: String, docs: &mut dyn Iterator<Item = Value>| -> Result<()> {
            let mut text = String::new();
            for d in docs {
                text.push_str("---\n");
                yaml(&d, 0, &mut text);
            }
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write(
            "00-namespaces.yaml".into(),
            &mut self.namespaces.iter().cloned(),
        )?;
        for p in self.pods.iter().take(own_files) {
            write(p.file_name(), &mut std::iter::once(p.object()))?;
        }
        for ns in 0..NAMESPACES {
            let name = namespace_name(ns);
            write(
                format!("10-pods-{name}.yaml"),
                &mut self
                    .pods
                    .iter()
                    .skip(own_files)
                    .filter(|p| p.namespace == name)
                    .map(Pod::object),
            )?;
            write(
                format!("20-policies-{name}.yaml"),
                &mut self
                    .policies
                    .iter()
                    .filter(|p| p["metadata"]["namespace"] == name.as_str())
                    .cloned(),
            )?;
        }
        Ok(())
    }
}

/// The `i`th pod of the address space: its namespace, app and addresses follow from `i`.
fn placed(spec: &Spec, base: u32, i: usize, name: String, node: usize, canary: bool) -> Pod {
    let v4 = address(base, i);
    Pod {
        namespace: namespace_name(i % NAMESPACES),
        name,
        node: format!("node-{node:03}"),
        app: (i / NAMESPACES) % APPS,
        canary,
        v4,
        v6: spec.dual_stack.then(|| address_v6(v4)),
    }
}

/// Policy `i`: the first [`NAMESPACES`] are each namespace's default-deny (ingress); the rest
/// cycle through the kinds a real cluster has.
fn policy(i: usize, rng: &mut Rng, base: u32, pods: usize) -> Value {
    let ns = i % NAMESPACES;
    let namespace = namespace_name(ns);
    let app = |n: usize| json!({"matchLabels": {"app": format!("app-{:02}", n % APPS)}});
    let target = rng.below(APPS);
    let (name, spec) = if i < NAMESPACES {
        (
            "default-deny".to_string(),
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )
    } else {
        match i % 5 {
            // app → app on the named port.
            0 | 1 => (
                format!("allow-app-{i}"),
                json!({
                    "podSelector": app(target),
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{"podSelector": app(rng.below(APPS))}],
                        "ports": [{"protocol": "TCP", "port": "http"}],
                    }],
                }),
            ),
            // From the namespaces of a team, to one tier, on a numbered port.
            2 => (
                format!("allow-team-{i}"),
                json!({
                    "podSelector": {"matchLabels": {"tier": tier(target)}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{"namespaceSelector": {"matchLabels": {"team": team(rng.below(NAMESPACES))}}}],
                        "ports": [{"protocol": "TCP", "port": http_port(target)}],
                    }],
                }),
            ),
            // Pods of an app in the namespaces of an environment (both selectors in one peer),
            // stable track only.
            3 => (
                format!("allow-env-app-{i}"),
                json!({
                    "podSelector": {
                        "matchLabels": {"app": format!("app-{target:02}")},
                        "matchExpressions": [{"key": "track", "operator": "In", "values": ["stable"]}],
                    },
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{
                            "namespaceSelector": {"matchLabels": {"env": "prod"}},
                            "podSelector": app(rng.below(APPS)),
                        }],
                        "ports": [{"protocol": "TCP", "port": "http"}, {"protocol": "UDP", "port": 53}],
                    }],
                }),
            ),
            // Egress to the pod network less a slice of it, and to one app elsewhere.
            _ => {
                let cut = address(base, rng.below(pods.max(1)));
                let o = cut.octets();
                (
                    format!("egress-cidr-{i}"),
                    json!({
                        "podSelector": app(target),
                        "policyTypes": ["Egress"],
                        "egress": [
                            {
                                "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("{}.{}.{}.0/24", o[0], o[1], o[2])]}}],
                                "ports": [{"protocol": "TCP", "port": 443}],
                            },
                            {"to": [{"podSelector": app(rng.below(APPS)), "namespaceSelector": {}}]},
                        ],
                    }),
                )
            }
        }
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name, "uid": format!("uid-np-{namespace}-{i}")},
        "spec": spec,
    })
}

/// Appends `v` as block YAML at `indent` spaces. Strings are double-quoted with JSON's escapes,
/// which YAML reads the same.
pub fn yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, val) in m {
                let _ = write!(out, "{pad}{}:", Value::String(k.clone()));
                scalar_or_block(val, indent + 2, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                let _ = write!(out, "{pad}-");
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        // The first key on the dash's line, the rest below it.
                        let mut first = String::new();
                        yaml(item, indent + 2, &mut first);
                        out.push(' ');
                        out.push_str(&first[indent + 2..]);
                    }
                    _ => scalar_or_block(item, indent + 2, out),
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{other}");
        }
    }
}

fn scalar_or_block(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml(v, indent, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml(v, indent, out);
        }
        // `{}`, `[]`, strings, numbers, bools, null: JSON's text is YAML's.
        other => {
            let _ = writeln!(out, " {other}");
        }
    }
}
