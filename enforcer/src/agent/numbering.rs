//! Keeping the numbering across restarts: endpoint ids, identities and rule ids are taken from
//! the pinned maps, so a restarted agent's first reconcile rewrites only what changed.

use std::net::IpAddr;

use enforcer_policy::{compile::Allocations, model::Cluster};

use super::Agent;

impl Agent {
    /// After a restart: pods keep the endpoint ids of their pinned entries (found by address),
    /// so their policy keys and conntrack entries stay valid across the restart; then the
    /// identities and rules keep their pinned numbers ([`Allocations::restore`]), so the first
    /// reconcile rewrites only what changed while the agent was away.
    pub(super) fn restore_numbers(&self, cluster: &Cluster, alloc: &mut Allocations) {
        self.restore_endpoint_ids(cluster, alloc);
        let pinned = match self.datapath.lock() {
            Ok(mut dp) => crate::reconcile::read_pinned(&mut *dp),
            Err(_) => return,
        };
        match pinned {
            Ok(pinned) => {
                let (identities, rules) = alloc.restore(cluster, &self.compile_options, &pinned);
                if identities + rules > 0 {
                    log::info!(
                        "restored the numbers of {identities} identities and {rules} rules from the pinned maps"
                    );
                }
            }
            Err(e) => log::warn!("reading the pinned maps to keep their numbering: {e:#}"),
        }
    }

    fn restore_endpoint_ids(&self, cluster: &Cluster, alloc: &mut Allocations) {
        let Ok(dp) = self.datapath.lock() else { return };
        let Ok(pinned) = dp.endpoints.entries() else {
            return;
        };
        let mut restored = 0;
        for (_, info) in pinned {
            let v4 =
                (info.flags & enforcer_common::EP_HAS_V4 != 0).then(|| IpAddr::from(info.ipv4));
            let v6 =
                (info.flags & enforcer_common::EP_HAS_V6 != 0).then(|| IpAddr::from(info.ipv6));
            let owner = cluster.pods.iter().find(|p| {
                let ips = enforcer_policy::model::pod_ips(p);
                v4.is_some_and(|a| ips.contains(&a)) || v6.is_some_and(|a| ips.contains(&a))
            });
            if let Some(pod) = owner
                && alloc.reserve_endpoint(&enforcer_policy::model::pod_ref(pod), info.id)
            {
                restored += 1;
            }
        }
        if restored > 0 {
            log::info!("restored the endpoint ids of {restored} pods from the pinned maps");
        }
    }
}
