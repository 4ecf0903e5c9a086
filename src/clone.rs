//! Writing any [`Disk`] to a new image file: the clone writer.
//!
//! The disk is read in pages of [`PAGE_SECTORS`] sectors (1 MiB). A page
//! whose status is `NotAlloc` or `Blank`, or whose bytes are all zeros, is
//! not stored: in a raw clone it stays a hole (the file is sparse), in a VDI
//! clone its block is left unallocated. Everything else is copied.
//!
//! The finish is atomic: the image is written to a temporary file in the
//! destination's folder and renamed to the destination only once it is
//! complete and synced. A clone that fails or is cancelled removes its
//! temporary file and leaves nothing at the destination.
//!
//! # VDI facts relied on (for the writer)
//!
//! The layout read by [`crate::formats::vdi`] (see its module doc): a
//! 64-byte text, the signature `0xBEDA107F` at 0x40, version 1.1 at 0x44, a
//! header of 0x190 bytes from 0x48 (type at 0x4C: 1 = dynamic), the block
//! map and data offsets at 0x154/0x158, the legacy geometry's sector size
//! at 0x168 (512), the disk size at 0x170, the block size at 0x178, extra
//! bytes per block at 0x17C (0), the block count at 0x180, the allocated
//! block count at 0x184, then the image, modification, link and parent
//! UUIDs (0x188, 0x198, 0x1A8, 0x1B8; the last two zero for an image without
//! a parent), and the LCHS geometry at 0x1C8 (zero: let the reader choose).
//! The block map holds one u32 per block: its index in the data area, or
//! `0xFFFFFFFF` for a block that was never written (reads as zeros).

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};
use crate::formats::raw::RawWriter;
use crate::formats::vdi::writer::VdiWriter;
use crate::formats::vhdx::writer::VhdxWriter;
use crate::formats::vmdk::writer::{VmdkVariant, VmdkWriter};
use crate::formats::writer::ImageWriter;
use crate::formats::FormatId;

/// Sectors per page read and per VDI block (1 MiB).
pub const PAGE_SECTORS: u64 = 2048;
const PAGE_BYTES: u64 = PAGE_SECTORS * SECTOR_BYTES;

/// The image formats the clone writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneFormat {
    /// A flat image, sparse where the disk is unallocated or zero.
    Raw,
    /// A dynamic VirtualBox VDI image with 1 MiB blocks; unallocated and
    /// zero blocks are not stored.
    Vdi,
    /// A dynamic Hyper-V VHDX image (1 MiB blocks up to 4 TiB); blocks no
    /// data reached are in the zero state.
    Vhdx,
    /// A VMware monolithicSparse VMDK (one file, 64 KiB grains); only
    /// grains with data are stored.
    VmdkSparse,
    /// A VMware streamOptimized VMDK, as OVA packages hold: deflated grains
    /// with markers, the grain directory in the footer.
    VmdkStream,
}

impl CloneFormat {
    /// Every writable format.
    pub const ALL: [CloneFormat; 5] = [
        CloneFormat::Raw,
        CloneFormat::Vdi,
        CloneFormat::Vhdx,
        CloneFormat::VmdkSparse,
        CloneFormat::VmdkStream,
    ];

    /// The format in the format registry.
    pub fn format(self) -> FormatId {
        match self {
            CloneFormat::Raw => FormatId::Raw,
            CloneFormat::Vdi => FormatId::Vdi,
            CloneFormat::Vhdx => FormatId::Vhdx,
            CloneFormat::VmdkSparse | CloneFormat::VmdkStream => FormatId::Vmdk,
        }
    }

    /// The format's short name ("raw", "vdi").
    pub fn name(self) -> &'static str {
        self.format().name()
    }

    /// The format a destination file name suggests (`.vdi` → VDI, anything
    /// else raw), by the extensions of the format registry.
    pub fn from_path(path: &Path) -> CloneFormat {
        let Some(extension) = path.extension() else {
            return CloneFormat::Raw;
        };
        CloneFormat::ALL
            .into_iter()
            .find(|f| {
                f.format()
                    .info()
                    .extensions
                    .iter()
                    .any(|known| extension.eq_ignore_ascii_case(known))
            })
            .unwrap_or(CloneFormat::Raw)
    }
}

/// How to clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneOptions {
    /// The destination's format.
    pub format: CloneFormat,
    /// Replace an existing destination file (otherwise its existence is an
    /// error and it is left alone).
    pub replace: bool,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            format: CloneFormat::Raw,
            replace: false,
        }
    }
}

/// What a clone wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CloneStats {
    /// The virtual size of the clone in bytes.
    pub virtual_bytes: u64,
    /// Pages (1 MiB) whose data was written.
    pub pages_written: u64,
    /// Pages left out: unallocated, blank, or all zeros.
    pub pages_skipped: u64,
}

