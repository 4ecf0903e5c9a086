//! Inspecting an overlay's extent map.

use std::os::raw::c_int;

use super::edit::read_overlay;
use crate::error::Error;
use crate::ffi::types::*;
use crate::ffi::{guard_code, non_null};
use crate::store::extents::{Extent, ExtentKind};

pub(super) fn c_extent(start: u64, e: Extent) -> COW_EXTENT {
    COW_EXTENT {
        start,
        length: e.len,
        position: e.base,
        kind: match e.kind {
            ExtentKind::None => COW_EXTENT_NONE,
            ExtentKind::Source => COW_EXTENT_SOURCE,
            ExtentKind::Store => COW_EXTENT_STORE,
            ExtentKind::StoreHole => COW_EXTENT_STORE_HOLE,
            ExtentKind::StoreZero => COW_EXTENT_STORE_ZERO,
        },
        reserved: 0,
    }
}

/// Stores the number of extents of the overlay's map in `*count`.
/// Returns a COW_ERR_* code, 0 on success.
#[no_mangle]
pub unsafe extern "C" fn COW_GetExtentCount(h: HCOW, count: *mut u64) -> c_int {
    guard_code(|| {
        let n = read_overlay(h, |ov| Ok(ov.extents().extent_count()))?;
        non_null(count, "count")?;
        // SAFETY: non-NULL out pointer.
        unsafe { count.write(n) };
        Ok(())
    })
}

/// Stores extent number `index` (0-based, in drive order) in `*extent`.
/// O(log n). Returns a COW_ERR_* code, 0 on success: COW_ERR_INVALID_ARG
/// when index >= the count.
#[no_mangle]
pub unsafe extern "C" fn COW_GetExtent(h: HCOW, index: u64, extent: *mut COW_EXTENT) -> c_int {
    guard_code(|| {
        let found = read_overlay(h, |ov| {
            ov.extents().nth(index).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "extent index {index} of {}",
                    ov.extents().extent_count()
                ))
            })
        })?;
        non_null(extent, "extent")?;
        // SAFETY: non-NULL out pointer.
        unsafe { extent.write(c_extent(found.0, found.1)) };
        Ok(())
    })
}

/// Stores the extent containing sector `LBA` in `*extent` (walk the map by
/// starting at 0 and stepping to start + length). Returns a COW_ERR_*
/// code, 0 on success: COW_ERR_INVBLOCK when LBA is past the end.
#[no_mangle]
pub unsafe extern "C" fn COW_GetExtentAt(h: HCOW, LBA: u64, extent: *mut COW_EXTENT) -> c_int {
    guard_code(|| {
        let found = read_overlay(h, |ov| {
            ov.extents().find(LBA).ok_or_else(|| {
                Error::invalid_block(format!(
                    "sector {LBA} is past the end of a drive of {} sectors",
                    ov.extents().len()
                ))
            })
        })?;
        non_null(extent, "extent")?;
        // SAFETY: non-NULL out pointer.
        unsafe { extent.write(c_extent(found.0, found.1)) };
        Ok(())
    })
}
