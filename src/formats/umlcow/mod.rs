//! User-Mode-Linux COW files (the `ubd` driver's copy-on-write layer, also
//! read by QEMU's old `cow` driver), read and written.
//!
//! # Format facts relied on
//!
//! A COW file starts with a header naming a backing file, then a bitmap with
//! one bit per COW sector (bit `n % 8` of byte `n / 8`, least significant
//! first; set = the sector's data is in this file), then the data area,
//! where COW sector `n` lives at `data offset + n * sector size` whether or
//! not it is set. Unset sectors read from the backing file. The magic is
//! `0x4F4F4F4D` ("OOOM" in big-endian bytes). Layouts, in the order of the
//! header's `version` field:
//!
//! * **v1**: packed; magic, version (u32 each), a 256-byte backing path,
//!   mtime (u32), size (u64), sector size (u32): 280 bytes. Fields are in
//!   the writing machine's byte order; we take the order the magic is in.
//!   The bitmap follows the header directly.
//! * **v2**, Linux layout: packed, big-endian; magic, version, a 4096-byte
//!   path, mtime (u32), size (u64), sector size (u32): 4120 bytes, bitmap
//!   right after.
//! * **v2**, QEMU's old driver: the same fields but a 1024-byte path and
//!   natural C alignment (4 bytes of padding after mtime): mtime at 1032,
//!   size at 1040, sector size at 1048, 1056 bytes in all; bitmap right
//!   after. QEMU writes mtime 0 when it has no backing file.
//! * For v1 and v2 the bitmap is `(size + ss - 1) / (8 * ss)` bytes (a
//!   historical rounding bug: sectors past a multiple of 8 may have no
//!   whole byte) and the data starts at the bitmap's end rounded up to the
//!   sector size. QEMU's driver instead uses `ceil(sectors / 8)` bytes.
//!   We read bits wherever they fall before the data area and treat the
//!   rest as unset; a sector whose bit would lie in the data area cannot be
//!   written.
//! * **v3** (what Linux and `uml_mkcow` write): packed, big-endian; magic,
//!   version, mtime (u32) at 8, size (u64) at 12, sector size at 20,
//!   alignment at 24, a format word (0 = bitmap) at 28 and a 4096-byte
//!   path at 32: 4128 bytes. The bitmap starts at the header size rounded
//!   up to the alignment, is `ceil(ceil(size / ss) / 8)` bytes, and the
//!   data starts at its end rounded up to the alignment.
//! * **"broken" v3**, written by old 64-bit builds that lacked the packed
//!   attribute: mtime took 8 bytes (its low-address 4 bytes hold the
//!   big-endian 32-bit value), size at 16, sector size at 24, alignment at
//!   28, format at 32, the path at 36; 4136 bytes with tail padding. It is
//!   recognised the way Linux does: in a proper v3 file the path starts
//!   at 32, and a path never starts with four zero bytes.
//!
//! Before using the backing file, Linux checks that its size equals the
//! header's size and its modification time (seconds) equals the header's
//! mtime; we do the same and refuse a mismatch with `SOURCE_MISMATCH`
//! (except QEMU-layout files with mtime 0, QEMU's "no mtime" marker).
//! The path in the header is followed only when the caller allows it; the
//! caller may instead supply the backing file.
//!
//! Writes put data in the data area and mark the bitmap in memory; a flush
//! makes the data durable (fdatasync) *before* it writes the changed bitmap
//! bytes and syncs again, so a crash never leaves a bit set over data that
//! is not on disk.

mod bitmap;
mod create;
mod header;

pub use create::CreateOptions;
pub use header::{has_magic, parse_header, Layout, UmlCowHeader, MAGIC};

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder, LittleEndian};

use self::header::HEADER_READ;
use super::mapped::{self, MappedImage, Mapping};
use super::open_read_only;
use super::raw::RawDisk;
use super::registry::ImageOpenOptions;
use crate::disk::{
    check_range, sectors_in, Disk, DriveType, ImageFile, ImageMetadata, SectorStatus, WritableDisk,
    SECTOR_BYTES, SECTOR_SIZE,
};
use crate::error::{Error, ErrorCode, Result};

