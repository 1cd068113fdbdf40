//! The reference evaluator: NetworkPolicy semantics written straight from the API text, over
//! the API objects, with no identities, no maps and no precomputation. It is slow on purpose and
//! is the oracle the compiler is tested against (and what `explain` reports).
//!
//! Shared with the compiler, on purpose, are only the object-level facts: which objects are
//! valid ([`validate_policy`]), which pods take part ([`Cluster::policy_pods`]), the pod that
//! owns an address and a namespace's labels. Everything about what a rule means is here, and so
//! is what a refused (invalid) policy means: it isolates what it selects and allows nothing.

use std::{collections::BTreeSet, net::IpAddr};

use enforcer_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    compile::CompileOptions,
    model::{
        Cluster, PodInfo, SelfSetLabel, is_reserved_label, namespace_self_set_labels, pod_ips,
        pod_labels, pod_self_set_labels,
    },
    selector,
    tiers::{
        self, Action, ClusterPolicy, Direction, NetworkPolicyOutcome, PeerFacts, Service, Tier,
        TierError, TierMatch, Tiered,
    },
    validate::{PolicyError, RawRule, namespace_of, parse_cidr, validate_policy},
};
use crate::state::PodRef;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Pod(PodRef),
    Ip(IpAddr),
}

/// The verdict of one direction (ingress at the destination pod, egress at the source pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirVerdict {
    /// The pod takes no part in policy (unknown, host-network, terminated or without address).
    NotEnforced,
    /// The peer is the pod itself.
    SelfTraffic,
    /// The peer is the node.
    Host,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// The first rule (policies ordered by namespace/name, rules by index) that allows it.
    Allowed {
        namespace: String,
        policy: String,
        index: usize,
    },
    /// Policies (names) isolate the pod for this direction and none of their rules allows it.
    Denied {
        policies: Vec<String>,
        /// Why those of `policies` that are refused were refused: they isolate with no rules.
        refused: Vec<PolicyError>,
        /// The reserved labels the peer's pod and namespace objects set themselves, when a rule
        /// would allow the flow if they counted: ignored, they come only from verification.
        ignored: Vec<SelfSetLabel>,
    },
    /// Denied, but a rule of these isolating policies would allow it if the peer's address
    /// were bound to a verified identity (they require identity).
    NoIdentity {
        policies: Vec<String>,
        /// As for `Denied`.
        ignored: Vec<SelfSetLabel>,
    },
    /// Allowed: no enforcing policy isolates the pod for this direction, and these audit
    /// policies isolate it with no rule that allows it. Enforcing them would drop it.
    WouldDrop { policies: Vec<String> },
    /// An Admin or Baseline tier rule accepted it (v1alpha1: Allow).
    TierAccepted(TierRuleRef),
    /// An Admin or Baseline tier rule denied it.
    TierDenied(TierRuleRef),
    /// An Admin tier rule passed it on: `then` is what NetworkPolicy, the Baseline tier or the
    /// default decided.
    Passed {
        by: TierRuleRef,
        then: Box<DirVerdict>,
    },
}

impl DirVerdict {
    pub fn allowed(&self) -> bool {
        match self {
            Self::Denied { .. } | Self::NoIdentity { .. } | Self::TierDenied(_) => false,
            Self::Passed { then, .. } => then.allowed(),
            _ => true,
        }
    }

    /// The verdict without the Admin rule that passed it on, if one did.
    pub fn after_pass(&self) -> &DirVerdict {
        match self {
            Self::Passed { then, .. } => then,
            v => v,
        }
    }
}

/// The cluster policy rule that decided (or passed on) a direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierRuleRef {
    pub tier: Tier,
    /// `Kind/name`.
    pub policy: String,
    /// The rule's `name`, or `ingress[i]`/`egress[i]` when it has none.
    pub rule: String,
    /// Index of the rule in its direction's list.
    pub index: usize,
    /// The rule's action as the policy's API version names it (`Accept`/`Allow`, `Deny`, `Pass`).
    pub action: &'static str,
    /// Why the policy was refused, when it was: the rule is then its fail-closed stand-in.
    pub refused: Vec<TierError>,
}

