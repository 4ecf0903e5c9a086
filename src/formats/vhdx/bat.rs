//! The block allocation table: payload and sector bitmap entries, block
//! states and the sector bitmaps of partially present blocks.

use super::{VhdxDisk, MIB};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::mapped::Mapping;
use std::sync::Arc;

pub(super) const STATE_MASK: u64 = 7;
pub(super) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(super) const PAYLOAD_UNDEFINED: u64 = 1;
pub(super) const PAYLOAD_ZERO: u64 = 2;
pub(super) const PAYLOAD_UNMAPPED: u64 = 3;
pub(super) const PAYLOAD_UNMAPPED_DRAFT: u64 = 5;
pub(super) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(super) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub(super) const SECTOR_BITMAP_PRESENT: u64 = 6;
pub(super) const SECTOR_BITMAP_BLOCK_BYTES: u64 = MIB;

impl VhdxDisk {
    pub(super) fn absent(&self) -> Mapping {
        if self.locator.is_some() {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    pub(super) fn sectors_per_block(&self) -> u64 {
        self.block_bytes / SECTOR_BYTES
    }

    pub(super) fn payload_entry(&self, block: u64) -> u64 {
        // In range: `bat` holds every payload entry the size needs.
        self.bat[(block + block / self.chunk_ratio) as usize]
    }

    /// The file offset of a present block's (or bitmap's) data.
    pub(super) fn entry_offset(&self, entry: u64, what: &str, index: u64) -> Result<u64> {
        let offset = (entry >> 20) * MIB; // < 2^64: 44 bits times 2^20
        if offset < MIB {
            return Err(Error::corrupt(format!(
                "{}: BAT entry for {what} {index} ({entry:#018x}) is present at file offset 0",
                self.path.display()
            )));
        }
        Ok(offset)
    }

    /// The file offset of sector `in_block` of a block stored at
    /// `block_at`, checked (with the run of `run` sectors) to lie in the file.
    pub(super) fn run_offset(
        &self,
        block_at: u64,
        in_block: u64,
        run: u64,
        block: u64,
    ) -> Result<u64> {
        let offset = block_at
            .checked_add(in_block * SECTOR_BYTES)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{}: block {block} lies past the largest file offset",
                    self.path.display()
                ))
            })?;
        self.check_inside(offset, run * SECTOR_BYTES, "block", block)?;
        Ok(offset)
    }

    pub(super) fn check_inside(&self, offset: u64, len: u64, what: &str, index: u64) -> Result<()> {
        if !matches!(offset.checked_add(len), Some(end) if end <= self.view.len()) {
            return Err(Error::corrupt(format!(
                "{}: {what} {index} at byte offset {offset} (+{len}) runs past the end of the \
                 {}-byte file",
                self.path.display(),
                self.view.len()
            )));
        }
        Ok(())
    }

    /// Bits of `block`'s slice of its chunk's sector bitmap.
    pub(super) fn block_bitmap(&self, block: u64) -> Result<Arc<[u8]>> {
        if let Some(bits) = self.cached_bitmap.get(block) {
            return Ok(bits);
        }
        {
            let chunk = block / self.chunk_ratio;
            let index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
            let entry = self.bat[index as usize];
            if entry & STATE_MASK != SECTOR_BITMAP_PRESENT {
                return Err(Error::corrupt(format!(
                    "{}: block {block} is partially present but the sector bitmap entry of \
                     chunk {chunk} is in state {}",
                    self.path.display(),
                    entry & STATE_MASK
                )));
            }
            let bitmap_at = self.entry_offset(entry, "sector bitmap of chunk", chunk)?;
            self.check_inside(bitmap_at, SECTOR_BITMAP_BLOCK_BYTES, "sector bitmap", chunk)?;
            let sectors_in_block = self.block_bytes / self.logical_sector_bytes;
            let first_bit = (block % self.chunk_ratio) * sectors_in_block;
            // Block size / sector size is a multiple of 8; at most 64 KiB.
            let mut bits = vec![0u8; (sectors_in_block / 8) as usize];
            self.view
                .read_exact("sector bitmap", bitmap_at + first_bit / 8, &mut bits)?;
            Ok(self.cached_bitmap.put(block, bits))
        }
    }

    /// Length of the run of blocks from `block` whose entries satisfy
    /// `same`, in sectors from `in_block`, capped at `count`.
    pub(super) fn run_of_blocks(
        &self,
        block: u64,
        in_block: u64,
        count: u64,
        same: impl Fn(u64, u64) -> bool,
    ) -> u64 {
        let per_block = self.sectors_per_block();
        let mut run = (per_block - in_block).min(count);
        let mut next = block + 1;
        while run < count && same(next, self.payload_entry(next)) {
            run = (run + per_block).min(count);
            next += 1;
        }
        run
    }
}

pub(super) fn is_absent_state(state: u64) -> bool {
    matches!(
        state,
        PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_DRAFT
    )
}