/// Where the data of unchanged sectors comes from.
#[derive(Debug, Clone, Default)]
pub enum Backing {
    /// Nowhere: unchanged sectors read as unallocated zeros (for callers
    /// that read the backing themselves, as the backend table does).
    #[default]
    None,
    /// The path named in the header (a path inside a file: only when the
    /// caller allows it). Relative paths are taken from the COW file's
    /// folder.
    FollowHeader,
    /// This file, supplied by the caller (still checked for size/mtime).
    Path(PathBuf),
}

/// How to open a COW file.
#[derive(Debug, Clone, Default)]
pub struct UmlCowOptions {
    /// Open for writing.
    pub writable: bool,
    pub backing: Backing,
}

/// An open UML COW file.
pub struct UmlCow {
    file: File,
    path: PathBuf,
    header: UmlCowHeader,
    /// The bitmap area, `data_offset - bitmap_offset` bytes.
    bitmap: Vec<u8>,
    /// Range of bitmap bytes changed since the last flush.
    dirty: Option<(usize, usize)>,
    backing: Option<RawDisk>,
    writable: bool,
    /// Data written since the last flush.
    unsynced: bool,
}

/// True when `path` starts with the COW magic and a version we know.
pub fn probe_path(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => probe(&f),
        Err(_) => false,
    }
}

/// The format table's probe.
pub fn probe(file: &File) -> bool {
    let mut b = [0u8; 8];
    if file.read_exact_at(&mut b, 0).is_err() || !has_magic(&b) {
        return false;
    }
    let v = if BigEndian::read_u32(&b[0..]) == MAGIC {
        BigEndian::read_u32(&b[4..])
    } else {
        LittleEndian::read_u32(&b[4..])
    };
    (1..=3).contains(&v)
}

/// The format table's open: read-only, the backing path followed only
/// when the options allow it.
pub fn open_boxed(
    path: &Path,
    options: &super::OpenOptions,
    _depth: usize,
) -> Result<Box<dyn Disk>> {
    if !options.follow_parent_paths {
        // Same refusal (and message) as the other differencing formats.
        let cow = UmlCow::open(path, &UmlCowOptions::default())?;
        let named = String::from_utf8_lossy(&cow.header.backing_file).into_owned();
        return Err(match super::open_parent(path, &named, options, 0) {
            Err(e) => e,
            Ok(_) => Error::internal("backing path refused but not reported".into()),
        });
    }
    Ok(Box::new(UmlCow::open(
        path,
        &UmlCowOptions {
            writable: false,
            backing: Backing::FollowHeader,
        },
    )?))
}

/// The format table's image open: writable or read-only, the backing file
/// the header names opened only when asked.
pub fn open_image(path: &Path, options: &ImageOpenOptions) -> Result<Box<dyn ImageFile>> {
    Ok(Box::new(UmlCow::open(
        path,
        &UmlCowOptions {
            writable: options.writable,
            backing: if options.follow_backing {
                Backing::FollowHeader
            } else {
                Backing::None
            },
        },
    )?))
}

pub(super) fn mtime_secs(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
}

impl UmlCow {
    /// Opens a COW file. Its backing file (per `options.backing`) must have
    /// the size and mtime the header records.
    pub fn open(path: &Path, options: &UmlCowOptions) -> Result<UmlCow> {
        let file = if options.writable {
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::open(e.to_string()).with_path(path))?
        } else {
            open_read_only(path)?
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::open(e.to_string()).with_path(path))?
            .len();
        let mut head = vec![0u8; HEADER_READ.min(file_len as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::read(&path.display().to_string(), 0, e))?;
        let header = parse_header(&head, file_len)
            .map_err(|e| prefix_error(e, &path.display().to_string()))?;
        let mut bitmap = vec![0u8; header.bitmap_area() as usize];
        file.read_exact_at(&mut bitmap, header.bitmap_offset)
            .map_err(|e| Error::read("UML COW bitmap", header.bitmap_offset, e))?;
        let backing_path = match &options.backing {
            Backing::None => None,
            Backing::Path(p) => Some(p.clone()),
            Backing::FollowHeader => {
                let named = header.backing_path();
                Some(if named.is_absolute() {
                    named
                } else {
                    path.parent().unwrap_or_else(|| Path::new(".")).join(named)
                })
            }
        };
        let backing = match backing_path {
            None => None,
            Some(bp) => Some(open_backing(&bp, &header, path)?),
        };
        Ok(UmlCow {
            file,
            path: path.to_path_buf(),
            header,
            bitmap,
            dirty: None,
            backing,
            writable: options.writable,
            unsynced: false,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &UmlCowHeader {
        &self.header
    }

    /// Reads `buf.len()` bytes of the data area at disk byte `offset`,
    /// zero-filling past the disk's size.
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self
            .header
            .size
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        let at = self.header.data_offset + offset;
        crate::file_io::read_exact_at(&self.file, head, at)
            .map_err(|e| Error::read("UML COW data", at, e))
    }

    fn backing_read(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        match &mut self.backing {
            Some(b) => {
                let count = (buf.len() / SECTOR_SIZE) as u64;
                let inside = b.sector_count().saturating_sub(lba).min(count);
                let (head, tail) = buf.split_at_mut(inside as usize * SECTOR_SIZE);
                tail.fill(0);
                if inside == 0 {
                    return Ok(SectorStatus::NotAlloc);
                }
                b.read_sectors(lba, head)
            }
            None => {
                buf.fill(0);
                Ok(SectorStatus::NotAlloc)
            }
        }
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only(format!(
                "{} is open read-only",
                self.path.display()
            )));
        }
        Ok(())
    }
}

