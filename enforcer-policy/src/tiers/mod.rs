//! Cluster-wide policy tiers: `ClusterNetworkPolicy` (`policy.networking.k8s.io/v1alpha2`,
//! tiers `Admin` and `Baseline`) and its predecessors `AdminNetworkPolicy` /
//! `BaselineAdminNetworkPolicy` (v1alpha1), read into one model ([`ClusterPolicy`]) and judged
//! by one rule ([`first_match`], [`combine`]).
//!
//! Order of evaluation, per direction, as the API text gives it: the Admin tier, policies by
//! priority (lower first), rules in written order; the first rule whose peers and ports match
//! decides: Accept (v1alpha1: Allow) and Deny are final, Pass skips the rest of the tier. Then
//! NetworkPolicy, which decides for every pod it isolates. Then the Baseline tier, the same way.
//! Then the default: allowed. Two policies of one tier with the same priority may both match;
//! the API leaves the choice to the implementation: here the one whose name sorts first
//! decides (stable across restarts and nodes), and `lint` reports such ties.
//!
//! Fail closed, as the API asks: a peer with no field this version knows (a newer CRD) makes an
//! Accept rule match nothing and a Deny or Pass rule deny everything; an object that cannot be
//! read at all ([`parse`] errors) becomes a policy at its tier and priority (the first, when
//! those are unreadable too) that denies every direction it has rules for, for its subject
//! (every pod, when that is unreadable), and says so.

pub mod api;
pub mod scenario;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    cidr::Cidr,
    model::PodInfo,
    selector::{Labels, Selector},
    validate::parse_cidr,
};

/// Highest priority value both API versions accept.
pub const MAX_PRIORITY: u32 = 1000;
/// Rules per direction: v1alpha2 allows 25, v1alpha1 100.
const MAX_RULES_V1ALPHA2: usize = 25;
const MAX_RULES_V1ALPHA1: usize = 100;
const MAX_NETWORKS: usize = 25;
const MAX_RULE_NAME: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
        })
    }
}

/// Which API object a policy was read from (for names in output and errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// v1alpha2.
    ClusterNetworkPolicy,
    /// v1alpha1, Admin tier.
    AdminNetworkPolicy,
    /// v1alpha1, Baseline tier; a singleton named `default`.
    BaselineAdminNetworkPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterNetworkPolicy => api::KIND_CNP,
            Self::AdminNetworkPolicy => api::KIND_ANP,
            Self::BaselineAdminNetworkPolicy => api::KIND_BANP,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::ClusterNetworkPolicy => api::V1ALPHA2,
            _ => api::V1ALPHA1,
        }
    }

    fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            (api::V1ALPHA2, api::KIND_CNP) => Some(Self::ClusterNetworkPolicy),
            (api::V1ALPHA1, api::KIND_ANP) => Some(Self::AdminNetworkPolicy),
            (api::V1ALPHA1, api::KIND_BANP) => Some(Self::BaselineAdminNetworkPolicy),
            _ => None,
        }
    }

    fn max_rules(self) -> usize {
        match self {
            Self::ClusterNetworkPolicy => MAX_RULES_V1ALPHA2,
            _ => MAX_RULES_V1ALPHA1,
        }
    }
}

/// Whether `api_version`/`kind` name one of the kinds this module reads.
pub fn is_tier_kind(api_version: &str, kind: &str) -> bool {
    Kind::from_type(api_version, kind).is_some()
}

/// A rule's action. v1alpha1's `Allow` is read as `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

impl Action {
    /// The action's name in `kind`'s API version.
    pub fn name_in(self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Self::Accept, Kind::ClusterNetworkPolicy) => "Accept",
            (Self::Accept, _) => "Allow",
            (Self::Deny, _) => "Deny",
            (Self::Pass, _) => "Pass",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to the subject pod: the peer is the source.
    Ingress,
    /// Traffic from the subject pod: the peer is the destination.
    Egress,
}

/// The pods a policy applies to. Host-network pods are never subjects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    Namespaces(Selector),
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
}

