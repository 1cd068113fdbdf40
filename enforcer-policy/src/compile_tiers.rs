//! Compiling a direction that cluster policies manage (an Admin or Baseline policy with rules
//! in that direction selects the pod) into the same policy entries as NetworkPolicy: the
//! datapath still does its few lookups per packet, and the first entry found decides, allowing
//! or denying ([`RULE_DENY`](enforcer_common::RULE_DENY)).
//!
//! For each peer identity the verdict is a function of (protocol, port): the Admin tier's first
//! matching rule (Accept, Deny; Pass goes on), then NetworkPolicy where it isolates the pod,
//! then the Baseline tier, then the default allow, as the evaluator judges. Each function is
//! made of pieces: per ported protocol (TCP, UDP, SCTP) intervals of ports, and one verdict for
//! every other protocol. The world identity's function (an address nothing names: what an
//! identity no rule singles out gets) is written in full under `IDENTITY_ANY`, its other
//! protocols as the `PROTO_ANY` entry; every other identity gets entries only where its
//! function differs, so no entry of it shadows an `IDENTITY_ANY` entry it agrees with. An
//! identity whose other-protocol verdict differs has its own `PROTO_ANY` entry, which shadows
//! every `IDENTITY_ANY` entry: its ports are then written against that verdict.
//!
//! The node's own addresses resolve to `IDENTITY_HOST`, which the programs allow unless the
//! endpoint's egress is flagged [`EP_EGRESS_HOST_JUDGED`](enforcer_common::EP_EGRESS_HOST_JUDGED).
//! On egress the node's function is the tiers' alone (NetworkPolicy never judges the node: the
//! Admin tier, then the Baseline tier, then the default allow); the flag is set, and the
//! function written under `IDENTITY_HOST` like any identity's, only where it denies somewhere,
//! so that an endpoint whose tiers never deny the node costs node traffic no lookup.

use std::collections::{BTreeMap, HashMap};

use enforcer_common::{
    DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, PROTO_ANY, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, PolicyKey, port_mask,
};

use crate::{
    compile::{IdentityKey, port_blocks},
    intern::NamedPorts,
    model::{PodInfo, is_reserved_label},
    selector::Labels,
    state::RuleRef,
    tiers::{Action, ClusterPolicy, Direction, PeerSelector, PortSelector, Tier, TierRule},
};

const PORTED: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

/// Whether a cluster policy with rules in `dir` selects the pod: then its direction is
/// compiled here.
pub(crate) fn manages(
    policies: &[&ClusterPolicy],
    dir: u8,
    pod: &PodInfo,
    namespace_labels: &Labels,
) -> bool {
    let d = direction(dir);
    policies
        .iter()
        .any(|p| !p.rules(d).is_empty() && p.subject.selects(pod, namespace_labels))
}

fn direction(dir: u8) -> Direction {
    if dir == DIR_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

/// One tier-managed direction of a local endpoint.
pub(crate) struct ManagedDirection<'a> {
    pub endpoint: u32,
    pub dir: u8,
    /// The cluster policies that select the pod, in evaluation order.
    pub policies: &'a [&'a ClusterPolicy],
    /// The endpoint's named ports (a rule's named port on ingress).
    pub named_ports: &'a NamedPorts,
    /// Whether an enforcing NetworkPolicy isolates the direction.
    pub np_isolated: bool,
    /// The enforcing NetworkPolicies' entries of the direction, first allowing rule first
    /// (policies by namespace/name, rules in order), with their rule.
    pub np: Vec<(PolicyKey, RuleRef)>,
    /// On egress, what the node's own addresses stand for (one key per distinct one); empty
    /// on ingress, where the node is always allowed.
    pub host: &'a [IdentityKey],
}

/// One entry to write: its key, its rule and whether it denies.
pub(crate) type Entry = (PolicyKey, RuleRef, bool);

