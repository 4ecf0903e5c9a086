//! VHDX (Hyper-V's second disk format): fixed, dynamic and differencing
//! images, read-only, with in-memory replay of a dirty metadata log.
//!
//! Format facts this reader relies on (from Microsoft's MS-VHDX
//! specification, restated in our own words; all integers little-endian,
//! GUIDs in the Windows mixed-endian layout):
//!
//! * The file starts with the identifier `vhdxfile`. Two 4 KiB headers sit
//!   at 64 KiB and 128 KiB: signature `head`, CRC-32C of the 4 KiB with the
//!   checksum field (at 4) zeroed, sequence number (u64 at 8), file-write,
//!   data-write and log GUIDs (at 16, 32, 48), log version (u16 at 64, 0),
//!   version (u16 at 66, 1), log length (u32 at 68) and log offset (u64 at
//!   72). The valid header with the higher sequence number is current.
//! * Two copies of the 64 KiB region table sit at 192 KiB and 256 KiB:
//!   signature `regi`, CRC-32C over the 64 KiB, entry count (at most 2047),
//!   then 32-byte entries (GUID, file offset u64, length u32, flags u32 whose
//!   bit 0 means "required"). The BAT and metadata regions are found there.
//! * The metadata region starts with a 64 KiB table: signature `metadata`,
//!   entry count (u16 at 10, at most 2047), then 32-byte entries (item GUID,
//!   offset u32 relative to the region, length u32, flags u32 with bit 2
//!   "required"). Items used: file parameters (block size u32, power of two
//!   from 1 MiB to 256 MiB; flags u32, bit 1 "has parent"), virtual disk
//!   size (u64), logical sector size (512 or 4096), page 83 data (the disk's
//!   GUID) and, for differencing images, the parent locator.
//! * The BAT is an array of u64 entries: state in bits 0-2, file offset in
//!   MiB in bits 20-63. Chunk ratio = 2^23 * logical sector size / block
//!   size; after every chunk-ratio payload entries comes one sector bitmap
//!   entry. Payload states: 0 not present, 1 undefined, 2 zero, 3 unmapped
//!   (5 in the 0.95 draft), 6 fully present, 7 partially present
//!   (differencing only: consult the chunk's 1 MiB sector bitmap block, one
//!   bit per logical sector, bit 0 of byte 0 first, set = data in this file).
//!   Sector bitmap states: 0 not present, 6 present.
//! * The parent locator item: locator type GUID (the VHDX type
//!   B04AEFB7-D19E-4A81-B789-25B8E9445913), u16 reserved, u16 key/value
//!   count, then 12-byte entries (key offset u32, value offset u32, key
//!   length u16, value length u16; offsets from the item start; UTF-16LE).
//!   Keys: `parent_linkage` (and optional `parent_linkage2`), the parent's
//!   data-write GUID as `{...}` text; `relative_path`, `volume_path`,
//!   `absolute_win32_path`, tried in that order.
//! * The log: see the `log` module.
//!
//! Block states and what we report: fully present → data; zero → zero;
//! not present, undefined and unmapped → unallocated (or the parent's data
//! in a differencing image); partially present → per sector from the
//! bitmap.

mod bat;
mod header;
mod log;
mod metadata;
pub mod writer;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian};

use super::guid::swap_guid_fields;
use super::mapped::{self, MappedImage, Mapping};
use super::{open_parent, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

use bat::{
    is_absent_state, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_ZERO, STATE_MASK,
};
use header::Header;
use header::{read_header, read_region_table, FILE_SIGNATURE};
use log::FileView;
pub use log::ReplaySummary;
pub use metadata::VhdxParentLocator;
use metadata::{guid_text, read_metadata};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const MAX_TABLE_ENTRIES: usize = 2047;

/// A VHDX image opened read-only.
pub struct VhdxDisk {
    path: PathBuf,
    view: FileView,
    header: Header,
    replay: ReplaySummary,
    virtual_bytes: u64,
    block_bytes: u64,
    logical_sector_bytes: u64,
    chunk_ratio: u64,
    bat: Vec<u64>,
    page83: Option<[u8; 16]>,
    locator: Option<VhdxParentLocator>,
    parent: Option<Box<dyn Disk>>,
    /// The last partially present block's slice of its sector bitmap.
    cached_bitmap: crate::formats::table_cache::LastDecoded,
}

impl std::fmt::Debug for VhdxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxDisk")
            .field("path", &self.path)
            .field("virtual_bytes", &self.virtual_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("replay", &self.replay)
            .field("has_parent", &self.parent.is_some())
            .finish()
    }
}

/// True when the file starts with the VHDX file identifier.
pub fn probe(file: &File) -> bool {
    let mut signature = [0u8; 8];
    file.read_exact_at(&mut signature, 0).is_ok() && &signature == FILE_SIGNATURE
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(VhdxDisk::open_at_depth(path, options, depth)?))
}

