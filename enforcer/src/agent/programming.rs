//! What the reconciler could not program, said once per change: one log line per map naming
//! the pods it leaves denied, the gauges and counters of `/metrics`, the lines of `/readyz`; and
//! a warning as a map passes 80 % and 90 % full. Also the pods it could not enforce at all
//! (their own interface not found, or found where programs must not go), named in a warning, on
//! `/metrics` and on `/readyz`, and the pods kept on their interface while their route is gone;
//! and the interfaces the exit program could not be attached to.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use enforcer_policy::{
    model::{Cluster, pod_ips, pod_ref},
    state::PodRef,
};

use crate::{
    observe::metrics::{NAMED_UNPROGRAMMED, Programming},
    reconcile::{MapName, Report},
};

/// Most names in one log line; the rest are counted.
const NAMED_IN_LOG: usize = 20;
/// A map is warned about once as it passes each of these fills...
const NEARLY_FULL: [f64; 2] = [0.8, 0.9];
/// ...until it is back below this.
const ROOMY_AGAIN: f64 = 0.75;
/// A new pod's interface usually shows up within a reconcile or two of the pod: it is warned
/// about when not found for this long (it is named on `/readyz` and `/metrics` at once).
const NOT_FOUND_GRACE: Duration = Duration::from_secs(5);

/// Why a pod is not enforced, as `/metrics` labels it.
pub(super) const NO_INTERFACE: &str = "no-interface";
pub(super) const NOT_OWN_VETH: &str = "not-own-veth";
pub(super) const ATTACH_FAILED: &str = "attach-failed";

/// A pod not enforced, as last said.
struct NotEnforced {
    kind: &'static str,
    why: String,
    since: Instant,
    warned: bool,
}

/// What was said last, so that only changes are logged.
#[derive(Default)]
pub(super) struct Shown {
    /// Per map: the pods (or addresses) named in the last line logged about it.
    by_map: BTreeMap<MapName, Vec<String>>,
    /// Per map: the last refused write logged.
    refused: BTreeMap<MapName, String>,
    /// Maps warned about as nearly full, with the highest fill of [`NEARLY_FULL`] they passed.
    nearly_full: BTreeMap<MapName, usize>,
    /// The peers maps' growth failed: not tried again before this.
    pub(super) peers_retry: Option<Instant>,
    /// Local pods without programs.
    not_enforced: BTreeMap<PodRef, NotEnforced>,
    /// Pods kept on their interface though it was not found, with the reason said.
    kept: BTreeMap<PodRef, String>,
    /// Interfaces without the exit program, with the error said.
    exits: BTreeMap<String, String>,
}

/// The flag that sizes `map`.
fn flag(map: MapName) -> &'static str {
    match map {
        MapName::Endpoints => "--max-endpoints",
        MapName::Policy => "--policy-map-size",
        MapName::PeersV4 | MapName::PeersV6 => "--peers-map-max (they grow up to it)",
        MapName::CidrsV4 | MapName::CidrsV6 => "the CIDR map size",
        MapName::NodePorts => "the NODE_PORTS map size",
    }
}

/// "a, b, c, and 7 more".
fn names(list: &[String]) -> String {
    let mut s = list
        .iter()
        .take(NAMED_IN_LOG)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > NAMED_IN_LOG {
        s.push_str(&format!(", and {} more", list.len() - NAMED_IN_LOG));
    }
    s
}

