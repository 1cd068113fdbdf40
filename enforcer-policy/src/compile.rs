//! The policy compiler: API objects in, the desired contents of the datapath maps out. Pure: no
//! IO, no clock, no randomness; number allocation is carried between compiles in
//! [`Allocations`] so that a change touches only the entries it must.
//!
//! Model. Every address the datapath can see resolves to one **identity**, the interned set of
//! everything a selector or ipBlock can ask about it ([`IdentityKey`]): for a pod address, its
//! namespace, the namespace's labels, the pod's labels and named container ports; for every
//! address, the set of ipBlocks (cidr minus excepts) it is in. Membership in every ipBlock is a
//! function of an address's longest matching prefix among all ipBlock cidrs and excepts, so one
//! LPM entry per such prefix (its "region") carries it exactly. Pod addresses get exact
//! entries; node addresses get [`IDENTITY_HOST`]; Service frontend addresses get
//! [`IDENTITY_SERVICE`] (kube-proxy translates them after the egress program has seen the
//! packet, so a new egress flow to one is judged later, on its backend); everything else is
//! [`IDENTITY_WORLD`].
//! Policy entries then say which identities each local endpoint may talk to, per direction,
//! protocol and port block.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use crate::cidr::Cidr;
use enforcer_common::{
    DEFAULT_MAX_ENDPOINTS, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_AUDIT, EP_EGRESS_HOST_JUDGED,
    EP_EGRESS_ISOLATED, EP_HAS_V4, EP_HAS_V6, EP_INGRESS_AUDIT, EP_INGRESS_ISOLATED, EndpointInfo,
    IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_SERVICE, IDENTITY_WORLD,
    NodePortKey, PORT_MASK_ANY_PROTO, PROTO_ANY, PeerInfo, PolicyKey, PolicyValue, RULE_DENY,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::{intern::NamedPorts, model::PodInfo};

use super::{
    memo::{Memo, PolicyFacts},
    model::{Cluster, Frontend, ServiceError, parse_service, pod_node},
    selector::Labels,
    validate::{
        Block, NamespaceMatch, ParsedPolicy, Peer, PolicyError, Port, Refusal, Rule,
        protocol_number,
    },
};
use crate::{
    compile_tiers,
    state::{DesiredState, EndpointState, PodRef, Prefix, RuleRef},
    tiers::{ClusterPolicy, PeerSelector},
};

/// What the compiler needs to know about the node it compiles for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// `None`: every pod with an address is local (standalone mode). `Some(n)`: pods whose
    /// `spec.nodeName` is `n`.
    pub node_name: Option<String>,
    /// Addresses of the node: they resolve to [`IDENTITY_HOST`], always allowed.
    pub node_ips: Vec<IpAddr>,
    /// Endpoint ids are `1..=max_endpoints`.
    pub max_endpoints: u32,
    /// Every policy's pod and namespace peers must be verified workloads
    /// (`--require-identity`), as if each carried the require-identity annotation.
    pub require_identity: bool,
    /// Every policy audits (`--audit`), as if each carried the audit annotation.
    pub audit: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            node_name: None,
            node_ips: Vec::new(),
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            require_identity: false,
            audit: false,
        }
    }
}

impl CompileOptions {
    /// Whether the pod is enforced by this node.
    pub fn is_local(&self, pod: &PodInfo) -> bool {
        self.node_name
            .as_deref()
            .is_none_or(|n| pod_node(pod) == Some(n))
    }
}

/// The facts about a pod that selectors and named ports can ask about. Shared (`Arc`) by every
/// pod and address with the same facts: a workload's replicas are one value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodFacts {
    pub namespace: Arc<str>,
    /// Including `kubernetes.io/metadata.name`.
    pub namespace_labels: Arc<Labels>,
    pub labels: Arc<Labels>,
    /// `(name, protocol, port)` of the named container ports.
    pub named_ports: Arc<NamedPorts>,
    /// The address is bound to a verified identity (its reserved labels are in `labels`).
    pub verified: bool,
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    /// The pod facts, for pod addresses.
    pub pod: Option<Arc<PodFacts>>,
    /// The ipBlocks the address is in (inside the cidr, outside every except), shared by every
    /// address of one region. A cluster policy's `networks` CIDRs are blocks too.
    pub blocks: BlockSet,
    /// The labels of the node that owns the address, when a cluster policy has a `nodes` peer
    /// (node addresses then have identities of their own).
    pub node: Option<Arc<Labels>>,
}

/// A set of ipBlocks, with a digest of its contents made once. A region's set holds nearly
/// every ipBlock of the cluster (an address is in all but the few whose except holds it), and
/// identity keys are hashed and ordered per address: by the digest they cost one word, and
/// the sets are compared whole only when their digests are equal (nearly always the same
/// set, found equal by address).
#[derive(Clone, Debug, Default)]
pub struct BlockSet {
    digest: u64,
    blocks: Arc<BTreeSet<Block>>,
}

impl BlockSet {
    pub fn new(blocks: BTreeSet<Block>) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        blocks.hash(&mut h);
        Self {
            digest: h.finish(),
            blocks: Arc::new(blocks),
        }
    }
}

impl std::ops::Deref for BlockSet {
    type Target = BTreeSet<Block>;
    fn deref(&self) -> &BTreeSet<Block> {
        &self.blocks
    }
}

impl PartialEq for BlockSet {
    fn eq(&self, o: &Self) -> bool {
        self.digest == o.digest && (Arc::ptr_eq(&self.blocks, &o.blocks) || self.blocks == o.blocks)
    }
}

impl Eq for BlockSet {}

impl std::hash::Hash for BlockSet {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.digest.hash(h);
    }
}

impl PartialOrd for BlockSet {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// By digest, then contents: a total order consistent with equality (the order itself means
/// nothing).
impl Ord for BlockSet {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.digest.cmp(&o.digest).then_with(|| {
            if Arc::ptr_eq(&self.blocks, &o.blocks) {
                std::cmp::Ordering::Equal
            } else {
                self.blocks.cmp(&o.blocks)
            }
        })
    }
}

impl IdentityKey {
    fn is_world(&self) -> bool {
        self.pod.is_none() && self.blocks.is_empty() && self.node.is_none()
    }

    /// An address nothing names.
    pub fn world() -> Self {
        Self {
            pod: None,
            blocks: BlockSet::new(BTreeSet::new()),
            node: None,
        }
    }
}

/// A number pool: the same key keeps its number while it is used in consecutive compiles.
#[derive(Clone, Debug)]
struct Pool<K: Ord> {
    first: u32,
    last: u32,
    /// Hand out never-used numbers before freed ones (identities, rules); otherwise the smallest
    /// free number (endpoints, a small bounded range).
    prefer_fresh: bool,
    live: BTreeMap<K, (u32, u64)>,
    /// Freed number -> the generation that freed it.
    free: BTreeMap<u32, u64>,
    next: u32,
}

impl<K: Ord + Clone> Pool<K> {
    fn new(first: u32, last: u32, prefer_fresh: bool) -> Self {
        Self {
            first,
            last,
            prefer_fresh,
            live: BTreeMap::new(),
            free: BTreeMap::new(),
            next: first,
        }
    }

    fn get(&mut self, key: &K, generation: u64) -> Option<u32> {
        if let Some((id, used)) = self.live.get_mut(key) {
            *used = generation;
            return Some(*id);
        }
        // A number freed in the previous compile may still be in the maps the reconciler has not
        // finished replacing: reuse it only after one more compile, unless nothing else is left.
        // Looked for only when wanted: the free list of a pool that prefers fresh numbers grows
        // with churn, and this runs per key.
        let settled = || {
            self.free
                .iter()
                .find(|(_, freed)| **freed + 1 < generation)
                .map(|(id, _)| *id)
        };
        let fresh = (self.next <= self.last && self.next >= self.first).then_some(self.next);
        let any_free = || self.free.keys().next().copied();
        let id = if self.prefer_fresh {
            fresh.or_else(settled)
        } else {
            settled().or(fresh)
        }
        .or_else(any_free)?;
        if Some(id) == fresh {
            self.next = self.next.saturating_add(1);
        } else {
            self.free.remove(&id);
        }
        self.live.insert(key.clone(), (id, generation));
        Some(id)
    }

    fn sweep(&mut self, generation: u64) {
        let gone: Vec<K> = self
            .live
            .iter()
            .filter(|(_, (_, used))| *used != generation)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some((id, _)) = self.live.remove(&k) {
                self.free.insert(id, generation);
            }
        }
    }

    /// Frees `key`'s number now (its last user left in `generation`).
    fn release(&mut self, key: &K, generation: u64) {
        if let Some((id, _)) = self.live.remove(key) {
            self.free.insert(id, generation);
        }
    }

    /// Gives `key` the number `id` (numbers restored from pinned maps). `false` when either is
    /// taken or `id` is out of range.
    fn reserve(&mut self, key: &K, id: u32) -> bool {
        if id < self.first
            || id > self.last
            || self.live.contains_key(key)
            || self.live.values().any(|(i, _)| *i == id)
        {
            return false;
        }
        self.skip_past(id);
        self.free.remove(&id);
        self.live.insert(key.clone(), (id, 0));
        true
    }

    /// [`Pool::reserve`] of many pairs at once (a key or number given twice keeps its first
    /// pair); how many were taken.
    fn reserve_all(&mut self, pairs: impl IntoIterator<Item = (K, u32)>) -> usize {
        let mut taken: BTreeSet<u32> = self.live.values().map(|(i, _)| *i).collect();
        let mut n = 0;
        for (key, id) in pairs {
            if id < self.first
                || id > self.last
                || self.live.contains_key(&key)
                || !taken.insert(id)
            {
                continue;
            }
            self.skip_past(id);
            self.free.remove(&id);
            self.live.insert(key, (id, 0));
            n += 1;
        }
        n
    }

    /// Fresh numbers start above `id` from now on. In a pool that prefers fresh numbers the
    /// skipped ones are not recorded (they would be reused only once ~4e9 are spent, and a
    /// long-lived agent's numbers run high); elsewhere they become free (settled).
    fn skip_past(&mut self, id: u32) {
        if self.prefer_fresh {
            self.next = self.next.max(id.saturating_add(1));
            return;
        }
        while self.next <= id {
            if self.next != id {
                self.free.insert(self.next, 0);
            }
            self.next += 1;
        }
    }

    /// The key holding each number.
    fn by_number(&self) -> BTreeMap<u32, K> {
        self.live
            .iter()
            .map(|(k, (id, _))| (*id, k.clone()))
            .collect()
    }

    fn lookup(&self, key: &K) -> Option<u32> {
        self.live.get(key).map(|(id, _)| *id)
    }
}

