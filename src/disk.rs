//! The `Disk` abstraction: anything that can be read sector by sector.
//!
//! Every source format, a caller's own C object and the overlay itself are
//! `Disk`s, so an overlay can sit on any of them (even on another overlay).

use crate::error::{Error, Result};

/// Bytes in a sector. All positions in the library are in these units.
pub const SECTOR_SIZE: usize = 512;
/// `SECTOR_SIZE` as a u64, for offset arithmetic.
pub const SECTOR_BYTES: u64 = SECTOR_SIZE as u64;

/// What a range of sectors holds, as far as the metadata tells.
///
/// The numeric values are the legacy `VDDR_RSLT_*` result codes. The order
/// of the variants is also their precedence when ranges are combined: a range
/// with any `Normal` sector is `Normal`; else any `Blank` makes it `Blank`;
/// else it is `NotAlloc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectorStatus {
    /// Holds data (which may happen to be zeros).
    Normal = 1,
    /// Known to read as zeros (the format says so).
    Blank = 2,
    /// Never allocated: reads as zeros, and a clone need not store it.
    NotAlloc = 3,
}

impl SectorStatus {
    /// The status of the union of two ranges.
    pub fn combine(self, other: SectorStatus) -> SectorStatus {
        use SectorStatus::*;
        match (self, other) {
            (Normal, _) | (_, Normal) => Normal,
            (Blank, _) | (_, Blank) => Blank,
            _ => NotAlloc,
        }
    }

    /// The legacy `VDDR_RSLT_*` value.
    pub fn legacy_code(self) -> u32 {
        self as u32
    }

    /// Parses a legacy `VDDR_RSLT_*` value (0, `FAIL`, is not a status).
    pub fn from_legacy_code(code: u32) -> Option<SectorStatus> {
        match code {
            1 => Some(SectorStatus::Normal),
            2 => Some(SectorStatus::Blank),
            3 => Some(SectorStatus::NotAlloc),
            _ => None,
        }
    }
}

/// The kind of an open disk: the legacy `VDD_TYPE_*` values (0..6) and the
/// ones appended after them. Stable once shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriveType {
    Vdi = 0,
    Vhd = 1,
    Vmdk = 2,
    Raw = 3,
    PartRaw = 4,
    Parallels = 5,
    Cow = 6,
    Qcow2 = 7,
    Vhdx = 8,
    UmlCow = 9,
    Vci = 10,
    Custom = 11,
}

/// A readable disk of `sector_count()` sectors.
///
/// Methods take `&mut self` so implementations may keep caches without
/// locks; the C layer serialises calls on one handle.
pub trait Disk: Send {
    /// The kind of disk (the legacy `GetDriveType`).
    fn drive_type(&self) -> DriveType;

    /// Size in sectors; a trailing partial sector counts as a whole one and
    /// reads zero-padded.
    fn sector_count(&self) -> u64;

    /// Size in bytes as the image declares it (may be less than
    /// `sector_count() * 512` for an odd-sized raw file).
    fn byte_size(&self) -> u64 {
        self.sector_count().saturating_mul(SECTOR_BYTES)
    }

    /// The disk's UUID, for formats that have one.
    fn uuid(&self) -> Option<[u8; 16]> {
        None
    }

    /// True for a differencing image or snapshot.
    fn is_snapshot(&self) -> bool {
        false
    }

    /// Reads `buf.len() / 512` sectors starting at `lba` into `buf` and tells
    /// what they were. Sectors that are not `Normal` are zero-filled.
    ///
    /// The caller guarantees `buf.len()` is a multiple of 512 and the range
    /// lies inside the disk; implementations may still check.
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus>;

    /// The combined status of `count` sectors from `lba`, answered from
    /// metadata without reading data. The range lies inside the disk.
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus>;

    /// True when sectors `[lba, lba + count)` (inside the disk) read as
    /// zeros. The default reads them; a disk that knows ranges read as
    /// zeros without reading them (an overlay's inserted ranges) answers
    /// those from its metadata, so a zero check over a huge unallocated
    /// range costs nothing.
    fn reads_as_zeros(&mut self, lba: u64, count: u64) -> Result<bool> {
        zeros_by_reading(self, lba, count)
    }
}

/// Sectors per read of `zeros_by_reading` (1 MiB).
const ZERO_CHECK_SECTORS: u64 = 2048;