impl Shown {
    /// Logs what changed since the last reconcile and returns what `/readyz` and `/metrics`
    /// show. `cluster` names the pods behind addresses without a peer entry.
    pub(super) fn report(
        &mut self,
        report: &Report,
        fill: &[(MapName, usize, Option<usize>)],
        cluster: Option<&Cluster>,
    ) -> Programming {
        let mut out = Programming::default();
        self.interfaces(report, &mut out);
        self.exits(report, &mut out);
        let mut by_map: BTreeMap<MapName, Vec<String>> = BTreeMap::new();
        for u in &report.unprogrammed {
            by_map
                .entry(u.map)
                .or_default()
                .push(format!("{} ({})", u.pod, u.directions()));
            if out.pods.len() < NAMED_UNPROGRAMMED {
                out.pods.push((
                    u.pod.to_string(),
                    u.map.to_string(),
                    u.directions().replace(" and ", ","),
                ));
            }
            *out.unprogrammed.entry(u.map.to_string()).or_default() += 1;
            out.lines.push(u.to_string());
        }
        if !report.unresolved.is_empty() {
            let owners = owners(cluster, &report.unresolved);
            for ip in &report.unresolved {
                let map = if ip.is_ipv4() {
                    MapName::PeersV4
                } else {
                    MapName::PeersV6
                };
                let who = match owners.get(ip) {
                    Some(pod) => format!("{pod} ({ip})"),
                    None => ip.to_string(),
                };
                out.lines.push(format!(
                    "{who} has no peer entry: policies judge it by its ipBlocks only ({map} full)"
                ));
                *out.unprogrammed.entry(map.to_string()).or_default() += 1;
                by_map.entry(map).or_default().push(who);
            }
        }
        for k in &report.node_ports_missing {
            let port = format!(
                "node port {}/{}",
                k.port,
                enforcer_policy::explain::protocol_label(k.protocol)
            );
            out.lines.push(format!(
                "{port} has no entry: a pod's flow to a node address on it is allowed as traffic to the node, not judged on its Service's backend ({} full)",
                MapName::NodePorts
            ));
            *out.unprogrammed
                .entry(MapName::NodePorts.to_string())
                .or_default() += 1;
            by_map.entry(MapName::NodePorts).or_default().push(port);
        }
        if out.lines.len() > NAMED_UNPROGRAMMED {
            let more = out.lines.len() - NAMED_UNPROGRAMMED;
            out.lines.truncate(NAMED_UNPROGRAMMED);
            out.lines.push(format!("... and {more} more"));
        }
        for (m, n) in &report.missing {
            out.missing.insert(m.to_string(), *n as u64);
        }

        let capacity = |m: MapName| {
            fill.iter()
                .find(|(f, _, _)| *f == m)
                .and_then(|(_, n, c)| c.map(|c| format!(" ({n} of {c} held)")))
                .unwrap_or_default()
        };
        for m in MapName::ALL {
            let now = by_map.remove(&m).unwrap_or_default();
            let before = self.by_map.get(&m).cloned().unwrap_or_default();
            let missing = report.missing.get(&m).copied().unwrap_or(0);
            if now == before {
                continue;
            }
            if now.is_empty() {
                log::info!(
                    "{m}: every entry written; programmed now: {}",
                    names(&before)
                );
                self.by_map.remove(&m);
                continue;
            }
            let what = match m {
                MapName::Endpoints => {
                    "attached without an endpoint entry (no room, or no endpoint id left): all their traffic is dropped (reason unprogrammed)"
                }
                MapName::Policy => {
                    "their new allow rules are not written: denied in those directions beyond what their policies say"
                }
                MapName::CidrsV4 | MapName::CidrsV6 => {
                    "a region their rules name is missing, so the rules of the region around it are left out: denied there"
                }
                MapName::PeersV4 | MapName::PeersV6 => {
                    "no peer entry: every policy judges these addresses by their ipBlocks only, pod selectors do not match them"
                }
                MapName::NodePorts => {
                    "no entry: pods' flows to a node address on these ports are allowed as traffic to the node, not judged on their Service's backends"
                }
            };
            log::warn!(
                "{m} full: no room for {missing} of the entries it needs{}, until there is room (raise {}): {}: {what}",
                capacity(m),
                flag(m),
                names(&now)
            );
            self.by_map.insert(m, now);
        }
        for m in MapName::ALL {
            match (report.refused.get(&m), self.refused.get(&m)) {
                (Some(e), last) if last != Some(e) => {
                    log::warn!(
                        "{m}: the kernel refused a write: {e}; the entry is left out (denied) and the next reconcile compares with the kernel"
                    );
                    self.refused.insert(m, e.clone());
                }
                (None, Some(_)) => {
                    self.refused.remove(&m);
                }
                _ => {}
            }
        }
        for (m, n, cap) in fill {
            let Some(cap) = cap.filter(|c| *c > 0) else {
                continue;
            };
            let ratio = *n as f64 / cap as f64;
            let level = NEARLY_FULL.iter().filter(|l| ratio >= **l).count();
            let before = self.nearly_full.get(m).copied().unwrap_or(0);
            if level > before {
                log::warn!(
                    "{m} is {:.0}% full ({n} of {cap} entries): raise {} before it fills; what does not fit is denied",
                    ratio * 100.0,
                    flag(*m)
                );
                self.nearly_full.insert(*m, level);
            } else if ratio < ROOMY_AGAIN && self.nearly_full.remove(m).is_some() {
                log::info!(
                    "{m} is {:.0}% full again ({n} of {cap} entries)",
                    ratio * 100.0
                );
            }
        }
        out
    }
}

