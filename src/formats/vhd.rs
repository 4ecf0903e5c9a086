//! VHD (the Virtual PC / Hyper-V "vpc" format): fixed, dynamic and
//! differencing images, read-only.
//!
//! Format facts this reader relies on (from Microsoft's published VHD image
//! format specification, restated in our own words):
//!
//! * Every VHD ends with a 512-byte *footer*, big-endian, starting with the
//!   cookie `conectix`. Fields used: data offset (u64 at 16; all ones for a
//!   fixed disk, else the byte offset of the dynamic header), current size in
//!   bytes (u64 at 48), disk type (u32 at 60: 2 fixed, 3 dynamic,
//!   4 differencing), checksum (u32 at 64) and unique id (16 bytes at 68).
//!   The checksum is the ones' complement of the byte-wise sum of the footer
//!   with the checksum field taken as zero. Dynamic and differencing images
//!   also keep a copy of the footer at offset 0, which we use when the
//!   trailing one is damaged.
//! * A fixed disk is the raw disk followed by the footer.
//! * Dynamic and differencing disks have a 1024-byte *dynamic header*
//!   (cookie `cxsparse`, same checksum rule, checksum at 36): BAT offset
//!   (u64 at 16), number of BAT entries (u32 at 28), block size (u32 at 32),
//!   parent unique id (16 bytes at 40), parent file name (512 bytes of
//!   UTF-16BE at 64) and eight 24-byte parent locator entries from 576
//!   (platform code u32, data space u32, data length u32, reserved u32,
//!   data offset u64).
//! * The BAT is an array of big-endian u32 sector numbers, one per block;
//!   `0xFFFFFFFF` means the block is not allocated. An allocated block is a
//!   sector bitmap (one bit per sector of the block, most significant bit
//!   first, padded to a whole number of 512-byte sectors) followed by the
//!   block's data. A set bit means the sector's data is in this file; a clear
//!   bit means it is not (zeros in a dynamic disk, the parent's data in a
//!   differencing disk).
//! * Parent locator platform codes: `W2ru` (relative path) and `W2ku`
//!   (absolute path) hold UTF-16LE Windows paths; `MacX` holds a UTF-8
//!   `file://` URL; `Wi2r`/`Wi2k` are deprecated single-byte Windows paths;
//!   `Mac ` is an opaque Mac OS alias record (not decoded here).
//! * The child's dynamic header names its parent's unique id (the parent's
//!   footer unique id); a mismatch means the parent is not the one the child
//!   was made on.
//!
//! The disk's size is the footer's current size. (QEMU derives the size of
//! images from some creators from the CHS geometry instead; for images QEMU
//! itself makes the two agree.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder, LittleEndian};

