//! The built-in formats in the shape of the `COW_BACKEND` table: the safe
//! Rust side of the table, and the only place its u32 bits are made.
//!
//! Every format of the format registry ([`crate::formats::registry`]) is a
//! [`BackendInfo`]: its name, extensions and probe, capability bits derived
//! from what the registry says the format can do, and open and create with
//! the table's flags. An open image is an [`Image`]: the table's view of a
//! [`Disk`], adapted from the capability traits of [`crate::disk`]
//! ([`ImageFile`] and what it includes) or, for read-only formats, the
//! generic answers.
//!
//! `src/ffi/backend/` turns each [`BackendInfo`] into a `COW_BACKEND`
//! table, keeps the registry of tables (built-in and caller-registered),
//! and adapts a caller's C table into a [`Disk`].

use std::path::{Path, PathBuf};

use crate::disk::{Disk, DriveType, ImageFile, ImageMetadata, SectorStatus};
use crate::error::{Error, Result};
use crate::formats::{self, CreateParams, FormatId, ImageOpenOptions, OpenOptions};

/// Backend capability bits (`COW_CAP_*`, defined in [`crate::numbers`]).
pub mod caps {
    use crate::numbers::caps::names as c;
    pub const CREATE_FIXED: u64 = c::COW_CAP_CREATE_FIXED;
    pub const CREATE_DYNAMIC: u64 = c::COW_CAP_CREATE_DYNAMIC;
    pub const FILE: u64 = c::COW_CAP_FILE;
    pub const DIFF: u64 = c::COW_CAP_DIFF;
    pub const DISCARD: u64 = c::COW_CAP_DISCARD;
    pub const WRITE: u64 = c::COW_CAP_WRITE;
    /// Every bit this version knows.
    pub const ALL: u64 = CREATE_FIXED | CREATE_DYNAMIC | FILE | DIFF | DISCARD | WRITE;
}

/// Open flags of a backend (`COW_OPEN_*`, defined in [`crate::numbers`]).
pub mod open_flags {
    use crate::numbers::open_flags::names as c;
    pub const FOLLOW_PARENTS: u32 = c::COW_OPEN_FOLLOW_PARENTS;
    pub const READ_WRITE: u32 = c::COW_OPEN_READ_WRITE;
    pub const REPAIR: u32 = c::COW_OPEN_REPAIR;
    /// Every bit a backend's open knows (COW_OPEN_READ_ONLY is the overlay
    /// store's, not a backend's).
    pub const ALL: u32 = FOLLOW_PARENTS | READ_WRITE | REPAIR;
}

/// Image flags (`COW_IMAGE_*`, defined in [`crate::numbers`]).
pub mod image_flags {
    use crate::numbers::image_flags::names as c;
    pub const FIXED: u32 = c::COW_IMAGE_FIXED;
    pub const DIFF: u32 = c::COW_IMAGE_DIFF;
}

/// An open image as the backend table sees it: a disk that may also be
/// written, with its metadata ([`ImageMetadata`]: version, comment, UUIDs)
/// and the table's flags. The defaults are a read-only format's answers.
pub trait Image: Disk + ImageMetadata {
    /// Writes whole sectors at `lba`.
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        let _ = (lba, data);
        Err(Error::read_only("this image is open read-only".into()))
    }

    /// Makes every acknowledged write durable.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Drops `count` sectors from `lba` out of the image: they no longer
    /// are held here (they read as the backing, or as unallocated zeros).
    fn discard_sectors(&mut self, lba: u64, count: u64) -> Result<()> {
        let _ = (lba, count);
        Err(Error::unsupported(
            "this format cannot discard sectors".into(),
        ))
    }

    /// Whether the sectors from `lba` are held in this image file (true)
    /// or not (false: the "block free" answer), and for how many of the
    /// `count` sectors (at least 1 when `count > 0`) that holds.
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)> {
        default_held_run(self, lba, count)
    }

    /// The size of the image file in bytes.
    fn file_size(&self) -> u64 {
        0
    }

    /// `image_flags::*` of the image.
    fn image_flags(&self) -> u32 {
        0
    }

    /// `open_flags::*` the image was opened with.
    fn open_flags(&self) -> u32 {
        0
    }

    /// The image's file, for close-and-delete.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// A human-readable description of the image's metadata.
    fn dump(&self) -> String {
        format!(
            "{:?} image, {} sectors",
            self.drive_type(),
            self.sector_count()
        )
    }

    /// Closes the image cleanly (flushing what a writable image holds).
    fn close(self: Box<Self>) -> Result<()>;
}