impl Subject {
    /// Every pod: what an unreadable subject fails closed to.
    pub fn everything() -> Self {
        Self::Namespaces(Selector::everything())
    }

    pub fn selects(&self, pod: &PodInfo, namespace_labels: &Labels) -> bool {
        !pod.host_network && pod_selected(self.selectors(), pod, namespace_labels)
    }

    fn selectors(&self) -> (&Selector, Option<&Selector>) {
        match self {
            Self::Namespaces(ns) => (ns, None),
            Self::Pods { namespaces, pods } => (namespaces, Some(pods)),
        }
    }
}

fn pod_selected(
    (namespaces, pods): (&Selector, Option<&Selector>),
    pod: &PodInfo,
    namespace_labels: &Labels,
) -> bool {
    namespaces.matches(namespace_labels) && pods.is_none_or(|s| s.matches(&pod.labels))
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerSelector {
    /// Every (non-host-network) pod of the selected namespaces.
    Namespaces(Selector),
    /// The selected pods of the selected namespaces.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// The addresses of the selected nodes (egress only).
    Nodes(Selector),
    /// Any address in one of the CIDRs, pods' included (egress only).
    Networks(Vec<Cidr>),
    /// Every peer: a Deny or Pass rule failed closed.
    Everything,
    /// No peer: an Accept rule's peer that cannot be honoured (a field this version does not
    /// know, `domainNames`) fails closed to nothing.
    Nothing,
}

/// What a rule can know of the other end of a flow.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerFacts<'a> {
    /// The pod that owns the peer address, with its namespace's labels; `None` for an address
    /// no pod owns (a node, the world) and for host-network pods.
    pub pod: Option<(&'a PodInfo, &'a Labels)>,
    /// The node that owns the peer address: its labels.
    pub node: Option<&'a Labels>,
    /// The peer's address, when known (offline tools may judge pods without addresses).
    pub addr: Option<IpAddr>,
}

impl PeerSelector {
    pub fn matches(&self, peer: &PeerFacts) -> bool {
        match self {
            Self::Namespaces(ns) => peer
                .pod
                .is_some_and(|(p, nsl)| !p.host_network && ns.matches(nsl)),
            Self::Pods { namespaces, pods } => peer.pod.is_some_and(|(p, nsl)| {
                !p.host_network && pod_selected((namespaces, Some(pods)), p, nsl)
            }),
            Self::Nodes(sel) => peer.node.is_some_and(|l| sel.matches(l)),
            Self::Networks(cidrs) => peer
                .addr
                .is_some_and(|a| cidrs.iter().any(|c| c.contains(a))),
            Self::Everything => true,
            Self::Nothing => false,
        }
    }
}

/// Destination ports a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortSelector {
    /// `protocol` ports `start..=end` (every port: `0..=65535`).
    Range { protocol: u8, start: u16, end: u16 },
    /// A container port name of the destination pod (never matches a node or a network).
    Named(String),
}

/// One rule of a policy, in written order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TierRule {
    /// `name`, or `ingress[i]`/`egress[i]` when unnamed.
    pub name: String,
    pub action: Action,
    pub peers: Vec<PeerSelector>,
    /// `None`: every protocol and port (ICMP included).
    pub ports: Option<Vec<PortSelector>>,
}

/// A flow as one rule judges it: the destination's protocol and port, and, for named ports,
/// the destination pod's named ports.
#[derive(Clone, Copy, Debug)]
pub struct Service<'a> {
    pub protocol: u8,
    /// Destination port (0 for protocols without ports).
    pub port: u16,
    /// The destination pod, when the destination is a pod (named ports resolve on it).
    pub destination_pod: Option<&'a PodInfo>,
}

impl TierRule {
    pub fn matches(&self, peer: &PeerFacts, svc: &Service) -> bool {
        self.peers.iter().any(|p| p.matches(peer)) && self.ports_match(svc)
    }

