//! The overlay as a `Disk`.

use super::{byte_index, Overlay, COPY_CHUNK_SECTORS};
use crate::disk::{check_range, is_zero, Disk, DriveType, SectorStatus, SECTOR_SIZE};
use crate::error::Result;

impl Disk for Overlay {
    fn drive_type(&self) -> DriveType {
        DriveType::Cow
    }
    fn sector_count(&self) -> u64 {
        self.map.len()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.source.uuid()
    }
    fn is_snapshot(&self) -> bool {
        self.source.is_snapshot()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let status = self.read_unfiltered(lba, buf)?;
        if self.options.detect_zeros && status == SectorStatus::Normal && is_zero(buf) {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
    /// Exact through the map and the source's own `status_run`, so an
    /// overlay over an overlay stays sector-exact. With zero detection, a
    /// run of data stops where its sectors change between all-zero
    /// (`Blank`) and not.
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.map.len())?;
        let (status, n) = self.status_run_unfiltered(lba, count)?;
        if !(self.options.detect_zeros && status == SectorStatus::Normal) {
            return Ok((status, n));
        }
        let mut buf = Vec::new();
        let mut first_zero = None;
        let mut pos = lba;
        'scan: while pos < lba + n {
            let chunk = (lba + n - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(chunk), 0);
            self.read_unfiltered(pos, &mut buf)?;
            for sector in buf.chunks_exact(SECTOR_SIZE) {
                let zero = sector.iter().all(|&b| b == 0);
                if *first_zero.get_or_insert(zero) != zero {
                    break 'scan;
                }
                pos += 1;
            }
        }
        let status = if first_zero == Some(true) {
            SectorStatus::Blank
        } else {
            SectorStatus::Normal
        };
        Ok((status, pos - lba))
    }

    fn reads_as_zeros(&self, lba: u64, count: u64) -> Result<bool> {
        check_range(lba, count, self.map.len())?;
        self.zeros_in(lba, count)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.map.len())?;
        let status = self.status_unfiltered(lba, count)?;
        if self.options.detect_zeros
            && status == SectorStatus::Normal
            && self.zeros_in(lba, count)?
        {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
}
