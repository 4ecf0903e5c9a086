//! VirtualBox VDI images: dynamic, fixed and differencing.
//!
//! # Format facts relied on
//!
//! All numbers are little-endian.
//!
//! * A 72-byte pre-header: 64 bytes of free text, the signature `0xBEDA107F`
//!   at byte 0x40 and the version at 0x44 (major in the high 16 bits). Only
//!   major version 1 is read here; version 0 had a different layout.
//! * The version-1 header follows at 0x48: its own size (0x180 without the
//!   trailing LCHS geometry, 0x190 with it), the image type at 0x4C
//!   (1 dynamic, 2 fixed, 3 undo, 4 differencing), flags at 0x50, a 256-byte
//!   comment, the block map's byte offset at 0x154, the data area's byte
//!   offset at 0x158, a legacy geometry (0x15C..0x16C), the disk size in
//!   bytes (u64) at 0x170, the block size at 0x178, the per-block "extra"
//!   size at 0x17C, the number of blocks at 0x180, the number allocated at
//!   0x184, then four UUIDs: the image's (0x188), its last modification's
//!   (0x198), the linkage UUID (0x1A8: in a differencing image, the image
//!   UUID of its parent) and the parent's modification UUID (0x1B8).
//! * The block map is an array of u32, one per block of the virtual disk.
//!   `0xFFFFFFFF` means the block was never written (in a differencing image:
//!   read the parent), `0xFFFFFFFE` means the block reads as zeros, and any
//!   other value is the block's index in the data area, whose bytes start at
//!   `data offset + index * (block size + extra)` after `extra` bytes of
//!   per-block metadata. Indices are below the block count.
//! * UUIDs are stored in the Microsoft GUID layout: the first three fields
//!   (4, 2 and 2 bytes) little-endian. [`Disk::uuid`] returns them in the
//!   RFC 4122 byte order, so they print as VirtualBox shows them.
//! * A VDI file does not name its parent's path; a differencing image finds
//!   its parent by the parent's image UUID only.
//!
//! Images with non-zero per-block extra data and "undo" images are refused
//! as unsupported: no current tool writes them and they could not be tested.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::guid::{swap_guid_fields, uuid_text};
use super::mapped::{self, MappedImage, Mapping};
use super::{
    media_registry, open_parent, open_parent_at_path, open_read_only, FormatId, OpenOptions,
};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

pub mod writer;

// The header layout (version 1.1), shared by the reader and the writer.
const SIGNATURE: u32 = 0xBEDA_107F;
const SIGNATURE_AT: usize = 0x40;
const VERSION_AT: usize = 0x44;
const HEADER_SIZE_AT: usize = 0x48;
const IMAGE_TYPE_AT: usize = 0x4C;
const BLOCK_MAP_OFFSET_AT: usize = 0x154;
const DATA_OFFSET_AT: usize = 0x158;
const SECTOR_SIZE_AT: usize = 0x168;
const DISK_SIZE_AT: usize = 0x170;
const BLOCK_SIZE_AT: usize = 0x178;
const BLOCK_EXTRA_AT: usize = 0x17C;
const BLOCK_COUNT_AT: usize = 0x180;
const BLOCKS_ALLOCATED_AT: usize = 0x184;
const IMAGE_UUID_AT: usize = 0x188;
const MODIFICATION_UUID_AT: usize = 0x198;
const PARENT_UUID_AT: usize = 0x1A8;
/// The pre-header plus the smallest version-1 header: every field read here.
const HEADER_BYTES: usize = 0x48 + MIN_HEADER_SIZE as usize;
const MIN_HEADER_SIZE: u32 = 0x180;

const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

const BLOCK_FREE: u32 = 0xFFFF_FFFF;
const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

/// Blocks larger than this are not something any VDI writer produces; a
/// header claiming one is more likely damaged.
const MAX_BLOCK_SIZE: u32 = 1 << 30;
/// The largest block map kept in memory (256 MiB of entries; 64 TiB of disk
/// at the usual 1 MiB blocks). Bigger maps are refused, not allocated.
const MAX_BLOCK_MAP_ENTRIES: u64 = 1 << 26;

