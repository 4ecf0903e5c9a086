//! Store space: where the overlay's data lives, and which of it is free.
//!
//! The store's data area is divided into *units* of the COW granularity.
//! A unit is in use while any of its sectors is referenced (by a `Store`
//! extent, or by store metadata). Units whose last reference goes are free;
//! in a crash-safe (journaled) store they become reusable only after the
//! transaction that stopped referencing them is durable, so a crash can
//! never find old map entries pointing at reused space.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::format::PAYLOAD;
use crate::error::{Error, Result};

/// Byte-addressed storage under the overlay store. A trait so tests can put
/// a fault-injecting layer underneath.
pub trait Storage: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> Result<()>;
    /// Shrinks or grows the storage to `len` bytes.
    fn set_len(&mut self, len: u64) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Storage in a file; `what` names it in error messages.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    what: String,
}

impl FileStorage {
    /// An anonymous temporary file that vanishes when closed: the legacy
    /// overlay's store.
    pub fn anonymous() -> Result<FileStorage> {
        let file = tempfile::tempfile()
            .map_err(|e| Error::open(format!("temporary overlay store: {e}")))?;
        Ok(FileStorage {
            file,
            what: "temporary overlay store".into(),
        })
    }

    /// Storage over an open file.
    pub fn new(file: File, what: String) -> FileStorage {
        FileStorage { file, what }
    }

    /// The file underneath.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::file_io::read_exact_at(&self.file, buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(format!(
                    "{}: {} bytes at offset {offset} lie past the end of the file",
                    self.what,
                    buf.len()
                ))
            } else {
                Error::read(&self.what, offset, e)
            }
        })
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::write(&self.what, offset, e))
    }
    fn flush(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::write(&self.what, 0, e))
    }
    fn set_len(&mut self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::write(&self.what, len, e))
    }
    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::read(&self.what, 0, e))
    }
}

/// Free ranges of units: merged on free, best fit on allocation, O(log n).
#[derive(Debug, Clone, Default)]
struct FreeRanges {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
}

impl FreeRanges {
    fn take_best_fit(&mut self, len: u64) -> Option<u64> {
        let &(free_len, start) = self.by_len.range((len, 0)..).next()?;
        self.remove(start, free_len);
        if free_len > len {
            self.put(start + len, free_len - len);
        }
        Some(start)
    }

