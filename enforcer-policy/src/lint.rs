//! `enforcer lint`'s analysis: a [`Cluster`] and [`LintOptions`] in, [`Finding`]s out, each
//! naming its rule, object and field. No IO: the CLI loads the objects, adds where each came
//! from, and prints.
//!
//! Workloads are judged by labels, namespaces and container ports: a pod needs no address to be
//! selected (manifests kept in git have none). Only [`Rule::IpBlockCoversPods`] needs addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use k8s_openapi::{
    api::networking::v1::NetworkPolicy, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    cidr::Cidr,
    compile::{Allocations, CompileError, CompileOptions, compile},
    model::{
        Cluster, LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, PodInfo, pod_ips, pod_labels, pod_ref,
        requires_identity, self_set_labels,
    },
    selector::{Labels, Requirement, Selector},
    state::PodRef,
    validate::{
        Block, NamespaceMatch, ParsedPolicy, Peer, Port, Rule as PolicyRule, namespace_of,
        parse_policy,
    },
};

/// The annotation that silences findings about the object that carries it: a comma-separated
/// list of rule codes or names (`L001,shadowed-rule`), or `all`.
pub const ANNOTATION_LINT_IGNORE: &str = "enforcer.dev/lint-ignore";

/// How much a finding matters. Ordered: `Info < Warning < Error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth knowing, most likely intended.
    Info,
    /// Most likely a mistake: the policy does not do what it reads as.
    Warning,
    /// The agent refuses the object, or cannot enforce it as written.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defines [`Rule`] with its code, name, severity and one-line description in one table.
macro_rules! rules {
    ($($variant:ident = $code:literal, $name:literal, $sev:ident, $about:literal;)*) => {
        /// A kind of finding, with a stable code (`L001`) and name (`policy-selects-nothing`);
        /// both are accepted wherever a rule is named. `docs/lint.md` explains each.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Rule { $($variant,)* }

        impl Rule {
            pub const ALL: &'static [Rule] = &[$(Rule::$variant,)*];

            pub fn code(self) -> &'static str {
                match self { $(Rule::$variant => $code,)* }
            }

            pub fn name(self) -> &'static str {
                match self { $(Rule::$variant => $name,)* }
            }

            pub fn severity(self) -> Severity {
                match self { $(Rule::$variant => Severity::$sev,)* }
            }

            /// One line: what the rule finds.
            pub fn about(self) -> &'static str {
                match self { $(Rule::$variant => $about,)* }
            }
        }
    };
}

rules! {
    PolicySelectsNothing = "L001", "policy-selects-nothing", Warning,
        "a NetworkPolicy's podSelector matches no pod of its namespace";
    PeerSelectsNothing = "L002", "peer-selects-nothing", Warning,
        "a from/to peer's namespaceSelector or podSelector matches nothing";
    NamedPortUnmatched = "L003", "named-port-unmatched", Warning,
        "a named port that no pod it applies to declares";
    IpBlockCoversPods = "L004", "ipblock-covers-pods", Warning,
        "an ipBlock covers pod or node addresses: it matches them whatever the selectors say";
    AllowAll = "L005", "allow-all", Info,
        "an explicit allow-all rule (`- {}`)";
    AllowAllDisguised = "L006", "allow-all-disguised", Warning,
        "a rule that allows every peer without reading as such (`from: []`, `namespaceSelector: {}`, `0.0.0.0/0`)";
    ShadowedRule = "L007", "shadowed-rule", Info,
        "a rule that allows nothing another rule for the same pods does not already allow";
    NoDefaultDeny = "L008", "no-default-deny", Warning,
        "a namespace where no policy selects every pod for a direction (no default deny)";
    IdentityUnmatchable = "L009", "identity-unmatchable", Warning,
        "a peer of an identity-requiring policy (or one selecting on reserved labels) that no verified workload can match";
    ReservedLabel = "L010", "reserved-label", Warning,
        "a Pod or Namespace sets an enforcer.dev/ label itself: ignored, only verification gives them";
    InvalidObject = "L011", "invalid-object", Error,
        "an object the agent refuses (an invalid policy isolates the pods it selects, allowing nothing)";
    AddressConflict = "L012", "address-conflict", Error,
        "two pods, or a pod and a Service, claim one address";
    TierPriorityTie = "L013", "tier-priority-tie", Warning,
        "two cluster-wide policies of one tier with the same priority whose subjects overlap: the API leaves their order undefined";
    PeerFailsClosed = "L014", "peer-fails-closed", Error,
        "a cluster-wide policy's peer the agent cannot match (`domainNames`, a field this version does not know): an Accept rule's peer matches nothing, a Deny or Pass rule denies everything";
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

impl FromStr for Rule {
    type Err = String;

    /// A code (`L001`) or a name (`policy-selects-nothing`), case-insensitive.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Rule::ALL
            .iter()
            .copied()
            .find(|r| r.code().eq_ignore_ascii_case(s) || r.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let known: Vec<&str> = Rule::ALL.iter().map(|r| r.code()).collect();
                format!("unknown lint rule {s:?} (known: {})", known.join(", "))
            })
    }
}

/// The object a finding is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `NetworkPolicy`, `Pod`, `Namespace`, `Service`.
    pub kind: String,
    /// `None` for cluster-scoped objects (Namespace).
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &str, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    fn policy(p: &ParsedPolicy) -> Self {
        Self::new("NetworkPolicy", Some(&p.namespace), &p.name)
    }

    fn pod(r: &PodRef) -> Self {
        Self::new("Pod", Some(&r.namespace), &r.name)
    }

    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub fn key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key())
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub object: ObjectRef,
    /// Field path in the object, e.g. `spec.ingress[0].from[1].podSelector`; `None` when the
    /// finding is about the object as a whole.
    pub field: Option<String>,
    pub rule: Rule,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}] {}", self.severity, self.rule, self.object)?;
        if let Some(field) = &self.field {
            write!(f, " {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Which directions every namespace must have a default deny for ([`Rule::NoDefaultDeny`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultDeny {
    pub ingress: bool,
    pub egress: bool,
}

/// What the linter is told besides the objects.
#[derive(Clone, Debug, Default)]
pub struct LintOptions {
    pub require_default_deny: DefaultDeny,
    /// Addresses of the nodes (besides the `status.hostIP(s)` of the pods).
    pub node_ips: Vec<IpAddr>,
    /// `(namespace, name)` of the ServiceAccount objects in the input; a pod's
    /// `spec.serviceAccountName` and each namespace's `default` count too.
    pub service_accounts: BTreeSet<(String, String)>,
    /// As the agent's `--require-identity`: every policy requires identity.
    pub require_identity: bool,
    /// Rules not to report.
    pub disabled: BTreeSet<Rule>,
    /// The peers of the cluster-wide policies that fail closed, as [`crate::tiers::parse`]
    /// reported them ([`Rule::PeerFailsClosed`]).
    pub cluster_policy_warnings: Vec<crate::tiers::TierError>,
}

/// What a lint found, and what it could not judge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LintReport {
    /// Sorted by object, field and rule.
    pub findings: Vec<Finding>,
    /// Checks that were skipped, and why.
    pub notes: Vec<String>,
}

