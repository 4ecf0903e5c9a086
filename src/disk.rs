//! The `Disk` abstraction: anything that can be read sector by sector.
//!
//! Every source format, a caller's own C object and the overlay itself are
//! `Disk`s, so an overlay can sit on any of them (even on another overlay).

use std::path::Path;

use crate::error::{Error, Result};

/// Bytes in a sector. All positions in the library are in these units.
pub const SECTOR_SIZE: usize = 512;
/// `SECTOR_SIZE` as a u64, for offset arithmetic.
pub const SECTOR_BYTES: u64 = SECTOR_SIZE as u64;

/// What a range of sectors holds, as far as the metadata tells; and the
/// kind of an open disk. Both are C-visible numbers, defined in
/// [`crate::numbers`].
pub use crate::numbers::{DriveType, SectorStatus};

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
        SectorStatus::from_u32(code)
    }
}

/// Why a constructor that takes a disk (an overlay over it, a view of it)
/// failed, with the disk handed back untouched: everything that can fail
/// happens before the disk is taken, so the caller still owns it (the C
/// API's "adopted on success only").
pub struct Rejected {
    pub error: Error,
    pub source: Box<dyn Disk>,
}

impl From<Rejected> for Error {
    fn from(rejected: Rejected) -> Error {
        rejected.error
    }
}

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.error, f)
    }
}

/// A readable disk of `sector_count()` sectors.
///
/// Reads take `&self` and a disk is `Sync`, so several threads may read
/// one disk at once (the C layer lets reads of a handle run in parallel);
/// implementations keep their caches behind short locks. `Any` lets a layer
/// that handed a disk away and got it back (a failed constructor) recover
/// its concrete type.
pub trait Disk: Send + Sync + std::any::Any {
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

    /// The UUID of the parent a differencing image records, for formats
    /// that record one (VDI).
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        None
    }

    /// Reads `buf.len() / 512` sectors starting at `lba` into `buf` and tells
    /// what they were. Sectors that are not `Normal` are zero-filled.
    ///
    /// The caller guarantees `buf.len()` is a multiple of 512 and the range
    /// lies inside the disk; implementations may still check.
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus>;

    /// The combined status of `count` sectors from `lba`, answered from
    /// metadata without reading data. The range lies inside the disk.
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus>;

    /// The status of sector `lba` alone, and for how many of the `count`
    /// sectors from `lba` (at least 1) it holds. A run may stop before the
    /// status changes (the caller asks again from where it ends) but never
    /// past it: the overlay builds its sector-exact map from these runs.
    /// The caller guarantees `count > 0` and that the range lies inside
    /// the disk.
    ///
    /// The default is exact but slow: after one `block_status` of the whole
    /// range (which settles an all-`NotAlloc` range at once) it asks
    /// `block_status` sector by sector until the status changes. Only
    /// caller-supplied C objects and backend tables use it; the library's
    /// formats, `MemDisk` and the overlay answer from their own metadata.
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        if count == 0 {
            return Err(Error::invalid_argument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        if self.block_status(lba, count)? == SectorStatus::NotAlloc {
            return Ok((SectorStatus::NotAlloc, count));
        }
        let first = self.block_status(lba, 1)?;
        let mut run = 1;
        while run < count && self.block_status(lba + run, 1)? == first {
            run += 1;
        }
        Ok((first, run))
    }

    /// True when sectors `[lba, lba + count)` (inside the disk) read as
    /// zeros. The default reads them; a disk that knows ranges read as
    /// zeros without reading them (an overlay's inserted ranges) answers
    /// those from its metadata, so a zero check over a huge unallocated
    /// range costs nothing.
    fn reads_as_zeros(&self, lba: u64, count: u64) -> Result<bool> {
        zeros_by_reading(self, lba, count)
    }
}

/// Sectors per read of `zeros_by_reading` (1 MiB).
const ZERO_CHECK_SECTORS: u64 = 2048;

/// `Disk::reads_as_zeros` by reading the range, 1 MiB at a time.
pub fn zeros_by_reading<D: Disk + ?Sized>(disk: &D, lba: u64, count: u64) -> Result<bool> {
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
    fn parent_uuid(&self) -> Option<[u8; 16]> {
        (**self).parent_uuid()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        (**self).read_sectors(lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        (**self).block_status(lba, count)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        (**self).status_run(lba, count)
    }
    fn reads_as_zeros(&self, lba: u64, count: u64) -> Result<bool> {
        (**self).reads_as_zeros(lba, count)
    }
}

// ---------------------------------------------------------------------------
// Capabilities beyond reading. Most disks only read; the few image formats
// that can do more (UML COW and VCI) say so by implementing these.

/// A disk that can be written: an image opened for writing.
pub trait WritableDisk: Disk {
    /// Writes whole sectors at `lba`.
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()>;

    /// Makes every acknowledged write durable.
    fn flush(&mut self) -> Result<()>;
}

/// A disk that can drop sectors out of its file: they are no longer held
/// there (they read as the backing, or as unallocated zeros).
pub trait DiscardDisk: Disk {
    fn discard_sectors(&mut self, lba: u64, count: u64) -> Result<()>;
}

/// What an image file records about itself besides its sectors. The
/// setters fail on an image opened read-only; a format that does not store
/// an item says `Unsupported`.
pub trait ImageMetadata {
    /// The format's version number, as the file records it.
    fn format_version(&self) -> u32;

    /// True for a preallocated ("fixed") image.
    fn is_fixed(&self) -> bool {
        false
    }

    /// The image's comment.
    fn comment(&self) -> Result<String> {
        Err(Error::unsupported("this format stores no comment".into()))
    }

    /// Changes the image's comment.
    fn set_comment(&mut self, comment: &str) -> Result<()> {
        let _ = comment;
        Err(Error::unsupported("this format stores no comment".into()))
    }

    /// Changes the image's UUID.
    fn set_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        let _ = uuid;
        Err(Error::unsupported("this format stores no UUID".into()))
    }

    /// The image's modification UUID.
    fn modification_uuid(&self) -> Option<[u8; 16]> {
        None
    }

    /// Changes the image's modification UUID.
    fn set_modification_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        let _ = uuid;
        Err(Error::unsupported(
            "this format stores no modification UUID".into(),
        ))
    }
}