/// Number allocation carried from one compile to the next: identities, endpoint ids and rule
/// ids stay the same for the same key, and a number is reused for another key only after its
/// key has been absent from a compile.
#[derive(Clone, Debug)]
pub struct Allocations {
    generation: u64,
    identities: Pool<IdentityKey>,
    endpoints: Pool<PodRef>,
    rules: Pool<RuleRef>,
    memo: Memo,
}

impl Default for Allocations {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocations {
    pub fn new() -> Self {
        Self {
            generation: 0,
            identities: Pool::new(IDENTITY_FIRST_ALLOCATED, u32::MAX - 1, true),
            endpoints: Pool::new(1, u32::MAX - 1, false),
            // Below RULE_DENY, which marks deny entries, and the reserved ids next to it.
            rules: Pool::new(1, RULE_DENY - 3, true),
            memo: Memo::default(),
        }
    }

    /// The endpoint id of a pod, if it had one in the last compile.
    pub fn endpoint_id(&self, pod: &PodRef) -> Option<u32> {
        self.endpoints.lookup(pod)
    }

    /// Keeps the endpoint id `id` for `pod`, as found in the pinned maps after a restart, so
    /// its policy keys and tracked flows stay valid. `false` when the pod or the id is taken.
    pub fn reserve_endpoint(&mut self, pod: &PodRef, id: u32) -> bool {
        self.endpoints.reserve(pod, id)
    }

    /// The identity of a key, if it had one in the last compile.
    pub fn identity(&self, key: &IdentityKey) -> Option<u32> {
        self.identities.lookup(key)
    }

    /// After a restart: gives the identities and rules of `cluster` the numbers `pinned` (what
    /// the pinned maps hold) gave them, and keeps every other pinned number out of fresh hands.
    /// Numbered afresh, an identity could take a number the pinned maps still use for another
    /// (their policy entries then apply to its addresses until the reconciler replaces them),
    /// and a moved number makes flows re-checked mid-update. A number is restored when every
    /// address or region (policy key, for rules) a trial compile gives it carried one and the
    /// same pinned number, which no other number claims. Returns (identities, rules) restored;
    /// costs one compile, none on a first start (nothing pinned).
    pub fn restore(
        &mut self,
        cluster: &Cluster,
        opts: &CompileOptions,
        pinned: &DesiredState,
    ) -> (usize, usize) {
        let nothing_pinned = pinned.peers_v4.is_empty()
            && pinned.peers_v6.is_empty()
            && pinned.cidrs_v4.is_empty()
            && pinned.cidrs_v6.is_empty()
            && pinned.policy.is_empty();
        if nothing_pinned {
            // A first start: no trial compiles.
            return (0, 0);
        }
        let mut trial = self.clone();
        let fresh = compile(cluster, opts, &mut trial).state;
        let identity = |p: &PeerInfo| p.identity;
        let pairs = paired(&fresh.peers_v4, &pinned.peers_v4, identity)
            .chain(paired(&fresh.peers_v6, &pinned.peers_v6, identity))
            .chain(paired(&fresh.cidrs_v4, &pinned.cidrs_v4, identity))
            .chain(paired(&fresh.cidrs_v6, &pinned.cidrs_v6, identity));
        let ids = renumbering(pairs, IDENTITY_FIRST_ALLOCATED);
        let keys = trial.identities.by_number();
        let identities = self.identities.reserve_all(
            ids.iter()
                .filter_map(|(new, old)| Some((keys.get(new)?.clone(), *old))),
        );
        let pinned_ids = pinned
            .peers_v4
            .values()
            .chain(pinned.peers_v6.values())
            .chain(pinned.cidrs_v4.values())
            .chain(pinned.cidrs_v6.values())
            .map(|p| p.identity)
            .max();
        if let Some(max) = pinned_ids.filter(|m| *m >= IDENTITY_FIRST_ALLOCATED) {
            self.identities.skip_past(max);
        }

        // Rules: the trial's policy keys, their identities renumbered as just restored, are
        // the pinned keys of the same rules (rule numbers do not depend on identity numbers).
        let as_pinned = |k: &PolicyKey| {
            let mut k = *k;
            if k.identity >= IDENTITY_FIRST_ALLOCATED {
                k.identity = *ids.get(&k.identity)?;
            }
            Some(k)
        };
        let rule_pairs = fresh.policy.iter().filter_map(|(k, v)| {
            let pinned = pinned.policy.get(&as_pinned(k)?)?.rule;
            Some((v.rule & !RULE_DENY, pinned & !RULE_DENY))
        });
        let keys = trial.rules.by_number();
        let rules = self.rules.reserve_all(
            renumbering(rule_pairs, 1)
                .into_iter()
                .filter_map(|(new, old)| Some((keys.get(&new)?.clone(), old))),
        );
        if let Some(max) = pinned.policy.values().map(|v| v.rule & !RULE_DENY).max() {
            self.rules.skip_past(max);
        }
        (identities, rules)
    }
}

#[cfg(test)]
pub(crate) fn renumbering_for_tests(pairs: &[(u32, u32)]) -> Vec<(u32, u32)> {
    renumbering(pairs.iter().copied(), IDENTITY_FIRST_ALLOCATED)
        .into_iter()
        .collect()
}

/// (number now, pinned number) of every key both maps have.
fn paired<'a, K: Ord, V>(
    now: &'a BTreeMap<K, V>,
    pinned: &'a BTreeMap<K, V>,
    number: impl Fn(&V) -> u32 + 'a,
) -> impl Iterator<Item = (u32, u32)> + 'a {
    now.iter()
        .filter_map(move |(k, v)| Some((number(v), number(pinned.get(k)?))))
}

/// Fresh number -> pinned number, for the fresh numbers (from `first` on) whose every pair
/// names one pinned number that no other fresh number names.
fn renumbering(pairs: impl Iterator<Item = (u32, u32)>, first: u32) -> BTreeMap<u32, u32> {
    let mut to: BTreeMap<u32, Option<u32>> = BTreeMap::new();
    for (new, old) in pairs.filter(|(n, o)| *n >= first && *o >= first) {
        let e = to.entry(new).or_insert(Some(old));
        if *e != Some(old) {
            *e = None;
        }
    }
    let mut claims: BTreeMap<u32, usize> = BTreeMap::new();
    for old in to.values().flatten() {
        *claims.entry(*old).or_default() += 1;
    }
    to.into_iter()
        .filter_map(|(new, old)| old.filter(|o| claims[o] == 1).map(|o| (new, o)))
        .collect()
}

/// A problem found while compiling; the rest of the input still compiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompileError {
    /// The policy does not validate: it is refused, and isolates the pods it selects in the
    /// directions it names, allowing nothing ([`Compiled::refused`]).
    Policy(PolicyError),
    /// A second NetworkPolicy with the same namespace and name was left out.
    DuplicatePolicy { namespace: String, name: String },
    /// More local pods than endpoint ids: this pod gets no endpoint entry (the agent attaches
    /// its programs anyway, which then deny it both ways).
    TooManyEndpoints { pod: PodRef, max: u32 },
    /// Two pods claim one address: it resolves to `kept`.
    DuplicateAddress {
        ip: IpAddr,
        kept: PodRef,
        dropped: PodRef,
    },
    /// A field of a Service that cannot be read: left out (an address left out is judged as
    /// the address it is, not as a Service frontend; a port left out is not a node port).
    Service(ServiceError),
    /// Cluster policies judge the node's own addresses differently on the egress of these
    /// pods (an IPv4-only `networks` CIDR, say): the programs know the node by one identity,
    /// so each address is denied wherever one is (fail closed).
    NodeJudgedApart {
        addresses: Vec<IpAddr>,
        pods: Vec<PodRef>,
    },
    /// A Service frontend address that is also a pod's or the node's: it resolves to the pod
    /// (the node). Should never happen: the cluster allocates them from separate ranges.
    ServiceAddress {
        ip: IpAddr,
        service: String,
        frontend: Frontend,
        /// "pod x/a" or "the node".
        owner: String,
    },
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policy(e) => write!(
                f,
                "{e} (policy refused: the pods it selects are isolated until it is fixed)"
            ),
            Self::DuplicatePolicy { namespace, name } => {
                write!(
                    f,
                    "NetworkPolicy {namespace}/{name}: duplicate object skipped"
                )
            }
            Self::TooManyEndpoints { pod, max } => {
                write!(
                    f,
                    "pod {pod}: no endpoint id, more than {max} local pods: denied both ways until one is free (raise --max-endpoints)"
                )
            }
            Self::DuplicateAddress { ip, kept, dropped } => {
                write!(
                    f,
                    "address {ip} is claimed by pods {kept} and {dropped}; it resolves to {kept}"
                )
            }
            Self::Service(e) => write!(f, "{e} (left out)"),
            Self::NodeJudgedApart { addresses, pods } => {
                let list = |v: Vec<String>| v.join(", ");
                write!(
                    f,
                    "cluster policies judge this node's addresses ({}) differently for the egress of {} pod(s) ({}): the node has one identity, so each address is denied wherever one is",
                    list(addresses.iter().map(ToString::to_string).collect()),
                    pods.len(),
                    list(pods.iter().take(5).map(ToString::to_string).collect()),
                )
            }
            Self::ServiceAddress {
                ip,
                service,
                frontend,
                owner,
            } => write!(
                f,
                "Service {service}: {frontend} {ip} is also the address of {owner}; it resolves to {owner}, not to the Service"
            ),
        }
    }
}