    fn ports_match(&self, svc: &Service) -> bool {
        let Some(ports) = &self.ports else {
            return true;
        };
        ports.iter().any(|p| match p {
            PortSelector::Range {
                protocol,
                start,
                end,
            } => *protocol == svc.protocol && (*start..=*end).contains(&svc.port),
            PortSelector::Named(name) => svc.destination_pod.is_some_and(|pod| {
                pod.named_ports.iter().any(|(n, proto, port)| {
                    n == name && *proto == svc.protocol && *port == svc.port
                })
            }),
        })
    }
}

/// A cluster-wide policy of either API version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterPolicy {
    pub kind: Kind,
    pub name: String,
    pub tier: Tier,
    /// 0..=[`MAX_PRIORITY`]; a BaselineAdminNetworkPolicy has none (0).
    pub priority: u32,
    pub subject: Subject,
    pub ingress: Vec<TierRule>,
    pub egress: Vec<TierRule>,
    /// Why the object was refused: then its rules are the fail-closed stand-in.
    pub refused: Vec<TierError>,
}

impl ClusterPolicy {
    /// `Kind/name`, as errors and `explain` name it.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.name)
    }

    pub fn rules(&self, direction: Direction) -> &[TierRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Evaluation order within a tier: priority, then name.
    pub fn order_key(&self) -> (Tier, u32, &str, Kind) {
        (self.tier, self.priority, &self.name, self.kind)
    }
}

/// A problem with one field of a cluster policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TierError {
    /// `Kind/name`.
    pub object: String,
    /// Path in the object, e.g. `spec.egress[2].to[0].networks[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// The outcome of reading one object: the policy to enforce (the stand-in when refused, see
/// the module text) and what was degraded without refusing it (fail-closed peers).
#[derive(Clone, Debug)]
pub struct Parsed {
    pub policy: ClusterPolicy,
    pub warnings: Vec<TierError>,
}

