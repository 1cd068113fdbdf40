//! Validation of NetworkPolicy objects, as the API server does it, and their parsed form that
//! the compiler works on.
//!
//! Differences from the API server, on purpose: host bits in CIDRs are masked, not rejected
//! (upstream e2e sends `10.244.1.7/4`), and an absent protocol is defaulted to TCP (objects
//! from a manifests folder never passed an API server's defaulting).

use std::{fmt, net::IpAddr};

use crate::cidr::Cidr;
use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::selector::{Selector, SelectorError};

/// One problem in one policy: the object (`namespace/name`), the field path and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// `namespace/name` of the NetworkPolicy.
    pub policy: String,
    /// Field path, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {}: {}: {}",
            self.policy, self.field, self.message
        )
    }
}

impl std::error::Error for PolicyError {}

/// An ipBlock, normalised: networks masked, excepts sorted and deduplicated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

impl Block {
    /// "IPBlock describes a particular CIDR ... that is allowed to the pods matched by a
    /// NetworkPolicySpec's podSelector. The except entry describes CIDRs that should not be
    /// included within this rule."
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }

    /// The block of a whole network (a cluster policy's `networks` CIDR).
    pub fn network(cidr: Cidr) -> Self {
        Self {
            cidr,
            except: Vec::new(),
        }
    }
}

/// Which namespaces a selector peer looks in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceMatch {
    /// No namespaceSelector: the policy's own namespace.
    Own(String),
    Selector(Selector),
}

/// One element of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Block(Block),
    /// Pods matching `pods` (None = all pods) in namespaces matching `namespaces`.
    Pods {
        namespaces: NamespaceMatch,
        pods: Option<Selector>,
    },
}

/// One element of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    /// Every port of the protocol.
    All(u8),
    /// `port..=end` of the protocol (`end == port` without endPort).
    Range(u8, u16, u16),
    /// A named container port of the protocol.
    Named(u8, String),
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// None: every peer (`from`/`to` empty or missing).
    pub peers: Option<Vec<Peer>>,
    /// None: every protocol and port (`ports` empty or missing).
    pub ports: Option<Vec<Port>>,
}

/// A valid policy in the form the compiler uses (or a refused one's [`Refusal::stand_in`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Some when the policy affects ingress (its rules, possibly none = deny all).
    pub ingress: Option<Vec<Rule>>,
    /// Some when the policy affects egress.
    pub egress: Option<Vec<Rule>>,
    /// Pod and namespace peers must be verified workloads (the policy's annotation).
    pub require_identity: bool,
}

/// What a policy that does not validate still says, read as far as it can be: the agent fails
/// closed on it. It isolates the pods it selects in the directions it names and allows nothing,
/// because ignoring it would leave open what its author meant to restrict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub namespace: String,
    pub name: String,
    /// The pods it isolates; `None` when the podSelector itself cannot be read (or there is no
    /// spec): then every pod of its namespace.
    pub pod_selector: Option<Selector>,
    /// The directions it isolates: those of `policyTypes` (absent: Ingress, and Egress when it
    /// has egress rules), both when `policyTypes` cannot be read.
    pub ingress: bool,
    pub egress: bool,
    /// Why it was refused: each names the object and the field.
    pub errors: Vec<PolicyError>,
}

impl Refusal {
    /// `ingress`, `egress` or `ingress, egress`.
    pub fn directions(&self) -> &'static str {
        match (self.ingress, self.egress) {
            (true, true) => "ingress, egress",
            (false, true) => "egress",
            _ => "ingress",
        }
    }

    /// What the agent does about it, for messages: "isolating the pods it selects (ingress)
    /// until it is fixed".
    pub fn consequence(&self) -> String {
        let whom = match self.pod_selector {
            Some(_) => "the pods it selects".to_string(),
            None => format!(
                "every pod of namespace {} (its podSelector cannot be read)",
                self.namespace
            ),
        };
        format!("isolating {whom} ({}) until it is fixed", self.directions())
    }

    /// The policy the compiler enforces in its place: the same pods and directions, no rules
    /// (a default deny).
    pub fn stand_in(&self) -> ParsedPolicy {
        ParsedPolicy {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            pod_selector: self
                .pod_selector
                .clone()
                .unwrap_or_else(Selector::everything),
            ingress: self.ingress.then(Vec::new),
            egress: self.egress.then(Vec::new),
            require_identity: false,
        }
    }
}

