//! Binding a verified identity to the caller's pod IP.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::RwLock;

use tokio::sync::watch;

use super::{LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, Reason, VerifiedIdentity};

/// A pod as the agent's cluster state knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LivePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The agent's view of live pods (implemented from its compiled cluster state).
///
/// Implementations must only report pods that are running and not terminating, and must never
/// map a host-network pod's IP (the node IP) in [`PodDirectory::pod_by_ip`]: binding a node IP
/// would give every host process the pod's identity.
pub trait PodDirectory: Send + Sync {
    /// The pod currently owning `ip`.
    fn pod_by_ip(&self, ip: IpAddr) -> Option<LivePod>;
    /// The uid of the live pod `namespace/name`, if it exists.
    fn pod_uid(&self, namespace: &str, name: &str) -> Option<String>;
}

/// Check that a verified token may be bound to `caller`:
/// - the token's pod exists (`unknown-pod`) with the token's uid (`pod-uid-mismatch`): like
///   kube-apiserver, a token whose pod is gone or was re-created is invalidated;
/// - the caller IP belongs to that very pod (`ip-mismatch`): a token replayed from another pod
///   (or from the node) is refused.
pub fn check_binding(
    dir: &dyn PodDirectory,
    id: &VerifiedIdentity,
    caller: IpAddr,
) -> Result<(), Reason> {
    match dir.pod_uid(&id.namespace, &id.pod_name) {
        None => return Err(Reason::UnknownPod),
        Some(uid) if uid != id.pod_uid => return Err(Reason::PodUidMismatch),
        Some(_) => {}
    }
    match dir.pod_by_ip(canonical_ip(caller)) {
        Some(p) if p.namespace == id.namespace && p.name == id.pod_name && p.uid == id.pod_uid => {
            Ok(())
        }
        _ => Err(Reason::IpMismatch),
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, from a dual-stack listener) as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The reserved labels a binding contributes to its pod's identity for selectors:
/// `enforcer.dev/serviceaccount=<sa>` and `enforcer.dev/namespace=<ns>`.
///
/// Note: service-account names may be up to 253 characters, longer than a label value (63); the
/// consumer must cope (such an identity simply will not match a `matchLabels` selector).
pub fn identity_labels(id: &VerifiedIdentity) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            LABEL_SERVICE_ACCOUNT.to_string(),
            id.service_account.clone(),
        ),
        (LABEL_NAMESPACE.to_string(), id.namespace.clone()),
    ])
}

/// Pod IP -> verified identity, until the token's `exp` or until the pod goes.
///
/// Every change bumps a generation number observable through [`Bindings::subscribe`], so the
/// policy compiler can recompile.
pub struct Bindings {
    map: RwLock<HashMap<IpAddr, VerifiedIdentity>>,
    generation: watch::Sender<u64>,
}

impl Default for Bindings {
    fn default() -> Self {
        Self::new()
    }
}

impl Bindings {
    pub fn new() -> Self {
        Bindings {
            map: RwLock::new(HashMap::new()),
            generation: watch::channel(0).0,
        }
    }

    fn write<R>(&self, f: impl FnOnce(&mut HashMap<IpAddr, VerifiedIdentity>) -> R) -> R {
        match self.map.write() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn read<R>(&self, f: impl FnOnce(&HashMap<IpAddr, VerifiedIdentity>) -> R) -> R {
        match self.map.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Bind `ip` to `id`. Re-attesting with the same identity extends the binding to the later
    /// `expires_at` (an older token never shortens it); a different identity replaces it.
    /// Returns whether anything changed.
    pub fn bind(&self, ip: IpAddr, id: VerifiedIdentity) -> bool {
        let ip = canonical_ip(ip);
        let changed = self.write(|m| match m.get_mut(&ip) {
            Some(cur)
                if cur.namespace == id.namespace
                    && cur.service_account == id.service_account
                    && cur.pod_name == id.pod_name
                    && cur.pod_uid == id.pod_uid =>
            {
                if id.expires_at > cur.expires_at {
                    cur.expires_at = id.expires_at;
                    true
                } else {
                    false
                }
            }
            _ => {
                m.insert(ip, id);
                true
            }
        });
        if changed {
            self.bump();
        }
        changed
    }

    /// The identity bound to `ip`, if not expired at `now`.
    pub fn get(&self, ip: IpAddr, now: u64) -> Option<VerifiedIdentity> {
        let ip = canonical_ip(ip);
        self.read(|m| m.get(&ip).filter(|id| id.expires_at > now).cloned())
    }

    pub fn remove(&self, ip: IpAddr) -> Option<VerifiedIdentity> {
        let ip = canonical_ip(ip);
        let removed = self.write(|m| m.remove(&ip));
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    /// Drop bindings whose IP no longer belongs to the bound pod (pod deleted, re-created with a
    /// new uid, or IP reused). Returns the removed IPs.
    pub fn retain_pods(&self, dir: &dyn PodDirectory) -> Vec<IpAddr> {
        let removed = self.write(|m| {
            let mut removed = Vec::new();
            m.retain(|ip, id| {
                let keep = dir.pod_by_ip(*ip).is_some_and(|p| {
                    p.namespace == id.namespace && p.name == id.pod_name && p.uid == id.pod_uid
                });
                if !keep {
                    removed.push(*ip);
                }
                keep
            });
            removed
        });
        if !removed.is_empty() {
            self.bump();
        }
        removed
    }

    /// Sweep: drop bindings expired at `now` (`expires_at <= now`). Returns the removed IPs.
    pub fn expired(&self, now: u64) -> Vec<IpAddr> {
        let removed = self.write(|m| {
            let mut removed = Vec::new();
            m.retain(|ip, id| {
                let keep = id.expires_at > now;
                if !keep {
                    removed.push(*ip);
                }
                keep
            });
            removed
        });
        if !removed.is_empty() {
            self.bump();
        }
        removed
    }

    /// Both sweeps: [`Bindings::expired`] then [`Bindings::retain_pods`].
    pub fn sweep(&self, dir: &dyn PodDirectory, now: u64) -> Vec<IpAddr> {
        let mut v = self.expired(now);
        v.extend(self.retain_pods(dir));
        v
    }

    /// All current bindings (call [`Bindings::expired`] first, or filter on `expires_at`).
    pub fn snapshot(&self) -> BTreeMap<IpAddr, VerifiedIdentity> {
        self.read(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
    }

    pub fn len(&self) -> usize {
        self.read(|m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current generation (bumped on every change).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
