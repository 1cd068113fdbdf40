//! Writes a [`DesiredState`] into the datapath without a window: every new or changed entry of
//! every map first (policy before the peers and CIDRs that resolve addresses to its identities,
//! all before the endpoint entries that turn isolation on, endpoint entries before their
//! programs are attached), then stale entries go in the reverse order. It starts from what the maps hold, so after a restart it adopts the pinned state and
//! changes only what differs.
//!
//! After one full comparison with the kernel it keeps a shadow of what it wrote and diffs the
//! next desired state against that, in memory: a policy change costs syscalls for the entries
//! that change, not for the 100k that do not. Any failed write drops the shadow (the next apply
//! compares with the kernel again), and [`Reconciler::verify_kernel`] forces such a comparison
//! now and then, to repair drift made behind the agent's back.

pub mod diff;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod restore;
pub mod seam;

pub use restore::read_pinned;
pub use seam::{DatapathMaps, MapTable, Routes};

use std::{
    collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use enforcer_common::{EndpointInfo, PeerInfo, PolicyKey, PolicyValue};

use enforcer_policy::state::{DesiredState, PodRef, Prefix};

use crate::reconcile::diff::{diff_removals, diff_upserts, sync_removals, sync_upserts};

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Pods whose host interface was not found (yet): retried on the next reconcile.
    pub pending: Vec<PodRef>,
    /// Pods that could not be attached, with the error.
    pub failed: Vec<(PodRef, String)>,
    pub attached: Vec<u32>,
    pub detached: Vec<u32>,
    pub written: usize,
    pub removed: usize,
}

impl Report {
    /// Everything desired is in the kernel.
    pub fn complete(&self) -> bool {
        self.pending.is_empty() && self.failed.is_empty()
    }
}

/// Keeps what must survive between reconciles: the epoch of each endpoint id and the hash of
/// what it was computed from, so that only endpoints whose policy changed re-check their flows.
#[derive(Debug, Default)]
pub struct Reconciler {
    epochs: BTreeMap<u32, (u32, u64)>,
    adopted: bool,
    /// What the maps hold, as of the last apply that succeeded; `None` until the first one, after
    /// a failure and after [`Reconciler::verify_kernel`].
    shadow: Option<Shadow>,
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
}

/// Phase 1 for one map: against the shadow when there is one, else against the kernel.
macro_rules! upserts {
    ($shadow:expr, $field:ident, $desired:expr, $table:expr, $name:literal) => {
        match &$shadow {
            Some(s) => diff_upserts($desired, &s.$field, $table),
            None => sync_upserts($desired, $table),
        }
        .context(concat!("writing ", $name))?
    };
}