/// `Disk::reads_as_zeros` by reading the range, 1 MiB at a time.
pub fn zeros_by_reading<D: Disk + ?Sized>(disk: &mut D, lba: u64, count: u64) -> Result<bool> {
    let mut buf = Vec::new();
    let end = lba + count;
    let mut pos = lba;
    while pos < end {
        let n = (end - pos).min(ZERO_CHECK_SECTORS);
        buf.resize(n as usize * SECTOR_SIZE, 0);
        disk.read_sectors(pos, &mut buf)?;
        if !is_zero(&buf) {
            return Ok(false);
        }
        pos += n;
    }
    Ok(true)
}

/// True when every byte is zero (compared 16 bytes at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

impl<D: Disk + ?Sized> Disk for Box<D> {
    fn drive_type(&self) -> DriveType {
        (**self).drive_type()
    }
    fn sector_count(&self) -> u64 {
        (**self).sector_count()
    }
    fn byte_size(&self) -> u64 {
        (**self).byte_size()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        (**self).uuid()
    }
    fn is_snapshot(&self) -> bool {
        (**self).is_snapshot()
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        (**self).read_sectors(lba, buf)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        (**self).block_status(lba, count)
    }
    fn reads_as_zeros(&mut self, lba: u64, count: u64) -> Result<bool> {
        (**self).reads_as_zeros(lba, count)
    }
}

/// Checks that `count` sectors from `lba` lie wholly inside a disk of
/// `size` sectors, without overflowing.
pub fn check_range(lba: u64, count: u64, size: u64) -> Result<()> {
    match lba.checked_add(count) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidBlock(format!(
            "sectors {lba}..+{count} are not inside a drive of {size} sectors"
        ))),
    }
}

/// Checks that a buffer holds whole sectors and returns how many.
pub fn sectors_in(buf_len: usize) -> Result<u64> {
    if !buf_len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::InvalidArgument(format!(
            "buffer of {buf_len} bytes is not a whole number of sectors"
        )));
    }
    Ok((buf_len / SECTOR_SIZE) as u64)
}

/// A disk held entirely in memory with a per-sector status: a test source
/// and a building block for tests of everything that sits on a `Disk`.
#[derive(Debug, Clone)]
pub struct MemDisk {
    data: Vec<u8>,
    status: Vec<SectorStatus>,
    drive_type: DriveType,
    uuid: Option<[u8; 16]>,
}

impl MemDisk {
    /// A disk with the given bytes (a multiple of 512) and statuses, one per
    /// sector. Non-`Normal` sectors must hold zeros in `data`.
    pub fn new(data: Vec<u8>, status: Vec<SectorStatus>) -> Result<MemDisk> {
        let sectors = sectors_in(data.len())?;
        if status.len() as u64 != sectors {
            return Err(Error::InvalidArgument(format!(
                "{} statuses for {} sectors",
                status.len(),
                sectors
            )));
        }
        Ok(MemDisk {
            data,
            status,
            drive_type: DriveType::Raw,
            uuid: None,
        })
    }

    /// Sets the UUID the disk reports.
    pub fn with_uuid(mut self, uuid: [u8; 16]) -> MemDisk {
        self.uuid = Some(uuid);
        self
    }

    /// The disk's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The disk's per-sector statuses.
    pub fn statuses(&self) -> &[SectorStatus] {
        &self.status
    }
}

impl Disk for MemDisk {
    fn drive_type(&self) -> DriveType {
        self.drive_type
    }
    fn sector_count(&self) -> u64 {
        self.status.len() as u64
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.uuid
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let n = sectors_in(buf.len())?;
        check_range(lba, n, self.sector_count())?;
        let start = lba as usize * SECTOR_SIZE;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        self.block_status(lba, n)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        Ok(self.status[lba as usize..(lba + count) as usize]
            .iter()
            .fold(SectorStatus::NotAlloc, |acc, s| acc.combine(*s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_prefers_normal_then_blank() {
        use SectorStatus::*;
        assert_eq!(NotAlloc.combine(Blank), Blank);
        assert_eq!(Blank.combine(Normal), Normal);
        assert_eq!(NotAlloc.combine(NotAlloc), NotAlloc);
    }

    #[test]
    fn check_range_rejects_overflow_and_overrun() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(11, 0, 10).is_err());
        assert!(check_range(5, 6, 10).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