/// The data-write GUID (on-disk bytes) in the current header of the VHDX at
/// `path`: what a child's `parent_linkage` must name.
pub fn data_write_guid(path: &Path) -> Result<[u8; 16]> {
    let file = open_read_only(path)?;
    Ok(read_header(&file, &path.display().to_string())?.data_write_guid)
}

/// The page 83 GUID of the VHDX at `path`, in the byte order
/// [`Disk::uuid`] reports it, without opening a parent.
pub fn page83_uuid(path: &Path) -> Result<[u8; 16]> {
    let disk = VhdxDisk::open_without_parent(path)?;
    disk.page83.map(|g| swap_guid_fields(&g)).ok_or_else(|| {
        Error::corrupt(format!(
            "{}: VHDX metadata has no page 83 data item",
            path.display()
        ))
    })
}

impl VhdxDisk {
    /// Opens a VHDX read-only. A differencing image's parent is opened
    /// through [`open_parent`] (so only when `options` allow it) and must
    /// carry the data-write GUID the child's `parent_linkage` names.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<VhdxDisk> {
        Self::open_at_depth(path, options, 0)
    }

    /// `open` for an image `depth` links down a parent chain.
    pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<VhdxDisk> {
        let mut disk = Self::open_without_parent(path)?;
        if let Some(locator) = disk.locator.clone() {
            disk.parent = Some(open_located_parent(path, &locator, options, depth)?);
        }
        Ok(disk)
    }

    /// Opens a differencing VHDX on a parent the caller supplies. The
    /// `Disk` trait does not expose a data-write GUID, so the caller vouches
    /// for the parent (compare [`data_write_guid`] of the parent file with
    /// [`VhdxParentLocator::linkages`] to check).
    pub fn open_with_parent(path: &Path, parent: Box<dyn Disk>) -> Result<VhdxDisk> {
        let mut disk = Self::open_without_parent(path)?;
        if disk.locator.is_none() {
            return Err(Error::invalid_argument(format!(
                "{}: not a differencing VHDX, it takes no parent",
                path.display()
            )));
        }
        disk.parent = Some(parent);
        Ok(disk)
    }

    /// The parent locator of a differencing image.
    pub fn parent_locator(&self) -> Option<&VhdxParentLocator> {
        self.locator.as_ref()
    }

    /// What log replay did when the image was opened.
    pub fn log_replay(&self) -> ReplaySummary {
        self.replay
    }

    /// The block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// The logical sector size in bytes (512 or 4096).
    pub fn logical_sector_bytes(&self) -> u64 {
        self.logical_sector_bytes
    }

    /// This image's data-write GUID (on-disk bytes).
    pub fn data_write_guid(&self) -> [u8; 16] {
        self.header.data_write_guid
    }

    fn open_without_parent(path: &Path) -> Result<VhdxDisk> {
        let name = path.display().to_string();
        let file = open_read_only(path)?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::open(format!("{name}: {e}")))?
            .len();
        if !probe(&file) {
            return Err(Error::corrupt(format!(
                "{name}: no 'vhdxfile' identifier at byte offset 0"
            )));
        }
        let header = read_header(&file, &name)?;
        if header.version != 1 {
            return Err(Error::unsupported(format!(
                "{name}: VHDX version {} (header sequence {})",
                header.version, header.sequence
            )));
        }
        let mut view = FileView::new(file, name.clone(), file_len);
        let mut replay = ReplaySummary::default();
        if header.log_guid != [0u8; 16] {
            if header.log_version != 0 {
                return Err(Error::unsupported(format!(
                    "{name}: log version {} needs replay",
                    header.log_version
                )));
            }
            replay = log::replay(
                &mut view,
                &header.log_guid,
                header.log_offset,
                u64::from(header.log_length),
            )?;
        }
        let regions = read_region_table(&view)?;
        let metadata = read_metadata(&view, regions.metadata)?;

        let payload_blocks = metadata.virtual_bytes.div_ceil(metadata.block_bytes);
        // 2^23 sectors per sector bitmap block; both sizes are powers of two
        // with block <= 256 MiB <= 2^23 * 512, so this divides exactly.
        let chunk_ratio = (1u64 << 23) * metadata.logical_sector_bytes / metadata.block_bytes;
        let entries = if metadata.locator.is_some() {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        let bat_bytes = entries * 8; // <= 2^26 blocks * 8: no overflow
        if bat_bytes > regions.bat.1 {
            return Err(Error::corrupt(format!(
                "{name}: BAT region at byte offset {} holds {} bytes but {entries} entries \
                 are needed",
                regions.bat.0, regions.bat.1
            )));
        }
        // Bounded by the region length, itself checked against the file.
        let mut raw = vec![0u8; bat_bytes as usize];
        view.read_exact("BAT", regions.bat.0, &mut raw)?;
        let bat = raw.chunks_exact(8).map(LittleEndian::read_u64).collect();

        Ok(VhdxDisk {
            path: path.to_path_buf(),
            view,
            header,
            replay,
            virtual_bytes: metadata.virtual_bytes,
            block_bytes: metadata.block_bytes,
            logical_sector_bytes: metadata.logical_sector_bytes,
            chunk_ratio,
            bat,
            page83: metadata.page83,
            locator: metadata.locator,
            parent: None,
            cached_bitmap: Default::default(),
        })
    }
}

