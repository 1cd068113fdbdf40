//! Process-wide interning of the values many pods share: namespaces, node names, label sets and
//! named-port sets. At 100k pods the same few hundred label sets and names repeat, so each pod
//! holds pointers to one shared copy instead of its own. Interning never changes a value: equal
//! inputs give equal outputs (and, while one is alive, the same allocation).

use std::{
    collections::{BTreeSet, HashSet},
    hash::Hash,
    sync::{Arc, Mutex},
};

use crate::selector::Labels;

/// Named container ports: `(name, protocol, port)`.
pub type NamedPorts = BTreeSet<(String, u8, u16)>;

/// A set of shared values. Entries nobody else holds are dropped when the set has doubled since
/// the last sweep, so the set stays within twice the live values.
struct Table<T: ?Sized> {
    set: Option<HashSet<Arc<T>>>,
    swept_at: usize,
}

impl<T: ?Sized + Eq + Hash> Table<T> {
    const fn new() -> Self {
        Self {
            set: None,
            swept_at: 1024,
        }
    }

    fn lookup(&self, value: &T) -> Option<Arc<T>> {
        self.set.as_ref()?.get(value).cloned()
    }

    fn insert(&mut self, v: Arc<T>) -> Arc<T> {
        let set = self.set.get_or_insert_with(HashSet::new);
        if set.len() >= self.swept_at * 2 {
            set.retain(|v| Arc::strong_count(v) > 1);
            self.swept_at = set.len().max(1024);
        }
        set.insert(Arc::clone(&v));
        v
    }
}

static STRS: Mutex<Table<str>> = Mutex::new(Table::new());
static LABELS: Mutex<Table<Labels>> = Mutex::new(Table::new());
static PORTS: Mutex<Table<NamedPorts>> = Mutex::new(Table::new());

/// The shared copy of `value`. A lock poisoned by a panic elsewhere leaves values right, only
/// not shared.
fn owned<T: Eq + Hash>(table: &Mutex<Table<T>>, value: T) -> Arc<T> {
    let Ok(mut t) = table.lock() else {
        return Arc::new(value);
    };
    match t.lookup(&value) {
        Some(v) => v,
        None => t.insert(Arc::new(value)),
    }
}

/// The shared copy of `s`.
pub fn str(s: &str) -> Arc<str> {
    let Ok(mut t) = STRS.lock() else {
        return Arc::from(s);
    };
    match t.lookup(s) {
        Some(v) => v,
        None => t.insert(Arc::from(s)),
    }
}

/// The shared copy of a label set.
pub fn labels(l: Labels) -> Arc<Labels> {
    owned(&LABELS, l)
}

/// The shared copy of a named-port set.
pub fn named_ports(p: NamedPorts) -> Arc<NamedPorts> {
    owned(&PORTS, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy() {
        let a = labels(Labels::from([("app".into(), "web".into())]));
        let b = labels(Labels::from([("app".into(), "web".into())]));
        assert!(Arc::ptr_eq(&a, &b));
        let c = labels(Labels::from([("app".into(), "db".into())]));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(&str("ns-1"), &str("ns-1")));
    }
}
