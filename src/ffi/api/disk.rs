//! Disk methods (the VDDR table), valid on every handle.

use std::os::raw::{c_int, c_void};

use super::{page_sectors, status_code, TRUE};
use crate::disk::{check_range, Disk, SectorStatus, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::ffi::handle::{self, Object};
use crate::ffi::types::*;
use crate::ffi::{guard, guard_code, guard_or, non_null};
use crate::formats::media_registry;

/// Returns the drive type (VDD_TYPE_*); an overlay is VDD_TYPE_COW.
/// VDD_TYPE_INVALID for a bad handle.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveType(h: HVDDR) -> u32 {
    guard_or(VDD_TYPE_INVALID, || {
        handle::read_object(h, |o| Ok(o.disk_ref().drive_type() as u32))
    })
}

/// Stores the drive size in bytes in `*bytes`. Returns TRUE, or FALSE for a
/// bad handle or NULL `bytes`.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveSize(h: HVDDR, bytes: *mut u64) -> c_int {
    guard(|| {
        let size = handle::read_object(h, |o| Ok(o.disk_ref().byte_size()))?;
        non_null(bytes, "bytes")?;
        // SAFETY: non-NULL out pointer.
        unsafe { bytes.write(size) };
        Ok(TRUE)
    })
}

pub(super) fn block_count(h: HVDDR, shift: u32) -> Result<u64> {
    let per_page = page_sectors(shift)?;
    let sectors = handle::read_object(h, |o| Ok(o.disk_ref().sector_count()))?;
    Ok(sectors.div_ceil(per_page))
}

/// Returns the number of pages of 2^SPBshift sectors the drive spans,
/// rounding up. 0 with COW_ERR_INVALID_ARG when the count exceeds 32 bits
/// (use COW_GetDriveBlockCount64) or SPBshift > 24.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveBlockCount(h: HVDDR, SPBshift: u32) -> u32 {
    guard(|| {
        let count = block_count(h, SPBshift)?;
        u32::try_from(count).map_err(|_| {
            Error::invalid_argument(format!(
                "{count} pages do not fit 32 bits; use COW_GetDriveBlockCount64"
            ))
        })
    })
}

/// 64-bit COW_GetDriveBlockCount: stores the page count in `*count`.
/// Returns a COW_ERR_* code, 0 on success.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveBlockCount64(
    h: HVDDR,
    SPBshift: u32,
    count: *mut u64,
) -> c_int {
    guard_code(|| {
        let n = block_count(h, SPBshift)?;
        non_null(count, "count")?;
        // SAFETY: non-NULL out pointer.
        unsafe { count.write(n) };
        Ok(())
    })
}

/// Returns the status of sectors LBA_start..=LBA_end (inclusive) from
/// metadata, without reading data (unless the overlay was made with
/// COW_OPT_DETECT_ZEROS): VDDR_RSLT_NORMAL if any sector holds data, else
/// BLANKPAGE if any is known zero, else NOTALLOC. Sectors past the end of
/// the drive count as NOTALLOC, as the legacy header asks ("out of range
/// LBAs should return VDDR_RSLT_NOTALLOC"): a range running past the end is
/// clipped to it (so the last partial page can be asked), and a range
/// wholly past it, or empty (LBA_end < LBA_start), is NOTALLOC.
/// VDDR_RSLT_FAIL only for a bad handle or a failing source.
#[no_mangle]
pub unsafe extern "C" fn COW_BlockStatus(h: HVDDR, LBA_start: u64, LBA_end: u64) -> u32 {
    guard(|| {
        handle::read_object(h, |o| {
            let disk = o.disk_ref();
            let size = disk.sector_count();
            if LBA_start >= size || LBA_end < LBA_start {
                return Ok(SectorStatus::NotAlloc.legacy_code());
            }
            let end = LBA_end.min(size - 1);
            Ok(disk
                .block_status(LBA_start, end - LBA_start + 1)?
                .legacy_code())
        })
    })
}

/// Stores the drive's UUID in `*uuid`, laid out as VirtualBox's RTUUID
/// (the legacy S_UUID: `Gen.u32TimeLow` is the first group of the text
/// form). An overlay reports its source's. FALSE with COW_ERR_UNSUPPORTED
/// (and `*uuid` zeroed) for a disk without one, such as a raw image.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveUUID(h: HVDDR, uuid: *mut S_UUID) -> c_int {
    guard(|| {
        // VirtualBox's form of the UUID (a VHD's footer bytes are its RTUUID
        // bytes as they are): the same bytes VDDR_QuickGetUUID gives.
        let found = handle::read_object(h, |o| {
            let kind = match o {
                Object::Overlay(ov) => ov.source().drive_type(),
                Object::Disk(d) => d.drive_type(),
            };
            Ok(o.disk_ref()
                .uuid()
                .map(|u| media_registry::registry_key(kind, u)))
        })?;
        non_null(uuid, "uuid")?;
        // SAFETY: non-NULL out pointer.
        unsafe { uuid.write(found.map(S_UUID::from_rfc).unwrap_or_default()) };
        match found {
            Some(_) => Ok(TRUE),
            None => Err(Error::unsupported("this disk has no UUID".into())),
        }
    })
}

