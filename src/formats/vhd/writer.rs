//! Writing VHD images, dynamic and fixed: [`VhdWriter`], the
//! [`ImageWriter`] the clone driver (src/clone.rs) feeds with pages, using
//! the reader's layout ([`super::footer`], [`super::bat`]).
//!
//! A dynamic image is written front to back: the footer copy, the dynamic
//! header and the BAT (sized from the virtual size up front, filled in
//! last), then each 2 MiB block with data as it completes (its sector
//! bitmap, then its data), then the footer. A fixed image is the disk's
//! bytes (holes where no data was passed) and the footer.
//!
//! Format facts relied on beyond the reader's (from Microsoft's VHD image
//! format specification, in our own words):
//!
//! * Footer fields: features (u32 at 8, always 2: the "reserved" bit),
//!   format version (u32 at 12, 0x00010000), time stamp (u32 at 24,
//!   seconds since 2000-01-01 00:00:00 UTC), creator application (4 bytes
//!   at 28), creator version (u32 at 32), creator host OS (u32 at 36,
//!   `Wi2k`), original size (u64 at 40), current size (u64 at 48), the CHS
//!   geometry at 56 (cylinders u16, heads u8, sectors per track u8), saved
//!   state (byte 84, 0); the rest is zero.
//! * The geometry comes from the size by the specification's algorithm
//!   ([`chs_geometry`]), capped at 65535 x 16 x 255 sectors.
//! * Dynamic header: data offset (u64 at 8, all ones), header version (u32
//!   at 24, 0x00010000), BAT entries (u32 at 28), block size (u32 at 32);
//!   parent fields and locators zero for a dynamic disk. The BAT takes
//!   whole sectors; unused entries are `0xFFFFFFFF`.
//! * BAT entries count sectors (u32), so data must end within 2 TiB; the
//!   specification caps a VHD at 2040 GiB, and so do Hyper-V and QEMU.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::bat::UNALLOCATED_BLOCK;
use super::footer::{
    ones_complement_checksum, BAT_ENTRIES_AT, BAT_OFFSET_AT, BLOCK_SIZE_AT, CURRENT_SIZE_AT,
    DATA_OFFSET_AT, DISK_TYPE_AT, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, DYNAMIC_CHECKSUM_AT,
    DYNAMIC_COOKIE, DYNAMIC_HEADER_BYTES, FOOTER_BYTES, FOOTER_CHECKSUM_AT, FOOTER_COOKIE,
    UNIQUE_ID_AT,
};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::writer::{write_in_pieces, ImageWriter};

/// The specification's (and QEMU's, and Hyper-V's) largest VHD: 2040 GiB.
pub const MAX_VHD_BYTES: u64 = 2040 << 30;
/// The block size every common tool uses (2 MiB).
pub const BLOCK_BYTES: u64 = 2 << 20;
/// Where the dynamic header and the BAT go.
const DYNAMIC_HEADER_AT: u64 = FOOTER_BYTES;
const BAT_AT: u64 = DYNAMIC_HEADER_AT + DYNAMIC_HEADER_BYTES as u64;

const FEATURES_AT: usize = 8;
const FORMAT_VERSION_AT: usize = 12;
const TIME_STAMP_AT: usize = 24;
const CREATOR_APP_AT: usize = 28;
const CREATOR_VERSION_AT: usize = 32;
const CREATOR_HOST_AT: usize = 36;
const ORIGINAL_SIZE_AT: usize = 40;
const GEOMETRY_AT: usize = 56;
/// Dynamic header fields: its own (unused) data offset, header version.
const DYNAMIC_DATA_OFFSET_AT: usize = 8;
const HEADER_VERSION_AT: usize = 24;
/// The features field's always-set "reserved" bit.
const FEATURES_RESERVED: u32 = 2;
const VERSION_1_0: u32 = 0x0001_0000;
/// The application that made the image.
const CREATOR_APP: &[u8; 4] = b"cowd";
const CREATOR_HOST_WINDOWS: &[u8; 4] = b"Wi2k";
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC.
const VHD_EPOCH: u64 = 946_684_800;

/// Cylinders, heads and sectors per track for a disk of `sectors`, by the
/// algorithm of the VHD specification (appendix "CHS calculation").
pub fn chs_geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (sectors_per_track, heads, cylinder_times_heads) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let mut per_track = 17;
        let mut cth = total / per_track;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            per_track = 31;
            heads = 16;
            cth = total / per_track;
        }
        if cth >= heads * 1024 {
            per_track = 63;
            heads = 16;
            cth = total / per_track;
        }
        (per_track, heads, cth)
    };
    (
        (cylinder_times_heads / heads) as u16,
        heads as u8,
        sectors_per_track as u8,
    )
}

/// Which kind of VHD to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdKind {
    Dynamic,
    Fixed,
}

