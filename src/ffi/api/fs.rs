//! Filesystem-aware views (COW_OpenFilesystemView): a disk whose free
//! filesystem blocks read as unallocated, and the per-partition report.

use std::os::raw::c_char;

use super::open::adopt_source;
use crate::disk::Rejected;
use crate::error::{Error, Result};
use crate::ffi::guard;
use crate::ffi::handle::{self, Object};
use crate::ffi::types::*;
use crate::fs::{analyze, AnalyzeOptions, FilesystemView, Report};

/// Bytes of COW_FS_REGION.reason, with its terminating NUL (the literal
/// 256 in the struct, so the header needs no extra name).
const REASON_BYTES: usize = 256;

/// One region of a disk as COW_OpenFilesystemView found it: a partition,
/// or (number 0, filesystem COW_FS_UNPARTITIONED) the space after the last
/// partition, or (number 0) a whole disk without a partition table.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_FS_REGION {
    /// The partition's number as Linux numbers them (MBR 1..4, logical
    /// 5..; GPT entry index + 1), 0 for a region that is not a partition.
    pub number: u32,
    /// COW_FS_* (COW_FS_UNKNOWN when no filesystem was recognised).
    pub filesystem: u32,
    /// First sector and length in sectors.
    pub start: u64,
    pub sectors: u64,
    /// Sectors kept in a clone through the view, and sectors read as
    /// unallocated (used + free = sectors).
    pub used_sectors: u64,
    pub free_sectors: u64,
    /// Why the region is kept whole although it might hold free space
    /// (unknown filesystem, journal needing recovery, a checksum that does
    /// not match, ...), NUL-terminated; empty when it was read.
    pub reason: [c_char; 256],
}

/// What COW_OpenFilesystemView found. Set struct_size to
/// sizeof(COW_FS_REPORT) and point `regions` at an array of
/// `region_capacity` COW_FS_REGIONs (or NULL and 0 for the totals only)
/// before the call; a later, larger version of this struct (struct_size)
/// also tells which COW_FS_REGION layout the array has.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_FS_REPORT {
    /// sizeof(COW_FS_REPORT) as the caller compiled it.
    pub struct_size: u32,
    /// In: entries the `regions` array holds.
    pub region_capacity: u32,
    /// In: the caller's array (filled with the first `region_capacity`
    /// regions), or NULL.
    pub regions: *mut COW_FS_REGION,
    /// Out: regions found (may be more than region_capacity).
    pub region_count: u32,
    /// Out: nonzero when the disk has a partition table that was read.
    pub has_table: u32,
    /// Out: the disk's size in sectors.
    pub disk_sectors: u64,
    /// Out: sectors read as unallocated through the view, over the disk.
    pub free_sectors: u64,
}

fn check_report(report: *mut COW_FS_REPORT) -> Result<()> {
    if report.is_null() {
        return Ok(());
    }
    // SAFETY: non-NULL; struct_size is the first member.
    let size = unsafe { std::ptr::addr_of!((*report).struct_size).read_unaligned() };
    if (size as usize) < std::mem::size_of::<COW_FS_REPORT>() {
        return Err(Error::invalid_argument(format!(
            "COW_FS_REPORT.struct_size {size} is smaller than {}",
            std::mem::size_of::<COW_FS_REPORT>()
        )));
    }
    // SAFETY: struct_size covers the whole struct (checked above).
    let r = unsafe { report.read_unaligned() };
    if r.regions.is_null() && r.region_capacity != 0 {
        return Err(Error::invalid_argument(
            "COW_FS_REPORT.regions is NULL but region_capacity is not 0".into(),
        ));
    }
    Ok(())
}

fn region_of(found: &crate::fs::RegionReport) -> COW_FS_REGION {
    let mut reason = [0 as c_char; REASON_BYTES];
    let text = found.reason.as_deref().unwrap_or("");
    for (dst, src) in reason.iter_mut().zip(text.bytes().take(REASON_BYTES - 1)) {
        *dst = src as c_char;
    }
    COW_FS_REGION {
        number: found.number,
        filesystem: found.filesystem as u32,
        start: found.start,
        sectors: found.sectors,
        used_sectors: found.used_sectors,
        free_sectors: found.free_sectors,
        reason,
    }
}

/// Writes `found` into the caller's report (checked by `check_report`).
unsafe fn fill_report(report: *mut COW_FS_REPORT, found: &Report) {
    if report.is_null() {
        return;
    }
    // SAFETY: checked by check_report before the view was made.
    let mut r = unsafe { report.read_unaligned() };
    let count = found.regions.len();
    let capacity = usize::try_from(r.region_capacity).unwrap_or(usize::MAX);
    for (i, region) in found.regions.iter().take(capacity).enumerate() {
        // SAFETY: the caller's array holds region_capacity entries.
        unsafe { r.regions.add(i).write_unaligned(region_of(region)) };
    }
    r.region_count = u32::try_from(count).unwrap_or(u32::MAX);
    r.has_table = u32::from(found.table.is_some());
    r.disk_sectors = found.disk_sectors;
    r.free_sectors = found.free_sectors;
    // SAFETY: as above.
    unsafe { report.write_unaligned(r) };
}

/// Opens a view of `src` in which the blocks its filesystems do not use
/// read as unallocated zeros (VDDR_RSLT_NOTALLOC), so a clone through it
/// (COW_CloneToFile, or the caller's own ReadPage loop skipping NOTALLOC)
/// leaves them out. The partitions are found in the MBR (with logical
/// partitions) or GPT; free space is read from ext2/3/4 block bitmaps,
/// FAT12/16/32 allocation tables, NTFS $Bitmap and Linux swap headers, and the space
/// after the last partition is free (not the GPT backup structures;
/// COW_FS_KEEP_UNPARTITIONED keeps it). Anything not fully understood - an
/// unknown filesystem, a journal that needs recovery, an unclean or damaged
/// filesystem - is kept whole, and the report says why.
///
/// `src` is a disk or overlay handle of this library or the caller's own
/// object starting with a VDDR table; it must not change while the view is
/// open (the free map is read once, here). `report` may be NULL; else it
/// is filled on success (see COW_FS_REPORT). On success the view owns
/// `src` (closing the view closes it; do not use or close `src`
/// afterwards), as COW_CreateCowOverlay; the view is read-only (edit
/// methods fail with COW_ERR_NOT_OVERLAY; put an overlay on top to edit).
/// On failure returns NULL and the caller still owns `src`:
/// COW_ERR_INVALID_ARG for unknown flags or a bad report, or the error of
/// reading the disk.
#[no_mangle]
pub unsafe extern "C" fn COW_OpenFilesystemView(
    src: HVDDR,
    flags: u32,
    report: *mut COW_FS_REPORT,
) -> HVDDR {
    guard(|| {
        if flags & !COW_FS_KEEP_UNPARTITIONED != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown COW_OpenFilesystemView flags {:#x}",
                flags & !COW_FS_KEEP_UNPARTITIONED
            )));
        }
        check_report(report)?;
        let options = AnalyzeOptions {
            keep_unpartitioned: flags & COW_FS_KEEP_UNPARTITIONED != 0,
        };
        let (view, found) = adopt_source(src, |mut disk| match analyze(disk.as_mut(), &options) {
            Ok(analysis) => Ok(FilesystemView::from_analysis(disk, analysis)),
            Err(error) => Err(Rejected {
                error,
                source: disk,
            }),
        })?;
        // SAFETY: checked above.
        unsafe { fill_report(report, &found) };
        Ok(handle::register(Object::Disk(Box::new(view))))
    })
}
