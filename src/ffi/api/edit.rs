//! Overlay methods (the COWOVL table): edits; COW_ERR_NOT_OVERLAY on other disks.

use std::os::raw::{c_int, c_void};

use super::{hcow, status_code};
use crate::disk::{check_range, Disk, SectorStatus, SECTOR_SIZE};
use crate::error::Result;
use crate::ffi::handle::{self};
use crate::ffi::types::*;
use crate::ffi::{guard, guard_code, non_null};
use crate::overlay::Overlay;

pub(super) fn with_overlay<T>(h: HCOW, f: impl FnOnce(&mut Overlay) -> Result<T>) -> Result<T> {
    handle::with_object(hcow(h), |o| f(o.overlay()?))
}

/// Runs `f` on overlay `h` for reading, sharing the handle with other
/// readers.
pub(super) fn read_overlay<T>(h: HCOW, f: impl FnOnce(&Overlay) -> Result<T>) -> Result<T> {
    handle::read_object(hcow(h), |o| f(o.overlay_ref()?))
}

/// Inserts `nSectors` unallocated sectors before `LBA` (LBA == drive size
/// appends); the drive grows. They read as zeros with VDDR_RSLT_NOTALLOC.
/// Works at any time, also after writes and at LBA 0. Returns a COW_ERR_*
/// code, 0 = no error (as the legacy header says): COW_ERR_INVBLOCK when
/// LBA is past the end.
#[no_mangle]
pub unsafe extern "C" fn COW_InsertSectors(h: HCOW, LBA: u64, nSectors: u32) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.insert(LBA, u64::from(nSectors))))
}

/// COW_InsertSectors with a 64-bit count. Returns a COW_ERR_* code.
#[no_mangle]
pub unsafe extern "C" fn COW_InsertSectorsEx(h: HCOW, LBA: u64, nSectors: u64) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.insert(LBA, nSectors)))
}

/// Cuts sectors [LBA_from, LBA_from + nSectors) and pastes them so they
/// start at what was sector LBA_to before the cut (LBA_to == drive size
/// moves them to the end). No data is copied. Returns a COW_ERR_* code,
/// 0 = no error (as the legacy header says): COW_ERR_INVALIDMOVE when
/// LBA_from <= LBA_to <= LBA_from + nSectors, COW_ERR_INVBLOCK when a
/// range is outside the drive.
#[no_mangle]
pub unsafe extern "C" fn COW_MoveSectors(
    h: HCOW,
    LBA_from: u64,
    LBA_to: u64,
    nSectors: u32,
) -> c_int {
    guard_code(|| {
        with_overlay(h, |ov| {
            ov.move_sectors(LBA_from, LBA_to, u64::from(nSectors))
        })
    })
}

/// COW_MoveSectors with a 64-bit count. Returns a COW_ERR_* code.
#[no_mangle]
pub unsafe extern "C" fn COW_MoveSectorsEx(
    h: HCOW,
    LBA_from: u64,
    LBA_to: u64,
    nSectors: u64,
) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.move_sectors(LBA_from, LBA_to, nSectors)))
}

/// Writes `nSectors` sectors from `buffer` at `LBA`, copy-on-write: the
/// source is never written. Store space is taken in COW units (the
/// granularity), but only the written sectors become data: the rest of a
/// unit keeps what it showed, and its status. Returns VDDR_RSLT_NORMAL, as
/// the legacy module did (writing zero sectors too), or VDDR_RSLT_FAIL (0)
/// with COW_ERR_INVBLOCK (nothing written) when the range is not wholly
/// inside the drive, or a write error.
#[no_mangle]
pub unsafe extern "C" fn COW_WriteSectors(
    h: HCOW,
    buffer: *mut c_void,
    LBA: u64,
    nSectors: u32,
) -> c_int {
    guard(|| {
        with_overlay(h, |ov| {
            check_range(LBA, u64::from(nSectors), ov.sector_count())?;
            if nSectors == 0 {
                return Ok(status_code(SectorStatus::Normal));
            }
            non_null(buffer, "buffer")?;
            // SAFETY: the caller's buffer holds nSectors sectors.
            let data = unsafe {
                std::slice::from_raw_parts(buffer.cast::<u8>(), nSectors as usize * SECTOR_SIZE)
            };
            ov.write(LBA, data)
                .map(|_| status_code(SectorStatus::Normal))
        })
    })
}

/// Removes sectors [LBA, LBA + nSectors); the drive shrinks and the store
/// space they used is freed for reuse. Returns a COW_ERR_* code, 0 = no
/// error: COW_ERR_INVBLOCK when the range is not wholly inside the drive.
#[no_mangle]
pub unsafe extern "C" fn COW_DeleteSectors(h: HCOW, LBA: u64, nSectors: u64) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.delete(LBA, nSectors)))
}

/// Makes sectors [LBA, LBA + nSectors) unallocated: they read as zeros with
/// VDDR_RSLT_NOTALLOC and their store space is freed. Returns a COW_ERR_*
/// code, 0 = no error: COW_ERR_INVBLOCK when the range is not wholly
/// inside.
#[no_mangle]
pub unsafe extern "C" fn COW_DiscardSectors(h: HCOW, LBA: u64, nSectors: u64) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.discard(LBA, nSectors)))
}