/// Writes a dynamic or fixed VHD (see the module doc).
pub struct VhdWriter {
    what: String,
    kind: VhdKind,
    virtual_bytes: u64,
    unique_id: [u8; 16],
    /// Dynamic only: the BAT (one entry per block), where the next block
    /// goes, and the block being collected (index, sector bitmap, data).
    bat: Vec<u32>,
    next_block_at: u64,
    block: Option<(u64, Vec<u8>, Vec<u8>)>,
}

impl VhdWriter {
    /// A writer for a disk of `virtual_bytes` (a whole number of sectors);
    /// `what` names the file. Refuses a disk larger than 2040 GiB.
    pub fn new(virtual_bytes: u64, kind: VhdKind, what: &str) -> Result<VhdWriter> {
        if virtual_bytes > MAX_VHD_BYTES {
            return Err(Error::unsupported(format!(
                "{what}: a VHD holds at most 2040 GiB ({MAX_VHD_BYTES} bytes); this disk is \
                 {virtual_bytes} bytes (use VHDX or qcow2)"
            )));
        }
        if !virtual_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(Error::internal(format!(
                "{what}: VHD size {virtual_bytes} is not a whole number of sectors"
            )));
        }
        let blocks = match kind {
            VhdKind::Dynamic => virtual_bytes.div_ceil(BLOCK_BYTES),
            VhdKind::Fixed => 0,
        };
        let bat_bytes = (blocks * 4).next_multiple_of(SECTOR_BYTES);
        Ok(VhdWriter {
            what: what.to_string(),
            kind,
            virtual_bytes,
            unique_id: *uuid::Uuid::new_v4().as_bytes(),
            bat: vec![UNALLOCATED_BLOCK; blocks as usize],
            next_block_at: BAT_AT + bat_bytes,
            block: None,
        })
    }

    /// Bytes of a block's sector bitmap: one bit per sector, in whole
    /// sectors.
    fn bitmap_bytes() -> u64 {
        (BLOCK_BYTES / SECTOR_BYTES / 8).next_multiple_of(SECTOR_BYTES)
    }

    /// The footer (also the copy at the start of a dynamic image).
    fn footer(&self) -> [u8; FOOTER_BYTES as usize] {
        let mut f = [0u8; FOOTER_BYTES as usize];
        f[..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut f, FEATURES_AT, FEATURES_RESERVED);
        put32(&mut f, FORMAT_VERSION_AT, VERSION_1_0);
        let data_offset = match self.kind {
            VhdKind::Fixed => u64::MAX,
            VhdKind::Dynamic => DYNAMIC_HEADER_AT,
        };
        put64(&mut f, DATA_OFFSET_AT, data_offset);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        put32(&mut f, TIME_STAMP_AT, now.saturating_sub(VHD_EPOCH) as u32);
        f[CREATOR_APP_AT..CREATOR_APP_AT + 4].copy_from_slice(CREATOR_APP);
        put32(&mut f, CREATOR_VERSION_AT, VERSION_1_0);
        f[CREATOR_HOST_AT..CREATOR_HOST_AT + 4].copy_from_slice(CREATOR_HOST_WINDOWS);
        put64(&mut f, ORIGINAL_SIZE_AT, self.virtual_bytes);
        put64(&mut f, CURRENT_SIZE_AT, self.virtual_bytes);
        let (cylinders, heads, per_track) = chs_geometry(self.virtual_bytes / SECTOR_BYTES);
        f[GEOMETRY_AT..GEOMETRY_AT + 2].copy_from_slice(&cylinders.to_be_bytes());
        f[GEOMETRY_AT + 2] = heads;
        f[GEOMETRY_AT + 3] = per_track;
        let disk_type = match self.kind {
            VhdKind::Fixed => DISK_TYPE_FIXED,
            VhdKind::Dynamic => DISK_TYPE_DYNAMIC,
        };
        put32(&mut f, DISK_TYPE_AT, disk_type);
        f[UNIQUE_ID_AT..UNIQUE_ID_AT + 16].copy_from_slice(&self.unique_id);
        let sum = ones_complement_checksum(&f, FOOTER_CHECKSUM_AT);
        put32(&mut f, FOOTER_CHECKSUM_AT, sum);
        f
    }

    /// The dynamic header.
    fn dynamic_header(&self) -> [u8; DYNAMIC_HEADER_BYTES] {
        let mut h = [0u8; DYNAMIC_HEADER_BYTES];
        h[..8].copy_from_slice(DYNAMIC_COOKIE);
        put64(&mut h, DYNAMIC_DATA_OFFSET_AT, u64::MAX);
        put64(&mut h, BAT_OFFSET_AT, BAT_AT);
        put32(&mut h, HEADER_VERSION_AT, VERSION_1_0);
        put32(&mut h, BAT_ENTRIES_AT, self.bat.len() as u32);
        put32(&mut h, BLOCK_SIZE_AT, BLOCK_BYTES as u32);
        let sum = ones_complement_checksum(&h, DYNAMIC_CHECKSUM_AT);
        put32(&mut h, DYNAMIC_CHECKSUM_AT, sum);
        h
    }

    /// Writes the block being collected, if any, after the last one.
    fn store_block(&mut self, file: &File) -> Result<()> {
        let Some((index, bitmap, data)) = self.block.take() else {
            return Ok(());
        };
        let at = self.next_block_at;
        // BAT entries count sectors; the 2040 GiB cap keeps them in range.
        self.bat[index as usize] = u32::try_from(at / SECTOR_BYTES).map_err(|_| {
            Error::internal(format!("{}: block {index} lies past 2 TiB", self.what))
        })?;
        file.write_all_at(&bitmap, at)
            .map_err(|e| Error::write(&self.what, at, e))?;
        write_in_pieces(file, &data, at + bitmap.len() as u64, &self.what)?;
        self.next_block_at = at + bitmap.len() as u64 + BLOCK_BYTES;
        Ok(())
    }
}