impl TierRuleRef {
    fn of(m: &TierMatch<'_>) -> Self {
        Self {
            tier: m.policy.tier,
            policy: m.policy.display_name(),
            rule: m.rule.name.clone(),
            index: m.index,
            action: m.rule.action.name_in(m.policy.kind),
            refused: m.policy.refused.clone(),
        }
    }
}

fn protocol_name(protocol: u8) -> Option<&'static str> {
    match protocol {
        PROTO_TCP => Some("TCP"),
        PROTO_UDP => Some("UDP"),
        PROTO_SCTP => Some("SCTP"),
        _ => None,
    }
}

/// The policies, first object of each namespace/name, ordered by namespace/name, each with what
/// makes it refused (empty when it is valid).
fn policies(cluster: &Cluster) -> Vec<(&NetworkPolicy, Vec<PolicyError>)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<(&NetworkPolicy, Vec<PolicyError>)> = cluster
        .policies
        .iter()
        .map(|p| &**p)
        .filter(|p| {
            seen.insert((
                namespace_of(&p.metadata),
                p.metadata.name.clone().unwrap_or_default(),
            ))
        })
        .map(|p| (p, validate_policy(p).err().unwrap_or_default()))
        .collect();
    out.sort_by_key(|(p, _)| {
        (
            namespace_of(&p.metadata),
            p.metadata.name.clone().unwrap_or_default(),
        )
    });
    out
}

/// Fail closed: a policy the agent refuses still isolates the pods it selects in the directions
/// it names, so that what its author meant to restrict is not left open. A podSelector that
/// cannot be read selects every pod of the policy's namespace; `policyTypes` that cannot be
/// read (or no spec at all) name both directions.
fn refused_isolates(policy: &NetworkPolicy, labels: &selector::Labels, ingress: bool) -> bool {
    let Some(spec) = &policy.spec else {
        return true;
    };
    let selects = spec
        .pod_selector
        .as_ref()
        .is_none_or(|s| selector::Selector::parse(s).map_or(true, |s| s.matches(labels)));
    let types_readable = spec
        .policy_types
        .iter()
        .flatten()
        .all(|t| t == "Ingress" || t == "Egress");
    selects && (!types_readable || affects(policy, ingress))
}

/// "policyTypes ... If this field is not specified, it will default based on the existence of
/// ingress or egress rules; policies that contain an egress section are assumed to affect
/// egress, and all policies (whether or not they contain an ingress section) are assumed to
/// affect ingress."
fn affects(policy: &NetworkPolicy, ingress: bool) -> bool {
    let Some(spec) = &policy.spec else {
        return false;
    };
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types
            .iter()
            .any(|t| t == if ingress { "Ingress" } else { "Egress" }),
        _ => ingress || spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
    }
}

