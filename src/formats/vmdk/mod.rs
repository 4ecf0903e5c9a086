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

mod descriptor;
mod extent;
mod sparse;
pub mod writer;

pub use descriptor::{descriptor_uuids, VmdkUuids};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::mapped::{self, MappedImage, Mapping};
use super::table_cache::LastDecoded;

use self::descriptor::{
    looks_like_descriptor, read_embedded_descriptor, read_text_descriptor, Descriptor,
};
use self::extent::{open_extent, read_extent_bytes, Extent, ExtentKind};
use self::sparse::{read_sparse_header, SparseExtent, Unit, COWD_MAGIC, SPARSE_MAGIC};
use super::{media_registry, open_parent, open_parent_at_path, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, ErrorCode, Result};

/// Each extent holds an open file; cap how many a descriptor may list.
pub(super) const MAX_EXTENTS: usize = 4096;
/// How many bytes the probe looks at for a text descriptor.
pub(super) const PROBE_BYTES: usize = 4096;

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

pub(super) fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(VmdkDisk::open_at_depth(path, options, depth)?))
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
    last_inflated: LastDecoded,
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
            return Err(Error::invalid_argument(format!(
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
            return Err(Error::unsupported(format!(
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
        let sparse = SparseExtent::new(file.into(), path, file_len, header)?;
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
            last_inflated: LastDecoded::default(),
        })
    }

    fn open_from_descriptor(
        descriptor: Descriptor,
        path: &Path,
        options: &OpenOptions,
    ) -> Result<VmdkDisk> {
        if descriptor.extents.is_empty() {
            return Err(Error::corrupt(format!(
                "{}: VMDK descriptor lists no extents",
                path.display()
            )));
        }
        if descriptor.extents.len() > MAX_EXTENTS {
            return Err(Error::unsupported(format!(
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
                    Error::corrupt(format!(
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
            last_inflated: LastDecoded::default(),
        })
    }

    /// The index of the extent holding virtual sector `lba`.
    fn extent_index(&self, lba: u64) -> Result<usize> {
        let index = self.extents.partition_point(|e| e.start + e.sectors <= lba);
        if index < self.extents.len() {
            Ok(index)
        } else {
            Err(Error::internal(format!(
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

pub(super) fn name(path: &Path) -> String {
    path.display().to_string()
}

pub(super) fn file_length(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::open(e.to_string()).with_path(path))?;
    if !meta.is_file() {
        return Err(Error::open(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok(meta.len())
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
        return open_parent(child, hint, options, depth).map_err(|e| match e.kind() {
            ErrorCode::Open => e.with_detail(&format!(
                "; no loaded media registry names the parent{}",
                ids.parent.map_or_else(
                    || " of this image".to_string(),
                    |u| format!(" UUID {}", media_registry::uuid_text(&u))
                )
            )),
            _ => e,
        });
    };
    let parent = open_parent_at_path(child, &path, options, depth)?;
    if let (Some(wanted), Some(found)) = (ids.parent, parent.uuid()) {
        if wanted != found {
            return Err(Error::source_mismatch(format!(
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

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let index = self.extent_index(lba)?;
        let absent = self.absent_mapping();
        let extent = &self.extents[index];
        let local = lba - extent.start;
        let want_end = (local + count).min(extent.sectors);
        match &extent.kind {
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

    fn read_mapped(&self, mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { file, offset } => match &self.extents.get(file).map(|e| &e.kind) {
                Some(ExtentKind::Flat(flat)) => {
                    read_extent_bytes(&flat.file, &flat.path, flat.len, offset, buf)
                }
                Some(ExtentKind::Sparse(sparse)) => {
                    read_extent_bytes(&sparse.file, &sparse.path, sparse.file_len, offset, buf)
                }
                _ => Err(Error::internal(format!("no data extent number {file}"))),
            },
            Mapping::Encoded { token } => {
                let index = (token >> 32) as usize;
                let at = token & 0xffff_ffff;
                let extent = self
                    .extents
                    .get(index)
                    .ok_or_else(|| Error::internal(format!("no extent number {index}")))?;
                let ExtentKind::Sparse(sparse) = &extent.kind else {
                    return Err(Error::internal(
                        "compressed run outside a sparse extent".into(),
                    ));
                };
                let local = lba - extent.start;
                let grain_start = local - local % sparse.grain_sectors;
                let grain = match self.last_inflated.get(token) {
                    Some(grain) => grain,
                    None => self
                        .last_inflated
                        .put(token, sparse.inflate_grain(at, grain_start)?),
                };
                let from = ((local - grain_start) * SECTOR_BYTES) as usize;
                let slice = grain.get(from..from + buf.len()).ok_or_else(|| {
                    Error::internal("compressed run crosses a grain boundary".into())
                })?;
                buf.copy_from_slice(slice);
                Ok(())
            }
            _ => Err(Error::internal(format!(
                "read_mapped called for {mapping:?}"
            ))),
        }
    }

    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.parent.as_deref()
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