impl ImageWriter for VhdWriter {
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        if end > self.virtual_bytes || !offset.is_multiple_of(SECTOR_BYTES) {
            return Err(Error::internal(format!(
                "{}: data for bytes {offset}..{end} of the {}-byte disk",
                self.what, self.virtual_bytes
            )));
        }
        if self.kind == VhdKind::Fixed {
            return write_in_pieces(file, data, offset, &self.what);
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / BLOCK_BYTES;
            if self.block.as_ref().is_some_and(|(i, _, _)| *i != index) {
                self.store_block(file)?;
            }
            let (_, bitmap, block) = self.block.get_or_insert_with(|| {
                (
                    index,
                    vec![0u8; Self::bitmap_bytes() as usize],
                    vec![0u8; BLOCK_BYTES as usize],
                )
            });
            let within = pos % BLOCK_BYTES;
            let n = ((BLOCK_BYTES - within) as usize).min(rest.len());
            block[within as usize..within as usize + n].copy_from_slice(&rest[..n]);
            // The sectors passed are present (most significant bit first).
            let first = within / SECTOR_BYTES;
            for sector in first..first + n as u64 / SECTOR_BYTES {
                bitmap[(sector / 8) as usize] |= 0x80 >> (sector % 8);
            }
            pos += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        let footer = self.footer();
        let end = match self.kind {
            VhdKind::Fixed => {
                let at = self.virtual_bytes;
                file.write_all_at(&footer, at)
                    .map_err(|e| Error::write(&self.what, at, e))?;
                at + FOOTER_BYTES
            }
            VhdKind::Dynamic => {
                self.store_block(file)?;
                file.write_all_at(&footer, 0)
                    .map_err(|e| Error::write(&self.what, 0, e))?;
                let header = self.dynamic_header();
                file.write_all_at(&header, DYNAMIC_HEADER_AT)
                    .map_err(|e| Error::write(&self.what, DYNAMIC_HEADER_AT, e))?;
                let mut bat: Vec<u8> = self.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
                bat.resize(bat.len().next_multiple_of(SECTOR_BYTES as usize), 0xFF);
                write_in_pieces(file, &bat, BAT_AT, &self.what)?;
                let at = self.next_block_at;
                file.write_all_at(&footer, at)
                    .map_err(|e| Error::write(&self.what, at, e))?;
                at + FOOTER_BYTES
            }
        };
        file.set_len(end)
            .map_err(|e| Error::write(&self.what, end, e))
    }
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // Worked by hand from the specification's algorithm.
        // 10 MiB = 20480 sectors: 17 per track, 1204 cyl*heads, 4 heads.
        assert_eq!(chs_geometry(20480), (301, 4, 17));
        // 127 GiB and more saturate at 65535 x 16 x 255.
        assert_eq!(chs_geometry(1 << 40 >> 9), (65535, 16, 255));
        // 2 GiB = 4194304 sectors: 17 -> 246723 cth, heads 241 > 16;
        // 31 -> 135300 >= 16384; 63 -> 66576 / 16 = 4161.
        assert_eq!(chs_geometry(4_194_304), (4161, 16, 63));
    }

    #[test]
    fn more_than_2040_gib_is_refused() {
        assert!(VhdWriter::new(MAX_VHD_BYTES, VhdKind::Dynamic, "t").is_ok());
        let err = VhdWriter::new(MAX_VHD_BYTES + 512, VhdKind::Fixed, "t")
            .err()
            .unwrap();
        assert!(err.to_string().contains("2040 GiB"), "{err}");
    }
}
