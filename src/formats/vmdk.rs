//! VMware VMDK images, read-only: monolithicSparse, monolithicFlat,
//! twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized, and sparse
//! differencing images with a parent.
//!
//! Format facts this reader relies on (from VMware's published Virtual Disk
//! Format notes, restated in our own words):
//!
//! * An image is described by a text *descriptor*: `key=value` lines
//!   (`createType`, `parentFileNameHint`, `ddb.*` entries such as
//!   `ddb.uuid.image`), comment lines starting with `#`, and extent lines
//!   `ACCESS SECTORS TYPE "FILE" [OFFSET]`, where ACCESS is RW, RDONLY or
//!   NOACCESS and TYPE is FLAT (a raw file, data starting OFFSET sectors in),
//!   SPARSE (a hosted sparse extent) or ZERO (no file, reads zeros). Extents
//!   follow each other in the order listed; file names are relative to the
//!   descriptor's folder.
//! * The descriptor is either its own small text file, or is embedded in a
//!   monolithic sparse file.
//! * A hosted sparse extent starts with a 512-byte little-endian header:
//!   magic `KDMV` at 0, version (1..=3) at 4, flags at 8 (bit 16: grains
//!   are compressed, bit 17: grains carry markers), capacity in sectors
//!   (u64) at 12, grain size in sectors (u64) at 20, embedded descriptor
//!   offset and size in sectors (u64s) at 28 and 36, grain-table entries per
//!   table (u32, 512 in practice) at 44, redundant and primary grain
//!   directory offsets in sectors (u64s) at 48 and 56, and the compression
//!   algorithm (u16, 1 = deflate) at 77.
//! * The grain directory is an array of u32 sector offsets of grain tables
//!   (0 = no table: the whole range is unallocated); each grain table holds
//!   u32 sector offsets of grains. A grain entry of 0 is unallocated (the
//!   parent's, or zeros), 1 is a grain known to read as zeros.
//! * In stream-optimized extents, each grain entry points at a grain marker:
//!   the grain's first sector number (u64), the compressed length (u32) and
//!   a zlib stream that inflates to one grain. When the header's directory
//!   offset is all ones, the real header is a footer copy stored 1024 bytes
//!   before the end of the file (followed by a footer marker's payload and an
//!   end-of-stream marker).
//! * `COWD` is the magic of ESX/legacy sparse extents, which are a different
//!   format (not read here).
//!
//! Extent file names: a descriptor naming an absolute path or one that
//! climbs out of its folder with `..` could make the reader expose any file
//! on the machine as disk data, so such names are refused unless the caller
//! opted in to following paths named inside images
//! ([`OpenOptions::follow_parent_paths`]). Symbolic links inside the folder
//! are followed like any file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use super::mapped::{self, MappedImage, Mapping};
use byteorder::{ByteOrder, LittleEndian};

use super::inflate::inflate_exact;
use super::table_cache::TableCache;
use super::{media_registry, open_parent, open_parent_at_path, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};

const SPARSE_MAGIC: [u8; 4] = *b"KDMV";
const COWD_MAGIC: [u8; 4] = *b"COWD";
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const GD_AT_END: u64 = u64::MAX;
const GRAIN_ZERO: u32 = 1;
const MARKER_HEADER: u64 = 12;
/// Largest grain accepted: 16 MiB (VMware uses 64 KiB); bounds the
/// decompression buffer.
const MAX_GRAIN_SECTORS: u64 = 1 << 15;
/// The specification fixes 512 entries per grain table; QEMU refuses more.
const MAX_GTES_PER_GT: u32 = 512;
/// A descriptor is a few kilobytes; more is not a descriptor.
const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
/// Each extent holds an open file; cap how many a descriptor may list.
const MAX_EXTENTS: usize = 4096;
/// Grain tables cached per sparse extent (2 KiB each at 512 entries).
const GT_CACHE_TABLES: usize = 1024;
/// How many bytes the probe looks at for a text descriptor.
const PROBE_BYTES: usize = 4096;

/// True for a sparse extent (`KDMV`, or `COWD` so it is refused clearly) or
/// a text descriptor.
pub fn probe(file: &File) -> bool {
    let mut head = [0u8; PROBE_BYTES];
    let len = match read_prefix(file, &mut head) {
        Ok(len) => len,
        Err(_) => return false,
    };
    let head = &head[..len];
    if head.starts_with(&SPARSE_MAGIC) || head.starts_with(&COWD_MAGIC) {
        return true;
    }
    looks_like_descriptor(head)
}

fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// A descriptor is plain text whose first meaningful line is the
/// `# Disk DescriptorFile` banner, or which sets `createType`. QEMU pads
/// descriptors it rewrites with NULs to a whole sector, so trailing NULs
/// are allowed; NULs followed by anything else are not text.
fn looks_like_descriptor(head: &[u8]) -> bool {
    let text_len = head.iter().position(|b| *b == 0).unwrap_or(head.len());
    if text_len == 0 || head[text_len..].iter().any(|b| *b != 0) {
        return false;
    }
    let text = String::from_utf8_lossy(&head[..text_len]);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let banner = lines
        .clone()
        .next()
        .is_some_and(|l| l.eq_ignore_ascii_case("# Disk DescriptorFile"));
    banner || lines.any(|l| l.starts_with("createType"))
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(VmdkDisk::open_at_depth(path, options, depth)?))
}

