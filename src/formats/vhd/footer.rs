//! The footer and the dynamic header: cookies, checksums, disk type,
//! size, unique id, and where a sparse image keeps its BAT.

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{BigEndian, ByteOrder};

use super::bat::SparseLayout;
use super::{VhdDisk, VhdParentInfo};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::table_cache::LastDecoded;

pub(super) const FOOTER_BYTES: u64 = 512;
pub(super) const DYNAMIC_HEADER_BYTES: usize = 1024;
pub(super) const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub(super) const DYNAMIC_COOKIE: &[u8; 8] = b"cxsparse";
pub(super) const FOOTER_CHECKSUM_AT: usize = 64;
pub(super) const DYNAMIC_CHECKSUM_AT: usize = 36;

/// Footer fields (big-endian): data offset (also the dynamic header's
/// field at the same place), current size, disk type, unique id.
pub(super) const DATA_OFFSET_AT: usize = 16;
pub(super) const CURRENT_SIZE_AT: usize = 48;
pub(super) const DISK_TYPE_AT: usize = 60;
pub(super) const UNIQUE_ID_AT: usize = 68;
/// Dynamic header fields: BAT offset, BAT entries, block size, parent
/// unique id.
pub(super) const BAT_OFFSET_AT: usize = 16;
pub(super) const BAT_ENTRIES_AT: usize = 28;
pub(super) const BLOCK_SIZE_AT: usize = 32;
const PARENT_ID_AT: usize = 40;

pub(super) const DISK_TYPE_FIXED: u32 = 2;
pub(super) const DISK_TYPE_DYNAMIC: u32 = 3;
pub(super) const DISK_TYPE_DIFFERENCING: u32 = 4;

/// Blocks larger than this are refused: no known writer uses them and the
/// sector bitmap we cache is sized from the block size.
const MAX_BLOCK_BYTES: u64 = 256 << 20;

/// The fields of a VHD footer this reader uses.
#[derive(Debug, Clone)]
pub(super) struct Footer {
    pub(super) data_offset: u64,
    pub(super) current_size: u64,
    pub(super) disk_type: u32,
    pub(super) unique_id: [u8; 16],
}

impl VhdDisk {
    /// Reads and checks the dynamic header, the BAT and (for a differencing
    /// image) the parent locators.
    pub(super) fn read_sparse_metadata(
        &self,
        footer: &Footer,
    ) -> Result<(SparseLayout, VhdParentInfo)> {
        let name = self.name();
        let header_at = footer.data_offset;
        let header_end = header_at.checked_add(DYNAMIC_HEADER_BYTES as u64);
        if !matches!(header_end, Some(end) if end <= self.file_len) {
            return Err(Error::corrupt(format!(
                "{name}: dynamic header offset {header_at} (footer data offset) lies outside \
                 the {}-byte file",
                self.file_len
            )));
        }
        let mut header = [0u8; DYNAMIC_HEADER_BYTES];
        self.read_exact("dynamic header", header_at, &mut header)?;
        if &header[0..8] != DYNAMIC_COOKIE {
            return Err(Error::corrupt(format!(
                "{name}: no 'cxsparse' dynamic header cookie at byte offset {header_at}"
            )));
        }
        let stored = BigEndian::read_u32(&header[DYNAMIC_CHECKSUM_AT..]);
        let computed = ones_complement_checksum(&header, DYNAMIC_CHECKSUM_AT);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "{name}: dynamic header checksum at byte offset {} is {stored:#010x}, \
                 expected {computed:#010x}",
                header_at + DYNAMIC_CHECKSUM_AT as u64
            )));
        }
        let bat_at = BigEndian::read_u64(&header[BAT_OFFSET_AT..]);
        let max_entries = u64::from(BigEndian::read_u32(&header[BAT_ENTRIES_AT..]));
        let block_bytes = u64::from(BigEndian::read_u32(&header[BLOCK_SIZE_AT..]));
        if !block_bytes.is_power_of_two()
            || !(SECTOR_BYTES..=MAX_BLOCK_BYTES).contains(&block_bytes)
        {
            return Err(Error::corrupt(format!(
                "{name}: block size {block_bytes} (dynamic header at byte offset {header_at}) \
                 is not a power of two between 512 bytes and 256 MiB"
            )));
        }
        let blocks_needed = footer.current_size.div_ceil(block_bytes);
        if blocks_needed > max_entries {
            return Err(Error::corrupt(format!(
                "{name}: {} bytes need {blocks_needed} blocks but the BAT has {max_entries} \
                 entries (dynamic header at byte offset {header_at})",
                footer.current_size
            )));
        }
        let bat_bytes = blocks_needed * 4; // cannot overflow: blocks_needed <= u32::MAX
        let bat_end = bat_at.checked_add(bat_bytes);
        if !matches!(bat_end, Some(end) if end <= self.file_len) {
            return Err(Error::corrupt(format!(
                "{name}: BAT of {bat_bytes} bytes at byte offset {bat_at} runs past the end \
                 of the {}-byte file",
                self.file_len
            )));
        }
        // Allocation bounded by the file size, checked just above.
        let mut raw_bat = vec![0u8; bat_bytes as usize];
        self.read_exact("BAT", bat_at, &mut raw_bat)?;
        let bat = raw_bat.chunks_exact(4).map(BigEndian::read_u32).collect();

        let sectors_per_block = block_bytes / SECTOR_BYTES;
        let bitmap_bytes = sectors_per_block.div_ceil(8).next_multiple_of(SECTOR_BYTES);
        let layout = SparseLayout {
            bat,
            sectors_per_block,
            bitmap_bytes,
            cached_bitmap: LastDecoded::default(),
        };

        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&header[PARENT_ID_AT..PARENT_ID_AT + 16]);
        let names = if footer.disk_type == DISK_TYPE_DIFFERENCING {
            self.parent_names(&header, header_at)?
        } else {
            Vec::new()
        };
        Ok((layout, VhdParentInfo { unique_id, names }))
    }
}

