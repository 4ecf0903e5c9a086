//! A flat, sorted index of the extent map for read-mostly phases.
//!
//! The treap answers a lookup in O(log n) node visits, but its nodes are
//! scattered through the arena: with 100,000 extents a random lookup misses
//! the cache at nearly every level and costs as much as the 4 KiB read it
//! serves. Once a map has been looked up many times without changing (a
//! clone, an NBD export being read), the extents and their first sectors
//! are laid out in one sorted array under a static search tree: a few
//! cache lines, fetched a block at a time, instead of dozens of scattered
//! nodes.
//!
//! The index is built lazily, once the lookups since the last change reach
//! a 64th of the extent count, and dropped by any change to the map.
//! Building it costs about 30 ns per extent and a lookup in the tree up to
//! a few microseconds with a million extents, so the lookups made before it
//! exists cost more than building it; a map that changes between every
//! few lookups never builds it. It costs 32 bytes per extent (and about
//! 8 per 15 for the search levels) while it exists. Reads share it between
//! threads (`OnceLock`); changes hold the map exclusively and reset it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::extents::Extent;

/// Below this many extents the treap is shallow enough.
const MIN_EXTENTS: u64 = 1024;

/// Entries per block of the search: 16 first sectors fill two cache lines,
/// which the processor fetches together, and are counted without
/// branches.
const BLOCK: usize = 16;

/// The extents in order, each with its first sector (a read's pieces are
/// then neighbours in memory, not nodes scattered through the arena; and
/// the block a lookup counts holds the extents themselves, fetched in the
/// same go instead of one more wait), plus a static search tree over the
/// first sectors:
/// `levels[0]` holds every `BLOCK`-th first sector, `levels[1]` every
/// `BLOCK`-th of those, and so on up to a level of at most `BLOCK`
/// entries. A lookup counts the entries at or below the sector in one
/// block per level: for a million extents four blocks of two cache lines
/// (the upper levels stay in the cache) and the eight lines of 16 extents,
/// where a binary search would wait for a dozen lines one after the other.
#[derive(Debug, Default)]
pub(crate) struct FlatIndex {
    entries: Vec<(u64, Extent)>,
    levels: Vec<Vec<u64>>,
}

impl FlatIndex {
    pub(crate) fn with_capacity(extents: usize) -> FlatIndex {
        FlatIndex {
            entries: Vec::with_capacity(extents),
            levels: Vec::new(),
        }
    }

    /// Appends the next extent in order (`start` above every earlier one).
    pub(crate) fn push(&mut self, start: u64, extent: Extent) {
        self.entries.push((start, extent));
    }

    /// Builds the search levels once every extent is pushed.
    pub(crate) fn finish(mut self) -> FlatIndex {
        let mut levels: Vec<Vec<u64>> = Vec::new();
        let mut below = self.entries.len();
        while below > BLOCK {
            let level: Vec<u64> = match levels.last() {
                None => self.entries.iter().step_by(BLOCK).map(|e| e.0).collect(),
                Some(lower) => lower.iter().step_by(BLOCK).copied().collect(),
            };
            below = level.len();
            levels.push(level);
        }
        self.levels = levels;
        self
    }

    /// The position (in order) of the extent holding sector `pos`, given
    /// `pos` is inside the drive (the first extent starts at 0): from the
    /// top level down, the block under the last entry at or below `pos`.
    pub(crate) fn position_of(&self, pos: u64) -> usize {
        let mut block = 0;
        for level in self.levels.iter().rev() {
            block = last_at_or_below(level, block, pos, |&s| s);
        }
        last_at_or_below(&self.entries, block, pos, |e| e.0)
    }

    /// The extents overlapping `[start, end)` (`start` inside the drive),
    /// clipped to it, each with its first sector.
    pub(crate) fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.entries[self.position_of(start)..]
            .iter()
            .take_while(move |(node_start, _)| *node_start < end)
            .map(move |&(node_start, extent)| {
                let from = start.max(node_start);
                let to = end.min(node_start + extent.len);
                (from, extent.slice(from - node_start, to - from))
            })
    }

    /// The first sector of the extent at `position` and the extent, if any.
    pub(crate) fn entry(&self, position: usize) -> Option<(u64, Extent)> {
        self.entries.get(position).copied()
    }

    fn heap_bytes(&self) -> usize {
        let levels: usize = self.levels.iter().map(Vec::capacity).sum();
        levels * 8 + self.entries.capacity() * std::mem::size_of::<(u64, Extent)>()
    }
}

/// The position in `level` of the last entry whose first sector (`start`)
/// is at or below `pos` in block `block` (whose first entry is at or below
/// `pos`, or is the level's first). A whole block is counted without
/// branches: its cache lines are fetched together, not one after the
/// other as a binary search would.
fn last_at_or_below<T>(level: &[T], block: usize, pos: u64, start: impl Fn(&T) -> u64) -> usize {
    let first = block * BLOCK;
    let entries = &level[first..(first + BLOCK).min(level.len())];
    let at_or_below = match <&[T; BLOCK]>::try_from(entries) {
        Ok(full) => full
            .iter()
            .map(|e| usize::from(start(e) <= pos))
            .sum::<usize>(),
        Err(_) => entries.iter().map(|e| usize::from(start(e) <= pos)).sum(),
    };
    (first + at_or_below).saturating_sub(1)
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
            .field("built", &self.built.get().map(|i| i.entries.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorted first sectors from 0 with gaps of 1..=`max_gap` sectors.
    fn starts(count: usize, max_gap: u64, seed: u64) -> Vec<u64> {
        let mut rng = seed | 1;
        let mut at = 0;
        (0..count)
            .map(|_| {
                let start = at;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                at += 1 + rng % max_gap;
                start
            })
            .collect()
    }

    #[test]
    fn position_of_equals_a_binary_search_at_every_block_and_level_size() {
        // Sizes around one block, one level and two levels of blocks.
        for count in [1, 2, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097, 70_001] {
            for max_gap in [1, 3, 1000] {
                let starts = starts(count, max_gap, count as u64 * 31 + max_gap);
                let mut index = FlatIndex::with_capacity(count);
                for &s in &starts {
                    index.push(s, Extent::none(1));
                }
                let index = index.finish();
                let levels = index.levels.len();
                assert!(count <= BLOCK || levels > 0, "{count}: no level");
                let last = *starts.last().unwrap() + max_gap;
                // Every first sector, the sector before it and a spread of
                // sectors between (a full sweep for the small cases).
                let probes: Vec<u64> = if last < 20_000 {
                    (0..last).collect()
                } else {
                    starts
                        .iter()
                        .flat_map(|&s| [s, s.saturating_sub(1), s + 1])
                        .chain([last - 1])
                        .collect()
                };
                for pos in probes {
                    let want = starts.partition_point(|&s| s <= pos) - 1;
                    assert_eq!(
                        index.position_of(pos),
                        want,
                        "{count} extents, sector {pos}"
                    );
                }
            }
        }
    }
}