/// The result of a compile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub state: DesiredState,
    pub errors: Vec<CompileError>,
    /// What each identity used in `state` stands for.
    pub identities: Arc<BTreeMap<u32, IdentityKey>>,
    /// The policies refused by validation, by namespace/name: each isolates what it selects
    /// (fail closed). Their errors are in `errors` too.
    pub refused: Vec<RefusedPolicy>,
}

/// A refused policy, as this compile enforces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedPolicy {
    pub refusal: Refusal,
    /// The local endpoints it isolates (in the directions of `refusal`), in pod order.
    pub pods: Vec<PodRef>,
}

/// Policies deduplicated by namespace/name (first wins) and sorted by it, each parsed once per
/// object ([`Memo`]), with the errors of the refused and duplicate ones. The evaluator counts the
/// same objects. Refused ones are returned too: they are enforced as their stand-in.
fn parsed_policies(
    cluster: &Cluster,
    memo: &mut Memo,
    generation: u64,
) -> (Vec<Arc<PolicyFacts>>, Vec<CompileError>) {
    let mut facts: Vec<Arc<PolicyFacts>> = cluster
        .policies
        .iter()
        .map(|p| memo.policy(p, generation))
        .collect();
    // Stable: among duplicates the first object stays first.
    facts.sort_by(|a, b| a.key().cmp(&b.key()));
    let mut out = Vec::with_capacity(facts.len());
    let mut errors = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        if i > 0 && facts[i - 1].key() == f.key() {
            let (namespace, name) = f.key();
            errors.push(CompileError::DuplicatePolicy {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
            continue;
        }
        if let Some(r) = f.refusal() {
            errors.extend(r.errors.iter().cloned().map(CompileError::Policy));
        }
        out.push(Arc::clone(f));
    }
    (out, errors)
}

/// What the compiler derives from the policies (and namespaces, for audit) alone, before it
/// looks at pods: kept in the memo and reused while those inputs are the same objects, so a
/// pod event does not walk 10k policies to find them unchanged.
pub(super) struct Prelude {
    /// The inputs, held: compared by address (namespaces by content too, see [`StageInput`]).
    policies: Vec<Arc<k8s_openapi::api::networking::v1::NetworkPolicy>>,
    namespaces: Vec<Arc<Namespace>>,
    audit_all: bool,
    /// [`parsed_policies`].
    enforced: Vec<Arc<PolicyFacts>>,
    errors: Vec<CompileError>,
    /// The NetworkPolicies' ipBlocks.
    blocks: Arc<BTreeSet<Block>>,
    /// Per `enforced` policy: whether it audits ([`audited_policies`]).
    audited: Vec<bool>,
}

impl Prelude {
    fn made_of(&self, cluster: &Cluster, audit_all: bool) -> bool {
        fn same<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>], by_content: bool) -> bool {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| Arc::ptr_eq(x, y) || (by_content && x == y))
        }
        self.audit_all == audit_all
            && same(&self.policies, &cluster.policies, false)
            && same(&self.namespaces, &cluster.namespaces, true)
    }
}

/// The [`Prelude`] of `cluster`: the last compile's when its inputs are the same, else made.
fn prelude(cluster: &Cluster, audit_all: bool, memo: &mut Memo, generation: u64) -> Arc<Prelude> {
    if let Some(p) = memo
        .prelude
        .as_ref()
        .filter(|p| p.made_of(cluster, audit_all))
    {
        memo.prelude_reused = true;
        return Arc::clone(p);
    }
    memo.prelude_reused = false;
    let (enforced, errors) = parsed_policies(cluster, memo, generation);
    let blocks: BTreeSet<Block> = enforced
        .iter()
        .map(|f| f.enforced())
        .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten())
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|peer| match peer {
            Peer::Block(b) => Some(b.clone()),
            Peer::Pods { .. } => None,
        })
        .collect();
    let audits = audited_policies(cluster, audit_all);
    let audited = enforced
        .iter()
        .map(|f| {
            let p = f.enforced();
            audits.contains(&(p.namespace.as_str(), p.name.as_str()))
        })
        .collect();
    let made = Arc::new(Prelude {
        policies: cluster.policies.clone(),
        namespaces: cluster.namespaces.clone(),
        audit_all,
        enforced,
        errors,
        blocks: Arc::new(blocks),
        audited,
    });
    memo.prelude = Some(Arc::clone(&made));
    made
}

/// The pods that take part in policy, one per `PodRef` (the first object of a name wins),
/// ordered by `PodRef`: [`Cluster::policy_pods`], from the memo.
/// Also the names of the other pods (kept by name, not in policy), and whether any name was
/// given twice.
fn policy_pods(cluster: &Cluster) -> (Vec<(PodRef, &Arc<PodInfo>)>, BTreeSet<PodRef>, bool) {
    let mut all: Vec<(PodRef, &Arc<PodInfo>)> = cluster
        .pods
        .iter()
        .map(|p| (crate::model::pod_ref(p), p))
        .collect();
    // Stable: among pods of one name the first object stays first. Sources give pods sorted
    // by name, which makes this a linear pass.
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let named = all.len();
    all.dedup_by(|later, first| later.0 == first.0);
    let twice = all.len() != named;
    let mut others = BTreeSet::new();
    all.retain(|(r, p)| {
        let policy = crate::model::pod_is_policy_pod(p);
        if !policy {
            others.insert(r.clone());
        }
        policy
    });
    (all, others, twice)
}

/// `(name, protocol, port)` of a pod's named container ports (`spec.containers[].ports[]`);
/// ports with an unknown protocol or out-of-range number are left out.
pub fn named_ports(pod: &Pod) -> BTreeSet<(String, u8, u16)> {
    let mut out = BTreeSet::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            let (Some(name), Some(proto), Ok(port)) = (
                p.name.as_ref(),
                protocol_number(p.protocol.as_deref()),
                u16::try_from(p.container_port),
            ) else {
                continue;
            };
            out.insert((name.clone(), proto, port));
        }
    }
    out
}

/// Splits `lo..=hi` into aligned power-of-two blocks: `(first port, prefix length)`.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut cur, hi) = (u32::from(lo), u32::from(hi));
    while cur <= hi {
        let mut k = if cur == 0 {
            16
        } else {
            cur.trailing_zeros().min(16)
        };
        while cur + (1 << k) - 1 > hi {
            k -= 1;
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "cur <= hi <= u16::MAX and k <= 16"
        )]
        out.push((cur as u16, (16 - k) as u8));
        cur += 1 << k;
    }
    out
}

fn block_covers_net(block: &Block, net: &Cidr) -> bool {
    block.cidr.covers(net) && !block.except.iter().any(|e| e.covers(net))
}

fn peer_matches(peer: &Peer, key: &IdentityKey, require_identity: bool) -> bool {
    match peer {
        Peer::Block(b) => key.blocks.contains(b),
        Peer::Pods { namespaces, pods } => {
            let Some(f) = &key.pod else { return false };
            if require_identity && !f.verified {
                return false;
            }
            let ns_ok = match namespaces {
                NamespaceMatch::Own(ns) => *f.namespace == **ns,
                NamespaceMatch::Selector(s) => s.matches(&f.namespace_labels),
            };
            ns_ok && pods.as_ref().is_none_or(|s| s.matches(&f.labels))
        }
    }
}

/// Peers of one rule, resolved: `None` = any peer.
type PeerIds = Option<Vec<u32>>;

/// What the identity stage reads: compared with the previous compile's to reuse its result.
/// The objects are held, so an address cannot be reused by another object meanwhile.
pub(super) struct StageInput {
    pods: Vec<Arc<PodInfo>>,
    namespaces: Vec<Arc<Namespace>>,
    verified: BTreeMap<IpAddr, BTreeMap<String, String>>,
    /// Shared with the policy prelude ([`Prelude`]) while no cluster policy adds networks: a
    /// pod event compares it by address, not its 10k blocks.
    blocks: Arc<BTreeSet<Block>>,
    node_ips: Vec<IpAddr>,
    /// Which pods are local.
    node_name: Option<String>,
    /// The nodes, when a cluster policy has a `nodes` peer (else none: their addresses are
    /// then plain addresses, as without cluster policies).
    nodes: Vec<Arc<crate::model::NodeInfo>>,
}

impl StageInput {
    /// Equal but for the pods.
    fn same_but_pods(&self, o: &Self) -> bool {
        self.namespaces.len() == o.namespaces.len()
            && self
                .namespaces
                .iter()
                .zip(&o.namespaces)
                .all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
            && self.verified == o.verified
            && (Arc::ptr_eq(&self.blocks, &o.blocks) || self.blocks == o.blocks)
            && self.node_ips == o.node_ips
            && self.node_name == o.node_name
            && self.nodes.len() == o.nodes.len()
            && self
                .nodes
                .iter()
                .zip(&o.nodes)
                .all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
    }
}

impl PartialEq for StageInput {
    fn eq(&self, o: &Self) -> bool {
        // By address first; by content when a source made a new but equal object (the
        // manifests folder creates the namespaces that are used but not declared on each read).
        fn same<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
        }
        same(&self.pods, &o.pods) && self.same_but_pods(o)
    }
}