/// "NetworkPolicyPeer describes a peer to allow traffic to/from. Only certain combinations of
/// fields are allowed."
fn peer_matches(
    cluster: &Cluster,
    policy_ns: &str,
    peer: &NetworkPolicyPeer,
    ip: Option<IpAddr>,
    peer_pod: Option<&(PodRef, &PodInfo)>,
    identity: IdentityCheck,
) -> bool {
    // "ipBlock defines policy on a particular IPBlock. If this field is set then neither of the
    // other fields can be." Any address in the cidr and in no except, pods included. A pod
    // with no known address (offline, as written) is in no block.
    if let Some(block) = &peer.ip_block {
        let Some(ip) = ip else { return false };
        let in_cidr = parse_cidr(&block.cidr).is_ok_and(|c| c.contains(ip));
        let in_except = block
            .except
            .iter()
            .flatten()
            .any(|e| parse_cidr(e).is_ok_and(|c| c.contains(ip)));
        return in_cidr && !in_except;
    }
    let Some((r, pod)) = peer_pod else {
        return false;
    };
    // enforcer's identity: a policy that requires it matches pod and namespace peers only at
    // addresses bound to a verified identity, whose reserved labels join the pod's labels. The
    // reserved labels the pod and namespace objects set themselves are never seen.
    let verified = ip.and_then(|ip| cluster.verified.get(&ip));
    if identity == IdentityCheck::Required && verified.is_none() {
        return false;
    }
    let trusting = identity == IdentityCheck::TrustingObjects;
    let mut labels = if trusting {
        pod.labels_as_set()
    } else {
        pod_labels(pod)
    };
    labels.extend(
        verified
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    // "namespaceSelector selects namespaces using cluster-scoped labels ... If podSelector is
    // also set, then the NetworkPolicyPeer as a whole selects the pods matching podSelector in
    // the namespaces selected by namespaceSelector. Otherwise it selects all pods in the
    // namespaces selected by namespaceSelector."
    // "podSelector ... If namespaceSelector is also set, then [AND]. Otherwise it selects the
    // pods matching podSelector in the policy's own namespace."
    let ns_ok = match &peer.namespace_selector {
        Some(s) if trusting => selector::matches(s, &cluster.namespace_labels_as_set(&r.namespace)),
        Some(s) => selector::matches(s, &cluster.namespace_labels(&r.namespace)),
        None => r.namespace == policy_ns,
    };
    let pod_ok = match &peer.pod_selector {
        Some(s) if identity == IdentityCheck::AsIfVerified => {
            selector::matches(&without_reserved(s), &labels)
        }
        Some(s) => selector::matches(s, &labels),
        None => true,
    };
    ns_ok && pod_ok
}

/// The label keys a selector asks about.
fn selector_keys(
    s: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> impl Iterator<Item = &str> {
    s.into_iter().flat_map(|s| {
        let labels = s.match_labels.iter().flatten().map(|(k, _)| k.as_str());
        let exprs = s.match_expressions.iter().flatten().map(|e| e.key.as_str());
        labels.chain(exprs)
    })
}

/// How a peer's verified identity counts when matching it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdentityCheck {
    /// Selectors see the reserved labels of a verified address, if any.
    Optional,
    /// Only verified addresses match (the policy requires identity).
    Required,
    /// As if the address were verified as whatever the selector asks (for explaining a denial
    /// for want of identity): requirements on reserved labels are left out.
    AsIfVerified,
    /// As if the reserved labels the pod and namespace objects set themselves counted, and
    /// identity were not required (for explaining what ignoring them denied).
    TrustingObjects,
}

/// `s` without its requirements on the reserved `enforcer.dev/` labels.
fn without_reserved(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
    let mut s = s.clone();
    if let Some(m) = &mut s.match_labels {
        m.retain(|k, _| !is_reserved_label(k));
    }
    if let Some(e) = &mut s.match_expressions {
        e.retain(|r| !is_reserved_label(&r.key));
    }
    s
}

/// "ports is a list of ports ... If this field is empty or missing, this rule matches all
/// ports. If this field is present and contains at least one item, then this rule allows
/// traffic only if the traffic matches at least one port in the list." `named_on` is the pod
/// whose container ports name the port: the destination.
fn ports_match(
    ports: Option<&Vec<NetworkPolicyPort>>,
    protocol: u8,
    port: u16,
    named_on: Option<&PodInfo>,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    let Some(flow_proto) = protocol_name(protocol) else {
        return false;
    };
    ports.iter().any(|p| {
        // "protocol ... If not specified, this field defaults to TCP."
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if proto != flow_proto {
            return false;
        }
        match &p.port {
            // "If this field is not provided, this matches all port names and numbers."
            None => true,
            // "If endPort is set, ... indicates that the range of ports from port to endPort
            // if set, inclusive, should be allowed by the policy."
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                *n <= i32::from(port) && i32::from(port) <= end
            }
            // "port ... This can either be a numerical or named port on a pod."
            Some(IntOrString::String(name)) => named_on.is_some_and(|pod| {
                pod.named_ports.iter().any(|(n, pr, num)| {
                    n == name && protocol_name(*pr) == Some(proto) && *num == port
                })
            }),
        }
    })
}