/// Progress reporting: called with a percentage (0 to 100, never going
/// down, each value at most once); returning `false` cancels the clone.
pub trait Progress {
    fn update(&mut self, percent: u32) -> bool;
}

impl<F: FnMut(u32) -> bool> Progress for F {
    fn update(&mut self, percent: u32) -> bool {
        self(percent)
    }
}

/// No progress reporting.
pub fn no_progress() -> impl Progress {
    |_: u32| true
}

/// Calls a [`Progress`] only when the percentage grows.
struct Tracker<'a> {
    progress: &'a mut dyn Progress,
    total: u64,
    last: Option<u32>,
}

impl Tracker<'_> {
    fn report(&mut self, done: u64) -> Result<()> {
        let percent = if self.total == 0 {
            100
        } else {
            (u128::from(done) * 100 / u128::from(self.total)) as u32
        };
        if self.last.is_some_and(|l| l >= percent) {
            return Ok(());
        }
        self.last = Some(percent);
        if self.progress.update(percent) {
            Ok(())
        } else {
            Err(Error::cancelled(format!(
                "the progress callback stopped the operation at {percent}%"
            )))
        }
    }
}

/// True when every byte is zero (written so the compiler vectorises it).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// One page of the disk: its first sector and length in sectors.
fn pages(sectors: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..sectors.div_ceil(PAGE_SECTORS)).map(move |i| {
        let start = i * PAGE_SECTORS;
        (start, PAGE_SECTORS.min(sectors - start))
    })
}

/// Reads one page into `buf` (resized to it) and tells whether it holds
/// data worth storing.
fn read_page(disk: &mut dyn Disk, start: u64, len: u64, buf: &mut Vec<u8>) -> Result<bool> {
    match disk.block_status(start, len)? {
        SectorStatus::NotAlloc | SectorStatus::Blank => return Ok(false),
        SectorStatus::Normal => {}
    }
    buf.resize((len * SECTOR_BYTES) as usize, 0);
    let status = disk.read_sectors(start, buf)?;
    Ok(status == SectorStatus::Normal && !is_zero(buf))
}

/// Writes `disk` to a new image at `path`. The result is complete and
/// durable when this returns `Ok`; on any error (including cancellation by
/// `progress`) nothing is left at `path` (an existing file there is kept
/// unless the clone succeeded with `options.replace`).
pub fn clone_to_file(
    disk: &mut dyn Disk,
    path: &Path,
    options: &CloneOptions,
    progress: &mut dyn Progress,
) -> Result<CloneStats> {
    let what = path.display().to_string();
    if !options.replace && path.symlink_metadata().is_ok() {
        return Err(Error::open(format!(
            "{what}: already exists (not replacing it)"
        )));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{what}: not a file name")))?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(&folder)
        .map_err(|e| Error::open(format!("{what}: cannot create a file in its folder: {e}")))?;
    let mut tracker = Tracker {
        progress,
        total: disk.sector_count(),
        last: None,
    };
    tracker.report(0)?;
    let file = temp.as_file();
    let mut writer = writer_for(options.format, disk.byte_size(), &what)?;
    let stats = write_pages(disk, file, writer.as_mut(), &mut tracker)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::write(&what, 0, e))?;
    file.sync_all()
        .map_err(|e| Error::write(&format!("{what} (sync)"), 0, e))?;
    let persisted = if options.replace {
        temp.persist(path).map(|_| ())
    } else {
        temp.persist_noclobber(path).map(|_| ())
    };
    // On failure the PersistError still owns the temporary file and
    // removes it when dropped.
    persisted.map_err(|e| {
        Error::write_failed(format!(
            "{what}: cannot rename the finished clone into place: {}",
            e.error
        ))
    })?;
    // The new name is durable only once its folder is.
    crate::newfile::sync_folder(&folder)?;
    Ok(stats)
}

/// The writer for `format`, for a disk of `virtual_bytes`.
fn writer_for(format: CloneFormat, virtual_bytes: u64, what: &str) -> Result<Box<dyn ImageWriter>> {
    Ok(match format {
        CloneFormat::Raw => Box::new(RawWriter::new(virtual_bytes, what)),
        // VDI sizes are whole sectors: an odd-sized last sector reads as
        // zero-padded.
        CloneFormat::Vdi => Box::new(VdiWriter::new(
            virtual_bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES,
            PAGE_BYTES,
            what,
        )?),
        CloneFormat::Vhdx => Box::new(VhdxWriter::new(virtual_bytes, what)?),
        CloneFormat::VmdkSparse => Box::new(VmdkWriter::new(
            virtual_bytes,
            VmdkVariant::MonolithicSparse,
            what,
        )?),
        CloneFormat::VmdkStream => Box::new(VmdkWriter::new(
            virtual_bytes,
            VmdkVariant::StreamOptimized,
            what,
        )?),
    })
}

