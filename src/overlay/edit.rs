//! Editing the drive's layout: insert, move, delete and discard, and the
//! release of the store space they free.

use super::extents::Extent;
use super::Overlay;
use crate::disk::{check_range, SECTOR_BYTES};
use crate::error::{Error, Result};

impl Overlay {
    /// Inserts `count` unallocated sectors before `lba` (`lba == size`
    /// appends). They read as zeros and report `NotAlloc`.
    pub fn insert(&mut self, lba: u64, count: u64) -> Result<()> {
        let size = self.map.len();
        if lba > size {
            return Err(Error::invalid_block(format!(
                "insert at sector {lba}: past the end of a drive of {size} sectors"
            )));
        }
        size.checked_add(count)
            .and_then(|s| s.checked_mul(SECTOR_BYTES))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "inserting {count} sectors would make the drive exceed 2^64 bytes"
                ))
            })?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        self.map.insert(lba, &[Extent::none(count)])?;
        Ok(())
    }

    /// Cuts `[from, from + count)` and pastes it so that it starts at what
    /// was sector `to` before the cut (`to == size` moves it to the end).
    /// Fails with `InvalidMove` when `from <= to <= from + count`.
    pub fn move_sectors(&mut self, from: u64, to: u64, count: u64) -> Result<()> {
        let size = self.map.len();
        check_range(from, count, size)?;
        if to > size {
            return Err(Error::invalid_block(format!(
                "move to sector {to}: past the end of a drive of {size} sectors"
            )));
        }
        if from <= to && to <= from + count {
            return Err(Error::invalid_move(format!(
                "destination {to} lies within the moved range {from}..={}",
                from + count
            )));
        }
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let cut = self.map.remove(from, count)?;
        let destination = if to < from { to } else { to - count };
        self.map.insert(destination, &cut)?;
        Ok(())
    }

    /// Removes `[lba, lba + count)`; the drive shrinks by `count` and the
    /// store space the range used is freed.
    pub fn delete(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let removed = self.map.remove(lba, count)?;
        self.release(&removed)?;
        Ok(())
    }

    /// Makes `[lba, lba + count)` unallocated (zeros, `NotAlloc`) and frees
    /// the store space it used.
    pub fn discard(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let replaced = self.map.replace(lba, count, Extent::none(count))?;
        self.release(&replaced)?;
        Ok(())
    }

    pub(super) fn release(&mut self, extents: &[Extent]) -> Result<()> {
        for e in extents.iter().filter(|e| e.kind.in_store()) {
            self.units.release(e.base, e.len);
        }
        if self.journal.is_none() {
            // The anonymous store shrinks when its tail frees.
            let needed =
                self.data_offset + self.units.end() * self.units.granularity() * SECTOR_BYTES;
            if needed < self.store_file_len {
                self.store.set_len(needed)?;
                self.store_file_len = needed;
            }
        }
        Ok(())
    }
}