fn prefix_error(e: Error, path: &str) -> Error {
    match e.kind() {
        ErrorCode::Corrupt | ErrorCode::Unsupported => e.with_path(path),
        _ => e,
    }
}

/// `path` made absolute the way Linux does: its folder resolved, the name
/// kept.
pub(super) fn absolute_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("'{}' names no file", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir =
        std::fs::canonicalize(&dir).map_err(|e| Error::open(e.to_string()).with_path(&dir))?;
    Ok(dir.join(name))
}

/// Opens the backing file read-only after Linux's size and mtime checks.
fn open_backing(path: &Path, header: &UmlCowHeader, cow: &Path) -> Result<RawDisk> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::open(format!(
            "{}: backing file '{}': {e}",
            cow.display(),
            path.display()
        ))
    })?;
    if meta.len() != header.size {
        return Err(Error::source_mismatch(format!(
            "{}: backing file '{}' is {} bytes, the COW header says {} (size mismatch)",
            cow.display(),
            path.display(),
            meta.len(),
            header.size
        )));
    }
    let actual = mtime_secs(&meta);
    let skip = header.layout == Layout::V2Qemu && header.mtime == 0;
    if !skip && actual != header.mtime as i64 {
        return Err(Error::source_mismatch(format!(
            "{}: backing file '{}' was modified at {actual}, the COW header says {} \
             (mtime mismatch: the backing file changed after the COW file was made)",
            cow.display(),
            path.display(),
            header.mtime
        )));
    }
    RawDisk::open(path)
}

impl Disk for UmlCow {
    fn drive_type(&self) -> DriveType {
        DriveType::UmlCow
    }
    fn sector_count(&self) -> u64 {
        self.header.size.div_ceil(SECTOR_BYTES)
    }
    fn byte_size(&self) -> u64 {
        self.header.size
    }
    fn is_snapshot(&self) -> bool {
        true
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        mapped::read_sectors(self, lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        mapped::block_status(self, lba, count)
    }
    /// From the COW bitmap: set bits are data; clear ones take the backing
    /// file's runs (unallocated past its end, or without one).
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        mapped::status_run(self, lba, count)
    }
}

