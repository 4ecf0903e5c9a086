//! The shared read path of image formats that map virtual ranges through
//! allocation tables.
//!
//! A format answers one question — what backs the run of sectors starting at
//! `lba`? — with a [`Mapping`] and the run's length, and reads the data of
//! `Data`/`Compressed` runs. Reads, block status and parent fall-through are
//! then the same for every format, here.

use crate::disk::{sectors_in, Disk, SectorStatus, SECTOR_SIZE};
use crate::error::{Error, Result};

/// What backs a run of virtual sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored uncompressed in the image's file number `file` (0 for
    /// single-file formats) at byte `offset` for the run's first sector.
    Data { file: usize, offset: u64 },
    /// Stored in a form the format decodes itself (compressed clusters or
    /// grains); `token` is the format's own locator.
    Encoded { token: u64 },
    /// The format says these sectors read as zeros.
    Zero,
    /// Not allocated here and no parent to ask: zeros, `NotAlloc`.
    Unallocated,
    /// Not allocated here: read from the parent (backing) disk.
    Parent,
}

/// A format that maps runs of sectors; see the module documentation.
pub trait MappedImage: Send + Sync {
    /// Size in sectors.
    fn sectors(&self) -> u64;

    /// What backs the sectors from `lba`, and for how many of the `count`
    /// sectors asked (at least 1, at most `count`) that holds. The caller
    /// guarantees `lba + count <= sectors()` and `count > 0`.
    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)>;

    /// Reads a `Data` or `Encoded` run that `map` returned for `lba`, into
    /// `buf` (whole sectors, no longer than the run).
    fn read_mapped(&self, mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()>;

    /// The parent disk, for images that have one.
    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        None
    }
}

/// `Disk::read_sectors` for a mapped image.
pub fn read_sectors<M: MappedImage + ?Sized>(
    image: &M,
    lba: u64,
    buf: &mut [u8],
) -> Result<SectorStatus> {
    let count = sectors_in(buf.len())?;
    crate::disk::check_range(lba, count, image.sectors())?;
    let mut status = SectorStatus::NotAlloc;
    let mut done = 0u64;
    while done < count {
        let (mapping, run) = image.map(lba + done, count - done)?;
        let run = sanitize_run(run, count - done)?;
        let start = (done as usize) * SECTOR_SIZE;
        let part = &mut buf[start..start + run as usize * SECTOR_SIZE];
        let part_status = match mapping {
            Mapping::Data { .. } | Mapping::Encoded { .. } => {
                image.read_mapped(mapping, lba + done, part)?;
                SectorStatus::Normal
            }
            Mapping::Zero => {
                part.fill(0);
                SectorStatus::Blank
            }
            Mapping::Unallocated => {
                part.fill(0);
                SectorStatus::NotAlloc
            }
            Mapping::Parent => match image.parent() {
                Some(parent) => read_parent(parent, lba + done, part)?,
                None => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
            },
        };
        status = status.combine(part_status);
        done += run;
    }
    Ok(status)
}

/// `Disk::block_status` for a mapped image.
pub fn block_status<M: MappedImage + ?Sized>(
    image: &M,
    lba: u64,
    count: u64,
) -> Result<SectorStatus> {
    crate::disk::check_range(lba, count, image.sectors())?;
    let mut status = SectorStatus::NotAlloc;
    let mut done = 0u64;
    while done < count {
        let (mapping, run) = image.map(lba + done, count - done)?;
        let run = sanitize_run(run, count - done)?;
        let part_status = match mapping {
            Mapping::Data { .. } | Mapping::Encoded { .. } => SectorStatus::Normal,
            Mapping::Zero => SectorStatus::Blank,
            Mapping::Unallocated => SectorStatus::NotAlloc,
            Mapping::Parent => match image.parent() {
                Some(parent) => parent_status(parent, lba + done, run)?,
                None => SectorStatus::NotAlloc,
            },
        };
        status = status.combine(part_status);
        if status == SectorStatus::Normal {
            break; // nothing can raise it further
        }
        done += run;
    }
    Ok(status)
}

/// `Disk::status_run` for a mapped image: `map` answers it already; runs
/// of the same status join, and runs that fall through to the parent take
/// the parent's own runs.
pub fn status_run<M: MappedImage + ?Sized>(
    image: &M,
    lba: u64,
    count: u64,
) -> Result<(SectorStatus, u64)> {
    crate::disk::check_range(lba, count, image.sectors())?;
    let mut first = None;
    let mut done = 0u64;
    while done < count {
        let (mapping, run) = image.map(lba + done, count - done)?;
        let run = sanitize_run(run, count - done)?;
        let (status, n) = match mapping {
            Mapping::Data { .. } | Mapping::Encoded { .. } => (SectorStatus::Normal, run),
            Mapping::Zero => (SectorStatus::Blank, run),
            Mapping::Unallocated => (SectorStatus::NotAlloc, run),
            Mapping::Parent => match image.parent() {
                Some(parent) => parent_status_run(parent, lba + done, run)?,
                None => (SectorStatus::NotAlloc, run),
            },
        };
        if *first.get_or_insert(status) != status {
            break;
        }
        done += n;
    }
    let status = first.ok_or_else(|| {
        Error::invalid_argument("the status run of zero sectors was asked".into())
    })?;
    Ok((status, done))
}

/// A format returning a zero-length run would loop forever; a longer one
/// than asked would overrun the buffer. Both are bugs reported as errors.
fn sanitize_run(run: u64, asked: u64) -> Result<u64> {
    if run == 0 || run > asked {
        return Err(Error::internal(format!(
            "format mapped a run of {run} sectors when {asked} were asked"
        )));
    }
    Ok(run)
}

/// A parent may be smaller than its child (a grown differencing image):
/// sectors past the parent's end read as unallocated zeros.
fn read_parent(parent: &dyn Disk, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
    let count = (buf.len() / SECTOR_SIZE) as u64;
    let inside = parent.sector_count().saturating_sub(lba).min(count);
    let (head, tail) = buf.split_at_mut(inside as usize * SECTOR_SIZE);
    tail.fill(0);
    if inside == 0 {
        return Ok(SectorStatus::NotAlloc);
    }
    parent.read_sectors(lba, head)
}

fn parent_status(parent: &dyn Disk, lba: u64, count: u64) -> Result<SectorStatus> {
    let inside = parent.sector_count().saturating_sub(lba).min(count);
    if inside == 0 {
        return Ok(SectorStatus::NotAlloc);
    }
    parent.block_status(lba, inside)
}

fn parent_status_run(parent: &dyn Disk, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
    let inside = parent.sector_count().saturating_sub(lba).min(count);
    if inside == 0 {
        return Ok((SectorStatus::NotAlloc, count));
    }
    let (status, run) = parent.status_run(lba, inside)?;
    Ok((status, sanitize_run(run, inside)?))
}