/// The fields of a VDI header this reader uses, already validated against
/// each other (not yet against the file's length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeader {
    /// 1 dynamic, 2 fixed, 4 differencing.
    pub image_type: u32,
    /// Byte offset of the block map.
    pub block_map_offset: u64,
    /// Byte offset of the data area.
    pub data_offset: u64,
    /// Virtual disk size in bytes.
    pub disk_bytes: u64,
    /// Bytes per block (a multiple of 512).
    pub block_bytes: u32,
    /// Blocks the header says the data area may hold (indices are below it).
    pub block_count: u32,
    /// The image UUID, RFC 4122 byte order.
    pub image_uuid: [u8; 16],
    /// The linkage UUID: the parent's image UUID for a differencing image.
    pub parent_uuid: [u8; 16],
}

impl VdiHeader {
    /// True for a differencing image, which needs its parent.
    pub fn is_differencing(&self) -> bool {
        self.image_type == TYPE_DIFFERENCING
    }

    /// Blocks covering the virtual disk: the block map entries that matter.
    fn blocks_in_disk(&self) -> u64 {
        self.disk_bytes.div_ceil(u64::from(self.block_bytes))
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from(le_u32(bytes, at)) | (u64::from(le_u32(bytes, at + 4)) << 32)
}

/// A GUID stored with its first three fields little-endian, as RFC 4122
/// (big-endian) bytes.
pub(crate) fn guid_to_rfc_bytes(stored: &[u8]) -> [u8; 16] {
    swap_guid_fields(stored)
}

/// Parses and cross-checks the header in the first [`HEADER_BYTES`] bytes
/// of a file. `what` names the file in errors.
pub fn parse_header(bytes: &[u8], what: &str) -> Result<VdiHeader> {
    if bytes.len() < HEADER_BYTES {
        return Err(Error::corrupt(format!(
            "{what}: {} bytes is too short for a VDI header ({HEADER_BYTES} bytes)",
            bytes.len()
        )));
    }
    let signature = le_u32(bytes, SIGNATURE_AT);
    if signature != SIGNATURE {
        return Err(Error::corrupt(format!(
            "{what}: VDI signature at byte offset {SIGNATURE_AT:#x} is {signature:#010x}, \
             not {SIGNATURE:#010x}"
        )));
    }
    let version = le_u32(bytes, VERSION_AT);
    if version >> 16 != 1 {
        return Err(Error::unsupported(format!(
            "{what}: VDI version {}.{} (byte offset {VERSION_AT:#x}); only version 1.x is read",
            version >> 16,
            version & 0xFFFF
        )));
    }
    let header_size = le_u32(bytes, HEADER_SIZE_AT);
    if header_size < MIN_HEADER_SIZE {
        return Err(Error::corrupt(format!(
            "{what}: VDI header size at byte offset {HEADER_SIZE_AT:#x} is {header_size}, \
             less than the {MIN_HEADER_SIZE} bytes of a version-1 header"
        )));
    }
    let image_type = le_u32(bytes, IMAGE_TYPE_AT);
    match image_type {
        TYPE_DYNAMIC | TYPE_FIXED | TYPE_DIFFERENCING => {}
        TYPE_UNDO => {
            return Err(Error::unsupported(format!(
                "{what}: VDI \"undo\" images (type 3) are not supported"
            )))
        }
        other => {
            return Err(Error::corrupt(format!(
                "{what}: VDI image type at byte offset {IMAGE_TYPE_AT:#x} is {other}, \
                 not 1 (dynamic), 2 (fixed) or 4 (differencing)"
            )))
        }
    }
    let block_bytes = le_u32(bytes, BLOCK_SIZE_AT);
    if block_bytes == 0
        || u64::from(block_bytes) % SECTOR_BYTES != 0
        || block_bytes > MAX_BLOCK_SIZE
    {
        return Err(Error::corrupt(format!(
            "{what}: VDI block size at byte offset {BLOCK_SIZE_AT:#x} is {block_bytes}, \
             not a non-zero multiple of 512 up to {MAX_BLOCK_SIZE}"
        )));
    }
    let block_extra = le_u32(bytes, BLOCK_EXTRA_AT);
    if block_extra != 0 {
        return Err(Error::unsupported(format!(
            "{what}: VDI blocks with {block_extra} bytes of extra data \
             (byte offset {BLOCK_EXTRA_AT:#x}) are not supported"
        )));
    }
    let header = VdiHeader {
        image_type,
        block_map_offset: u64::from(le_u32(bytes, BLOCK_MAP_OFFSET_AT)),
        data_offset: u64::from(le_u32(bytes, DATA_OFFSET_AT)),
        disk_bytes: le_u64(bytes, DISK_SIZE_AT),
        block_bytes,
        block_count: le_u32(bytes, BLOCK_COUNT_AT),
        image_uuid: guid_to_rfc_bytes(&bytes[IMAGE_UUID_AT..]),
        parent_uuid: guid_to_rfc_bytes(&bytes[PARENT_UUID_AT..]),
    };
    let needed = header.blocks_in_disk();
    if needed > u64::from(header.block_count) {
        return Err(Error::corrupt(format!(
            "{what}: VDI disk of {} bytes needs {needed} blocks of {block_bytes} bytes, but \
             the block count at byte offset {BLOCK_COUNT_AT:#x} is {}",
            header.disk_bytes, header.block_count
        )));
    }
    if needed > MAX_BLOCK_MAP_ENTRIES {
        return Err(Error::unsupported(format!(
            "{what}: VDI block map of {needed} entries is larger than the \
             {MAX_BLOCK_MAP_ENTRIES} this reader holds in memory"
        )));
    }
    Ok(header)
}

/// Reads the header of an open file.
fn read_header(file: &File, what: &str) -> Result<VdiHeader> {
    let mut bytes = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(format!(
                "{what}: file is shorter than a VDI header ({HEADER_BYTES} bytes)"
            )),
            _ => Error::read(&format!("{what}: VDI header"), 0, e),
        })?;
    parse_header(&bytes, what)
}

