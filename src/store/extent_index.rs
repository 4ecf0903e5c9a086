//! A flat, sorted index of the extent map for read-mostly phases.
//!
//! The treap answers a lookup in O(log n) node visits, but its nodes are
//! scattered through the arena: with 100,000 extents a random lookup misses
//! the cache at nearly every level and costs as much as the 4 KiB read it
//! serves. Once a map has been looked up many times without changing (a
//! clone, an NBD export being read), the extents' first sectors are laid
//! out in one sorted array and looked up by binary search: a few cache
//! lines instead of dozens of scattered nodes.
//!
//! The index is built lazily, once the lookups since the last change reach
//! a 64th of the extent count, and dropped by any change to the map.
//! Building it costs about 30 ns per extent and a lookup in the tree up to
//! a few microseconds with a million extents, so the lookups made before it
//! exists cost more than building it; a map that changes between every
//! few lookups never builds it. It costs 32 bytes per extent (and 8 per
//! 64) while it exists. Reads share it between
//! threads (`OnceLock`); changes hold the map exclusively and reset it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::extents::Extent;

/// Below this many extents the treap is shallow enough.
const MIN_EXTENTS: u64 = 1024;

/// Entries per block of the two-level search: one block's first sectors
/// span eight cache lines.
const BLOCK: usize = 64;

/// The extents in order: the first sector of each and the extent itself
/// (a read's pieces are then neighbours in memory, not nodes scattered
/// through the arena), plus the first sector of every `BLOCK`-th extent, a
/// summary small enough to stay in the cache (128 KiB for a million
/// extents), searched first.
#[derive(Debug, Default)]
pub(crate) struct FlatIndex {
    starts: Vec<u64>,
    extents: Vec<Extent>,
    summary: Vec<u64>,
}

impl FlatIndex {
    pub(crate) fn with_capacity(extents: usize) -> FlatIndex {
        FlatIndex {
            starts: Vec::with_capacity(extents),
            extents: Vec::with_capacity(extents),
            summary: Vec::with_capacity(extents / BLOCK + 1),
        }
    }

    pub(crate) fn push(&mut self, start: u64, extent: Extent) {
        if self.starts.len().is_multiple_of(BLOCK) {
            self.summary.push(start);
        }
        self.starts.push(start);
        self.extents.push(extent);
    }

    /// The position (in order) of the extent holding sector `pos`, given
    /// `pos` is inside the drive: the block from the summary, then the
    /// extent inside the block.
    pub(crate) fn position_of(&self, pos: u64) -> usize {
        let block = self
            .summary
            .partition_point(|&s| s <= pos)
            .saturating_sub(1);
        let first = block * BLOCK;
        let last = (first + BLOCK).min(self.starts.len());
        let within = self.starts[first..last].partition_point(|&s| s <= pos);
        (first + within).saturating_sub(1)
    }

    /// The first sector of the extent at `position` and the extent, if any.
    pub(crate) fn entry(&self, position: usize) -> Option<(u64, Extent)> {
        Some((*self.starts.get(position)?, *self.extents.get(position)?))
    }

    fn heap_bytes(&self) -> usize {
        (self.starts.capacity() + self.summary.capacity()) * 8
            + self.extents.capacity() * std::mem::size_of::<Extent>()
    }
}

/// The lazily built index and the count of lookups since the last change.
#[derive(Default)]
pub(crate) struct ReadIndex {
    built: OnceLock<FlatIndex>,
    lookups: AtomicU64,
}

impl ReadIndex {
    /// Counts one lookup of a map of `extents` extents, and returns the
    /// index when it exists or is now worth building (`build` makes it).
    pub(crate) fn lookup(
        &self,
        extents: u64,
        build: impl FnOnce() -> FlatIndex,
    ) -> Option<&FlatIndex> {
        if let Some(index) = self.built.get() {
            return Some(index);
        }
        if extents < MIN_EXTENTS {
            return None;
        }
        let seen = self.lookups.fetch_add(1, Ordering::Relaxed) + 1;
        if seen < extents / 64 {
            return None;
        }
        Some(self.built.get_or_init(build))
    }

    /// Drops the index: the map is about to change.
    pub(crate) fn reset(&mut self) {
        if self.built.get().is_some() {
            self.built = OnceLock::new();
        }
        *self.lookups.get_mut() = 0;
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.built.get().map_or(0, FlatIndex::heap_bytes)
    }
}

/// A copy of a map starts without an index (it is rebuilt when needed).
impl Clone for ReadIndex {
    fn clone(&self) -> Self {
        ReadIndex::default()
    }
}

impl std::fmt::Debug for ReadIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadIndex")
            .field("built", &self.built.get().map(|i| i.starts.len()))
            .finish()
    }
}
