//! Reads: sector data and status runs from the extent map and the
//! source, and zero detection.

use super::extents::ExtentKind;
use super::{byte_index, Overlay, COPY_CHUNK_SECTORS};
use crate::disk::{check_range, is_zero, sectors_in, Disk, SectorStatus};
use crate::error::{Error, Result};

impl Overlay {
    /// The status of sector `lba` from the extent map and the source's
    /// metadata, without zero detection, and how many of the `count`
    /// sectors from `lba` share it (`count > 0`, inside the drive). Stops
    /// at the first sector whose status differs.
    pub(super) fn status_run_unfiltered(
        &mut self,
        lba: u64,
        count: u64,
    ) -> Result<(SectorStatus, u64)> {
        let end = lba + count;
        let mut first: Option<SectorStatus> = None;
        let mut pos = lba;
        while pos < end {
            let (start, extent) = self.map.find(pos).ok_or_else(|| {
                Error::internal(format!("extent map has no extent for sector {pos}"))
            })?;
            let piece = (start + extent.len).min(end) - pos;
            let (status, n) = match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole => (SectorStatus::NotAlloc, piece),
                ExtentKind::StoreZero => (SectorStatus::Blank, piece),
                ExtentKind::Store => (SectorStatus::Normal, piece),
                ExtentKind::Source => {
                    let from = extent.base + (pos - start);
                    let (status, n) = self.source.status_run(from, piece)?;
                    if n == 0 || n > piece {
                        return Err(Error::internal(format!(
                            "source reported a status run of {n} sectors at sector \
                             {from} when {piece} were asked"
                        )));
                    }
                    (status, n)
                }
            };
            match first {
                None => first = Some(status),
                Some(s) if s != status => break,
                Some(_) => {}
            }
            pos += n;
        }
        let status = first.ok_or_else(|| {
            Error::invalid_argument("the status run of zero sectors was asked".into())
        })?;
        Ok((status, pos - lba))
    }

    /// Reads through the extent map without zero detection.
    pub(super) fn read_unfiltered(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.map.len())?;
        let mut status = SectorStatus::NotAlloc;
        for (start, extent) in self.map.range(lba, lba + count) {
            let part = &mut buf[byte_index(start - lba)..byte_index(start - lba + extent.len)];
            let part_status = match extent.kind {
                ExtentKind::None => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::Source => self.source.read_sectors(extent.base, part)?,
                ExtentKind::Store => {
                    self.store.read_at(part, self.store_byte(extent.base))?;
                    SectorStatus::Normal
                }
                // Reserved store space was never written for these sectors:
                // the store's bytes there are stale and never read.
                ExtentKind::StoreHole => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::StoreZero => {
                    part.fill(0);
                    SectorStatus::Blank
                }
            };
            status = status.combine(part_status);
        }
        Ok(status)
    }

    /// Block status from the extent map and the source's metadata.
    pub(super) fn status_unfiltered(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        let mut status = SectorStatus::NotAlloc;
        for (_, extent) in self.map.range(lba, lba + count) {
            let part_status = match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole => SectorStatus::NotAlloc,
                ExtentKind::StoreZero => SectorStatus::Blank,
                ExtentKind::Source => self.source.block_status(extent.base, extent.len)?,
                ExtentKind::Store => SectorStatus::Normal,
            };
            status = status.combine(part_status);
            if status == SectorStatus::Normal {
                break;
            }
        }
        Ok(status)
    }

    /// Whether `[lba, lba + count)` reads as zeros, from the extent map:
    /// inserted (unallocated) extents and reserved-but-unwritten store
    /// space (holes, known zeros) are zeros by definition and are not read, source extents are asked of the source (an overlay below
    /// answers from its own map), store extents are read. Found by fuzzing
    /// the C API: a block status with zero detection over a huge inserted
    /// range, or over an overlay stacked on one, read terabytes of zeros.
    pub(super) fn zeros_in(&mut self, lba: u64, count: u64) -> Result<bool> {
        let mut buf = Vec::new();
        for (start, extent) in self.map.range(lba, lba + count) {
            match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole | ExtentKind::StoreZero => continue,
                ExtentKind::Source => {
                    if !self.source.reads_as_zeros(extent.base, extent.len)? {
                        return Ok(false);
                    }
                }
                ExtentKind::Store => {
                    let end = start + extent.len;
                    let mut pos = start;
                    while pos < end {
                        let n = (end - pos).min(COPY_CHUNK_SECTORS);
                        buf.resize(byte_index(n), 0);
                        self.read_unfiltered(pos, &mut buf)?;
                        if !is_zero(&buf) {
                            return Ok(false);
                        }
                        pos += n;
                    }
                }
            }
        }
        Ok(true)
    }
}