use super::guid::hex;
use super::mapped::{self, MappedImage, Mapping};
use super::{media_registry, open_parent, open_parent_at_path, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

const FOOTER_BYTES: u64 = 512;
const DYNAMIC_HEADER_BYTES: usize = 1024;
const FOOTER_COOKIE: &[u8; 8] = b"conectix";
const DYNAMIC_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_CHECKSUM_AT: usize = 64;
const DYNAMIC_CHECKSUM_AT: usize = 36;
const UNALLOCATED_BLOCK: u32 = 0xFFFF_FFFF;

const DISK_TYPE_FIXED: u32 = 2;
const DISK_TYPE_DYNAMIC: u32 = 3;
const DISK_TYPE_DIFFERENCING: u32 = 4;

/// Blocks larger than this are refused: no known writer uses them and the
/// sector bitmap we cache is sized from the block size.
const MAX_BLOCK_BYTES: u64 = 256 << 20;
/// A Windows path is at most 32767 UTF-16 units; anything longer is not a
/// path.
const MAX_LOCATOR_BYTES: u64 = 64 * 1024;
const LOCATOR_ENTRIES_AT: usize = 576;
const LOCATOR_ENTRY_BYTES: usize = 24;
const LOCATOR_COUNT: usize = 8;

const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
const PLATFORM_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
const PLATFORM_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// The fields of a VHD footer this reader uses.
#[derive(Debug, Clone)]
struct Footer {
    data_offset: u64,
    current_size: u64,
    disk_type: u32,
    unique_id: [u8; 16],
}

/// Where a sparse (dynamic or differencing) image keeps its blocks.
#[derive(Debug)]
struct SparseLayout {
    /// One entry per block of the virtual disk (only as many as the size
    /// needs; the header may declare more).
    bat: Vec<u32>,
    sectors_per_block: u64,
    /// Size on disk of each block's sector bitmap (whole sectors).
    bitmap_bytes: u64,
    /// The last sector bitmap read: (block index, bitmap bytes). A
    /// sequential read touches each block's bitmap once.
    cached_bitmap: Option<(u64, Vec<u8>)>,
}

#[derive(Debug)]
enum Layout {
    Fixed,
    Sparse(SparseLayout),
}

/// What a differencing image says about its parent.
#[derive(Debug, Clone)]
pub struct VhdParentInfo {
    /// The parent's footer unique id, as recorded in the child.
    pub unique_id: [u8; 16],
    /// Candidate names for the parent file, best first (from the parent
    /// locators and the header's parent name).
    pub names: Vec<String>,
}

/// A VHD image opened read-only.
pub struct VhdDisk {
    file: File,
    path: PathBuf,
    file_len: u64,
    footer: Footer,
    layout: Layout,
    parent_info: Option<VhdParentInfo>,
    parent: Option<Box<dyn Disk>>,
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("path", &self.path)
            .field("disk_type", &self.footer.disk_type)
            .field("size", &self.footer.current_size)
            .field("has_parent", &self.parent.is_some())
            .finish()
    }
}

/// True when the file has a VHD footer cookie at its start (dynamic and
/// differencing images) or in its last 512 bytes (all images).
pub fn probe(file: &File) -> bool {
    let mut cookie = [0u8; 8];
    if file.read_exact_at(&mut cookie, 0).is_ok() && &cookie == FOOTER_COOKIE {
        return true;
    }
    let Ok(meta) = file.metadata() else {
        return false;
    };
    meta.len() >= FOOTER_BYTES
        && file
            .read_exact_at(&mut cookie, meta.len() - FOOTER_BYTES)
            .is_ok()
        && &cookie == FOOTER_COOKIE
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(VhdDisk::open_at_depth(path, options, depth)?))
}