/// A pod as the linter reads it.
struct LintPod<'c> {
    r: PodRef,
    pod: &'c PodInfo,
    /// Its labels as a policy's podSelector sees them (own reserved labels left out).
    labels: Labels,
    /// Its labels as a peer selector sees them once it is verified: plus the reserved labels
    /// its service account would give it.
    verified: Labels,
}

struct Cx<'c> {
    cluster: &'c Cluster,
    opts: &'c LintOptions,
    pods: Vec<LintPod<'c>>,
    /// Every namespace: declared, or used by a pod or policy; with its labels.
    namespaces: BTreeMap<String, Labels>,
    /// `(namespace, service account)` that a verified workload could prove.
    service_accounts: BTreeSet<(String, String)>,
    findings: Vec<Finding>,
}

/// `spec.serviceAccountName` (or the deprecated `spec.serviceAccount`), else `default`.
fn service_account(pod: &PodInfo) -> String {
    pod.service_account
        .as_deref()
        .unwrap_or("default")
        .to_string()
}

/// Pods that policies apply to, address or not: one per name (the first), not host-network
/// (policy never applies to those), not terminated.
fn lint_pods(cluster: &Cluster) -> Vec<LintPod<'_>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for pod in &cluster.pods {
        let r = pod_ref(pod);
        if !seen.insert(r.clone()) || pod.host_network || pod.terminated {
            continue;
        }
        let labels = pod_labels(pod);
        let mut verified = labels.clone();
        verified.insert(LABEL_SERVICE_ACCOUNT.to_string(), service_account(pod));
        verified.insert(LABEL_NAMESPACE.to_string(), r.namespace.clone());
        out.push(LintPod {
            r,
            pod: &**pod,
            labels,
            verified,
        });
    }
    out
}

/// Lints `cluster`.
pub fn lint(cluster: &Cluster, opts: &LintOptions) -> LintReport {
    let pods = lint_pods(cluster);
    let mut names: BTreeSet<String> = cluster
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    names.extend(pods.iter().map(|p| p.r.namespace.clone()));
    names.extend(cluster.policies.iter().map(|p| namespace_of(&p.metadata)));
    let namespaces = names
        .into_iter()
        .map(|n| {
            let labels = cluster.namespace_labels(&n);
            (n, labels)
        })
        .collect::<BTreeMap<_, _>>();
    let mut service_accounts = opts.service_accounts.clone();
    service_accounts.extend(
        namespaces
            .keys()
            .map(|n| (n.clone(), "default".to_string())),
    );
    service_accounts.extend(
        pods.iter()
            .map(|p| (p.r.namespace.clone(), service_account(p.pod))),
    );
    let mut cx = Cx {
        cluster,
        opts,
        pods,
        namespaces,
        service_accounts,
        findings: Vec::new(),
    };
    let mut report = LintReport::default();
    let judge_selectors = !cx.pods.is_empty();
    if !judge_selectors {
        report.notes.push(format!(
            "the input has no pods: {}, {}, {} and the no-pod part of {} were not judged",
            Rule::PolicySelectsNothing,
            Rule::PeerSelectsNothing,
            Rule::NamedPortUnmatched,
            Rule::IdentityUnmatchable
        ));
    }
    let parsed = cx.policies();
    for (raw, p) in &parsed {
        cx.policy(raw, p, judge_selectors);
    }
    cx.shadowed(&parsed);
    cx.default_deny(&parsed);
    cx.reserved_labels();
    cx.compile_errors();
    cx.cluster_policies(judge_selectors);
    let mut findings = std::mem::take(&mut cx.findings);
    findings.retain(|f| !opts.disabled.contains(&f.rule) && !ignored_by_annotation(cluster, f));
    findings.sort();
    findings.dedup();
    report.findings = findings;
    report
}

/// Whether the finding's object carries [`ANNOTATION_LINT_IGNORE`] naming its rule (or `all`).
fn ignored_by_annotation(cluster: &Cluster, f: &Finding) -> bool {
    let o = &f.object;
    let ns = o.namespace.as_deref().unwrap_or_default();
    let same = |m: &ObjectMeta, namespaced: bool| {
        m.name.as_deref() == Some(o.name.as_str()) && (!namespaced || namespace_of(m) == ns)
    };
    let metas: Vec<&ObjectMeta> = match o.kind.as_str() {
        "NetworkPolicy" => cluster.policies.iter().map(|p| &p.metadata).collect(),
        // The compact pods keep no annotations: a Pod's finding is silenced by --disable.
        "Service" => cluster.services.iter().map(|p| &p.metadata).collect(),
        "Namespace" => cluster.namespaces.iter().map(|p| &p.metadata).collect(),
        _ => Vec::new(),
    };
    let meta = metas.into_iter().find(|m| same(m, o.kind != "Namespace"));
    meta.and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_LINT_IGNORE))
        .is_some_and(|v| {
            v.split(',').map(str::trim).any(|id| {
                id.eq_ignore_ascii_case("all")
                    || id.eq_ignore_ascii_case(f.rule.code())
                    || id.eq_ignore_ascii_case(f.rule.name())
            })
        })
}

/// `ingress`/`egress` and the name of its peer list.
fn direction(ingress: bool) -> (&'static str, &'static str) {
    if ingress {
        ("ingress", "from")
    } else {
        ("egress", "to")
    }
}

/// The values a selector allows for `key`, when it pins it down (`matchLabels` or `In`).
fn pinned_values<'s>(s: &'s Selector, key: &str) -> Option<BTreeSet<&'s str>> {
    let mut out: Option<BTreeSet<&str>> = None;
    for r in &s.requirements {
        if let Requirement::In(k, vs) = r
            && k == key
        {
            let these: BTreeSet<&str> = vs.iter().map(String::as_str).collect();
            out = Some(match out {
                Some(prev) => prev.intersection(&these).copied().collect(),
                None => these,
            });
        }
    }
    out
}

