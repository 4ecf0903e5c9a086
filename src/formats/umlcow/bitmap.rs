//! The COW bitmap: one bit per COW sector, kept in memory, its changed
//! bytes written back (after the data is durable) on flush.

use std::os::unix::fs::FileExt;

use super::UmlCow;
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};

impl UmlCow {
    pub(super) fn bit(&self, n: u64) -> bool {
        let byte = n / 8;
        byte < self.bitmap.len() as u64 && self.bitmap[byte as usize] & (1 << (n % 8)) != 0
    }

    pub(super) fn set_bit(&mut self, n: u64) -> Result<()> {
        let byte = (n / 8) as usize;
        if byte >= self.bitmap.len() {
            return Err(Error::unsupported(format!(
                "COW sector {n} has no bit inside this file's bitmap area (the v1/v2 \
                 rounding bug); it cannot be written"
            )));
        }
        self.bitmap[byte] |= 1 << (n % 8);
        self.dirty = Some(match self.dirty {
            None => (byte, byte + 1),
            Some((a, b)) => (a.min(byte), b.max(byte + 1)),
        });
        Ok(())
    }

    /// Disk sectors per COW sector.
    pub(super) fn per_cow(&self) -> u64 {
        u64::from(self.header.sector_size) / SECTOR_BYTES
    }

    /// Run of disk sectors from `lba` (at most `count`) whose COW bits
    /// are all equal; returns (set, run).
    pub(super) fn bit_run(&self, lba: u64, count: u64) -> (bool, u64) {
        let per = self.per_cow();
        let first = lba / per;
        let set = self.bit(first);
        let mut cs = first + 1;
        let last = (lba + count - 1) / per;
        while cs <= last && self.bit(cs) == set {
            cs += 1;
        }
        let end = (cs * per).min(lba + count);
        (set, end - lba)
    }

    /// Writes the bitmap bytes changed since the last flush, after making
    /// the data durable.
    pub(super) fn sync(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.unsynced || self.dirty.is_some() {
            self.file
                .sync_data()
                .map_err(|e| Error::write("UML COW data sync", 0, e))?;
            self.unsynced = false;
        }
        if let Some((a, b)) = self.dirty {
            let at = self.header.bitmap_offset + a as u64;
            self.file
                .write_all_at(&self.bitmap[a..b], at)
                .map_err(|e| Error::write("UML COW bitmap", at, e))?;
            self.file
                .sync_data()
                .map_err(|e| Error::write("UML COW bitmap sync", at, e))?;
            self.dirty = None;
        }
        Ok(())
    }
}