/// The entries of a managed direction, and how the node fares there.
#[derive(Clone, Default)]
pub(crate) struct DirectionEntries {
    pub entries: Vec<Entry>,
    /// The tiers deny egress to the node somewhere: the endpoint is flagged
    /// `EP_EGRESS_HOST_JUDGED` and the node's entries are among `entries`.
    pub host_judged: bool,
    /// The node's addresses are judged differently (say an IPv4 `networks` CIDR): under one
    /// identity, each is denied wherever one is.
    pub host_apart: bool,
}

/// A verdict at one point: allowed or denied by the rule at this index of [`Rules`], or
/// NetworkPolicy isolation (a miss, or where an entry must deny, [`RuleRef::Isolated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow(usize),
    Deny(usize),
    Isolated,
}

/// The rule references of one direction, numbered.
#[derive(Default)]
struct Rules {
    list: Vec<RuleRef>,
    index: HashMap<RuleRef, usize>,
}

impl Rules {
    fn of(&mut self, r: RuleRef) -> usize {
        if let Some(i) = self.index.get(&r) {
            return *i;
        }
        self.list.push(r.clone());
        self.index.insert(r, self.list.len() - 1);
        self.list.len() - 1
    }
}

/// What a rule or an entry covers: every protocol and port, or these (protocol, first, last).
#[derive(Clone, Debug)]
enum Cover {
    All,
    Some(Vec<(u8, u16, u16)>),
}

impl Cover {
    fn covers(&self, protocol: Option<u8>, port: u16) -> bool {
        match self {
            Self::All => true,
            Self::Some(v) => protocol.is_some_and(|p| {
                v.iter()
                    .any(|(pr, lo, hi)| *pr == p && (*lo..=*hi).contains(&port))
            }),
        }
    }

    fn bounds(&self, protocol: u8, out: &mut Vec<u32>) {
        if let Self::Some(v) = self {
            for (pr, lo, hi) in v {
                if *pr == protocol {
                    out.push(u32::from(*lo));
                    out.push(u32::from(*hi) + 1);
                }
            }
        }
    }
}

/// A tier rule as one identity sees it: what it does and where.
struct Applied {
    action: Action,
    rule: usize,
    cover: Cover,
}

/// The verdict function of one identity: per ported protocol, pieces `(first, last, verdict)`
/// covering 0..=65535 in order; `other` for every other protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Function {
    ported: [Vec<(u16, u16, Verdict)>; 3],
    other: Verdict,
}