/// Reads a `ClusterNetworkPolicy`, `AdminNetworkPolicy` or `BaselineAdminNetworkPolicy` from
/// its JSON form. `Err` only when it is none of those kinds (the caller decides what the object
/// is); every problem inside one of them is in [`ClusterPolicy::refused`] or
/// [`Parsed::warnings`].
pub fn parse(value: &serde_json::Value) -> Result<Parsed, String> {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let kind_name = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let Some(kind) = Kind::from_type(api_version, kind_name) else {
        return Err(format!(
            "{api_version}/{kind_name} is not a cluster policy kind ({} {}, {} {}, {} {})",
            api::V1ALPHA2,
            api::KIND_CNP,
            api::V1ALPHA1,
            api::KIND_ANP,
            api::V1ALPHA1,
            api::KIND_BANP
        ));
    };
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let mut r = Reader {
        kind,
        object: format!("{}/{}", kind.as_str(), name),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    if name.is_empty() {
        r.error("metadata.name", "is required");
    }
    let obj: api::Object = match serde_json::from_value(value.clone()) {
        Ok(o) => o,
        Err(e) => {
            r.error("spec", format!("cannot be read: {e}"));
            api::Object::default()
        }
    };
    let policy = r.policy(name, obj.spec.unwrap_or_default());
    Ok(Parsed {
        policy,
        warnings: r.warnings,
    })
}

struct Reader {
    kind: Kind,
    object: String,
    errors: Vec<TierError>,
    warnings: Vec<TierError>,
}

impl Reader {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(TierError {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(TierError {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn unknown(&mut self, at: &str, unknown: &BTreeMap<String, serde_json::Value>) {
        for k in unknown.keys() {
            self.error(
                format!("{at}.{k}"),
                format!("is not a field of {}", self.kind.api_version()),
            );
        }
    }

    fn policy(&mut self, name: String, spec: api::Spec) -> ClusterPolicy {
        self.unknown("spec", &spec.unknown);
        let tier = match (self.kind, spec.tier.as_deref()) {
            (Kind::ClusterNetworkPolicy, Some("Admin")) => Some(Tier::Admin),
            (Kind::ClusterNetworkPolicy, Some("Baseline")) => Some(Tier::Baseline),
            (Kind::ClusterNetworkPolicy, Some(t)) => {
                self.error("spec.tier", format!("{t:?} is not Admin or Baseline"));
                None
            }
            (Kind::ClusterNetworkPolicy, None) => {
                self.error("spec.tier", "is required");
                None
            }
            (_, Some(_)) => {
                self.error(
                    "spec.tier",
                    "is not a field of v1alpha1 (the kind sets the tier)",
                );
                None
            }
            (Kind::AdminNetworkPolicy, None) => Some(Tier::Admin),
            (Kind::BaselineAdminNetworkPolicy, None) => Some(Tier::Baseline),
        };
        let priority = match (self.kind, spec.priority) {
            (Kind::BaselineAdminNetworkPolicy, None) => Some(0),
            (Kind::BaselineAdminNetworkPolicy, Some(_)) => {
                self.error(
                    "spec.priority",
                    "is not a field of BaselineAdminNetworkPolicy",
                );
                None
            }
            (_, None) => {
                self.error("spec.priority", "is required");
                None
            }
            (_, Some(p)) => match u32::try_from(p) {
                Ok(p) if p <= MAX_PRIORITY => Some(p),
                _ => {
                    self.error("spec.priority", format!("{p} is not in 0..={MAX_PRIORITY}"));
                    None
                }
            },
        };
        if self.kind == Kind::BaselineAdminNetworkPolicy && name != "default" {
            self.error(
                "metadata.name",
                "a BaselineAdminNetworkPolicy must be named \"default\"",
            );
        }
        let subject = match spec.subject {
            None => {
                self.error("spec.subject", "is required");
                None
            }
            Some(s) => self.subject(s),
        };
        // Which directions the object concerns, as written (a refused rule still concerns one).
        let written = |r: &Option<Vec<api::Rule>>| r.as_ref().is_some_and(|r| !r.is_empty());
        let (has_in, has_out) = match (written(&spec.ingress), written(&spec.egress)) {
            (false, false) => (true, true),
            both => both,
        };
        let ingress = self.rules(Direction::Ingress, spec.ingress.unwrap_or_default());
        let egress = self.rules(Direction::Egress, spec.egress.unwrap_or_default());
        let refused = std::mem::take(&mut self.errors);
        if refused.is_empty() {
            return ClusterPolicy {
                kind: self.kind,
                name,
                tier: tier.expect("no error: tier read"),
                priority: priority.expect("no error: priority read"),
                subject: subject.expect("no error: subject read"),
                ingress,
                egress,
                refused,
            };
        }
        // The stand-in: deny every direction the object has rules for (both when it has none),
        // for its subject, at its place in the order.
        let deny = |dir: &str| {
            vec![TierRule {
                name: format!("refused ({dir})"),
                action: Action::Deny,
                peers: vec![PeerSelector::Everything],
                ports: None,
            }]
        };
        ClusterPolicy {
            kind: self.kind,
            name,
            tier: tier.unwrap_or(match self.kind {
                Kind::BaselineAdminNetworkPolicy => Tier::Baseline,
                _ => Tier::Admin,
            }),
            priority: priority.unwrap_or(0),
            subject: subject.unwrap_or_else(Subject::everything),
            ingress: if has_in { deny("ingress") } else { Vec::new() },
            egress: if has_out { deny("egress") } else { Vec::new() },
            refused,
        }
    }

    fn selector(&mut self, at: &str, s: Option<&LabelSelector>) -> Option<Selector> {
        let Some(s) = s else {
            self.error(at, "is required");
            return None;
        };
        match Selector::parse(s) {
            Ok(s) => Some(s),
            Err(errs) => {
                for e in errs {
                    self.error(format!("{at}.{}", e.field), e.message);
                }
                None
            }
        }
    }

    fn namespaced(&mut self, at: &str, p: &api::NamespacedPod) -> Option<(Selector, Selector)> {
        let ns = self.selector(
            &format!("{at}.namespaceSelector"),
            p.namespace_selector.as_ref(),
        );
        let pods = self.selector(&format!("{at}.podSelector"), p.pod_selector.as_ref());
        Some((ns?, pods?))
    }

    fn subject(&mut self, s: api::Subject) -> Option<Subject> {
        self.unknown("spec.subject", &s.unknown);
        match (&s.namespaces, &s.pods) {
            (Some(ns), None) => self
                .selector("spec.subject.namespaces", Some(ns))
                .map(Subject::Namespaces),
            (None, Some(p)) => self
                .namespaced("spec.subject.pods", p)
                .map(|(namespaces, pods)| Subject::Pods { namespaces, pods }),
            _ => {
                self.error(
                    "spec.subject",
                    "exactly one of namespaces and pods must be set",
                );
                None
            }
        }
    }

    fn rules(&mut self, dir: Direction, rules: Vec<api::Rule>) -> Vec<TierRule> {
        let list = match dir {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        if rules.len() > self.kind.max_rules() {
            self.error(
                format!("spec.{list}"),
                format!(
                    "{} rules; at most {} are allowed",
                    rules.len(),
                    self.kind.max_rules()
                ),
            );
        }
        rules
            .into_iter()
            .enumerate()
            .filter_map(|(i, rule)| self.rule(dir, &format!("spec.{list}[{i}]"), i, rule))
            .collect()
    }

    fn rule(
        &mut self,
        dir: Direction,
        at: &str,
        index: usize,
        rule: api::Rule,
    ) -> Option<TierRule> {
        self.unknown(at, &rule.unknown);
        let errors_before = self.errors.len();
        if let Some(n) = &rule.name
            && n.chars().count() > MAX_RULE_NAME
        {
            self.error(
                format!("{at}.name"),
                format!("is longer than {MAX_RULE_NAME} characters"),
            );
        }
        let action = match (self.kind, rule.action.as_deref()) {
            (Kind::ClusterNetworkPolicy, Some("Accept")) => Some(Action::Accept),
            (Kind::AdminNetworkPolicy | Kind::BaselineAdminNetworkPolicy, Some("Allow")) => {
                Some(Action::Accept)
            }
            (_, Some("Deny")) => Some(Action::Deny),
            (Kind::ClusterNetworkPolicy | Kind::AdminNetworkPolicy, Some("Pass")) => {
                Some(Action::Pass)
            }
            (k, Some(a)) => {
                let allowed = match k {
                    Kind::ClusterNetworkPolicy => "Accept, Deny or Pass",
                    Kind::AdminNetworkPolicy => "Allow, Deny or Pass",
                    Kind::BaselineAdminNetworkPolicy => "Allow or Deny",
                };
                self.error(
                    format!("{at}.action"),
                    format!("{a:?} is not one of {allowed}"),
                );
                None
            }
            (_, None) => {
                self.error(format!("{at}.action"), "is required");
                None
            }
        };
        let (peers_field, peers, other) = match dir {
            Direction::Ingress => ("from", rule.from, rule.to.is_some().then_some("to")),
            Direction::Egress => ("to", rule.to, rule.from.is_some().then_some("from")),
        };
        if let Some(other) = other {
            self.error(
                format!("{at}.{other}"),
                format!(
                    "is not a field of an {} rule",
                    match dir {
                        Direction::Ingress => "ingress",
                        Direction::Egress => "egress",
                    }
                ),
            );
        }
        let peers = match peers {
            Some(p) if !p.is_empty() => p,
            _ => {
                self.error(format!("{at}.{peers_field}"), "must list at least one peer");
                Vec::new()
            }
        };
        let ports = match self.kind {
            Kind::ClusterNetworkPolicy => {
                if rule.ports.is_some() {
                    self.error(
                        format!("{at}.ports"),
                        "is not a field of v1alpha2 (use protocols)",
                    );
                }
                rule.protocols
                    .map(|ps| self.protocols(&format!("{at}.protocols"), ps))
            }
            _ => {
                if rule.protocols.is_some() {
                    self.error(
                        format!("{at}.protocols"),
                        "is not a field of v1alpha1 (use ports)",
                    );
                }
                rule.ports
                    .map(|ps| self.anp_ports(&format!("{at}.ports"), ps))
            }
        };
        let mut out = Vec::new();
        let mut fail_closed = false;
        for (j, peer) in peers.into_iter().enumerate() {
            let pat = format!("{at}.{peers_field}[{j}]");
            match self.peer(dir, &pat, peer) {
                PeerRead::Ok(p) => out.push(p),
                PeerRead::Unknown(what) => {
                    if action == Some(Action::Accept) {
                        self.warn(
                            &pat,
                            format!("{what}: this peer matches nothing (fail closed)"),
                        );
                        out.push(PeerSelector::Nothing);
                    } else {
                        self.warn(
                            &pat,
                            format!("{what}: the rule denies everything (fail closed)"),
                        );
                        fail_closed = true;
                    }
                }
                PeerRead::Invalid => {}
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        let name = rule.name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
            format!(
                "{}[{index}]",
                match dir {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                }
            )
        });
        if fail_closed {
            return Some(TierRule {
                name,
                action: Action::Deny,
                peers: vec![PeerSelector::Everything],
                ports: None,
            });
        }
        Some(TierRule {
            name,
            action: action?,
            peers: out,
            ports,
        })
    }

    fn peer(&mut self, dir: Direction, at: &str, p: api::Peer) -> PeerRead {
        let mut set: Vec<&str> = Vec::new();
        if p.namespaces.is_some() {
            set.push("namespaces");
        }
        if p.pods.is_some() {
            set.push("pods");
        }
        if p.nodes.is_some() {
            set.push("nodes");
        }
        if p.networks.is_some() {
            set.push("networks");
        }
        if p.domain_names.is_some() {
            set.push("domainNames");
        }
        if set.len() > 1 {
            self.error(
                at,
                format!(
                    "exactly one peer field may be set, not {}",
                    set.join(" and ")
                ),
            );
            return PeerRead::Invalid;
        }
        let Some(field) = set.first().copied() else {
            let what = if p.unknown.is_empty() {
                "no peer field is set".to_string()
            } else {
                let names: Vec<&str> = p.unknown.keys().map(String::as_str).collect();
                format!("unknown peer field {}", names.join(", "))
            };
            return PeerRead::Unknown(what);
        };
        if dir == Direction::Ingress && !matches!(field, "namespaces" | "pods") {
            self.error(format!("{at}.{field}"), "is not a peer of an ingress rule");
            return PeerRead::Invalid;
        }
        let read = match field {
            "namespaces" => self
                .selector(&format!("{at}.namespaces"), p.namespaces.as_ref())
                .map(PeerSelector::Namespaces),
            "pods" => self
                .namespaced(&format!("{at}.pods"), p.pods.as_ref().expect("set"))
                .map(|(namespaces, pods)| PeerSelector::Pods { namespaces, pods }),
            "nodes" => self
                .selector(&format!("{at}.nodes"), p.nodes.as_ref())
                .map(PeerSelector::Nodes),
            "networks" => {
                let nets = p.networks.unwrap_or_default();
                if nets.is_empty() || nets.len() > MAX_NETWORKS {
                    self.error(
                        format!("{at}.networks"),
                        format!("must list 1..={MAX_NETWORKS} CIDRs, not {}", nets.len()),
                    );
                }
                let mut cidrs = Vec::new();
                for (k, n) in nets.iter().enumerate() {
                    // Host bits are masked, as the API's `isCIDR` validation lets them through.
                    match parse_cidr(n) {
                        Ok(c) => cidrs.push(c),
                        Err(e) => self.error(format!("{at}.networks[{k}]"), e),
                    }
                }
                (cidrs.len() == nets.len() && !nets.is_empty())
                    .then_some(PeerSelector::Networks(cidrs))
            }
            "domainNames" => {
                return PeerRead::Unknown(
                    "domainNames are not enforced by this agent (no DNS in the datapath)"
                        .to_string(),
                );
            }
            _ => unreachable!("field names above"),
        };
        read.map_or(PeerRead::Invalid, PeerRead::Ok)
    }

    fn port_number(&mut self, at: &str, n: Option<i64>) -> Option<u16> {
        match n.map(u16::try_from) {
            Some(Ok(p)) if p != 0 => Some(p),
            Some(_) => {
                self.error(
                    at,
                    format!("{} is not a port (1..=65535)", n.unwrap_or_default()),
                );
                None
            }
            None => {
                self.error(at, "is required");
                None
            }
        }
    }

    fn range(&mut self, at: &str, protocol: u8, r: &api::Range) -> Option<PortSelector> {
        let start = self.port_number(&format!("{at}.start"), r.start)?;
        let end = self.port_number(&format!("{at}.end"), r.end)?;
        if start >= end {
            self.error(at, format!("start {start} must be less than end {end}"));
            return None;
        }
        Some(PortSelector::Range {
            protocol,
            start,
            end,
        })
    }

    fn protocols(&mut self, at: &str, ps: Vec<api::Protocol>) -> Vec<PortSelector> {
        let mut out = Vec::new();
        for (i, p) in ps.into_iter().enumerate() {
            let pat = format!("{at}[{i}]");
            self.unknown(&pat, &p.unknown);
            let mut set = Vec::new();
            for (proto, name, v) in [
                (PROTO_TCP, "tcp", &p.tcp),
                (PROTO_UDP, "udp", &p.udp),
                (PROTO_SCTP, "sctp", &p.sctp),
            ] {
                if let Some(v) = v {
                    set.push((proto, name, v));
                }
            }
            let named = p.destination_named_port.as_ref();
            if set.len() + usize::from(named.is_some()) != 1 {
                self.error(
                    &pat,
                    "exactly one of tcp, udp, sctp and destinationNamedPort must be set",
                );
                continue;
            }
            if let Some(name) = named {
                if name.is_empty() {
                    self.error(format!("{pat}.destinationNamedPort"), "must not be empty");
                } else {
                    out.push(PortSelector::Named(name.clone()));
                }
                continue;
            }
            let (protocol, name, v) = set[0];
            let dat = format!("{pat}.{name}.destinationPort");
            match &v.destination_port {
                None => out.push(PortSelector::Range {
                    protocol,
                    start: 0,
                    end: u16::MAX,
                }),
                Some(d) => match (d.number, &d.range) {
                    (Some(_), None) => {
                        if let Some(port) = self.port_number(&format!("{dat}.number"), d.number) {
                            out.push(PortSelector::Range {
                                protocol,
                                start: port,
                                end: port,
                            });
                        }
                    }
                    (None, Some(r)) => {
                        out.extend(self.range(&format!("{dat}.range"), protocol, r));
                    }
                    _ => self.error(&dat, "exactly one of number and range must be set"),
                },
            }
        }
        out
    }

    fn protocol(&mut self, at: &str, p: Option<&str>) -> Option<u8> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(PROTO_TCP),
            "UDP" => Some(PROTO_UDP),
            "SCTP" => Some(PROTO_SCTP),
            other => {
                self.error(at, format!("{other:?} is not TCP, UDP or SCTP"));
                None
            }
        }
    }

    fn anp_ports(&mut self, at: &str, ps: Vec<api::AnpPort>) -> Vec<PortSelector> {
        let mut out = Vec::new();
        for (i, p) in ps.into_iter().enumerate() {
            let pat = format!("{at}[{i}]");
            self.unknown(&pat, &p.unknown);
            match (&p.port_number, &p.named_port, &p.port_range) {
                (Some(n), None, None) => {
                    let proto =
                        self.protocol(&format!("{pat}.portNumber.protocol"), n.protocol.as_deref());
                    let port = self.port_number(&format!("{pat}.portNumber.port"), n.port);
                    if let (Some(protocol), Some(port)) = (proto, port) {
                        out.push(PortSelector::Range {
                            protocol,
                            start: port,
                            end: port,
                        });
                    }
                }
                (None, Some(name), None) if !name.is_empty() => {
                    out.push(PortSelector::Named(name.clone()));
                }
                (None, None, Some(r)) => {
                    if let Some(protocol) =
                        self.protocol(&format!("{pat}.portRange.protocol"), r.protocol.as_deref())
                    {
                        out.extend(self.range(&format!("{pat}.portRange"), protocol, r));
                    }
                }
                _ => self.error(
                    &pat,
                    "exactly one of portNumber, namedPort and portRange must be set",
                ),
            }
        }
        out
    }
}

enum PeerRead {
    Ok(PeerSelector),
    /// No field this version knows: the rule fails closed (see [`Reader::rule`]).
    Unknown(String),
    /// An error was recorded: the object is refused.
    Invalid,
}

/// The rule of `tier` that decides a flow, in evaluation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierMatch<'p> {
    pub policy: &'p ClusterPolicy,
    pub index: usize,
    pub rule: &'p TierRule,
}

/// Sorts `policies` into evaluation order ([`ClusterPolicy::order_key`]).
pub fn sort(policies: &mut [ClusterPolicy]) {
    policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
}

/// The first rule of `tier` (policies in evaluation order: [`sort`]) whose policy selects
/// `subject` and which matches the peer and the service, in `direction`.
pub fn first_match<'p>(
    policies: impl IntoIterator<Item = &'p ClusterPolicy>,
    tier: Tier,
    direction: Direction,
    subject: (&PodInfo, &Labels),
    peer: &PeerFacts,
    svc: &Service,
) -> Option<TierMatch<'p>> {
    policies
        .into_iter()
        .filter(|p| p.tier == tier && p.subject.selects(subject.0, subject.1))
        .find_map(|policy| {
            policy
                .rules(direction)
                .iter()
                .enumerate()
                .find(|(_, r)| r.matches(peer, svc))
                .map(|(index, rule)| TierMatch {
                    policy,
                    index,
                    rule,
                })
        })
}

/// What NetworkPolicy says of a flow in one direction, for [`combine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkPolicyOutcome<T> {
    /// No NetworkPolicy isolates the pod in this direction: the Baseline tier is next.
    NotIsolated,
    /// NetworkPolicy isolates the pod and decides (`T`: allowed or denied, with its reasons).
    Decided(T),
}