/// Reads what a refused policy (one `parse_policy` refused with `errors`) still says.
pub fn refusal(policy: &NetworkPolicy, errors: Vec<PolicyError>) -> Refusal {
    let namespace = namespace_of(&policy.metadata);
    let name = policy.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &policy.spec else {
        // Nothing to read: every pod of the namespace, both ways.
        return Refusal {
            namespace,
            name,
            pod_selector: None,
            ingress: true,
            egress: true,
            errors,
        };
    };
    let pod_selector = match &spec.pod_selector {
        Some(s) => Selector::parse(s).ok(),
        None => Some(Selector::everything()),
    };
    let (ingress, egress) = match spec.policy_types.as_deref() {
        // The v1 default, as in `parse_policy`.
        None | Some([]) => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(types) if types.iter().all(|t| t == "Ingress" || t == "Egress") => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        // A type we cannot read may mean either direction.
        Some(_) => (true, true),
    };
    Refusal {
        namespace,
        name,
        pod_selector,
        ingress,
        egress,
        errors,
    }
}

/// Namespace of an object: `metadata.namespace`, or `default`.
pub fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Validates a policy; `Err` lists every problem found.
pub fn validate_policy(policy: &NetworkPolicy) -> Result<(), Vec<PolicyError>> {
    parse_policy(policy).map(|_| ())
}

/// Protocol name to number; absent = TCP. Names are case sensitive, as in the API.
pub fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// Parses a CIDR, masking host bits.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.trim()
        .parse::<Cidr>()
        .map_err(|_| format!("{s:?} is not a valid CIDR"))
}

/// An IANA service name as a named port: 1-15 of `[a-z0-9-]`, at least one letter, no leading,
/// trailing or doubled `-`.
fn check_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid port name (1-15 lowercase letters, digits, '-', with a letter)"
        ))
    }
}

/// A rule as the API has it: its peers (`from` / `to`) and ports.
pub(crate) type RawRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

struct Ctx {
    policy: String,
    errors: Vec<PolicyError>,
}

impl Ctx {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            policy: self.policy.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn selector(
        &mut self,
        path: &str,
        sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Selector {
        match Selector::parse(sel) {
            Ok(s) => s,
            Err(errs) => {
                for SelectorError { field, message } in errs {
                    self.err(format!("{path}.{field}"), message);
                }
                Selector::everything()
            }
        }
    }
}

/// Validates and parses a policy.
pub fn parse_policy(policy: &NetworkPolicy) -> Result<ParsedPolicy, Vec<PolicyError>> {
    let namespace = namespace_of(&policy.metadata);
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut cx = Ctx {
        policy: format!("{namespace}/{name}"),
        errors: Vec::new(),
    };
    if name.is_empty() {
        cx.err("metadata.name", "must be set");
    }
    let Some(spec) = &policy.spec else {
        cx.err("spec", "must be set");
        return Err(cx.errors);
    };
    let pod_selector = match &spec.pod_selector {
        Some(s) => cx.selector("spec.podSelector", s),
        None => Selector::everything(),
    };
    let (mut wants_ingress, mut wants_egress) = (false, false);
    match spec.policy_types.as_deref() {
        // "If this field is not specified, it will default based on the existence of ingress
        // or egress rules; policies that contain an egress section are assumed to affect
        // egress, and all policies (whether or not they contain an ingress section) are
        // assumed to affect ingress." The API server treats an empty list as unspecified.
        None | Some([]) => {
            wants_ingress = true;
            wants_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => wants_ingress = true,
                    "Egress" => wants_egress = true,
                    other => cx.err(
                        format!("spec.policyTypes[{i}]"),
                        format!("unsupported value {other:?}: must be Ingress or Egress"),
                    ),
                }
            }
        }
    }
    let rules = |cx: &mut Ctx, dir: &str, list: Vec<RawRule<'_>>| {
        let peer_field = if dir == "ingress" { "from" } else { "to" };
        list.into_iter()
            .enumerate()
            .map(|(i, (peers, ports))| {
                let base = format!("spec.{dir}[{i}]");
                // Exact capacities: a parsed policy is kept as long as its object (memo.rs).
                let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
                    let mut v: Vec<Peer> = peers
                        .iter()
                        .enumerate()
                        .filter_map(|(j, p)| {
                            parse_peer(cx, &format!("{base}.{peer_field}[{j}]"), p, &namespace)
                        })
                        .collect();
                    v.shrink_to_fit();
                    v
                });
                let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
                    let mut v: Vec<Port> = ports
                        .iter()
                        .enumerate()
                        .filter_map(|(j, p)| parse_port(cx, &format!("{base}.ports[{j}]"), p))
                        .collect();
                    v.shrink_to_fit();
                    v
                });
                Rule { peers, ports }
            })
            .collect::<Vec<_>>()
    };
    let ingress_rules = rules(
        &mut cx,
        "ingress",
        spec.ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()))
            .collect(),
    );
    let egress_rules = rules(
        &mut cx,
        "egress",
        spec.egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()))
            .collect(),
    );
    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(ParsedPolicy {
        namespace,
        name,
        pod_selector,
        ingress: wants_ingress.then_some(ingress_rules),
        egress: wants_egress.then_some(egress_rules),
        require_identity: super::model::requires_identity(policy, false),
    })
}