/// What one grain (or run of grains) of a sparse extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Uncompressed, at this byte offset in the extent file.
    Data(u64),
    /// A compressed grain whose marker (or stream) starts at this sector.
    Compressed(u64),
    Zero,
    Absent,
}

/// The fields of a sparse extent header this reader uses.
#[derive(Debug, Clone)]
struct SparseHeader {
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    descriptor_sector: u64,
    descriptor_sectors: u64,
    gtes_per_gt: u32,
    gd_sector: u64,
    compression: u16,
}

struct SparseExtent {
    file: File,
    path: PathBuf,
    file_len: u64,
    capacity: u64,
    grain_sectors: u64,
    gtes_per_gt: u64,
    compressed: bool,
    markers: bool,
    /// Grain directory: sector offsets of the grain tables.
    directory: Vec<u32>,
    tables: TableCache<u32>,
}

struct FlatExtent {
    file: File,
    path: PathBuf,
    len: u64,
    /// Byte offset in the file of the extent's first sector.
    base: u64,
}

enum ExtentKind {
    Flat(FlatExtent),
    Sparse(Box<SparseExtent>),
    Zero,
}

struct Extent {
    /// First virtual sector.
    start: u64,
    sectors: u64,
    kind: ExtentKind,
}

/// What a descriptor says.
#[derive(Debug, Default)]
struct Descriptor {
    create_type: Option<String>,
    parent_hint: Option<String>,
    uuid: Option<[u8; 16]>,
    /// `ddb.uuid.parent`, unless absent or all zeros (a base disk).
    parent_uuid: Option<[u8; 16]>,
    extents: Vec<ExtentLine>,
}

#[derive(Debug)]
struct ExtentLine {
    access: String,
    sectors: u64,
    kind: String,
    file: Option<String>,
    offset: u64,
}

/// A VMDK image opened read-only.
pub struct VmdkDisk {
    path: PathBuf,
    extents: Vec<Extent>,
    sectors: u64,
    create_type: Option<String>,
    parent_hint: Option<String>,
    uuid: Option<[u8; 16]>,
    parent_uuid: Option<[u8; 16]>,
    parent: Option<Box<dyn Disk>>,
    /// The last inflated grain and its token: sequential reads inside a
    /// compressed grain inflate it once.
    last_inflated: Option<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for VmdkDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkDisk")
            .field("path", &self.path)
            .field("sectors", &self.sectors)
            .field("extents", &self.extents.len())
            .field("create_type", &self.create_type)
            .field("parent_hint", &self.parent_hint)
            .finish_non_exhaustive()
    }
}

impl VmdkDisk {
    /// Opens `path` (a descriptor or a monolithic sparse file); a parent is
    /// opened through [`open_parent`] under `options`.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<VmdkDisk> {
        Self::open_at_depth(path, options, 0)
    }

    /// `open` for an image `depth` links down a parent chain.
    pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<VmdkDisk> {
        let mut disk = Self::open_without_parent(path, options)?;
        if let Some(hint) = disk.parent_hint.clone() {
            let ids = VmdkUuids {
                image: disk.uuid,
                parent: disk.parent_uuid,
            };
            disk.parent = Some(open_hinted_parent(path, &hint, ids, options, depth)?);
        }
        Ok(disk)
    }

    /// Opens a differencing image whose parent disk the caller supplies
    /// (instead of following `parentFileNameHint`). `options` still governs
    /// which extent file names are accepted.
    pub fn open_with_parent(
        path: &Path,
        options: &OpenOptions,
        parent: Box<dyn Disk>,
    ) -> Result<VmdkDisk> {
        let mut disk = Self::open_without_parent(path, options)?;
        if disk.parent_hint.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{}: a parent was supplied but the image names no parent",
                path.display()
            )));
        }
        disk.parent = Some(parent);
        Ok(disk)
    }

    /// The descriptor's `createType`, if it has one.
    pub fn create_type(&self) -> Option<&str> {
        self.create_type.as_deref()
    }

    /// The descriptor's `parentFileNameHint`, if any.
    pub fn parent_file_name_hint(&self) -> Option<&str> {
        self.parent_hint.as_deref()
    }

    fn open_without_parent(path: &Path, options: &OpenOptions) -> Result<VmdkDisk> {
        let file = open_read_only(path)?;
        let file_len = file_length(&file, path)?;
        let mut magic = [0u8; 4];
        let have = read_prefix(&file, &mut magic).map_err(|e| Error::read(&name(path), 0, e))?;
        if have == 4 && magic == COWD_MAGIC {
            return Err(Error::Unsupported(format!(
                "{}: COWD (ESX/legacy) sparse VMDK extents are not supported",
                path.display()
            )));
        }
        if have == 4 && magic == SPARSE_MAGIC {
            return Self::open_monolithic_sparse(file, path, file_len);
        }
        let descriptor = read_text_descriptor(&file, path, file_len)?;
        Self::open_from_descriptor(descriptor, path, options)
    }

    /// A sparse file opened directly is one extent: itself. Its embedded
    /// descriptor (if any) supplies the parent hint and UUID; its extent
    /// line is ignored, so a renamed file still opens.
    fn open_monolithic_sparse(file: File, path: &Path, file_len: u64) -> Result<VmdkDisk> {
        let header = read_sparse_header(&file, path, file_len)?;
        let descriptor = read_embedded_descriptor(&file, path, file_len, &header)?;
        let capacity = header.capacity;
        let sparse = SparseExtent::new(file, path, file_len, header)?;
        Ok(VmdkDisk {
            path: path.to_path_buf(),
            extents: vec![Extent {
                start: 0,
                sectors: capacity,
                kind: ExtentKind::Sparse(Box::new(sparse)),
            }],
            sectors: capacity,
            create_type: descriptor.create_type,
            parent_hint: descriptor.parent_hint,
            uuid: descriptor.uuid,
            parent_uuid: descriptor.parent_uuid,
            parent: None,
            last_inflated: None,
        })
    }

    fn open_from_descriptor(
        descriptor: Descriptor,
        path: &Path,
        options: &OpenOptions,
    ) -> Result<VmdkDisk> {
        if descriptor.extents.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: VMDK descriptor lists no extents",
                path.display()
            )));
        }
        if descriptor.extents.len() > MAX_EXTENTS {
            return Err(Error::Unsupported(format!(
                "{}: VMDK descriptor lists {} extents (at most {MAX_EXTENTS} are opened)",
                path.display(),
                descriptor.extents.len()
            )));
        }
        let folder = path.parent().unwrap_or_else(|| Path::new("."));
        let mut extents = Vec::with_capacity(descriptor.extents.len());
        let mut start = 0u64;
        for line in &descriptor.extents {
            let kind = open_extent(line, folder, path, options)?;
            extents.push(Extent {
                start,
                sectors: line.sectors,
                kind,
            });
            start = start
                .checked_add(line.sectors)
                .filter(|total| total.checked_mul(SECTOR_BYTES).is_some())
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "{}: extent sizes add up to more sectors than a disk can have",
                        path.display()
                    ))
                })?;
        }
        Ok(VmdkDisk {
            path: path.to_path_buf(),
            extents,
            sectors: start,
            create_type: descriptor.create_type,
            parent_hint: descriptor.parent_hint,
            uuid: descriptor.uuid,
            parent_uuid: descriptor.parent_uuid,
            parent: None,
            last_inflated: None,
        })
    }

    /// The index of the extent holding virtual sector `lba`.
    fn extent_index(&self, lba: u64) -> Result<usize> {
        let index = self.extents.partition_point(|e| e.start + e.sectors <= lba);
        if index < self.extents.len() {
            Ok(index)
        } else {
            Err(Error::Internal(format!(
                "{}: sector {lba} is past the last extent",
                self.path.display()
            )))
        }
    }

    fn absent_mapping(&self) -> Mapping {
        if self.parent_hint.is_some() {
            Mapping::Parent
        } else {
            Mapping::Unallocated
        }
    }
}