/// TRUE if the disk is a differencing image or snapshot (an overlay
/// answers for its source). FALSE otherwise or on error (check
/// COW_GetLastError to tell the two apart).
#[no_mangle]
pub unsafe extern "C" fn COW_IsSnapshot(h: HVDDR) -> c_int {
    guard(|| handle::read_object(h, |o| Ok(c_int::from(o.disk_ref().is_snapshot()))))
}

/// Reads page `iPage` of 2^SPBshift sectors into `buf`, which must hold a
/// whole page. The last page may run past the end of the drive: that part
/// is zero-filled. Returns VDDR_RSLT_NORMAL, BLANKPAGE or NOTALLOC (parts
/// that are not NORMAL are zero-filled), or VDDR_RSLT_FAIL (0) with
/// COW_ERR_INVBLOCK for a page past the end, COW_ERR_INVALID_ARG for
/// SPBshift > 24 or a NULL `buf`, or a read error.
#[no_mangle]
pub unsafe extern "C" fn COW_ReadPage(
    h: HVDDR,
    buf: *mut c_void,
    iPage: u32,
    SPBshift: u32,
) -> c_int {
    guard(|| {
        let per_page = page_sectors(SPBshift)?;
        handle::read_object(h, |o| {
            let disk = o.disk_ref();
            let size = disk.sector_count();
            let start = u64::from(iPage) * per_page;
            if start >= size {
                return Err(Error::invalid_block(format!(
                    "page {iPage} of 2^{SPBshift} sectors starts past the end of a drive of {size} sectors"
                )));
            }
            non_null(buf, "buf")?;
            let inside = (size - start).min(per_page);
            // SAFETY: the caller's buffer holds a whole page.
            let page = unsafe {
                std::slice::from_raw_parts_mut(buf.cast::<u8>(), per_page as usize * SECTOR_SIZE)
            };
            let (head, tail) = page.split_at_mut(inside as usize * SECTOR_SIZE);
            tail.fill(0);
            Ok(status_code(disk.read_sectors(start, head)?))
        })
    })
}

/// Reads `nSectors` sectors from `LBA` into `buf` (nSectors * 512 bytes).
/// Returns VDDR_RSLT_NORMAL if any sector read is data, else BLANKPAGE or
/// NOTALLOC (non-data parts zero-filled); VDDR_RSLT_FAIL (0) with
/// COW_ERR_INVBLOCK, touching nothing, when the range is not wholly inside
/// the drive. Reading zero sectors returns VDDR_RSLT_NORMAL, as the legacy
/// module did.
#[no_mangle]
pub unsafe extern "C" fn COW_ReadSectors(
    h: HVDDR,
    buf: *mut c_void,
    LBA: u64,
    nSectors: u32,
) -> c_int {
    guard(|| {
        handle::read_object(h, |o| {
            let disk = o.disk_ref();
            let n = u64::from(nSectors);
            if n == 0 {
                return Ok(status_code(SectorStatus::Normal));
            }
            check_range(LBA, n, disk.sector_count())?;
            non_null(buf, "buf")?;
            // SAFETY: the caller's buffer holds nSectors sectors.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(buf.cast::<u8>(), nSectors as usize * SECTOR_SIZE)
            };
            Ok(status_code(disk.read_sectors(LBA, bytes)?))
        })
    })
}

/// Closes a handle: an overlay flushes a persistent store (or drops an
/// anonymous one) and closes its source; a disk closes its files. Always
/// returns NULL (assign it to the handle); the handle is gone even when a
/// persistent store's final flush fails, which sets the last error.
/// A bad handle sets COW_ERR_INVHANDLE.
#[no_mangle]
pub unsafe extern "C" fn COW_Close(h: HVDDR) -> HVDDR {
    guard(|| {
        if let Object::Overlay(overlay) = handle::take(h)? {
            // A persistent overlay flushes and checkpoints; report failure.
            overlay.close()?;
        }
        Ok(std::ptr::null_mut())
    })
}
