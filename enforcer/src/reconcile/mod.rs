//! Writes a [`DesiredState`] into the datapath without a window: every new or changed entry of
//! every map first (policy before the peers and CIDRs that resolve addresses to its identities,
//! all before the endpoint entries that turn isolation on, endpoint entries before their
//! programs are attached), then stale entries go in the reverse order. It starts from what the
//! maps hold, so after a restart it adopts the pinned state and changes only what differs.
//!
//! After one full comparison with the kernel it keeps a shadow of what it wrote and diffs the
//! next desired state against that, in memory: a policy change costs syscalls for the entries
//! that change, not for the 100k that do not. A write the kernel refused drops the shadow (the
//! next apply compares with the kernel again), and [`Reconciler::verify_kernel`] forces such a
//! comparison now and then, to repair drift made behind the agent's back.
//!
//! **A full map does not stop the job.** Each map's writes are planned within its capacity
//! ([`DatapathMaps::capacity`]; entries already there count once) and everything that fits is
//! written; what does not fit is left out so that it can only deny, never allow, and is
//! reported ([`Report::unprogrammed`], [`Report::unresolved`], [`Report::missing`]):
//! - `POLICY`: an endpoint's new entries go in whole or not at all (one endpoint fully
//!   programmed rather than every endpoint half); its endpoint entry is still written with its
//!   isolation flags, so a missing allow entry only denies, in the directions it concerns.
//! - `PEERS_V4`/`PEERS_V6`: an address without an entry resolves through the CIDR tries, i.e.
//!   to its region, whose identity has the same ipBlocks as the pod's (the compiler gives pod
//!   identities the ipBlocks their address is in), and no pod labels: only what an ipBlock or
//!   an any-peer rule allows it still is. A refused identity change removes the old entry
//!   rather than keep an identity the address lost.
//! - `CIDRS_V4`/`CIDRS_V6`: the addresses of a missing prefix would resolve to its nearest
//!   written ancestor, which may be allowed where the prefix is not (an ipBlock `except`): the
//!   policy entries of that ancestor's identity are left out (removed) too.
//! - `ENDPOINTS`: a pod without an entry (no room, or no endpoint id: `unnumbered`) still gets
//!   its programs attached; the programs drop everything on an interface without an entry
//!   (`DROP_UNPROGRAMMED`), so it is denied both ways rather than left open.
//!
//! - `NODE_PORTS`: a node port without an entry is judged as traffic to the node (allowed), not
//!   on its Service's backend: the one map whose missing entries allow more, so they are named
//!   ([`Report::node_ports_missing`]) and keep the agent not ready.
//!
//! Removals still run for everything stale (they need no room and free some); when they freed
//! room for what was left out, the apply runs once more at once, and every later apply retries:
//! when room comes back, the maps converge.
//!
//! **Exit interfaces.** Every interface of the node that is up, is not `lo` and is not a pod's
//! veth (one the pod programs are on, or go on in this apply) gets the exit program, which
//! judges the Service packets `from_pod` deferred when they leave the node by it; it comes off
//! an interface that is gone or became a pod's veth. The interfaces are listed on every apply,
//! so a new uplink is covered within a resync; an attach that fails is reported
//! ([`Report::exit_failed`]): deferred packets leaving by that interface would go unjudged.

#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod restore;
pub mod seam;

pub use restore::read_pinned;
pub use seam::{DatapathMaps, Located, MapName, MapTable, Routes};

use std::{
    collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher},
    fmt,
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EP_HAS_V4, EP_HAS_V6, EndpointInfo, IDENTITY_HOST, NodePortKey,
    PeerInfo, PolicyKey, PolicyValue,
};

use enforcer_policy::state::{DesiredState, PodRef, Prefix};

/// A pod the reconciler could not fully program, and what that denies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unprogrammed {
    pub pod: PodRef,
    /// The map that could not take its entries.
    pub map: MapName,
    /// Traffic into the pod is denied beyond what its policies say (some of its allow entries
    /// are missing, or it has no endpoint entry at all).
    pub ingress: bool,
    /// The same for traffic out of the pod.
    pub egress: bool,
}

impl Unprogrammed {
    /// "ingress", "egress" or "ingress and egress".
    pub fn directions(&self) -> &'static str {
        match (self.ingress, self.egress) {
            (true, true) => "ingress and egress",
            (true, false) => "ingress",
            (false, true) => "egress",
            (false, false) => "no direction",
        }
    }
}

impl fmt::Display for Unprogrammed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.map {
            MapName::Endpoints => "no endpoint entry",
            MapName::Policy => "allow rules not written",
            _ => "rules of a missing region left out",
        };
        write!(
            f,
            "{} {} denied ({what}: {} full)",
            self.pod,
            self.directions(),
            self.map
        )
    }
}

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Pods whose own host interface was not found (yet), and why: not enforced, retried on
    /// the next reconcile.
    pub pending: Vec<(PodRef, String)>,
    /// Pods that could not be attached, with the error: their address leads to an interface
    /// that is not their own veth (never attached to), an interface another pod has, or the
    /// attach failed. Not enforced; retried on the next reconcile.
    pub failed: Vec<(PodRef, String)>,
    /// Pods whose interface could not be found now but which keep the interface they were
    /// attached to (it still exists): their programs and entries stay (a route gone for a
    /// moment, as during a CNI restart, must not open them). With the interface and why.
    pub kept: Vec<(PodRef, u32, String)>,
    pub attached: Vec<u32>,
    pub detached: Vec<u32>,
    pub written: usize,
    pub removed: usize,
    /// Pods not fully programmed for want of room in a map (or a write the kernel refused):
    /// denied in the directions named, beyond what their policies say, until room comes back.
    /// One per pod and map.
    pub unprogrammed: Vec<Unprogrammed>,
    /// Pod addresses with no entry of their own in `PEERS_V4`/`PEERS_V6`: every policy judges
    /// them by the ipBlocks they are in (else as world), so pod selectors do not match them.
    pub unresolved: Vec<IpAddr>,
    /// Per map: entries the desired state needs that the map does not hold after this
    /// reconcile (left out for want of room, refused by the kernel, or left out because a
    /// region they depend on is missing), and for `ENDPOINTS` the pods without an endpoint id.
    pub missing: BTreeMap<MapName, usize>,
    /// Per map: the first error of a write the kernel refused, if any.
    pub refused: BTreeMap<MapName, String>,
    /// Node ports without a `NODE_PORTS` entry (no room, or refused): a pod's flow to a node
    /// address on one is judged as traffic to the node (allowed), not on the Service's backend.
    pub node_ports_missing: Vec<NodePortKey>,
    /// Interfaces the exit program was attached to in this apply.
    pub exit_attached: Vec<u32>,
    /// Interfaces it came off (gone, or a pod's veth now).
    pub exit_detached: Vec<u32>,
    /// Interfaces (name) the exit program could not be attached to, with the error: deferred
    /// Service packets leaving the node by them go unjudged. Retried on the next apply.
    pub exit_failed: Vec<(String, String)>,
}

impl Report {
    /// Everything desired is in the kernel.
    pub fn complete(&self) -> bool {
        self.pending.is_empty()
            && self.failed.is_empty()
            && self.unprogrammed.is_empty()
            && self.unresolved.is_empty()
            && self.missing.is_empty()
            && self.exit_failed.is_empty()
    }

    /// Folds a second pass of the same apply into this one.
    fn then(mut self, next: Report) -> Report {
        self.attached.extend(next.attached);
        self.detached.extend(next.detached);
        self.exit_attached.extend(next.exit_attached);
        self.exit_detached.extend(next.exit_detached);
        Report {
            attached: self.attached,
            detached: self.detached,
            exit_attached: self.exit_attached,
            exit_detached: self.exit_detached,
            written: self.written + next.written,
            removed: self.removed + next.removed,
            ..next
        }
    }

    fn unprogrammed(&mut self, pod: &PodRef, map: MapName, dir: u8) {
        let (ingress, egress) = (dir != DIR_EGRESS, dir != DIR_INGRESS);
        match self
            .unprogrammed
            .iter_mut()
            .find(|u| u.pod == *pod && u.map == map)
        {
            Some(u) => {
                u.ingress |= ingress;
                u.egress |= egress;
            }
            None => self.unprogrammed.push(Unprogrammed {
                pod: pod.clone(),
                map,
                ingress,
                egress,
            }),
        }
    }
}

/// Both directions, for [`Report::unprogrammed`].
const BOTH: u8 = u8::MAX;

/// Keeps what must survive between reconciles: the epoch of each endpoint id and the hash of
/// what it was computed from, so that only endpoints whose policy changed re-check their flows.
#[derive(Debug, Default)]
pub struct Reconciler {
    epochs: BTreeMap<u32, (u32, u64)>,
    adopted: bool,
    /// What the maps hold, as of the last apply whose every write the kernel took; `None` until
    /// the first one, after a refused write and after [`Reconciler::verify_kernel`].
    shadow: Option<Shadow>,
    /// Per map: entries held and capacity, as of the last apply.
    fill: BTreeMap<MapName, (usize, Option<usize>)>,
    /// The interface each pod had programs on after the last apply: it keeps it while the
    /// interface exists, even when its route is gone for a moment.
    bound: BTreeMap<PodRef, u32>,
    /// After a restart, until the first apply: the interface of each address the pinned
    /// `ENDPOINTS` entries name (what `bound` was in the previous process).
    pinned_at: BTreeMap<IpAddr, u32>,
    /// The state of the last [`Reconciler::apply_shared`], while the shadow holds each of its
    /// peer entries: what the next one diffs its peers against.
    last: Option<Arc<DesiredState>>,
    /// [`peers_fingerprint`] of the last apply's state, kept up to date change by change.
    peers_fp: u64,
}

/// The map contents this process last wrote, keyed as in the kernel.
#[derive(Debug, Default)]
struct Shadow {
    endpoints: BTreeMap<u32, EndpointInfo>,
    peers_v4: BTreeMap<[u8; 4], PeerInfo>,
    peers_v6: BTreeMap<[u8; 16], PeerInfo>,
    cidrs_v4: BTreeMap<Prefix<Ipv4Addr>, PeerInfo>,
    cidrs_v6: BTreeMap<Prefix<Ipv6Addr>, PeerInfo>,
    policy: BTreeMap<PolicyKey, PolicyValue>,
    node_ports: BTreeMap<NodePortKey, u32>,
}

impl Shadow {
    /// What the kernel maps hold now.
    fn read(dp: &mut dyn DatapathMaps) -> Result<Self> {
        Ok(Self {
            endpoints: read_all(dp.endpoints(), MapName::Endpoints)?,
            peers_v4: read_all(dp.peers_v4(), MapName::PeersV4)?,
            peers_v6: read_all(dp.peers_v6(), MapName::PeersV6)?,
            cidrs_v4: read_all(dp.cidrs_v4(), MapName::CidrsV4)?,
            cidrs_v6: read_all(dp.cidrs_v6(), MapName::CidrsV6)?,
            policy: read_all(dp.policy(), MapName::Policy)?,
            node_ports: read_all(dp.node_ports(), MapName::NodePorts)?,
        })
    }

    fn len(&self, map: MapName) -> usize {
        match map {
            MapName::Endpoints => self.endpoints.len(),
            MapName::PeersV4 => self.peers_v4.len(),
            MapName::PeersV6 => self.peers_v6.len(),
            MapName::CidrsV4 => self.cidrs_v4.len(),
            MapName::CidrsV6 => self.cidrs_v6.len(),
            MapName::Policy => self.policy.len(),
            MapName::NodePorts => self.node_ports.len(),
        }
    }
}

