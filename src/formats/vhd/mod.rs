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

mod bat;
mod footer;
mod locator;
pub mod writer;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::guid::hex;
use super::mapped::{self, MappedImage, Mapping};
use super::{media_registry, open_parent, open_parent_at_path, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, ErrorCode, Result};

use bat::SparseLayout;
use footer::{
    read_footer, Footer, DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, FOOTER_BYTES,
    FOOTER_COOKIE,
};

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
    file: crate::file_io::SourceFile,
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
            return Err(Error::invalid_argument(format!(
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
            found => Err(Error::source_mismatch(format!(
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
            .map_err(|e| Error::open(e.to_string()).with_path(path))?
            .len();
        let name = path.display().to_string();
        if file_len < FOOTER_BYTES {
            return Err(Error::corrupt(format!(
                "{name}: {file_len} bytes is too short for a VHD footer"
            )));
        }
        let footer = read_footer(&file, &name, file_len)?;
        if footer.current_size % SECTOR_BYTES != 0 {
            return Err(Error::unsupported(format!(
                "{name}: VHD size {} is not a whole number of sectors",
                footer.current_size
            )));
        }
        let mut disk = VhdDisk {
            file: file.into(),
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
                    return Err(Error::corrupt(format!(
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
                return Err(Error::unsupported(format!(
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
        return open_parent(child, &names[0], options, depth).map_err(|e| match e.kind() {
            ErrorCode::Open => e.with_detail(&format!(
                "; no loaded media registry names the parent's unique id {}",
                media_registry::uuid_text(&key)
            )),
            _ => e,
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
        .map_err(|e| Error::open(format!("{name}: {e}")))?
        .len();
    if file_len < FOOTER_BYTES {
        return Err(Error::corrupt(format!(
            "{name}: {file_len} bytes is too short for a VHD footer"
        )));
    }
    Ok(read_footer(&file, &name, file_len)?.unique_id)
}

impl MappedImage for VhdDisk {
    fn sectors(&self) -> u64 {
        self.footer.current_size / SECTOR_BYTES
    }

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
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

    fn read_mapped(&self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.read_exact("data", offset, buf),
            other => Err(Error::internal(format!(
                "VHD asked to read a {other:?} run"
            ))),
        }
    }

    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.parent.as_deref()
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