impl VhdDisk {
    /// Opens a VHD read-only. A differencing image's parent is opened through
    /// [`open_parent`], so it is only followed when `options` allow it.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<VhdDisk> {
        Self::open_at_depth(path, options, 0)
    }

    /// `open` for an image `depth` links down a parent chain.
    pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<VhdDisk> {
        let mut disk = Self::open_without_parent(path)?;
        if let Some(info) = disk.parent_info.clone() {
            let parent = open_named_parent(path, &info, options, depth)?;
            disk.attach_parent(parent)?;
        }
        Ok(disk)
    }

    /// Opens a differencing VHD on a parent the caller supplies. The parent's
    /// `uuid()` must be the parent unique id the child records.
    pub fn open_with_parent(path: &Path, parent: Box<dyn Disk>) -> Result<VhdDisk> {
        let mut disk = Self::open_without_parent(path)?;
        if disk.parent_info.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{}: not a differencing VHD, it takes no parent",
                path.display()
            )));
        }
        disk.attach_parent(parent)?;
        Ok(disk)
    }

    /// What a differencing image records about its parent (`None` for fixed
    /// and dynamic images).
    pub fn parent_info(&self) -> Option<&VhdParentInfo> {
        self.parent_info.as_ref()
    }

    fn attach_parent(&mut self, parent: Box<dyn Disk>) -> Result<()> {
        let expected = self
            .parent_info
            .as_ref()
            .map(|info| info.unique_id)
            .unwrap_or_default();
        // The bytes as they are (a VHD parent, or a caller's disk carrying
        // the footer bytes), or as VirtualBox sees UUIDs: a child VirtualBox
        // made on a parent of another format (a VDI) records that parent's
        // UUID in VirtualBox's in-memory layout, as it records a VHD
        // parent's footer bytes.
        let in_vbox_form = |kind, id| media_registry::registry_key(kind, id);
        match parent.uuid() {
            Some(found)
                if found == expected
                    || in_vbox_form(parent.drive_type(), found)
                        == in_vbox_form(DriveType::Vhd, expected) =>
            {
                self.parent = Some(parent);
                Ok(())
            }
            found => Err(Error::SourceMismatch(format!(
                "{}: parent has unique id {}, but the differencing image was made on {}",
                self.path.display(),
                found.map_or_else(|| "(none)".to_string(), |id| hex(&id)),
                hex(&expected)
            ))),
        }
    }

    /// Parses footer, dynamic header, BAT and parent locators; does not open
    /// the parent.
    fn open_without_parent(path: &Path) -> Result<VhdDisk> {
        let file = open_read_only(path)?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?
            .len();
        let name = path.display().to_string();
        if file_len < FOOTER_BYTES {
            return Err(Error::Corrupt(format!(
                "{name}: {file_len} bytes is too short for a VHD footer"
            )));
        }
        let footer = read_footer(&file, &name, file_len)?;
        if footer.current_size % SECTOR_BYTES != 0 {
            return Err(Error::Unsupported(format!(
                "{name}: VHD size {} is not a whole number of sectors",
                footer.current_size
            )));
        }
        let mut disk = VhdDisk {
            file,
            path: path.to_path_buf(),
            file_len,
            footer: footer.clone(),
            layout: Layout::Fixed,
            parent_info: None,
            parent: None,
        };
        match footer.disk_type {
            DISK_TYPE_FIXED => {
                let data_end = file_len - FOOTER_BYTES;
                if footer.current_size > data_end {
                    return Err(Error::Corrupt(format!(
                        "{name}: fixed VHD footer at byte offset {data_end} declares {} bytes \
                         of data but only {data_end} precede it",
                        footer.current_size
                    )));
                }
            }
            DISK_TYPE_DYNAMIC | DISK_TYPE_DIFFERENCING => {
                let (layout, parent_info) = disk.read_sparse_metadata(&footer)?;
                disk.layout = Layout::Sparse(layout);
                if footer.disk_type == DISK_TYPE_DIFFERENCING {
                    disk.parent_info = Some(parent_info);
                }
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{name}: VHD disk type {other} (footer byte offset {}) is not fixed (2), \
                     dynamic (3) or differencing (4)",
                    file_len - FOOTER_BYTES + 60
                )))
            }
        }
        Ok(disk)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn read_exact(&self, what: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::read(&format!("{}: {what}", self.name()), offset, e))
    }

    /// Reads and checks the dynamic header, the BAT and (for a differencing
    /// image) the parent locators.
    fn read_sparse_metadata(&self, footer: &Footer) -> Result<(SparseLayout, VhdParentInfo)> {
        let name = self.name();
        let header_at = footer.data_offset;
        let header_end = header_at.checked_add(DYNAMIC_HEADER_BYTES as u64);
        if !matches!(header_end, Some(end) if end <= self.file_len) {
            return Err(Error::Corrupt(format!(
                "{name}: dynamic header offset {header_at} (footer data offset) lies outside \
                 the {}-byte file",
                self.file_len
            )));
        }
        let mut header = [0u8; DYNAMIC_HEADER_BYTES];
        self.read_exact("dynamic header", header_at, &mut header)?;
        if &header[0..8] != DYNAMIC_COOKIE {
            return Err(Error::Corrupt(format!(
                "{name}: no 'cxsparse' dynamic header cookie at byte offset {header_at}"
            )));
        }
        let stored = BigEndian::read_u32(&header[DYNAMIC_CHECKSUM_AT..]);
        let computed = ones_complement_checksum(&header, DYNAMIC_CHECKSUM_AT);
        if stored != computed {
            return Err(Error::Corrupt(format!(
                "{name}: dynamic header checksum at byte offset {} is {stored:#010x}, \
                 expected {computed:#010x}",
                header_at + DYNAMIC_CHECKSUM_AT as u64
            )));
        }
        let bat_at = BigEndian::read_u64(&header[16..]);
        let max_entries = u64::from(BigEndian::read_u32(&header[28..]));
        let block_bytes = u64::from(BigEndian::read_u32(&header[32..]));
        if !block_bytes.is_power_of_two()
            || !(SECTOR_BYTES..=MAX_BLOCK_BYTES).contains(&block_bytes)
        {
            return Err(Error::Corrupt(format!(
                "{name}: block size {block_bytes} (dynamic header at byte offset {header_at}) \
                 is not a power of two between 512 bytes and 256 MiB"
            )));
        }
        let blocks_needed = footer.current_size.div_ceil(block_bytes);
        if blocks_needed > max_entries {
            return Err(Error::Corrupt(format!(
                "{name}: {} bytes need {blocks_needed} blocks but the BAT has {max_entries} \
                 entries (dynamic header at byte offset {header_at})",
                footer.current_size
            )));
        }
        let bat_bytes = blocks_needed * 4; // cannot overflow: blocks_needed <= u32::MAX
        let bat_end = bat_at.checked_add(bat_bytes);
        if !matches!(bat_end, Some(end) if end <= self.file_len) {
            return Err(Error::Corrupt(format!(
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
            cached_bitmap: None,
        };

        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&header[40..56]);
        let names = if footer.disk_type == DISK_TYPE_DIFFERENCING {
            self.parent_names(&header, header_at)?
        } else {
            Vec::new()
        };
        Ok((layout, VhdParentInfo { unique_id, names }))
    }

    /// Decodes the parent locators and the header's parent name into
    /// candidate paths, best first.
    fn parent_names(&self, header: &[u8], header_at: u64) -> Result<Vec<String>> {
        let mut relative = Vec::new();
        let mut absolute = Vec::new();
        let mut others = Vec::new();
        for index in 0..LOCATOR_COUNT {
            let entry_at = LOCATOR_ENTRIES_AT + index * LOCATOR_ENTRY_BYTES;
            let entry = &header[entry_at..entry_at + LOCATOR_ENTRY_BYTES];
            let code = BigEndian::read_u32(&entry[0..]);
            let length = u64::from(BigEndian::read_u32(&entry[8..]));
            let offset = BigEndian::read_u64(&entry[16..]);
            if code == 0 || length == 0 {
                continue;
            }
            let decodable = matches!(
                code,
                PLATFORM_W2RU | PLATFORM_W2KU | PLATFORM_WI2R | PLATFORM_WI2K | PLATFORM_MACX
            );
            if !decodable {
                continue; // e.g. a Mac OS alias record: nothing we can resolve
            }
            let end = offset.checked_add(length);
            if length > MAX_LOCATOR_BYTES || !matches!(end, Some(end) if end <= self.file_len) {
                return Err(Error::Corrupt(format!(
                    "{}: parent locator {index} (dynamic header byte offset {}) points at \
                     {length} bytes at byte offset {offset}, outside the file or too long",
                    self.name(),
                    header_at + entry_at as u64
                )));
            }
            let mut data = vec![0u8; length as usize];
            self.read_exact("parent locator", offset, &mut data)?;
            let decoded = match code {
                PLATFORM_W2RU | PLATFORM_W2KU => utf16_le(&data),
                PLATFORM_MACX => file_url_path(&String::from_utf8_lossy(&data)),
                _ => data.iter().map(|&b| char::from(b)).collect(),
            };
            let decoded = decoded.trim_end_matches('\0').to_string();
            if decoded.is_empty() {
                continue;
            }
            match code {
                PLATFORM_W2RU | PLATFORM_WI2R => relative.push(windows_to_unix(&decoded)),
                PLATFORM_W2KU | PLATFORM_WI2K => absolute.push(decoded),
                _ => others.push(decoded),
            }
        }
        let header_name = utf16_be(&header[64..576]);
        let header_name = header_name.trim_end_matches('\0');

        let mut names: Vec<String> = Vec::new();
        names.extend(relative.iter().cloned());
        // A Windows drive-letter path means nothing here; only a path that is
        // absolute on this system is tried as it stands.
        names.extend(absolute.iter().filter(|p| p.starts_with('/')).cloned());
        names.extend(others.iter().cloned());
        // Last resort: the parent's file name next to the child (an image
        // folder copied elsewhere). The unique id check guards against
        // picking up the wrong file.
        let mut base_names: Vec<String> = relative
            .iter()
            .chain(
                absolute
                    .iter()
                    .map(|p| windows_to_unix(p))
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .chain(others.iter())
            .filter_map(|p| p.rsplit('/').next().map(str::to_string))
            .collect();
        if !header_name.is_empty() {
            base_names.push(windows_to_unix(header_name));
        }
        names.extend(base_names);
        let mut unique = Vec::new();
        for name in names {
            if !name.is_empty() && !unique.contains(&name) {
                unique.push(name);
            }
        }
        if unique.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: differencing VHD (dynamic header at byte offset {header_at}) names no \
                 parent file this reader can decode",
                self.name()
            )));
        }
        Ok(unique)
    }
}

