//! Caches the format readers keep behind `&self`, so one image can be read
//! from several threads at once: a bounded least-recently-used cache of
//! metadata tables (qcow2 L2 tables, VMDK grain tables) and a one-entry
//! cache of the last decoded (inflated) unit. Entries are shared out as
//! `Arc`s, so a lookup holds the lock only to find the entry, never while
//! the caller uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `mutex`, also after a panic elsewhere: every cache update below is
/// a single insert or remove, so a cache is never left half-changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Tables<T> {
    clock: u64,
    tables: HashMap<u64, (u64, Arc<[T]>)>,
}

/// A bounded cache of metadata tables keyed by where they live, evicting
/// the least recently used.
pub(crate) struct TableCache<T> {
    capacity: usize,
    inner: Mutex<Tables<T>>,
}

impl<T> TableCache<T> {
    pub(crate) fn new(capacity: usize) -> TableCache<T> {
        TableCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Tables {
                clock: 0,
                tables: HashMap::new(),
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, key: u64) -> bool {
        lock(&self.inner).tables.contains_key(&key)
    }

    pub(crate) fn get(&self, key: u64) -> Option<Arc<[T]>> {
        let mut inner = lock(&self.inner);
        inner.clock += 1;
        let now = inner.clock;
        inner.tables.get_mut(&key).map(|(used, table)| {
            *used = now;
            Arc::clone(table)
        })
    }

    /// Stores `table` under `key` and hands it back shared.
    pub(crate) fn insert(&self, key: u64, table: Vec<T>) -> Arc<[T]> {
        let table: Arc<[T]> = table.into();
        let mut inner = lock(&self.inner);
        if inner.tables.len() >= self.capacity && !inner.tables.contains_key(&key) {
            // A linear scan is fine: the cache holds at most a few thousand
            // tables and a miss costs a read from disk anyway.
            let oldest = inner
                .tables
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                inner.tables.remove(&oldest);
            }
        }
        inner.clock += 1;
        let now = inner.clock;
        inner.tables.insert(key, (now, Arc::clone(&table)));
        table
    }
}

/// The last decoded unit (an inflated cluster or grain) and its key: a
/// sequential reader asks for the same unit once per sector run inside it.
#[derive(Default, Debug)]
pub(crate) struct LastDecoded {
    slot: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl LastDecoded {
    /// The unit stored under `key`, if it is the last one decoded.
    pub(crate) fn get(&self, key: u64) -> Option<Arc<[u8]>> {
        match &*lock(&self.slot) {
            Some((k, data)) if *k == key => Some(Arc::clone(data)),
            _ => None,
        }
    }

    /// Remembers `data` as the unit under `key` and hands it back shared.
    pub(crate) fn put(&self, key: u64, data: Vec<u8>) -> Arc<[u8]> {
        let data: Arc<[u8]> = data.into();
        *lock(&self.slot) = Some((key, Arc::clone(&data)));
        data
    }
}
