//! Store space: where the overlay's data lives, and which of it is free.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};

/// Byte-addressed storage under the overlay store. A trait so tests can put
/// a fault-injecting layer underneath.
pub trait Storage: Send {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> Result<()>;
    /// Shrinks or grows the storage to `len` bytes.
    fn set_len(&mut self, len: u64) -> Result<()>;
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
            .map_err(|e| Error::Open(format!("temporary overlay store: {e}")))?;
        Ok(FileStorage {
            file,
            what: "temporary overlay store".into(),
        })
    }

    /// Storage over an open file.
    pub fn new(file: File, what: String) -> FileStorage {
        FileStorage { file, what }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::read(&self.what, offset, e))
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
}

/// The free-space map of the store, in sectors: which ranges below the
/// high-water mark are free. Allocation is best fit, O(log n).
#[derive(Debug, Clone, Default)]
pub struct SpaceMap {
    /// start -> length of each free range (never adjacent: merged on free).
    by_start: BTreeMap<u64, u64>,
    /// (length, start) of each free range, for best fit.
    by_len: BTreeSet<(u64, u64)>,
    /// Sectors in use or free below this; nothing above.
    end: u64,
}

impl SpaceMap {
    /// An empty store.
    pub fn new() -> SpaceMap {
        SpaceMap::default()
    }

    /// The store's high-water mark in sectors.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Total free sectors below the high-water mark.
    pub fn free_sectors(&self) -> u64 {
        self.by_start.values().sum()
    }

    /// Allocates `len` contiguous sectors and returns the first.
    pub fn allocate(&mut self, len: u64) -> Result<u64> {
        if len == 0 {
            return Ok(self.end);
        }
        if let Some(&(free_len, start)) = self.by_len.range((len, 0)..).next() {
            self.take(start, free_len);
            if free_len > len {
                self.put(start + len, free_len - len);
            }
            return Ok(start);
        }
        let start = self.end;
        self.end = start
            .checked_add(len)
            .filter(|end| end.checked_mul(SECTOR_BYTES).is_some())
            .ok_or_else(|| Error::NoSpace("overlay store would exceed 2^64 bytes".into()))?;
        Ok(start)
    }

    /// Returns `[start, start + len)` to the free map, merging neighbours
    /// and lowering the high-water mark when the range ends there.
    pub fn free(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&prev_start, &prev_len)) = self.by_start.range(..start).next_back() {
            if prev_start + prev_len == start {
                self.take(prev_start, prev_len);
                start = prev_start;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_start.get(&(start + len)) {
            self.take(start + len, next_len);
            len += next_len;
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.put(start, len);
        }
    }

    fn take(&mut self, start: u64, len: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    fn put(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_space_is_reused_before_the_store_grows() {
        let mut space = SpaceMap::new();
        let a = space.allocate(8).unwrap();
        let b = space.allocate(8).unwrap();
        let _c = space.allocate(8).unwrap();
        assert_eq!((a, b, space.end()), (0, 8, 24));
        space.free(b, 8);
        assert_eq!(space.allocate(4).unwrap(), 8);
        assert_eq!(space.allocate(4).unwrap(), 12);
        assert_eq!(space.end(), 24);
    }

    #[test]
    fn freeing_the_tail_lowers_the_high_water_mark() {
        let mut space = SpaceMap::new();
        space.allocate(10).unwrap();
        space.allocate(10).unwrap();
        space.free(0, 10);
        space.free(10, 10);
        assert_eq!(space.end(), 0);
        assert_eq!(space.free_sectors(), 0);
    }
}