/// An image file a format can open for writing (or read-only, then every
/// write fails): the disk with everything it can do. One trait over the
/// capabilities above, because a trait object has one trait.
pub trait ImageFile: WritableDisk + ImageMetadata {
    /// Whether the sectors from `lba` are held in this image file (true)
    /// or not (false: they come from the backing or read as unallocated),
    /// and for how many of the `count` sectors (at least 1 when
    /// `count > 0`) that holds.
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)>;

    /// The image's file.
    fn path(&self) -> &Path;

    /// The size of the image file in bytes.
    fn file_size(&self) -> u64;

    /// True when the image was opened for writing.
    fn is_writable(&self) -> bool;

    /// True when the image reads unchanged sectors from a backing file it
    /// opened.
    fn has_backing(&self) -> bool {
        false
    }

    /// The image as a [`DiscardDisk`], for formats that can discard.
    fn as_discard(&mut self) -> Option<&mut dyn DiscardDisk> {
        None
    }

    /// A human-readable description of the image's metadata.
    fn dump(&self) -> String;

    /// Closes the image cleanly (flushing what a writable image holds).
    fn close(self: Box<Self>) -> Result<()>;
}

/// Checks that `count` sectors from `lba` lie wholly inside a disk of
/// `size` sectors, without overflowing.
pub fn check_range(lba: u64, count: u64, size: u64) -> Result<()> {
    match lba.checked_add(count) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid_block(format!(
            "sectors {lba}..+{count} are not inside a drive of {size} sectors"
        ))),
    }
}

/// Checks that a buffer holds whole sectors and returns how many.
pub fn sectors_in(buf_len: usize) -> Result<u64> {
    if !buf_len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::invalid_argument(format!(
            "buffer of {buf_len} bytes is not a whole number of sectors"
        )));
    }
    Ok((buf_len / SECTOR_SIZE) as u64)
}

/// A disk held entirely in memory with a per-sector status: a test source
/// and a building block for tests of everything that sits on a `Disk`
/// (the `test-utils` feature).
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Clone)]
pub struct MemDisk {
    data: Vec<u8>,
    status: Vec<SectorStatus>,
    drive_type: DriveType,
    uuid: Option<[u8; 16]>,
}

#[cfg(any(test, feature = "test-utils"))]
impl MemDisk {
    /// A disk with the given bytes (a multiple of 512) and statuses, one per
    /// sector. Non-`Normal` sectors must hold zeros in `data`.
    pub fn new(data: Vec<u8>, status: Vec<SectorStatus>) -> Result<MemDisk> {
        let sectors = sectors_in(data.len())?;
        if status.len() as u64 != sectors {
            return Err(Error::invalid_argument(format!(
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

#[cfg(any(test, feature = "test-utils"))]
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
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let n = sectors_in(buf.len())?;
        check_range(lba, n, self.sector_count())?;
        let start = lba as usize * SECTOR_SIZE;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        self.block_status(lba, n)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        Ok(self.status[lba as usize..(lba + count) as usize]
            .iter()
            .fold(SectorStatus::NotAlloc, |acc, s| acc.combine(*s)))
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        let statuses = &self.status[lba as usize..(lba + count) as usize];
        let first = *statuses.first().ok_or_else(|| {
            Error::invalid_argument("the status run of zero sectors was asked".into())
        })?;
        let run = statuses.iter().take_while(|&&s| s == first).count();
        Ok((first, run as u64))
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

    /// A disk that answers only `block_status`, so `status_run` is the
    /// trait's default.
    struct StatusOnly(MemDisk);

    impl Disk for StatusOnly {
        fn drive_type(&self) -> DriveType {
            DriveType::Custom
        }
        fn sector_count(&self) -> u64 {
            self.0.sector_count()
        }
        fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
            self.0.read_sectors(lba, buf)
        }
        fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
            self.0.block_status(lba, count)
        }
    }

    #[test]
    fn status_runs_are_exact_by_default_and_for_mem_disks() {
        use SectorStatus::*;
        let pattern = [
            Normal, Normal, Blank, NotAlloc, NotAlloc, NotAlloc, Normal, Blank,
        ];
        let status: Vec<SectorStatus> = (0..64).map(|i| pattern[(i * i / 3) % 8]).collect();
        let mem = MemDisk::new(vec![0; 64 * SECTOR_SIZE], status.clone()).unwrap();
        let default = StatusOnly(mem.clone());
        for lba in 0..64u64 {
            for count in 1..=64 - lba {
                // The naive answer: the first status and how far it lasts.
                let first = status[lba as usize];
                let run = status[lba as usize..(lba + count) as usize]
                    .iter()
                    .take_while(|&&s| s == first)
                    .count() as u64;
                assert_eq!(mem.status_run(lba, count).unwrap(), (first, run));
                assert_eq!(default.status_run(lba, count).unwrap(), (first, run));
            }
        }
        assert!(mem.status_run(3, 0).is_err());
        assert!(default.status_run(3, 0).is_err());
        assert!(mem.status_run(60, 5).is_err());
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