/// Everything known about addresses: which pod owns each, the identity each resolves to, and
/// the peer and region entries. It depends on pods, namespaces, verified addresses, ipBlocks and
/// node addresses only, so a change to policies alone reuses it (most of a compile at 1k pods).
#[derive(Clone, Default)]
pub(super) struct IdentityStage {
    /// The policy pods (the first object of each name), with their facts.
    pods: BTreeMap<PodRef, (Arc<PodInfo>, Arc<PodFacts>)>,
    /// The policy pods this node enforces.
    locals: BTreeSet<PodRef>,
    /// Labels of each namespace a pod is in.
    ns_labels: HashMap<Arc<str>, Arc<Labels>>,
    /// Each ipBlock cidr and except, with the identity key of its region.
    region_keys: BTreeMap<Cidr, IdentityKey>,
    /// How many pod addresses resolve to each pod identity: one that drops to none is freed.
    members: HashMap<u32, u32>,
    /// The names of the pods that take no part in policy (no address, host network, ended).
    others: BTreeSet<PodRef>,
    /// Some name was given by two pod objects (the first wins).
    twice: bool,
    /// The pod that owns each pod address.
    owners: BTreeMap<IpAddr, PodRef>,
    /// The labels of the node that owns each node address ([`StageInput::nodes`]).
    node_labels: BTreeMap<IpAddr, Arc<Labels>>,
    /// The identity of each pod address.
    addr_ids: BTreeMap<IpAddr, u32>,
    /// Every identity in use but world and host, with what it stands for.
    identities: Arc<BTreeMap<u32, IdentityKey>>,
    /// The generation of the compile that last changed `identities`: what is derived from
    /// them is kept while it stays (not the map itself, which a kept value would make
    /// shared, and so copied on its next change).
    identities_made: u64,
    peers_v4: BTreeMap<std::net::Ipv4Addr, PeerInfo>,
    peers_v6: BTreeMap<std::net::Ipv6Addr, PeerInfo>,
    cidrs_v4: BTreeMap<Prefix<std::net::Ipv4Addr>, PeerInfo>,
    cidrs_v6: BTreeMap<Prefix<std::net::Ipv6Addr>, PeerInfo>,
    errors: Vec<CompileError>,
}

/// The longest-prefix match over the ipBlock cidrs and excepts: which region an address is in.
/// An address's ipBlocks are a function of its region (see the module doc), so each address
/// costs one lookup per distinct prefix length, not one test per ipBlock.
struct Regions<'k> {
    /// Prefix lengths in use, longest first, per family (v4, v6).
    lens: [Vec<u8>; 2],
    keys: &'k BTreeMap<Cidr, IdentityKey>,
}

impl<'k> Regions<'k> {
    fn new(keys: &'k BTreeMap<Cidr, IdentityKey>) -> Self {
        let mut lens: [Vec<u8>; 2] = Default::default();
        for net in keys.keys() {
            lens[usize::from(net.network().is_ipv6())].push(net.prefix_len());
        }
        for l in &mut lens {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        Self { lens, keys }
    }

    fn key_of(&self, ip: IpAddr) -> Option<&'k IdentityKey> {
        self.lens[usize::from(ip.is_ipv6())]
            .iter()
            .find_map(|len| self.keys.get(&Cidr::new(ip, *len)?))
    }
}

fn identity_stage(
    cluster: &Cluster,
    pods: &[(PodRef, &Arc<PodInfo>)],
    input: &StageInput,
    identities: &mut Pool<IdentityKey>,
    generation: u64,
) -> IdentityStage {
    let mut stage = IdentityStage::default();
    let prefixes: BTreeSet<Cidr> = input
        .blocks
        .iter()
        .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    let region_keys: BTreeMap<Cidr, IdentityKey> = prefixes
        .iter()
        .map(|net| {
            let bs = input
                .blocks
                .iter()
                .filter(|b| block_covers_net(b, net))
                .cloned()
                .collect();
            (
                *net,
                IdentityKey {
                    pod: None,
                    blocks: BlockSet::new(bs),
                    node: None,
                },
            )
        })
        .collect();
    let regions = Regions::new(&region_keys);
    let no_blocks = BlockSet::new(BTreeSet::new());
    stage.node_labels = node_labels(input);

    // Pods: facts (one shared value per distinct facts) and the addresses they own.
    let mut ns_labels: HashMap<Arc<str>, Arc<Labels>> = HashMap::new();
    let mut shared_facts: HashMap<Arc<PodFacts>, ()> = HashMap::new();
    let mut intern = |f: PodFacts| -> Arc<PodFacts> {
        if let Some((k, ())) = shared_facts.get_key_value(&f) {
            return Arc::clone(k);
        }
        let f = Arc::new(f);
        shared_facts.insert(Arc::clone(&f), ());
        f
    };
    let mut owner: BTreeMap<IpAddr, (PodRef, Arc<PodFacts>)> = BTreeMap::new();
    for (r, pod) in pods {
        let nsl = Arc::clone(
            ns_labels
                .entry(Arc::clone(&pod.namespace))
                .or_insert_with(|| Arc::new(cluster.namespace_labels(&pod.namespace))),
        );
        // Without the reserved labels the object sets itself: those come only from
        // verification (added per verified address below).
        let facts = intern(PodFacts {
            namespace: Arc::clone(&pod.namespace),
            namespace_labels: nsl,
            labels: Arc::clone(&pod.labels),
            named_ports: Arc::clone(&pod.named_ports),
            verified: false,
        });
        stage
            .pods
            .insert(r.clone(), (Arc::clone(pod), Arc::clone(&facts)));
        if is_local(input, pod) {
            stage.locals.insert(r.clone());
        }
        for &ip in &pod.ips {
            if input.node_ips.contains(&ip) {
                continue;
            }
            match owner.get(&ip) {
                Some((kept, _)) => stage.errors.push(CompileError::DuplicateAddress {
                    ip,
                    kept: kept.clone(),
                    dropped: r.clone(),
                }),
                None => {
                    owner.insert(ip, (r.clone(), Arc::clone(&facts)));
                }
            }
        }
    }

    // Identity keys of every pod address and every region.
    let addr_keys: BTreeMap<IpAddr, IdentityKey> = owner
        .iter()
        .map(|(ip, (_, facts))| {
            // A verified address adds its identity's reserved labels to the pod's.
            let pod = match input.verified.get(ip) {
                Some(extra) => {
                    let mut f = (**facts).clone();
                    let mut labels = (*f.labels).clone();
                    labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
                    f.labels = Arc::new(labels);
                    f.verified = true;
                    intern(f)
                }
                None => Arc::clone(facts),
            };
            let blocks = regions
                .key_of(*ip)
                .map_or_else(|| no_blocks.clone(), |k| k.blocks.clone());
            (
                *ip,
                IdentityKey {
                    pod: Some(pod),
                    blocks,
                    node: stage.node_labels.get(ip).cloned(),
                },
            )
        })
        .collect();
    // Node addresses no pod owns, for `nodes` peers; the node's own stay IDENTITY_HOST.
    let node_keys: BTreeMap<IpAddr, IdentityKey> = stage
        .node_labels
        .iter()
        .filter(|(ip, _)| !owner.contains_key(ip) && !input.node_ips.contains(ip))
        .map(|(ip, labels)| {
            let blocks = regions
                .key_of(*ip)
                .map_or_else(|| no_blocks.clone(), |k| k.blocks.clone());
            (
                *ip,
                IdentityKey {
                    pod: None,
                    blocks,
                    node: Some(Arc::clone(labels)),
                },
            )
        })
        .collect();
    let mut ids: HashMap<&IdentityKey, u32> = HashMap::new();
    for k in addr_keys
        .values()
        .chain(region_keys.values())
        .chain(node_keys.values())
    {
        if k.is_world() || ids.contains_key(k) {
            continue;
        }
        // The pool cannot run dry: it has ~4e9 numbers.
        let id = identities.get(k, generation).unwrap_or(IDENTITY_WORLD);
        ids.insert(k, id);
    }
    let id_of = |k: &IdentityKey| {
        if k.is_world() {
            IDENTITY_WORLD
        } else {
            ids.get(k).copied().unwrap_or(IDENTITY_WORLD)
        }
    };

    for (ip, k) in &addr_keys {
        let info = PeerInfo {
            identity: id_of(k),
            flags: 0,
        };
        *stage.members.entry(info.identity).or_default() += 1;
        stage.addr_ids.insert(*ip, info.identity);
        match ip {
            IpAddr::V4(a) => stage.peers_v4.insert(*a, info),
            IpAddr::V6(a) => stage.peers_v6.insert(*a, info),
        };
    }
    for (ip, k) in &node_keys {
        let info = PeerInfo {
            identity: id_of(k),
            flags: 0,
        };
        match ip {
            IpAddr::V4(a) => stage.peers_v4.insert(*a, info),
            IpAddr::V6(a) => stage.peers_v6.insert(*a, info),
        };
    }
    for ip in &input.node_ips {
        let info = PeerInfo {
            identity: IDENTITY_HOST,
            flags: 0,
        };
        match ip {
            IpAddr::V4(a) => stage.peers_v4.insert(*a, info),
            IpAddr::V6(a) => stage.peers_v6.insert(*a, info),
        };
    }
    // Region entries, shortest first, leaving out those that repeat their nearest ancestor.
    let mut by_len: Vec<(&Cidr, u32)> = region_keys.iter().map(|(n, k)| (n, id_of(k))).collect();
    by_len.sort_by_key(|(n, _)| (n.prefix_len(), **n));
    let mut emitted: Vec<(Cidr, u32)> = Vec::new();
    for (net, id) in by_len {
        let parent = emitted
            .iter()
            .filter(|(p, _)| p.covers(net))
            .max_by_key(|(p, _)| p.prefix_len())
            .map_or(IDENTITY_WORLD, |(_, id)| *id);
        if parent == id {
            continue;
        }
        emitted.push((*net, id));
        let info = PeerInfo {
            identity: id,
            flags: 0,
        };
        let len = net.prefix_len();
        match net.network() {
            IpAddr::V4(addr) => stage.cidrs_v4.insert(Prefix { addr, len }, info),
            IpAddr::V6(addr) => stage.cidrs_v6.insert(Prefix { addr, len }, info),
        };
    }

    stage.identities = Arc::new(ids.into_iter().map(|(k, id)| (id, k.clone())).collect());
    stage.owners = owner.into_iter().map(|(ip, (r, _))| (ip, r)).collect();
    stage.ns_labels = ns_labels;
    stage.region_keys = region_keys;
    stage
}

/// The labels of the node owning each node address: the first node that lists it, as the
/// evaluator finds it.
fn node_labels(input: &StageInput) -> BTreeMap<IpAddr, Arc<Labels>> {
    let mut out = BTreeMap::new();
    for n in &input.nodes {
        let labels = Arc::new(n.labels.clone());
        for ip in &n.addresses {
            out.entry(*ip).or_insert_with(|| Arc::clone(&labels));
        }
    }
    out
}

