//! Restoring from the pinned maps: a restarted agent adopts what the kernel holds and keeps its
//! identity numbering, so its first reconcile rewrites nothing that did not change.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use enforcer_policy::state::DesiredState;

use super::seam::{DatapathMaps, MapTable};

/// The identities, regions and policy entries the pinned maps hold, as a [`DesiredState`]
/// (endpoints and rule names left empty): what a restarted agent restores its numbering from.
pub fn read_pinned(dp: &mut dyn DatapathMaps) -> Result<DesiredState> {
    fn all<K: Ord + Clone, V>(t: &dyn MapTable<K, V>, name: &str) -> Result<BTreeMap<K, V>> {
        let mut out = BTreeMap::new();
        for k in t.keys().with_context(|| format!("listing pinned {name}"))? {
            // An entry removed between the listing and the read is simply not there.
            if let Some(v) = t
                .get(&k)
                .with_context(|| format!("reading pinned {name}"))?
            {
                out.insert(k, v);
            }
        }
        Ok(out)
    }
    Ok(DesiredState {
        peers_v4: all(dp.peers_v4(), "PEERS_V4")?
            .into_iter()
            .map(|(a, p)| (Ipv4Addr::from(a), p))
            .collect(),
        peers_v6: all(dp.peers_v6(), "PEERS_V6")?
            .into_iter()
            .map(|(a, p)| (Ipv6Addr::from(a), p))
            .collect(),
        cidrs_v4: all(dp.cidrs_v4(), "CIDRS_V4")?,
        cidrs_v6: all(dp.cidrs_v6(), "CIDRS_V6")?,
        policy: all(dp.policy(), "POLICY")?,
        ..DesiredState::default()
    })
}