/// Opens the first candidate parent that exists; when none does, the file a
/// loaded media registry names for the parent's unique id. When neither
/// finds it (or following parents is off) `open_parent`'s error names the
/// best candidate.
fn open_named_parent(
    child: &Path,
    info: &VhdParentInfo,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    let names = &info.names;
    if options.follow_parent_paths {
        let folder = child.parent().unwrap_or_else(|| Path::new("."));
        for name in names {
            let candidate = Path::new(name);
            let resolved = if candidate.is_absolute() {
                candidate.to_path_buf()
            } else {
                folder.join(candidate)
            };
            if resolved.is_file() {
                return open_parent(child, name, options, depth);
            }
        }
        // VirtualBox records a VHD's unique id as the GUID its bytes spell.
        let key = media_registry::registry_key(DriveType::Vhd, info.unique_id);
        if let Some(path) = media_registry::registry_parent(child, Some(key), None) {
            return open_parent_at_path(child, &path, options, depth);
        }
        return open_parent(child, &names[0], options, depth).map_err(|e| match e {
            Error::Open(text) => Error::Open(format!(
                "{text}; no loaded media registry names the parent's unique id {}",
                media_registry::uuid_text(&key)
            )),
            other => other,
        });
    }
    open_parent(child, &names[0], options, depth)
}