fn is_local(input: &StageInput, pod: &PodInfo) -> bool {
    input
        .node_name
        .as_deref()
        .is_none_or(|n| pod_node(pod) == Some(n))
}

/// Most changes above a few thousand pods are a few pods: updated in place (see
/// [`update_stage`]) rather than rebuilt, while they are at most this share of the pods.
const UPDATE_SHARE: usize = 8;

/// Brings `stage`, made from `old`, up to `new`, which differs from it in pods only: each pod
/// gone or replaced loses its addresses (an identity left without one is freed), each pod new
/// or replaced gets its facts and the identity of each address (a new one only when no other
/// address has it). Costs what changed, not the cluster. `false`, with nothing touched, when
/// the change is one a rebuild must judge: many pods, a name or an address two pods claim
/// (the first pod in name order keeps it), or duplicates already there.
fn update_stage(
    cluster: &Cluster,
    stage: &mut IdentityStage,
    old: &StageInput,
    new: &StageInput,
    identities: &mut Pool<IdentityKey>,
    generation: u64,
) -> bool {
    if !stage.errors.is_empty() || stage.twice || !old.same_but_pods(new) {
        return false;
    }
    let (gone, came) = crate::model::pods_changed(&old.pods, &new.pods);
    if (gone.len() + came.len()) * UPDATE_SHARE > new.pods.len().max(64) {
        return false;
    }
    // Checked before anything changes. No name was given twice (`twice`), so every object
    // gone is the one its name stands for.
    let mut gone_refs = BTreeSet::new();
    for p in &gone {
        if p.ips.iter().any(|ip| stage.node_labels.contains_key(ip)) {
            return false;
        }
        let r = crate::model::pod_ref(p);
        let known = if crate::model::pod_is_policy_pod(p) {
            stage
                .pods
                .get(&r)
                .is_some_and(|(kept, _)| Arc::ptr_eq(kept, p))
        } else {
            stage.others.contains(&r)
        };
        if !known || !gone_refs.insert(r) {
            return false;
        }
    }
    let mut came_refs = BTreeSet::new();
    let mut came_ips = BTreeSet::new();
    for p in &came {
        let r = crate::model::pod_ref(p);
        let named = stage.pods.contains_key(&r) || stage.others.contains(&r);
        if (named && !gone_refs.contains(&r)) || !came_refs.insert(r) {
            return false;
        }
        if !crate::model::pod_is_policy_pod(p) {
            continue;
        }
        for ip in p.ips.iter().filter(|ip| !new.node_ips.contains(ip)) {
            // A node address changes hands: a rebuild judges it.
            if stage.node_labels.contains_key(ip) {
                return false;
            }
            let taken = stage
                .owners
                .get(ip)
                .is_some_and(|owner| !gone_refs.contains(owner));
            if taken || !came_ips.insert(*ip) {
                return false;
            }
        }
    }

    // The pool is not swept after this compile (see `compile`): what leaves is released below.
    let mut emptied: Vec<u32> = Vec::new();
    for r in &gone_refs {
        stage.locals.remove(r);
        stage.others.remove(r);
        let Some((pod, _)) = stage.pods.remove(r) else {
            continue;
        };
        for ip in pod.ips.iter() {
            if stage.owners.get(ip) != Some(r) {
                continue;
            }
            stage.owners.remove(ip);
            match ip {
                IpAddr::V4(a) => stage.peers_v4.remove(a),
                IpAddr::V6(a) => stage.peers_v6.remove(a),
            };
            let Some(id) = stage.addr_ids.remove(ip) else {
                continue;
            };
            if let Some(n) = stage.members.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    emptied.push(id);
                }
            }
        }
    }
    let regions = Regions::new(&stage.region_keys);
    let no_blocks = BlockSet::new(BTreeSet::new());
    let mut made: Vec<(u32, IdentityKey)> = Vec::new();
    for pod in &came {
        let r = crate::model::pod_ref(pod);
        if !crate::model::pod_is_policy_pod(pod) {
            stage.others.insert(r);
            continue;
        }
        let nsl = Arc::clone(
            stage
                .ns_labels
                .entry(Arc::clone(&pod.namespace))
                .or_insert_with(|| Arc::new(cluster.namespace_labels(&pod.namespace))),
        );
        let facts = Arc::new(PodFacts {
            namespace: Arc::clone(&pod.namespace),
            namespace_labels: nsl,
            labels: Arc::clone(&pod.labels),
            named_ports: Arc::clone(&pod.named_ports),
            verified: false,
        });
        if is_local(new, pod) {
            stage.locals.insert(r.clone());
        }
        for &ip in pod.ips.iter() {
            if new.node_ips.contains(&ip) {
                continue;
            }
            let key = IdentityKey {
                pod: Some(address_facts(&facts, new.verified.get(&ip))),
                blocks: regions
                    .key_of(ip)
                    .map_or_else(|| no_blocks.clone(), |k| k.blocks.clone()),
                node: stage.node_labels.get(&ip).cloned(),
            };
            let id = identities.get(&key, generation).unwrap_or(IDENTITY_WORLD);
            let n = stage.members.entry(id).or_default();
            if *n == 0 && !stage.identities.contains_key(&id) {
                made.push((id, key));
            }
            *n += 1;
            let info = PeerInfo {
                identity: id,
                flags: 0,
            };
            stage.owners.insert(ip, r.clone());
            stage.addr_ids.insert(ip, id);
            match ip {
                IpAddr::V4(a) => stage.peers_v4.insert(a, info),
                IpAddr::V6(a) => stage.peers_v6.insert(a, info),
            };
        }
        stage.pods.insert(r, (Arc::clone(pod), facts));
    }
    // Identities left without an address, and not given one again.
    emptied.retain(|id| stage.members.get(id) == Some(&0));
    if !emptied.is_empty() || !made.is_empty() {
        stage.identities_made = generation;
        let ids = Arc::make_mut(&mut stage.identities);
        for id in emptied {
            stage.members.remove(&id);
            if let Some(key) = ids.remove(&id) {
                identities.release(&key, generation);
            }
        }
        ids.extend(made);
    }
    true
}

/// The facts of one address of a pod: a verified address adds its identity's reserved labels
/// to the pod's.
fn address_facts(
    facts: &Arc<PodFacts>,
    verified: Option<&BTreeMap<String, String>>,
) -> Arc<PodFacts> {
    match verified {
        Some(extra) => {
            let mut f = (**facts).clone();
            let mut labels = (*f.labels).clone();
            labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
            f.labels = Arc::new(labels);
            f.verified = true;
            Arc::new(f)
        }
        None => Arc::clone(facts),
    }
}

/// The Services' share of the state: every frontend address resolves to [`IDENTITY_SERVICE`]
/// unless a pod or the node has it, and every node port goes to `node_ports`. Apart from the
/// identity stage: no selector or ipBlock asks about a Service, so Services change no identity.
fn add_services(
    cluster: &Cluster,
    stage: &IdentityStage,
    node_ips: &[IpAddr],
    state: &mut DesiredState,
) -> Vec<CompileError> {
    let mut errors = Vec::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for svc in &cluster.services {
        let (parsed, errs) = parse_service(svc);
        // The first object of a namespace/name, as for every other kind.
        if !seen.insert((parsed.namespace.clone(), parsed.name.clone())) {
            continue;
        }
        errors.extend(errs.into_iter().map(CompileError::Service));
        for &(ip, frontend) in &parsed.addresses {
            let owner = if node_ips.contains(&ip) {
                Some("the node".to_string())
            } else {
                stage.owners.get(&ip).map(|p| format!("pod {p}"))
            };
            if let Some(owner) = owner {
                errors.push(CompileError::ServiceAddress {
                    ip,
                    service: parsed.key(),
                    frontend,
                    owner,
                });
                continue;
            }
            let info = PeerInfo {
                identity: IDENTITY_SERVICE,
                flags: 0,
            };
            match ip {
                IpAddr::V4(a) => state.peers_v4.insert(a, info),
                IpAddr::V6(a) => state.peers_v6.insert(a, info),
            };
        }
        for p in &parsed.ports {
            if let Some(port) = p.node_port {
                state.node_ports.insert(NodePortKey {
                    protocol: p.protocol,
                    _pad: 0,
                    port,
                });
            }
        }
    }
    errors
}

/// A local endpoint of one compile.
struct Local<'a> {
    r: &'a PodRef,
    facts: &'a Arc<PodFacts>,
    info: EndpointInfo,
    ips: Vec<IpAddr>,
}

/// What one policy gives the local endpoints: the (endpoint, direction) pairs it isolates and
/// its policy entries, each with the index of its rule, in endpoint, direction, rule order.
/// Endpoints are indexes into the compile's local endpoints; the keys carry their ids.
#[derive(Debug, Default)]
pub(super) struct PolicyOut {
    isolates: Box<[(u32, u8)]>,
    entries: Box<[OutEntry]>,
}

impl PolicyOut {
    /// The policy isolates no local endpoint, so it has no entries either, whatever the
    /// identities are.
    pub fn selects_nothing(&self) -> bool {
        self.isolates.is_empty() && self.entries.is_empty()
    }
}

#[derive(Debug)]
struct OutEntry {
    endpoint: u32,
    rule: u32,
    key: PolicyKey,
}

/// The input [`PolicyOut`]s depend on besides their policy: compared with the last compile's
/// to reuse them.
/// Not the identity stage itself: a pod that joins an existing identity, or changes address,
/// makes a new stage with the same identities, and every contribution stays valid.
#[derive(PartialEq)]
pub(super) struct OutputsKey {
    /// The compile that last changed the set of identities ([`IdentityStage::identities_made`]).
    identities: u64,
    /// Each local endpoint, its id and the facts its policies select it by.
    endpoints: Vec<(PodRef, u32, Arc<PodFacts>)>,
    require_identity: bool,
}

impl OutputsKey {
    pub fn same_but_identities(&self, o: &Self) -> bool {
        self.endpoints == o.endpoints && self.require_identity == o.require_identity
    }
}