fn list(items: &[String], max: usize) -> String {
    let mut s = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        s.push_str(&format!(" and {} more", items.len() - max));
    }
    s
}

fn protocol_label(p: u8) -> String {
    crate::explain::protocol_label(p)
}

impl<'c> Cx<'c> {
    fn push(
        &mut self,
        rule: Rule,
        object: ObjectRef,
        field: Option<String>,
        message: impl Into<String>,
    ) {
        self.findings.push(Finding {
            object,
            field,
            rule,
            severity: rule.severity(),
            message: message.into(),
        });
    }

    /// The policies, first object of each namespace/name, each parsed; the invalid ones are
    /// reported and left out.
    fn policies(&mut self) -> Vec<(&'c NetworkPolicy, ParsedPolicy)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for raw in &self.cluster.policies {
            let ns = namespace_of(&raw.metadata);
            let name = raw.metadata.name.clone().unwrap_or_default();
            if !seen.insert((ns.clone(), name.clone())) {
                continue;
            }
            match parse_policy(raw) {
                Ok(mut p) => {
                    p.require_identity |= requires_identity(raw, self.opts.require_identity);
                    out.push((&**raw, p));
                }
                Err(errors) => {
                    let refusal = crate::validate::refusal(raw, errors);
                    for e in &refusal.errors {
                        self.push(
                            Rule::InvalidObject,
                            ObjectRef::new("NetworkPolicy", Some(&ns), &name),
                            Some(e.field.clone()),
                            format!(
                                "{}; the agent refuses the policy, {}",
                                e.message,
                                refusal.consequence()
                            ),
                        );
                    }
                }
            }
        }
        out
    }

    fn namespace_matches(&self, m: &NamespaceMatch, ns: &str) -> bool {
        match m {
            NamespaceMatch::Own(own) => own == ns,
            NamespaceMatch::Selector(s) => self.namespaces.get(ns).is_some_and(|l| s.matches(l)),
        }
    }

    /// The pods a selector peer matches, once verified.
    fn peer_pods(&self, namespaces: &NamespaceMatch, pods: Option<&Selector>) -> Vec<&LintPod<'c>> {
        self.pods
            .iter()
            .filter(|p| self.namespace_matches(namespaces, &p.r.namespace))
            .filter(|p| pods.is_none_or(|s| s.matches(&p.verified)))
            .collect()
    }

    fn policy(&mut self, raw: &NetworkPolicy, p: &ParsedPolicy, judge_selectors: bool) {
        let object = ObjectRef::policy(p);
        let selected: Vec<usize> = (0..self.pods.len())
            .filter(|&i| {
                let pod = &self.pods[i];
                pod.r.namespace == p.namespace && p.pod_selector.matches(&pod.labels)
            })
            .collect();
        if judge_selectors && selected.is_empty() {
            self.push(
                Rule::PolicySelectsNothing,
                object.clone(),
                Some("spec.podSelector".into()),
                format!(
                    "matches no pod of namespace {}: the policy enforces nothing",
                    p.namespace
                ),
            );
        }
        let spec = raw.spec.as_ref();
        for ingress in [true, false] {
            let rules = if ingress { &p.ingress } else { &p.egress };
            let Some(rules) = rules else { continue };
            let (dir, peer_field) = direction(ingress);
            for (i, rule) in rules.iter().enumerate() {
                let base = format!("spec.{dir}[{i}]");
                let empty_list = spec.is_some_and(|s| {
                    if ingress {
                        s.ingress
                            .as_ref()
                            .and_then(|r| r.get(i))
                            .and_then(|r| r.from.as_ref())
                    } else {
                        s.egress
                            .as_ref()
                            .and_then(|r| r.get(i))
                            .and_then(|r| r.to.as_ref())
                    }
                    .is_some_and(Vec::is_empty)
                });
                let everyone = if ingress {
                    "every source"
                } else {
                    "every destination"
                };
                if empty_list {
                    self.push(
                        Rule::AllowAllDisguised,
                        object.clone(),
                        Some(format!("{base}.{peer_field}")),
                        format!(
                            "`{peer_field}: []` is an empty list, which the API reads as no restriction: the rule allows {everyone}{}; write `{peer_field}` out (or the rule as `- {{}}`) if that is meant",
                            ports_suffix(rule)
                        ),
                    );
                } else if rule.peers.is_none() && rule.ports.is_none() {
                    self.push(
                        Rule::AllowAll,
                        object.clone(),
                        Some(base.clone()),
                        format!("allows {everyone} on every port (an explicit allow-all rule)"),
                    );
                }
                self.peers(p, &object, ingress, &base, rule, judge_selectors);
                if judge_selectors {
                    self.named_ports(&object, ingress, &base, rule, &selected);
                }
            }
        }
    }

    fn peers(
        &mut self,
        p: &ParsedPolicy,
        object: &ObjectRef,
        ingress: bool,
        base: &str,
        rule: &PolicyRule,
        judge_selectors: bool,
    ) {
        let (_, peer_field) = direction(ingress);
        for (j, peer) in rule.peers.iter().flatten().enumerate() {
            let at = format!("{base}.{peer_field}[{j}]");
            match peer {
                Peer::Block(b) => self.block(object, &at, b, rule),
                Peer::Pods { namespaces, pods } => {
                    let every_ns =
                        matches!(namespaces, NamespaceMatch::Selector(s) if s.is_everything());
                    if every_ns && pods.as_ref().is_none_or(Selector::is_everything) {
                        let whom = if p.require_identity {
                            "every verified pod of every namespace"
                        } else {
                            "every pod of every namespace"
                        };
                        self.push(
                            Rule::AllowAllDisguised,
                            object.clone(),
                            Some(format!("{at}.namespaceSelector")),
                            format!(
                                "`namespaceSelector: {{}}` without a podSelector selects {whom}{}",
                                ports_suffix(rule)
                            ),
                        );
                    }
                    let unknown_identity =
                        self.unknown_identity(p, object, &at, namespaces, pods.as_ref());
                    if unknown_identity || !judge_selectors {
                        continue;
                    }
                    self.peer_matches_something(p, object, &at, namespaces, pods.as_ref());
                }
            }
        }
    }

    /// [`Rule::PeerSelectsNothing`] (or [`Rule::IdentityUnmatchable`] when the policy requires
    /// identity): the peer's namespaces, then its pods.
    fn peer_matches_something(
        &mut self,
        p: &ParsedPolicy,
        object: &ObjectRef,
        at: &str,
        namespaces: &NamespaceMatch,
        pods: Option<&Selector>,
    ) {
        let rule = if p.require_identity {
            Rule::IdentityUnmatchable
        } else {
            Rule::PeerSelectsNothing
        };
        if let NamespaceMatch::Selector(_) = namespaces
            && !self
                .namespaces
                .keys()
                .any(|n| self.namespace_matches(namespaces, n))
        {
            self.push(
                rule,
                object.clone(),
                Some(format!("{at}.namespaceSelector")),
                "matches no namespace: the peer allows nothing",
            );
            return;
        }
        if !self.peer_pods(namespaces, pods).is_empty() {
            return;
        }
        let field = if pods.is_some() {
            "podSelector"
        } else {
            "namespaceSelector"
        };
        let where_ = match namespaces {
            NamespaceMatch::Own(ns) => format!("namespace {ns}"),
            NamespaceMatch::Selector(_) => "the namespaces it selects".to_string(),
        };
        let message = if p.require_identity {
            format!(
                "matches no pod in {where_}, even verified (its service account's reserved labels added): no verified workload can be this peer"
            )
        } else {
            format!("matches no pod in {where_}: the peer allows nothing")
        };
        self.push(rule, object.clone(), Some(format!("{at}.{field}")), message);
    }

    /// A peer pinning `enforcer.dev/serviceaccount` (or `enforcer.dev/namespace`) to values no
    /// workload of the input can prove: [`Rule::IdentityUnmatchable`]. Returns whether reported.
    fn unknown_identity(
        &mut self,
        p: &ParsedPolicy,
        object: &ObjectRef,
        at: &str,
        namespaces: &NamespaceMatch,
        pods: Option<&Selector>,
    ) -> bool {
        let Some(pods) = pods else { return false };
        let in_scope: Vec<&String> = self
            .namespaces
            .keys()
            .filter(|n| self.namespace_matches(namespaces, n))
            .collect();
        let why_verified = if p.require_identity {
            "the policy requires identity"
        } else {
            "reserved labels come only from a verified identity"
        };
        if let Some(wanted) = pinned_values(pods, LABEL_NAMESPACE) {
            let known = wanted.iter().any(|w| in_scope.iter().any(|n| n == w));
            if !known {
                let wanted: Vec<String> = wanted.iter().map(|s| format!("{s:?}")).collect();
                self.push(
                    Rule::IdentityUnmatchable,
                    object.clone(),
                    Some(format!("{at}.podSelector")),
                    format!(
                        "{LABEL_NAMESPACE} in [{}]: no such namespace among those the peer looks in ({why_verified})",
                        wanted.join(", ")
                    ),
                );
                return true;
            }
        }
        if let Some(wanted) = pinned_values(pods, LABEL_SERVICE_ACCOUNT) {
            let known = self
                .service_accounts
                .iter()
                .any(|(ns, sa)| wanted.contains(sa.as_str()) && in_scope.contains(&ns));
            if !known {
                let wanted: Vec<String> = wanted.iter().map(|s| format!("{s:?}")).collect();
                let where_ = match namespaces {
                    NamespaceMatch::Own(ns) => format!("namespace {ns}"),
                    NamespaceMatch::Selector(_) => "the namespaces the peer selects".to_string(),
                };
                self.push(
                    Rule::IdentityUnmatchable,
                    object.clone(),
                    Some(format!("{at}.podSelector")),
                    format!(
                        "{LABEL_SERVICE_ACCOUNT} in [{}]: no ServiceAccount object nor pod serviceAccountName of that name in {where_}, so no workload can prove it ({why_verified})",
                        wanted.join(", ")
                    ),
                );
                return true;
            }
        }
        false
    }

    /// [`Rule::AllowAllDisguised`] for a whole family, [`Rule::IpBlockCoversPods`] otherwise.
    fn block(&mut self, object: &ObjectRef, at: &str, b: &Block, rule: &PolicyRule) {
        if b.cidr.prefix_len() == 0 && b.except.is_empty() {
            let family = if b.cidr.network().is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            self.push(
                Rule::AllowAllDisguised,
                object.clone(),
                Some(format!("{at}.ipBlock.cidr")),
                format!(
                    "{} is every {family} address, pods and nodes included, whatever the other peers' selectors say{}",
                    b.cidr,
                    ports_suffix(rule)
                ),
            );
            return;
        }
        let covered: Vec<String> = self
            .pods
            .iter()
            .filter(|p| pod_ips(p.pod).iter().any(|ip| b.contains(*ip)))
            .map(|p| p.r.to_string())
            .collect();
        let mut nodes: BTreeSet<IpAddr> = self.opts.node_ips.iter().copied().collect();
        for p in &self.cluster.pods {
            nodes.extend(p.host_ips.iter().copied());
        }
        let nodes: Vec<String> = nodes
            .into_iter()
            .filter(|ip| b.contains(*ip))
            .map(|ip| ip.to_string())
            .collect();
        if covered.is_empty() && nodes.is_empty() {
            return;
        }
        let mut what = Vec::new();
        if !covered.is_empty() {
            what.push(format!("pods {}", list(&covered, 5)));
        }
        if !nodes.is_empty() {
            what.push(format!("node addresses {}", list(&nodes, 5)));
        }
        self.push(
            Rule::IpBlockCoversPods,
            object.clone(),
            Some(format!("{at}.ipBlock")),
            format!(
                "{} covers {}: they match by address, whatever the selectors of this or other rules say; use a pod or namespace selector for pods, or add them to except",
                block_text(b),
                what.join(" and ")
            ),
        );
    }

    fn named_ports(
        &mut self,
        object: &ObjectRef,
        ingress: bool,
        base: &str,
        rule: &PolicyRule,
        selected: &[usize],
    ) {
        // Ingress: the port is named on the destination, the selected pods. Egress: on each
        // peer pod, every pod when a peer is an address range or the rule has no peers.
        let candidates: Vec<&LintPod<'c>> = if ingress {
            selected.iter().map(|&i| &self.pods[i]).collect()
        } else {
            match &rule.peers {
                Some(peers) if peers.iter().all(|x| matches!(x, Peer::Pods { .. })) => {
                    let mut out: Vec<&LintPod<'c>> = Vec::new();
                    for peer in peers {
                        if let Peer::Pods { namespaces, pods } = peer {
                            for pod in self.peer_pods(namespaces, pods.as_ref()) {
                                if !out.iter().any(|o| o.r == pod.r) {
                                    out.push(pod);
                                }
                            }
                        }
                    }
                    out
                }
                _ => self.pods.iter().collect(),
            }
        };
        if candidates.is_empty() {
            // Reported already: the policy or its peers select nothing.
            return;
        }
        let whom = if ingress {
            "the pods the policy selects"
        } else {
            "the pods this rule's peers select"
        };
        let mut found = Vec::new();
        for (k, port) in rule.ports.iter().flatten().enumerate() {
            let Port::Named(proto, name) = port else {
                continue;
            };
            let declared: Vec<u8> = candidates
                .iter()
                .flat_map(|c| c.pod.named_ports.iter().cloned())
                .filter(|(n, _, _)| n == name)
                .map(|(_, pr, _)| pr)
                .collect();
            if declared.contains(proto) {
                continue;
            }
            let others: BTreeSet<String> = declared.into_iter().map(protocol_label).collect();
            let hint = if others.is_empty() {
                String::new()
            } else {
                format!(
                    " (they name it for {} only)",
                    others.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            found.push((
                format!("{base}.ports[{k}].port"),
                format!(
                    "no container port named {name:?} for {} on {whom}{hint}: the port allows nothing on them",
                    protocol_label(*proto)
                ),
            ));
        }
        for (field, message) in found {
            self.push(
                Rule::NamedPortUnmatched,
                object.clone(),
                Some(field),
                message,
            );
        }
    }

    /// [`Rule::ShadowedRule`]: within a policy, and across policies of one namespace with the
    /// same podSelector (and the same identity requirement and audit mode).
    fn shadowed(&mut self, parsed: &[(&NetworkPolicy, ParsedPolicy)]) {
        for (pi, (p_raw, p)) in parsed.iter().enumerate() {
            for ingress in [true, false] {
                let (dir, _) = direction(ingress);
                let rules_of = |q: &ParsedPolicy| -> Vec<PolicyRule> {
                    if ingress {
                        q.ingress.clone()
                    } else {
                        q.egress.clone()
                    }
                    .unwrap_or_default()
                };
                let mine = rules_of(p);
                for (i, r) in mine.iter().enumerate() {
                    // Candidates in order: this policy's rules, then the other policies'.
                    let mut by: Option<String> = None;
                    for (k, other) in mine.iter().enumerate() {
                        if k != i && covers(other, r) && (!covers(r, other) || k < i) {
                            by = Some(format!("spec.{dir}[{k}] of the same policy"));
                            break;
                        }
                    }
                    if by.is_none() {
                        for (qi, (q_raw, q)) in parsed.iter().enumerate() {
                            // An audit policy's rule allows nothing that is enforced, and an
                            // enforced rule decides what an audit policy would: neither shadows
                            // the other.
                            if qi == pi
                                || q.namespace != p.namespace
                                || q.pod_selector != p.pod_selector
                                || q.require_identity != p.require_identity
                                || self.cluster.policy_audits(q_raw, false)
                                    != self.cluster.policy_audits(p_raw, false)
                            {
                                continue;
                            }
                            let theirs = rules_of(q);
                            if let Some(k) = theirs
                                .iter()
                                .position(|o| covers(o, r) && (!covers(r, o) || qi < pi))
                            {
                                by = Some(format!(
                                    "spec.{dir}[{k}] of NetworkPolicy {}/{} (same podSelector)",
                                    q.namespace, q.name
                                ));
                                break;
                            }
                        }
                    }
                    if let Some(by) = by {
                        self.push(
                            Rule::ShadowedRule,
                            ObjectRef::policy(p),
                            Some(format!("spec.{dir}[{i}]")),
                            format!(
                                "allows nothing that {by} does not already allow: remove it, or narrow the other"
                            ),
                        );
                    }
                }
            }
        }
    }

    /// [`Rule::NoDefaultDeny`]: a namespace needs a policy selecting all its pods for each
    /// required direction, that does not allow everything back.
    fn default_deny(&mut self, parsed: &[(&NetworkPolicy, ParsedPolicy)]) {
        let want = self.opts.require_default_deny;
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        for ns in names {
            for (ingress, required) in [(true, want.ingress), (false, want.egress)] {
                if !required {
                    continue;
                }
                let has = parsed.iter().any(|(_, p)| {
                    let rules = if ingress { &p.ingress } else { &p.egress };
                    p.namespace == ns
                        && p.pod_selector.is_everything()
                        && rules.as_ref().is_some_and(|r| {
                            !r.iter().any(|r| r.peers.is_none() && r.ports.is_none())
                        })
                });
                if has {
                    continue;
                }
                let (dir, _) = direction(ingress);
                let ty = if ingress { "Ingress" } else { "Egress" };
                let open = if ingress {
                    "accepts connections from anywhere"
                } else {
                    "may connect anywhere"
                };
                self.push(
                    Rule::NoDefaultDeny,
                    ObjectRef::new("Namespace", None, &ns),
                    None,
                    format!(
                        "no policy selects every pod of namespace {ns} for {dir}: a pod no policy selects {open}; add a default deny (podSelector: {{}}, policyTypes: [{ty}])"
                    ),
                );
            }
        }
    }

    fn reserved_labels(&mut self) {
        for l in self_set_labels(self.cluster) {
            let object = if l.kind == "Pod" {
                match l.object.split_once('/') {
                    Some((ns, name)) => ObjectRef::new("Pod", Some(ns), name),
                    None => ObjectRef::new("Pod", None, &l.object),
                }
            } else {
                ObjectRef::new(l.kind, None, &l.object)
            };
            self.push(
                Rule::ReservedLabel,
                object,
                Some(format!("metadata.labels.{}", l.key)),
                format!(
                    "{}={:?} is ignored: labels under enforcer.dev/ come only from a verified identity, never from the object",
                    l.key, l.value
                ),
            );
        }
    }

    /// What the compiler refuses besides invalid policies (reported with their fields already).
    /// The cluster-wide policies: refused ones (L011, enforced as their stand-in), peers that
    /// fail closed (L014), and same-priority ties of overlapping subjects (L013).
    fn cluster_policies(&mut self, judge_selectors: bool) {
        let object = |kind: &str, name: &str| ObjectRef::new(kind, None, name);
        let (cluster, opts) = (self.cluster, self.opts);
        for p in &cluster.cluster_policies {
            for e in &p.refused {
                self.push(
                    Rule::InvalidObject,
                    object(p.kind.as_str(), &p.name),
                    Some(e.field.clone()),
                    format!(
                        "{}; refused: enforced as its fail-closed stand-in, which denies every direction it has rules for, for its subject",
                        e.message
                    ),
                );
            }
        }
        for w in &opts.cluster_policy_warnings {
            let (kind, name) = w.object.split_once('/').unwrap_or((&w.object, ""));
            self.push(
                Rule::PeerFailsClosed,
                object(kind, name),
                Some(w.field.clone()),
                w.message.clone(),
            );
        }
        let mut policies: Vec<&crate::tiers::ClusterPolicy> =
            cluster.cluster_policies.iter().map(|p| &**p).collect();
        policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let selected = |p: &crate::tiers::ClusterPolicy, pods: &[LintPod<'_>]| -> Vec<String> {
            pods.iter()
                .filter(|lp| {
                    let ns = self
                        .namespaces
                        .get(&lp.r.namespace)
                        .cloned()
                        .unwrap_or_default();
                    p.subject.selects(lp.pod, &ns)
                })
                .map(|lp| lp.r.to_string())
                .collect()
        };
        let mut ties = Vec::new();
        for (i, later) in policies.iter().enumerate() {
            // Every earlier policy at the same place in the order (it sorts by name first).
            for first in policies[..i]
                .iter()
                .filter(|f| (f.tier, f.priority) == (later.tier, later.priority))
            {
                let both = if judge_selectors {
                    let of_first = selected(first, &self.pods);
                    let of_later = selected(later, &self.pods);
                    let shared: Vec<String> = of_first
                        .into_iter()
                        .filter(|r| of_later.contains(r))
                        .collect();
                    if shared.is_empty() {
                        continue;
                    }
                    format!("both select {}", list(&shared, 3))
                } else {
                    "the input has no pods to tell whether their subjects overlap".to_string()
                };
                ties.push((
                    object(later.kind.as_str(), &later.name),
                    format!(
                        "{} and {} both have priority {} in the {} tier ({both}): the API leaves their order undefined; this agent applies {} first (by name)",
                        first.display_name(),
                        later.display_name(),
                        later.priority,
                        later.tier,
                        first.display_name()
                    ),
                ));
            }
        }
        for (o, message) in ties {
            self.push(
                Rule::TierPriorityTie,
                o,
                Some("spec.priority".into()),
                message,
            );
        }
    }

    fn compile_errors(&mut self) {
        let opts = CompileOptions {
            node_ips: self.opts.node_ips.clone(),
            require_identity: self.opts.require_identity,
            ..CompileOptions::default()
        };
        let compiled = compile(self.cluster, &opts, &mut Allocations::new());
        for e in compiled.errors {
            match e {
                // Of one node's addresses and capacity, not of the manifests.
                CompileError::Policy(_)
                | CompileError::TooManyEndpoints { .. }
                | CompileError::NodeJudgedApart { .. } => {}
                CompileError::DuplicatePolicy { namespace, name } => self.push(
                    Rule::InvalidObject,
                    ObjectRef::new("NetworkPolicy", Some(&namespace), &name),
                    None,
                    "defined more than once: the first definition is used",
                ),
                CompileError::DuplicateAddress { ip, kept, dropped } => self.push(
                    Rule::AddressConflict,
                    ObjectRef::pod(&dropped),
                    Some("status.podIPs".into()),
                    format!("address {ip} is claimed by pods {kept} and {dropped}; it resolves to {kept}"),
                ),
                CompileError::Service(e) => {
                    let (ns, name) = e.service.split_once('/').unwrap_or(("default", &e.service));
                    self.push(
                        Rule::InvalidObject,
                        ObjectRef::new("Service", Some(ns), name),
                        Some(e.field.clone()),
                        format!("{}; left out", e.message),
                    );
                }
                CompileError::ServiceAddress {
                    ip,
                    service,
                    frontend,
                    owner,
                } => {
                    let (ns, name) = service.split_once('/').unwrap_or(("default", &service));
                    self.push(
                        Rule::AddressConflict,
                        ObjectRef::new("Service", Some(ns), name),
                        None,
                        format!("{frontend} {ip} is also the address of {owner}; it resolves to {owner}, not to the Service"),
                    );
                }
            }
        }
    }
}