/// The entries of a tier-managed direction (see the module text).
pub(crate) fn compile_direction(
    identities: &BTreeMap<u32, IdentityKey>,
    d: &ManagedDirection<'_>,
) -> DirectionEntries {
    let dir = direction(d.dir);
    let mut rules = Rules::default();
    // The rules of the policies that select the pod, in evaluation order, per tier.
    let mut tier_rules: [Vec<(&ClusterPolicy, usize, &TierRule, usize)>; 2] = Default::default();
    for p in d.policies {
        for (i, r) in p.rules(dir).iter().enumerate() {
            let id = rules.of(RuleRef::Tier {
                tier: p.tier,
                policy: p.display_name(),
                direction: d.dir,
                rule: r.name.clone(),
                index: u32::try_from(i).unwrap_or(u32::MAX),
                action: r.action.name_in(p.kind),
            });
            tier_rules[usize::from(p.tier == Tier::Baseline)].push((p, i, r, id));
        }
    }
    let np: Vec<(PolicyKey, usize)> =
        d.np.iter()
            .map(|(k, r)| (*k, rules.of(r.clone())))
            .collect();
    let default = rules.of(RuleRef::DefaultAllow { direction: d.dir });

    let world = IdentityKey::world();
    // `host`: the node, which NetworkPolicy never judges.
    let function = |key: &IdentityKey, id: u32, host: bool| {
        // Named ports are the destination's: this pod on ingress, the peer pod on egress.
        let dest_ports = if d.dir == DIR_INGRESS {
            Some(d.named_ports)
        } else {
            key.pod.as_deref().map(|f| &*f.named_ports)
        };
        let applied = |tier: usize| -> Vec<Applied> {
            tier_rules[tier]
                .iter()
                .filter(|(_, _, r, _)| r.peers.iter().any(|p| peer_matches(p, key)))
                .map(|(_, _, r, rule)| Applied {
                    action: r.action,
                    rule: *rule,
                    cover: rule_cover(r, dest_ports),
                })
                .collect()
        };
        let (admin, baseline) = (applied(0), applied(1));
        let np: Vec<(Cover, usize)> = np
            .iter()
            .filter(|_| !host)
            .filter(|(k, _)| k.identity == id || k.identity == IDENTITY_ANY)
            .map(|(k, r)| (entry_cover(k), *r))
            .collect();
        let at = |protocol: Option<u8>, port: u16| -> Verdict {
            let first = |rs: &[Applied]| {
                rs.iter()
                    .find(|a| a.cover.covers(protocol, port))
                    .map(|a| (a.action, a.rule))
            };
            match first(&admin) {
                Some((Action::Accept, r)) => return Verdict::Allow(r),
                Some((Action::Deny, r)) => return Verdict::Deny(r),
                _ => {}
            }
            if d.np_isolated && !host {
                return np
                    .iter()
                    .find(|(c, _)| c.covers(protocol, port))
                    .map_or(Verdict::Isolated, |(_, r)| Verdict::Allow(*r));
            }
            match first(&baseline) {
                Some((Action::Accept, r)) => Verdict::Allow(r),
                Some((Action::Deny, r)) => Verdict::Deny(r),
                _ => Verdict::Allow(default),
            }
        };
        let ported = PORTED.map(|protocol| {
            let mut bounds = vec![0u32, 65536];
            for a in admin.iter().chain(&baseline) {
                a.cover.bounds(protocol, &mut bounds);
            }
            for (c, _) in &np {
                c.bounds(protocol, &mut bounds);
            }
            pieces(bounds, |port| at(Some(protocol), port))
        });
        Function {
            ported,
            other: at(None, 0),
        }
    };

    let mut out: Vec<Entry> = Vec::new();
    let any = function(&world, IDENTITY_WORLD, false);
    let emit = |out: &mut Vec<Entry>, identity: u32, protocol: u8, port: u16, len: u8, v| {
        let (rule, deny) = match v {
            Verdict::Allow(r) => (rules.list[r].clone(), false),
            Verdict::Deny(r) => (rules.list[r].clone(), true),
            Verdict::Isolated => (RuleRef::Isolated { direction: d.dir }, true),
        };
        out.push((
            PolicyKey::new(d.endpoint, identity, d.dir, protocol, port, len),
            rule,
            deny,
        ));
    };
    // IDENTITY_ANY in full; a miss is isolation's deny.
    if any.other != Verdict::Isolated {
        emit(&mut out, IDENTITY_ANY, PROTO_ANY, 0, 0, any.other);
    }
    for (pi, protocol) in PORTED.iter().enumerate() {
        let base = [(0, u16::MAX, any.other)];
        for (lo, hi, v) in differences(&any.ported[pi], &base) {
            for (start, len) in port_blocks(lo, hi) {
                emit(&mut out, IDENTITY_ANY, *protocol, start, len, v);
            }
        }
    }
    // An identity's function depends only on the tier rules its peers match, its own
    // NetworkPolicy entries and, on egress with a named port in a rule, its named ports: one
    // with the world's signature is the world's, and equal signatures share a function.
    let any_named = tier_rules.iter().flatten().any(|(_, _, r, _)| {
        r.ports
            .iter()
            .flatten()
            .any(|p| matches!(p, PortSelector::Named(_)))
    });
    let signature = |key: &IdentityKey, id: u32| {
        let matched: Vec<usize> = tier_rules
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, (_, _, r, _))| r.peers.iter().any(|p| peer_matches(p, key)))
            .map(|(i, _)| i)
            .collect();
        let own: Vec<usize> = np
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| k.identity == id)
            .map(|(i, _)| i)
            .collect();
        let ports = (d.dir != DIR_INGRESS && any_named).then(|| {
            key.pod
                .as_ref()
                .map(|f| std::sync::Arc::clone(&f.named_ports))
        });
        (matched, own, ports)
    };
    let world_signature = signature(&world, IDENTITY_WORLD);
    // An identity's entries: where its function differs from the world's.
    let write = |out: &mut Vec<Entry>, id: u32, f: &Function| {
        if *f == any {
            return;
        }
        let own_other = f.other != any.other;
        if own_other {
            emit(out, id, PROTO_ANY, 0, 0, f.other);
        }
        for (pi, protocol) in PORTED.iter().enumerate() {
            let other = [(0, u16::MAX, f.other)];
            let base: &[(u16, u16, Verdict)] = if own_other { &other } else { &any.ported[pi] };
            for (lo, hi, v) in differences(&f.ported[pi], base) {
                for (start, len) in port_blocks(lo, hi) {
                    emit(out, id, *protocol, start, len, v);
                }
            }
        }
    };
    let mut functions = HashMap::new();
    for (id, key) in identities {
        let sig = signature(key, *id);
        if sig == world_signature {
            continue;
        }
        let f = functions
            .entry(sig)
            .or_insert_with(|| function(key, *id, false))
            .clone();
        write(&mut out, *id, &f);
    }
    // The node: its addresses' functions, one deny-wins function when they differ.
    let host: Vec<Function> = d
        .host
        .iter()
        .map(|k| function(k, IDENTITY_HOST, true))
        .collect();
    let host_apart = host.windows(2).any(|w| w[0] != w[1]);
    let host = host.into_iter().reduce(|a, b| stricter(&a, &b));
    let host_judged = host.as_ref().is_some_and(Function::denies);
    if let (true, Some(f)) = (host_judged, &host) {
        write(&mut out, IDENTITY_HOST, f);
    }
    DirectionEntries {
        entries: out,
        host_judged,
        host_apart: host_apart && host_judged,
    }
}