/// The verdict for traffic at `pod` in one direction with the peer at `peer_ip`.
///
/// Cluster policies first, as their API orders it: the Admin tier's first matching rule
/// decides (Accept, Deny) or passes on (Pass); then NetworkPolicy, where it isolates the pod;
/// then the Baseline tier; then the default (allowed). Traffic of a pod to itself never leaves
/// it and is judged by no tier. Traffic to the node is judged by the tiers (a `nodes` or
/// `networks` peer may match it) and, as before, never by NetworkPolicy; traffic from the node
/// is always allowed.
///
/// enforcer's audit mode: the policies that audit ([`Cluster::policy_audits`]) take no part
/// in what is enforced, which is the verdict of the enforcing policies alone. Only where those
/// do not isolate the pod do the audit policies count, as if they enforced: what they would
/// deny is [`DirVerdict::WouldDrop`] (allowed). Where enforcing policies isolate it, audit
/// policies could only add allows, so they change nothing.
pub fn direction_verdict(
    cluster: &Cluster,
    opts: &CompileOptions,
    pod: &PodRef,
    ingress: bool,
    peer_ip: IpAddr,
    protocol: u8,
    port: u16,
) -> DirVerdict {
    let pods = cluster.policy_pods();
    let Some((_, this)) = pods.iter().find(|(r, _)| r == pod) else {
        return DirVerdict::NotEnforced;
    };
    let flow = Flow {
        pod,
        this,
        ingress,
        peer: &Peer::Addr(peer_ip),
        protocol,
        port,
    };
    tiered(cluster, opts, &flow)
}

/// One direction of a flow, as the evaluator judges it.
#[derive(Clone, Copy)]
struct Flow<'a> {
    pod: &'a PodRef,
    this: &'a PodInfo,
    ingress: bool,
    peer: &'a Peer,
    protocol: u8,
    port: u16,
}

/// The enforcing policies' verdict (`enforced`); where they do not isolate, the audit
/// policies' would-drop (`with_audit()`, a denial turned into [`DirVerdict::WouldDrop`]).
fn audited(enforced: DirVerdict, with_audit: impl FnOnce() -> DirVerdict) -> DirVerdict {
    if enforced != DirVerdict::NotIsolated {
        return enforced;
    }
    match with_audit() {
        DirVerdict::Denied { policies, .. } | DirVerdict::NoIdentity { policies, .. } => {
            DirVerdict::WouldDrop { policies }
        }
        v => v,
    }
}

/// The cluster policies in evaluation order ([`tiers::sort`]), whatever order the source kept.
fn cluster_policies(cluster: &Cluster) -> Vec<&ClusterPolicy> {
    let mut out: Vec<&ClusterPolicy> = cluster.cluster_policies.iter().map(|p| &**p).collect();
    out.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    out
}