/// Every entry of `t`.
fn read_all<K: Ord + Clone, V>(t: &dyn MapTable<K, V>, map: MapName) -> Result<BTreeMap<K, V>> {
    let mut out = BTreeMap::new();
    for k in t.keys().with_context(|| format!("listing {map}"))? {
        // An entry removed between the listing and the read is simply not there.
        if let Some(v) = t.get(&k).with_context(|| format!("reading {map}"))? {
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// The writes that bring a map holding `held` to `desired` within `capacity` entries: every
/// changed entry (a replacement needs no room), then the new keys while there is room, those
/// `first` says first. Stale entries still hold room (they go after the writes).
#[derive(Debug)]
struct Plan<K> {
    writes: Vec<K>,
    left_out: Vec<K>,
}

fn plan<K: Ord + Clone, V: PartialEq>(
    desired: &BTreeMap<K, V>,
    held: &BTreeMap<K, V>,
    capacity: Option<usize>,
    first: impl Fn(&V) -> bool,
) -> Plan<K> {
    let mut room = capacity.map(|c| c.saturating_sub(held.len()));
    let mut p = Plan {
        writes: Vec::new(),
        left_out: Vec::new(),
    };
    let mut later = Vec::new();
    for (k, v) in desired {
        match held.get(k) {
            Some(h) if h == v => {}
            Some(_) => p.writes.push(k.clone()),
            None if room.is_none() => p.writes.push(k.clone()),
            None if first(v) => take_room(&mut room, k, &mut p),
            None => later.push(k),
        }
    }
    for k in later {
        take_room(&mut room, k, &mut p);
    }
    p
}

fn take_room<K: Clone>(room: &mut Option<usize>, k: &K, p: &mut Plan<K>) {
    match room {
        Some(0) => p.left_out.push(k.clone()),
        Some(r) => {
            *r -= 1;
            p.writes.push(k.clone());
        }
        None => p.writes.push(k.clone()),
    }
}

/// The policy writes within `capacity`: changed entries, then each endpoint's new entries whole
/// or not at all, endpoints in `live` first (those with an endpoint entry), by id. Desired
/// entries of an identity in `suppressed` are neither written nor kept.
struct PolicyPlan {
    writes: Vec<PolicyKey>,
    left_out: Vec<PolicyKey>,
    /// Desired entries that must not be in the map (their identity is in `suppressed`).
    suppressed: Vec<PolicyKey>,
}

fn plan_policy(
    desired: &BTreeMap<PolicyKey, PolicyValue>,
    held: &BTreeMap<PolicyKey, PolicyValue>,
    capacity: Option<usize>,
    suppressed: &BTreeMap<u32, MapName>,
    live: &BTreeSet<u32>,
) -> PolicyPlan {
    let mut p = PolicyPlan {
        writes: Vec::new(),
        left_out: Vec::new(),
        suppressed: Vec::new(),
    };
    let mut groups: BTreeMap<(bool, u32), Vec<PolicyKey>> = BTreeMap::new();
    let mut freed = 0;
    for (k, v) in desired {
        if suppressed.contains_key(&k.identity) {
            freed += usize::from(held.contains_key(k));
            p.suppressed.push(*k);
            continue;
        }
        match held.get(k) {
            Some(h) if h == v => {}
            Some(_) => p.writes.push(*k),
            None => groups
                .entry((!live.contains(&k.endpoint), k.endpoint))
                .or_default()
                .push(*k),
        }
    }
    let mut room = capacity.map(|c| c.saturating_sub(held.len() - freed));
    for keys in groups.into_values() {
        match &mut room {
            Some(r) if *r < keys.len() => p.left_out.extend(keys),
            Some(r) => {
                *r -= keys.len();
                p.writes.extend(keys);
            }
            None => p.writes.extend(keys),
        }
    }
    p
}

/// An address type of the CIDR tries.
trait RegionAddr: Copy + Ord {
    const BITS: u8;
    fn bits(self) -> u128;
    fn from_bits(b: u128) -> Self;
}

impl RegionAddr for Ipv4Addr {
    const BITS: u8 = 32;
    fn bits(self) -> u128 {
        u128::from(u32::from(self))
    }
    fn from_bits(b: u128) -> Self {
        #[expect(clippy::cast_possible_truncation, reason = "an IPv4 address's 32 bits")]
        Self::from(b as u32)
    }
}

impl RegionAddr for Ipv6Addr {
    const BITS: u8 = 128;
    fn bits(self) -> u128 {
        u128::from(self)
    }
    fn from_bits(b: u128) -> Self {
        Self::from(b)
    }
}

/// `p` cut to its first `len` bits.
fn ancestor<A: RegionAddr>(p: &Prefix<A>, len: u8) -> Prefix<A> {
    let host = u32::from(A::BITS - len);
    let mask = if host >= 128 {
        0
    } else {
        !((1u128 << host) - 1)
    };
    Prefix {
        addr: A::from_bits(p.addr.bits() & mask),
        len,
    }
}

/// The identities whose policy entries must not be in the map while the regions in `missing`
/// are: the addresses of a missing region resolve to its nearest ancestor that is there, which
/// may be allowed where the region is not (an ipBlock `except`). Without such an ancestor they
/// resolve to world, which no entry but an any-peer one allows, and the region's identity
/// has those too.
fn region_suppression<A: RegionAddr>(
    desired: &BTreeMap<Prefix<A>, PeerInfo>,
    missing: &BTreeSet<Prefix<A>>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for p in missing {
        let Some(want) = desired.get(p) else { continue };
        let nearest = (0..p.len).rev().find_map(|len| {
            let q = ancestor(p, len);
            (!missing.contains(&q)).then(|| desired.get(&q)).flatten()
        });
        if let Some(q) = nearest
            && q.identity != want.identity
        {
            out.insert(q.identity);
        }
    }
    out
}

/// The peer entries of one family an apply writes and removes.
struct PeerChanges<K> {
    /// The values of the keys to write: every desired entry, or only those that changed.
    values: BTreeMap<K, PeerInfo>,
    plan: Plan<K>,
    /// Held keys no longer desired.
    stale: Vec<K>,
    /// What the change adds to [`peers_fingerprint`] (wrapping).
    fp_delta: u64,
}

/// Of the desired peer entries, a fingerprint that one change updates without the others: the
/// wrapping sum of a hash of each entry.
fn peers_fingerprint(desired: &DesiredState) -> u64 {
    let v4 = desired.peers_v4.iter().map(|(a, p)| peer_hash(a, p));
    let v6 = desired.peers_v6.iter().map(|(a, p)| peer_hash(a, p));
    v4.chain(v6).fold(0, u64::wrapping_add)
}

fn peer_hash<A: Hash>(addr: &A, peer: &PeerInfo) -> u64 {
    let mut h = DefaultHasher::new();
    addr.hash(&mut h);
    peer.hash(&mut h);
    h.finish()
}

/// Every desired peer entry compared with what the maps hold. The node's addresses go first
/// when room is short: without them the node's probes would be judged as world.
fn peer_changes_full<A, K: Ord + Clone>(
    desired: &BTreeMap<A, PeerInfo>,
    held: &BTreeMap<K, PeerInfo>,
    capacity: Option<usize>,
    key: impl Fn(&A) -> K,
) -> PeerChanges<K> {
    let values: BTreeMap<K, PeerInfo> = desired.iter().map(|(a, p)| (key(a), *p)).collect();
    let plan = plan(&values, held, capacity, |p| p.identity == IDENTITY_HOST);
    let stale = held
        .keys()
        .filter(|k| !values.contains_key(k))
        .cloned()
        .collect();
    PeerChanges {
        values,
        plan,
        stale,
        fp_delta: 0,
    }
}

/// The changes from `last` (whose every entry the maps hold, `held` of them in all) to
/// `desired`, from one walk of both in order; `None` when the new keys might not all fit in
/// `capacity` (then [`peer_changes_full`] chooses which go in).
fn peer_changes_since<A: Ord + Hash, K: Ord + Clone>(
    last: &BTreeMap<A, PeerInfo>,
    desired: &BTreeMap<A, PeerInfo>,
    held: usize,
    capacity: Option<usize>,
    key: impl Fn(&A) -> K,
) -> Option<PeerChanges<K>> {
    let mut values = BTreeMap::new();
    let mut stale = Vec::new();
    let mut added = 0usize;
    let mut fp_delta = 0u64;
    let gone = |a: &A, p: &PeerInfo, fp: &mut u64| *fp = fp.wrapping_sub(peer_hash(a, p));
    let came = |a: &A, p: &PeerInfo, fp: &mut u64| *fp = fp.wrapping_add(peer_hash(a, p));
    let (mut old, mut new) = (last.iter().peekable(), desired.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((a, p)), None) => {
                gone(a, p, &mut fp_delta);
                stale.push(key(a));
                old.next();
            }
            (None, Some((a, p))) => {
                came(a, p, &mut fp_delta);
                values.insert(key(a), **p);
                added += 1;
                new.next();
            }
            (Some((oa, op)), Some((na, np))) => match oa.cmp(na) {
                std::cmp::Ordering::Less => {
                    gone(oa, op, &mut fp_delta);
                    stale.push(key(oa));
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    came(na, np, &mut fp_delta);
                    values.insert(key(na), **np);
                    added += 1;
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if op != np {
                        gone(oa, op, &mut fp_delta);
                        came(na, np, &mut fp_delta);
                        values.insert(key(na), **np);
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    if capacity.is_some_and(|c| held + added > c) {
        return None;
    }
    let plan = Plan {
        writes: values.keys().cloned().collect(),
        left_out: Vec::new(),
    };
    Some(PeerChanges {
        values,
        plan,
        stale,
        fp_delta,
    })
}

/// Writes and removals, counted; what the kernel refused, noted.
#[derive(Default)]
struct Tally {
    written: usize,
    removed: usize,
    refused: BTreeMap<MapName, String>,
}

impl Tally {
    /// Writes `keys` with their desired values into `table`, keeping `held` up to date. A write
    /// the kernel refuses leaves the key out: what it held before is removed, so an old value
    /// never stands in for the new one (an address keeping an identity it lost). Returns the
    /// keys refused.
    fn write<K: Ord + Clone, V: Clone>(
        &mut self,
        map: MapName,
        keys: impl IntoIterator<Item = K>,
        desired: &BTreeMap<K, V>,
        table: &mut dyn MapTable<K, V>,
        held: &mut BTreeMap<K, V>,
    ) -> Result<Vec<K>> {
        let mut refused = Vec::new();
        for k in keys {
            let Some(v) = desired.get(&k) else { continue };
            match table.set(&k, v) {
                Ok(()) => {
                    held.insert(k, v.clone());
                    self.written += 1;
                }
                Err(e) => {
                    self.refused.entry(map).or_insert_with(|| format!("{e:#}"));
                    if held.contains_key(&k) {
                        table.remove(&k).with_context(|| {
                            format!("removing from {map} after a refused write")
                        })?;
                        held.remove(&k);
                        self.removed += 1;
                    }
                    refused.push(k);
                }
            }
        }
        Ok(refused)
    }

    /// Removes `keys` from `table` and `held` (those `held` has).
    fn remove<K: Ord, V>(
        &mut self,
        map: MapName,
        keys: impl IntoIterator<Item = K>,
        table: &mut dyn MapTable<K, V>,
        held: &mut BTreeMap<K, V>,
    ) -> Result<()> {
        for k in keys {
            if held.contains_key(&k) {
                table
                    .remove(&k)
                    .with_context(|| format!("removing from {map}"))?;
                held.remove(&k);
                self.removed += 1;
            }
        }
        Ok(())
    }

    /// Removes what `held` has and `desired` does not.
    fn remove_stale<K: Ord + Clone, V, W>(
        &mut self,
        map: MapName,
        desired: &BTreeMap<K, W>,
        table: &mut dyn MapTable<K, V>,
        held: &mut BTreeMap<K, V>,
    ) -> Result<()> {
        let stale: Vec<K> = held
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect();
        self.remove(map, stale, table, held)
    }
}

/// Why a pod has no interface this time: not found (yet), or found somewhere it must not be
/// attached (`refused`).
struct Unplaced {
    why: String,
    refused: bool,
}

/// Finds the own interface of a pod from its addresses (the first address that leads to one).
fn locate(routes: &dyn Routes, pod: &PodRef, ips: &[IpAddr]) -> Result<Result<u32, Unplaced>> {
    let mut why: Option<Unplaced> = None;
    for ip in ips {
        match routes
            .locate(*ip)
            .with_context(|| format!("the interface of {ip} of {pod}"))?
        {
            Located::Found(i) => return Ok(Ok(i)),
            Located::Unsupported(w) if why.as_ref().is_none_or(|u| !u.refused) => {
                why = Some(Unplaced {
                    why: w,
                    refused: true,
                });
            }
            Located::NotYet(w) if why.is_none() => {
                why = Some(Unplaced {
                    why: w,
                    refused: false,
                });
            }
            _ => {}
        }
    }
    Ok(Err(why.unwrap_or(Unplaced {
        why: "no address".into(),
        refused: false,
    })))
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The interface of each of `pods` (pod, addresses) whose own interface is found, or which
    /// keeps the one it had: a pod is placed on the interface its addresses lead to
    /// ([`Routes::locate`]) when no other pod's do; an interface several pods' addresses lead
    /// to goes to none of them (a shared device), except to the pod that had it already. A pod
    /// not placed so keeps the interface it had programs on while that still exists and no
    /// other pod was placed there ([`Report::kept`]); else it is reported pending (not found
    /// yet) or failed (found where it must not be attached).
    fn place<'a>(
        &self,
        routes: &dyn Routes,
        pods: impl Iterator<Item = (&'a PodRef, &'a [IpAddr])>,
        report: &mut Report,
    ) -> Result<BTreeMap<PodRef, u32>> {
        let mut claims: BTreeMap<u32, Vec<(PodRef, &'a [IpAddr])>> = BTreeMap::new();
        let mut lost: Vec<(PodRef, &'a [IpAddr], Unplaced)> = Vec::new();
        for (pod, ips) in pods {
            match locate(routes, pod, ips)? {
                Ok(i) => claims.entry(i).or_default().push((pod.clone(), ips)),
                Err(u) => lost.push((pod.clone(), ips, u)),
            }
        }
        let mut placed: BTreeMap<PodRef, u32> = BTreeMap::new();
        for (i, pods) in claims {
            if let [(pod, _)] = pods.as_slice() {
                placed.insert(pod.clone(), i);
                continue;
            }
            let keeper = pods.iter().position(|(p, _)| self.bound.get(p) == Some(&i));
            let names: Vec<String> = pods.iter().map(|(p, _)| p.to_string()).collect();
            for (k, (pod, ips)) in pods.into_iter().enumerate() {
                if Some(k) == keeper {
                    placed.insert(pod, i);
                } else {
                    let why = format!(
                        "interface {i} is where the addresses of several pods lead ({}): a shared device, not a pod's own veth",
                        names.join(", ")
                    );
                    lost.push((pod, ips, Unplaced { why, refused: true }));
                }
            }
        }
        for (pod, ips, u) in lost {
            let prior = self
                .bound
                .get(&pod)
                .or_else(|| ips.iter().find_map(|ip| self.pinned_at.get(ip)))
                .copied();
            if let Some(i) = prior
                && routes.exists(i)
                && !placed.values().any(|p| *p == i)
            {
                placed.insert(pod.clone(), i);
                report.kept.push((pod, i, u.why));
            } else if u.refused {
                report.failed.push((pod, u.why));
            } else {
                report.pending.push((pod, u.why));
            }
        }
        Ok(placed)
    }

    /// Makes the next apply compare every entry with the kernel instead of the shadow.
    pub fn verify_kernel(&mut self) {
        self.shadow = None;
        self.last = None;
    }

    /// Per map: entries held and capacity (`None`: unknown), as of the last apply: the map fill
    /// the metrics report, without walking the kernel maps. Empty before the first apply.
    pub fn fill(&self) -> Vec<(MapName, usize, Option<usize>)> {
        self.fill.iter().map(|(m, (n, c))| (*m, *n, *c)).collect()
    }

    /// Programs `desired` into `dp`.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        self.apply_with(desired, &[], dp, routes)
    }

    /// [`Reconciler::apply`], also attaching the programs to the interfaces of `unnumbered`
    /// (pod, addresses): local pods the compiler gave no endpoint id (more local pods than
    /// ids). They get no endpoint entry, so their programs drop everything, both ways, and they
    /// are reported as not programmed.
    pub fn apply_with(
        &mut self,
        desired: &DesiredState,
        unnumbered: &[(PodRef, Vec<IpAddr>)],
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        self.apply_twice(desired, None, unnumbered, dp, routes)
    }

    /// [`Reconciler::apply_with`] of a state the caller shares: kept, so that the next apply of
    /// a shared state finds the peer entries that changed in one ordered walk of both states
    /// rather than a lookup of each of them in what the maps hold.
    pub fn apply_shared(
        &mut self,
        desired: &Arc<DesiredState>,
        unnumbered: &[(PodRef, Vec<IpAddr>)],
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        self.apply_twice(desired, Some(desired), unnumbered, dp, routes)
    }

    fn apply_twice(
        &mut self,
        desired: &DesiredState,
        shared: Option<&Arc<DesiredState>>,
        unnumbered: &[(PodRef, Vec<IpAddr>)],
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        let first = self.apply_once(desired, shared, unnumbered, dp, routes)?;
        if first.missing.is_empty() || first.removed == 0 {
            return Ok(first);
        }
        // The removals freed room: what was left out may fit now.
        let second = self.apply_once(desired, shared, unnumbered, dp, routes)?;
        Ok(first.then(second))
    }

    fn apply_once(
        &mut self,
        desired: &DesiredState,
        shared_state: Option<&Arc<DesiredState>>,
        unnumbered: &[(PodRef, Vec<IpAddr>)],
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        let mut report = Report::default();
        if !self.adopted {
            self.adopt(dp)?;
        }

        // Where each endpoint lives; the interfaces that get programs but no entry.
        let mut wanted: BTreeMap<u32, (&PodRef, EndpointInfo)> = BTreeMap::new();
        let mut owner: BTreeMap<u32, PodRef> = BTreeMap::new();
        let mut bare: BTreeMap<u32, PodRef> = BTreeMap::new();
        let mut missing: BTreeMap<MapName, usize> = BTreeMap::new();
        let pods = desired
            .endpoints
            .iter()
            .map(|(pod, ep)| (pod, ep.ips.as_slice()))
            .chain(unnumbered.iter().map(|(pod, ips)| (pod, ips.as_slice())));
        let placed = self.place(routes, pods, &mut report)?;
        for (pod, ep) in &desired.endpoints {
            if let Some(i) = placed.get(pod) {
                wanted.insert(*i, (pod, ep.info));
                owner.insert(*i, pod.clone());
            }
        }
        for (pod, _) in unnumbered {
            *missing.entry(MapName::Endpoints).or_default() += 1;
            if let Some(i) = placed.get(pod) {
                bare.insert(*i, pod.clone());
                owner.insert(*i, pod.clone());
                report.unprogrammed(pod, MapName::Endpoints, BOTH);
            }
        }

        // 0. The exit program on every other interface, before anything that defers a packet
        //    to it (a Service frontend's peer entry, a node port) is written.
        let attached = dp.attached().context("listing attached interfaces")?;
        self.place_exits(dp, routes, &owner, &attached, &mut report)?;

        let caps: BTreeMap<MapName, Option<usize>> =
            MapName::ALL.iter().map(|m| (*m, dp.capacity(*m))).collect();
        let cap = |m: MapName| caps.get(&m).copied().flatten();

        let node_ports: BTreeMap<NodePortKey, u32> =
            desired.node_ports.iter().map(|k| (*k, 1)).collect();

        // Taken out while writing: an error below leaves it `None`, so the next apply compares
        // with the kernel.
        let last = self.last.take().filter(|_| self.shadow.is_some());
        let mut held = match self.shadow.take() {
            Some(s) => s,
            None => Shadow::read(dp)?,
        };

        // Plans, within each map's room, before any write. ENDPOINTS first: a pod left out
        // there gets no policy room either.
        let mut room = cap(MapName::Endpoints).map(|c| c.saturating_sub(held.endpoints.len()));
        let mut no_room = Vec::new();
        for ifindex in wanted.keys() {
            if held.endpoints.contains_key(ifindex) {
                continue;
            }
            match &mut room {
                Some(0) => no_room.push(*ifindex),
                Some(r) => *r -= 1,
                None => {}
            }
        }
        for ifindex in no_room {
            if let Some((pod, _)) = wanted.remove(&ifindex) {
                *missing.entry(MapName::Endpoints).or_default() += 1;
                bare.insert(ifindex, pod.clone());
                report.unprogrammed(pod, MapName::Endpoints, BOTH);
            }
        }
        let live: BTreeSet<u32> = wanted.values().map(|(_, info)| info.id).collect();
        // Since the last apply of a shared state, whose every peer entry the maps hold: the
        // entries that differ, in one ordered walk of both states (a pod event touches a few
        // of 100k addresses). Otherwise, or when the new ones may not fit: every entry.
        let since = last.as_ref().and_then(|l| {
            let v4 = peer_changes_since(
                &l.peers_v4,
                &desired.peers_v4,
                held.peers_v4.len(),
                cap(MapName::PeersV4),
                Ipv4Addr::octets,
            )?;
            let v6 = peer_changes_since(
                &l.peers_v6,
                &desired.peers_v6,
                held.peers_v6.len(),
                cap(MapName::PeersV6),
                Ipv6Addr::octets,
            )?;
            Some((v4, v6))
        });
        let (p4, p6, peers_fp) = match since {
            Some((v4, v6)) => {
                let fp = self
                    .peers_fp
                    .wrapping_add(v4.fp_delta)
                    .wrapping_add(v6.fp_delta);
                (v4, v6, fp)
            }
            None => (
                peer_changes_full(
                    &desired.peers_v4,
                    &held.peers_v4,
                    cap(MapName::PeersV4),
                    Ipv4Addr::octets,
                ),
                peer_changes_full(
                    &desired.peers_v6,
                    &held.peers_v6,
                    cap(MapName::PeersV6),
                    Ipv6Addr::octets,
                ),
                peers_fingerprint(desired),
            ),
        };
        let c4 = plan(
            &desired.cidrs_v4,
            &held.cidrs_v4,
            cap(MapName::CidrsV4),
            |_| false,
        );
        let c6 = plan(
            &desired.cidrs_v6,
            &held.cidrs_v6,
            cap(MapName::CidrsV6),
            |_| false,
        );
        let np = plan(
            &node_ports,
            &held.node_ports,
            cap(MapName::NodePorts),
            |_| false,
        );
        let mut c4_missing: BTreeSet<Prefix<Ipv4Addr>> = c4.left_out.iter().copied().collect();
        let mut c6_missing: BTreeSet<Prefix<Ipv6Addr>> = c6.left_out.iter().copied().collect();
        let mut suppressed: BTreeMap<u32, MapName> = BTreeMap::new();
        for id in region_suppression(&desired.cidrs_v4, &c4_missing) {
            suppressed.entry(id).or_insert(MapName::CidrsV4);
        }
        for id in region_suppression(&desired.cidrs_v6, &c6_missing) {
            suppressed.entry(id).or_insert(MapName::CidrsV6);
        }
        let pp = plan_policy(
            &desired.policy,
            &held.policy,
            cap(MapName::Policy),
            &suppressed,
            &live,
        );

        let mut t = Tally::default();
        // 0. Entries that would allow more than the desired state while a region is missing go
        //    first (a removal only denies).
        let mut suppressed_keys = pp.suppressed;
        t.remove(
            MapName::Policy,
            suppressed_keys.iter().copied(),
            dp.policy(),
            &mut held.policy,
        )?;

        // 1. Additions and changes: the policy entries of an identity before any address
        //    resolves to it (a relabeled pod never meets its new identity without its rules),
        //    all before the endpoint entries that turn isolation on.
        let mut policy_missing: BTreeSet<PolicyKey> = pp.left_out.into_iter().collect();
        policy_missing.extend(t.write(
            MapName::Policy,
            pp.writes,
            &desired.policy,
            dp.policy(),
            &mut held.policy,
        )?);
        let mut p4_missing = p4.plan.left_out;
        p4_missing.extend(t.write(
            MapName::PeersV4,
            p4.plan.writes,
            &p4.values,
            dp.peers_v4(),
            &mut held.peers_v4,
        )?);
        let mut p6_missing = p6.plan.left_out;
        p6_missing.extend(t.write(
            MapName::PeersV6,
            p6.plan.writes,
            &p6.values,
            dp.peers_v6(),
            &mut held.peers_v6,
        )?);
        c4_missing.extend(t.write(
            MapName::CidrsV4,
            c4.writes,
            &desired.cidrs_v4,
            dp.cidrs_v4(),
            &mut held.cidrs_v4,
        )?);
        c6_missing.extend(t.write(
            MapName::CidrsV6,
            c6.writes,
            &desired.cidrs_v6,
            dp.cidrs_v6(),
            &mut held.cidrs_v6,
        )?);
        let mut np_missing = np.left_out;
        np_missing.extend(t.write(
            MapName::NodePorts,
            np.writes,
            &node_ports,
            dp.node_ports(),
            &mut held.node_ports,
        )?);
        // A region the kernel refused: the rules of its nearest ancestor's identity go now.
        let mut more = BTreeSet::new();
        for id in region_suppression(&desired.cidrs_v4, &c4_missing) {
            if let std::collections::btree_map::Entry::Vacant(e) = suppressed.entry(id) {
                e.insert(MapName::CidrsV4);
                more.insert(id);
            }
        }
        for id in region_suppression(&desired.cidrs_v6, &c6_missing) {
            if let std::collections::btree_map::Entry::Vacant(e) = suppressed.entry(id) {
                e.insert(MapName::CidrsV6);
                more.insert(id);
            }
        }
        if !more.is_empty() {
            let keys: Vec<PolicyKey> = desired
                .policy
                .keys()
                .filter(|k| more.contains(&k.identity))
                .copied()
                .collect();
            t.remove(
                MapName::Policy,
                keys.iter().copied(),
                dp.policy(),
                &mut held.policy,
            )?;
            for k in keys {
                policy_missing.remove(&k);
                suppressed_keys.push(k);
            }
        }

        // Epochs, from what the maps hold now: an endpoint whose entries are only partly there
        // moves again when the rest arrives, so the flows it denied meanwhile are re-checked.
        let mut dropped: BTreeSet<PolicyKey> = policy_missing.clone();
        dropped.extend(suppressed_keys.iter().copied());
        let shared = shared_fingerprint(
            desired,
            peers_fp,
            &p4_missing,
            &p6_missing,
            &c4_missing,
            &c6_missing,
            &np_missing,
        );
        let mut endpoints: BTreeMap<u32, EndpointInfo> = BTreeMap::new();
        // Endpoints whose epoch moves in this apply.
        let mut moved: Vec<u32> = Vec::new();
        for (ifindex, (_, info)) in &wanted {
            let mut info = *info;
            let before = self.epochs.get(&info.id).map(|e| e.0);
            info.epoch = self.epoch_for(desired, &info, shared, &dropped);
            if before != Some(info.epoch) {
                moved.push(*ifindex);
            }
            endpoints.insert(*ifindex, info);
        }
        // An entry on the interface of a pod that gets none is an earlier pod's: out before
        // the programs judge by it.
        let earlier: Vec<u32> = bare
            .keys()
            .filter(|i| held.endpoints.contains_key(i))
            .copied()
            .collect();
        t.remove(
            MapName::Endpoints,
            earlier,
            dp.endpoints(),
            &mut held.endpoints,
        )?;
        let writes: Vec<u32> = endpoints
            .iter()
            .filter(|(i, info)| held.endpoints.get(i) != Some(info))
            .map(|(i, _)| *i)
            .collect();
        for ifindex in t.write(
            MapName::Endpoints,
            writes,
            &endpoints,
            dp.endpoints(),
            &mut held.endpoints,
        )? {
            // Refused: the pod has no entry now (an older one was removed): denied both ways.
            endpoints.remove(&ifindex);
            if let Some((pod, _)) = wanted.remove(&ifindex) {
                *missing.entry(MapName::Endpoints).or_default() += 1;
                bare.insert(ifindex, pod.clone());
                report.unprogrammed(pod, MapName::Endpoints, BOTH);
            }
        }

        // What is missing, by pod: allow entries not written deny in their direction.
        let pod_of: BTreeMap<u32, &PodRef> =
            wanted.values().map(|(pod, info)| (info.id, *pod)).collect();
        for k in &policy_missing {
            if let Some(pod) = pod_of.get(&k.endpoint) {
                report.unprogrammed(pod, MapName::Policy, k.direction);
            }
        }
        for k in &suppressed_keys {
            if let (Some(pod), Some(map)) = (pod_of.get(&k.endpoint), suppressed.get(&k.identity)) {
                report.unprogrammed(pod, *map, k.direction);
            }
        }
        let mut count = |m: MapName, n: usize| {
            if n > 0 {
                *missing.entry(m).or_default() += n;
            }
        };
        count(
            MapName::Policy,
            policy_missing.len() + suppressed_keys.len(),
        );
        count(MapName::PeersV4, p4_missing.len());
        count(MapName::PeersV6, p6_missing.len());
        count(MapName::CidrsV4, c4_missing.len());
        count(MapName::CidrsV6, c6_missing.len());
        count(MapName::NodePorts, np_missing.len());
        report.node_ports_missing = np_missing;
        report.unresolved = p4_missing
            .iter()
            .map(|a| IpAddr::from(Ipv4Addr::from(*a)))
            .chain(p6_missing.iter().map(|a| IpAddr::from(Ipv6Addr::from(*a))))
            .collect();

        // 2. Programs on new interfaces (their endpoint entry exists now, or they get none and
        //    drop everything).
        let mut bound = BTreeMap::new();
        for (ifindex, pod) in &owner {
            if attached.contains(ifindex) {
                bound.insert(pod.clone(), *ifindex);
                continue;
            }
            match dp.attach(*ifindex) {
                Ok(()) => {
                    report.attached.push(*ifindex);
                    bound.insert(pod.clone(), *ifindex);
                }
                Err(e) => report.failed.push((
                    pod.clone(),
                    format!("attaching to interface {ifindex}: {e:#}"),
                )),
            }
        }
        self.bound = bound;
        self.pinned_at.clear();

        // 3. Removals, in reverse: programs off interfaces that are no longer pods, then entries.
        for ifindex in attached.iter().filter(|i| !owner.contains_key(i)) {
            dp.detach(*ifindex)
                .with_context(|| format!("detaching from interface {ifindex}"))?;
            report.detached.push(*ifindex);
        }
        let live_ids: BTreeSet<u32> = desired.endpoints.values().map(|e| e.info.id).collect();
        let gone_ids: Vec<u32> = self
            .epochs
            .keys()
            .copied()
            .filter(|id| !live_ids.contains(id))
            .collect();
        t.remove_stale(
            MapName::Endpoints,
            &endpoints,
            dp.endpoints(),
            &mut held.endpoints,
        )?;
        for id in gone_ids {
            dp.forget_flows(id)
                .with_context(|| format!("forgetting flows of endpoint {id}"))?;
            self.epochs.remove(&id);
        }
        // Addresses leave an identity before its rules go.
        let removed_before = t.removed;
        t.remove_stale(
            MapName::CidrsV6,
            &desired.cidrs_v6,
            dp.cidrs_v6(),
            &mut held.cidrs_v6,
        )?;
        t.remove_stale(
            MapName::CidrsV4,
            &desired.cidrs_v4,
            dp.cidrs_v4(),
            &mut held.cidrs_v4,
        )?;
        t.remove(
            MapName::PeersV6,
            p6.stale,
            dp.peers_v6(),
            &mut held.peers_v6,
        )?;
        t.remove(
            MapName::PeersV4,
            p4.stale,
            dp.peers_v4(),
            &mut held.peers_v4,
        )?;
        t.remove_stale(
            MapName::NodePorts,
            &node_ports,
            dp.node_ports(),
            &mut held.node_ports,
        )?;
        t.remove_stale(
            MapName::Policy,
            &desired.policy,
            dp.policy(),
            &mut held.policy,
        )?;

        // 4. A flow judged between the endpoint writes and the removals may have met an entry
        //    that is gone now, and carries the new epoch: when anything was removed, the moved
        //    epochs move once more, so such flows are re-checked against what is left.
        if t.removed > removed_before {
            for ifindex in &moved {
                let Some(info) = endpoints.get_mut(ifindex) else {
                    continue;
                };
                info.epoch = info.epoch.wrapping_add(1);
                if let Some(e) = self.epochs.get_mut(&info.id) {
                    e.0 = info.epoch;
                }
                dp.endpoints()
                    .set(ifindex, info)
                    .with_context(|| format!("writing ENDPOINTS {ifindex} after the removals"))?;
                held.endpoints.insert(*ifindex, *info);
                t.written += 1;
            }
        }

        report.written = t.written;
        report.removed = t.removed;
        report.missing = missing;
        report.unprogrammed.sort();
        self.fill = MapName::ALL
            .iter()
            .map(|m| (*m, (held.len(*m), cap(*m))))
            .collect();
        // After a refused write the next apply compares with the kernel.
        report.refused = t.refused;
        self.peers_fp = peers_fp;
        // The next apply of a shared state diffs the peers against this one only while the
        // maps hold each of its peer entries (nothing refused or left out).
        if report.refused.is_empty() && report.unresolved.is_empty() {
            self.last = shared_state.cloned();
        }
        self.shadow = report.refused.is_empty().then_some(held);
        Ok(report)
    }

    /// Keeps the exit program on every interface that is up, not `lo` and not a pod's veth
    /// (`owner`: the interfaces the pod programs go on in this apply; `attached`: those they
    /// are on): off the interfaces that are gone or a pod's now first, so an interface never
    /// holds both, then on the new ones. A failed attach is reported, not fatal: the other
    /// interfaces and the maps are still programmed.
    fn place_exits(
        &self,
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
        owner: &BTreeMap<u32, PodRef>,
        attached: &BTreeSet<u32>,
        report: &mut Report,
    ) -> Result<()> {
        let wanted: BTreeMap<u32, String> = routes
            .interfaces()
            .context("listing the node's interfaces")?
            .into_iter()
            .filter(|(i, name)| name != "lo" && !owner.contains_key(i) && !attached.contains(i))
            .collect();
        let exits = dp
            .exits_attached()
            .context("listing the interfaces with the exit program")?;
        for ifindex in exits.iter().filter(|i| !wanted.contains_key(i)) {
            dp.detach_exit(*ifindex)
                .with_context(|| format!("detaching the exit program from interface {ifindex}"))?;
            report.exit_detached.push(*ifindex);
        }
        for (ifindex, name) in wanted.iter().filter(|(i, _)| !exits.contains(i)) {
            match dp.attach_exit(*ifindex) {
                Ok(()) => report.exit_attached.push(*ifindex),
                Err(e) => report.exit_failed.push((name.clone(), format!("{e:#}"))),
            }
        }
        Ok(())
    }

    /// After a restart: continue from the epochs in the pinned endpoint entries, one higher, so
    /// flows tracked while the agent was away are re-checked against the policy once.
    fn adopt(&mut self, dp: &mut dyn DatapathMaps) -> Result<()> {
        let table = dp.endpoints();
        for ifindex in table.keys().context("reading pinned ENDPOINTS")? {
            if let Some(info) = table.get(&ifindex)? {
                self.epochs.insert(info.id, (info.epoch, 0));
                if info.flags & EP_HAS_V4 != 0 {
                    self.pinned_at
                        .insert(IpAddr::from(Ipv4Addr::from(info.ipv4)), ifindex);
                }
                if info.flags & EP_HAS_V6 != 0 {
                    self.pinned_at
                        .insert(IpAddr::from(Ipv6Addr::from(info.ipv6)), ifindex);
                }
            }
        }
        self.adopted = true;
        Ok(())
    }

    /// The epoch an endpoint entry gets: unchanged while what decides its verdicts is unchanged,
    /// one higher when anything of it changed. `dropped`: desired policy entries the map does
    /// not hold (no room).
    fn epoch_for(
        &mut self,
        desired: &DesiredState,
        info: &EndpointInfo,
        shared: u64,
        dropped: &BTreeSet<PolicyKey>,
    ) -> u32 {
        let mut h = DefaultHasher::new();
        shared.hash(&mut h);
        let mut bare = *info;
        bare.epoch = 0;
        bare.hash(&mut h);
        let lo = PolicyKey {
            endpoint: info.id,
            ..PolicyKey::default()
        };
        let hi = PolicyKey {
            endpoint: info.id + 1,
            ..PolicyKey::default()
        };
        for (k, v) in desired.policy.range(lo..hi) {
            k.hash(&mut h);
            v.hash(&mut h);
        }
        for k in dropped.range(lo..hi) {
            k.hash(&mut h);
        }
        let fp = h.finish();
        let entry = self.epochs.entry(info.id).or_insert((0, 0));
        if entry.1 != fp {
            *entry = (entry.0.wrapping_add(1), fp);
        }
        entry.0
    }
}

/// Hash of what every endpoint's verdicts depend on (what an address resolves to, and which
/// node ports are judged on a Service's backend): the desired peer entries (`peers`, their
/// [`peers_fingerprint`]), region and node-port entries, and those of them
/// the maps do not hold.
fn shared_fingerprint(
    desired: &DesiredState,
    peers: u64,
    p4_missing: &[[u8; 4]],
    p6_missing: &[[u8; 16]],
    c4_missing: &BTreeSet<Prefix<Ipv4Addr>>,
    c6_missing: &BTreeSet<Prefix<Ipv6Addr>>,
    np_missing: &[NodePortKey],
) -> u64 {
    let mut h = DefaultHasher::new();
    peers.hash(&mut h);
    desired.cidrs_v4.hash(&mut h);
    desired.cidrs_v6.hash(&mut h);
    desired.node_ports.hash(&mut h);
    if !(p4_missing.is_empty()
        && p6_missing.is_empty()
        && c4_missing.is_empty()
        && c6_missing.is_empty()
        && np_missing.is_empty())
    {
        p4_missing.hash(&mut h);
        p6_missing.hash(&mut h);
        c4_missing.hash(&mut h);
        c6_missing.hash(&mut h);
        np_missing.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use enforcer_common::{DIR_INGRESS, EP_HAS_V4, EP_INGRESS_ISOLATED, PROTO_TCP};

    use super::*;
    use crate::reconcile::fake::{FakeDatapath, FakeRoutes};
    use enforcer_policy::state::EndpointState;

    fn state(policy_port: u16, with_b: bool) -> DesiredState {
        let mut s = DesiredState::default();
        let a_ip: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let info = EndpointInfo {
            id: 1,
            flags: EP_INGRESS_ISOLATED | EP_HAS_V4,
            identity: 300,
            ipv4: a_ip.octets(),
            ..Default::default()
        };
        s.endpoints.insert(
            PodRef::new("x", "a"),
            EndpointState {
                info,
                ips: vec![a_ip.into()],
            },
        );
        s.peers_v4.insert(
            a_ip,
            PeerInfo {
                identity: 300,
                flags: 0,
            },
        );
        if with_b {
            let b_ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
            let info = EndpointInfo {
                id: 2,
                flags: EP_HAS_V4,
                identity: 301,
                ipv4: b_ip.octets(),
                ..Default::default()
            };
            s.endpoints.insert(
                PodRef::new("x", "b"),
                EndpointState {
                    info,
                    ips: vec![b_ip.into()],
                },
            );
            s.peers_v4.insert(
                b_ip,
                PeerInfo {
                    identity: 301,
                    flags: 0,
                },
            );
        }
        s.policy.insert(
            PolicyKey::new(1, 301, DIR_INGRESS, PROTO_TCP, policy_port, 16),
            PolicyValue { rule: 1, _pad: 0 },
        );
        s
    }

    fn routes() -> FakeRoutes {
        FakeRoutes::new(BTreeMap::from([
            ("10.0.0.1".parse().unwrap(), 11),
            ("10.0.0.2".parse().unwrap(), 12),
        ]))
    }

    /// A state with the peers of `state(80, true)` and `v4`/`v6` (address index -> identity,
    /// 0 standing for the node's identity).
    fn with_peers(v4: &BTreeMap<u8, u32>, v6: &BTreeMap<u8, u32>) -> DesiredState {
        let mut s = state(80, true);
        let peer = |id: u32| PeerInfo {
            identity: if id == 0 { IDENTITY_HOST } else { 400 + id },
            flags: 0,
        };
        for (i, id) in v4 {
            s.peers_v4.insert(Ipv4Addr::new(10, 1, 0, *i), peer(*id));
        }
        for (i, id) in v6 {
            s.peers_v6.insert(
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, (*i).into()),
                peer(*id),
            );
        }
        s
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 128,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Applied one after another, shared states (whose peers are diffed against the last
        /// one) leave the maps, epochs and reports exactly as full comparisons do, with or
        /// without room for every peer.
        #[test]
        fn applying_the_peer_changes_equals_the_full_diff(
            steps in proptest::collection::vec(
                (
                    proptest::collection::btree_map(0u8..24, 0u32..4, 0..20),
                    proptest::collection::btree_map(0u8..8, 0u32..3, 0..6),
                    proptest::bool::weighted(0.1),
                ),
                1..10,
            ),
            capacity in proptest::option::weighted(0.3, 8usize..24),
        ) {
            let mut full_dp = FakeDatapath::default();
            let mut shared_dp = FakeDatapath::default();
            for dp in [&mut full_dp, &mut shared_dp] {
                dp.set_capacity(MapName::PeersV4, capacity);
            }
            let (mut full, mut shared) = (Reconciler::new(), Reconciler::new());
            for (v4, v6, verify) in steps {
                if verify {
                    full.verify_kernel();
                    shared.verify_kernel();
                }
                let s = Arc::new(with_peers(&v4, &v6));
                let a = full.apply(&s, &mut full_dp, &routes()).unwrap();
                let b = shared.apply_shared(&s, &[], &mut shared_dp, &routes()).unwrap();
                proptest::prop_assert_eq!(&full_dp.peers_v4.entries, &shared_dp.peers_v4.entries);
                proptest::prop_assert_eq!(&full_dp.peers_v6.entries, &shared_dp.peers_v6.entries);
                proptest::prop_assert_eq!(&full_dp.endpoints.entries, &shared_dp.endpoints.entries);
                proptest::prop_assert_eq!(&full_dp.policy.entries, &shared_dp.policy.entries);
                proptest::prop_assert_eq!(
                    (a.written, a.removed, &a.unresolved, &a.missing),
                    (b.written, b.removed, &b.unresolved, &b.missing)
                );
                // The next apply takes the short way whenever every peer entry is held.
                proptest::prop_assert_eq!(shared.last.is_some(), b.unresolved.is_empty());
            }
        }
    }

    #[test]
    fn attaches_writes_and_bumps_epochs_only_on_change() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        let rep = r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        assert!(rep.complete());
        assert_eq!(dp.links, BTreeSet::from([11, 12]));
        let e1 = dp.endpoints.entries[&11].epoch;
        let e2 = dp.endpoints.entries[&12].epoch;
        // Same state: nothing written, epochs unchanged.
        let rep = r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        assert_eq!((rep.written, rep.removed), (0, 0));
        assert_eq!(dp.endpoints.entries[&11].epoch, e1);
        // Policy of endpoint 1 changes: only its epoch moves, before the old key's removal and
        // once more after it.
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert_eq!(
            (rep.written, rep.removed),
            (3, 1),
            "new policy key + endpoint 1 epoch twice, old key removed"
        );
        assert_eq!(dp.endpoints.entries[&11].epoch, e1 + 2);
        assert_eq!(dp.endpoints.entries[&12].epoch, e2);
    }

    #[test]
    fn removed_pod_is_detached_and_forgotten_and_missing_route_is_pending() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        let rep = r.apply(&state(80, false), &mut dp, &routes()).unwrap();
        assert_eq!(rep.detached, vec![12]);
        assert_eq!(dp.forgotten, vec![2]);
        assert!(!dp.endpoints.entries.contains_key(&12));
        let rep = r
            .apply(&state(80, true), &mut dp, &FakeRoutes::default())
            .unwrap();
        assert_eq!(rep.pending.len(), 2);
        assert!(!rep.complete());
    }

    /// Routes whose table changes under the reconciler, with interfaces that outlive their
    /// routes.
    struct Flaky {
        routes: BTreeMap<IpAddr, u32>,
        interfaces: BTreeSet<u32>,
        refused: BTreeMap<IpAddr, String>,
    }

    impl Routes for Flaky {
        fn ifindex_for(&self, ip: IpAddr) -> Result<Option<u32>> {
            Ok(self.routes.get(&ip).copied())
        }
        fn locate(&self, ip: IpAddr) -> Result<Located> {
            Ok(match (self.routes.get(&ip), self.refused.get(&ip)) {
                (Some(i), _) => Located::Found(*i),
                (None, Some(why)) => Located::Unsupported(why.clone()),
                (None, None) => Located::NotYet(format!("no route to {ip}")),
            })
        }
        fn exists(&self, ifindex: u32) -> bool {
            self.interfaces.contains(&ifindex)
        }
        fn interfaces(&self) -> Result<Vec<(u32, String)>> {
            Ok(self
                .interfaces
                .iter()
                .map(|i| (*i, format!("veth{i}")))
                .collect())
        }
    }

    #[test]
    fn a_pod_whose_route_is_gone_keeps_its_interface_while_it_exists() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        let mut net = Flaky {
            routes: routes().routes,
            interfaces: BTreeSet::from([11, 12]),
            refused: BTreeMap::new(),
        };
        r.apply(&state(80, true), &mut dp, &net).unwrap();
        let before = dp.endpoints.entries.clone();
        // The route of pod 1 goes (a CNI restart): programs and entries stay, said as kept.
        net.routes.remove(&"10.0.0.1".parse().unwrap());
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(rep.kept.len(), 1);
        assert_eq!(rep.kept[0].1, 11);
        assert!(rep.detached.is_empty());
        assert_eq!(dp.links, BTreeSet::from([11, 12]));
        assert_eq!(dp.endpoints.entries, before, "entries and epochs unchanged");
        // A restarted agent keeps it too (from the pinned entry's address).
        let mut r = Reconciler::new();
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!((rep.kept.len(), rep.detached.len()), (1, 0));
        // Back: found again, nothing written.
        net.routes = routes().routes;
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert!(rep.kept.is_empty() && rep.written == 0);
        // The interface goes too: detached, pending.
        net.routes.remove(&"10.0.0.1".parse().unwrap());
        net.interfaces.remove(&11);
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.detached, [11]);
        assert_eq!(rep.pending.len(), 1);
        assert!(!rep.complete());
    }

    #[test]
    fn an_interface_several_pods_lead_to_goes_to_none_and_refusals_are_failures() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        let mut net = Flaky {
            routes: BTreeMap::from([
                ("10.0.0.1".parse().unwrap(), 11),
                ("10.0.0.2".parse().unwrap(), 11),
            ]),
            interfaces: BTreeSet::from([11]),
            refused: BTreeMap::new(),
        };
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert!(
            dp.links.is_empty(),
            "a shared device gets no pod's programs"
        );
        assert_eq!(rep.failed.len(), 2);
        assert!(rep.failed[0].1.contains("shared device"), "{rep:?}");
        // A refused layout is a failure with its reason, not a pending pod.
        net.routes.clear();
        net.refused
            .insert("10.0.0.1".parse().unwrap(), "cni0 (a bridge)".into());
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.failed.len(), 1);
        assert_eq!(rep.failed[0].1, "cni0 (a bridge)");
        assert_eq!(rep.pending.len(), 1);
        // Once a pod has its interface, another pod's address leading there does not take it.
        net.refused.clear();
        net.routes = routes().routes;
        r.apply(&state(80, true), &mut dp, &net).unwrap();
        net.routes.insert("10.0.0.2".parse().unwrap(), 11);
        net.interfaces.insert(12);
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(dp.links, BTreeSet::from([11, 12]), "{rep:?}");
        assert!(rep.failed.is_empty() && rep.kept.len() == 1, "{rep:?}");
    }

    /// One write the reconciler made, as the program would see it take effect.
    #[derive(Clone, Debug)]
    enum Step {
        Endpoint(u32, Option<EndpointInfo>),
        Peer4([u8; 4], Option<PeerInfo>),
        Cidr4(Prefix<Ipv4Addr>, Option<PeerInfo>),
        Policy(PolicyKey, Option<PolicyValue>),
        Other,
    }

    /// The journaled writes of `dp`, in the order they happened.
    fn steps(dp: &FakeDatapath) -> Vec<Step> {
        fn of<K: Ord + Copy, V: Copy>(
            t: &crate::reconcile::fake::FakeTable<K, V>,
            step: impl Fn(K, Option<V>) -> Step,
        ) -> Vec<(usize, Step)> {
            let j = t.journal.as_ref().expect("journal started");
            j.writes
                .iter()
                .map(|(n, k, v)| (*n, step(*k, *v)))
                .collect()
        }
        let mut all = of(&dp.endpoints, Step::Endpoint);
        all.extend(of(&dp.peers_v4, Step::Peer4));
        all.extend(of(&dp.peers_v6, |_, _| Step::Other));
        all.extend(of(&dp.cidrs_v4, Step::Cidr4));
        all.extend(of(&dp.cidrs_v6, |_, _| Step::Other));
        all.extend(of(&dp.policy, Step::Policy));
        all.sort_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// What the datapath holds, as a [`DesiredState`] the map-level `decide` reads (x/a on
    /// interface 11).
    fn as_state(dp: &FakeDatapath) -> DesiredState {
        let mut s = DesiredState::default();
        for (ifindex, info) in &dp.endpoints.entries {
            assert_eq!(*ifindex, 11);
            s.endpoints.insert(
                PodRef::new("x", "a"),
                EndpointState {
                    info: *info,
                    ips: vec![Ipv4Addr::from(info.ipv4).into()],
                },
            );
        }
        for (a, p) in &dp.peers_v4.entries {
            s.peers_v4.insert(Ipv4Addr::from(*a), *p);
        }
        s.cidrs_v4 = dp.cidrs_v4.entries.clone();
        s.policy = dp.policy.entries.clone();
        s
    }

    /// x/a (endpoint 1) admits TCP/80 from the identities in `allowed`; `peers` and `regions`
    /// give the identities of addresses and /prefixes.
    fn admits(allowed: &[u32], peers: &[(&str, u32)], regions: &[(&str, u8, u32)]) -> DesiredState {
        let mut s = state(80, false);
        s.policy.clear();
        for ep in s.endpoints.values_mut() {
            // Exact ports: the program probes the full 16-bit prefix.
            ep.info.port_masks[usize::from(DIR_INGRESS)] = 1 << 16;
        }
        for id in allowed {
            s.policy.insert(
                PolicyKey::new(1, *id, DIR_INGRESS, PROTO_TCP, 80, 16),
                PolicyValue { rule: *id, _pad: 0 },
            );
        }
        for (a, id) in peers {
            let info = PeerInfo {
                identity: *id,
                flags: 0,
            };
            s.peers_v4.insert(a.parse().unwrap(), info);
        }
        for (a, len, id) in regions {
            let info = PeerInfo {
                identity: *id,
                flags: 0,
            };
            s.cidrs_v4.insert(
                Prefix {
                    addr: a.parse().unwrap(),
                    len: *len,
                },
                info,
            );
        }
        s
    }

    /// Replays every write of a change one at a time: each probe's verdict in every state in
    /// between is its verdict before or after the change, and where both are the same, that.
    /// A state in between that shows the final epoch judges as the final state does: conntrack
    /// keeps a verdict made under the current epoch without a re-check.
    #[test]
    fn no_state_in_between_judges_a_flow_as_neither_side_does() {
        use enforcer_policy::decision::decide;
        let a = PodRef::new("x", "a");
        let probes = ["10.0.0.2", "10.0.0.3", "10.0.9.5", "10.0.200.1", "10.9.0.1"];
        let cases = [
            (
                "relabel: 10.0.0.2 moves to a new identity, admitted under both",
                admits(&[301], &[("10.0.0.2", 301), ("10.0.0.3", 303)], &[]),
                admits(&[302], &[("10.0.0.2", 302), ("10.0.0.3", 303)], &[]),
            ),
            (
                "an ipBlock widened: 10.0.9.0/24 replaced by 10.0.0.0/16, admitted under both",
                admits(&[400], &[("10.0.0.3", 303)], &[("10.0.9.0", 24, 400)]),
                admits(&[401], &[("10.0.0.3", 303)], &[("10.0.0.0", 16, 401)]),
            ),
            (
                "a relabel out of the admitted identity",
                admits(&[301], &[("10.0.0.2", 301), ("10.0.0.3", 301)], &[]),
                admits(&[301], &[("10.0.0.2", 302), ("10.0.0.3", 301)], &[]),
            ),
            (
                "a rule removed: 10.0.0.3's identity is no longer admitted",
                admits(&[301, 303], &[("10.0.0.2", 301), ("10.0.0.3", 303)], &[]),
                admits(&[301], &[("10.0.0.2", 301), ("10.0.0.3", 303)], &[]),
            ),
        ];
        for (what, old, new) in cases {
            let mut dp = FakeDatapath::default();
            let mut r = Reconciler::new();
            r.apply(&old, &mut dp, &routes()).unwrap();
            let mut now = as_state(&dp);
            dp.start_journal();
            r.apply(&new, &mut dp, &routes()).unwrap();
            let steps = steps(&dp);
            let final_epoch = dp.endpoints.entries[&11].epoch;
            assert!(!steps.is_empty(), "{what}: the change wrote nothing");
            let verdict = |s: &DesiredState, p: &str| {
                decide(s, &a, DIR_INGRESS, p.parse().unwrap(), PROTO_TCP, 80).allowed
            };
            assert!(
                probes.iter().any(|p| verdict(&old, p) && verdict(&new, p))
                    && probes
                        .iter()
                        .any(|p| !verdict(&old, p) && !verdict(&new, p)),
                "{what}: some probe is admitted, and some refused, on both sides"
            );
            for (i, step) in steps.iter().enumerate() {
                match step {
                    Step::Endpoint(ifindex, info) => {
                        assert_eq!(*ifindex, 11, "x/a's interface");
                        match info {
                            Some(info) => now.endpoints.get_mut(&a).unwrap().info = *info,
                            None => drop(now.endpoints.remove(&a)),
                        }
                    }
                    Step::Peer4(k, v) => match v {
                        Some(v) => drop(now.peers_v4.insert(Ipv4Addr::from(*k), *v)),
                        None => drop(now.peers_v4.remove(&Ipv4Addr::from(*k))),
                    },
                    Step::Cidr4(k, v) => match v {
                        Some(v) => drop(now.cidrs_v4.insert(*k, *v)),
                        None => drop(now.cidrs_v4.remove(k)),
                    },
                    Step::Policy(k, v) => match v {
                        Some(v) => drop(now.policy.insert(*k, *v)),
                        None => drop(now.policy.remove(k)),
                    },
                    Step::Other => {}
                }
                let epoch = now.endpoints.get(&a).map(|e| e.info.epoch);
                for p in probes {
                    let (before, after, between) =
                        (verdict(&old, p), verdict(&new, p), verdict(&now, p));
                    assert!(
                        between == before || between == after,
                        "{what}: after write {i} ({step:?}) {p} -> x/a:80 is {between}, before {before}, after {after}"
                    );
                    assert!(
                        epoch != Some(final_epoch) || between == after,
                        "{what}: after write {i} ({step:?}) {p} -> x/a:80 is {between} under the final epoch, finally {after}: a flow judged now is never re-checked"
                    );
                }
            }
            assert_eq!(
                as_state(&dp).policy,
                new.policy,
                "{what}: ends at the new state"
            );
        }
    }

    #[test]
    fn restart_adopts_pinned_state_and_rechecks_flows_once() {
        let mut dp = FakeDatapath::default();
        Reconciler::new()
            .apply(&state(80, true), &mut dp, &routes())
            .unwrap();
        let before = dp.endpoints.entries[&11].epoch;
        // A new agent process: same desired state, maps as pinned.
        let mut r = Reconciler::new();
        let rep = r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        assert!(
            rep.attached.is_empty(),
            "links were adopted, not re-created"
        );
        assert_eq!(dp.endpoints.entries[&11].epoch, before + 1);
        assert_eq!(rep.removed, 0);
    }

    #[test]
    fn later_applies_diff_against_the_shadow_and_verify_kernel_repairs_drift() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        let reads = dp.policy.reads.get();
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert_eq!((rep.written, rep.removed), (3, 1));
        assert_eq!(
            dp.policy.reads.get(),
            reads,
            "a change is diffed in memory, not read back"
        );
        // Drift behind the agent's back: unseen until the kernel is verified, then repaired.
        let key = PolicyKey::new(1, 301, DIR_INGRESS, PROTO_TCP, 81, 16);
        dp.policy.entries.remove(&key);
        dp.policy.entries.insert(
            PolicyKey::new(9, 9, DIR_INGRESS, PROTO_TCP, 9, 16),
            PolicyValue { rule: 9, _pad: 0 },
        );
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert_eq!((rep.written, rep.removed), (0, 0));
        r.verify_kernel();
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert_eq!((rep.written, rep.removed), (1, 1));
        assert_eq!(dp.policy.entries, state(81, true).policy);
    }

    #[test]
    fn a_refused_write_is_left_out_and_the_next_apply_compares_with_the_kernel() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        dp.policy.fail_writes = true;
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert!(!rep.complete());
        assert_eq!(
            rep.unprogrammed,
            [Unprogrammed {
                pod: PodRef::new("x", "a"),
                map: MapName::Policy,
                ingress: true,
                egress: false,
            }]
        );
        assert!(rep.refused.contains_key(&MapName::Policy));
        assert!(
            dp.policy.entries.is_empty(),
            "the stale port-80 entry is removed all the same, the new one is not there"
        );
        assert_eq!(
            dp.endpoints.entries[&11].flags & EP_INGRESS_ISOLATED,
            EP_INGRESS_ISOLATED,
            "x/a stays isolated: denied, not open"
        );
        dp.policy.fail_writes = false;
        let reads = dp.policy.reads.get();
        let rep = r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert!(dp.policy.reads.get() > reads, "compared with the kernel");
        assert_eq!(dp.policy.entries, state(81, true).policy);
    }

    // A full map: what does not fit is left out so that it only denies, is reported, and
    // converges when room comes back.

    /// Pod `i`: x/p{i} at 10.0.1.{i} on interface 100 + i, endpoint id i, identity 300 + i.
    fn pod_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, u8::try_from(i).unwrap())
    }

    fn pod_ref(i: u32) -> PodRef {
        PodRef::new("x", format!("p{i}"))
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(10, 250, 255, 1);

    /// Pods `pods`, each isolated both ways; `allow` = (endpoint, peer identity, direction, TCP
    /// port) entries; `regions` = (prefix, length, identity).
    fn cluster(
        pods: &[u32],
        allow: &[(u32, u32, u8, u16)],
        regions: &[(&str, u8, u32)],
    ) -> DesiredState {
        use enforcer_common::EP_EGRESS_ISOLATED;
        let mut s = DesiredState::default();
        for &i in pods {
            let ip = pod_ip(i);
            s.endpoints.insert(
                pod_ref(i),
                EndpointState {
                    info: EndpointInfo {
                        id: i,
                        flags: EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_HAS_V4,
                        identity: 300 + i,
                        ipv4: ip.octets(),
                        port_masks: [1 << 16, 1 << 16],
                        ..Default::default()
                    },
                    ips: vec![ip.into()],
                },
            );
            s.peers_v4.insert(
                ip,
                PeerInfo {
                    identity: 300 + i,
                    flags: 0,
                },
            );
        }
        s.peers_v4.insert(
            NODE,
            PeerInfo {
                identity: enforcer_common::IDENTITY_HOST,
                flags: 0,
            },
        );
        for &(ep, id, dir, port) in allow {
            s.policy.insert(
                PolicyKey::new(ep, id, dir, PROTO_TCP, port, 16),
                PolicyValue { rule: ep, _pad: 0 },
            );
        }
        for (a, len, id) in regions {
            s.cidrs_v4.insert(
                Prefix {
                    addr: a.parse().unwrap(),
                    len: *len,
                },
                PeerInfo {
                    identity: *id,
                    flags: 0,
                },
            );
        }
        s
    }

    fn pod_routes(pods: impl IntoIterator<Item = u32>) -> FakeRoutes {
        FakeRoutes::new(
            pods.into_iter()
                .map(|i| (pod_ip(i).into(), 100 + i))
                .collect(),
        )
    }

    /// Whether the datapath as `dp` holds it lets a new TCP flow to `port` through at pod `i`
    /// in `dir` with `peer`: a pod without programs is not filtered at all, one with programs
    /// and no entry drops everything (`DROP_UNPROGRAMMED`), else as the program decides.
    fn kernel_allows(dp: &FakeDatapath, i: u32, dir: u8, peer: Ipv4Addr, port: u16) -> bool {
        use enforcer_policy::decision::decide;
        let ifindex = 100 + i;
        if !dp.links.contains(&ifindex) {
            return true;
        }
        let Some(info) = dp.endpoints.entries.get(&ifindex) else {
            return false;
        };
        let mut s = DesiredState::default();
        s.endpoints.insert(
            pod_ref(i),
            EndpointState {
                info: *info,
                ips: vec![Ipv4Addr::from(info.ipv4).into()],
            },
        );
        for (a, p) in &dp.peers_v4.entries {
            s.peers_v4.insert(Ipv4Addr::from(*a), *p);
        }
        s.cidrs_v4 = dp.cidrs_v4.entries.clone();
        s.policy = dp.policy.entries.clone();
        decide(&s, &pod_ref(i), dir, peer.into(), PROTO_TCP, port).allowed
    }

    fn desired_allows(s: &DesiredState, i: u32, dir: u8, peer: Ipv4Addr, port: u16) -> bool {
        enforcer_policy::decision::decide(s, &pod_ref(i), dir, peer.into(), PROTO_TCP, port).allowed
    }

    /// Every flow the datapath lets through, the desired state lets through too (fail closed),
    /// over every pod, direction, peer in `peers` and port in `ports`; returns the flows the
    /// desired state allows and the datapath denies.
    fn denies_only(
        dp: &FakeDatapath,
        s: &DesiredState,
        pods: &[u32],
        peers: &[Ipv4Addr],
        ports: &[u16],
    ) -> Vec<(u32, u8, Ipv4Addr, u16)> {
        let mut denied = Vec::new();
        for &i in pods {
            for dir in [DIR_INGRESS, enforcer_common::DIR_EGRESS] {
                for &peer in peers {
                    for &port in ports {
                        let (k, d) = (
                            kernel_allows(dp, i, dir, peer, port),
                            desired_allows(s, i, dir, peer, port),
                        );
                        assert!(
                            !k || d,
                            "pod {i} dir {dir} peer {peer} port {port}: allowed by the datapath, denied by the policy"
                        );
                        if d && !k {
                            denied.push((i, dir, peer, port));
                        }
                    }
                }
            }
        }
        denied
    }

    #[test]
    fn a_small_policy_map_programs_whole_endpoints_and_denies_the_rest() {
        use enforcer_common::DIR_EGRESS;
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        // Before: p1 admits p2 on 79 (an entry that goes stale).
        let before = cluster(&[1, 2, 3], &[(1, 302, DIR_INGRESS, 79)], &[]);
        r.apply(&before, &mut dp, &pod_routes(1..=4)).unwrap();
        dp.set_capacity(MapName::Policy, Some(3));
        // After: p1 admits p2 on 80 and 81; p2 admits p1 on 80 and may reach p3 on 80; p3 may
        // reach p1 on 80; p4 is new, isolated, without rules.
        let allow = [
            (1, 302, DIR_INGRESS, 80),
            (1, 302, DIR_INGRESS, 81),
            (2, 301, DIR_INGRESS, 80),
            (2, 303, DIR_EGRESS, 80),
            (3, 301, DIR_EGRESS, 80),
        ];
        let after = cluster(&[1, 2, 3, 4], &allow, &[]);
        let rep = r.apply(&after, &mut dp, &pod_routes(1..=4)).unwrap();
        assert!(!rep.complete());
        assert_eq!(
            rep.unprogrammed,
            [Unprogrammed {
                pod: pod_ref(2),
                map: MapName::Policy,
                ingress: true,
                egress: true,
            }],
            "p1 (2 entries) and p3 (1) fit in 3, p2's pair is left out whole"
        );
        assert_eq!(rep.missing, BTreeMap::from([(MapName::Policy, 2)]));
        assert!(rep.pending.is_empty() && rep.failed.is_empty());
        assert_eq!(
            dp.links,
            BTreeSet::from([101, 102, 103, 104]),
            "p4 attached"
        );
        assert_eq!(
            dp.endpoints.entries.len(),
            4,
            "every endpoint has its entry"
        );
        for info in dp.endpoints.entries.values() {
            assert!(info.isolated(DIR_INGRESS) && info.isolated(DIR_EGRESS));
        }
        assert!(
            !dp.policy.entries.contains_key(&PolicyKey::new(
                1,
                302,
                DIR_INGRESS,
                PROTO_TCP,
                79,
                16
            )),
            "the stale entry is removed"
        );
        assert_eq!(dp.policy.entries.len(), 3);
        let peers: Vec<Ipv4Addr> = (1..=4).map(pod_ip).chain([NODE]).collect();
        let denied = denies_only(&dp, &after, &[1, 2, 3, 4], &peers, &[79, 80, 81]);
        assert_eq!(
            denied,
            [
                (2, DIR_INGRESS, pod_ip(1), 80),
                (2, DIR_EGRESS, pod_ip(3), 80)
            ],
            "only p2's rules are missing"
        );

        // Room comes back: everything converges, and p2's epoch moves (its flows re-checked).
        let epoch = dp.endpoints.entries[&102].epoch;
        dp.set_capacity(MapName::Policy, Some(5));
        let rep = r.apply(&after, &mut dp, &pod_routes(1..=4)).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(dp.policy.entries, after.policy);
        assert_ne!(dp.endpoints.entries[&102].epoch, epoch);
        assert!(denies_only(&dp, &after, &[1, 2, 3, 4], &peers, &[79, 80, 81]).is_empty());
        let rep = r.apply(&after, &mut dp, &pod_routes(1..=4)).unwrap();
        assert_eq!((rep.written, rep.removed), (0, 0), "settled");
    }

    #[test]
    fn removals_make_room_in_the_same_apply() {
        let mut dp = FakeDatapath::default();
        dp.set_capacity(MapName::Policy, Some(2));
        let mut r = Reconciler::new();
        let old = cluster(
            &[1],
            &[(1, 302, DIR_INGRESS, 79), (1, 302, DIR_INGRESS, 78)],
            &[],
        );
        assert!(r.apply(&old, &mut dp, &pod_routes([1])).unwrap().complete());
        // Both entries replaced: no room until the old ones go, then all in one apply.
        let new = cluster(
            &[1],
            &[(1, 302, DIR_INGRESS, 80), (1, 302, DIR_INGRESS, 81)],
            &[],
        );
        let rep = r.apply(&new, &mut dp, &pod_routes([1])).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(dp.policy.entries, new.policy);
    }

    #[test]
    fn a_full_endpoints_map_attaches_the_extra_pods_without_an_entry() {
        let mut dp = FakeDatapath::default();
        dp.set_capacity(MapName::Endpoints, Some(2));
        let mut r = Reconciler::new();
        let s = cluster(&[1, 2, 3], &[(1, 302, DIR_INGRESS, 80)], &[]);
        // p5 got no endpoint id from the compiler (more pods than ids); p6 has no interface.
        let unnumbered = [
            (pod_ref(5), vec![IpAddr::from(pod_ip(5))]),
            (pod_ref(6), vec![IpAddr::from(pod_ip(6))]),
        ];
        let rep = r
            .apply_with(&s, &unnumbered, &mut dp, &pod_routes([1, 2, 3, 5]))
            .unwrap();
        let both = |i, map| Unprogrammed {
            pod: pod_ref(i),
            map,
            ingress: true,
            egress: true,
        };
        assert_eq!(
            rep.unprogrammed,
            [both(3, MapName::Endpoints), both(5, MapName::Endpoints)]
        );
        assert_eq!(
            rep.pending
                .iter()
                .map(|(p, _)| p.clone())
                .collect::<Vec<_>>(),
            [pod_ref(6)]
        );
        assert_eq!(rep.missing, BTreeMap::from([(MapName::Endpoints, 3)]));
        assert_eq!(
            dp.links,
            BTreeSet::from([101, 102, 103, 105]),
            "all attached"
        );
        assert_eq!(
            dp.endpoints.entries.keys().copied().collect::<Vec<_>>(),
            [101, 102]
        );
        let peers: Vec<Ipv4Addr> = (1..=3).map(pod_ip).chain([NODE]).collect();
        let denied = denies_only(&dp, &s, &[1, 2, 3], &peers, &[80]);
        assert!(
            denied.iter().all(|d| d.0 == 3) && !denied.is_empty(),
            "only p3 denied beyond its policy: {denied:?}"
        );
        for peer in &peers {
            for dir in [DIR_INGRESS, enforcer_common::DIR_EGRESS] {
                assert!(
                    !kernel_allows(&dp, 5, dir, *peer, 80),
                    "p5 denied both ways"
                );
            }
        }

        // p2 goes: its entry makes room for p3.
        let s = cluster(&[1, 3], &[(1, 302, DIR_INGRESS, 80)], &[]);
        let rep = r
            .apply_with(&s, &unnumbered[..1], &mut dp, &pod_routes([1, 3, 5]))
            .unwrap();
        assert_eq!(rep.unprogrammed, [both(5, MapName::Endpoints)]);
        assert_eq!(
            dp.endpoints.entries.keys().copied().collect::<Vec<_>>(),
            [101, 103]
        );
        assert_eq!(dp.links, BTreeSet::from([101, 103, 105]), "p2 detached");
        assert_eq!(rep.detached, [102]);
        // p5 gets an id: programmed.
        let s = cluster(&[1, 3, 5], &[(1, 302, DIR_INGRESS, 80)], &[]);
        dp.set_capacity(MapName::Endpoints, Some(3));
        let rep = r.apply(&s, &mut dp, &pod_routes([1, 3, 5])).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert!(dp.endpoints.entries.contains_key(&105));
    }

    #[test]
    fn a_refused_identity_change_leaves_no_stale_identity() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        // p1 admits identity 302 (p2).
        let s = cluster(&[1, 2], &[(1, 302, DIR_INGRESS, 80)], &[]);
        r.apply(&s, &mut dp, &pod_routes([1, 2])).unwrap();
        assert!(kernel_allows(&dp, 1, DIR_INGRESS, pod_ip(2), 80));
        // p2 is relabeled: its address now has identity 399, which p1 does not admit; the
        // write is refused.
        let mut relabeled = s.clone();
        relabeled.peers_v4.get_mut(&pod_ip(2)).unwrap().identity = 399;
        dp.peers_v4.fail_writes = true;
        let rep = r.apply(&relabeled, &mut dp, &pod_routes([1, 2])).unwrap();
        assert_eq!(rep.unresolved, [IpAddr::from(pod_ip(2))]);
        assert!(rep.refused.contains_key(&MapName::PeersV4));
        assert!(
            !dp.peers_v4.entries.contains_key(&pod_ip(2).octets()),
            "the old identity is removed, not kept"
        );
        assert!(
            !kernel_allows(&dp, 1, DIR_INGRESS, pod_ip(2), 80),
            "p2 no longer passes as its old identity"
        );
        dp.peers_v4.fail_writes = false;
        let rep = r.apply(&relabeled, &mut dp, &pod_routes([1, 2])).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(dp.peers_v4.entries[&pod_ip(2).octets()].identity, 399);
    }

    #[test]
    fn a_full_peer_map_keeps_the_node_and_resolves_the_rest_by_region() {
        let mut dp = FakeDatapath::default();
        dp.set_capacity(MapName::PeersV4, Some(2));
        let mut r = Reconciler::new();
        // p1 admits p2 by pod identity, and 10.0.0.0/16 by an ipBlock: the region's identity
        // 400, and (as the compiler gives pod identities the ipBlocks their address is in) the
        // pod identities inside it, 302 and 303.
        let s = cluster(
            &[1, 2, 3],
            &[
                (1, 302, DIR_INGRESS, 80),
                (1, 400, DIR_INGRESS, 81),
                (1, 302, DIR_INGRESS, 81),
                (1, 303, DIR_INGRESS, 81),
            ],
            &[("10.0.0.0", 16, 400)],
        );
        let rep = r.apply(&s, &mut dp, &pod_routes([1, 2, 3])).unwrap();
        assert!(
            dp.peers_v4.entries.contains_key(&NODE.octets()),
            "the node's address first"
        );
        assert_eq!(rep.unresolved.len(), 2, "{rep:?}");
        assert_eq!(rep.missing, BTreeMap::from([(MapName::PeersV4, 2)]));
        let peers: Vec<Ipv4Addr> = (1..=3).map(pod_ip).chain([NODE]).collect();
        denies_only(&dp, &s, &[1, 2, 3], &peers, &[80, 81]);
        dp.set_capacity(MapName::PeersV4, None);
        assert!(
            r.apply(&s, &mut dp, &pod_routes([1, 2, 3]))
                .unwrap()
                .complete()
        );
    }

    #[test]
    fn a_missing_region_takes_the_rules_of_its_ancestor_out() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        // p1 admits the ipBlock 10.9.0.0/16 (region identity 400) on 80.
        let s = cluster(&[1], &[(1, 400, DIR_INGRESS, 80)], &[("10.9.0.0", 16, 400)]);
        r.apply(&s, &mut dp, &pod_routes([1])).unwrap();
        let inside: Ipv4Addr = "10.9.1.1".parse().unwrap();
        let except: Ipv4Addr = "10.9.200.1".parse().unwrap();
        assert!(kernel_allows(&dp, 1, DIR_INGRESS, except, 80));
        // The block gains `except: 10.9.200.0/24` (region identity 401, not admitted), and the
        // trie has no room for it: its addresses would resolve to 400 and be allowed.
        dp.set_capacity(MapName::CidrsV4, Some(1));
        let s2 = cluster(
            &[1],
            &[(1, 400, DIR_INGRESS, 80)],
            &[("10.9.0.0", 16, 400), ("10.9.200.0", 24, 401)],
        );
        let rep = r.apply(&s2, &mut dp, &pod_routes([1])).unwrap();
        assert_eq!(
            rep.unprogrammed,
            [Unprogrammed {
                pod: pod_ref(1),
                map: MapName::CidrsV4,
                ingress: true,
                egress: false,
            }]
        );
        assert!(
            !kernel_allows(&dp, 1, DIR_INGRESS, except, 80),
            "the except holds"
        );
        assert!(
            !kernel_allows(&dp, 1, DIR_INGRESS, inside, 80),
            "denied: fail closed"
        );
        denies_only(&dp, &s2, &[1], &[inside, except, pod_ip(1), NODE], &[80]);
        dp.set_capacity(MapName::CidrsV4, Some(2));
        assert!(r.apply(&s2, &mut dp, &pod_routes([1])).unwrap().complete());
        assert!(kernel_allows(&dp, 1, DIR_INGRESS, inside, 80));
        assert!(!kernel_allows(&dp, 1, DIR_INGRESS, except, 80));
    }

    #[test]
    fn region_ancestors() {
        let p = Prefix {
            addr: "10.9.200.0".parse::<Ipv4Addr>().unwrap(),
            len: 24,
        };
        assert_eq!(
            ancestor(&p, 16),
            Prefix {
                addr: "10.9.0.0".parse().unwrap(),
                len: 16
            }
        );
        assert_eq!(ancestor(&p, 0).addr, Ipv4Addr::UNSPECIFIED);
        let p6 = Prefix {
            addr: "fd00:1:2::".parse::<Ipv6Addr>().unwrap(),
            len: 48,
        };
        assert_eq!(
            ancestor(&p6, 32).addr,
            "fd00:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(ancestor(&p6, 0).addr, Ipv6Addr::UNSPECIFIED);
    }

    /// The state the compiler makes of `yaml` (node address [`NODE`]).
    fn compiled(yaml: &str) -> DesiredState {
        use crate::source::manifests::{Loaded, finish, load_text};
        use enforcer_policy::compile::{Allocations, CompileOptions, compile};
        let mut loaded = Loaded::default();
        load_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        finish(&mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let opts = CompileOptions {
            node_ips: vec![NODE.into()],
            ..CompileOptions::default()
        };
        let out = compile(&loaded.cluster, &opts, &mut Allocations::new());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out.state
    }

    /// Compiled states, every combination of small maps: whatever is left out, the datapath
    /// never allows what the policy denies, and with room back it converges.
    #[test]
    fn compiled_states_in_small_maps_deny_only() {
        let mut yaml = String::new();
        for (i, role) in [(1, "server"), (2, "client"), (3, "client"), (4, "none")] {
            yaml.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: x\n  labels:\n    role: {role}\nspec:\n  containers:\n  - name: c\n    image: i\nstatus:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n---\n",
                ip = pod_ip(i)
            ));
        }
        yaml.push_str(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      role: server\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          role: client\n    ports:\n    - port: 80\n  - from:\n    - ipBlock:\n        cidr: 10.0.0.0/16\n        except: [10.0.1.3/32, 10.0.9.0/24]\n    ports:\n    - port: 81\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: client\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      role: client\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 10.0.0.0/8\n        except: [10.0.1.0/24]\n    ports:\n    - port: 80\n  - to:\n    - podSelector:\n        matchLabels:\n          role: server\n    ports:\n    - port: 81\n",
        );
        let s = compiled(&yaml);
        assert!(!s.cidrs_v4.is_empty() && s.policy.len() > 4, "{s:?}");
        let pods = [1, 2, 3, 4];
        let peers: Vec<Ipv4Addr> = (1..=4)
            .map(pod_ip)
            .chain([NODE])
            .chain(["10.0.9.9", "10.0.1.77", "10.9.9.9", "192.168.1.1"].map(|a| a.parse().unwrap()))
            .collect();
        let ports = [80, 81];
        let all_allowed = denies_only(&FakeDatapath::default(), &s, &[], &peers, &ports);
        assert!(all_allowed.is_empty());
        let mut cases = 0;
        for peers_cap in [Some(1), Some(3), None] {
            for cidrs_cap in [Some(0), Some(1), Some(2), None] {
                for policy_cap in [Some(0), Some(2), Some(5), None] {
                    for endpoints_cap in [Some(2), None] {
                        let mut dp = FakeDatapath::default();
                        dp.set_capacity(MapName::PeersV4, peers_cap);
                        dp.set_capacity(MapName::CidrsV4, cidrs_cap);
                        dp.set_capacity(MapName::Policy, policy_cap);
                        dp.set_capacity(MapName::Endpoints, endpoints_cap);
                        let mut r = Reconciler::new();
                        let rep = r.apply(&s, &mut dp, &pod_routes(pods)).unwrap();
                        assert_eq!(dp.links.len(), 4, "every pod attached");
                        let denied = denies_only(&dp, &s, &pods, &peers, &ports);
                        let full = [peers_cap, cidrs_cap, policy_cap, endpoints_cap] != [None; 4];
                        assert_eq!(
                            rep.complete(),
                            denied.is_empty() && rep.missing.is_empty(),
                            "{rep:?}"
                        );
                        if !full {
                            assert!(rep.complete());
                        }
                        for cap in [
                            MapName::PeersV4,
                            MapName::CidrsV4,
                            MapName::Policy,
                            MapName::Endpoints,
                        ] {
                            dp.set_capacity(cap, None);
                        }
                        let rep = r.apply(&s, &mut dp, &pod_routes(pods)).unwrap();
                        assert!(rep.complete(), "{rep:?}");
                        assert!(denies_only(&dp, &s, &pods, &peers, &ports).is_empty());
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 96);
    }

    /// Pods a (interface 11) and b (12), with an uplink, a tunnel and a bridge.
    fn node_routes() -> FakeRoutes {
        let mut r = routes();
        r.others = BTreeMap::from([
            (2, "eth0".to_string()),
            (3, "vxlan0".to_string()),
            (20, "cni0".to_string()),
        ]);
        r
    }

    #[test]
    fn exits_go_on_every_interface_but_the_pods_veths() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        let rep = r.apply(&state(80, true), &mut dp, &node_routes()).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(dp.exits, BTreeSet::from([2, 3, 20]));
        assert_eq!(dp.links, BTreeSet::from([11, 12]));
        assert_eq!(rep.exit_attached, [2, 3, 20]);
        // Listed again on every apply; nothing to do while nothing changed.
        let rep = r.apply(&state(80, true), &mut dp, &node_routes()).unwrap();
        assert!(rep.exit_attached.is_empty() && rep.exit_detached.is_empty());
        // A new uplink is covered at the next apply.
        let mut net = node_routes();
        net.others.insert(4, "eth1".into());
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.exit_attached, [4]);
        assert_eq!(dp.exits, BTreeSet::from([2, 3, 4, 20]));
    }

    #[test]
    fn an_exit_comes_off_an_interface_that_goes_or_becomes_a_pods_veth() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        // b's veth (30) is up before its route is there: not a pod's veth yet, so it gets the
        // exit program.
        let mut net = node_routes();
        net.routes.remove(&"10.0.0.2".parse().unwrap());
        net.others.insert(30, "veth30".into());
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.pending.len(), 1);
        assert!(dp.exits.contains(&30));
        // b's route appears: its programs go there, the exit program comes off.
        net.routes.insert("10.0.0.2".parse().unwrap(), 30);
        net.others.remove(&30);
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.exit_detached, [30]);
        assert_eq!(rep.attached, [30]);
        assert!(!dp.exits.contains(&30) && dp.links.contains(&30));
        // The uplink goes.
        net.others.remove(&2);
        let rep = r.apply(&state(80, true), &mut dp, &net).unwrap();
        assert_eq!(rep.exit_detached, [2]);
        assert_eq!(dp.exits, BTreeSet::from([3, 20]));
        // A pod's veth whose pod left keeps no pod programs, and gets the exit program at the
        // next apply if it is still up.
        net.others.insert(30, "veth30".into());
        net.routes.remove(&"10.0.0.2".parse().unwrap());
        let rep = r.apply(&state(80, false), &mut dp, &net).unwrap();
        assert_eq!(rep.detached, [30]);
        let rep = r.apply(&state(80, false), &mut dp, &net).unwrap();
        assert_eq!(rep.exit_attached, [30]);
    }

    #[test]
    fn an_exit_that_cannot_be_attached_is_reported_and_retried() {
        let mut dp = FakeDatapath::default();
        dp.exit_failures.insert(2, "busy".into());
        let mut r = Reconciler::new();
        let rep = r.apply(&state(80, true), &mut dp, &node_routes()).unwrap();
        assert_eq!(rep.exit_failed, [("eth0".to_string(), "busy".to_string())]);
        assert!(
            !rep.complete(),
            "not ready while an interface has no exit program"
        );
        assert_eq!(dp.exits, BTreeSet::from([3, 20]), "the others still get it");
        assert_eq!(
            dp.links,
            BTreeSet::from([11, 12]),
            "the pods are still programmed"
        );
        dp.exit_failures.clear();
        let rep = r.apply(&state(80, true), &mut dp, &node_routes()).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(rep.exit_attached, [2]);
    }

    fn node_port(protocol: u8, port: u16) -> NodePortKey {
        NodePortKey {
            protocol,
            _pad: 0,
            port,
        }
    }

    #[test]
    fn node_ports_are_diffed_into_their_map() {
        use enforcer_common::{PROTO_SCTP, PROTO_UDP};
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        let mut s = state(80, true);
        s.node_ports = BTreeSet::from([node_port(PROTO_TCP, 30080), node_port(PROTO_UDP, 30053)]);
        let rep = r.apply(&s, &mut dp, &routes()).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(
            dp.node_ports.entries,
            BTreeMap::from([
                (node_port(PROTO_TCP, 30080), 1),
                (node_port(PROTO_UDP, 30053), 1)
            ])
        );
        let epoch = dp.endpoints.entries[&11].epoch;
        // One goes, one comes: one write, one removal; the epochs move (a node port changes
        // which flows are judged on a backend).
        s.node_ports = BTreeSet::from([node_port(PROTO_TCP, 30080), node_port(PROTO_SCTP, 30090)]);
        let before = dp.node_ports.reads.get();
        let rep = r.apply(&s, &mut dp, &routes()).unwrap();
        assert_eq!(
            dp.node_ports.entries.keys().copied().collect::<Vec<_>>(),
            [node_port(PROTO_TCP, 30080), node_port(PROTO_SCTP, 30090)]
        );
        assert_eq!(
            dp.node_ports.reads.get(),
            before,
            "diffed against the shadow"
        );
        assert_eq!(rep.removed, 1);
        assert!(dp.endpoints.entries[&11].epoch > epoch);
        // Written before the endpoint entries (the order of additions), removed after them.
        dp.start_journal();
        s.node_ports.insert(node_port(PROTO_TCP, 30443));
        let mut s2 = s.clone();
        s2.policy.clear();
        r.apply(&s2, &mut dp, &routes()).unwrap();
        let port_write = dp.node_ports.journal.as_ref().unwrap().writes[0].0;
        let first_endpoint = dp.endpoints.journal.as_ref().unwrap().writes[0].0;
        assert!(port_write < first_endpoint);
    }

    /// A node port left out is judged as traffic to the node (allowed): it is named, counted as
    /// missing and keeps the agent not ready, until there is room.
    #[test]
    fn a_full_node_ports_map_names_the_ports_it_left_out() {
        let mut dp = FakeDatapath::default();
        dp.set_capacity(MapName::NodePorts, Some(1));
        let mut r = Reconciler::new();
        let mut s = state(80, true);
        s.node_ports = BTreeSet::from([node_port(PROTO_TCP, 30080), node_port(PROTO_TCP, 30081)]);
        let rep = r.apply(&s, &mut dp, &routes()).unwrap();
        assert!(!rep.complete());
        assert_eq!(rep.node_ports_missing, [node_port(PROTO_TCP, 30081)]);
        assert_eq!(rep.missing.get(&MapName::NodePorts), Some(&1));
        assert!(rep.unprogrammed.is_empty(), "no pod is denied more for it");
        assert_eq!(
            r.fill().iter().find(|f| f.0 == MapName::NodePorts),
            Some(&(MapName::NodePorts, 1, Some(1)))
        );
        dp.set_capacity(MapName::NodePorts, None);
        let rep = r.apply(&s, &mut dp, &routes()).unwrap();
        assert!(rep.complete(), "{rep:?}");
        assert_eq!(dp.node_ports.entries.len(), 2);
    }
}
