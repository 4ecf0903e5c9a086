//! The block allocation table and sector bitmaps: mapping a sparse
//! image's sectors to its blocks.

use std::sync::Arc;

use super::{Layout, VhdDisk};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::mapped::Mapping;
use crate::formats::table_cache::LastDecoded;

pub(super) const UNALLOCATED_BLOCK: u32 = 0xFFFF_FFFF;

/// Where a sparse (dynamic or differencing) image keeps its blocks.
#[derive(Debug)]
pub(super) struct SparseLayout {
    /// One entry per block of the virtual disk (only as many as the size
    /// needs; the header may declare more).
    pub(super) bat: Vec<u32>,
    pub(super) sectors_per_block: u64,
    /// Size on disk of each block's sector bitmap (whole sectors).
    pub(super) bitmap_bytes: u64,
    /// The last sector bitmap read: (block index, bitmap bytes). A
    /// sequential read touches each block's bitmap once.
    pub(super) cached_bitmap: LastDecoded,
}

impl VhdDisk {
    /// The sector bitmap of allocated block `block` stored at `block_at`.
    pub(super) fn bitmap(&self, block: u64, block_at: u64) -> Result<Arc<[u8]>> {
        let Layout::Sparse(layout) = &self.layout else {
            return Err(Error::internal("sector bitmap of a fixed VHD".into()));
        };
        if let Some(bits) = layout.cached_bitmap.get(block) {
            return Ok(bits);
        }
        {
            // Size bounded by the validated block size (at most 64 KiB).
            let mut bits = vec![0u8; layout.bitmap_bytes as usize];
            self.file.read_exact_at(&mut bits, block_at).map_err(|e| {
                Error::read(
                    &format!("{}: sector bitmap of block {block}", self.path.display()),
                    block_at,
                    e,
                )
            })?;
            Ok(layout.cached_bitmap.put(block, bits))
        }
    }

    pub(super) fn absent(&self) -> Mapping {
        if self.parent_info.is_some() {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    pub(super) fn map_sparse(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let Layout::Sparse(layout) = &self.layout else {
            return Err(Error::internal("sparse mapping of a fixed VHD".into()));
        };
        let per_block = layout.sectors_per_block;
        let bitmap_bytes = layout.bitmap_bytes;
        let block = lba / per_block;
        let in_block = lba % per_block;
        let in_this_block = (per_block - in_block).min(count);
        let entry = layout.bat[block as usize];
        if entry == UNALLOCATED_BLOCK {
            // Coalesce following unallocated blocks into one run.
            let mut run = in_this_block;
            let mut next = block as usize + 1;
            while run < count && next < layout.bat.len() && layout.bat[next] == UNALLOCATED_BLOCK {
                run = (run + per_block).min(count);
                next += 1;
            }
            return Ok((self.absent(), run));
        }
        let block_at = u64::from(entry) * SECTOR_BYTES;
        let data_at = block_at + bitmap_bytes; // < 2^41 + 2^16: no overflow
        if data_at > self.file_len {
            return Err(Error::corrupt(format!(
                "{}: BAT entry {block} puts the sector bitmap at byte offset {block_at}, past \
                 the end of the {}-byte file",
                self.path.display(),
                self.file_len
            )));
        }
        let bitmap = self.bitmap(block, block_at)?;
        let bit = |sector: u64| bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0;
        let present = bit(in_block);
        let mut run = 1;
        while run < in_this_block {
            let sector = in_block + run;
            // Whole bytes that agree with `present` are skipped at once.
            if sector.is_multiple_of(8) && run + 8 <= in_this_block {
                let byte = bitmap[(sector / 8) as usize];
                if byte == if present { 0xFF } else { 0x00 } {
                    run += 8;
                    continue;
                }
            }
            if bit(sector) != present {
                break;
            }
            run += 1;
        }
        if !present {
            return Ok((self.absent(), run));
        }
        let offset = data_at + in_block * SECTOR_BYTES;
        let end = offset + run * SECTOR_BYTES;
        if end > self.file_len {
            return Err(Error::corrupt(format!(
                "{}: BAT entry {block} puts data at byte offset {offset}..{end}, past the end \
                 of the {}-byte file",
                self.path.display(),
                self.file_len
            )));
        }
        Ok((Mapping::Data { file: 0, offset }, run))
    }
}