fn parse_peer(cx: &mut Ctx, path: &str, peer: &NetworkPolicyPeer, own_ns: &str) -> Option<Peer> {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (None, None, None) => {
            cx.err(
                path,
                "must specify a peer: one of ipBlock, namespaceSelector, podSelector",
            );
            None
        }
        (Some(_), ns, pod) if ns.is_some() || pod.is_some() => {
            cx.err(path, "may not specify both ipBlock and another peer");
            None
        }
        (Some(block), _, _) => parse_block(cx, &format!("{path}.ipBlock"), block).map(Peer::Block),
        (None, ns, pod) => {
            let namespaces = match ns {
                Some(s) => {
                    NamespaceMatch::Selector(cx.selector(&format!("{path}.namespaceSelector"), s))
                }
                None => NamespaceMatch::Own(own_ns.to_string()),
            };
            let pods = pod
                .as_ref()
                .map(|s| cx.selector(&format!("{path}.podSelector"), s));
            Some(Peer::Pods { namespaces, pods })
        }
    }
}

fn parse_block(cx: &mut Ctx, path: &str, block: &IPBlock) -> Option<Block> {
    let cidr = match parse_cidr(&block.cidr) {
        Ok(c) => c,
        Err(m) => {
            cx.err(format!("{path}.cidr"), m);
            return None;
        }
    };
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        match parse_cidr(e) {
            Ok(net) => {
                let strict_subset = cidr.covers(&net) && net.prefix_len() > cidr.prefix_len();
                if strict_subset {
                    except.push(net);
                } else {
                    cx.err(
                        field,
                        format!("{e:?} must be a strict subset of cidr {:?}", block.cidr),
                    );
                }
            }
            Err(m) => cx.err(field, m),
        }
    }
    except.sort();
    except.dedup();
    Some(Block { cidr, except })
}