fn name(path: &Path) -> String {
    path.display().to_string()
}

fn file_length(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Open(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok(meta.len())
}

/// Resolves an extent file name against the descriptor's folder, refusing
/// names that leave it unless the caller allows paths named inside images.
fn resolve_extent_path(
    folder: &Path,
    named: &str,
    descriptor: &Path,
    options: &OpenOptions,
) -> Result<PathBuf> {
    let named_path = Path::new(named);
    if named.is_empty() {
        return Err(Error::Corrupt(format!(
            "{}: extent line with an empty file name",
            descriptor.display()
        )));
    }
    let escapes = named_path.is_absolute()
        || named_path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        });
    if escapes && !options.follow_parent_paths {
        return Err(Error::Open(format!(
            "{}: extent file '{named}' is outside the descriptor's folder; following paths \
             named inside an image is off (enable it with the follow-parent-paths open flag)",
            descriptor.display()
        )));
    }
    Ok(if named_path.is_absolute() {
        named_path.to_path_buf()
    } else {
        folder.join(named_path)
    })
}

fn open_extent(
    line: &ExtentLine,
    folder: &Path,
    descriptor: &Path,
    options: &OpenOptions,
) -> Result<ExtentKind> {
    if line.access.eq_ignore_ascii_case("NOACCESS") {
        return Err(Error::Unsupported(format!(
            "{}: NOACCESS extents cannot be read",
            descriptor.display()
        )));
    }
    let kind = line.kind.to_ascii_uppercase();
    if kind == "ZERO" {
        return Ok(ExtentKind::Zero);
    }
    let named = line.file.as_deref().ok_or_else(|| {
        Error::Corrupt(format!(
            "{}: {kind} extent line without a file name",
            descriptor.display()
        ))
    })?;
    match kind.as_str() {
        "FLAT" | "VMFS" => {
            let path = resolve_extent_path(folder, named, descriptor, options)?;
            let file = open_read_only(&path)?;
            let len = file_length(&file, &path)?;
            let base = line.offset.checked_mul(SECTOR_BYTES);
            let end = base.and_then(|b| b.checked_add(line.sectors.checked_mul(SECTOR_BYTES)?));
            match (base, end) {
                (Some(base), Some(end)) if end <= len => Ok(ExtentKind::Flat(FlatExtent {
                    file,
                    path,
                    len,
                    base,
                })),
                _ => Err(Error::Corrupt(format!(
                    "{}: flat extent '{named}' ({} sectors from sector {}) does not fit in its {len}-byte file",
                    descriptor.display(),
                    line.sectors,
                    line.offset
                ))),
            }
        }
        "SPARSE" => {
            let path = resolve_extent_path(folder, named, descriptor, options)?;
            let file = open_read_only(&path)?;
            let len = file_length(&file, &path)?;
            let mut magic = [0u8; 4];
            let have =
                read_prefix(&file, &mut magic).map_err(|e| Error::read(&name(&path), 0, e))?;
            if have == 4 && magic == COWD_MAGIC {
                return Err(Error::Unsupported(format!(
                    "{}: COWD (ESX/legacy) sparse extents are not supported",
                    path.display()
                )));
            }
            let header = read_sparse_header(&file, &path, len)?;
            if header.capacity < line.sectors {
                return Err(Error::Corrupt(format!(
                    "{}: sparse extent '{named}' holds {} sectors but the descriptor lists {}",
                    descriptor.display(),
                    header.capacity,
                    line.sectors
                )));
            }
            Ok(ExtentKind::Sparse(Box::new(SparseExtent::new(
                file, &path, len, header,
            )?)))
        }
        other => Err(Error::Unsupported(format!(
            "{}: VMDK extent type {other} is not supported (only FLAT, VMFS, SPARSE and ZERO)",
            descriptor.display()
        ))),
    }
}

