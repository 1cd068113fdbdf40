//! The seam between the reconciler and the kernel: a map is a [`MapTable`]. The datapath module
//! implements it over aya maps; [`FakeTable`] implements it over a `BTreeMap` for tests.

use std::collections::BTreeMap;

use anyhow::Result;

/// One key/value map of the datapath.
pub trait MapTable<K, V> {
    /// Current value of `key`, if any.
    fn get(&self, key: &K) -> Result<Option<V>>;
    /// Insert or replace one entry (atomic per entry in the kernel).
    fn set(&mut self, key: &K, value: &V) -> Result<()>;
    /// Remove one entry; removing an absent key is not an error.
    fn remove(&mut self, key: &K) -> Result<()>;
    /// All keys present now.
    fn keys(&self) -> Result<Vec<K>>;
}

/// In-memory map, for tests of everything above the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTable<K: Ord, V> {
    pub entries: BTreeMap<K, V>,
    /// Make every `set` fail (a full map, a kernel error), to test what a failure leaves behind.
    pub fail_writes: bool,
    /// `get` + `keys` calls so far: what a kernel would have been asked.
    pub reads: std::cell::Cell<usize>,
    /// When set, every write is logged here, stamped from the clock: tables sharing one clock
    /// give the order of writes across maps, for tests that replay a change write by write.
    pub journal: Option<Journal<K, V>>,
}

/// The writes of one [`FakeTable`]: (sequence number, key, value or `None` for a removal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal<K, V> {
    pub clock: std::rc::Rc<std::cell::Cell<usize>>,
    pub writes: Vec<(usize, K, Option<V>)>,
}

impl<K, V> Journal<K, V> {
    fn log(&mut self, key: K, value: Option<V>) {
        let n = self.clock.get();
        self.clock.set(n + 1);
        self.writes.push((n, key, value));
    }
}

impl<K: Ord, V> Default for FakeTable<K, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            fail_writes: false,
            reads: std::cell::Cell::new(0),
            journal: None,
        }
    }
}

impl<K: Ord + Clone, V: Clone> MapTable<K, V> for FakeTable<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>> {
        self.reads.set(self.reads.get() + 1);
        Ok(self.entries.get(key).cloned())
    }
    fn set(&mut self, key: &K, value: &V) -> Result<()> {
        anyhow::ensure!(!self.fail_writes, "write refused");
        self.entries.insert(key.clone(), value.clone());
        if let Some(j) = &mut self.journal {
            j.log(key.clone(), Some(value.clone()));
        }
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<()> {
        self.entries.remove(key);
        if let Some(j) = &mut self.journal {
            j.log(key.clone(), None);
        }
        Ok(())
    }
    fn keys(&self) -> Result<Vec<K>> {
        self.reads.set(self.reads.get() + 1);
        Ok(self.entries.keys().cloned().collect())
    }
}

/// What [`sync_upserts`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
}

/// First half of a sync: write every desired entry that is missing or different. Call it for all
/// maps before [`sync_removals`], so no moment exists where an old entry is gone and its
/// replacement is not there yet.
pub fn sync_upserts<K, V, T>(desired: &BTreeMap<K, V>, table: &mut T) -> Result<usize>
where
    K: Ord,
    V: PartialEq,
    T: MapTable<K, V> + ?Sized,
{
    let mut written = 0;
    for (k, v) in desired {
        if table.get(k)?.as_ref() != Some(v) {
            table.set(k, v)?;
            written += 1;
        }
    }
    Ok(written)
}

/// Second half of a sync: remove every present key that is not desired.
pub fn sync_removals<K, V, T>(desired: &BTreeMap<K, V>, table: &mut T) -> Result<usize>
where
    K: Ord,
    T: MapTable<K, V> + ?Sized,
{
    let mut removed = 0;
    for k in table.keys()? {
        if !desired.contains_key(&k) {
            table.remove(&k)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// First half of a sync against `written`, what this process last wrote to `table`: writes the
/// desired entries that are missing or different there, without reading the kernel.
pub fn diff_upserts<K, V, T>(
    desired: &BTreeMap<K, V>,
    written: &BTreeMap<K, V>,
    table: &mut T,
) -> Result<usize>
where
    K: Ord,
    V: PartialEq,
    T: MapTable<K, V> + ?Sized,
{
    let mut n = 0;
    for (k, v) in desired {
        if written.get(k) != Some(v) {
            table.set(k, v)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Second half of a sync against `written`: removes what was written and is no longer desired.
pub fn diff_removals<K, V, T>(
    desired: &BTreeMap<K, V>,
    written: &BTreeMap<K, V>,
    table: &mut T,
) -> Result<usize>
where
    K: Ord,
    T: MapTable<K, V> + ?Sized,
{
    let mut n = 0;
    for k in written.keys() {
        if !desired.contains_key(k) {
            table.remove(k)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_writes_changes_then_removes_stale() {
        let mut t = FakeTable::<u32, u32>::default();
        t.set(&1, &10).unwrap();
        t.set(&2, &20).unwrap();
        t.set(&3, &30).unwrap();
        let desired = BTreeMap::from([(2, 21), (3, 30), (4, 40)]);
        assert_eq!(sync_upserts(&desired, &mut t).unwrap(), 2);
        // Old key 1 still present until removals run: no window.
        assert!(t.entries.contains_key(&1));
        assert_eq!(sync_removals(&desired, &mut t).unwrap(), 1);
        assert_eq!(t.entries, desired);
    }
}