/// Phase 3 for one map, the same way.
macro_rules! removals {
    ($shadow:expr, $field:ident, $desired:expr, $table:expr, $name:literal) => {
        match &$shadow {
            Some(s) => diff_removals($desired, &s.$field, $table),
            None => sync_removals($desired, $table),
        }
        .context(concat!("removing from ", $name))?
    };
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next apply compare every entry with the kernel instead of the shadow.
    pub fn verify_kernel(&mut self) {
        self.shadow = None;
    }

    /// Entries per map as last written (name, entries), once an apply has succeeded: the map
    /// fill the metrics report, without walking the kernel maps.
    pub fn written_sizes(&self) -> Option<Vec<(&'static str, usize)>> {
        let s = self.shadow.as_ref()?;
        Some(vec![
            ("ENDPOINTS", s.endpoints.len()),
            ("POLICY", s.policy.len()),
            ("PEERS_V4", s.peers_v4.len()),
            ("PEERS_V6", s.peers_v6.len()),
            ("CIDRS_V4", s.cidrs_v4.len()),
            ("CIDRS_V6", s.cidrs_v6.len()),
        ])
    }

    /// Programs `desired` into `dp`.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        dp: &mut dyn DatapathMaps,
        routes: &dyn Routes,
    ) -> Result<Report> {
        let mut report = Report::default();
        if !self.adopted {
            self.adopt(dp)?;
        }

        // Where each endpoint lives.
        let mut endpoints: BTreeMap<u32, EndpointInfo> = BTreeMap::new();
        let mut owner: BTreeMap<u32, PodRef> = BTreeMap::new();
        // Endpoints whose epoch moves in this apply.
        let mut moved: Vec<u32> = Vec::new();
        let shared = shared_fingerprint(desired);
        for (pod, ep) in &desired.endpoints {
            let mut ifindex = None;
            for ip in &ep.ips {
                if let Some(i) = routes
                    .ifindex_for(*ip)
                    .with_context(|| format!("route to {ip} of {pod}"))?
                {
                    ifindex = Some(i);
                    break;
                }
            }
            let Some(ifindex) = ifindex else {
                report.pending.push(pod.clone());
                continue;
            };
            let mut info = ep.info;
            let before = self.epochs.get(&info.id).map(|e| e.0);
            info.epoch = self.epoch_for(desired, &info, shared);
            if let Some(other) = owner.insert(ifindex, pod.clone()) {
                report.failed.push((
                    pod.clone(),
                    format!("interface {ifindex} is also the route of {other}"),
                ));
                continue;
            }
            if before != Some(info.epoch) {
                moved.push(ifindex);
            }
            endpoints.insert(ifindex, info);
        }

        let peers_v4: BTreeMap<[u8; 4], PeerInfo> = desired
            .peers_v4
            .iter()
            .map(|(a, p)| (a.octets(), *p))
            .collect();
        let peers_v6: BTreeMap<[u8; 16], PeerInfo> = desired
            .peers_v6
            .iter()
            .map(|(a, p)| (a.octets(), *p))
            .collect();

        // Taken out while writing: an error below leaves it `None`, so the next apply compares
        // with the kernel.
        let shadow = self.shadow.take();

        // 1. Additions and changes: the policy entries of an identity before any address
        //    resolves to it (a relabeled pod never meets its new identity without its rules),
        //    all before the endpoint entries that turn isolation on.
        report.written += upserts!(shadow, policy, &desired.policy, dp.policy(), "POLICY");
        report.written += upserts!(shadow, peers_v4, &peers_v4, dp.peers_v4(), "PEERS_V4");
        report.written += upserts!(shadow, peers_v6, &peers_v6, dp.peers_v6(), "PEERS_V6");
        report.written += upserts!(
            shadow,
            cidrs_v4,
            &desired.cidrs_v4,
            dp.cidrs_v4(),
            "CIDRS_V4"
        );
        report.written += upserts!(
            shadow,
            cidrs_v6,
            &desired.cidrs_v6,
            dp.cidrs_v6(),
            "CIDRS_V6"
        );
        report.written += upserts!(shadow, endpoints, &endpoints, dp.endpoints(), "ENDPOINTS");

        // 2. Programs on new interfaces (their endpoint entry exists now).
        let attached = dp.attached().context("listing attached interfaces")?;
        for (ifindex, pod) in &owner {
            if !endpoints.contains_key(ifindex) || attached.contains(ifindex) {
                continue;
            }
            match dp.attach(*ifindex) {
                Ok(()) => report.attached.push(*ifindex),
                Err(e) => report.failed.push((
                    pod.clone(),
                    format!("attaching to interface {ifindex}: {e:#}"),
                )),
            }
        }

        // 3. Removals, in reverse: programs off interfaces that are no longer pods, then entries.
        for ifindex in attached.iter().filter(|i| !endpoints.contains_key(i)) {
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
        report.removed += removals!(shadow, endpoints, &endpoints, dp.endpoints(), "ENDPOINTS");
        for id in gone_ids {
            dp.forget_flows(id)
                .with_context(|| format!("forgetting flows of endpoint {id}"))?;
            self.epochs.remove(&id);
        }
        // Addresses leave an identity before its rules go.
        let removed_before = report.removed;
        report.removed += removals!(
            shadow,
            cidrs_v6,
            &desired.cidrs_v6,
            dp.cidrs_v6(),
            "CIDRS_V6"
        );
        report.removed += removals!(
            shadow,
            cidrs_v4,
            &desired.cidrs_v4,
            dp.cidrs_v4(),
            "CIDRS_V4"
        );
        report.removed += removals!(shadow, peers_v6, &peers_v6, dp.peers_v6(), "PEERS_V6");
        report.removed += removals!(shadow, peers_v4, &peers_v4, dp.peers_v4(), "PEERS_V4");
        report.removed += removals!(shadow, policy, &desired.policy, dp.policy(), "POLICY");

        // 4. A flow judged between the endpoint writes and the removals may have met an entry
        //    that is gone now, and carries the new epoch: when anything was removed, the moved
        //    epochs move once more, so such flows are re-checked against what is left.
        if report.removed > removed_before {
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
                report.written += 1;
            }
        }
        self.shadow = Some(Shadow {
            endpoints,
            peers_v4,
            peers_v6,
            cidrs_v4: desired.cidrs_v4.clone(),
            cidrs_v6: desired.cidrs_v6.clone(),
            policy: desired.policy.clone(),
        });
        Ok(report)
    }

    /// After a restart: continue from the epochs in the pinned endpoint entries, one higher, so
    /// flows tracked while the agent was away are re-checked against the policy once.
    fn adopt(&mut self, dp: &mut dyn DatapathMaps) -> Result<()> {
        let table = dp.endpoints();
        for ifindex in table.keys().context("reading pinned ENDPOINTS")? {
            if let Some(info) = table.get(&ifindex)? {
                self.epochs.insert(info.id, (info.epoch, 0));
            }
        }
        self.adopted = true;
        Ok(())
    }

    /// The epoch an endpoint entry gets: unchanged while what decides its verdicts is unchanged,
    /// one higher when anything of it changed.
    fn epoch_for(&mut self, desired: &DesiredState, info: &EndpointInfo, shared: u64) -> u32 {
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
        let fp = h.finish();
        let entry = self.epochs.entry(info.id).or_insert((0, 0));
        if entry.1 != fp {
            *entry = (entry.0.wrapping_add(1), fp);
        }
        entry.0
    }
}