/// Streams the pages of `disk` that hold data into `writer`, then lets it
/// finish the image.
fn write_pages(
    disk: &mut dyn Disk,
    file: &File,
    writer: &mut dyn ImageWriter,
    tracker: &mut Tracker<'_>,
) -> Result<CloneStats> {
    let sectors = disk.sector_count();
    let mut stats = CloneStats {
        virtual_bytes: disk.byte_size(),
        ..CloneStats::default()
    };
    let mut buf = Vec::with_capacity(PAGE_BYTES as usize);
    for (start, len) in pages(sectors) {
        if read_page(disk, start, len, &mut buf)? {
            writer.write_data(file, start * SECTOR_BYTES, &buf)?;
            stats.pages_written += 1;
        } else {
            stats.pages_skipped += 1;
        }
        tracker.report(start + len)?;
    }
    writer.finish(file)?;
    Ok(stats)
}

/// Compares two disks byte for byte, page by page (skipping pages both
/// report as `NotAlloc`/`Blank`). Returns the first sector that differs, or
/// `None` when they are equal. Disks of different sizes differ at the
/// smaller size.
pub fn first_difference(
    a: &mut dyn Disk,
    b: &mut dyn Disk,
    progress: &mut dyn Progress,
) -> Result<Option<u64>> {
    let sectors = a.sector_count().min(b.sector_count());
    let mut tracker = Tracker {
        progress,
        total: sectors,
        last: None,
    };
    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
    for (start, len) in pages(sectors) {
        let data_a = read_page(a, start, len, &mut buf_a)?;
        let data_b = read_page(b, start, len, &mut buf_b)?;
        match (data_a, data_b) {
            (false, false) => {}
            (true, true) => {
                if buf_a != buf_b {
                    let at = buf_a
                        .chunks(SECTOR_BYTES as usize)
                        .zip(buf_b.chunks(SECTOR_BYTES as usize))
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    return Ok(Some(start + at as u64));
                }
            }
            // One side holds non-zero data, the other zeros.
            (true, false) | (false, true) => {
                let buf = if data_a { &buf_a } else { &buf_b };
                let at = buf
                    .chunks(SECTOR_BYTES as usize)
                    .position(|x| !is_zero(x))
                    .unwrap_or(0);
                return Ok(Some(start + at as u64));
            }
        }
        tracker.report(start + len)?;
    }
    if a.sector_count() != b.sector_count() {
        return Ok(Some(sectors));
    }
    Ok(None)
}

/// Bytes a file occupies on disk (its allocated blocks), for reports on
/// sparseness.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;

    fn disk_with(pages_with_data: &[u64], sectors: u64) -> MemDisk {
        let mut data = vec![0u8; (sectors * SECTOR_BYTES) as usize];
        let mut status = vec![SectorStatus::NotAlloc; sectors as usize];
        for &p in pages_with_data {
            let s = p * PAGE_SECTORS + 3;
            data[(s * SECTOR_BYTES) as usize] = 0xAB;
            status[s as usize] = SectorStatus::Normal;
        }
        MemDisk::new(data, status).unwrap()
    }

    #[test]
    fn cancelling_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let mut disk = disk_with(&[0, 1, 2, 3], 4 * PAGE_SECTORS);
        let mut seen = Vec::new();
        let err = clone_to_file(&mut disk, &path, &CloneOptions::default(), &mut |p: u32| {
            seen.push(p);
            p < 50
        })
        .unwrap_err();
        assert!(err.kind() == crate::error::ErrorCode::Cancelled, "{err}");
        assert_eq!(seen, vec![0, 25, 50]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_existing_destination_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        std::fs::write(&path, b"keep").unwrap();
        let mut disk = disk_with(&[0], PAGE_SECTORS);
        let err = clone_to_file(
            &mut disk,
            &path,
            &CloneOptions::default(),
            &mut no_progress(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn first_difference_finds_the_sector() {
        let mut a = disk_with(&[1], 3 * PAGE_SECTORS);
        let mut b = disk_with(&[1], 3 * PAGE_SECTORS);
        assert_eq!(
            first_difference(&mut a, &mut b, &mut no_progress()).unwrap(),
            None
        );
        let mut c = disk_with(&[1, 2], 3 * PAGE_SECTORS);
        assert_eq!(
            first_difference(&mut a, &mut c, &mut no_progress()).unwrap(),
            Some(2 * PAGE_SECTORS + 3)
        );
    }
}