/// The generic "held" answer for read-only formats: a sector is held when
/// its status is not `NotAlloc`. Walks at most 4096 sectors per call.
pub fn default_held_run<I: Image + ?Sized>(
    image: &mut I,
    lba: u64,
    count: u64,
) -> Result<(bool, u64)> {
    crate::disk::check_range(lba, count, image.sector_count())?;
    if count == 0 {
        return Ok((false, 0));
    }
    let held = image.block_status(lba, 1)? != SectorStatus::NotAlloc;
    let limit = count.min(4096);
    let mut run = 1;
    while run < limit && (image.block_status(lba + run, 1)? != SectorStatus::NotAlloc) == held {
        run += 1;
    }
    Ok((held, run))
}

/// A read-only format reader seen as an [`Image`].
pub struct ReadOnlyImage {
    disk: Box<dyn Disk>,
    path: PathBuf,
    flags: u32,
}

impl Disk for ReadOnlyImage {
    fn drive_type(&self) -> crate::disk::DriveType {
        self.disk.drive_type()
    }
    fn sector_count(&self) -> u64 {
        self.disk.sector_count()
    }
    fn byte_size(&self) -> u64 {
        self.disk.byte_size()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.disk.uuid()
    }
    fn is_snapshot(&self) -> bool {
        self.disk.is_snapshot()
    }
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        self.disk.parent_uuid()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        self.disk.read_sectors(lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        self.disk.block_status(lba, count)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        self.disk.status_run(lba, count)
    }
}

impl ImageMetadata for ReadOnlyImage {
    /// A read-only format's version is not reported through the table.
    fn format_version(&self) -> u32 {
        0
    }
}

impl Image for ReadOnlyImage {
    fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
    fn open_flags(&self) -> u32 {
        self.flags
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// An image a format opened as an [`ImageFile`] (UML COW, VCI), seen as
/// an [`Image`]: its capabilities turned into the table's calls and bits.
struct FileImage(Box<dyn ImageFile>);

impl Disk for FileImage {
    fn drive_type(&self) -> DriveType {
        self.0.drive_type()
    }
    fn sector_count(&self) -> u64 {
        self.0.sector_count()
    }
    fn byte_size(&self) -> u64 {
        self.0.byte_size()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.0.uuid()
    }
    fn is_snapshot(&self) -> bool {
        self.0.is_snapshot()
    }
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        self.0.parent_uuid()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        self.0.read_sectors(lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        self.0.block_status(lba, count)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        self.0.status_run(lba, count)
    }
}

impl ImageMetadata for FileImage {
    fn format_version(&self) -> u32 {
        self.0.format_version()
    }
    fn is_fixed(&self) -> bool {
        self.0.is_fixed()
    }
    fn comment(&self) -> Result<String> {
        self.0.comment()
    }
    fn set_comment(&mut self, comment: &str) -> Result<()> {
        self.0.set_comment(comment)
    }
    fn set_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        self.0.set_uuid(uuid)
    }
    fn modification_uuid(&self) -> Option<[u8; 16]> {
        self.0.modification_uuid()
    }
    fn set_modification_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        self.0.set_modification_uuid(uuid)
    }
}