/// Resolves rule peers to identities. Each distinct peer is matched against the identities
/// once and shared by every rule that names it (Cilium's SelectorCache does the same): policies
/// repeat peers, and matching is the compile's inner loop (rules x identities).
struct PeerResolver<'s> {
    known: Vec<(u32, &'s IdentityKey)>,
    /// The pod identities, for named egress ports.
    pods: Vec<(u32, &'s PodFacts)>,
    /// Indexes into `known` of each peer's matches, per `require_identity`.
    hits: [HashMap<Peer, Vec<usize>>; 2],
}

impl<'s> PeerResolver<'s> {
    fn new(identities: &'s BTreeMap<u32, IdentityKey>) -> Self {
        let known: Vec<(u32, &IdentityKey)> = identities.iter().map(|(id, k)| (*id, k)).collect();
        let pods = known
            .iter()
            .filter_map(|(id, k)| k.pod.as_deref().map(|f| (*id, f)))
            .collect();
        Self {
            known,
            pods,
            hits: Default::default(),
        }
    }

    fn resolve(&mut self, rule: &Rule, require_identity: bool) -> PeerIds {
        rule.peers.as_ref().map(|peers| {
            // Indexes into `known`, ascending: the ids come out in `known`'s order.
            let mut hits: Vec<usize> = Vec::new();
            let cache = &mut self.hits[usize::from(require_identity)];
            for p in peers {
                if let Some(of_peer) = cache.get(p) {
                    hits.extend_from_slice(of_peer);
                    continue;
                }
                let of_peer: Vec<usize> = self
                    .known
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, k))| peer_matches(p, k, require_identity))
                    .map(|(i, _)| i)
                    .collect();
                hits.extend_from_slice(&of_peer);
                cache.insert(p.clone(), of_peer);
            }
            if peers.len() > 1 {
                hits.sort_unstable();
                hits.dedup();
            }
            hits.into_iter().map(|i| self.known[i].0).collect()
        })
    }
}