/// Who decided a direction, in the order the API gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tiered<'p, T> {
    /// An Admin tier rule accepted or denied it.
    Admin(TierMatch<'p>),
    /// NetworkPolicy decided; `passed` is the Admin rule that passed it down, if one did.
    NetworkPolicy {
        decided: T,
        passed: Option<TierMatch<'p>>,
    },
    /// A Baseline tier rule accepted or denied it (`passed` as above).
    Baseline {
        rule: TierMatch<'p>,
        passed: Option<TierMatch<'p>>,
    },
    /// Nothing decided: allowed by default (`passed` as above; a Baseline Pass also ends here).
    Default { passed: Option<TierMatch<'p>> },
}

/// Combines the tiers of one direction: `admin` and `baseline` are the [`first_match`] of each
/// tier, `network_policy` what NetworkPolicy says (evaluated only when the Admin tier has not
/// decided; it is a closure so that callers need not evaluate it otherwise).
pub fn combine<'p, T>(
    admin: Option<TierMatch<'p>>,
    network_policy: impl FnOnce() -> NetworkPolicyOutcome<T>,
    baseline: impl FnOnce() -> Option<TierMatch<'p>>,
) -> Tiered<'p, T> {
    let passed = match admin {
        Some(m) if m.rule.action != Action::Pass => return Tiered::Admin(m),
        m => m,
    };
    if let NetworkPolicyOutcome::Decided(decided) = network_policy() {
        return Tiered::NetworkPolicy { decided, passed };
    }
    match baseline() {
        Some(rule) if rule.rule.action != Action::Pass => Tiered::Baseline { rule, passed },
        _ => Tiered::Default { passed },
    }
}

impl<T> Tiered<'_, T> {
    /// Whether the flow is allowed, given whether NetworkPolicy's decision allows it.
    pub fn allowed(&self, network_policy_allows: impl FnOnce(&T) -> bool) -> bool {
        match self {
            Self::Admin(m) | Self::Baseline { rule: m, .. } => m.rule.action == Action::Accept,
            Self::NetworkPolicy { decided, .. } => network_policy_allows(decided),
            Self::Default { .. } => true,
        }
    }
}

#[cfg(test)]
mod compiled;
#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod verdicts;
