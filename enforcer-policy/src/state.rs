//! The desired contents of the datapath maps: what the policy compiler produces and the
//! reconciler writes. Plain ordered maps of the shared key/value types, so that a state can be
//! diffed, printed and looked up without any kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use enforcer_common::{EndpointInfo, NodePortKey, PeerInfo, PolicyKey, PolicyValue};

use crate::tiers::Tier;

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod this node enforces: its map entry (without ifindex and epoch, which the reconciler
/// owns) and the addresses by which the reconciler finds its host-side veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointState {
    /// `epoch` is left 0 here; the reconciler sets it.
    pub info: EndpointInfo,
    pub ips: Vec<IpAddr>,
}

/// An IPv4 or IPv6 prefix key of the CIDR tries, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix<A> {
    pub addr: A,
    pub len: u8,
}

/// What a rule id stands for: the rule that decided a flow (for `explain`, events, the flow
/// log). A NetworkPolicy rule only ever allows; in a direction cluster policies manage
/// (`compile.rs`), entries also name the tier rule that accepted or denied, NetworkPolicy's
/// isolation where none of its rules allows, and the default allow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleRef {
    NetworkPolicy {
        namespace: String,
        policy: String,
        /// `DIR_INGRESS` or `DIR_EGRESS`.
        direction: u8,
        /// Index of the rule in the policy's `ingress` or `egress` list.
        index: u32,
    },
    /// A rule of an Admin or Baseline cluster policy.
    Tier {
        tier: Tier,
        /// `Kind/name`.
        policy: String,
        direction: u8,
        /// The rule's `name`, or `ingress[i]`/`egress[i]` when it has none.
        rule: String,
        index: u32,
        /// As the policy's API version names it (`Accept`/`Allow`, `Deny`).
        action: &'static str,
    },
    /// NetworkPolicy isolates the pod and none of its rules allows (a deny entry where it must
    /// shadow an allow of another peer).
    Isolated { direction: u8 },
    /// No tier and no NetworkPolicy decides: allowed by default.
    DefaultAllow { direction: u8 },
}

fn direction_name(direction: u8) -> &'static str {
    if direction == enforcer_common::DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NetworkPolicy {
                namespace,
                policy,
                direction,
                index,
            } => write!(
                f,
                "{namespace}/{policy} {}[{index}]",
                direction_name(*direction)
            ),
            Self::Tier {
                tier,
                policy,
                direction,
                rule,
                index,
                action,
            } => {
                let at = format!("{}[{index}]", direction_name(*direction));
                write!(f, "{policy} {at}")?;
                // An unnamed rule's name is its place, already printed.
                if *rule != at {
                    write!(f, " {rule:?}")?;
                }
                write!(f, " ({tier}, {action})")
            }
            Self::Isolated { direction } => write!(
                f,
                "NetworkPolicy isolation {}: no rule allows",
                direction_name(*direction)
            ),
            Self::DefaultAllow { direction } => {
                write!(f, "default allow {}", direction_name(*direction))
            }
        }
    }
}

/// Everything the maps should hold for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub endpoints: BTreeMap<PodRef, EndpointState>,
    pub peers_v4: BTreeMap<Ipv4Addr, PeerInfo>,
    pub peers_v6: BTreeMap<Ipv6Addr, PeerInfo>,
    pub cidrs_v4: BTreeMap<Prefix<Ipv4Addr>, PeerInfo>,
    pub cidrs_v6: BTreeMap<Prefix<Ipv6Addr>, PeerInfo>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// Rule ids used in `policy` values.
    pub rules: BTreeMap<u32, RuleRef>,
    /// The Services' node ports (`NODE_PORTS`, value 1): a pod's new flow to a node address on
    /// one of them is judged after kube-proxy's translation, on its backend.
    pub node_ports: BTreeSet<NodePortKey>,
    /// By (endpoint id, direction), for a direction only audit policies isolate
    /// (`EP_*_AUDIT`): those policies, `namespace/name` in order. What a would-drop there names.
    pub audited: BTreeMap<(u32, u8), Vec<String>>,
}

impl DesiredState {
    /// What the rule of a POLICY entry (or of an event) names, its deny bit
    /// ([`enforcer_common::RULE_DENY`]) aside.
    pub fn rule(&self, rule: u32) -> Option<&RuleRef> {
        self.rules.get(&(rule & !enforcer_common::RULE_DENY))
    }
}