impl Shown {
    /// The interfaces the exit program could not be attached to: logged once per change, and
    /// named for `/readyz` and `/metrics`.
    fn exits(&mut self, report: &Report, out: &mut Programming) {
        let now: BTreeMap<String, String> = report.exit_failed.iter().cloned().collect();
        for (ifname, why) in &now {
            if self.exits.get(ifname) != Some(why) {
                log::warn!(
                    "exit program not attached to {ifname}: {why}; Service packets pods send that leave the node by {ifname} are not judged on their backend (retried every second)"
                );
            }
        }
        for ifname in self.exits.keys().filter(|i| !now.contains_key(*i)) {
            log::info!("exit program attached to {ifname} now (or {ifname} is gone)");
        }
        out.exits_not_attached = now.iter().map(|(i, w)| (i.clone(), w.clone())).collect();
        self.exits = now;
    }

    /// The pods without programs and the pods kept on their interface: logged once per change
    /// (a pod not found yet only after [`NOT_FOUND_GRACE`]), and named for `/readyz` and
    /// `/metrics`.
    fn interfaces(&mut self, report: &Report, out: &mut Programming) {
        let now = Instant::now();
        let mut current: BTreeMap<&PodRef, (&'static str, &str)> = BTreeMap::new();
        for (pod, why) in &report.pending {
            current.insert(pod, (NO_INTERFACE, why));
        }
        for (pod, why) in &report.failed {
            let kind = if why.starts_with("attaching to interface") {
                ATTACH_FAILED
            } else {
                NOT_OWN_VETH
            };
            current.insert(pod, (kind, why));
        }
        for (pod, (kind, why)) in &current {
            let entry = self
                .not_enforced
                .entry((*pod).clone())
                .or_insert_with(|| NotEnforced {
                    kind,
                    why: why.to_string(),
                    since: now,
                    warned: false,
                });
            if entry.kind != *kind || entry.why != *why {
                entry.kind = kind;
                entry.why = why.to_string();
                entry.warned = false;
            }
            let due = *kind != NO_INTERFACE || now.duration_since(entry.since) >= NOT_FOUND_GRACE;
            if !entry.warned && due {
                log::warn!(
                    "{pod} is NOT ENFORCED: {why}; no programs are attached for it, so its traffic is not filtered on this node (retried every second)"
                );
                entry.warned = true;
            } else if !entry.warned {
                log::debug!("{pod}: {why}; retrying");
            }
            *out.not_enforced_by_reason
                .entry(kind.to_string())
                .or_default() += 1;
            if out.not_enforced.len() < NAMED_UNPROGRAMMED {
                out.not_enforced
                    .push((pod.to_string(), kind.to_string(), why.to_string()));
            }
        }
        self.not_enforced.retain(|pod, e| {
            let still = current.contains_key(pod);
            if !still && e.warned {
                log::info!("{pod} is enforced now (was: {})", e.why);
            }
            still
        });
        let mut kept = BTreeMap::new();
        for (pod, ifindex, why) in &report.kept {
            if self.kept.get(pod) != Some(why) {
                log::warn!(
                    "{pod}: {why}; keeping its programs and entries on interface {ifindex} (still enforced) while that interface exists and the pod is in the cluster"
                );
            }
            kept.insert(pod.clone(), why.clone());
        }
        for pod in self.kept.keys().filter(|p| !kept.contains_key(*p)) {
            if !current.contains_key(pod) {
                log::info!("{pod}: its interface is found again");
            }
        }
        self.kept = kept;
    }
}

/// The pods owning `ips`, from the cluster.
fn owners(cluster: Option<&Cluster>, ips: &[IpAddr]) -> BTreeMap<IpAddr, PodRef> {
    let wanted: BTreeSet<&IpAddr> = ips.iter().collect();
    let mut out = BTreeMap::new();
    for pod in cluster.map(|c| c.pods.as_slice()).unwrap_or_default() {
        for ip in pod_ips(pod) {
            if wanted.contains(&ip) {
                out.entry(ip).or_insert_with(|| pod_ref(pod));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::Unprogrammed;

    #[test]
    fn names_the_pods_without_programs_by_reason() {
        let mut shown = Shown::default();
        let mut r = Report::default();
        r.pending
            .push((PodRef::new("x", "a"), "no device route to 10.0.0.1".into()));
        r.failed
            .push((PodRef::new("x", "b"), "the route leads to cni0".into()));
        r.failed.push((
            PodRef::new("x", "c"),
            "attaching to interface 7: busy".into(),
        ));
        r.kept
            .push((PodRef::new("x", "d"), 9, "no device route".into()));
        let p = shown.report(&r, &[], None);
        assert_eq!(
            p.not_enforced,
            [
                (
                    "x/a".to_string(),
                    NO_INTERFACE.to_string(),
                    "no device route to 10.0.0.1".to_string()
                ),
                (
                    "x/b".to_string(),
                    NOT_OWN_VETH.to_string(),
                    "the route leads to cni0".to_string()
                ),
                (
                    "x/c".to_string(),
                    ATTACH_FAILED.to_string(),
                    "attaching to interface 7: busy".to_string()
                ),
            ]
        );
        assert_eq!(p.not_enforced_by_reason.values().sum::<u64>(), 3);
        assert!(shown.not_enforced[&PodRef::new("x", "b")].warned, "at once");
        assert!(
            !shown.not_enforced[&PodRef::new("x", "a")].warned,
            "not found yet: after the grace"
        );
        assert!(shown.kept.contains_key(&PodRef::new("x", "d")));
        let p = shown.report(&Report::default(), &[], None);
        assert!(p.not_enforced.is_empty() && p.not_enforced_by_reason.is_empty());
        assert!(shown.not_enforced.is_empty() && shown.kept.is_empty());
    }

    #[test]
    fn names_the_interfaces_without_the_exit_program_and_the_node_ports_left_out() {
        let mut shown = Shown::default();
        let mut r = Report::default();
        r.exit_failed.push(("eth1".into(), "busy".into()));
        r.node_ports_missing.push(enforcer_common::NodePortKey {
            protocol: enforcer_common::PROTO_UDP,
            _pad: 0,
            port: 30053,
        });
        r.missing.insert(MapName::NodePorts, 1);
        let p = shown.report(&r, &[], None);
        assert_eq!(
            p.exits_not_attached,
            [("eth1".to_string(), "busy".to_string())]
        );
        assert_eq!(
            p.lines,
            [
                "node port 30053/UDP has no entry: a pod's flow to a node address on it is allowed as traffic to the node, not judged on its Service's backend (NODE_PORTS full)"
            ]
        );
        assert_eq!(p.unprogrammed.get("NODE_PORTS"), Some(&1));
        assert_eq!(p.missing.get("NODE_PORTS"), Some(&1));
        let p = shown.report(&Report::default(), &[], None);
        assert!(p.exits_not_attached.is_empty() && p.lines.is_empty());
        assert!(shown.exits.is_empty());
    }

    #[test]
    fn names_the_pods_once_per_change() {
        let mut shown = Shown::default();
        let mut r = Report::default();
        r.unprogrammed.push(Unprogrammed {
            pod: PodRef::new("x", "b"),
            map: MapName::Policy,
            ingress: true,
            egress: false,
        });
        r.unresolved.push("10.0.0.9".parse().unwrap());
        r.missing.insert(MapName::Policy, 2);
        r.missing.insert(MapName::PeersV4, 1);
        let fill = [(MapName::Policy, 4, Some(4))];
        let p = shown.report(&r, &fill, None);
        assert_eq!(
            p.lines,
            [
                "x/b ingress denied (allow rules not written: POLICY full)",
                "10.0.0.9 has no peer entry: policies judge it by its ipBlocks only (PEERS_V4 full)"
            ]
        );
        assert_eq!(p.unprogrammed.get("POLICY"), Some(&1));
        assert_eq!(p.unprogrammed.get("PEERS_V4"), Some(&1));
        assert_eq!(p.missing.get("POLICY"), Some(&2));
        assert_eq!(
            p.pods,
            [(
                "x/b".to_string(),
                "POLICY".to_string(),
                "ingress".to_string()
            )]
        );
        assert_eq!(
            shown.by_map.get(&MapName::Policy).map(Vec::len),
            Some(1),
            "remembered, so the next reconcile logs nothing"
        );
        // Full: past both fills at once.
        assert_eq!(shown.nearly_full.get(&MapName::Policy), Some(&2));
        let p = shown.report(&Report::default(), &[(MapName::Policy, 1, Some(4))], None);
        assert!(p.lines.is_empty() && p.unprogrammed.is_empty());
        assert!(shown.by_map.is_empty() && shown.nearly_full.is_empty());
    }

    #[test]
    fn a_filling_map_is_warned_about_at_eighty_and_ninety_percent_once_each() {
        let mut shown = Shown::default();
        let r = Report::default();
        let at = |shown: &mut Shown, n: usize| {
            shown.report(&r, &[(MapName::Policy, n, Some(100))], None);
            shown.nearly_full.get(&MapName::Policy).copied()
        };
        assert_eq!(at(&mut shown, 79), None);
        assert_eq!(at(&mut shown, 80), Some(1));
        assert_eq!(at(&mut shown, 85), Some(1), "said once");
        assert_eq!(at(&mut shown, 90), Some(2));
        // Back under 75 %: said again from the start.
        assert_eq!(at(&mut shown, 80), Some(2));
        assert_eq!(at(&mut shown, 74), None);
        assert_eq!(at(&mut shown, 81), Some(1));
    }
}
