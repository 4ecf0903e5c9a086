//! The filesystem view: a disk that reads the sectors its filesystems do
//! not use as unallocated zeros (`NotAlloc`), so a clone through it leaves
//! them out. Every other sector reads as the disk below.

use super::{analyze, Analysis, AnalyzeOptions, FreeMap, Report};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_SIZE};
use crate::error::{Error, Result};

/// A disk (any: an image, an overlay, a caller's object) seen through its
/// filesystems' free-space maps.
pub struct FilesystemView {
    inner: Box<dyn Disk>,
    free: FreeMap,
}

impl FilesystemView {
    /// Analyses `disk` (see [`analyze`]) and wraps it.
    pub fn new(disk: Box<dyn Disk>) -> Result<(FilesystemView, Report)> {
        Self::with_options(disk, &AnalyzeOptions::default())
    }

    /// [`FilesystemView::new`] with options.
    pub fn with_options(
        mut disk: Box<dyn Disk>,
        options: &AnalyzeOptions,
    ) -> Result<(FilesystemView, Report)> {
        let analysis = analyze(disk.as_mut(), options)?;
        Ok(Self::from_analysis(disk, analysis))
    }

    /// Wraps `disk` with an analysis made of it earlier (the disk must not
    /// have changed since).
    pub fn from_analysis(disk: Box<dyn Disk>, analysis: Analysis) -> (FilesystemView, Report) {
        let view = FilesystemView {
            inner: disk,
            free: analysis.free,
        };
        (view, analysis.report)
    }

    /// The sectors read as unallocated.
    pub fn free(&self) -> &FreeMap {
        &self.free
    }

    /// The disk below, back.
    pub fn into_inner(self) -> Box<dyn Disk> {
        self.inner
    }

    fn check_range(&self, lba: u64, count: u64) -> Result<()> {
        if lba
            .checked_add(count)
            .is_none_or(|end| end > self.inner.sector_count())
        {
            return Err(Error::invalid_block(format!(
                "sectors {lba}..+{count} of a disk of {} sectors",
                self.inner.sector_count()
            )));
        }
        Ok(())
    }
}

impl Disk for FilesystemView {
    fn drive_type(&self) -> DriveType {
        self.inner.drive_type()
    }
    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }
    fn byte_size(&self) -> u64 {
        self.inner.byte_size()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.inner.uuid()
    }
    fn is_snapshot(&self) -> bool {
        self.inner.is_snapshot()
    }
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        self.inner.parent_uuid()
    }

    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        if !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(Error::invalid_argument(format!(
                "a read of {} bytes is not whole sectors",
                buf.len()
            )));
        }
        let count = (buf.len() / SECTOR_SIZE) as u64;
        self.check_range(lba, count)?;
        let mut status: Option<SectorStatus> = None;
        let mut done = 0;
        while done < count {
            let (free, n) = self.free.run_at(lba + done, count - done);
            let part = &mut buf[done as usize * SECTOR_SIZE..(done + n) as usize * SECTOR_SIZE];
            let here = if free {
                part.fill(0);
                SectorStatus::NotAlloc
            } else {
                self.inner.read_sectors(lba + done, part)?
            };
            status = Some(status.map_or(here, |s| s.combine(here)));
            done += n;
        }
        Ok(status.unwrap_or(SectorStatus::NotAlloc))
    }

    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        self.check_range(lba, count)?;
        let mut status: Option<SectorStatus> = None;
        let mut done = 0;
        while done < count {
            let (free, n) = self.free.run_at(lba + done, count - done);
            let here = if free {
                SectorStatus::NotAlloc
            } else {
                self.inner.block_status(lba + done, n)?
            };
            status = Some(status.map_or(here, |s| s.combine(here)));
            if status == Some(SectorStatus::Normal) {
                break;
            }
            done += n;
        }
        Ok(status.unwrap_or(SectorStatus::NotAlloc))
    }

    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        if count == 0 {
            return Err(Error::invalid_argument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        self.check_range(lba, count)?;
        match self.free.run_at(lba, count) {
            (true, n) => Ok((SectorStatus::NotAlloc, n)),
            (false, n) => self.inner.status_run(lba, n),
        }
    }

    fn reads_as_zeros(&self, lba: u64, count: u64) -> Result<bool> {
        self.check_range(lba, count)?;
        let mut done = 0;
        while done < count {
            let (free, n) = self.free.run_at(lba + done, count - done);
            if !free && !self.inner.reads_as_zeros(lba + done, n)? {
                return Ok(false);
            }
            done += n;
        }
        Ok(true)
    }
}