/// Reads the trailing footer, falling back to the copy at offset 0 (which
/// only dynamic and differencing images have) when it is damaged.
pub(super) fn read_footer(file: &File, name: &str, file_len: u64) -> Result<Footer> {
    let tail_at = file_len - FOOTER_BYTES;
    let tail = read_footer_at(file, name, tail_at);
    if tail.is_ok() {
        return tail;
    }
    match read_footer_at(file, name, 0) {
        Ok(copy) if copy.disk_type != DISK_TYPE_FIXED => Ok(copy),
        _ => tail,
    }
}

fn read_footer_at(file: &File, name: &str, at: u64) -> Result<Footer> {
    let mut raw = [0u8; FOOTER_BYTES as usize];
    file.read_exact_at(&mut raw, at)
        .map_err(|e| Error::read(&format!("{name}: VHD footer"), at, e))?;
    if &raw[0..8] != FOOTER_COOKIE {
        return Err(Error::corrupt(format!(
            "{name}: no 'conectix' VHD footer cookie at byte offset {at}"
        )));
    }
    let stored = BigEndian::read_u32(&raw[FOOTER_CHECKSUM_AT..]);
    let computed = ones_complement_checksum(&raw, FOOTER_CHECKSUM_AT);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "{name}: VHD footer checksum at byte offset {} is {stored:#010x}, expected \
             {computed:#010x}",
            at + FOOTER_CHECKSUM_AT as u64
        )));
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&raw[UNIQUE_ID_AT..UNIQUE_ID_AT + 16]);
    Ok(Footer {
        data_offset: BigEndian::read_u64(&raw[DATA_OFFSET_AT..]),
        current_size: BigEndian::read_u64(&raw[CURRENT_SIZE_AT..]),
        disk_type: BigEndian::read_u32(&raw[DISK_TYPE_AT..]),
        unique_id,
    })
}

/// The VHD checksum: ones' complement of the byte sum, the 4-byte checksum
/// field at `checksum_at` counted as zero.
pub(super) fn ones_complement_checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_its_own_field() {
        let mut bytes = [1u8; 16];
        bytes[4..8].copy_from_slice(&[0xAA; 4]);
        assert_eq!(ones_complement_checksum(&bytes, 4), !12u32);
    }
}
