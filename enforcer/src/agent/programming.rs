//! What the reconciler could not program, said once per change: one log line per map naming
//! the pods it leaves denied, the gauges and counters of `/metrics`, the lines of `/readyz`; and
//! a warning when a map passes 90 % full.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
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
/// A map this full is warned about once...
const NEARLY_FULL: f64 = 0.9;
/// ...until it is back below this.
const ROOMY_AGAIN: f64 = 0.85;

/// What was said last, so that only changes are logged.
#[derive(Default)]
pub(super) struct Shown {
    /// Per map: the pods (or addresses) named in the last line logged about it.
    by_map: BTreeMap<MapName, Vec<String>>,
    /// Per map: the last refused write logged.
    refused: BTreeMap<MapName, String>,
    /// Maps warned about as nearly full.
    nearly_full: BTreeSet<MapName>,
}

/// The flag that sizes `map`.
fn flag(map: MapName) -> &'static str {
    match map {
        MapName::Endpoints => "--max-endpoints",
        MapName::Policy => "--policy-map-size",
        MapName::PeersV4 | MapName::PeersV6 => "--peers-map-size",
        MapName::CidrsV4 | MapName::CidrsV6 => "the CIDR map size",
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
            if ratio >= NEARLY_FULL && self.nearly_full.insert(*m) {
                log::warn!(
                    "{m} is {:.0}% full ({n} of {cap} entries): raise {} before it fills; what does not fit is denied",
                    ratio * 100.0,
                    flag(*m)
                );
            } else if ratio < ROOMY_AGAIN && self.nearly_full.remove(m) {
                log::info!(
                    "{m} is {:.0}% full again ({n} of {cap} entries)",
                    ratio * 100.0
                );
            }
        }
        out
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
        assert!(shown.nearly_full.contains(&MapName::Policy));
        let p = shown.report(&Report::default(), &[(MapName::Policy, 1, Some(4))], None);
        assert!(p.lines.is_empty() && p.unprogrammed.is_empty());
        assert!(shown.by_map.is_empty() && shown.nearly_full.is_empty());
    }
}