/// The unique id in the footer of the VHD at `path` (its bytes as stored,
/// as [`Disk::uuid`] reports them), without opening a parent.
pub fn footer_unique_id(path: &Path) -> Result<[u8; 16]> {
    let file = open_read_only(path)?;
    let name = path.display().to_string();
    let file_len = file
        .metadata()
        .map_err(|e| Error::Open(format!("{name}: {e}")))?
        .len();
    if file_len < FOOTER_BYTES {
        return Err(Error::Corrupt(format!(
            "{name}: {file_len} bytes is too short for a VHD footer"
        )));
    }
    Ok(read_footer(&file, &name, file_len)?.unique_id)
}

/// Reads the trailing footer, falling back to the copy at offset 0 (which
/// only dynamic and differencing images have) when it is damaged.
fn read_footer(file: &File, name: &str, file_len: u64) -> Result<Footer> {
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
        return Err(Error::Corrupt(format!(
            "{name}: no 'conectix' VHD footer cookie at byte offset {at}"
        )));
    }
    let stored = BigEndian::read_u32(&raw[FOOTER_CHECKSUM_AT..]);
    let computed = ones_complement_checksum(&raw, FOOTER_CHECKSUM_AT);
    if stored != computed {
        return Err(Error::Corrupt(format!(
            "{name}: VHD footer checksum at byte offset {} is {stored:#010x}, expected \
             {computed:#010x}",
            at + FOOTER_CHECKSUM_AT as u64
        )));
    }
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&raw[68..84]);
    Ok(Footer {
        data_offset: BigEndian::read_u64(&raw[16..]),
        current_size: BigEndian::read_u64(&raw[48..]),
        disk_type: BigEndian::read_u32(&raw[60..]),
        unique_id,
    })
}

/// The VHD checksum: ones' complement of the byte sum, the 4-byte checksum
/// field at `checksum_at` counted as zero.
fn ones_complement_checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

fn utf16_le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(LittleEndian::read_u16).collect();
    String::from_utf16_lossy(&units)
}