/// Hash of the maps every endpoint's verdicts depend on (what an address resolves to).
fn shared_fingerprint(desired: &DesiredState) -> u64 {
    let mut h = DefaultHasher::new();
    desired.peers_v4.hash(&mut h);
    desired.peers_v6.hash(&mut h);
    desired.cidrs_v4.hash(&mut h);
    desired.cidrs_v6.hash(&mut h);
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
        FakeRoutes(BTreeMap::from([
            ("10.0.0.1".parse().unwrap(), 11),
            ("10.0.0.2".parse().unwrap(), 12),
        ]))
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
            .apply(&state(80, true), &mut dp, &FakeRoutes(BTreeMap::new()))
            .unwrap();
        assert_eq!(rep.pending.len(), 2);
        assert!(!rep.complete());
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
    fn a_failed_write_makes_the_next_apply_compare_with_the_kernel() {
        let mut dp = FakeDatapath::default();
        let mut r = Reconciler::new();
        r.apply(&state(80, true), &mut dp, &routes()).unwrap();
        dp.policy.fail_writes = true;
        assert!(r.apply(&state(81, true), &mut dp, &routes()).is_err());
        assert!(
            dp.policy
                .entries
                .contains_key(&PolicyKey::new(1, 301, DIR_INGRESS, PROTO_TCP, 80, 16)),
            "nothing removed"
        );
        assert!(r.written_sizes().is_none(), "shadow dropped");
        dp.policy.fail_writes = false;
        let reads = dp.policy.reads.get();
        r.apply(&state(81, true), &mut dp, &routes()).unwrap();
        assert!(dp.policy.reads.get() > reads, "compared with the kernel");
        assert_eq!(dp.policy.entries, state(81, true).policy);
    }
}