impl Function {
    fn denies(&self) -> bool {
        let deny = |v: &Verdict| !matches!(v, Verdict::Allow(_));
        deny(&self.other) || self.ported.iter().flatten().any(|(_, _, v)| deny(v))
    }
}

/// `a` where `b` allows as well, else `b`'s deny: what one identity can say for two addresses
/// judged differently, failing closed.
fn stricter(a: &Function, b: &Function) -> Function {
    let pick = |x: Verdict, y: Verdict| match (x, y) {
        (Verdict::Allow(_), Verdict::Deny(_) | Verdict::Isolated) => y,
        _ => x,
    };
    let ported = std::array::from_fn(|pi| {
        let (a, b) = (&a.ported[pi], &b.ported[pi]);
        let bounds = a
            .iter()
            .chain(b)
            .flat_map(|(lo, hi, _)| [u32::from(*lo), u32::from(*hi) + 1])
            .collect();
        let at = |f: &[(u16, u16, Verdict)], port| piece_at(f, port).unwrap_or(Verdict::Isolated);
        pieces(bounds, |port| pick(at(a, port), at(b, port)))
    });
    Function {
        ported,
        other: pick(a.other, b.other),
    }
}

fn port16(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(u16::MAX)
}

/// The pieces between `bounds` (ports where the verdict may change, 0 and 65536 among them),
/// each with `at`'s verdict at its first port, neighbours of one verdict merged.
fn pieces(mut bounds: Vec<u32>, at: impl Fn(u16) -> Verdict) -> Vec<(u16, u16, Verdict)> {
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<(u16, u16, Verdict)> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (port16(w[0]), port16(w[1] - 1));
        let v = at(lo);
        match out.last_mut() {
            Some(last) if last.2 == v => last.1 = hi,
            _ => out.push((lo, hi, v)),
        }
    }
    out
}

