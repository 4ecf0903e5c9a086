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

mod log;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian};

use super::guid::swap_guid_fields;
use super::mapped::{self, MappedImage, Mapping};
use super::{open_parent, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

use log::FileView;
pub use log::ReplaySummary;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_BYTES: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_BYTES: usize = 64 * 1024;
const METADATA_TABLE_BYTES: usize = 64 * 1024;
const MAX_TABLE_ENTRIES: usize = 2047;
/// The specification's largest virtual disk.
const MAX_VIRTUAL_BYTES: u64 = 64 << 40;
/// A parent locator is a handful of paths; anything larger is not one.
const MAX_LOCATOR_BYTES: u64 = MIB;

const STATE_MASK: u64 = 7;
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_UNMAPPED_DRAFT: u64 = 5;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const SECTOR_BITMAP_PRESENT: u64 = 6;
const SECTOR_BITMAP_BLOCK_BYTES: u64 = MIB;

/// A GUID's on-disk bytes: the first three fields little-endian.
const fn ms_guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

const REGION_BAT: [u8; 16] = ms_guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const REGION_METADATA: [u8; 16] = ms_guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const ITEM_FILE_PARAMETERS: [u8; 16] = ms_guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const ITEM_VIRTUAL_DISK_SIZE: [u8; 16] = ms_guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const ITEM_PAGE83: [u8; 16] = ms_guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const ITEM_LOGICAL_SECTOR_SIZE: [u8; 16] = ms_guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const ITEM_PARENT_LOCATOR: [u8; 16] = ms_guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
const LOCATOR_TYPE_VHDX: [u8; 16] = ms_guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// The fields of the current header this reader uses.
#[derive(Debug, Clone)]
struct Header {
    sequence: u64,
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    log_version: u16,
    version: u16,
    log_length: u32,
    log_offset: u64,
}

/// A differencing image's parent locator.
#[derive(Debug, Clone, Default)]
pub struct VhdxParentLocator {
    /// All key/value pairs, in file order.
    pub entries: Vec<(String, String)>,
    /// Candidate parent paths, best first, with `/` separators.
    pub names: Vec<String>,
    /// `parent_linkage` and `parent_linkage2` as on-disk GUID bytes: the
    /// parent's data-write GUID must be one of them.
    pub linkages: Vec<[u8; 16]>,
}

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
    cached_bitmap: Option<(u64, Vec<u8>)>,
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
        Error::Corrupt(format!(
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
            return Err(Error::InvalidArgument(format!(
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
            .map_err(|e| Error::Open(format!("{name}: {e}")))?
            .len();
        if !probe(&file) {
            return Err(Error::Corrupt(format!(
                "{name}: no 'vhdxfile' identifier at byte offset 0"
            )));
        }
        let header = read_header(&file, &name)?;
        if header.version != 1 {
            return Err(Error::Unsupported(format!(
                "{name}: VHDX version {} (header sequence {})",
                header.version, header.sequence
            )));
        }
        let mut view = FileView::new(file, name.clone(), file_len);
        let mut replay = ReplaySummary::default();
        if header.log_guid != [0u8; 16] {
            if header.log_version != 0 {
                return Err(Error::Unsupported(format!(
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
            return Err(Error::Corrupt(format!(
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
            cached_bitmap: None,
        })
    }
}

/// Reads both headers and returns the valid one with the higher sequence
/// number.
fn read_header(file: &File, name: &str) -> Result<Header> {
    let mut best: Option<Header> = None;
    let mut problems = Vec::new();
    for at in HEADER_OFFSETS {
        let mut raw = [0u8; HEADER_BYTES];
        if let Err(e) = file.read_exact_at(&mut raw, at) {
            problems.push(format!("header at byte offset {at}: {e}"));
            continue;
        }
        if &raw[0..4] != b"head" {
            problems.push(format!("no 'head' signature at byte offset {at}"));
            continue;
        }
        let stored = LittleEndian::read_u32(&raw[4..]);
        raw[4..8].fill(0);
        let computed = crc32c::crc32c(&raw);
        if stored != computed {
            problems.push(format!(
                "header CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
                at + 4
            ));
            continue;
        }
        let guid = |from: usize| -> [u8; 16] {
            let mut g = [0u8; 16];
            g.copy_from_slice(&raw[from..from + 16]);
            g
        };
        let header = Header {
            sequence: LittleEndian::read_u64(&raw[8..]),
            data_write_guid: guid(32),
            log_guid: guid(48),
            log_version: LittleEndian::read_u16(&raw[64..]),
            version: LittleEndian::read_u16(&raw[66..]),
            log_length: LittleEndian::read_u32(&raw[68..]),
            log_offset: LittleEndian::read_u64(&raw[72..]),
        };
        if best.as_ref().is_none_or(|b| header.sequence > b.sequence) {
            best = Some(header);
        }
    }
    best.ok_or_else(|| {
        Error::Corrupt(format!(
            "{name}: neither VHDX header is valid ({})",
            problems.join("; ")
        ))
    })
}

/// (offset, length) of the BAT and metadata regions.
struct Regions {
    bat: (u64, u64),
    metadata: (u64, u64),
}

fn read_region_table(view: &FileView) -> Result<Regions> {
    let mut problems = Vec::new();
    for at in REGION_TABLE_OFFSETS {
        match parse_region_table(view, at) {
            Ok(regions) => return Ok(regions),
            Err(Error::Corrupt(why)) => problems.push(why),
            Err(other) => return Err(other),
        }
    }
    Err(Error::Corrupt(format!(
        "{}: no valid region table ({})",
        view.name(),
        problems.join("; ")
    )))
}

fn parse_region_table(view: &FileView, at: u64) -> Result<Regions> {
    let mut raw = vec![0u8; REGION_TABLE_BYTES];
    view.read_exact("region table", at, &mut raw)?;
    if &raw[0..4] != b"regi" {
        return Err(Error::Corrupt(format!(
            "no 'regi' signature at byte offset {at}"
        )));
    }
    let stored = LittleEndian::read_u32(&raw[4..]);
    raw[4..8].fill(0);
    let computed = crc32c::crc32c(&raw);
    if stored != computed {
        return Err(Error::Corrupt(format!(
            "region table CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
            at + 4
        )));
    }
    let count = LittleEndian::read_u32(&raw[8..]) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::Corrupt(format!(
            "region table at byte offset {at} has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    for index in 0..count {
        let entry = &raw[16 + index * 32..16 + (index + 1) * 32];
        let offset = LittleEndian::read_u64(&entry[16..]);
        let length = u64::from(LittleEndian::read_u32(&entry[24..]));
        let required = LittleEndian::read_u32(&entry[28..]) & 1 != 0;
        let entry_at = at + 16 + index as u64 * 32;
        let known = entry[0..16] == REGION_BAT || entry[0..16] == REGION_METADATA;
        if !known {
            if required {
                return Err(Error::Unsupported(format!(
                    "{}: required region {} (region table entry at byte offset {entry_at})",
                    view.name(),
                    guid_text(&entry[0..16])
                )));
            }
            continue;
        }
        // Regions must lie in the real file: their sizes drive allocations.
        let inside = matches!(offset.checked_add(length), Some(end) if end <= view.file_len());
        if offset < MIB || offset % MIB != 0 || length == 0 || !inside {
            return Err(Error::Corrupt(format!(
                "region table entry at byte offset {entry_at}: {length} bytes at byte offset \
                 {offset} is not a MiB-aligned range inside the {}-byte file",
                view.file_len()
            )));
        }
        if entry[0..16] == REGION_BAT {
            bat = Some((offset, length));
        } else {
            metadata = Some((offset, length));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(Error::Corrupt(format!(
            "region table at byte offset {at} lacks the BAT or metadata region"
        ))),
    }
}

struct Metadata {
    block_bytes: u64,
    virtual_bytes: u64,
    logical_sector_bytes: u64,
    page83: Option<[u8; 16]>,
    locator: Option<VhdxParentLocator>,
}

fn read_metadata(view: &FileView, (region_at, region_len): (u64, u64)) -> Result<Metadata> {
    let name = view.name().to_string();
    if region_len < METADATA_TABLE_BYTES as u64 {
        return Err(Error::Corrupt(format!(
            "{name}: metadata region at byte offset {region_at} is only {region_len} bytes"
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_BYTES];
    view.read_exact("metadata table", region_at, &mut table)?;
    if &table[0..8] != b"metadata" {
        return Err(Error::Corrupt(format!(
            "{name}: no 'metadata' signature at byte offset {region_at}"
        )));
    }
    let count = usize::from(LittleEndian::read_u16(&table[10..]));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::Corrupt(format!(
            "{name}: metadata table at byte offset {region_at} has {count} entries"
        )));
    }
    let mut file_parameters = None;
    let mut virtual_bytes = None;
    let mut logical_sector_bytes = None;
    let mut page83 = None;
    let mut locator_item = None;
    for index in 0..count {
        let entry = &table[32 + index * 32..32 + (index + 1) * 32];
        let entry_at = region_at + 32 + index as u64 * 32;
        let item_offset = u64::from(LittleEndian::read_u32(&entry[16..]));
        let item_len = u64::from(LittleEndian::read_u32(&entry[20..]));
        let required = LittleEndian::read_u32(&entry[24..]) & 4 != 0;
        if item_len > 0
            && (item_offset < METADATA_TABLE_BYTES as u64 || item_offset + item_len > region_len)
        {
            return Err(Error::Corrupt(format!(
                "{name}: metadata entry at byte offset {entry_at}: {item_len} bytes at \
                 region offset {item_offset} are outside the {region_len}-byte region"
            )));
        }
        let item_at = region_at + item_offset;
        let id = &entry[0..16];
        let fixed_item = |want: usize| -> Result<Vec<u8>> {
            if item_len < want as u64 {
                return Err(Error::Corrupt(format!(
                    "{name}: metadata item {} at byte offset {item_at} is {item_len} bytes, \
                     needs {want}",
                    guid_text(id)
                )));
            }
            let mut data = vec![0u8; want];
            view.read_exact("metadata item", item_at, &mut data)?;
            Ok(data)
        };
        if id == ITEM_FILE_PARAMETERS {
            let data = fixed_item(8)?;
            file_parameters = Some((
                LittleEndian::read_u32(&data[0..]),
                LittleEndian::read_u32(&data[4..]),
                item_at,
            ));
        } else if id == ITEM_VIRTUAL_DISK_SIZE {
            virtual_bytes = Some((LittleEndian::read_u64(&fixed_item(8)?), item_at));
        } else if id == ITEM_LOGICAL_SECTOR_SIZE {
            logical_sector_bytes = Some((LittleEndian::read_u32(&fixed_item(4)?), item_at));
        } else if id == ITEM_PAGE83 {
            let mut g = [0u8; 16];
            g.copy_from_slice(&fixed_item(16)?);
            page83 = Some(g);
        } else if id == ITEM_PARENT_LOCATOR {
            locator_item = Some((item_at, item_len));
        } else if required && id != ms_guid_physical_sector_size() {
            return Err(Error::Unsupported(format!(
                "{name}: required metadata item {} (entry at byte offset {entry_at})",
                guid_text(id)
            )));
        }
    }
    let missing = |what: &str| {
        Error::Corrupt(format!(
            "{name}: metadata region at byte offset {region_at} has no {what} item"
        ))
    };
    let (block_bytes, flags, params_at) =
        file_parameters.ok_or_else(|| missing("file parameters"))?;
    let (virtual_bytes, size_at) = virtual_bytes.ok_or_else(|| missing("virtual disk size"))?;
    let (logical, logical_at) =
        logical_sector_bytes.ok_or_else(|| missing("logical sector size"))?;
    let block_bytes = u64::from(block_bytes);
    if !block_bytes.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_bytes) {
        return Err(Error::Corrupt(format!(
            "{name}: block size {block_bytes} at byte offset {params_at} is not a power of two \
             from 1 MiB to 256 MiB"
        )));
    }
    let logical = u64::from(logical);
    if logical != 512 && logical != 4096 {
        return Err(Error::Corrupt(format!(
            "{name}: logical sector size {logical} at byte offset {logical_at} is not 512 or 4096"
        )));
    }
    if virtual_bytes == 0 || virtual_bytes > MAX_VIRTUAL_BYTES || virtual_bytes % logical != 0 {
        return Err(Error::Corrupt(format!(
            "{name}: virtual disk size {virtual_bytes} at byte offset {size_at} is not a \
             non-zero multiple of the {logical}-byte sector up to 64 TiB"
        )));
    }
    let has_parent = flags & 2 != 0;
    let locator = if has_parent {
        let (at, len) = locator_item.ok_or_else(|| missing("parent locator"))?;
        Some(read_parent_locator(view, at, len)?)
    } else {
        None
    };
    Ok(Metadata {
        block_bytes,
        virtual_bytes,
        logical_sector_bytes: logical,
        page83,
        locator,
    })
}

/// The physical sector size item: required by the specification but only
/// informational for a reader.
fn ms_guid_physical_sector_size() -> [u8; 16] {
    ms_guid(
        0xCDA3_48C7,
        0x445D,
        0x4471,
        [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
    )
}

fn read_parent_locator(view: &FileView, at: u64, len: u64) -> Result<VhdxParentLocator> {
    let name = view.name().to_string();
    if !(20..=MAX_LOCATOR_BYTES).contains(&len) {
        return Err(Error::Corrupt(format!(
            "{name}: parent locator at byte offset {at} is {len} bytes"
        )));
    }
    let mut item = vec![0u8; len as usize];
    view.read_exact("parent locator", at, &mut item)?;
    if item[0..16] != LOCATOR_TYPE_VHDX {
        return Err(Error::Unsupported(format!(
            "{name}: parent locator type {} at byte offset {at} (only VHDX parents are read)",
            guid_text(&item[0..16])
        )));
    }
    let count = usize::from(LittleEndian::read_u16(&item[18..]));
    if 20 + count * 12 > item.len() {
        return Err(Error::Corrupt(format!(
            "{name}: parent locator at byte offset {at} declares {count} entries in {len} bytes"
        )));
    }
    let text = |offset: u32, length: u16| -> Result<String> {
        let from = offset as usize;
        let to = from + usize::from(length);
        if to > item.len() || !length.is_multiple_of(2) {
            return Err(Error::Corrupt(format!(
                "{name}: parent locator string of {length} bytes at item offset {offset} \
                 (locator at byte offset {at}) is outside the item"
            )));
        }
        let units: Vec<u16> = item[from..to]
            .chunks_exact(2)
            .map(LittleEndian::read_u16)
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut locator = VhdxParentLocator::default();
    for index in 0..count {
        let e = &item[20 + index * 12..20 + (index + 1) * 12];
        let key = text(
            LittleEndian::read_u32(&e[0..]),
            LittleEndian::read_u16(&e[8..]),
        )?;
        let value = text(
            LittleEndian::read_u32(&e[4..]),
            LittleEndian::read_u16(&e[10..]),
        )?;
        locator.entries.push((key, value));
    }
    let value = |key: &str| {
        locator
            .entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    for key in ["parent_linkage", "parent_linkage2"] {
        if let Some(v) = value(key) {
            let guid = parse_guid_text(&v).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{name}: parent locator at byte offset {at}: {key} '{v}' is not a GUID"
                ))
            })?;
            locator.linkages.push(guid);
        }
    }
    if locator.linkages.is_empty() {
        return Err(Error::Corrupt(format!(
            "{name}: parent locator at byte offset {at} has no parent_linkage"
        )));
    }
    let relative = value("relative_path").map(|p| p.replace('\\', "/"));
    let absolute =
        value("absolute_win32_path").map(|p| p.trim_start_matches(r"\\?\").replace('\\', "/"));
    // volume_path (\\?\Volume{..}\...) names a Windows volume: only its
    // file name is of use here.
    let volume = value("volume_path").map(|p| p.replace('\\', "/"));
    let mut names: Vec<String> = Vec::new();
    names.extend(relative.iter().cloned());
    // A drive-letter path means nothing here; an absolute Unix path does.
    names.extend(absolute.iter().filter(|p| p.starts_with('/')).cloned());
    // Last resort: the parent's file name next to the child; the linkage
    // check guards against the wrong file.
    for p in relative.iter().chain(&absolute).chain(&volume) {
        if let Some(base) = p.rsplit('/').next() {
            names.push(base.to_string());
        }
    }
    for n in names {
        if !n.is_empty() && !locator.names.contains(&n) {
            locator.names.push(n);
        }
    }
    if locator.names.is_empty() {
        return Err(Error::Corrupt(format!(
            "{name}: parent locator at byte offset {at} has no usable parent path"
        )));
    }
    Ok(locator)
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
                Error::Open(format!(
                    "{}: parent '{}' is not a readable VHDX: {e}",
                    child.display(),
                    resolved.display()
                ))
            })?;
            if !locator.linkages.contains(&found) {
                return Err(Error::SourceMismatch(format!(
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

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case) as
/// on-disk GUID bytes.
fn parse_guid_text(text: &str) -> Option<[u8; 16]> {
    let t = text.trim_end_matches('\0').trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    let parts: Vec<&str> = t.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5
        || parts.iter().zip(lens).any(|(p, l)| p.len() != l)
        || !t.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
    {
        return None;
    }
    let d1 = u32::from_str_radix(parts[0], 16).ok()?;
    let d2 = u16::from_str_radix(parts[1], 16).ok()?;
    let d3 = u16::from_str_radix(parts[2], 16).ok()?;
    let rest = format!("{}{}", parts[3], parts[4]);
    let mut d4 = [0u8; 8];
    for (i, byte) in d4.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&rest[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(ms_guid(d1, d2, d3, d4))
}

/// On-disk GUID bytes as text.
fn guid_text(g: &[u8]) -> String {
    let r = swap_guid_fields(g);
    uuid::Uuid::from_bytes(r).braced().to_string()
}

impl VhdxDisk {
    fn absent(&self) -> Mapping {
        if self.locator.is_some() {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    fn sectors_per_block(&self) -> u64 {
        self.block_bytes / SECTOR_BYTES
    }

    fn payload_entry(&self, block: u64) -> u64 {
        // In range: `bat` holds every payload entry the size needs.
        self.bat[(block + block / self.chunk_ratio) as usize]
    }

    /// The file offset of a present block's (or bitmap's) data.
    fn entry_offset(&self, entry: u64, what: &str, index: u64) -> Result<u64> {
        let offset = (entry >> 20) * MIB; // < 2^64: 44 bits times 2^20
        if offset < MIB {
            return Err(Error::Corrupt(format!(
                "{}: BAT entry for {what} {index} ({entry:#018x}) is present at file offset 0",
                self.path.display()
            )));
        }
        Ok(offset)
    }

    /// The file offset of sector `in_block` of a block stored at
    /// `block_at`, checked (with the run of `run` sectors) to lie in the file.
    fn run_offset(&self, block_at: u64, in_block: u64, run: u64, block: u64) -> Result<u64> {
        let offset = block_at
            .checked_add(in_block * SECTOR_BYTES)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}: block {block} lies past the largest file offset",
                    self.path.display()
                ))
            })?;
        self.check_inside(offset, run * SECTOR_BYTES, "block", block)?;
        Ok(offset)
    }

    fn check_inside(&self, offset: u64, len: u64, what: &str, index: u64) -> Result<()> {
        if !matches!(offset.checked_add(len), Some(end) if end <= self.view.len()) {
            return Err(Error::Corrupt(format!(
                "{}: {what} {index} at byte offset {offset} (+{len}) runs past the end of the \
                 {}-byte file",
                self.path.display(),
                self.view.len()
            )));
        }
        Ok(())
    }

    /// Bits of `block`'s slice of its chunk's sector bitmap.
    fn block_bitmap(&mut self, block: u64) -> Result<&[u8]> {
        if self.cached_bitmap.as_ref().map(|(b, _)| *b) != Some(block) {
            let chunk = block / self.chunk_ratio;
            let index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
            let entry = self.bat[index as usize];
            if entry & STATE_MASK != SECTOR_BITMAP_PRESENT {
                return Err(Error::Corrupt(format!(
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
            self.cached_bitmap = Some((block, bits));
        }
        Ok(&self.cached_bitmap.as_ref().expect("just filled").1)
    }

    /// Length of the run of blocks from `block` whose entries satisfy
    /// `same`, in sectors from `in_block`, capped at `count`.
    fn run_of_blocks(
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

fn is_absent_state(state: u64) -> bool {
    matches!(
        state,
        PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_DRAFT
    )
}

impl MappedImage for VhdxDisk {
    fn sectors(&self) -> u64 {
        self.virtual_bytes / SECTOR_BYTES
    }

    fn map(&mut self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
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
            other => Err(Error::Corrupt(format!(
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

    fn read_mapped(&mut self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.view.read_exact("block data", offset, buf),
            other => Err(Error::Internal(format!(
                "VHDX asked to read a {other:?} run"
            ))),
        }
    }

    fn parent(&mut self) -> Option<&mut (dyn Disk + 'static)> {
        self.parent.as_deref_mut()
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
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        mapped::read_sectors(self, lba, buf)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        mapped::block_status(self, lba, count)
    }
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        mapped::status_run(self, lba, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_round_trip_through_text() {
        let text = "{2dc27766-f623-4200-9d64-115e9bfd4a08}";
        assert_eq!(parse_guid_text(text), Some(REGION_BAT));
        assert_eq!(guid_text(&REGION_BAT), text);
        assert_eq!(
            parse_guid_text("2DC27766-F623-4200-9D64-115E9BFD4A08"),
            Some(REGION_BAT)
        );
        assert_eq!(
            parse_guid_text("{2dc27766-f623-4200-9d64-115e9bfd4a0}"),
            None
        );
        assert_eq!(
            parse_guid_text("{2dc27766-f623-4200-9d64+115e9bfd4a08}"),
            None
        );
    }
}