/// The other end of `flow`: its address (when given) and the pod that owns it, if any;
/// `Err(SelfTraffic)` when that is the pod itself.
#[allow(clippy::type_complexity)]
fn peer_of<'c>(
    cluster: &'c Cluster,
    opts: &CompileOptions,
    flow: &Flow<'_>,
) -> Result<(Option<IpAddr>, Option<(PodRef, &'c PodInfo)>), DirVerdict> {
    match flow.peer {
        Peer::Addr(ip) if pod_ips(flow.this).contains(ip) => Err(DirVerdict::SelfTraffic),
        Peer::Addr(ip) => Ok((Some(*ip), cluster.pod_at(*ip, &opts.node_ips))),
        Peer::Pod(r) if r == flow.pod => Err(DirVerdict::SelfTraffic),
        Peer::Pod(r) => Ok((
            None,
            pods_as_written(cluster).into_iter().find(|(p, _)| p == r),
        )),
    }
}

/// [`direction_verdict`] of `flow`: the tiers around NetworkPolicy (see there).
fn tiered(cluster: &Cluster, opts: &CompileOptions, flow: &Flow<'_>) -> DirVerdict {
    let network_policy = |with_audit: bool| verdict_at(cluster, opts, with_audit, flow);
    if cluster.cluster_policies.is_empty() {
        // No tier: NetworkPolicy alone, exactly as without cluster policies.
        return audited(network_policy(false), || network_policy(true));
    }
    let Flow {
        pod,
        this,
        ingress,
        peer: _,
        protocol,
        port,
    } = *flow;
    let (peer_ip, peer_pod) = match peer_of(cluster, opts, flow) {
        Ok(p) => p,
        Err(v) => return v,
    };
    // Traffic from the node (kubelet probes) is always let in: ingress peers cannot name
    // nodes, and a refused policy's fail-closed Deny must not cut the node off its pods.
    if ingress && peer_ip.is_some_and(|ip| opts.node_ips.contains(&ip)) {
        return DirVerdict::Host;
    }
    let subject_ns = cluster.namespace_labels(&pod.namespace);
    let peer_ns = peer_pod
        .as_ref()
        .map(|(r, _)| cluster.namespace_labels(&r.namespace));
    let facts = PeerFacts {
        pod: peer_pod.as_ref().map(|(_, p)| *p).zip(peer_ns.as_ref()),
        node: peer_ip
            .and_then(|ip| cluster.node_labels_seen(ip, opts.node_name.as_deref(), &opts.node_ips)),
        addr: peer_ip,
    };
    // Named ports are the destination's: this pod on ingress, the peer pod on egress.
    let svc = Service {
        protocol,
        port,
        destination_pod: if ingress {
            Some(this)
        } else {
            peer_pod.as_ref().map(|(_, p)| *p)
        },
    };
    let direction = if ingress {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let policies = cluster_policies(cluster);
    let first = |tier: Tier| {
        tiers::first_match(
            policies.iter().copied(),
            tier,
            direction,
            (this, &subject_ns),
            &facts,
            &svc,
        )
    };
    // NetworkPolicy decides where the enforcing policies isolate the pod; the node's traffic
    // is never theirs to judge.
    let enforced = network_policy(false);
    let decided = match &enforced {
        DirVerdict::NotIsolated | DirVerdict::Host => NetworkPolicyOutcome::NotIsolated,
        v => NetworkPolicyOutcome::Decided(v.clone()),
    };
    let decision = tiers::combine(first(Tier::Admin), || decided, || first(Tier::Baseline));
    let (passed, verdict) = match decision {
        Tiered::Admin(m) => return tier_verdict(&m),
        Tiered::NetworkPolicy { decided, passed } => (passed, decided),
        Tiered::Baseline { rule, passed } => (passed, tier_verdict(&rule)),
        // Where nothing decides, audit policies report what they would drop.
        Tiered::Default { passed } => (passed, audited(enforced, || network_policy(true))),
    };
    match passed {
        Some(m) => DirVerdict::Passed {
            by: TierRuleRef::of(&m),
            then: Box::new(verdict),
        },
        None => verdict,
    }
}

/// The verdict of a tier rule that accepted or denied.
fn tier_verdict(m: &TierMatch<'_>) -> DirVerdict {
    match m.rule.action {
        Action::Accept => DirVerdict::TierAccepted(TierRuleRef::of(m)),
        Action::Deny | Action::Pass => DirVerdict::TierDenied(TierRuleRef::of(m)),
    }
}

/// The other end of a direction: an address (and the pod owning it, if any), or a pod known
/// only by its object, without an address (a workload as written, for the offline tools).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Addr(IpAddr),
    Pod(PodRef),
}

/// The pods the offline tools judge: those in policy, and those not known to have an address
/// (a Pod without status, a workload's template), judged by labels, namespace and ports. One
/// per `PodRef` (the first object of a name), ordered by `PodRef`.
pub fn pods_as_written(cluster: &Cluster) -> Vec<(PodRef, &PodInfo)> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<(PodRef, &PodInfo)> = cluster
        .pods
        .iter()
        .map(|p| (crate::model::pod_ref(p), &**p))
        .filter(|(r, _)| seen.insert(r.clone()))
        .filter(|(_, p)| !p.host_network && !p.terminated)
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// [`direction_verdict`] for the offline tools: `pod` may have no address, and so may the peer
/// ([`Peer::Pod`]); such a pod is judged by its labels, namespace and ports, and matches no
/// ipBlock.
pub fn direction_verdict_as_written(
    cluster: &Cluster,
    opts: &CompileOptions,
    pod: &PodRef,
    ingress: bool,
    peer: &Peer,
    protocol: u8,
    port: u16,
) -> DirVerdict {
    let pods = pods_as_written(cluster);
    let Some((_, this)) = pods.iter().find(|(r, _)| r == pod) else {
        return DirVerdict::NotEnforced;
    };
    let flow = Flow {
        pod,
        this,
        ingress,
        peer,
        protocol,
        port,
    };
    tiered(cluster, opts, &flow)
}

/// NetworkPolicy's verdict of `flow`: by the enforcing policies, or also by the audit ones
/// (`with_audit`).
fn verdict_at(
    cluster: &Cluster,
    opts: &CompileOptions,
    with_audit: bool,
    flow: &Flow<'_>,
) -> DirVerdict {
    let Flow {
        pod,
        this,
        ingress,
        peer: _,
        protocol,
        port,
    } = *flow;
    let (peer_ip, peer_pod) = match peer_of(cluster, opts, flow) {
        Ok(p) => p,
        Err(v) => return v,
    };
    if peer_ip.is_some_and(|ip| opts.node_ips.contains(&ip)) {
        return DirVerdict::Host;
    }
    // The pods a policy applies to are chosen without reserved labels: those describe verified
    // peers, and the object's own are never seen (so a pod cannot escape a NotIn or
    // DoesNotExist podSelector by setting them).
    let labels = pod_labels(this);
    let mut isolating = Vec::new();
    let mut refused = Vec::new();
    let mut wants_identity = false;
    // The keys asked for by the rules that the objects' own reserved labels would have matched.
    let mut asked_pod: BTreeSet<&str> = BTreeSet::new();
    let mut asked_ns: BTreeSet<&str> = BTreeSet::new();
    for (policy, errors) in policies(cluster) {
        let ns = namespace_of(&policy.metadata);
        if ns != pod.namespace || (!with_audit && cluster.policy_audits(policy, opts.audit)) {
            continue;
        }
        if !errors.is_empty() {
            // Isolates, and has no rule to allow anything.
            if refused_isolates(policy, &labels, ingress) {
                let name = policy.metadata.name.clone().unwrap_or_default();
                isolating.push(format!("{ns}/{name}"));
                refused.extend(errors);
            }
            continue;
        }
        let Some(spec) = &policy.spec else { continue };
        // A policy applies to the pods its podSelector selects in its own namespace.
        if !affects(policy, ingress) {
            continue;
        }
        if !spec
            .pod_selector
            .as_ref()
            .is_none_or(|s| selector::matches(s, &labels))
        {
            continue;
        }
        let name = policy.metadata.name.clone().unwrap_or_default();
        isolating.push(format!("{ns}/{name}"));
        let need = super::model::requires_identity(policy, opts.require_identity);
        // "If this field is empty then this NetworkPolicy does not allow any traffic".
        let rules: Vec<RawRule<'_>> = if ingress {
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect()
        } else {
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect()
        };
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            // "If this field is empty or missing, this rule matches all sources/destinations".
            let peer_ok_with = |check: IdentityCheck| {
                peers.filter(|p| !p.is_empty()).is_none_or(|ps| {
                    ps.iter()
                        .any(|p| peer_matches(cluster, &ns, p, peer_ip, peer_pod.as_ref(), check))
                })
            };
            let peer_ok = peer_ok_with(if need {
                IdentityCheck::Required
            } else {
                IdentityCheck::Optional
            });
            // Named ports are the destination's: this pod on ingress, the peer pod on egress.
            let named_on = if ingress {
                Some(this)
            } else {
                peer_pod.as_ref().map(|(_, p)| *p)
            };
            if !peer_ok && ports_match(ports, protocol, port, named_on) {
                if need
                    && peer_ip.is_none_or(|ip| !cluster.verified.contains_key(&ip))
                    && peer_ok_with(IdentityCheck::AsIfVerified)
                {
                    wants_identity = true;
                }
                // The objects' own reserved labels made the difference (identity aside).
                if peer_ok_with(IdentityCheck::TrustingObjects)
                    && !peer_ok_with(IdentityCheck::Optional)
                {
                    for p in peers.into_iter().flatten() {
                        asked_pod.extend(selector_keys(p.pod_selector.as_ref()));
                        asked_ns.extend(selector_keys(p.namespace_selector.as_ref()));
                    }
                }
            }
            if peer_ok && ports_match(ports, protocol, port, named_on) {
                return DirVerdict::Allowed {
                    namespace: ns,
                    policy: name,
                    index,
                };
            }
        }
    }
    // Only when counting them would have allowed it (so they are what denied it).
    let ignored = match &peer_pod {
        Some((r, pod)) => {
            let mut v = namespace_self_set_labels(cluster, &r.namespace);
            v.retain(|l| asked_ns.contains(l.key.as_str()));
            v.extend(
                pod_self_set_labels(pod)
                    .into_iter()
                    .filter(|l| asked_pod.contains(l.key.as_str())),
            );
            v
        }
        None => Vec::new(),
    };
    if isolating.is_empty() {
        DirVerdict::NotIsolated
    } else if wants_identity {
        DirVerdict::NoIdentity {
            policies: isolating,
            ignored,
        }
    } else {
        DirVerdict::Denied {
            policies: isolating,
            refused,
            ignored,
        }
    }
}