/// What policy `p` gives the local endpoints (see [`PolicyOut`]).
fn contributions(
    p: &ParsedPolicy,
    locals: &[Local<'_>],
    resolver: &mut PeerResolver<'_>,
    require_identity: bool,
) -> PolicyOut {
    let mut isolates = Vec::new();
    let mut entries = Vec::new();
    // Peers per (direction, rule): resolved once for all endpoints.
    let mut resolved: HashMap<(u8, usize), PeerIds> = HashMap::new();
    for (li, l) in locals.iter().enumerate() {
        if p.namespace != l.r.namespace || !p.pod_selector.matches(&l.facts.labels) {
            continue;
        }
        let (li, eid) = (u32::try_from(li).unwrap_or(u32::MAX), l.info.id);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let rules = if dir == DIR_INGRESS {
                &p.ingress
            } else {
                &p.egress
            };
            let Some(rules) = rules else { continue };
            isolates.push((li, dir));
            for (ri, rule) in rules.iter().enumerate() {
                let peers = resolved
                    .entry((dir, ri))
                    .or_insert_with(|| resolver.resolve(rule, require_identity));
                let rule = u32::try_from(ri).unwrap_or(u32::MAX);
                let any = [IDENTITY_ANY];
                let peer_list: &[u32] = peers.as_deref().unwrap_or(&any);
                let mut keys: Vec<PolicyKey> = Vec::new();
                let push_all = |proto: u8, port: u16, len: u8, keys: &mut Vec<PolicyKey>| {
                    keys.extend(
                        peer_list
                            .iter()
                            .map(|id| PolicyKey::new(eid, *id, dir, proto, port, len)),
                    );
                };
                match &rules[ri].ports {
                    None => push_all(PROTO_ANY, 0, 0, &mut keys),
                    Some(ports) => {
                        for port in ports {
                            match port {
                                Port::All(proto) => push_all(*proto, 0, 0, &mut keys),
                                Port::Range(proto, lo, hi) => {
                                    for (start, len) in port_blocks(*lo, *hi) {
                                        push_all(*proto, start, len, &mut keys);
                                    }
                                }
                                // Ingress: the port of the destination, i.e. this pod.
                                Port::Named(proto, name) if dir == DIR_INGRESS => {
                                    for (n, pr, num) in l.facts.named_ports.iter() {
                                        if n == name && pr == proto {
                                            push_all(*proto, *num, 16, &mut keys);
                                        }
                                    }
                                }
                                // Egress: the port of each peer pod that declares it.
                                Port::Named(proto, name) => {
                                    for (id, pf) in &resolver.pods {
                                        if peers.as_ref().is_some_and(|ps| !ps.contains(id)) {
                                            continue;
                                        }
                                        for (n, pr, num) in pf.named_ports.iter() {
                                            if n == name && pr == proto {
                                                keys.push(PolicyKey::new(
                                                    eid, *id, dir, *proto, *num, 16,
                                                ));
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                entries.extend(keys.into_iter().map(|key| OutEntry {
                    endpoint: li,
                    rule,
                    key,
                }));
            }
        }
    }
    PolicyOut {
        isolates: isolates.into_boxed_slice(),
        entries: entries.into_boxed_slice(),
    }
}

/// What the entries of a tier-managed direction depend on besides the identities: the same
/// for two endpoints, the same entries (but for the endpoint id).
#[derive(PartialEq, Eq, Hash)]
struct ManagedInput {
    dir: u8,
    /// Indexes of the cluster policies that select the pod.
    policies: Vec<usize>,
    /// The NetworkPolicy entries, without the endpoint.
    np: Vec<(u32, u8, u16, u8, RuleRef)>,
    np_isolated: bool,
    /// The pod's named ports, for ingress.
    named_ports: Option<Arc<crate::intern::NamedPorts>>,
}

/// The reference of a NetworkPolicy rule.
fn np_rule(p: &ParsedPolicy, direction: u8, index: u32) -> RuleRef {
    RuleRef::NetworkPolicy {
        namespace: p.namespace.clone(),
        policy: p.name.clone(),
        direction,
        index,
    }
}

/// `(namespace, name)` of the policies that audit ([`Cluster::policy_audits`]): of each
/// namespace/name its first object, as [`parsed_policies`] keeps.
fn audited_policies(cluster: &Cluster, audit_all: bool) -> BTreeSet<(&str, &str)> {
    // Of each namespace name its first object decides, as `Cluster::namespace_object` reads.
    let mut namespaces: HashMap<&str, bool> = HashMap::new();
    for n in &cluster.namespaces {
        if let Some(name) = n.metadata.name.as_deref() {
            namespaces
                .entry(name)
                .or_insert_with(|| crate::model::audit_annotated(&n.metadata));
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = BTreeSet::new();
    for p in &cluster.policies {
        let ns = p
            .metadata
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        let key = (ns, p.metadata.name.as_deref().unwrap_or_default());
        if seen.insert(key)
            && (audit_all
                || crate::model::audit_annotated(&p.metadata)
                || namespaces.get(ns).copied().unwrap_or(false))
        {
            out.insert(key);
        }
    }
    out
}

/// Compiles the cluster for one node. Never panics; problems are in `errors`.
pub fn compile(cluster: &Cluster, opts: &CompileOptions, alloc: &mut Allocations) -> Compiled {
    alloc.generation += 1;
    let generation = alloc.generation;
    alloc.endpoints.last = opts.max_endpoints;
    let prelude = prelude(cluster, opts.audit, &mut alloc.memo, generation);
    let enforced = &prelude.enforced;
    let mut errors = prelude.errors.clone();
    // ipBlocks: the only input of the identity stage that comes from policies.
    let blocks = Arc::clone(&prelude.blocks);
    // Cluster policies, in evaluation order: their `networks` join the ipBlocks, their
    // `nodes` peers give node addresses identities.
    let mut tier_policies: Vec<&ClusterPolicy> =
        cluster.cluster_policies.iter().map(|p| &**p).collect();
    tier_policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let tier_peers = || {
        tier_policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
            .flat_map(|r| &r.peers)
    };
    let mut blocks = blocks;
    for peer in tier_peers() {
        if let PeerSelector::Networks(cidrs) = peer {
            Arc::make_mut(&mut blocks).extend(cidrs.iter().map(|c| Block::network(*c)));
        }
    }
    let nodes = if tier_peers().any(|p| matches!(p, PeerSelector::Nodes(_))) {
        cluster.nodes.clone()
    } else {
        Vec::new()
    };
    let input = StageInput {
        pods: cluster.pods.clone(),
        namespaces: cluster.namespaces.clone(),
        verified: cluster.verified.clone(),
        blocks,
        node_ips: opts.node_ips.clone(),
        node_name: opts.node_name.clone(),
        nodes,
    };
    // Reusable, or updated for a change of pods, only straight after the compile that made
    // it: then the identity pool holds exactly its keys, with its numbers.
    let mut prev = alloc.memo.stage.take();
    let mut updated = None;
    if let Some((old, stage, made)) = prev.take() {
        if made + 1 == generation && old == input {
            updated = Some(stage);
        } else if made + 1 == generation {
            // Unshared once taken from the memo (the compile that made it has returned).
            let mut s = Arc::try_unwrap(stage).unwrap_or_else(|a| (*a).clone());
            if update_stage(
                cluster,
                &mut s,
                &old,
                &input,
                &mut alloc.identities,
                generation,
            ) {
                updated = Some(Arc::new(s));
            } else {
                prev = Some((old, Arc::new(s), made));
            }
        } else {
            prev = Some((old, stage, made));
        }
    }
    // A stage reused or updated leaves the identity pool holding exactly its keys (an update
    // releases what it empties): no sweep over every identity, which would cost the cluster's
    // size on every pod event. A rebuilt stage asks the pool for each key it uses; the rest
    // are swept.
    let pool_exact = updated.is_some();
    let stage = match updated {
        Some(stage) => stage,
        None => {
            let (pods, others, twice) = policy_pods(cluster);
            let mut stage =
                identity_stage(cluster, &pods, &input, &mut alloc.identities, generation);
            stage.others = others;
            stage.twice = twice;
            // The same identities as before (a pod joined or left an existing one): keep the
            // old value, so what is keyed by it is found equal by address.
            stage.identities_made = generation;
            if let Some((_, old, _)) = &prev
                && old.identities == stage.identities
            {
                stage.identities = Arc::clone(&old.identities);
                stage.identities_made = old.identities_made;
            }
            let stage = Arc::new(stage);
            // Dropped after the new one is made: a new stage never has the old one's address.
            drop(prev);
            stage
        }
    };
    alloc.memo.stage = Some((input, Arc::clone(&stage), generation));
    errors.extend(stage.errors.iter().cloned());
    let mut state = DesiredState {
        peers_v4: stage.peers_v4.clone(),
        peers_v6: stage.peers_v6.clone(),
        cidrs_v4: stage.cidrs_v4.clone(),
        cidrs_v6: stage.cidrs_v6.clone(),
        ..DesiredState::default()
    };
    errors.extend(add_services(cluster, &stage, &opts.node_ips, &mut state));
    let id_of_addr = |ip: &IpAddr| stage.addr_ids.get(ip).copied();

    // Local endpoints, in pod order.
    let mut locals: Vec<Local<'_>> = Vec::new();
    for r in &stage.locals {
        let Some((pod, f)) = stage.pods.get(r) else {
            continue;
        };
        let Some(eid) = alloc.endpoints.get(r, generation) else {
            errors.push(CompileError::TooManyEndpoints {
                pod: r.clone(),
                max: opts.max_endpoints,
            });
            continue;
        };
        let ips = pod.ips.to_vec();
        let mut info = EndpointInfo {
            id: eid,
            ..Default::default()
        };
        if let Some(v4) = ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }) {
            info.flags |= EP_HAS_V4;
            info.ipv4 = v4.octets();
        }
        if let Some(v6) = ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }) {
            info.flags |= EP_HAS_V6;
            info.ipv6 = v6.octets();
        }
        info.identity = ips.iter().find_map(id_of_addr).unwrap_or(IDENTITY_WORLD);
        locals.push(Local {
            r,
            facts: f,
            info,
            ips,
        });
    }

    // Each policy's contribution depends on the policy, the identity stage and the local
    // endpoints only: the last compile's are reused while the latter two are unchanged.
    alloc.memo.outputs_for(OutputsKey {
        identities: stage.identities_made,
        endpoints: locals
            .iter()
            .map(|l| (l.r.clone(), l.info.id, Arc::clone(l.facts)))
            .collect(),
        require_identity: opts.require_identity,
    });
    let mut resolver: Option<PeerResolver<'_>> = None;
    let mut masks = vec![[0u32; 2]; locals.len()];
    let mut refused = Vec::new();
    // Per local endpoint, the directions (bit = direction) enforcing and audit policies isolate.
    let mut isolated_by = vec![[0u8; 2]; locals.len()];
    let mut outs: Vec<(Arc<PolicyOut>, bool)> = Vec::with_capacity(enforced.len());
    for (facts, audit) in enforced.iter().zip(&prelude.audited) {
        let p = facts.enforced();
        let out = alloc.memo.output(facts, generation, |_| {
            contributions(
                p,
                &locals,
                resolver.get_or_insert_with(|| PeerResolver::new(&stage.identities)),
                p.require_identity || opts.require_identity,
            )
        });
        let audit = *audit;
        for &(li, dir) in &out.isolates {
            if let Some(by) = isolated_by.get_mut(li as usize) {
                by[usize::from(audit)] |= 1 << dir;
            }
        }
        if let Some(r) = facts.refusal() {
            let mut pods: Vec<PodRef> = out
                .isolates
                .iter()
                .filter_map(|&(li, _)| locals.get(li as usize).map(|l| l.r.clone()))
                .collect();
            pods.dedup();
            refused.push(RefusedPolicy {
                refusal: r.clone(),
                pods,
            });
        }
        outs.push((out, audit));
    }
    // A direction an enforcing policy isolates holds the enforcing policies' entries only, as
    // if no audit policy existed (they could only add allows). One only audit policies isolate
    // holds theirs, flagged `EP_*_AUDIT` with the audit policies named in `state.audited`: a
    // miss there is a would-drop, let through.
    //
    // A direction cluster policies manage (`compile_tiers`) is isolated, its entries all
    // written there: the enforcing policies' entries are its input, and audit policies take
    // no part (what they would drop is allowed by the tiers' default anyway).
    let managed: Vec<u8> = locals
        .iter()
        .map(|l| {
            if tier_policies.is_empty() {
                return 0;
            }
            let pod = stage.pods.get(l.r).map(|(p, _)| &**p);
            [DIR_INGRESS, DIR_EGRESS]
                .into_iter()
                .filter(|dir| {
                    pod.is_some_and(|pod| {
                        compile_tiers::manages(&tier_policies, *dir, pod, &l.facts.namespace_labels)
                    })
                })
                .fold(0, |m, dir| m | 1 << dir)
        })
        .collect();
    let is_managed = |li: u32, dir: u8| managed.get(li as usize).is_some_and(|m| m & 1 << dir != 0);
    let audit_only = |li: u32, dir: u8| {
        !is_managed(li, dir)
            && isolated_by
                .get(li as usize)
                .is_some_and(|[e, a]| (e & 1 << dir) == 0 && (a & 1 << dir) != 0)
    };
    for ((l, [e, a]), m) in locals.iter_mut().zip(&isolated_by).zip(&managed) {
        for (dir, iso, aud) in [
            (DIR_INGRESS, EP_INGRESS_ISOLATED, EP_INGRESS_AUDIT),
            (DIR_EGRESS, EP_EGRESS_ISOLATED, EP_EGRESS_AUDIT),
        ] {
            if (e | a | m) & 1 << dir != 0 {
                l.info.flags |= iso;
            }
            if m & 1 << dir == 0 && e & 1 << dir == 0 && a & 1 << dir != 0 {
                l.info.flags |= aud;
            }
        }
    }
    // The enforcing NetworkPolicy entries of each managed direction, first rule first.
    let mut managed_np: HashMap<(u32, u8), Vec<(PolicyKey, RuleRef)>> = HashMap::new();
    // Policies in order, so the first policy's rule wins a key two policies give (as the
    // evaluator's "first allowing rule" does); numbering a rule only when it gives an entry.
    // A refused policy's stand-in has no rules: it only isolates.
    for ((out, audit), facts) in outs.iter().zip(enforced) {
        let p = facts.enforced();
        if *audit {
            for &(li, dir) in &out.isolates {
                if let (true, Some(l)) = (audit_only(li, dir), locals.get(li as usize)) {
                    state
                        .audited
                        .entry((l.info.id, dir))
                        .or_default()
                        .push(format!("{}/{}", p.namespace, p.name));
                }
            }
        }
        let mut rule_ids: Vec<((u8, u32), Option<u32>)> = Vec::new();
        for e in &out.entries {
            let (dir, ri) = (e.key.direction, e.rule);
            if *audit && !audit_only(e.endpoint, dir) {
                continue;
            }
            if is_managed(e.endpoint, dir) {
                managed_np
                    .entry((e.endpoint, dir))
                    .or_default()
                    .push((e.key, np_rule(p, dir, ri)));
                continue;
            }
            let rule_id = match rule_ids.iter().find(|(k, _)| *k == (dir, ri)) {
                Some((_, id)) => *id,
                None => {
                    let rule_ref = np_rule(p, dir, ri);
                    let id = alloc.rules.get(&rule_ref, generation);
                    if let Some(id) = id {
                        state.rules.insert(id, rule_ref);
                    }
                    rule_ids.push(((dir, ri), id));
                    id
                }
            };
            let (Some(rule_id), Some(mask)) = (
                rule_id,
                masks
                    .get_mut(e.endpoint as usize)
                    .and_then(|m| m.get_mut(usize::from(dir))),
            ) else {
                continue;
            };
            *mask |= if e.key.protocol == PROTO_ANY {
                PORT_MASK_ANY_PROTO
            } else {
                1 << e.key.port_prefix_len
            };
            state.policy.entry(e.key).or_insert(PolicyValue {
                rule: rule_id,
                _pad: 0,
            });
        }
    }
    // Endpoints whose managed direction has the same input (a workload's replicas) share its
    // entries: made once, given each endpoint's id.
    let mut made: HashMap<ManagedInput, compile_tiers::DirectionEntries> = HashMap::new();
    // What the node's own addresses stand for to the tiers' peers on egress (`nodes` by this
    // node's labels, `networks` by each address), one key per distinct one.
    let mut host_keys: Vec<IdentityKey> = Vec::new();
    if !tier_policies.is_empty() {
        let regions = Regions::new(&stage.region_keys);
        let node_peers = tier_policies
            .iter()
            .flat_map(|p| &p.egress)
            .flat_map(|r| &r.peers)
            .any(|p| matches!(p, PeerSelector::Nodes(_)));
        for ip in &opts.node_ips {
            let key = IdentityKey {
                pod: None,
                blocks: regions
                    .key_of(*ip)
                    .map_or_else(|| BlockSet::new(BTreeSet::new()), |k| k.blocks.clone()),
                node: node_peers
                    .then(|| {
                        cluster.node_labels_seen(*ip, opts.node_name.as_deref(), &opts.node_ips)
                    })
                    .flatten()
                    .map(|l| Arc::new(l.clone())),
            };
            if !host_keys.contains(&key) {
                host_keys.push(key);
            }
        }
    }
    // Local endpoints whose egress to the node the tiers judge; those that judge the node's
    // addresses apart.
    let mut host_judged = vec![false; locals.len()];
    let mut host_apart: Vec<PodRef> = Vec::new();
    for (li, l) in locals.iter().enumerate() {
        let li32 = u32::try_from(li).unwrap_or(u32::MAX);
        let Some((pod, _)) = stage.pods.get(l.r) else {
            continue;
        };
        let selecting: Vec<usize> = tier_policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.subject.selects(pod, &l.facts.namespace_labels))
            .map(|(i, _)| i)
            .collect();
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            if !is_managed(li32, dir) {
                continue;
            }
            let np = managed_np.remove(&(li32, dir)).unwrap_or_default();
            let np_isolated = isolated_by[li][0] & 1 << dir != 0;
            let input = ManagedInput {
                dir,
                policies: selecting.clone(),
                np: np
                    .iter()
                    .map(|(k, r)| (k.identity, k.protocol, k.port, k.port_prefix_len, r.clone()))
                    .collect(),
                np_isolated,
                named_ports: (dir == DIR_INGRESS).then(|| Arc::clone(&l.facts.named_ports)),
            };
            let entries = made.entry(input).or_insert_with(|| {
                let policies: Vec<&ClusterPolicy> =
                    selecting.iter().map(|i| tier_policies[*i]).collect();
                compile_tiers::compile_direction(
                    &stage.identities,
                    &compile_tiers::ManagedDirection {
                        endpoint: l.info.id,
                        dir,
                        policies: &policies,
                        named_ports: &l.facts.named_ports,
                        np_isolated,
                        np,
                        host: if dir == DIR_EGRESS { &host_keys } else { &[] },
                    },
                )
            });
            if entries.host_judged {
                host_judged[li] = true;
            }
            if entries.host_apart {
                host_apart.push(l.r.clone());
            }
            for (key, rule_ref, deny) in entries.entries.iter().cloned() {
                let key = PolicyKey {
                    endpoint: l.info.id,
                    ..key
                };
                let Some(id) = alloc.rules.get(&rule_ref, generation) else {
                    continue;
                };
                state.rules.insert(id, rule_ref);
                masks[li][usize::from(dir)] |= if key.protocol == PROTO_ANY {
                    PORT_MASK_ANY_PROTO
                } else {
                    1 << key.port_prefix_len
                };
                let rule = if deny { id | RULE_DENY } else { id };
                state.policy.insert(key, PolicyValue { rule, _pad: 0 });
            }
        }
    }
    if !host_apart.is_empty() {
        errors.push(CompileError::NodeJudgedApart {
            addresses: opts.node_ips.clone(),
            pods: host_apart,
        });
    }
    for ((mut l, m), judged) in locals.into_iter().zip(masks).zip(host_judged) {
        l.info.port_masks = m;
        if judged {
            l.info.flags |= EP_EGRESS_HOST_JUDGED;
        }
        state.endpoints.insert(
            l.r.clone(),
            EndpointState {
                info: l.info,
                ips: l.ips,
            },
        );
    }

    if !pool_exact {
        alloc.identities.sweep(generation);
    }
    alloc.endpoints.sweep(generation);
    alloc.rules.sweep(generation);
    alloc.memo.sweep(generation);
    Compiled {
        state,
        errors,
        identities: Arc::clone(&stage.identities),
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::shared, tests::fixtures::*};
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    fn stage_of(a: &Allocations) -> *const IdentityStage {
        a.memo
            .stage
            .as_ref()
            .map_or(std::ptr::null(), |(_, s, _)| Arc::as_ptr(s))
    }

    /// What the memo saves is real: an unchanged policy is not parsed again, the identity stage
    /// is reused across a policy-only change and rebuilt when a pod, a namespace or an ipBlock
    /// changes, and a gone object's entry is dropped.
    #[test]
    fn unchanged_objects_are_not_derived_again() {
        let opts = CompileOptions::default();
        let allow = |name: &str, peer| {
            policy(
                "x",
                name,
                None,
                None,
                Some(vec![(Some(vec![peer]), Some(vec![tcp(80)]))]),
                None,
            )
        };
        let mut c = Cluster {
            namespaces: shared([namespace("x", &[])]),
            pods: shared([
                pod("x", "a", &[("app", "a")], &["10.0.0.1"], "n", &[]),
                pod("x", "b", &[("app", "b")], &["10.0.0.2"], "n", &[]),
            ]),
            policies: shared([allow("p", pods_peer(None, Some(sel(&[("app", "b")]))))]),
            services: Vec::new(),
            verified: BTreeMap::new(),
            ..Cluster::default()
        };
        let mut a = Allocations::new();
        let first = compile(&c, &opts, &mut a);
        let stage = stage_of(&a);
        let parsed = Arc::as_ptr(&a.memo.policy(&c.policies[0], a.generation));
        let output = |a: &mut Allocations, p: &Arc<NetworkPolicy>| {
            let facts = a.memo.policy(p, a.generation);
            a.memo
                .output_of(&facts)
                .expect("a valid policy's contribution is kept")
        };
        let out = output(&mut a, &c.policies[0]);

        // Only a policy added: the same stage, the old policy's parse reused.
        c.policies.push(Arc::new(allow(
            "q",
            pods_peer(None, Some(sel(&[("app", "a")]))),
        )));
        let second = compile(&c, &opts, &mut a);
        assert_eq!(stage_of(&a), stage, "policy-only change reuses the stage");
        assert_eq!(
            Arc::as_ptr(&a.memo.policy(&c.policies[0], a.generation)),
            parsed,
            "unchanged policy not parsed again"
        );
        assert!(
            Arc::ptr_eq(&output(&mut a, &c.policies[0]), &out),
            "unchanged policy's contribution reused"
        );
        assert_eq!(second.identities, first.identities);
        assert!(second.state.policy.len() > first.state.policy.len());

        // A pod relabelled (a new object): the stage is updated in place, identities follow
        // the labels.
        c.pods[1] = Arc::new(pod("x", "b", &[("app", "c")], &["10.0.0.2"], "n", &[]).into());
        let third = compile(&c, &opts, &mut a);
        assert!(
            !Arc::ptr_eq(&output(&mut a, &c.policies[0]), &out),
            "a new stage makes every contribution again"
        );
        assert_ne!(third.identities, second.identities);
        let fresh = compile(&c, &opts, &mut Allocations::new());
        assert_eq!(third.state.policy.len(), fresh.state.policy.len());

        // Another option (--require-identity): contributions made again. Nothing is verified,
        // so the strict compile has no entries where the same cluster has some.
        let out = output(&mut a, &c.policies[0]);
        let strict = CompileOptions {
            require_identity: true,
            ..opts.clone()
        };
        let carried = compile(&c, &strict, &mut a);
        assert!(!Arc::ptr_eq(&output(&mut a, &c.policies[0]), &out));
        assert!(!third.state.policy.is_empty());
        assert!(carried.state.policy.is_empty());
        assert!(
            compile(&c, &strict, &mut Allocations::new())
                .state
                .policy
                .is_empty()
        );
        let back = compile(&c, &opts, &mut a);
        assert_eq!(back.state.policy.len(), third.state.policy.len());

        // An ipBlock appears: rebuilt again (regions and address keys depend on it).
        let stage = stage_of(&a);
        c.policies.push(Arc::new(allow(
            "r",
            block_peer("10.0.0.0/24", &["10.0.0.2/32"]),
        )));
        let fourth = compile(&c, &opts, &mut a);
        assert_ne!(stage_of(&a), stage, "new ipBlock rebuilds the stage");
        assert!(!fourth.state.cidrs_v4.is_empty());

        // A namespace relabelled: rebuilt.
        let stage = stage_of(&a);
        c.namespaces = shared([namespace("x", &[("team", "blue")])]);
        compile(&c, &opts, &mut a);
        assert_ne!(stage_of(&a), stage, "namespace change rebuilds the stage");

        // Removed objects leave the memo at the end of the compile.
        c.policies.truncate(1);
        compile(&c, &opts, &mut a);
        assert_eq!(a.memo.policies_len(), 1);

        // A compile skipped in between (allocations cloned from an older state): never reused.
        let stage = stage_of(&a);
        let mut older = a.clone();
        compile(&c, &opts, &mut older);
        assert_ne!(stage_of(&older), stage);
    }

    #[test]
    fn reserved_endpoint_ids_are_kept_and_never_handed_out_twice() {
        let mut a = Allocations::new();
        assert!(a.reserve_endpoint(&PodRef::new("x", "b"), 3));
        assert!(!a.reserve_endpoint(&PodRef::new("x", "c"), 3), "id taken");
        let g = 1;
        let ids: Vec<u32> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| a.endpoints.get(&PodRef::new("x", *n), g).unwrap())
            .collect();
        assert_eq!(ids[1], 3, "the reserved pod keeps its id");
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "no id handed out twice: {ids:?}");
    }

    #[test]
    fn port_blocks_cover_exactly() {
        assert_eq!(port_blocks(80, 80), [(80, 16)]);
        assert_eq!(port_blocks(0, 65535), [(0, 0)]);
        assert_eq!(port_blocks(80, 83), [(80, 14)]);
        assert_eq!(port_blocks(79, 84), [(79, 16), (80, 14), (84, 16)]);
        assert_eq!(port_blocks(65535, 65535), [(65535, 16)]);
        for (lo, hi) in [
            (1u16, 65535u16),
            (1000, 2000),
            (32768, 60999),
            (5, 5),
            (65534, 65535),
        ] {
            let blocks = port_blocks(lo, hi);
            let mut covered = 0u32;
            for (start, len) in &blocks {
                let size = 1u32 << (16 - len);
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                covered += size;
            }
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1);
            for p in [
                lo,
                hi,
                lo.saturating_sub(1),
                hi.saturating_add(1),
                (lo / 2 + hi / 2),
            ] {
                let inside = blocks
                    .iter()
                    .any(|(s, l)| p & enforcer_common::port_mask(*l) == *s);
                assert_eq!(inside, (lo..=hi).contains(&p), "{lo}-{hi} port {p}");
            }
        }
    }

    #[test]
    fn pool_keeps_and_quarantines_numbers() {
        let mut pool: Pool<&str> = Pool::new(1, 3, false);
        assert_eq!(pool.get(&"a", 1), Some(1));
        assert_eq!(pool.get(&"b", 1), Some(2));
        pool.sweep(1);
        assert_eq!(pool.get(&"b", 2), Some(2));
        pool.sweep(2); // a freed at 2
        assert_eq!(
            pool.get(&"c", 3),
            Some(3),
            "a's number is quarantined for one compile"
        );
        assert_eq!(pool.get(&"b", 3), Some(2));
        pool.sweep(3);
        assert_eq!(pool.get(&"d", 4), Some(1));
        assert_eq!(pool.get(&"e", 4), None, "full");
    }
}
