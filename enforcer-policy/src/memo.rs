//! What the compiler derives from a single API object, kept from one compile to the next.
//!
//! The agent recompiles the whole cluster on every change, but a change replaces only a few
//! objects: the rest are the same `Arc`s as last time, so their parsed form is reused instead of
//! parsed again (parsing 1k policies was a quarter of a compile). An entry holds a clone of its
//! object's `Arc`, so the address it is keyed by cannot be reused by another object while the
//! entry lives; entries whose object left the input are dropped at the end of each compile.
//! It also keeps the last compile's identity stage ([`IdentityStage`]), which a compile reuses
//! when the stage's whole input (pods, namespaces, verified addresses, ipBlocks, node
//! addresses) is unchanged, and what each policy contributes to the local endpoints, reused
//! while that stage and the local endpoints are unchanged. The memo only saves work: a compile gives the same result with it
//! as without it (tested against fresh compiles and the reference evaluator).

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{
    compile::{IdentityStage, OutputsKey, PolicyOut, Prelude, StageInput},
    validate::{ParsedPolicy, Refusal, parse_policy, refusal},
};

/// A policy's parse result.
pub(super) enum PolicyFacts {
    Valid(ParsedPolicy),
    /// Refused by validation: what it still says, and the isolating stand-in enforced for it
    /// (fail closed).
    Refused(Refusal, ParsedPolicy),
}

impl PolicyFacts {
    /// The policy the compiler enforces: the parsed one, or a refused one's stand-in.
    pub fn enforced(&self) -> &ParsedPolicy {
        match self {
            Self::Valid(p) | Self::Refused(_, p) => p,
        }
    }

    /// Why it is refused, and what it still says, when it is.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Valid(_) => None,
            Self::Refused(r, _) => Some(r),
        }
    }

    /// `(namespace, name)`: duplicates are found by it.
    pub fn key(&self) -> (&str, &str) {
        let p = self.enforced();
        (&p.namespace, &p.name)
    }
}

struct Entry<O, D> {
    /// Keeps the object alive, and with it the address the entry is keyed by.
    _object: Arc<O>,
    derived: Arc<D>,
    used: u64,
}

/// Keyed by the object's address (`Arc::as_ptr`).
#[derive(Default)]
pub(super) struct Memo {
    policies: HashMap<usize, Entry<NetworkPolicy, PolicyFacts>>,
    /// The last compile's identity stage, its input and generation.
    pub stage: Option<(StageInput, Arc<IdentityStage>, u64)>,
    /// Each policy's contribution to the local endpoints (keyed by its parse result,
    /// which is per object), valid for `outputs_key`.
    outputs: HashMap<usize, Entry<PolicyFacts, PolicyOut>>,
    outputs_key: Option<OutputsKey>,
    /// What the last compile derived from the policies alone.
    pub prelude: Option<Arc<Prelude>>,
    /// This compile reused `prelude`: it parsed nothing, so the parse entries, all still in
    /// the input, are kept without being marked.
    pub prelude_reused: bool,
}

impl Clone for Memo {
    /// A clone starts empty: the memo only saves work, it never changes a result.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo")
            .field("policies", &self.policies.len())
            .field("outputs", &self.outputs.len())
            .finish()
    }
}

fn derive<O, D>(
    map: &mut HashMap<usize, Entry<O, D>>,
    object: &Arc<O>,
    generation: u64,
    make: impl FnOnce(&O) -> D,
) -> Arc<D> {
    let e = map
        .entry(Arc::as_ptr(object) as usize)
        .or_insert_with(|| Entry {
            _object: Arc::clone(object),
            derived: Arc::new(make(object)),
            used: generation,
        });
    e.used = generation;
    Arc::clone(&e.derived)
}

impl Memo {
    pub fn policy(&mut self, p: &Arc<NetworkPolicy>, generation: u64) -> Arc<PolicyFacts> {
        derive(&mut self.policies, p, generation, |p| {
            match parse_policy(p) {
                Ok(parsed) => PolicyFacts::Valid(parsed),
                Err(errors) => {
                    let r = refusal(p, errors);
                    let stand_in = r.stand_in();
                    PolicyFacts::Refused(r, stand_in)
                }
            }
        })
    }

    /// Keeps the policy contributions made for `key`. When only the identities changed, those
    /// that select no local endpoint are kept too: they hold nothing an identity could change
    /// (an entry comes only with an endpoint it isolates), and at 10k policies a new identity
    /// (a pod of new labels anywhere) must not make every policy's contribution again.
    pub fn outputs_for(&mut self, key: OutputsKey) {
        match &self.outputs_key {
            Some(k) if *k == key => {}
            Some(k) if k.same_but_identities(&key) => {
                self.outputs.retain(|_, e| e.derived.selects_nothing());
            }
            _ => self.outputs.clear(),
        }
        self.outputs_key = Some(key);
    }

    /// Policy `p`'s contribution, made by `make` unless kept from the last compile.
    pub fn output(
        &mut self,
        p: &Arc<PolicyFacts>,
        generation: u64,
        make: impl FnOnce(&PolicyFacts) -> PolicyOut,
    ) -> Arc<PolicyOut> {
        derive(&mut self.outputs, p, generation, make)
    }

    /// The kept contribution of policy `p`, if any (held: its address is not reused).
    #[cfg(test)]
    pub fn output_of(&self, p: &Arc<PolicyFacts>) -> Option<Arc<PolicyOut>> {
        self.outputs
            .get(&(Arc::as_ptr(p) as usize))
            .map(|e| Arc::clone(&e.derived))
    }

    #[cfg(test)]
    pub fn policies_len(&self) -> usize {
        self.policies.len()
    }

    /// Drops the entries of objects that were not in the compile of `generation`.
    pub fn sweep(&mut self, generation: u64) {
        if !self.prelude_reused {
            self.policies.retain(|_, e| e.used == generation);
        }
        self.outputs.retain(|_, e| e.used == generation);
    }
}
