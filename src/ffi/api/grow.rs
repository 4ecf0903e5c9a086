//! Growing the filesystem in a partition of an overlay
//! (COW_GrowFilesystem), after the partition itself was enlarged.

use std::os::raw::c_int;

use super::edit::with_overlay;
use crate::error::{Error, Result};
use crate::ffi::guard_code;
use crate::ffi::types::*;
use crate::fs::{grow_filesystem_with, GrowOptions, GrowReport};

/// What COW_GrowFilesystem did (or, with COW_GROW_DRY_RUN, would do). Set
/// struct_size to sizeof(COW_GROW_REPORT) before the call; the rest is
/// filled on success.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_GROW_REPORT {
    /// sizeof(COW_GROW_REPORT) as the caller compiled it.
    pub struct_size: u32,
    /// COW_FS_* of the filesystem grown.
    pub filesystem: u32,
    /// Bytes per allocation unit (cluster).
    pub cluster_bytes: u64,
    /// The filesystem's size before and after, in 512-byte sectors.
    pub old_sectors: u64,
    pub new_sectors: u64,
    /// Allocation units before and after.
    pub old_clusters: u64,
    pub new_clusters: u64,
    /// Sectors inserted into the partition for metadata (a larger FAT);
    /// the data behind them moved up without being copied, and as many
    /// were removed from the partition's end.
    pub inserted_sectors: u64,
    /// Free bytes before and after.
    pub old_free_bytes: u64,
    pub new_free_bytes: u64,
}

fn check_report(report: *mut COW_GROW_REPORT) -> Result<()> {
    if report.is_null() {
        return Ok(());
    }
    // SAFETY: non-NULL; struct_size is the first member.
    let size = unsafe { std::ptr::addr_of!((*report).struct_size).read_unaligned() };
    if (size as usize) < std::mem::size_of::<COW_GROW_REPORT>() {
        return Err(Error::invalid_argument(format!(
            "COW_GROW_REPORT.struct_size {size} is smaller than {}",
            std::mem::size_of::<COW_GROW_REPORT>()
        )));
    }
    Ok(())
}

fn report_of(r: &GrowReport) -> COW_GROW_REPORT {
    COW_GROW_REPORT {
        struct_size: std::mem::size_of::<COW_GROW_REPORT>() as u32,
        filesystem: r.filesystem as u32,
        cluster_bytes: r.cluster_bytes,
        old_sectors: r.old_sectors,
        new_sectors: r.new_sectors,
        old_clusters: r.old_clusters,
        new_clusters: r.new_clusters,
        inserted_sectors: r.inserted_sectors,
        old_free_bytes: r.old_free_bytes,
        new_free_bytes: r.new_free_bytes,
    }
}

/// Grows the filesystem of the partition that starts at sector
/// `part_start_lba` of overlay `h` to fill `new_sectors` sectors (the
/// partition's size; enlarge the partition first). FAT12/16/32, NTFS and
/// ext2/3/4 are grown. The FAT type never changes: a size that would need
/// another type is refused; ext growth that would need more group
/// descriptor blocks than are reserved (without meta_bg) is refused
/// (COW_ERR_UNSUPPORTED, naming the largest size that fits).
/// Everything is checked before the first write, so a refusal leaves the
/// overlay unchanged: a dirty or hibernated volume (COW_ERR_UNSUPPORTED),
/// an inconsistent one such as FAT copies that differ (COW_ERR_CORRUPT).
/// `flags`: 0 or COW_GROW_DRY_RUN (check and report only). `report` may
/// be NULL; else it is filled on success (see COW_GROW_REPORT). Returns a
/// COW_ERR_* code, 0 = no error; COW_ERR_NOT_OVERLAY when `h` is not an
/// overlay, COW_ERR_INVALID_ARG for unknown flags, a bad report or a range
/// outside the drive.
#[no_mangle]
pub unsafe extern "C" fn COW_GrowFilesystem(
    h: HCOW,
    part_start_lba: u64,
    new_sectors: u64,
    flags: u32,
    report: *mut COW_GROW_REPORT,
) -> c_int {
    guard_code(|| {
        if flags & !COW_GROW_DRY_RUN != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown COW_GrowFilesystem flags {:#x}",
                flags & !COW_GROW_DRY_RUN
            )));
        }
        check_report(report)?;
        let options = GrowOptions {
            dry_run: flags & COW_GROW_DRY_RUN != 0,
        };
        let done = with_overlay(h, |ov| {
            grow_filesystem_with(ov, part_start_lba, new_sectors, &options)
        })?;
        if !report.is_null() {
            let mut out = report_of(&done);
            // SAFETY: checked by check_report; the caller's struct_size is
            // kept (a later, larger struct keeps its own size).
            unsafe {
                out.struct_size = std::ptr::addr_of!((*report).struct_size).read_unaligned();
                report.write_unaligned(out);
            }
        }
        Ok(())
    })
}