/// Reads and checks the header of the VDI at `path` (no block map, no
/// parent): what a caller needs to learn an image's UUID or its parent's.
pub fn read_header_at(path: &Path) -> Result<VdiHeader> {
    let file = open_read_only(path)?;
    read_header(&file, &path.display().to_string())
}

/// True when the file starts with a VDI pre-header.
pub fn probe(file: &File) -> bool {
    let mut bytes = [0u8; 4];
    file.read_exact_at(&mut bytes, SIGNATURE_AT as u64).is_ok()
        && u32::from_le_bytes(bytes) == SIGNATURE
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(VdiDisk::open_at_depth(path, options, depth)?))
}

/// What one block map entry says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Stored at this index of the data area.
    Stored(u32),
    Zero,
    Free,
}

/// A VDI image opened read-only, with its block map cached.
pub struct VdiDisk {
    file: crate::file_io::SourceFile,
    path: PathBuf,
    header: VdiHeader,
    /// One entry per block of the virtual disk, validated at open.
    block_map: Vec<u32>,
    parent: Option<Box<dyn Disk>>,
}

impl std::fmt::Debug for VdiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdiDisk")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("has_parent", &self.parent.is_some())
            .finish()
    }
}

impl VdiDisk {
    /// Opens a VDI image. A differencing image's parent is looked for (by
    /// its image UUID, among the `.vdi` files in the child's folder) only
    /// when `options.follow_parent_paths` is set; otherwise opening one is
    /// an error naming the parent UUID.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<VdiDisk> {
        Self::open_at_depth(path, options, 0)
    }

    /// `open` for an image `depth` links down a parent chain.
    pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<VdiDisk> {
        let mut disk = Self::open_detached(path)?;
        if disk.header.is_differencing() {
            let parent = find_and_open_parent(path, &disk.header, options, depth)?;
            disk.attach_parent(parent)?;
        }
        Ok(disk)
    }

    /// Opens a differencing image over a parent the caller supplies. The
    /// parent's UUID must be the one the child was made on.
    pub fn open_with_parent(path: &Path, parent: Box<dyn Disk>) -> Result<VdiDisk> {
        let mut disk = Self::open_detached(path)?;
        if !disk.header.is_differencing() {
            return Err(Error::invalid_argument(format!(
                "{}: not a differencing VDI image, so it takes no parent",
                path.display()
            )));
        }
        disk.attach_parent(parent)?;
        Ok(disk)
    }

    /// The image's parsed header.
    pub fn header(&self) -> &VdiHeader {
        &self.header
    }

    /// The parent's image UUID (RFC 4122 byte order), for a differencing
    /// image.
    pub fn parent_uuid(&self) -> Option<[u8; 16]> {
        self.header
            .is_differencing()
            .then_some(self.header.parent_uuid)
    }

    /// Opens the file and validates header and block map, without a parent.
    fn open_detached(path: &Path) -> Result<VdiDisk> {
        let what = path.display().to_string();
        let file = open_read_only(path)?;
        let file_bytes = file
            .metadata()
            .map_err(|e| Error::open(format!("{what}: {e}")))?
            .len();
        let header = read_header(&file, &what)?;
        let block_map = read_block_map(&file, &what, &header, file_bytes)?;
        Ok(VdiDisk {
            file: file.into(),
            path: path.to_path_buf(),
            header,
            block_map,
            parent: None,
        })
    }

    fn attach_parent(&mut self, parent: Box<dyn Disk>) -> Result<()> {
        let wanted = self.header.parent_uuid;
        match parent.uuid() {
            _ if is_linked_parent(parent.as_ref(), &wanted) => {
                self.parent = Some(parent);
                Ok(())
            }
            found => Err(Error::source_mismatch(format!(
                "{}: differencing VDI image was made on a parent with UUID {}, but the \
                 parent supplied has {}",
                self.path.display(),
                uuid_text(&wanted),
                found.map_or_else(
                    || "no UUID".to_string(),
                    |u| format!("UUID {}", uuid_text(&u))
                )
            ))),
        }
    }

    fn sectors_per_block(&self) -> u64 {
        u64::from(self.header.block_bytes) / SECTOR_BYTES
    }

    fn block(&self, index: u64) -> Block {
        // Callers stay inside the map (see `map`), which covers the disk.
        match self.block_map[index as usize] {
            BLOCK_FREE => Block::Free,
            BLOCK_ZERO => Block::Zero,
            stored => Block::Stored(stored),
        }
    }

    /// Byte offset in the file of data block `stored` (validated at open
    /// not to overflow or run past the file).
    fn stored_block_offset(&self, stored: u32) -> u64 {
        self.header.data_offset + u64::from(stored) * u64::from(self.header.block_bytes)
    }
}

