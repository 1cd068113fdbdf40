//! The desired contents of the datapath maps: what the policy compiler produces and the
//! reconciler writes. Plain ordered maps of the shared key/value types, so that a state can be
//! diffed, printed and looked up without any kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use enforcer_common::{EndpointInfo, NodePortKey, PeerInfo, PolicyKey, PolicyValue};

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

/// What a rule id stands for: the policy and rule that allowed a flow (for `explain`, events).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: u32,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.direction == enforcer_common::DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace, self.policy, dir, self.index
        )
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