/// Ingress at `dst` of traffic from `src`.
pub fn ingress_allows(
    cluster: &Cluster,
    opts: &CompileOptions,
    dst: &PodRef,
    src: IpAddr,
    protocol: u8,
    port: u16,
) -> bool {
    direction_verdict(cluster, opts, dst, true, src, protocol, port).allowed()
}

/// Egress at `src` of traffic to `dst`.
pub fn egress_allows(
    cluster: &Cluster,
    opts: &CompileOptions,
    src: &PodRef,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> bool {
    direction_verdict(cluster, opts, src, false, dst, protocol, port).allowed()
}

/// A flow with both ends resolved to an address (and a pod, when the address is a pod's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedFlow {
    pub src_pod: Option<PodRef>,
    pub src: IpAddr,
    pub dst_pod: Option<PodRef>,
    pub dst: IpAddr,
}

/// Picks the addresses of a flow: a pod end uses its address of the other end's family (IPv4
/// first when both ends are dual-stack). `None` when the ends share no family or a pod is unknown.
pub fn resolve_flow(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
) -> Option<ResolvedFlow> {
    let pods = cluster.policy_pods();
    let addrs = |e: &Endpoint| -> Option<Vec<IpAddr>> {
        match e {
            Endpoint::Ip(ip) => Some(vec![*ip]),
            Endpoint::Pod(r) => pods.iter().find(|(p, _)| p == r).map(|(_, p)| pod_ips(p)),
        }
    };
    let (fa, ta) = (addrs(from)?, addrs(to)?);
    let pick = |v4: bool| {
        let f = fa.iter().find(|a| a.is_ipv4() == v4)?;
        let t = ta.iter().find(|a| a.is_ipv4() == v4)?;
        Some((*f, *t))
    };
    let (src, dst) = pick(true).or_else(|| pick(false))?;
    let pod_of = |e: &Endpoint, ip: IpAddr| match e {
        Endpoint::Pod(r) => Some(r.clone()),
        Endpoint::Ip(_) => cluster.pod_at(ip, &opts.node_ips).map(|(r, _)| r),
    };
    Some(ResolvedFlow {
        src_pod: pod_of(from, src),
        src,
        dst_pod: pod_of(to, dst),
        dst,
    })
}

/// Whether the flow is allowed: egress of the source (when it is a pod) and ingress of the
/// destination (when it is a pod) must both allow it. Unresolvable flows are not allowed.
pub fn verdict(
    cluster: &Cluster,
    opts: &CompileOptions,
    from: &Endpoint,
    to: &Endpoint,
    protocol: u8,
    port: u16,
) -> bool {
    let Some(f) = resolve_flow(cluster, opts, from, to) else {
        return false;
    };
    let egress = f
        .src_pod
        .as_ref()
        .is_none_or(|p| egress_allows(cluster, opts, p, f.dst, protocol, port));
    let ingress = f
        .dst_pod
        .as_ref()
        .is_none_or(|p| ingress_allows(cluster, opts, p, f.src, protocol, port));
    egress && ingress
}