/// Reads the block map entries covering the disk and checks each stored
/// block lies inside the file. The map's size was capped by `parse_header`
/// and is checked against the file's length before it is allocated.
fn read_block_map(
    file: &File,
    what: &str,
    header: &VdiHeader,
    file_bytes: u64,
) -> Result<Vec<u32>> {
    let entries = header.blocks_in_disk();
    let map_bytes = entries * 4; // entries <= 2^26: no overflow
    let map_end = header.block_map_offset + map_bytes;
    if map_end > file_bytes {
        return Err(Error::corrupt(format!(
            "{what}: VDI block map at byte offset {} ({entries} entries) runs past the \
             end of the {file_bytes}-byte file",
            header.block_map_offset
        )));
    }
    let mut raw = vec![0u8; map_bytes as usize];
    file.read_exact_at(&mut raw, header.block_map_offset)
        .map_err(|e| {
            Error::read(
                &format!("{what}: VDI block map"),
                header.block_map_offset,
                e,
            )
        })?;
    let map: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let block_bytes = u64::from(header.block_bytes);
    for (index, &entry) in map.iter().enumerate() {
        if entry == BLOCK_FREE || entry == BLOCK_ZERO {
            continue;
        }
        let entry_at = header.block_map_offset + index as u64 * 4;
        if entry >= header.block_count {
            return Err(Error::corrupt(format!(
                "{what}: VDI block map entry {index} (byte offset {entry_at}) points at data \
                 block {entry}, beyond the image's {} blocks",
                header.block_count
            )));
        }
        // Only the part of the last block inside the disk (in whole sectors,
        // as it is read) must be present.
        let used = (header.disk_bytes.next_multiple_of(SECTOR_BYTES) - index as u64 * block_bytes)
            .min(block_bytes);
        let end = header.data_offset + u64::from(entry) * block_bytes + used; // < 2^32 * 2^30 * 2
        if end > file_bytes {
            return Err(Error::corrupt(format!(
                "{what}: VDI block map entry {index} (byte offset {entry_at}) points at data \
                 ending at byte {end}, past the end of the {file_bytes}-byte file"
            )));
        }
    }
    Ok(map)
}