/// The descriptor embedded in a monolithic sparse file (an empty one when
/// the header points at none).
fn read_embedded_descriptor(
    file: &File,
    path: &Path,
    file_len: u64,
    header: &SparseHeader,
) -> Result<Descriptor> {
    if header.descriptor_sector != 0 && header.descriptor_sectors != 0 {
        let bytes = header
            .descriptor_sectors
            .checked_mul(SECTOR_BYTES)
            .filter(|b| *b <= MAX_DESCRIPTOR_BYTES);
        let start = header.descriptor_sector.checked_mul(SECTOR_BYTES);
        let (bytes, start) = match (bytes, start) {
            (Some(b), Some(s)) if s.checked_add(b).is_some_and(|e| e <= file_len) => (b, s),
            _ => {
                return Err(Error::Corrupt(format!(
                    "{}: embedded descriptor at sector {} ({} sectors) is too large or past the end of the file",
                    path.display(),
                    header.descriptor_sector,
                    header.descriptor_sectors
                )))
            }
        };
        let mut text = vec![0u8; bytes as usize];
        file.read_exact_at(&mut text, start)
            .map_err(|e| Error::read(&format!("{} descriptor", name(path)), start, e))?;
        // The descriptor area is NUL-padded after the text.
        let used = text.iter().position(|b| *b == 0).unwrap_or(text.len());
        text.truncate(used);
        parse_descriptor(&text, path)
    } else {
        Ok(Descriptor::default())
    }
}

/// A descriptor that is its own small text file.
fn read_text_descriptor(file: &File, path: &Path, file_len: u64) -> Result<Descriptor> {
    if file_len > MAX_DESCRIPTOR_BYTES {
        return Err(Error::Corrupt(format!(
            "{}: not a sparse extent, and at {file_len} bytes too large for a VMDK descriptor",
            path.display()
        )));
    }
    let mut text = vec![0u8; file_len as usize];
    file.read_exact_at(&mut text, 0)
        .map_err(|e| Error::read(&format!("{} descriptor", name(path)), 0, e))?;
    // A rewritten descriptor may be NUL-padded after its text.
    let used = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    parse_descriptor(&text[..used], path)
}

/// The UUIDs a VMDK descriptor records (VirtualBox writes them; QEMU does
/// not), in the byte order of their text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmdkUuids {
    /// `ddb.uuid.image`.
    pub image: Option<[u8; 16]>,
    /// `ddb.uuid.parent`, unless it is all zeros (a base disk).
    pub parent: Option<[u8; 16]>,
}

/// Reads the descriptor of the VMDK at `path` (a descriptor file or a
/// monolithic sparse file) for its UUIDs, without opening extents or parent.
pub fn descriptor_uuids(path: &Path) -> Result<VmdkUuids> {
    let file = open_read_only(path)?;
    let file_len = file_length(&file, path)?;
    let mut magic = [0u8; 4];
    let have = read_prefix(&file, &mut magic).map_err(|e| Error::read(&name(path), 0, e))?;
    if have == 4 && magic == COWD_MAGIC {
        return Err(Error::Unsupported(format!(
            "{}: COWD (ESX/legacy) sparse VMDK extents are not supported",
            path.display()
        )));
    }
    let descriptor = if have == 4 && magic == SPARSE_MAGIC {
        let header = read_sparse_header(&file, path, file_len)?;
        read_embedded_descriptor(&file, path, file_len, &header)?
    } else {
        read_text_descriptor(&file, path, file_len)?
    };
    Ok(VmdkUuids {
        image: descriptor.uuid,
        parent: descriptor.parent_uuid,
    })
}

/// Opens the parent a child names in `parentFileNameHint`. When that file
/// is not there (and parents are followed), a loaded media registry is
/// asked: by the child's `ddb.uuid.parent`, else for the parent of the
/// registry entry that is the child itself. A parent found through the
/// registry must carry the `ddb.uuid.image` the child's `ddb.uuid.parent`
/// names, when both are recorded.
fn open_hinted_parent(
    child: &Path,
    hint: &str,
    ids: VmdkUuids,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    let hinted = Path::new(hint);
    let resolved = if hinted.is_absolute() {
        hinted.to_path_buf()
    } else {
        child
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(hinted)
    };
    if !options.follow_parent_paths || resolved.exists() {
        return open_parent(child, hint, options, depth);
    }
    let Some(path) = media_registry::registry_parent(child, ids.parent, ids.image) else {
        return open_parent(child, hint, options, depth).map_err(|e| match e {
            Error::Open(text) => Error::Open(format!(
                "{text}; no loaded media registry names the parent{}",
                ids.parent.map_or_else(
                    || " of this image".to_string(),
                    |u| format!(" UUID {}", media_registry::uuid_text(&u))
                )
            )),
            other => other,
        });
    };
    let parent = open_parent_at_path(child, &path, options, depth)?;
    if let (Some(wanted), Some(found)) = (ids.parent, parent.uuid()) {
        if wanted != found {
            return Err(Error::SourceMismatch(format!(
                "{}: the media registry names '{}' as parent {}, but that image's \
                 ddb.uuid.image is {}",
                child.display(),
                path.display(),
                media_registry::uuid_text(&wanted),
                media_registry::uuid_text(&found)
            )));
        }
    }
    Ok(parent)
}