    /// Adds a free range, merging neighbours; returns the merged range.
    fn add(&mut self, start: u64, len: u64) -> (u64, u64) {
        let (mut start, mut len) = (start, len);
        if let Some((&prev, &prev_len)) = self.by_start.range(..start).next_back() {
            if prev + prev_len == start {
                self.remove(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_start.get(&(start + len)) {
            self.remove(start + len, next_len);
            len += next_len;
        }
        self.put(start, len);
        (start, len)
    }

    fn remove(&mut self, start: u64, len: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    fn put(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn total(&self) -> u64 {
        self.by_start.values().sum()
    }
}

/// Units per page of the persisted free-space bitmap (a bit per payload bit).
pub const UNITS_PER_BITMAP_PAGE: u64 = PAYLOAD as u64 * 8;

/// The allocation state of the store's units.
#[derive(Debug, Clone)]
pub struct UnitMap {
    /// Sectors per unit.
    granularity: u64,
    /// One bit per unit: in use.
    used: Vec<u64>,
    /// Units in use that fewer than `granularity` sectors reference: the
    /// number of sectors they do reference.
    partial: HashMap<u64, u64>,
    free: FreeRanges,
    /// Units freed but not yet reusable (journaled stores).
    pending: Vec<(u64, u64)>,
    /// Units allocated since the last journal transaction: no durable map
    /// refers to them, so they may be overwritten in place.
    fresh: HashSet<u64>,
    journaled: bool,
    /// Number of units the store spans.
    end: u64,
    /// Bitmap pages changed since the last transaction.
    dirty_pages: BTreeSet<u64>,
}

impl UnitMap {
    /// An empty store. `journaled` defers reuse of freed units until
    /// `commit_done` and tracks fresh units.
    pub fn new(granularity: u64, journaled: bool) -> UnitMap {
        UnitMap {
            granularity,
            used: Vec::new(),
            partial: HashMap::new(),
            free: FreeRanges::default(),
            pending: Vec::new(),
            fresh: HashSet::new(),
            journaled,
            end: 0,
            dirty_pages: BTreeSet::new(),
        }
    }

    /// Sectors per unit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Units the store spans (in use or free).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Units in use.
    pub fn units_in_use(&self) -> u64 {
        self.end - self.free.total() - self.pending.iter().map(|p| p.1).sum::<u64>()
    }

    /// True when unit `u` is in use.
    pub fn is_used(&self, u: u64) -> bool {
        self.used
            .get((u / 64) as usize)
            .is_some_and(|w| w & (1 << (u % 64)) != 0)
    }

    fn set_used(&mut self, u: u64, on: bool) {
        let word = (u / 64) as usize;
        if word >= self.used.len() {
            self.used.resize(word + 1, 0);
        }
        if on {
            self.used[word] |= 1 << (u % 64);
        } else {
            self.used[word] &= !(1 << (u % 64));
        }
        self.dirty_pages.insert(u / UNITS_PER_BITMAP_PAGE);
    }

    /// Allocates units for `sectors` contiguous sectors and returns the
    /// first sector (a unit boundary). The last unit may be partly used.
    pub fn allocate(&mut self, sectors: u64) -> Result<u64> {
        let g = self.granularity;
        let units = sectors.div_ceil(g);
        if units == 0 {
            return Ok(self.end * g);
        }
        let first = match self.free.take_best_fit(units) {
            Some(first) => first,
            None => {
                let first = self.end;
                let end = first
                    .checked_add(units)
                    .filter(|e| e.checked_mul(g * 512).is_some())
                    .ok_or_else(|| {
                        Error::no_space("overlay store would exceed 2^64 bytes".into())
                    })?;
                self.end = end;
                first
            }
        };
        for u in first..first + units {
            self.set_used(u, true);
            if self.journaled {
                self.fresh.insert(u);
            }
        }
        let tail = sectors % g;
        if tail != 0 {
            self.partial.insert(first + units - 1, tail);
        }
        Ok(first * g)
    }

    /// Drops the references of sectors `[start, start + len)`; units left
    /// unreferenced become free (or pending, in a journaled store).
    pub fn release(&mut self, start: u64, len: u64) {
        let g = self.granularity;
        let mut pos = start;
        while pos < start + len {
            let u = pos / g;
            let unit_end = (u + 1) * g;
            let overlap = unit_end.min(start + len) - pos;
            let held = self.partial.get(&u).copied().unwrap_or(g);
            let left = held.saturating_sub(overlap);
            if left == 0 {
                self.partial.remove(&u);
                self.set_used(u, false);
                if self.journaled && !self.fresh.remove(&u) {
                    self.pending.push((u, 1));
                } else {
                    self.fresh.remove(&u);
                    self.free_unit(u);
                }
            } else {
                self.partial.insert(u, left);
            }
            pos = unit_end.min(start + len);
        }
    }

    fn free_unit(&mut self, u: u64) {
        let (start, len) = self.free.add(u, 1);
        if start + len == self.end {
            // The tail of the store is free: shrink it.
            self.free.remove(start, len);
            self.end = start;
        }
    }

    /// The journal transaction that stopped referencing the pending units
    /// is durable: they may be reused.
    pub fn commit_done(&mut self) {
        for (u, n) in std::mem::take(&mut self.pending) {
            for unit in u..u + n {
                self.free_unit(unit);
            }
        }
    }

    /// A journal transaction was written: no unit is fresh any more.
    pub fn transaction_written(&mut self) {
        self.fresh.clear();
    }

    /// True when every unit under sectors `[start, start + len)` is fresh
    /// (or the store is not journaled): writing them in place is safe.
    pub fn writable_in_place(&self, start: u64, len: u64) -> bool {
        if !self.journaled {
            return true;
        }
        let g = self.granularity;
        (start / g..(start + len).div_ceil(g)).all(|u| self.fresh.contains(&u))
    }

    /// Bitmap pages changed since the last call.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty_pages).into_iter().collect()
    }

    /// Marks bitmap pages changed again (a transaction that took them
    /// failed).
    pub fn mark_pages_dirty(&mut self, pages: &[u64]) {
        self.dirty_pages.extend(pages.iter().copied());
    }

    /// Number of bitmap pages the store spans.
    pub fn bitmap_pages(&self) -> u64 {
        self.end.div_ceil(UNITS_PER_BITMAP_PAGE)
    }

    /// The payload of bitmap page `page`: bit `i` of byte `b` is
    /// unit `page * UNITS_PER_BITMAP_PAGE + 8 * b + i`.
    pub fn bitmap_page(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; (UNITS_PER_BITMAP_PAGE / 8) as usize];
        let first = page * UNITS_PER_BITMAP_PAGE;
        for i in 0..UNITS_PER_BITMAP_PAGE {
            if first + i < self.end && self.is_used(first + i) {
                out[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        out
    }

    /// Rebuilds the allocation state from every referenced sector range
    /// (store extents and metadata). Fails when two references overlap, or
    /// a reference lies outside `end` units: the map is corrupt.
    pub fn rebuild(
        granularity: u64,
        end: u64,
        journaled: bool,
        references: &mut dyn Iterator<Item = (u64, u64)>,
    ) -> Result<UnitMap> {
        let g = granularity;
        let mut sorted: Vec<(u64, u64)> = references.filter(|r| r.1 > 0).collect();
        sorted.sort_unstable();
        let mut map = UnitMap::new(g, journaled);
        map.end = end;
        let mut last_end = 0u64;
        for (start, len) in sorted {
            let stop = start
                .checked_add(len)
                .filter(|&s| s <= end.saturating_mul(g))
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "store sectors {start}..+{len} lie outside the store's {end} units"
                    ))
                })?;
            if start < last_end {
                return Err(Error::corrupt(format!(
                    "store sectors {start}..{last_end} are referenced twice"
                )));
            }
            last_end = stop;
            let mut pos = start;
            while pos < stop {
                let u = pos / g;
                let unit_stop = ((u + 1) * g).min(stop);
                let held = if map.is_used(u) {
                    map.partial.get(&u).copied().unwrap_or(g)
                } else {
                    0
                };
                map.set_used(u, true);
                let now = held + (unit_stop - pos);
                if now < g {
                    map.partial.insert(u, now);
                } else {
                    map.partial.remove(&u);
                }
                pos = unit_stop;
            }
        }
        let mut u = 0;
        while u < end {
            if map.is_used(u) {
                u += 1;
                continue;
            }
            let start = u;
            while u < end && !map.is_used(u) {
                u += 1;
            }
            map.free.add(start, u - start);
        }
        map.dirty_pages.clear();
        Ok(map)
    }

    /// Units whose in-use bit differs between this map and `bitmap` (a
    /// persisted bitmap, bit per unit, as `bitmap_page` lays it out).
    pub fn differences(&self, bitmap: &dyn Fn(u64) -> bool) -> (Vec<u64>, Vec<u64>) {
        let (mut leaked, mut missing) = (Vec::new(), Vec::new());
        for u in 0..self.end {
            match (self.is_used(u), bitmap(u)) {
                (false, true) => leaked.push(u),
                (true, false) => missing.push(u),
                _ => {}
            }
        }
        (leaked, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_units_are_reused_before_the_store_grows() {
        let mut units = UnitMap::new(8, false);
        let a = units.allocate(8).unwrap();
        let b = units.allocate(16).unwrap();
        let _c = units.allocate(8).unwrap();
        assert_eq!((a, b, units.end()), (0, 8, 4));
        units.release(b, 16);
        assert_eq!(units.allocate(5).unwrap(), 8);
        assert_eq!(units.end(), 4);
        assert_eq!(units.units_in_use(), 3);
    }

    #[test]
    fn a_unit_stays_in_use_until_its_last_sector_is_released() {
        let mut units = UnitMap::new(8, false);
        let a = units.allocate(8).unwrap();
        let _b = units.allocate(8).unwrap();
        units.release(a + 2, 3);
        assert!(units.is_used(0));
        units.release(a, 2);
        assert!(units.is_used(0));
        units.release(a + 5, 3);
        assert!(!units.is_used(0));
    }

    #[test]
    fn journaled_frees_wait_for_the_commit() {
        let mut units = UnitMap::new(8, true);
        let a = units.allocate(8).unwrap();
        units.transaction_written();
        assert!(!units.writable_in_place(a, 8));
        units.release(a, 8);
        // Not reusable yet: a new allocation grows the store.
        assert_eq!(units.allocate(8).unwrap(), 8);
        units.commit_done();
        assert_eq!(units.allocate(8).unwrap(), 0);
        assert!(units.writable_in_place(0, 8));
    }

    #[test]
    fn rebuild_finds_double_references() {
        let refs = [(0u64, 10u64), (8, 4)];
        assert!(UnitMap::rebuild(8, 4, false, &mut refs.iter().copied()).is_err());
        let refs = [(0u64, 10u64), (16, 4)];
        let map = UnitMap::rebuild(8, 4, false, &mut refs.iter().copied()).unwrap();
        assert_eq!(map.units_in_use(), 3);
    }
}