fn block_text(b: &Block) -> String {
    if b.except.is_empty() {
        format!("ipBlock {}", b.cidr)
    } else {
        let except: Vec<String> = b.except.iter().map(ToString::to_string).collect();
        format!("ipBlock {} (except {})", b.cidr, except.join(", "))
    }
}

/// ` on ports ...` when the rule has ports.
fn ports_suffix(rule: &PolicyRule) -> String {
    match &rule.ports {
        None => String::new(),
        Some(ports) => {
            let ports: Vec<String> = ports
                .iter()
                .map(|p| match p {
                    Port::All(pr) => format!("every {} port", protocol_label(*pr)),
                    Port::Range(pr, a, b) if a == b => format!("{a}/{}", protocol_label(*pr)),
                    Port::Range(pr, a, b) => format!("{a}-{b}/{}", protocol_label(*pr)),
                    Port::Named(pr, n) => format!("{n:?}/{}", protocol_label(*pr)),
                })
                .collect();
            format!(" on {}", ports.join(", "))
        }
    }
}

/// Whether rule `a` allows everything rule `b` allows (same pods, same direction). Sound, not
/// complete: `true` only when every peer and port of `b` is within one of `a`'s.
pub fn covers(a: &PolicyRule, b: &PolicyRule) -> bool {
    let peers = match (&a.peers, &b.peers) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pb.iter().all(|y| pa.iter().any(|x| peer_covers(x, y))),
    };
    let ports = match (&a.ports, &b.ports) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pb.iter().all(|y| pa.iter().any(|x| port_covers(x, y))),
    };
    peers && ports
}