fn utf16_be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(BigEndian::read_u16).collect();
    String::from_utf16_lossy(&units)
}

/// `.\dir\file.vhd` → `./dir/file.vhd`.
fn windows_to_unix(path: &str) -> String {
    path.replace('\\', "/")
}

/// The path of a `file://host/path` URL, percent-decoded; other strings are
/// returned as they are.
fn file_url_path(url: &str) -> String {
    let url = url.trim_end_matches('\0');
    let Some(rest) = url.strip_prefix("file://") else {
        return url.to_string();
    };
    let path = match rest.find('/') {
        Some(at) => &rest[at..],
        None => rest,
    };
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'%' {
            bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        } else {
            None
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl VhdDisk {
    /// The sector bitmap of allocated block `block` stored at `block_at`.
    fn bitmap(&mut self, block: u64, block_at: u64) -> Result<&[u8]> {
        let Layout::Sparse(layout) = &mut self.layout else {
            return Err(Error::Internal("sector bitmap of a fixed VHD".into()));
        };
        if layout.cached_bitmap.as_ref().map(|(b, _)| *b) != Some(block) {
            // Size bounded by the validated block size (at most 64 KiB).
            let mut bits = vec![0u8; layout.bitmap_bytes as usize];
            self.file.read_exact_at(&mut bits, block_at).map_err(|e| {
                Error::read(
                    &format!("{}: sector bitmap of block {block}", self.path.display()),
                    block_at,
                    e,
                )
            })?;
            layout.cached_bitmap = Some((block, bits));
        }
        Ok(&layout.cached_bitmap.as_ref().expect("just filled").1)
    }

    fn absent(&self) -> Mapping {
        if self.parent_info.is_some() {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }

    fn map_sparse(&mut self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let Layout::Sparse(layout) = &self.layout else {
            return Err(Error::Internal("sparse mapping of a fixed VHD".into()));
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
            return Err(Error::Corrupt(format!(
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
            return Err(Error::Corrupt(format!(
                "{}: BAT entry {block} puts data at byte offset {offset}..{end}, past the end \
                 of the {}-byte file",
                self.path.display(),
                self.file_len
            )));
        }
        Ok((Mapping::Data { file: 0, offset }, run))
    }
}

impl MappedImage for VhdDisk {
    fn sectors(&self) -> u64 {
        self.footer.current_size / SECTOR_BYTES
    }

    fn map(&mut self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        match self.layout {
            Layout::Fixed => Ok((
                Mapping::Data {
                    file: 0,
                    offset: lba * SECTOR_BYTES,
                },
                count,
            )),
            Layout::Sparse(_) => self.map_sparse(lba, count),
        }
    }

    fn read_mapped(&mut self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.read_exact("data", offset, buf),
            other => Err(Error::Internal(format!(
                "VHD asked to read a {other:?} run"
            ))),
        }
    }

    fn parent(&mut self) -> Option<&mut (dyn Disk + 'static)> {
        self.parent.as_deref_mut()
    }
}

impl Disk for VhdDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Vhd
    }
    fn sector_count(&self) -> u64 {
        MappedImage::sectors(self)
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        Some(self.footer.unique_id)
    }
    fn is_snapshot(&self) -> bool {
        self.parent_info.is_some()
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
    fn checksum_skips_its_own_field() {
        let mut bytes = [1u8; 16];
        bytes[4..8].copy_from_slice(&[0xAA; 4]);
        assert_eq!(ones_complement_checksum(&bytes, 4), !12u32);
    }

    #[test]
    fn file_urls_decode_to_paths() {
        assert_eq!(
            file_url_path("file://localhost/Users/me/My%20Disk.vhd"),
            "/Users/me/My Disk.vhd"
        );
        assert_eq!(file_url_path("file:///tmp/a.vhd\0\0"), "/tmp/a.vhd");
        assert_eq!(file_url_path("file:///bad%zz"), "/bad%zz");
        assert_eq!(file_url_path("file:///end%4"), "/end%4");
    }

    #[test]
    fn windows_paths_become_unix_paths() {
        assert_eq!(windows_to_unix(r".\sub\p.vhd"), "./sub/p.vhd");
    }
}
