//! A bounded least-recently-used cache of metadata tables, shared by the
//! formats with two-level tables (qcow2 L2 tables, VMDK grain tables).

use std::collections::HashMap;

/// A bounded cache of metadata tables (qcow2 L2 tables, VMDK grain
/// tables) keyed by where they live, evicting the least recently used.
pub(crate) struct TableCache<T> {
    capacity: usize,
    clock: u64,
    tables: HashMap<u64, (u64, Vec<T>)>,
}

impl<T> TableCache<T> {
    pub(crate) fn new(capacity: usize) -> TableCache<T> {
        TableCache {
            capacity: capacity.max(1),
            clock: 0,
            tables: HashMap::new(),
        }
    }

    pub(crate) fn contains(&self, key: u64) -> bool {
        self.tables.contains_key(&key)
    }

    pub(crate) fn get(&mut self, key: u64) -> Option<&[T]> {
        self.clock += 1;
        let now = self.clock;
        self.tables.get_mut(&key).map(|(used, table)| {
            *used = now;
            table.as_slice()
        })
    }

    pub(crate) fn insert(&mut self, key: u64, table: Vec<T>) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&key) {
            // A linear scan is fine: the cache holds at most a few thousand
            // tables and a miss costs a read from disk anyway.
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                self.tables.remove(&oldest);
            }
        }
        self.clock += 1;
        self.tables.insert(key, (self.clock, table));
    }
}