/// The COW bitmap as the shared read path's one question: a set bit's run
/// is data in this file, a clear bit's run reads from the backing file.
impl MappedImage for UmlCow {
    fn sectors(&self) -> u64 {
        self.sector_count()
    }
    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let (set, run) = self.bit_run(lba, count);
        let mapping = if set {
            Mapping::Data {
                file: 0,
                offset: self.header.data_offset + lba * SECTOR_BYTES,
            }
        } else {
            Mapping::Parent
        };
        Ok((mapping, run))
    }
    fn read_mapped(&self, _mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()> {
        // Past the disk's byte size (an odd-sized last sector) reads zeros.
        self.read_data(lba * SECTOR_BYTES, buf)
    }
    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.backing.as_ref().map(|b| b as &(dyn Disk + 'static))
    }
}

impl WritableDisk for UmlCow {
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let count = sectors_in(data.len())?;
        check_range(lba, count, self.sector_count())?;
        let ss = u64::from(self.header.sector_size);
        let start = lba * SECTOR_BYTES;
        let end = start + data.len() as u64;
        let mut pos = start;
        while pos < end {
            let cs = pos / ss;
            let cs_start = cs * ss;
            let cs_end = cs_start + ss;
            let upto = end.min(cs_end);
            let chunk = &data[(pos - start) as usize..(upto - start) as usize];
            if cs_end.min(self.header.size) <= cs_start {
                break; // past the disk's bytes (the zero-padded tail)
            }
            if (cs / 8) as usize >= self.bitmap.len() {
                // Refuse before writing anything for this sector.
                self.set_bit(cs)?;
            }
            if self.bit(cs) || (pos == cs_start && upto >= cs_end.min(self.header.size)) {
                write_clipped(&self.file, &self.header, pos, chunk)?;
            } else {
                // First write to a COW sector that only partly covers it:
                // the rest comes from what the disk showed before.
                if self.backing.is_none() {
                    return Err(Error::unsupported(format!(
                        "a first write to part of COW sector {cs} ({ss} bytes) needs the \
                         backing file to fill the rest; open with the backing file"
                    )));
                }
                let mut whole = vec![0u8; ss as usize];
                let first_lba = cs_start / SECTOR_BYTES;
                self.backing_read(first_lba, &mut whole)?;
                let off = (pos - cs_start) as usize;
                whole[off..off + chunk.len()].copy_from_slice(chunk);
                write_clipped(&self.file, &self.header, cs_start, &whole)?;
            }
            self.set_bit(cs)?;
            self.unsynced = true;
            pos = upto;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.sync()
    }
}

impl ImageMetadata for UmlCow {
    fn format_version(&self) -> u32 {
        self.header.version()
    }
}

impl ImageFile for UmlCow {
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Ok((false, 0));
        }
        Ok(self.bit_run(lba, count))
    }
    fn file_size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn has_backing(&self) -> bool {
        self.backing.is_some()
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn dump(&self) -> String {
        let set = self
            .bitmap
            .iter()
            .map(|b| b.count_ones() as u64)
            .sum::<u64>();
        format!(
            "UML COW {:?}: backing '{}', size {} bytes, mtime {}, sector size {}, alignment {}, \
             bitmap at {}, data at {}, {} COW sectors of {} written",
            self.header.layout,
            String::from_utf8_lossy(&self.header.backing_file),
            self.header.size,
            self.header.mtime,
            self.header.sector_size,
            self.header.alignment,
            self.header.bitmap_offset,
            self.header.data_offset,
            set,
            self.header.cow_sectors()
        )
    }
    fn close(mut self: Box<Self>) -> Result<()> {
        self.sync()
    }
}

/// Writes `data` at disk byte `pos`, dropping bytes past the disk's size.
fn write_clipped(file: &File, header: &UmlCowHeader, pos: u64, data: &[u8]) -> Result<()> {
    let inside = header.size.saturating_sub(pos).min(data.len() as u64) as usize;
    let at = header.data_offset + pos;
    file.write_all_at(&data[..inside], at)
        .map_err(|e| Error::write("UML COW data", at, e))
}

impl Drop for UmlCow {
    fn drop(&mut self) {
        // Best effort: close() reports errors; a plain drop cannot.
        let _ = self.sync();
    }
}

/// Fuzz entry point: treats `bytes` as a UML COW file (image only, no
/// backing) and exercises probe, header parsing, open and full reads. Any
/// outcome but a panic, hang or huge allocation is fine; returns whether
/// the open succeeded.
#[cfg(feature = "test-utils")]
pub fn fuzz_one(bytes: &[u8]) -> bool {
    let _ = parse_header(&bytes[..bytes.len().min(HEADER_READ)], bytes.len() as u64);
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let path = dir.path().join("fuzz.cow");
    if std::fs::write(&path, bytes).is_err() {
        return false;
    }
    let _ = probe_path(&path);
    match UmlCow::open(&path, &UmlCowOptions::default()) {
        Ok(mut img) => {
            let n = img.sector_count().min(4096);
            let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
            let _ = img.read_sectors(0, &mut buf);
            let _ = img.block_status(0, n);
            let _ = img.held_run(0, n);
            let _ = img.dump();
            true
        }
        Err(_) => false,
    }
}