/// Whether selector `a` matches everything `b` does: `a`'s requirements are among `b`'s.
fn selector_covers(a: &Selector, b: &Selector) -> bool {
    a.requirements.iter().all(|r| b.requirements.contains(r))
}

fn peer_covers(a: &Peer, b: &Peer) -> bool {
    match (a, b) {
        (Peer::Block(a), Peer::Block(b)) => block_covers(a, b),
        (
            Peer::Pods {
                namespaces: na,
                pods: pa,
            },
            Peer::Pods {
                namespaces: nb,
                pods: pb,
            },
        ) => {
            let ns = match (na, nb) {
                (NamespaceMatch::Own(x), NamespaceMatch::Own(y)) => x == y,
                (NamespaceMatch::Selector(x), NamespaceMatch::Selector(y)) => selector_covers(x, y),
                (NamespaceMatch::Selector(x), NamespaceMatch::Own(_)) => x.is_everything(),
                (NamespaceMatch::Own(_), NamespaceMatch::Selector(_)) => false,
            };
            let pods = match (pa, pb) {
                (None, _) => true,
                (Some(x), None) => x.is_everything(),
                (Some(x), Some(y)) => selector_covers(x, y),
            };
            ns && pods
        }
        _ => false,
    }
}

/// Whether every address of `b` is in `a`.
fn block_covers(a: &Block, b: &Block) -> bool {
    let overlaps = |x: &Cidr, y: &Cidr| x.covers(y) || y.covers(x);
    a.cidr.covers(&b.cidr)
        && a.except.iter().all(|e| {
            // Each hole of `a` that touches `b` must be a hole of `b` too.
            !overlaps(e, &b.cidr) || b.except.iter().any(|be| be.covers(e))
        })
}

