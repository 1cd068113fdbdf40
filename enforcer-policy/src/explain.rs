//! `enforcer explain`: why a flow is allowed or denied, per direction, with the policy and rule
//! that decided it. Built on the reference evaluator, so it states the API's answer; the
//! compiled maps are tested to agree with it.

use std::{fmt, net::IpAddr};

use super::{
    compile::CompileOptions,
    evaluator::{DirVerdict, Endpoint, direction_verdict, resolve_flow},
    model::Cluster,
};
use crate::state::PodRef;

/// The verdict of one side of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// The pod whose policies were checked; `None` when that end is not a pod (no policy applies).
    pub pod: Option<PodRef>,
    /// Whether this node enforces that pod (standalone mode: every pod).
    pub local: bool,
    pub verdict: DirVerdict,
}

impl Side {
    pub fn allowed(&self) -> bool {
        self.verdict.allowed()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: u8,
    pub port: u16,
    /// The addresses used (`None`: the ends could not be resolved to addresses of one family).
    pub addresses: Option<(IpAddr, IpAddr)>,
    /// Egress at the source.
    pub egress: Side,
    /// Ingress at the destination.
    pub ingress: Side,
    pub allowed: bool,
}

/// Explains the verdict for a flow `from` -> `to` on `protocol`/`port`.
pub fn explain(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    protocol: u8,
    port: u16,
) -> Explanation {
    let not_a_pod = || Side {
        pod: None,
        local: false,
        verdict: DirVerdict::NotEnforced,
    };
    let Some(flow) = resolve_flow(cluster, opts, from, to) else {
        return Explanation {
            from: from.clone(),
            to: to.clone(),
            protocol,
            port,
            addresses: None,
            egress: not_a_pod(),
            ingress: not_a_pod(),
            allowed: false,
        };
    };
    let is_local = |r: &PodRef| {
        cluster
            .policy_pods()
            .iter()
            .any(|(p, pod)| p == r && opts.is_local(pod))
    };
    let side = |pod: &Option<PodRef>, ingress: bool, peer: IpAddr| match pod {
        Some(r) => Side {
            pod: Some(r.clone()),
            local: is_local(r),
            verdict: direction_verdict(cluster, opts, r, ingress, peer, protocol, port),
        },
        None => not_a_pod(),
    };
    let egress = side(&flow.src_pod, false, flow.dst);
    let ingress = side(&flow.dst_pod, true, flow.src);
    let allowed = egress.allowed() && ingress.allowed();
    Explanation {
        from: from.clone(),
        to: to.clone(),
        protocol,
        port,
        addresses: Some((flow.src, flow.dst)),
        egress,
        ingress,
        allowed,
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(r) => write!(f, "{r}"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Protocol number to its name, for display.
pub fn protocol_label(protocol: u8) -> String {
    match protocol {
        enforcer_common::PROTO_TCP => "TCP".into(),
        enforcer_common::PROTO_UDP => "UDP".into(),
        enforcer_common::PROTO_SCTP => "SCTP".into(),
        enforcer_common::PROTO_ICMP => "ICMP".into(),
        enforcer_common::PROTO_ICMPV6 => "ICMPv6".into(),
        n => format!("proto {n}"),
    }
}

impl fmt::Display for DirVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotEnforced => f.write_str("allowed: no policy applies (not a pod in policy)"),
            Self::SelfTraffic => f.write_str("allowed: traffic of a pod to itself"),
            Self::Host => f.write_str("allowed: traffic with the pod's node"),
            Self::NotIsolated => {
                f.write_str("allowed: not isolated (no policy selects the pod for this direction)")
            }
            Self::Allowed {
                namespace,
                policy,
                index,
            } => write!(f, "allowed by {namespace}/{policy} rule [{index}]"),
            Self::Denied { policies, refused } => {
                // Refused policies are named with what is wrong (object and field): the fix
                // is there, not in a rule.
                let mut refused_names: Vec<&str> = Vec::new();
                for e in refused {
                    if !refused_names.contains(&e.policy.as_str()) {
                        refused_names.push(&e.policy);
                    }
                }
                let others: Vec<&str> = policies
                    .iter()
                    .map(String::as_str)
                    .filter(|p| !refused_names.contains(p))
                    .collect();
                f.write_str("denied: ")?;
                let mut sep = "";
                if !others.is_empty() {
                    write!(
                        f,
                        "isolated by policies [{}] and no rule allows it",
                        others.join(", ")
                    )?;
                    sep = "; ";
                }
                for name in &refused_names {
                    let why: Vec<String> = refused
                        .iter()
                        .filter(|e| e.policy == *name)
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect();
                    write!(
                        f,
                        "{sep}isolated by refused policy {name}: {}",
                        why.join("; ")
                    )?;
                    sep = "; ";
                }
                if !refused_names.is_empty() {
                    f.write_str(
                        " (a policy the agent cannot understand isolates the pods it selects, \
                         allowing nothing, until it is fixed)",
                    )?;
                }
                Ok(())
            }
            Self::NoIdentity { policies } => {
                write!(
                    f,
                    "denied for want of identity: isolated by policies [{}], which require a \
                     verified peer; the peer's address is not bound to a verified identity",
                    policies.join(", ")
                )
            }
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = protocol_label(self.protocol);
        let port = if matches!(
            self.protocol,
            enforcer_common::PROTO_TCP | enforcer_common::PROTO_UDP | enforcer_common::PROTO_SCTP
        ) {
            format!(" port {}", self.port)
        } else {
            String::new()
        };
        writeln!(f, "flow {} -> {} {proto}{port}", self.from, self.to)?;
        let Some((src, dst)) = self.addresses else {
            return writeln!(
                f,
                "verdict: DENIED (the ends have no addresses of a common family, or a pod is unknown)"
            );
        };
        writeln!(f, "addresses: {src} -> {dst}")?;
        for (name, side) in [("egress ", &self.egress), ("ingress", &self.ingress)] {
            match &side.pod {
                Some(p) => {
                    let note = if side.local {
                        ""
                    } else {
                        " (not enforced on this node)"
                    };
                    writeln!(f, "{name} at {p}{note}: {}", side.verdict)?;
                }
                None => writeln!(f, "{name}: allowed: that end is not a pod")?,
            }
        }
        writeln!(
            f,
            "verdict: {}",
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::model::shared;
    use enforcer_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::tests::fixtures::*;

    #[test]
    fn explains_each_side() {
        let cluster = Cluster {
            namespaces: shared(vec![namespace("x", &[])]),
            pods: shared(vec![
                pod("x", "a", &[("app", "a")], &["10.0.0.1"], "n1", &[]),
                pod("x", "b", &[("app", "b")], &["10.0.0.2"], "n2", &[]),
            ]),
            policies: shared(vec![policy(
                "x",
                "allow-a",
                Some(sel(&[("app", "b")])),
                None,
                Some(vec![(
                    Some(vec![pods_peer(None, Some(sel(&[("app", "a")])))]),
                    Some(vec![tcp(80)]),
                )]),
                None,
            )]),
            ..Default::default()
        };
        let opts = CompileOptions {
            node_name: Some("n2".into()),
            ..Default::default()
        };
        let (a, b) = (
            Endpoint::Pod(PodRef::new("x", "a")),
            Endpoint::Pod(PodRef::new("x", "b")),
        );
        let e = explain(&cluster, &opts, &a, &b, PROTO_TCP, 80);
        assert!(e.allowed);
        assert_eq!(e.egress.verdict, DirVerdict::NotIsolated);
        assert!(!e.egress.local);
        assert_eq!(
            e.ingress.verdict,
            DirVerdict::Allowed {
                namespace: "x".into(),
                policy: "allow-a".into(),
                index: 0
            }
        );
        let text = e.to_string();
        assert!(text.contains("allowed by x/allow-a rule [0]"), "{text}");
        assert!(text.contains("ALLOWED"), "{text}");
        let e = explain(&cluster, &opts, &a, &b, PROTO_UDP, 80);
        assert!(!e.allowed);
        let text = e.to_string();
        assert!(
            text.contains("isolated by policies [x/allow-a] and no rule allows it"),
            "{text}"
        );
        let e = explain(
            &cluster,
            &opts,
            &Endpoint::Ip("8.8.8.8".parse().unwrap()),
            &a,
            PROTO_TCP,
            80,
        );
        assert!(e.allowed);
        assert_eq!(e.egress.pod, None);
        let e = explain(
            &cluster,
            &opts,
            &Endpoint::Ip("fd00::1".parse().unwrap()),
            &a,
            PROTO_TCP,
            80,
        );
        assert!(!e.allowed && e.addresses.is_none());
    }
}
