//! Bringing one map to its desired contents: upserts first, removals after (never a window), by
//! comparing with the map itself (`sync_*`, after a restart or a failure) or with the reconciler's
//! shadow of it (`diff_*`, in memory).

use std::collections::BTreeMap;

use anyhow::Result;

use super::seam::MapTable;

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
    use crate::reconcile::fake::FakeTable;

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
