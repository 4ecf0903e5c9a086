//! The block bitmap: allocation of file blocks, and its on-disk form
//! (a header block with the counts, then one bit per block).

use byteorder::{ByteOrder, LittleEndian};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Vci, VciHeader, BLKMAP_MAGIC, BLKMAP_VERSION, BLOCK};
use crate::error::{Error, Result};

impl Vci {
    pub(super) fn bit(&self, n: u64) -> bool {
        self.bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    pub(super) fn set_bits(&mut self, start: u64, len: u64, on: bool) {
        for n in start..start + len {
            let (byte, bit) = ((n / 8) as usize, 1u8 << (n % 8));
            if on {
                self.bitmap[byte] |= bit;
            } else {
                self.bitmap[byte] &= !bit;
            }
        }
    }

    /// Finds `want` free blocks (fewer if `contiguous` is false and no run
    /// is that long), marks them, and returns (start, len).
    pub(super) fn allocate(&mut self, want: u64, contiguous: bool) -> Option<(u64, u64)> {
        let total = self.header.blocks;
        let mut scanned = 0u64;
        let mut n = if self.cursor >= total { 0 } else { self.cursor };
        while scanned < total {
            if !self.bit(n) {
                let mut len = 1;
                while len < want && n + len < total && !self.bit(n + len) {
                    len += 1;
                }
                if len == want || !contiguous {
                    self.set_bits(n, len, true);
                    self.cursor = n + len;
                    return Some((n, len));
                }
                scanned += len;
                n += len;
            } else {
                scanned += 1;
                n += 1;
            }
            if n >= total {
                n = 0;
            }
        }
        None
    }

    /// `allocate`, committing first to release pending frees if needed.
    pub(super) fn allocate_or_commit(&mut self, want: u64, contiguous: bool) -> Result<(u64, u64)> {
        if let Some(r) = self.allocate(want, contiguous) {
            return Ok(r);
        }
        if !self.pending_free.is_empty() {
            self.commit()?;
            if let Some(r) = self.allocate(want, contiguous) {
                return Ok(r);
            }
        }
        Err(Error::no_space(format!(
            "{}: the cache ({} blocks) is full",
            self.path.display(),
            self.header.blocks
        )))
    }

    pub(super) fn counts(&self) -> (u64, u64) {
        let data: u64 = self.extents.values().map(|e| e.len).sum();
        let used: u64 = self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        (used - data.min(used), data.min(used))
    }

    pub(super) fn write_bitmap(&self) -> Result<()> {
        let (meta, data) = self.counts();
        write_blkmap(
            &self.file,
            self.header.blkmap,
            self.header.blocks,
            meta,
            data,
            &self.bitmap,
        )
    }
}

pub(super) fn write_blkmap(
    file: &File,
    at: u64,
    blocks: u64,
    meta: u64,
    data: u64,
    bits: &[u8],
) -> Result<()> {
    let mut h = vec![0u8; BLOCK as usize];
    LittleEndian::write_u32(&mut h[0..], BLKMAP_MAGIC);
    LittleEndian::write_u32(&mut h[4..], BLKMAP_VERSION);
    LittleEndian::write_u64(&mut h[8..], blocks);
    LittleEndian::write_u64(&mut h[16..], blocks - meta - data);
    LittleEndian::write_u64(&mut h[24..], meta);
    LittleEndian::write_u64(&mut h[32..], data);
    file.write_all_at(&h, at * BLOCK)
        .map_err(|e| Error::write("VCI bitmap header", at * BLOCK, e))?;
    file.write_all_at(bits, (at + 1) * BLOCK)
        .map_err(|e| Error::write("VCI bitmap", (at + 1) * BLOCK, e))
}

pub(super) fn read_blkmap(file: &File, header: &VciHeader) -> Result<Vec<u8>> {
    let mut h = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut h, header.blkmap * BLOCK)
        .map_err(|e| Error::read("VCI bitmap header", header.blkmap * BLOCK, e))?;
    if LittleEndian::read_u32(&h[0..]) != BLKMAP_MAGIC
        || LittleEndian::read_u32(&h[4..]) != BLKMAP_VERSION
    {
        return Err(Error::corrupt(
            "VCI: bad block bitmap magic or version".into(),
        ));
    }
    let (blocks, free, meta, data) = (
        LittleEndian::read_u64(&h[8..]),
        LittleEndian::read_u64(&h[16..]),
        LittleEndian::read_u64(&h[24..]),
        LittleEndian::read_u64(&h[32..]),
    );
    let sum = free.checked_add(meta).and_then(|v| v.checked_add(data));
    if blocks != header.blocks || sum != Some(blocks) {
        return Err(Error::corrupt(format!(
            "VCI: block bitmap counts {blocks} = {free} free + {meta} meta + {data} data \
             do not add up for a cache of {} blocks",
            header.blocks
        )));
    }
    let mut bits = vec![0u8; (u64::from(header.blkmap_blocks) - 1) as usize * BLOCK as usize];
    file.read_exact_at(&mut bits, (header.blkmap + 1) * BLOCK)
        .map_err(|e| Error::read("VCI bitmap", (header.blkmap + 1) * BLOCK, e))?;
    // Bits past the cache's end must be clear.
    for n in header.blocks..bits.len() as u64 * 8 {
        if bits[(n / 8) as usize] & (1 << (n % 8)) != 0 {
            return Err(Error::corrupt(format!(
                "VCI: bitmap marks block {n}, past the cache's end"
            )));
        }
    }
    let set: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != meta + data {
        return Err(Error::corrupt(format!(
            "VCI: bitmap has {set} blocks set but its header counts {}",
            meta + data
        )));
    }
    Ok(bits)
}