fn parse_port(cx: &mut Ctx, path: &str, port: &NetworkPolicyPort) -> Option<Port> {
    let Some(proto) = protocol_number(port.protocol.as_deref()) else {
        cx.err(
            format!("{path}.protocol"),
            format!(
                "unsupported value {:?}: must be TCP, UDP or SCTP",
                port.protocol.as_deref().unwrap_or_default()
            ),
        );
        return None;
    };
    match (&port.port, port.end_port) {
        (None, None) => Some(Port::All(proto)),
        (None, Some(_)) => {
            cx.err(
                format!("{path}.endPort"),
                "may not be specified when port is not specified",
            );
            None
        }
        (Some(IntOrString::String(name)), end) => {
            let mut ok = true;
            if let Err(m) = check_port_name(name) {
                cx.err(format!("{path}.port"), m);
                ok = false;
            }
            if end.is_some() {
                cx.err(
                    format!("{path}.endPort"),
                    "may not be specified when port is a named port",
                );
                ok = false;
            }
            ok.then(|| Port::Named(proto, name.clone()))
        }
        (Some(IntOrString::Int(p)), end) => {
            let mut ok = true;
            if !(1..=65535).contains(p) {
                cx.err(
                    format!("{path}.port"),
                    format!("{p} must be between 1 and 65535, inclusive"),
                );
                ok = false;
            }
            let end_v = end.unwrap_or(*p);
            if end.is_some() {
                if !(1..=65535).contains(&end_v) {
                    cx.err(
                        format!("{path}.endPort"),
                        format!("{end_v} must be between 1 and 65535, inclusive"),
                    );
                    ok = false;
                } else if end_v < *p {
                    cx.err(
                        format!("{path}.endPort"),
                        format!("{end_v} must be greater than or equal to port {p}"),
                    );
                    ok = false;
                }
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "both checked to be in 1..=65535"
            )]
            ok.then_some(Port::Range(proto, *p as u16, end_v as u16))
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::networking::v1::{
            NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicySpec,
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
    };

    use super::*;

    fn policy(spec: NetworkPolicySpec) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("x".into()),
                ..Default::default()
            },
            spec: Some(spec),
        }
    }

    fn ingress_ports(ports: Vec<NetworkPolicyPort>) -> NetworkPolicy {
        policy(NetworkPolicySpec {
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: None,
                ports: Some(ports),
            }]),
            ..Default::default()
        })
    }

    fn port(proto: Option<&str>, port: Option<IntOrString>, end: Option<i32>) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: proto.map(Into::into),
            port,
            end_port: end,
        }
    }

    fn fields(p: &NetworkPolicy) -> Vec<String> {
        validate_policy(p)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    fn block(cidr: &str, except: &[&str]) -> NetworkPolicy {
        policy(NetworkPolicySpec {
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: cidr.into(),
                        except: Some(except.iter().map(|s| s.to_string()).collect()),
                    }),
                    ..Default::default()
                }]),
                ports: None,
            }]),
            ..Default::default()
        })
    }

    #[test]
    fn port_errors() {
        let p = ingress_ports(vec![
            port(None, Some(IntOrString::Int(80)), None),
            port(None, Some(IntOrString::Int(90)), Some(80)),
        ]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[1].endPort"]);
        let e = validate_policy(&p).unwrap_err();
        assert_eq!(e[0].policy, "x/p");
        assert!(e[0].to_string().contains("x/p"), "{}", e[0]);
        let p = ingress_ports(vec![port(
            None,
            Some(IntOrString::String("http".into())),
            Some(90),
        )]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].endPort"]);
        let p = ingress_ports(vec![port(None, None, Some(90))]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].endPort"]);
        let p = ingress_ports(vec![port(Some("ICMP"), None, None)]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].protocol"]);
        let p = ingress_ports(vec![port(Some("tcp"), None, None)]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].protocol"]);
        let p = ingress_ports(vec![port(None, Some(IntOrString::Int(0)), None)]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].port"]);
        let p = ingress_ports(vec![port(None, Some(IntOrString::Int(70000)), None)]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].port"]);
        let p = ingress_ports(vec![port(None, Some(IntOrString::Int(80)), Some(70000))]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].endPort"]);
        let p = ingress_ports(vec![port(
            None,
            Some(IntOrString::String("80".into())),
            None,
        )]);
        assert_eq!(fields(&p), ["spec.ingress[0].ports[0].port"]);
    }

    #[test]
    fn ports_parse_with_tcp_default() {
        let p = parse_policy(&ingress_ports(vec![
            port(None, Some(IntOrString::Int(80)), None),
            port(Some("UDP"), Some(IntOrString::Int(80)), Some(90)),
            port(Some("SCTP"), None, None),
            port(None, Some(IntOrString::String("serve-80-tcp".into())), None),
        ]))
        .unwrap();
        let rule = &p.ingress.unwrap()[0];
        assert_eq!(
            rule.ports.as_deref().unwrap(),
            [
                Port::Range(PROTO_TCP, 80, 80),
                Port::Range(PROTO_UDP, 80, 90),
                Port::All(PROTO_SCTP),
                Port::Named(PROTO_TCP, "serve-80-tcp".into())
            ]
        );
        assert!(p.egress.is_none());
    }

    #[test]
    fn cidr_errors_and_masking() {
        assert_eq!(
            fields(&block("10.0.0.0/33", &[])),
            ["spec.egress[0].to[0].ipBlock.cidr"]
        );
        assert_eq!(
            fields(&block("nonsense", &[])),
            ["spec.egress[0].to[0].ipBlock.cidr"]
        );
        assert_eq!(
            fields(&block("10.0.0.0/8", &["11.0.0.0/16"])),
            ["spec.egress[0].to[0].ipBlock.except[0]"]
        );
        assert_eq!(
            fields(&block("10.0.0.0/8", &["10.0.0.0/8"])),
            ["spec.egress[0].to[0].ipBlock.except[0]"]
        );
        assert_eq!(
            fields(&block("10.0.0.0/8", &["fd00::/64"])),
            ["spec.egress[0].to[0].ipBlock.except[0]"]
        );
        assert_eq!(
            fields(&block("10.0.0.0/8", &["bad"])),
            ["spec.egress[0].to[0].ipBlock.except[0]"]
        );
        let p = parse_policy(&block("10.244.1.7/4", &["10.244.1.7/32"])).unwrap();
        let rules = p.egress.unwrap();
        let Peer::Block(b) = &rules[0].peers.as_ref().unwrap()[0] else {
            panic!()
        };
        assert_eq!(b.cidr.to_string(), "0.0.0.0/4");
        assert!(b.contains("10.244.1.8".parse().unwrap()));
        assert!(!b.contains("10.244.1.7".parse().unwrap()));
        assert!(!b.contains("16.0.0.1".parse().unwrap()));
        let p = parse_policy(&block("fd00::1/64", &["fd00::1/128"])).unwrap();
        assert!(p.egress.is_some(), "egress rules imply Egress");
    }

    #[test]
    fn peer_and_selector_errors() {
        let mk = |peer: NetworkPolicyPeer| {
            policy(NetworkPolicySpec {
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![peer]),
                    ports: None,
                }]),
                ..Default::default()
            })
        };
        assert_eq!(
            fields(&mk(NetworkPolicyPeer::default())),
            ["spec.ingress[0].from[0]"]
        );
        let both = NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: "10.0.0.0/8".into(),
                except: None,
            }),
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        };
        assert_eq!(fields(&mk(both)), ["spec.ingress[0].from[0]"]);
        let bad_sel = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Has".into(),
                values: None,
            }]),
            ..Default::default()
        };
        let p = mk(NetworkPolicyPeer {
            namespace_selector: Some(bad_sel.clone()),
            ..Default::default()
        });
        assert_eq!(
            fields(&p),
            ["spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator"]
        );
        let mut p = policy(NetworkPolicySpec {
            pod_selector: Some(bad_sel),
            ..Default::default()
        });
        assert_eq!(
            fields(&p),
            ["spec.podSelector.matchExpressions[0].operator"]
        );
        p.spec.as_mut().unwrap().pod_selector = None;
        p.spec.as_mut().unwrap().policy_types = Some(vec!["Ingress".into(), "Sideways".into()]);
        assert_eq!(fields(&p), ["spec.policyTypes[1]"]);
        p.spec = None;
        assert_eq!(fields(&p), ["spec"]);
    }

    #[test]
    fn policy_types() {
        let mut spec = NetworkPolicySpec::default();
        let p = parse_policy(&policy(spec.clone())).unwrap();
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, false));
        spec.egress = Some(vec![NetworkPolicyEgressRule::default()]);
        let p = parse_policy(&policy(spec.clone())).unwrap();
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, true));
        spec.policy_types = Some(vec!["Egress".into()]);
        let p = parse_policy(&policy(spec.clone())).unwrap();
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (false, true));
        spec.policy_types = Some(vec!["Ingress".into()]);
        let p = parse_policy(&policy(spec.clone())).unwrap();
        assert_eq!(
            (p.ingress.is_some(), p.egress.is_some()),
            (true, false),
            "listed types are exact"
        );
        spec.policy_types = Some(vec![]);
        let p = parse_policy(&policy(spec)).unwrap();
        assert_eq!(
            (p.ingress.is_some(), p.egress.is_some()),
            (true, true),
            "empty list = unspecified"
        );
    }
}