/// Opens the first candidate parent that exists, checking its data-write
/// GUID against the child's linkage; when none exists (or following parents
/// is off) `open_parent`'s error names the best candidate.
fn open_located_parent(
    child: &Path,
    locator: &VhdxParentLocator,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    if options.follow_parent_paths {
        let folder = child.parent().unwrap_or_else(|| Path::new("."));
        for name in &locator.names {
            let candidate = Path::new(name);
            let resolved = if candidate.is_absolute() {
                candidate.to_path_buf()
            } else {
                folder.join(candidate)
            };
            if !resolved.is_file() {
                continue;
            }
            let found = data_write_guid(&resolved).map_err(|e| {
                Error::open(format!(
                    "{}: parent '{}' is not a readable VHDX: {e}",
                    child.display(),
                    resolved.display()
                ))
            })?;
            if !locator.linkages.contains(&found) {
                return Err(Error::source_mismatch(format!(
                    "{}: parent '{}' has data-write GUID {} but the differencing image links \
                     to {}",
                    child.display(),
                    resolved.display(),
                    guid_text(&found),
                    guid_text(&locator.linkages[0])
                )));
            }
            return open_parent(child, name, options, depth);
        }
    }
    open_parent(child, &locator.names[0], options, depth)
}

impl MappedImage for VhdxDisk {
    fn sectors(&self) -> u64 {
        self.virtual_bytes / SECTOR_BYTES
    }

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let per_block = self.sectors_per_block();
        let block = lba / per_block;
        let in_block = lba % per_block;
        let entry = self.payload_entry(block);
        let state = entry & STATE_MASK;
        match state {
            PAYLOAD_FULLY_PRESENT => {
                let block_at = self.entry_offset(entry, "block", block)?;
                let bytes = self.block_bytes;
                let run = self.run_of_blocks(block, in_block, count, |next, e| {
                    e & STATE_MASK == PAYLOAD_FULLY_PRESENT
                        && block_at.checked_add((next - block) * bytes) == Some((e >> 20) * MIB)
                });
                let offset = self.run_offset(block_at, in_block, run, block)?;
                Ok((Mapping::Data { file: 0, offset }, run))
            }
            PAYLOAD_ZERO => Ok((
                Mapping::Zero,
                self.run_of_blocks(block, in_block, count, |_, e| {
                    e & STATE_MASK == PAYLOAD_ZERO
                }),
            )),
            s if is_absent_state(s) => Ok((
                self.absent(),
                self.run_of_blocks(block, in_block, count, |_, e| {
                    is_absent_state(e & STATE_MASK)
                }),
            )),
            PAYLOAD_PARTIALLY_PRESENT if self.locator.is_some() => {
                let block_at = self.entry_offset(entry, "block", block)?;
                let limit = (per_block - in_block).min(count);
                // Our 512-byte sectors per bit of the bitmap.
                let per_bit = self.logical_sector_bytes / SECTOR_BYTES;
                let bits = self.block_bitmap(block)?;
                let bit = |sector: u64| {
                    let i = sector / per_bit;
                    bits[(i / 8) as usize] & (1 << (i % 8)) != 0
                };
                let present = bit(in_block);
                let mut run = 1;
                while run < limit && bit(in_block + run) == present {
                    run += 1;
                }
                if !present {
                    return Ok((self.absent(), run));
                }
                let offset = self.run_offset(block_at, in_block, run, block)?;
                Ok((Mapping::Data { file: 0, offset }, run))
            }
            other => Err(Error::corrupt(format!(
                "{}: BAT entry of block {block} ({entry:#018x}) has state {other}, not valid \
                 for this {} image",
                self.path.display(),
                if self.locator.is_some() {
                    "differencing"
                } else {
                    "non-differencing"
                }
            ))),
        }
    }

    fn read_mapped(&self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.view.read_exact("block data", offset, buf),
            other => Err(Error::internal(format!(
                "VHDX asked to read a {other:?} run"
            ))),
        }
    }

    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.parent.as_deref()
    }
}

impl Disk for VhdxDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Vhdx
    }
    fn sector_count(&self) -> u64 {
        MappedImage::sectors(self)
    }
    /// The page 83 GUID in RFC 4122 byte order.
    fn uuid(&self) -> Option<[u8; 16]> {
        self.page83.map(|g| swap_guid_fields(&g))
    }
    fn is_snapshot(&self) -> bool {
        self.locator.is_some()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        mapped::read_sectors(self, lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        mapped::block_status(self, lba, count)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        mapped::status_run(self, lba, count)
    }
}
