//! Writing any [`Disk`] to a new image file: the clone writer.
//!
//! The disk is read in pages of [`PAGE_SECTORS`] sectors (1 MiB). A page
//! whose status is `NotAlloc` or `Blank`, or whose bytes are all zeros, is
//! not stored; the others go, in increasing order, to the destination
//! format's [`ImageWriter`] (`formats/<format>/writer.rs`, next to each
//! reader and sharing its layout), which decides how a page not stored
//! reads back (a hole in a raw clone, an unallocated block or cluster, a
//! zero block in VHDX). [`clone_overlay_to_file`] can also write a qcow2
//! delta over the overlay's source.
//!
//! [`clone_to_file`] reads ahead of its writer: a scoped thread that
//! borrows the disk reads the pages in order and zero-detects them, and
//! hands them to the calling thread over a bounded channel
//! ([`READ_AHEAD_PAGES`] deep; the page buffers come back through a return
//! channel, so at most that many plus two exist; runs of pages not stored
//! go as one message); the calling thread writes them, reports progress
//! page by page and finishes the image. A third thread syncs the data
//! written so far every [`EARLY_SYNC_BYTES`], so the write-back runs during
//! the clone instead of all in its final sync. The reader stops at its
//! first error, which the writer returns once it has written every page
//! before it, as one thread would; it also stops when the writer does (an
//! error, a cancellation: the writer drops its end of the channel). A panic
//! in the reader is raised again on the calling thread.
//! [`clone_to_file_sequential`] is the same clone on one thread (for
//! measurement): both write the same bytes, count the same
//! [`CloneStats`], report the same progress and return the same errors.
//! The differencing clone (`write_delta`) stays on one thread: it reads
//! two disks per page and was not measured pipelined.
//!
//! The finish is atomic: the image is written to a temporary file in the
//! destination's folder and renamed to the destination only once it is
//! complete and synced. A clone that fails or is cancelled removes its
//! temporary file and leaves nothing at the destination. The format facts
//! each writer relies on are in its module's documentation.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::disk::{Disk, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};
use crate::formats::qcow2::writer::{Qcow2Options, Qcow2Writer};
use crate::formats::raw::RawWriter;
use crate::formats::vdi::writer::VdiWriter;
use crate::formats::vhd::writer::{VhdKind, VhdWriter};
use crate::formats::vhdx::writer::VhdxWriter;
use crate::formats::vmdk::writer::{VmdkVariant, VmdkWriter};
use crate::formats::writer::{BackingFile, ImageWriter};
use crate::formats::FormatId;
use crate::overlay::Overlay;
use crate::store::extents::ExtentKind;

/// Sectors per page read and per VDI block (1 MiB).
pub const PAGE_SECTORS: u64 = 2048;
const PAGE_BYTES: u64 = PAGE_SECTORS * SECTOR_BYTES;

/// Pages the reader may have read ahead of the writer and not yet handed
/// over (besides the one each side holds).
pub const READ_AHEAD_PAGES: usize = 8;

/// Bytes of data a read-ahead clone writes between two syncs started on a
/// thread of their own, so the write-back runs during the clone instead
/// of all in its final sync.
pub const EARLY_SYNC_BYTES: u64 = 32 << 20;

/// The image formats the clone writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneFormat {
    /// A flat image, sparse where the disk is unallocated or zero.
    Raw,
    /// A dynamic VirtualBox VDI image with 1 MiB blocks; unallocated and
    /// zero blocks are not stored.
    Vdi,
    /// A QEMU qcow2 (version 3) image; unallocated and zero clusters are
    /// not stored.
    Qcow2,
    /// A dynamic VHD (2 MiB blocks); unallocated and zero blocks are not
    /// stored. The default for `.vhd`.
    VhdDynamic,
    /// A fixed VHD: the whole disk followed by a footer (what Azure wants).
    VhdFixed,
    /// A dynamic VHDX image.
    Vhdx,
    /// A monolithicSparse VMDK. The default for `.vmdk`.
    VmdkSparse,
    /// A streamOptimized VMDK (compressed grains; what OVA packages use).
    VmdkStream,
}