impl Image for FileImage {
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        self.0.write_sectors(lba, data)
    }
    fn flush(&mut self) -> Result<()> {
        self.0.flush()
    }
    fn discard_sectors(&mut self, lba: u64, count: u64) -> Result<()> {
        match self.0.as_discard() {
            Some(disk) => disk.discard_sectors(lba, count),
            None => Err(Error::unsupported(
                "this format cannot discard sectors".into(),
            )),
        }
    }
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)> {
        self.0.held_run(lba, count)
    }
    fn file_size(&self) -> u64 {
        self.0.file_size()
    }
    fn image_flags(&self) -> u32 {
        let mut bits = 0;
        if self.0.is_fixed() {
            bits |= image_flags::FIXED;
        }
        if self.0.is_snapshot() {
            bits |= image_flags::DIFF;
        }
        bits
    }
    fn open_flags(&self) -> u32 {
        let mut bits = 0;
        if self.0.is_writable() {
            bits |= open_flags::READ_WRITE;
        }
        if self.0.has_backing() {
            bits |= open_flags::FOLLOW_PARENTS;
        }
        bits
    }
    fn path(&self) -> Option<&Path> {
        Some(self.0.path())
    }
    fn dump(&self) -> String {
        self.0.dump()
    }
    fn close(self: Box<Self>) -> Result<()> {
        self.0.close()
    }
}

/// A built-in backend: a format of the format registry.
#[derive(Clone, Copy)]
pub struct BackendInfo {
    format: FormatId,
}

impl BackendInfo {
    /// The format this backend serves.
    pub fn format(&self) -> FormatId {
        self.format
    }

    /// Short lowercase name ("raw", "vdi", "cow", "vci", ...).
    pub fn name(&self) -> &'static str {
        self.format.name()
    }

    /// `caps::*` bits, from what the registry says the format can do.
    pub fn caps(&self) -> u64 {
        let info = self.format.info();
        let mut bits = caps::FILE;
        if info.open_image.is_some() {
            bits |= caps::WRITE;
        }
        if info.create.is_some() {
            bits |= caps::CREATE_FIXED | caps::CREATE_DYNAMIC;
        }
        if info.discards {
            bits |= caps::DISCARD;
        }
        if info.differencing {
            bits |= caps::DIFF;
        }
        bits
    }

    /// File name extensions, without the dot.
    pub fn extensions(&self) -> &'static [&'static str] {
        self.format.info().extensions
    }

    /// True when the file looks like this format. Never fails loudly.
    pub fn probe(&self, path: &Path) -> bool {
        self.format.info().probe_path(path)
    }

    /// Opens an image with `open_flags::*`.
    pub fn open(&self, path: &Path, flags: u32) -> Result<Box<dyn Image>> {
        if flags & !open_flags::ALL != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown open flags {:#x}",
                flags & !open_flags::ALL
            )));
        }
        let follow = flags & open_flags::FOLLOW_PARENTS != 0;
        let writable = flags & open_flags::READ_WRITE != 0;
        let info = self.format.info();
        match info.open_image {
            Some(open_image) => {
                let options = ImageOpenOptions {
                    writable,
                    follow_backing: follow,
                    repair: flags & open_flags::REPAIR != 0,
                };
                Ok(Box::new(FileImage(open_image(path, &options)?)))
            }
            None => {
                if writable {
                    return Err(Error::read_only(format!(
                        "the {} backend reads source images only",
                        info.name
                    )));
                }
                let options = OpenOptions {
                    follow_parent_paths: follow,
                };
                Ok(Box::new(ReadOnlyImage {
                    disk: (info.open_at_depth)(path, &options, 0)?,
                    path: path.to_path_buf(),
                    flags,
                }))
            }
        }
    }

    /// Creates an image (opened for writing), for backends that can.
    pub fn create(&self, path: &Path, params: &CreateParams) -> Result<Box<dyn Image>> {
        match (self.format.info().create, self.format) {
            (Some(create), _) => Ok(Box::new(FileImage(create(path, params)?))),
            (None, FormatId::UmlCow) => Err(Error::unsupported(
                "a UML COW file is created over a backing file: use COW_UmlCowCreate".into(),
            )),
            (None, other) => Err(Error::unsupported(format!(
                "the {} backend cannot create images",
                other.name()
            ))),
        }
    }
}

/// The built-in backends in probe order (the format registry's order;
/// `raw`, which accepts anything, last).
pub fn builtin_backends() -> Vec<BackendInfo> {
    formats::builtin_formats()
        .iter()
        .map(|info| BackendInfo { format: info.id })
        .collect()
}

/// The built-in backend called `name`.
pub fn find_builtin(name: &str) -> Option<BackendInfo> {
    FormatId::from_name(name).map(|format| BackendInfo { format })
}