/// Finds the parent of a differencing image among the `.vdi` files in its
/// folder and opens it through `open_parent` (which applies the caller's
/// rules and the chain depth cap).
fn find_and_open_parent(
    child: &Path,
    header: &VdiHeader,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    let wanted = header.parent_uuid;
    if !options.follow_parent_paths {
        return Err(Error::open(format!(
            "{}: differencing VDI image needs its parent image with UUID {}; looking for \
             parent images is off (enable it with the follow-parent-paths open flag, or \
             supply the parent yourself)",
            child.display(),
            uuid_text(&wanted)
        )));
    }
    // Beside the child first; then where a loaded media registry says the
    // disk with that UUID is (VirtualBox keeps snapshots in another folder).
    let (name, parent) = match find_image_with_uuid(child, &wanted) {
        Some(name) => {
            let parent = open_parent(child, &name, options, depth)?;
            (name, parent)
        }
        None => match media_registry::registry_parent(child, Some(wanted), None) {
            Some(path) => {
                let parent = open_parent_at_path(child, &path, options, depth)?;
                (path.display().to_string(), parent)
            }
            None => {
                return Err(Error::open(format!(
                    "{}: differencing VDI image needs its parent image with UUID {}; no \
                     .vdi file in its folder has that UUID, and no loaded media registry \
                     names it (load the VirtualBox media registry that describes the \
                     image first)",
                    child.display(),
                    uuid_text(&wanted)
                )))
            }
        },
    };
    if !is_linked_parent(parent.as_ref(), &wanted) {
        return Err(Error::source_mismatch(format!(
            "{}: parent '{name}' does not have the UUID {} the child was made on",
            child.display(),
            uuid_text(&wanted)
        )));
    }
    Ok(parent)
}

/// True when `parent` carries the linkage UUID `wanted`: as its
/// [`Disk::uuid`] says, or as VirtualBox holds it (for a VHD parent, the
/// footer bytes read as a GUID; VirtualBox stores that in the linkage).
fn is_linked_parent(parent: &dyn Disk, wanted: &[u8; 16]) -> bool {
    parent.uuid().is_some_and(|found| {
        found == *wanted || media_registry::registry_key(parent.drive_type(), found) == *wanted
    })
}

/// The file name of the first (by name) `.vdi` file beside `child`, other
/// than `child` itself, whose image UUID is `wanted`.
fn find_image_with_uuid(child: &Path, wanted: &[u8; 16]) -> Option<String> {
    let folder = match child.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let child_id = std::fs::metadata(child).ok().map(|m| (m.dev(), m.ino()));
    let mut matches: Vec<String> = std::fs::read_dir(folder)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let is_vdi = Path::new(&name).extension().is_some_and(|ext| {
                FormatId::Vdi
                    .info()
                    .extensions
                    .iter()
                    .any(|known| ext.eq_ignore_ascii_case(known))
            });
            if !is_vdi {
                return None;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path).ok()?;
            if !meta.is_file() || Some((meta.dev(), meta.ino())) == child_id {
                return None;
            }
            let file = File::open(&path).ok()?;
            let header = read_header(&file, &name).ok()?;
            (header.image_uuid == *wanted).then_some(name)
        })
        .collect();
    matches.sort();
    matches.into_iter().next()
}

impl MappedImage for VdiDisk {
    fn sectors(&self) -> u64 {
        self.header.disk_bytes.div_ceil(SECTOR_BYTES)
    }

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        crate::disk::check_range(lba, count, MappedImage::sectors(self))?;
        let per_block = self.sectors_per_block();
        let first = lba / per_block;
        let within = lba % per_block;
        let kind = self.block(first);
        let blocks = self.block_map.len() as u64;
        // Extend the run over following blocks of the same kind; stored
        // blocks only while they are also consecutive in the file.
        let mut run = per_block - within;
        let mut next = first + 1;
        while run < count && next < blocks {
            let continues = match (kind, self.block(next)) {
                (Block::Stored(a), Block::Stored(b)) => {
                    u64::from(b) == u64::from(a) + (next - first)
                }
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            run += per_block;
            next += 1;
        }
        let mapping = match kind {
            Block::Stored(stored) => Mapping::Data {
                file: 0,
                offset: self.stored_block_offset(stored) + within * SECTOR_BYTES,
            },
            Block::Zero => Mapping::Zero,
            Block::Free if self.header.is_differencing() => Mapping::Parent,
            Block::Free => Mapping::Unallocated,
        };
        Ok((mapping, run.min(count)))
    }