fn port_covers(a: &Port, b: &Port) -> bool {
    match (a, b) {
        (Port::All(x), Port::All(y) | Port::Range(y, ..) | Port::Named(y, _)) => x == y,
        (Port::Range(x, lo, hi), Port::Range(y, l2, h2)) => x == y && lo <= l2 && h2 <= hi,
        (Port::Named(x, n), Port::Named(y, m)) => x == y && n == m,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use proptest::prelude::*;

    use super::*;
    use crate::{
        evaluator,
        model::shared,
        tests::{cluster_strategy, fixtures::*, flow_peers, flows_strategy, opts},
        validate::parse_policy,
    };

    fn codes(report: &LintReport) -> Vec<(&'static str, String, Option<String>)> {
        report
            .findings
            .iter()
            .map(|f| (f.rule.code(), f.object.key(), f.field.clone()))
            .collect()
    }

    fn cluster(policies: Vec<NetworkPolicy>) -> Cluster {
        Cluster {
            namespaces: shared(vec![namespace("x", &[("team", "blue")])]),
            pods: shared(vec![
                pod("x", "a", &[("app", "a")], &[], "n", &[("http", "TCP", 80)]),
                pod("x", "b", &[("app", "b")], &[], "n", &[]),
            ]),
            policies: shared(policies),
            ..Cluster::default()
        }
    }

    /// Every rule is named by its code and its name, and the codes are distinct.
    #[test]
    fn rules_parse_from_code_or_name() {
        let codes: BTreeSet<&str> = Rule::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Rule::ALL.len());
        for r in Rule::ALL {
            assert_eq!(r.code().parse::<Rule>(), Ok(*r));
            assert_eq!(r.name().to_uppercase().parse::<Rule>(), Ok(*r));
        }
        assert!("L999".parse::<Rule>().unwrap_err().contains("L001"));
    }

    /// Disabled rules and the per-object annotation silence findings; other objects keep theirs.
    #[test]
    fn disabled_rules_and_the_ignore_annotation_silence_findings() {
        let p = |name: &str| {
            policy(
                "x",
                name,
                Some(sel(&[("app", "nope")])),
                None,
                Some(vec![]),
                None,
            )
        };
        let mut quiet = p("quiet");
        quiet.metadata.annotations = Some(
            [(
                ANNOTATION_LINT_IGNORE.to_string(),
                " l001 , shadowed-rule".to_string(),
            )]
            .into(),
        );
        let c = cluster(vec![p("loud"), quiet]);
        let r = lint(&c, &LintOptions::default());
        assert_eq!(
            codes(&r),
            [(
                "L001",
                "x/loud".to_string(),
                Some("spec.podSelector".to_string())
            )]
        );
        let opts = LintOptions {
            disabled: [Rule::PolicySelectsNothing].into(),
            ..LintOptions::default()
        };
        assert!(lint(&c, &opts).findings.is_empty());
    }

    /// Without pods, nothing is said about selectors matching nothing, and a note says so.
    #[test]
    fn without_pods_selectors_are_not_judged() {
        let mut c = cluster(vec![policy(
            "x",
            "p",
            Some(sel(&[("app", "nope")])),
            None,
            None,
            None,
        )]);
        c.pods.clear();
        let r = lint(&c, &LintOptions::default());
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert!(r.notes[0].contains("no pods"), "{:?}", r.notes);
    }

    #[test]
    fn covers_is_about_peers_and_ports() {
        let rule = |peers: Option<Vec<Peer>>, ports: Option<Vec<Port>>| PolicyRule { peers, ports };
        let own = |s: Option<Selector>| Peer::Pods {
            namespaces: NamespaceMatch::Own("x".into()),
            pods: s,
        };
        let app = |v: &str| Selector {
            requirements: vec![Requirement::In("app".into(), vec![v.into()])],
        };
        let both = Selector {
            requirements: vec![
                Requirement::In("app".into(), vec!["a".into()]),
                Requirement::Exists("tier".into()),
            ],
        };
        let r80 = Port::Range(6, 80, 80);
        let r7090 = Port::Range(6, 70, 90);
        let a = rule(Some(vec![own(Some(app("a")))]), Some(vec![r7090.clone()]));
        let b = rule(Some(vec![own(Some(both))]), Some(vec![r80.clone()]));
        assert!(covers(&a, &b) && !covers(&b, &a));
        assert!(covers(&rule(None, None), &a));
        assert!(!covers(&a, &rule(None, Some(vec![r80.clone()]))));
        assert!(!covers(&rule(Some(vec![own(Some(app("b")))]), None), &b));
        assert!(!covers(
            &rule(None, Some(vec![Port::Range(17, 0, 65535)])),
            &b
        ));
        assert!(covers(&rule(None, Some(vec![Port::All(6)])), &b));
        let block = |c: &str, e: &[&str]| {
            Peer::Block(Block {
                cidr: c.parse().unwrap(),
                except: e.iter().map(|s| s.parse().unwrap()).collect(),
            })
        };
        let wide = rule(Some(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), None);
        assert!(covers(
            &wide,
            &rule(Some(vec![block("10.2.0.0/16", &[])]), None)
        ));
        assert!(!covers(
            &wide,
            &rule(Some(vec![block("10.0.0.0/9", &[])]), None)
        ));
        assert!(covers(
            &wide,
            &rule(Some(vec![block("10.0.0.0/9", &["10.1.0.0/16"])]), None)
        ));
    }

    /// The evaluator's verdicts over every policy pod, peer and flow, both directions.
    fn verdicts(c: &Cluster, flows: &[(u8, u16)]) -> Vec<bool> {
        let o = opts();
        let mut out = Vec::new();
        for (r, _) in c.policy_pods() {
            for ip in flow_peers() {
                for &(proto, port) in flows {
                    for ingress in [true, false] {
                        out.push(
                            evaluator::direction_verdict(c, &o, &r, ingress, ip, proto, port)
                                .allowed(),
                        );
                    }
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// A rule reported shadowed can be removed without changing any verdict of the
        /// reference evaluator.
        #[test]
        fn removing_a_shadowed_rule_changes_no_verdict(
            c in cluster_strategy(),
            flows in flows_strategy(),
        ) {
            let report = lint(&c, &LintOptions::default());
            let before = verdicts(&c, &flows);
            for f in report.findings.iter().filter(|f| f.rule == Rule::ShadowedRule) {
                let field = f.field.as_deref().unwrap();
                let (dir, index) = field
                    .strip_prefix("spec.")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.split_once('['))
                    .unwrap();
                let index: usize = index.parse().unwrap();
                let mut removed = c.clone();
                let at = removed
                    .policies
                    .iter()
                    .position(|p| {
                        p.metadata.name.as_deref() == Some(f.object.name.as_str())
                            && namespace_of(&p.metadata) == *f.object.namespace.as_ref().unwrap()
                    })
                    .unwrap();
                let p = Arc::make_mut(&mut removed.policies[at]);
                let parsed = parse_policy(p).unwrap();
                let spec = p.spec.as_mut().unwrap();
                // Keep the directions explicit: removing the last egress rule must not change
                // which directions the policy isolates.
                let mut types = Vec::new();
                if parsed.ingress.is_some() {
                    types.push("Ingress".to_string());
                }
                if parsed.egress.is_some() {
                    types.push("Egress".to_string());
                }
                spec.policy_types = Some(types);
                if dir == "ingress" {
                    spec.ingress.as_mut().unwrap().remove(index);
                } else {
                    spec.egress.as_mut().unwrap().remove(index);
                }
                prop_assert_eq!(&before, &verdicts(&removed, &flows), "{}", f);
            }
        }

        /// Linting never panics, and every finding's rule carries its own severity.
        #[test]
        fn findings_carry_their_rule_s_severity(c in cluster_strategy()) {
            let opts = LintOptions {
                require_default_deny: DefaultDeny { ingress: true, egress: true },
                ..LintOptions::default()
            };
            for f in lint(&c, &opts).findings {
                prop_assert_eq!(f.severity, f.rule.severity());
            }
        }
    }

    fn cluster_policy(
        v: serde_json::Value,
    ) -> (crate::tiers::ClusterPolicy, Vec<crate::tiers::TierError>) {
        let parsed = crate::tiers::parse(&v).unwrap();
        (parsed.policy, parsed.warnings)
    }

    fn cnp(name: &str, tier: &str, priority: u32, subject: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority, "subject": subject,
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
        })
    }

    fn with_cluster_policies(values: Vec<serde_json::Value>) -> (Cluster, LintOptions) {
        let mut c = cluster(Vec::new());
        let mut opts = LintOptions::default();
        for v in values {
            let (p, w) = cluster_policy(v);
            c.cluster_policies.push(std::sync::Arc::new(p));
            opts.cluster_policy_warnings.extend(w);
        }
        (c, opts)
    }

    fn only(report: &LintReport, rule: Rule) -> Vec<&Finding> {
        report.findings.iter().filter(|f| f.rule == rule).collect()
    }

    /// Two policies of one tier at one priority that select a pod in common are a tie: the
    /// later by name is reported, naming the one applied first; disjoint subjects, another
    /// tier or another priority are not.
    #[test]
    fn same_priority_ties_with_overlapping_subjects_are_reported() {
        let app = |a: &str| serde_json::json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": a}}}});
        let (c, opts) = with_cluster_policies(vec![
            cnp("b-all", "Admin", 10, serde_json::json!({"namespaces": {}})),
            cnp("a-web", "Admin", 10, app("a")),
            cnp("c-other", "Admin", 10, app("none")),
            cnp("d-base", "Baseline", 10, app("a")),
            cnp("e-later", "Admin", 11, app("a")),
        ]);
        let r = lint(&c, &opts);
        let ties = only(&r, Rule::TierPriorityTie);
        assert_eq!(ties.len(), 1, "{ties:?}");
        assert_eq!(
            ties[0].object,
            ObjectRef::new("ClusterNetworkPolicy", None, "b-all")
        );
        assert_eq!(ties[0].field.as_deref(), Some("spec.priority"));
        assert!(
            ties[0].message.contains("both select x/a")
                && ties[0]
                    .message
                    .contains("applies ClusterNetworkPolicy/a-web first"),
            "{}",
            ties[0].message
        );
    }

    /// A `domainNames` peer is said to match nothing (an error: the rule is not enforced as
    /// written), with its field.
    #[test]
    fn a_domain_names_peer_is_reported_as_failing_closed() {
        let mut v = cnp("dns", "Admin", 1, serde_json::json!({"namespaces": {}}));
        v["spec"]["egress"] =
            serde_json::json!([{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]);
        let (c, opts) = with_cluster_policies(vec![v]);
        let r = lint(&c, &opts);
        let found = only(&r, Rule::PeerFailsClosed);
        assert_eq!(found.len(), 1, "{:?}", r.findings);
        assert_eq!(found[0].severity, Severity::Error);
        assert_eq!(found[0].object.to_string(), "ClusterNetworkPolicy dns");
        assert_eq!(found[0].field.as_deref(), Some("spec.egress[0].to[0]"));
        assert!(
            found[0].message.contains("matches nothing"),
            "{}",
            found[0].message
        );
    }

    /// A cluster-wide policy that does not read is an invalid object (an error), naming the
    /// field and that its fail-closed stand-in is enforced.
    #[test]
    fn a_refused_cluster_policy_is_an_invalid_object() {
        let mut v = cnp("bad", "Admin", 1, serde_json::json!({"namespaces": {}}));
        v["spec"]["ingress"][0]["action"] = "Allow".into();
        let (c, opts) = with_cluster_policies(vec![v]);
        let r = lint(&c, &opts);
        let found = only(&r, Rule::InvalidObject);
        assert_eq!(found.len(), 1, "{:?}", r.findings);
        assert_eq!(found[0].field.as_deref(), Some("spec.ingress[0].action"));
        assert!(
            found[0].message.contains("fail-closed stand-in"),
            "{}",
            found[0].message
        );
    }
}