/// The verdict of the piece holding `port`.
fn piece_at(pieces: &[(u16, u16, Verdict)], port: u16) -> Option<Verdict> {
    pieces
        .iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&port))
        .map(|(_, _, v)| *v)
}

/// The runs of `f` where it differs from `base` (both cover 0..=65535 in order), merged, with
/// `f`'s verdict.
fn differences(
    f: &[(u16, u16, Verdict)],
    base: &[(u16, u16, Verdict)],
) -> Vec<(u16, u16, Verdict)> {
    let mut bounds: Vec<u32> = f
        .iter()
        .chain(base)
        .flat_map(|(lo, hi, _)| [u32::from(*lo), u32::from(*hi) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<(u16, u16, Verdict)> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (port16(w[0]), port16(w[1] - 1));
        let (mine, theirs) = (piece_at(f, lo), piece_at(base, lo));
        let Some(v) = mine.filter(|m| Some(*m) != theirs) else {
            continue;
        };
        match out.last_mut() {
            Some(last) if last.2 == v && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
            _ => out.push((lo, hi, v)),
        }
    }
    out
}

/// Where a rule matches, its named ports resolved on the destination's (`None`: no pod).
fn rule_cover(rule: &TierRule, dest_ports: Option<&NamedPorts>) -> Cover {
    let Some(ports) = &rule.ports else {
        return Cover::All;
    };
    let mut v = Vec::new();
    for p in ports {
        match p {
            PortSelector::Range {
                protocol,
                start,
                end,
            } => v.push((*protocol, *start, *end)),
            PortSelector::Named(name) => {
                for (n, protocol, port) in dest_ports.into_iter().flatten() {
                    if n == name {
                        v.push((*protocol, *port, *port));
                    }
                }
            }
        }
    }
    Cover::Some(v)
}

/// What a NetworkPolicy entry covers.
fn entry_cover(k: &PolicyKey) -> Cover {
    if k.protocol == PROTO_ANY {
        return Cover::All;
    }
    let lo = k.port & port_mask(k.port_prefix_len);
    let size = 1u32 << (16 - u32::from(k.port_prefix_len));
    Cover::Some(vec![(k.protocol, lo, port16(u32::from(lo) + size - 1))])
}

/// Whether a tier rule's peer matches every address of an identity, as the evaluator's
/// [`PeerSelector::matches`] judges one of them.
fn peer_matches(peer: &PeerSelector, key: &IdentityKey) -> bool {
    // The evaluator sees the pod object's labels: a verified address's reserved labels are
    // not among them (the object's own reserved ones never are).
    fn pod_labels(f: &crate::compile::PodFacts) -> std::borrow::Cow<'_, Labels> {
        if f.verified {
            let mut l = (*f.labels).clone();
            l.retain(|k, _| !is_reserved_label(k));
            std::borrow::Cow::Owned(l)
        } else {
            std::borrow::Cow::Borrowed(&*f.labels)
        }
    }
    match peer {
        PeerSelector::Namespaces(ns) => key
            .pod
            .as_deref()
            .is_some_and(|f| ns.matches(&f.namespace_labels)),
        PeerSelector::Pods { namespaces, pods } => key.pod.as_deref().is_some_and(|f| {
            namespaces.matches(&f.namespace_labels) && pods.matches(&pod_labels(f))
        }),
        PeerSelector::Nodes(sel) => key.node.as_deref().is_some_and(|l| sel.matches(l)),
        PeerSelector::Networks(cidrs) => cidrs
            .iter()
            .any(|c| key.blocks.contains(&crate::validate::Block::network(*c))),
        PeerSelector::Everything => true,
        PeerSelector::Nothing => false,
    }
}