    fn read_mapped(&self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.file.read_exact_at(buf, offset).map_err(|e| {
                Error::read(
                    &format!("{}: VDI data block", self.path.display()),
                    offset,
                    e,
                )
            }),
            other => Err(Error::internal(format!(
                "VDI reader asked to read a {other:?} run"
            ))),
        }
    }

    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.parent.as_deref()
    }
}

impl Disk for VdiDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Vdi
    }
    fn sector_count(&self) -> u64 {
        MappedImage::sectors(self)
    }
    fn byte_size(&self) -> u64 {
        self.header.disk_bytes
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        Some(self.header.image_uuid)
    }
    fn is_snapshot(&self) -> bool {
        self.header.is_differencing()
    }
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        VdiDisk::parent_uuid(self)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid header: 3 MiB dynamic disk of 1 MiB blocks.
    fn header_bytes() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES];
        b[SIGNATURE_AT..SIGNATURE_AT + 4].copy_from_slice(&SIGNATURE.to_le_bytes());
        b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&0x0001_0001u32.to_le_bytes());
        b[HEADER_SIZE_AT..HEADER_SIZE_AT + 4].copy_from_slice(&0x190u32.to_le_bytes());
        b[IMAGE_TYPE_AT..IMAGE_TYPE_AT + 4].copy_from_slice(&1u32.to_le_bytes());
        b[BLOCK_MAP_OFFSET_AT..BLOCK_MAP_OFFSET_AT + 4].copy_from_slice(&512u32.to_le_bytes());
        b[DATA_OFFSET_AT..DATA_OFFSET_AT + 4].copy_from_slice(&1024u32.to_le_bytes());
        b[DISK_SIZE_AT..DISK_SIZE_AT + 8].copy_from_slice(&(3u64 << 20).to_le_bytes());
        b[BLOCK_SIZE_AT..BLOCK_SIZE_AT + 4].copy_from_slice(&(1u32 << 20).to_le_bytes());
        b[BLOCK_COUNT_AT..BLOCK_COUNT_AT + 4].copy_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_a_minimal_header() {
        let h = parse_header(&header_bytes(), "t").unwrap();
        assert_eq!(h.disk_bytes, 3 << 20);
        assert_eq!(h.blocks_in_disk(), 3);
        assert!(!h.is_differencing());
    }

    #[test]
    fn guid_fields_are_byte_swapped_to_rfc_order() {
        let stored: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            guid_to_rfc_bytes(&stored),
            [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn rejects_bad_fields_with_their_offsets() {
        let mut b = header_bytes();
        b[BLOCK_SIZE_AT..BLOCK_SIZE_AT + 4].copy_from_slice(&1000u32.to_le_bytes());
        let e = parse_header(&b, "t").unwrap_err().to_string();
        assert!(e.contains("0x178"), "{e}");

        let mut b = header_bytes();
        b[BLOCK_COUNT_AT..BLOCK_COUNT_AT + 4].copy_from_slice(&2u32.to_le_bytes());
        assert!(
            matches!(parse_header(&b, "t"), Err(ref e) if e.kind() == crate::error::ErrorCode::Corrupt)
        );

        let mut b = header_bytes();
        b[IMAGE_TYPE_AT..IMAGE_TYPE_AT + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(
            matches!(parse_header(&b, "t"), Err(ref e) if e.kind() == crate::error::ErrorCode::Unsupported)
        );

        let mut b = header_bytes();
        b[DISK_SIZE_AT..DISK_SIZE_AT + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        b[BLOCK_COUNT_AT..BLOCK_COUNT_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&b, "t").is_err());

        assert!(parse_header(&b[..100], "t").is_err());
    }
}