/// Parses descriptor text. Unknown keys and lines are ignored, as VMware's
/// own readers do; extent lines must be well formed.
fn parse_descriptor(text: &[u8], path: &Path) -> Result<Descriptor> {
    let text = String::from_utf8_lossy(text);
    let mut descriptor = Descriptor::default();
    for (number, raw_line) in text.lines().enumerate() {
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if ["RW", "RDONLY", "NOACCESS"]
            .iter()
            .any(|a| first.eq_ignore_ascii_case(a))
        {
            let extent = parse_extent_line(line).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}: descriptor line {}: malformed extent line '{line}'",
                    path.display(),
                    number + 1
                ))
            })?;
            if descriptor.extents.len() >= MAX_EXTENTS {
                return Err(Error::Unsupported(format!(
                    "{}: VMDK descriptor lists more than {MAX_EXTENTS} extents",
                    path.display()
                )));
            }
            descriptor.extents.push(extent);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        if key.eq_ignore_ascii_case("createType") {
            descriptor.create_type = Some(value.to_string());
        } else if key.eq_ignore_ascii_case("parentFileNameHint") && !value.is_empty() {
            descriptor.parent_hint = Some(value.to_string());
        } else if key.eq_ignore_ascii_case("ddb.uuid.image") {
            descriptor.uuid = parse_uuid(value);
        } else if key.eq_ignore_ascii_case("ddb.uuid.parent") {
            descriptor.parent_uuid = parse_uuid(value).filter(|u| *u != [0u8; 16]);
        }
    }
    Ok(descriptor)
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; the file name may hold spaces.
fn parse_extent_line(line: &str) -> Option<ExtentLine> {
    let mut rest = line;
    let mut word = || -> Option<&str> {
        let trimmed = rest.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let (w, r) = trimmed.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    let access = word()?.to_string();
    let sectors = word()?.parse::<u64>().ok()?;
    let kind = word()?.to_string();
    let tail = rest.trim();
    let (file, offset) = if tail.is_empty() {
        (None, 0)
    } else {
        let quoted = tail.strip_prefix('"')?;
        let close = quoted.find('"')?;
        let file = quoted[..close].to_string();
        let after = quoted[close + 1..].trim();
        let offset = if after.is_empty() {
            0
        } else {
            after.parse::<u64>().ok()?
        };
        (Some(file), offset)
    };
    Some(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

/// Accepts both `xxxxxxxx-xxxx-...` and VMware's `xx xx ... xx-xx ...`
/// spellings: 32 hex digits once spaces and dashes are dropped.
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'-')
        .collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

fn parse_sparse_header(raw: &[u8; SECTOR_SIZE]) -> SparseHeader {
    SparseHeader {
        flags: LittleEndian::read_u32(&raw[8..]),
        capacity: LittleEndian::read_u64(&raw[12..]),
        grain_sectors: LittleEndian::read_u64(&raw[20..]),
        descriptor_sector: LittleEndian::read_u64(&raw[28..]),
        descriptor_sectors: LittleEndian::read_u64(&raw[36..]),
        gtes_per_gt: LittleEndian::read_u32(&raw[44..]),
        gd_sector: LittleEndian::read_u64(&raw[56..]),
        compression: LittleEndian::read_u16(&raw[77..]),
    }
}

/// Reads a sparse extent header, taking the footer copy when the header
/// defers the grain directory to the end of a stream-optimized file.
fn read_sparse_header(file: &File, path: &Path, file_len: u64) -> Result<SparseHeader> {
    let corrupt = |what: String| {
        Error::Corrupt(format!(
            "{}: VMDK sparse extent header: {what}",
            path.display()
        ))
    };
    let mut raw = [0u8; SECTOR_SIZE];
    if file_len < SECTOR_BYTES {
        return Err(corrupt(format!("file is only {file_len} bytes long")));
    }
    file.read_exact_at(&mut raw, 0)
        .map_err(|e| Error::read(&format!("{} header", name(path)), 0, e))?;
    if raw[..4] != SPARSE_MAGIC {
        return Err(corrupt("bad magic at byte offset 0".into()));
    }
    let version = LittleEndian::read_u32(&raw[4..]);
    if !(1..=3).contains(&version) {
        return Err(Error::Unsupported(format!(
            "{}: VMDK sparse extent version {version} (only 1 to 3 are read)",
            path.display()
        )));
    }
    let mut header = parse_sparse_header(&raw);
    if header.gd_sector == GD_AT_END {
        // Stream-optimized layout: footer, footer marker payload... the
        // footer header sits 1024 bytes before the end of the file.
        let footer_at = file_len
            .checked_sub(2 * SECTOR_BYTES)
            .filter(|at| *at >= SECTOR_BYTES)
            .ok_or_else(|| {
                corrupt("grain directory is at the end but there is no footer".into())
            })?;
        let mut footer = [0u8; SECTOR_SIZE];
        file.read_exact_at(&mut footer, footer_at)
            .map_err(|e| Error::read(&format!("{} footer", name(path)), footer_at, e))?;
        if footer[..4] != SPARSE_MAGIC {
            return Err(corrupt(format!(
                "footer at byte offset {footer_at} has a bad magic"
            )));
        }
        header = parse_sparse_header(&footer);
        if header.gd_sector == GD_AT_END {
            return Err(corrupt(format!(
                "footer at byte offset {footer_at} does not locate the grain directory"
            )));
        }
    }
    validate_sparse_header(&header, file_len).map_err(corrupt)?;
    if header.flags & FLAG_COMPRESSED != 0 && header.compression != COMPRESSION_DEFLATE {
        return Err(Error::Unsupported(format!(
            "{}: VMDK grain compression algorithm {} (only deflate, 1)",
            path.display(),
            header.compression
        )));
    }
    Ok(header)
}

fn validate_sparse_header(h: &SparseHeader, file_len: u64) -> std::result::Result<(), String> {
    if h.grain_sectors == 0
        || !h.grain_sectors.is_power_of_two()
        || h.grain_sectors > MAX_GRAIN_SECTORS
    {
        return Err(format!(
            "grain size of {} sectors (byte offset 20) is not a power of two up to {MAX_GRAIN_SECTORS}",
            h.grain_sectors
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(format!(
            "{} grain table entries per table (byte offset 44); expected 1..={MAX_GTES_PER_GT}",
            h.gtes_per_gt
        ));
    }
    if h.capacity.checked_mul(SECTOR_BYTES).is_none() {
        return Err(format!("capacity of {} sectors is absurd", h.capacity));
    }
    let table_span = h.grain_sectors * u64::from(h.gtes_per_gt);
    let directory_bytes = h.capacity.div_ceil(table_span) * 4;
    let fits = h
        .gd_sector
        .checked_mul(SECTOR_BYTES)
        .and_then(|start| start.checked_add(directory_bytes))
        .is_some_and(|end| end <= file_len);
    if h.gd_sector == 0 || !fits {
        return Err(format!(
            "grain directory at sector {} ({directory_bytes} bytes) is not inside the {file_len}-byte file",
            h.gd_sector
        ));
    }
    Ok(())
}

impl SparseExtent {
    fn new(file: File, path: &Path, file_len: u64, header: SparseHeader) -> Result<SparseExtent> {
        let gtes_per_gt = u64::from(header.gtes_per_gt);
        let entries = header.capacity.div_ceil(header.grain_sectors * gtes_per_gt);
        // Bounded by the file size (checked in validate_sparse_header).
        let mut raw = vec![0u8; (entries * 4) as usize];
        let at = header.gd_sector * SECTOR_BYTES;
        file.read_exact_at(&mut raw, at)
            .map_err(|e| Error::read(&format!("{} grain directory", name(path)), at, e))?;
        let directory: Vec<u32> = raw.chunks_exact(4).map(LittleEndian::read_u32).collect();
        // Every grain table the directory names must lie inside the file, so
        // a damaged directory fails at open rather than mid-read.
        let table_bytes = gtes_per_gt * 4;
        for (index, table) in directory.iter().enumerate() {
            let table_at = u64::from(*table) * SECTOR_BYTES;
            if *table != 0 && table_at + table_bytes > file_len {
                return Err(Error::Corrupt(format!(
                    "{}: grain directory entry {index} (directory at byte offset {at}) points at a \
                     grain table at byte offset {table_at}, past the end of the {file_len}-byte file",
                    path.display()
                )));
            }
        }
        Ok(SparseExtent {
            file,
            path: path.to_path_buf(),
            file_len,
            capacity: header.capacity,
            grain_sectors: header.grain_sectors,
            gtes_per_gt,
            compressed: header.flags & FLAG_COMPRESSED != 0,
            markers: header.flags & FLAG_MARKERS != 0,
            directory,
            tables: TableCache::new(GT_CACHE_TABLES),
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// What holds local sector `sector`, and the end (exclusive, in
    /// sectors) of the region from it that is uniformly so: a whole table's
    /// span when the directory has no table, else the following grains of
    /// the same table that continue it, looking no further than `want_end`.
    fn lookup(&mut self, sector: u64, want_end: u64) -> Result<(Unit, u64)> {
        let grain = sector / self.grain_sectors;
        let table_index = grain / self.gtes_per_gt;
        let table_span = self.grain_sectors * self.gtes_per_gt;
        let table_sector = *self.directory.get(table_index as usize).ok_or_else(|| {
            Error::Internal(format!(
                "{}: sector {sector} past the grain directory",
                self.describe()
            ))
        })?;
        if table_sector == 0 {
            return Ok((Unit::Absent, (table_index + 1) * table_span));
        }
        let compressed = self.compressed;
        let grain_sectors = self.grain_sectors;
        let grain_bytes = grain_sectors * SECTOR_BYTES;
        let table_first_grain = table_index * self.gtes_per_gt;
        let classify = |entry: u32| match entry {
            0 => Unit::Absent,
            GRAIN_ZERO => Unit::Zero,
            at if compressed => Unit::Compressed(u64::from(at)),
            at => Unit::Data(u64::from(at) * SECTOR_BYTES),
        };
        let table = self.grain_table(table_index, table_sector)?;
        let within = (grain - table_first_grain) as usize;
        let first = classify(table[within]);
        let mut next = within + 1;
        if !matches!(first, Unit::Compressed(_)) {
            while next < table.len() && (table_first_grain + next as u64) * grain_sectors < want_end
            {
                let distance = (next - within) as u64 * grain_bytes;
                let continues = match (first, classify(table[next])) {
                    (Unit::Data(at), Unit::Data(next_at)) => next_at == at + distance,
                    (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                next += 1;
            }
        }
        let unit = match first {
            Unit::Data(at) => Unit::Data(at + (sector % grain_sectors) * SECTOR_BYTES),
            other => other,
        };
        Ok((unit, (table_first_grain + next as u64) * grain_sectors))
    }

    fn grain_table(&mut self, table_index: u64, table_sector: u32) -> Result<&[u32]> {
        if !self.tables.contains(table_index) {
            let at = u64::from(table_sector) * SECTOR_BYTES;
            let bytes = self.gtes_per_gt * 4;
            if at + bytes > self.file_len {
                return Err(Error::Corrupt(format!(
                    "{}: grain directory entry {table_index} points at a grain table at byte offset {at}, \
                     past the end of the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            let mut raw = vec![0u8; bytes as usize];
            self.file
                .read_exact_at(&mut raw, at)
                .map_err(|e| Error::read(&format!("{} grain table", self.describe()), at, e))?;
            self.tables.insert(
                table_index,
                raw.chunks_exact(4).map(LittleEndian::read_u32).collect(),
            );
        }
        self.tables
            .get(table_index)
            .ok_or_else(|| Error::Internal("grain table cache lost a table it just stored".into()))
    }

    /// Inflates the compressed grain that starts at local sector
    /// `grain_start` and whose data (or marker) is at sector `at`.
    fn inflate_grain(&self, at: u64, grain_start: u64) -> Result<Vec<u8>> {
        let grain_bytes = self.grain_sectors * SECTOR_BYTES;
        let offset = at * SECTOR_BYTES;
        let bad = |what: String| {
            Error::Corrupt(format!(
                "{}: compressed grain at byte offset {offset}: {what}",
                self.describe()
            ))
        };
        if offset >= self.file_len {
            return Err(bad(format!(
                "past the end of the {}-byte file",
                self.file_len
            )));
        }
        // A compressed grain never needs much more room than the grain
        // itself; anything longer is not a real stream.
        let max_stored = grain_bytes * 2 + SECTOR_BYTES;
        let (data_at, stored) = if self.markers {
            let mut marker = [0u8; MARKER_HEADER as usize];
            if offset + MARKER_HEADER > self.file_len {
                return Err(bad("grain marker is cut off by the end of the file".into()));
            }
            self.file.read_exact_at(&mut marker, offset).map_err(|e| {
                Error::read(&format!("{} grain marker", self.describe()), offset, e)
            })?;
            let lba = LittleEndian::read_u64(&marker[0..]);
            let size = u64::from(LittleEndian::read_u32(&marker[8..]));
            if lba != grain_start {
                return Err(bad(format!(
                    "marker names sector {lba}, but the grain table maps sector {grain_start} here"
                )));
            }
            if size == 0 || size > max_stored || offset + MARKER_HEADER + size > self.file_len {
                return Err(bad(format!(
                    "marker declares an invalid size of {size} bytes"
                )));
            }
            (offset + MARKER_HEADER, size)
        } else {
            (offset, max_stored.min(self.file_len - offset))
        };
        let mut input = vec![0u8; stored as usize];
        self.file.read_exact_at(&mut input, data_at).map_err(|e| {
            Error::read(&format!("{} compressed grain", self.describe()), data_at, e)
        })?;
        // Only the part of the grain inside the extent has to be present.
        let needed = (self.capacity - grain_start).min(self.grain_sectors) * SECTOR_BYTES;
        let mut output = vec![0u8; grain_bytes as usize];
        inflate_exact(&input, &mut output[..needed as usize], true).map_err(bad)?;
        Ok(output)
    }
}

/// Reads file bytes for a data run; bytes past the end of the file read as
/// zeros, but a run that starts past the end is corruption.
fn read_extent_bytes(
    file: &File,
    path: &Path,
    len: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    if offset >= len {
        return Err(Error::Corrupt(format!(
            "{}: data at byte offset {offset} lies past the end of the {len}-byte file",
            path.display()
        )));
    }
    let available = (len - offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(available);
    file.read_exact_at(head, offset)
        .map_err(|e| Error::read(&name(path), offset, e))?;
    tail.fill(0);
    Ok(())
}

/// Token layout for compressed grains: extent index in the high 32 bits,
/// the grain's sector in its file in the low 32 (grain table entries are
/// 32-bit, so it always fits).
fn grain_token(extent: usize, grain_sector: u64) -> u64 {
    ((extent as u64) << 32) | (grain_sector & 0xffff_ffff)
}

impl MappedImage for VmdkDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn map(&mut self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let index = self.extent_index(lba)?;
        let absent = self.absent_mapping();
        let extent = &mut self.extents[index];
        let local = lba - extent.start;
        let want_end = (local + count).min(extent.sectors);
        match &mut extent.kind {
            ExtentKind::Zero => Ok((Mapping::Zero, want_end - local)),
            ExtentKind::Flat(flat) => Ok((
                Mapping::Data {
                    file: index,
                    offset: flat.base + local * SECTOR_BYTES,
                },
                want_end - local,
            )),
            ExtentKind::Sparse(sparse) => {
                let (first, mut end) = sparse.lookup(local, want_end)?;
                while end < want_end && !matches!(first, Unit::Compressed(_)) {
                    let (next, next_end) = sparse.lookup(end, want_end)?;
                    let continues = match (first, next) {
                        (Unit::Data(at), Unit::Data(next_at)) => {
                            next_at == at + (end - local) * SECTOR_BYTES
                        }
                        (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                        _ => false,
                    };
                    if !continues {
                        break;
                    }
                    end = next_end;
                }
                let run = end.min(want_end) - local;
                let mapping = match first {
                    Unit::Data(offset) => Mapping::Data {
                        file: index,
                        offset,
                    },
                    Unit::Compressed(at) => Mapping::Encoded {
                        token: grain_token(index, at),
                    },
                    Unit::Zero => Mapping::Zero,
                    Unit::Absent => absent,
                };
                Ok((mapping, run.max(1)))
            }
        }
    }

    fn read_mapped(&mut self, mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { file, offset } => match &self.extents.get(file).map(|e| &e.kind) {
                Some(ExtentKind::Flat(flat)) => {
                    read_extent_bytes(&flat.file, &flat.path, flat.len, offset, buf)
                }
                Some(ExtentKind::Sparse(sparse)) => {
                    read_extent_bytes(&sparse.file, &sparse.path, sparse.file_len, offset, buf)
                }
                _ => Err(Error::Internal(format!("no data extent number {file}"))),
            },
            Mapping::Encoded { token } => {
                let index = (token >> 32) as usize;
                let at = token & 0xffff_ffff;
                let extent = self
                    .extents
                    .get(index)
                    .ok_or_else(|| Error::Internal(format!("no extent number {index}")))?;
                let ExtentKind::Sparse(sparse) = &extent.kind else {
                    return Err(Error::Internal(
                        "compressed run outside a sparse extent".into(),
                    ));
                };
                let local = lba - extent.start;
                let grain_start = local - local % sparse.grain_sectors;
                let cached = matches!(&self.last_inflated, Some((t, _)) if *t == token);
                if !cached {
                    let grain = sparse.inflate_grain(at, grain_start)?;
                    self.last_inflated = Some((token, grain));
                }
                let grain = match &self.last_inflated {
                    Some((_, grain)) => grain,
                    None => return Err(Error::Internal("inflated grain cache is empty".into())),
                };
                let from = ((local - grain_start) * SECTOR_BYTES) as usize;
                let slice = grain.get(from..from + buf.len()).ok_or_else(|| {
                    Error::Internal("compressed run crosses a grain boundary".into())
                })?;
                buf.copy_from_slice(slice);
                Ok(())
            }
            _ => Err(Error::Internal(format!(
                "read_mapped called for {mapping:?}"
            ))),
        }
    }

    fn parent(&mut self) -> Option<&mut (dyn Disk + 'static)> {
        self.parent.as_deref_mut()
    }
}

impl Disk for VmdkDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Vmdk
    }
    fn sector_count(&self) -> u64 {
        self.sectors
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.uuid
    }
    fn is_snapshot(&self) -> bool {
        self.parent_hint.is_some()
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
    fn extent_lines_parse_with_spaces_and_offsets() {
        let e = parse_extent_line(r#"RW 4194304 SPARSE "my disk-s001.vmdk""#).unwrap();
        assert_eq!(e.sectors, 4194304);
        assert_eq!(e.kind, "SPARSE");
        assert_eq!(e.file.as_deref(), Some("my disk-s001.vmdk"));
        let e = parse_extent_line(r#"RDONLY 20480 FLAT "f-flat.vmdk" 128"#).unwrap();
        assert_eq!(e.offset, 128);
        let e = parse_extent_line("RW 100 ZERO").unwrap();
        assert!(e.file.is_none());
        assert!(parse_extent_line("RW lots SPARSE \"x\"").is_none());
        assert!(parse_extent_line("RW 5 FLAT \"unterminated").is_none());
        assert!(parse_extent_line("RW 5 FLAT \"x\" notanumber").is_none());
    }

    #[test]
    fn uuids_in_both_spellings() {
        let a = parse_uuid("0123abcd-0000-1111-2222-333344445555").unwrap();
        let b = parse_uuid("01 23 ab cd 00 00 11 11-22 22 33 33 44 44 55 55").unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 0x01);
        assert!(parse_uuid("xyz").is_none());
    }

    #[test]
    fn descriptor_probe_needs_text() {
        assert!(looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(looks_like_descriptor(
            b"version=1\ncreateType=\"monolithicFlat\"\n"
        ));
        assert!(looks_like_descriptor(
            b"# Disk DescriptorFile\ncreateType=\"x\"\n\0\0"
        ));
        assert!(!looks_like_descriptor(b"# Disk DescriptorFile\n\0\x01"));
        assert!(!looks_like_descriptor(b"hello world"));
    }

    #[test]
    fn escaping_extent_names_need_the_flag() {
        let folder = Path::new("/images");
        let desc = Path::new("/images/d.vmdk");
        let off = OpenOptions::default();
        let on = OpenOptions {
            follow_parent_paths: true,
        };
        assert!(resolve_extent_path(folder, "d-flat.vmdk", desc, &off).is_ok());
        assert!(resolve_extent_path(folder, "sub/d-flat.vmdk", desc, &off).is_ok());
        assert!(resolve_extent_path(folder, "../etc/passwd", desc, &off).is_err());
        assert!(resolve_extent_path(folder, "/dev/sda", desc, &off).is_err());
        assert_eq!(
            resolve_extent_path(folder, "/dev/sda", desc, &on).unwrap(),
            PathBuf::from("/dev/sda")
        );
    }
}