impl CloneFormat {
    /// Every writable format. Where several write one registry format, the
    /// first is the default for its extension.
    pub const ALL: [CloneFormat; 8] = [
        CloneFormat::Raw,
        CloneFormat::Vdi,
        CloneFormat::Qcow2,
        CloneFormat::VhdDynamic,
        CloneFormat::VhdFixed,
        CloneFormat::Vhdx,
        CloneFormat::VmdkSparse,
        CloneFormat::VmdkStream,
    ];

    /// The format in the format registry.
    pub fn format(self) -> FormatId {
        match self {
            CloneFormat::Raw => FormatId::Raw,
            CloneFormat::Vdi => FormatId::Vdi,
            CloneFormat::Qcow2 => FormatId::Qcow2,
            CloneFormat::VhdDynamic | CloneFormat::VhdFixed => FormatId::Vhd,
            CloneFormat::Vhdx => FormatId::Vhdx,
            CloneFormat::VmdkSparse | CloneFormat::VmdkStream => FormatId::Vmdk,
        }
    }

    /// The short name ("raw", "vdi", "qcow2", "vhd", "vhd-fixed", "vhdx",
    /// "vmdk", "vmdk-stream"): the registry's name for a format's default
    /// variant, with a suffix for the others.
    pub fn name(self) -> &'static str {
        match self {
            CloneFormat::VhdFixed => "vhd-fixed",
            CloneFormat::VmdkStream => "vmdk-stream",
            other => other.format().name(),
        }
    }

    /// The format called `name` (exactly its [`CloneFormat::name`]).
    pub fn from_name(name: &str) -> Option<CloneFormat> {
        CloneFormat::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The format a destination file name suggests (`.vdi` → VDI, `.vhd` →
    /// dynamic VHD, `.vmdk` → monolithicSparse VMDK, ...; anything else
    /// raw), by the extensions of the format registry.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneOptions {
    /// The destination's format.
    pub format: CloneFormat,
    /// Replace an existing destination file (otherwise its existence is an
    /// error and it is left alone).
    pub replace: bool,
    /// The cluster size for qcow2 (default 64 KiB); other formats refuse
    /// it.
    pub cluster_bytes: Option<u64>,
    /// Store clusters deflate-compressed (qcow2, as `qemu-img convert -c`
    /// does); other formats refuse it (streamOptimized VMDK always
    /// compresses).
    pub compress: bool,
    /// Write a differencing qcow2 image over this backing file, holding
    /// only what an overlay changed ([`clone_overlay_to_file`]); the
    /// backing file must be the overlay's source.
    pub backing: Option<BackingFile>,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            format: CloneFormat::Raw,
            replace: false,
            cluster_bytes: None,
            compress: false,
            backing: None,
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
/// unless the clone succeeded with `options.replace`). A differencing
/// clone (`options.backing`) needs an overlay: [`clone_overlay_to_file`].
pub fn clone_to_file(
    disk: &mut dyn Disk,
    path: &Path,
    options: &CloneOptions,
    progress: &mut dyn Progress,
) -> Result<CloneStats> {
    clone_with(disk, path, options, progress, Pipeline::ReadAhead)
}

/// [`clone_to_file`] on the calling thread alone: each page is read, then
/// written, then the next is read. The result, the statistics and the
/// errors are the same; this is the reference the read-ahead clone is
/// measured against (`cowdisk bench --only clone-pipeline`).
pub fn clone_to_file_sequential(
    disk: &mut dyn Disk,
    path: &Path,
    options: &CloneOptions,
    progress: &mut dyn Progress,
) -> Result<CloneStats> {
    clone_with(disk, path, options, progress, Pipeline::Sequential)
}

/// Whether the pages are read on a thread of their own, ahead of the
/// writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipeline {
    Sequential,
    ReadAhead,
}

fn clone_with(
    disk: &mut dyn Disk,
    path: &Path,
    options: &CloneOptions,
    progress: &mut dyn Progress,
    pipeline: Pipeline,
) -> Result<CloneStats> {
    let what = path.display().to_string();
    if options.backing.is_some() {
        return Err(Error::invalid_argument(format!(
            "{what}: an image over a backing file holds what an overlay changed; clone the \
             overlay (clone_overlay_to_file)"
        )));
    }
    write_atomically(
        path,
        options.replace,
        disk.sector_count(),
        progress,
        |file, tracker| {
            let mut writer = writer_with_options(options, disk.byte_size(), &what)?;
            match pipeline {
                Pipeline::Sequential => write_pages(disk, file, writer.as_mut(), tracker),
                Pipeline::ReadAhead => {
                    write_pages_ahead(disk, file, writer.as_mut(), tracker, &what)
                }
            }
        },
    )
}

/// [`clone_to_file`] for an overlay, which can also be written as a
/// differencing qcow2 image over its source (`options.backing`, naming the
/// source's file): then only the clusters holding sectors the overlay does
/// not take unchanged from the same place of its source are stored (its
/// writes, moved and inserted ranges; zeros as zero clusters), and
/// everything else reads through to the backing file.
pub fn clone_overlay_to_file(
    overlay: &mut Overlay,
    path: &Path,
    options: &CloneOptions,
    progress: &mut dyn Progress,
) -> Result<CloneStats> {
    let Some(backing) = &options.backing else {
        return clone_to_file(overlay, path, options, progress);
    };
    let what = path.display().to_string();
    if options.format != CloneFormat::Qcow2 {
        return Err(Error::unsupported(format!(
            "{what}: an image over a backing file can be written as qcow2, not {}",
            options.format.name()
        )));
    }
    let qcow2 = Qcow2Options {
        cluster_bytes: options
            .cluster_bytes
            .unwrap_or(crate::formats::qcow2::writer::DEFAULT_CLUSTER_BYTES),
        compress: options.compress,
        backing: Some(backing.clone()),
    };
    let sectors = overlay.sector_count();
    write_atomically(path, options.replace, sectors, progress, |file, tracker| {
        let mut writer = Qcow2Writer::new(sectors * SECTOR_BYTES, &qcow2, &what)?;
        write_delta(overlay, file, &mut writer, qcow2.cluster_bytes, tracker)
    })
}

/// Writes an image to a temporary file next to `path` with `body`, syncs
/// it and renames it into place (see [`clone_to_file`]). `sectors` is the
/// total the progress is measured against.
fn write_atomically(
    path: &Path,
    replace: bool,
    sectors: u64,
    progress: &mut dyn Progress,
    body: impl FnOnce(&File, &mut Tracker<'_>) -> Result<CloneStats>,
) -> Result<CloneStats> {
    let what = path.display().to_string();
    if !replace && path.symlink_metadata().is_ok() {
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
        total: sectors,
        last: None,
    };
    tracker.report(0)?;
    let file = temp.as_file();
    let stats = body(file, &mut tracker)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::write(&what, 0, e))?;
    file.sync_all()
        .map_err(|e| Error::write(&format!("{what} (sync)"), 0, e))?;
    let persisted = if replace {
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

/// The writer `options` ask for, for a disk of `virtual_bytes`: the
/// format's [`writer_for`] after checking the options that apply to some
/// formats only.
fn writer_with_options(
    options: &CloneOptions,
    virtual_bytes: u64,
    what: &str,
) -> Result<Box<dyn ImageWriter>> {
    if options.format == CloneFormat::Qcow2 {
        let qcow2 = Qcow2Options {
            cluster_bytes: options
                .cluster_bytes
                .unwrap_or(crate::formats::qcow2::writer::DEFAULT_CLUSTER_BYTES),
            compress: options.compress,
            backing: None,
        };
        return Ok(Box::new(Qcow2Writer::new(
            whole_sectors(virtual_bytes),
            &qcow2,
            what,
        )?));
    }
    if let Some(size) = options.cluster_bytes {
        return Err(Error::invalid_argument(format!(
            "{what}: a cluster size ({size}) applies to qcow2 images, not {}",
            options.format.name()
        )));
    }
    if options.compress && options.format != CloneFormat::VmdkStream {
        return Err(Error::invalid_argument(format!(
            "{what}: compression applies to qcow2 images (streamOptimized VMDK always \
             compresses), not {}",
            options.format.name()
        )));
    }
    writer_for(options.format, virtual_bytes, what)
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
        CloneFormat::Qcow2 => Box::new(Qcow2Writer::new(
            whole_sectors(virtual_bytes),
            &Qcow2Options::default(),
            what,
        )?),
        CloneFormat::VhdDynamic => Box::new(VhdWriter::new(
            whole_sectors(virtual_bytes),
            VhdKind::Dynamic,
            what,
        )?),
        CloneFormat::VhdFixed => Box::new(VhdWriter::new(
            whole_sectors(virtual_bytes),
            VhdKind::Fixed,
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

/// `bytes` rounded up to whole sectors: formats whose size is counted in
/// sectors read an odd-sized disk's last sector zero-padded.
fn whole_sectors(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES
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

/// [`write_pages`] with the pages read on a scoped thread ahead of the
/// writer, and the data written so far synced by a third thread every
/// [`EARLY_SYNC_BYTES`] (see the module documentation). Every disk access
/// of the reader goes through [`read_page`]. `what` names the file.
fn write_pages_ahead(
    disk: &mut dyn Disk,
    file: &File,
    writer: &mut dyn ImageWriter,
    tracker: &mut Tracker<'_>,
    what: &str,
) -> Result<CloneStats> {
    let sectors = disk.sector_count();
    let mut stats = CloneStats {
        virtual_bytes: disk.byte_size(),
        ..CloneStats::default()
    };
    std::thread::scope(|scope| {
        // The pages in order, or the error that stopped the reader.
        let (piece_tx, piece_rx) = mpsc::sync_channel::<Result<Piece>>(READ_AHEAD_PAGES);
        // Buffers the writer is done with, back to the reader: at most
        // READ_AHEAD_PAGES + 2 ever exist.
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        let reader = scope.spawn(move || read_ahead(disk, sectors, &piece_tx, &free_rx));
        // Each message asks for one more sync of what is written (several
        // waiting are served by one).
        let (sync_tx, sync_rx) = mpsc::channel::<()>();
        let syncer = scope.spawn(move || -> io::Result<()> {
            while sync_rx.recv().is_ok() {
                while sync_rx.try_recv().is_ok() {}
                file.sync_data()?;
            }
            Ok(())
        });
        let written = (|| {
            let (mut done, mut unsynced) = (0, 0);
            while done < sectors {
                let Ok(piece) = piece_rx.recv() else {
                    // The reader ended without handing over every page or
                    // an error: it panicked. Its panic is raised below.
                    return Ok(false);
                };
                match piece? {
                    Piece::Data { start, buf } => {
                        writer.write_data(file, start * SECTOR_BYTES, &buf)?;
                        stats.pages_written += 1;
                        done = start + buf.len() as u64 / SECTOR_BYTES;
                        tracker.report(done)?;
                        unsynced += buf.len() as u64;
                        if unsynced >= EARLY_SYNC_BYTES {
                            unsynced = 0;
                            // The syncer may have stopped on an error,
                            // returned below.
                            let _ = sync_tx.send(());
                        }
                        // The reader may be gone (it read the last page).
                        let _ = free_tx.send(buf);
                    }
                    Piece::Skip { start, len } => {
                        // Page by page, as the sequential clone reports.
                        for (page, n) in pages(len) {
                            stats.pages_skipped += 1;
                            done = start + page + n;
                            tracker.report(done)?;
                        }
                    }
                }
            }
            Ok(true)
        })();
        // Unblocks a reader waiting to hand over a page, and ends the
        // syncer.
        drop(piece_rx);
        drop(sync_tx);
        if let Err(panic) = reader.join() {
            std::panic::resume_unwind(panic);
        }
        let synced = match syncer.join() {
            Ok(synced) => synced,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match written {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::internal(
                    "the clone's reader stopped before its last page".to_string(),
                ))
            }
            Err(e) => return Err(e),
        }
        // A failed write-back is reported once: to this sync, not the
        // final one.
        synced.map_err(|e| Error::write(&format!("{what} (sync)"), 0, e))?;
        writer.finish(file)?;
        Ok(stats)
    })
}

/// What the reader hands to the writer: one page holding data, or a run
/// of pages (at most [`SKIP_RUN_PAGES`]) that are not stored.
enum Piece {
    Data { start: u64, buf: Vec<u8> },
    Skip { start: u64, len: u64 },
}

/// Pages not stored that the reader hands over in one message.
const SKIP_RUN_PAGES: u64 = 64;

/// The reader's side of [`write_pages_ahead`]: reads the pages of `disk`
/// in order and sends them, until the last page, its first error, or the
/// writer hanging up. Buffers come back through `free`.
fn read_ahead(
    disk: &mut dyn Disk,
    sectors: u64,
    out: &mpsc::SyncSender<Result<Piece>>,
    free: &mpsc::Receiver<Vec<u8>>,
) {
    let mut spare: Option<Vec<u8>> = None;
    // The pages not stored, not yet sent: (first sector, sectors).
    let mut skipped: Option<(u64, u64)> = None;
    for (start, len) in pages(sectors) {
        let mut buf = spare
            .take()
            .or_else(|| free.try_recv().ok())
            .unwrap_or_else(|| Vec::with_capacity(PAGE_BYTES as usize));
        let data = match read_page(disk, start, len, &mut buf) {
            Ok(data) => data,
            Err(e) => {
                // The pages before it first, as the sequential clone
                // reports them before it fails. The writer may be gone.
                if let Some((s, l)) = skipped {
                    let _ = out.send(Ok(Piece::Skip { start: s, len: l }));
                }
                let _ = out.send(Err(e));
                return;
            }
        };
        if !data {
            spare = Some(buf);
            let run = skipped.get_or_insert((start, 0));
            run.1 += len;
            if run.1 >= SKIP_RUN_PAGES * PAGE_SECTORS {
                let (s, l) = *run;
                skipped = None;
                if out.send(Ok(Piece::Skip { start: s, len: l })).is_err() {
                    return;
                }
            }
            continue;
        }
        if let Some((s, l)) = skipped.take() {
            if out.send(Ok(Piece::Skip { start: s, len: l })).is_err() {
                return;
            }
        }
        if out.send(Ok(Piece::Data { start, buf })).is_err() {
            return;
        }
    }
    if let Some((s, l)) = skipped {
        let _ = out.send(Ok(Piece::Skip { start: s, len: l }));
    }
}

/// Streams the clusters of `overlay` that differ from its source at the
/// same place into `writer` (see [`clone_overlay_to_file`]), then lets it
/// finish the image. Pages are at least one cluster long so every cluster
/// is passed whole.
fn write_delta(
    overlay: &mut Overlay,
    file: &File,
    writer: &mut dyn ImageWriter,
    cluster_bytes: u64,
    tracker: &mut Tracker<'_>,
) -> Result<CloneStats> {
    let sectors = overlay.sector_count();
    let cluster_sectors = cluster_bytes / SECTOR_BYTES;
    let page_sectors = PAGE_SECTORS.max(cluster_sectors);
    let mut stats = CloneStats {
        virtual_bytes: overlay.byte_size(),
        ..CloneStats::default()
    };
    let (mut buf, mut source_buf) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < sectors {
        let len = page_sectors.min(sectors - start);
        let end = start + len;
        // Which clusters of the page hold a sector that is not the
        // source's own sector at the same place.
        let mut changed = vec![false; len.div_ceil(cluster_sectors) as usize];
        for (at, extent) in overlay.extents().range(start, end) {
            if extent.kind == ExtentKind::Source && extent.base == at {
                continue;
            }
            let first = (at - start) / cluster_sectors;
            let last = (at + extent.len - 1 - start) / cluster_sectors;
            changed[first as usize..=last as usize].fill(true);
        }
        if changed.iter().any(|&c| c) {
            buf.resize((len * SECTOR_BYTES) as usize, 0);
            overlay.read_sectors(start, &mut buf)?;
            // The overlay copies whole units on a write: a cluster whose
            // bytes still equal the source's at the same place is left to
            // the backing file.
            let source_sectors = overlay.source().sector_count();
            let cluster_len = (cluster_sectors * SECTOR_BYTES) as usize;
            for (i, flag) in changed.iter_mut().enumerate() {
                let lba = start + i as u64 * cluster_sectors;
                let n = cluster_sectors.min(end - lba);
                if !*flag || lba + n > source_sectors {
                    continue;
                }
                source_buf.resize((n * SECTOR_BYTES) as usize, 0);
                overlay.source_mut().read_sectors(lba, &mut source_buf)?;
                let ours = &buf[i * cluster_len..i * cluster_len + source_buf.len()];
                if ours == &source_buf[..] {
                    *flag = false;
                }
            }
            let mut i = 0;
            while i < changed.len() {
                if !changed[i] {
                    i += 1;
                    continue;
                }
                let run_start = i;
                while i < changed.len() && changed[i] {
                    i += 1;
                }
                let from = run_start as u64 * cluster_sectors;
                let to = (i as u64 * cluster_sectors).min(len);
                writer.write_data(
                    file,
                    (start + from) * SECTOR_BYTES,
                    &buf[(from * SECTOR_BYTES) as usize..(to * SECTOR_BYTES) as usize],
                )?;
            }
            stats.pages_written += 1;
        } else {
            stats.pages_skipped += 1;
        }
        tracker.report(end)?;
        start = end;
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
    fn each_extension_picks_its_default_variant() {
        for (name, format) in [
            ("a.img", CloneFormat::Raw),
            ("a.VDI", CloneFormat::Vdi),
            ("a.qcow2", CloneFormat::Qcow2),
            ("a.vhd", CloneFormat::VhdDynamic),
            ("a.vhdx", CloneFormat::Vhdx),
            ("a.vmdk", CloneFormat::VmdkSparse),
            ("a.unknown", CloneFormat::Raw),
            ("noextension", CloneFormat::Raw),
        ] {
            assert_eq!(CloneFormat::from_path(Path::new(name)), format, "{name}");
        }
        for format in CloneFormat::ALL {
            assert_eq!(CloneFormat::from_name(format.name()), Some(format));
        }
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

    /// A disk of `pages` pages plus `tail` sectors (an odd last page), of
    /// page kinds chosen by the page's index: random data; `Normal` but
    /// all zeros; `NotAlloc`; `Blank`; one data byte in the last sector
    /// with the rest `NotAlloc`; and a run of 70 `NotAlloc` pages (longer
    /// than a skip run) from page 40. The last page holds data.
    fn patterned_disk(pages: u64, tail: u64) -> MemDisk {
        let sectors = pages * PAGE_SECTORS + tail;
        let mut data = vec![0u8; (sectors * SECTOR_BYTES) as usize];
        let mut status = vec![SectorStatus::NotAlloc; sectors as usize];
        let mut rng = 0x1234_5678_9ABC_DEF1u64;
        for (page, (start, len)) in pages_of(sectors).into_iter().enumerate() {
            let page = page as u64;
            let bytes = (start * SECTOR_BYTES) as usize..((start + len) * SECTOR_BYTES) as usize;
            let sectors_range = start as usize..(start + len) as usize;
            let last = start + len == sectors;
            let kind = if (40..110).contains(&page) {
                2
            } else if last {
                0
            } else {
                page % 5
            };
            match kind {
                0 => {
                    for b in &mut data[bytes] {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        *b = rng as u8;
                    }
                    status[sectors_range].fill(SectorStatus::Normal);
                }
                1 => status[sectors_range].fill(SectorStatus::Normal),
                2 => {}
                3 => status[sectors_range].fill(SectorStatus::Blank),
                _ => {
                    let s = (start + len - 1) as usize;
                    status[s] = SectorStatus::Normal;
                    data[s * SECTOR_BYTES as usize + 7] = 0x5A;
                }
            }
        }
        MemDisk::new(data, status).unwrap()
    }

    /// The pages of a disk of `sectors` sectors, computed here on their
    /// own: 2048-sector pieces, the last one shorter.
    fn pages_of(sectors: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < sectors {
            out.push((at, 2048.min(sectors - at)));
            at += 2048;
        }
        out
    }

    /// The naive model of a clone of `disk`: pages with a non-zero byte
    /// are written, the others skipped; the progress reported is each new
    /// whole percentage of sectors done, after each page, from 0.
    fn model(disk: &MemDisk) -> (u64, u64, Vec<u32>) {
        let sectors = disk.sector_count();
        let (mut written, mut skipped) = (0, 0);
        let mut percents = vec![0u32];
        for (start, len) in pages_of(sectors) {
            let bytes = &disk.data()[(start * 512) as usize..((start + len) * 512) as usize];
            if bytes.iter().any(|&b| b != 0) {
                written += 1;
            } else {
                skipped += 1;
            }
            let p = ((start + len) * 100 / sectors) as u32;
            if *percents.last().unwrap() < p {
                percents.push(p);
            }
        }
        (written, skipped, percents)
    }

    /// Runs `f` on a thread of its own and fails the test if it takes
    /// more than a minute (a clone that hangs).
    fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("the clone did not finish within a minute"),
        }
    }

    type CloneFn = fn(&mut dyn Disk, &Path, &CloneOptions, &mut dyn Progress) -> Result<CloneStats>;

    const BOTH: [(&str, CloneFn); 2] = [
        ("read-ahead", clone_to_file),
        ("sequential", clone_to_file_sequential),
    ];

    #[test]
    fn the_read_ahead_clone_writes_what_the_model_and_the_sequential_clone_do() {
        let disk = patterned_disk(150, 100);
        let (written, skipped, percents) = model(&disk);
        assert!(written > 20 && skipped > 90, "{written} {skipped}");
        let dir = tempfile::tempdir().unwrap();
        for format in [CloneFormat::Raw, CloneFormat::Vdi, CloneFormat::Qcow2] {
            let mut outputs = Vec::new();
            for (name, clone) in BOTH {
                let path = dir.path().join(format!("{name}.{}", format.name()));
                let mut seen = Vec::new();
                let options = CloneOptions {
                    format,
                    ..CloneOptions::default()
                };
                let stats = clone(&mut disk.clone(), &path, &options, &mut |p: u32| {
                    seen.push(p);
                    true
                })
                .unwrap();
                assert_eq!(
                    (stats.pages_written, stats.pages_skipped),
                    (written, skipped),
                    "{name} {format:?}"
                );
                assert_eq!(stats.virtual_bytes, disk.byte_size(), "{name}");
                assert_eq!(seen, percents, "{name} {format:?}");
                outputs.push(std::fs::read(&path).unwrap());
            }
            // A VDI header holds random UUIDs: the rest must be equal.
            let from = if format == CloneFormat::Vdi { 512 } else { 0 };
            assert_eq!(outputs[0].len(), outputs[1].len(), "{format:?}");
            assert!(
                outputs[0][from..] == outputs[1][from..],
                "{format:?}: the two clones differ"
            );
            if format == CloneFormat::Raw {
                assert!(outputs[0] == disk.data(), "the raw clone is not the disk");
            }
        }
    }

    #[test]
    fn a_clone_through_several_early_syncs_is_the_disk() {
        // 70 pages and 9 sectors of data: more than two early syncs.
        let sectors = 70 * PAGE_SECTORS + 9;
        let mut rng = 0x0DDB_1A5E_5BAD_5EEDu64;
        let data: Vec<u8> = (0..sectors * 512)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8 | 1
            })
            .collect();
        assert!(data.len() as u64 > 2 * EARLY_SYNC_BYTES);
        let disk =
            MemDisk::new(data.clone(), vec![SectorStatus::Normal; sectors as usize]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, clone) in BOTH {
            let path = dir.path().join(format!("{name}.raw"));
            let stats = clone(
                &mut disk.clone(),
                &path,
                &CloneOptions::default(),
                &mut no_progress(),
            )
            .unwrap();
            assert_eq!(
                (stats.pages_written, stats.pages_skipped),
                (71, 0),
                "{name}"
            );
            assert!(
                std::fs::read(&path).unwrap() == data,
                "{name}: not the disk"
            );
        }
    }

    #[test]
    fn an_empty_disk_and_a_disk_of_one_short_page_clone_alike() {
        let dir = tempfile::tempdir().unwrap();
        for sectors in [0u64, 1, 7] {
            let mut data = vec![0u8; (sectors * 512) as usize];
            if let Some(b) = data.last_mut() {
                *b = 1;
            }
            let disk =
                MemDisk::new(data.clone(), vec![SectorStatus::Normal; sectors as usize]).unwrap();
            for (name, clone) in BOTH {
                let path = dir.path().join(format!("{name}-{sectors}.raw"));
                let stats = clone(
                    &mut disk.clone(),
                    &path,
                    &CloneOptions::default(),
                    &mut no_progress(),
                )
                .unwrap();
                assert_eq!(stats.pages_written, sectors.min(1), "{name} {sectors}");
                assert_eq!(std::fs::read(&path).unwrap(), data, "{name} {sectors}");
            }
        }
    }

    /// A disk that fails (or panics) when page `at` is read, or its status
    /// asked.
    struct FailingDisk {
        inner: MemDisk,
        at: u64,
        in_status: bool,
        panic: bool,
    }

    impl FailingDisk {
        fn check(&self, lba: u64, status: bool) -> Result<()> {
            if lba / PAGE_SECTORS == self.at && status == self.in_status {
                if self.panic {
                    panic!("the test disk panics at page {}", self.at);
                }
                return Err(Error::read_failed(format!(
                    "the test disk fails at page {}",
                    self.at
                )));
            }
            Ok(())
        }
    }

    impl Disk for FailingDisk {
        fn drive_type(&self) -> crate::disk::DriveType {
            self.inner.drive_type()
        }
        fn sector_count(&self) -> u64 {
            self.inner.sector_count()
        }
        fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
            self.check(lba, false)?;
            self.inner.read_sectors(lba, buf)
        }
        fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
            self.check(lba, true)?;
            self.inner.block_status(lba, count)
        }
    }

    #[test]
    fn a_read_error_at_page_k_comes_back_as_itself_and_leaves_no_file() {
        // Page 0 holds data, so `read_sectors` is called on it; page 45
        // is in the long NotAlloc run (40 to 109), so only its status is
        // asked; at page 105 one skipped page (104) is waiting to be
        // handed over after a full skip run (40 to 103); page 110 is the
        // first data page after the run; page 150 is the odd last page.
        for (at, in_status) in [
            (0, false),
            (45, true),
            (105, true),
            (110, false),
            (150, false),
        ] {
            let mut errors = Vec::new();
            for (name, clone) in BOTH {
                let (err, seen, files) = within_a_minute(move || {
                    let dir = tempfile::tempdir().unwrap();
                    let mut disk = FailingDisk {
                        inner: patterned_disk(150, 100),
                        at,
                        in_status,
                        panic: false,
                    };
                    let mut seen = Vec::new();
                    let err = clone(
                        &mut disk,
                        &dir.path().join("out.raw"),
                        &CloneOptions::default(),
                        &mut |p: u32| {
                            seen.push(p);
                            true
                        },
                    )
                    .unwrap_err();
                    (err, seen, std::fs::read_dir(dir.path()).unwrap().count())
                });
                assert_eq!(
                    err.message(),
                    format!("the test disk fails at page {at}"),
                    "{name}"
                );
                assert_eq!(err.kind(), crate::error::ErrorCode::Read, "{name}");
                assert_eq!(files, 0, "{name}: a file was left");
                // Progress up to the page before the failing one.
                let sectors = 150 * PAGE_SECTORS + 100;
                let expected: Vec<u32> = {
                    let mut v = vec![0u32];
                    for page in 0..at {
                        let p = ((page + 1) * PAGE_SECTORS * 100 / sectors) as u32;
                        if *v.last().unwrap() < p {
                            v.push(p);
                        }
                    }
                    v
                };
                assert_eq!(seen, expected, "{name} at {at}");
                errors.push(err.to_string());
            }
            assert_eq!(errors[0], errors[1]);
        }
    }

    #[test]
    fn a_panic_in_the_reader_comes_back_as_a_panic_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let outcome = within_a_minute(move || {
            std::panic::catch_unwind(move || {
                let mut disk = FailingDisk {
                    inner: patterned_disk(20, 0),
                    at: 10,
                    in_status: true,
                    panic: true,
                };
                clone_to_file(
                    &mut disk,
                    &path,
                    &CloneOptions::default(),
                    &mut no_progress(),
                )
            })
        });
        assert!(outcome.is_err(), "the panic was swallowed");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn cancelling_while_the_reader_waits_stops_both_and_leaves_no_file() {
        // Every page holds data: the reader fills the channel and waits
        // on it when the writer cancels.
        for stop_at in [1u32, 30, 99] {
            for (name, clone) in BOTH {
                let (err, seen, files) = within_a_minute(move || {
                    let dir = tempfile::tempdir().unwrap();
                    let sectors = 100 * PAGE_SECTORS;
                    let mut disk = MemDisk::new(
                        (0..sectors * 512).map(|i| (i % 251) as u8 | 1).collect(),
                        vec![SectorStatus::Normal; sectors as usize],
                    )
                    .unwrap();
                    let mut seen = Vec::new();
                    let err = clone(
                        &mut disk,
                        &dir.path().join("out.raw"),
                        &CloneOptions::default(),
                        &mut |p: u32| {
                            seen.push(p);
                            p < stop_at
                        },
                    )
                    .unwrap_err();
                    (err, seen, std::fs::read_dir(dir.path()).unwrap().count())
                });
                assert_eq!(err.kind(), crate::error::ErrorCode::Cancelled, "{name}");
                assert_eq!(seen, (0..=stop_at).collect::<Vec<_>>(), "{name}");
                assert_eq!(files, 0, "{name}: a file was left");
            }
        }
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
