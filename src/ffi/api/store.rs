//! Persistent stores: reopening one (COW_OpenCowOverlay), COW_Flush, COW_CheckOverlayStore.

use std::os::raw::{c_char, c_int};

use super::edit::with_overlay;
use super::open::{adopt_source, c_path};
use crate::error::Error;
use crate::ffi::handle::{self, Object};
use crate::ffi::types::*;
use crate::ffi::{guard, guard_code, non_null};
use crate::overlay::{Overlay, OverlayOptions, StoreChoice};

/// Reopens the persistent overlay store at `store_path` over `src` (after a
/// close or a crash): the store's log is replayed, and `src` must be the
/// disk the store was made on - its size, UUID (where it has one) and a
/// fingerprint of sampled sectors are checked (COW_ERR_SOURCE_MISMATCH
/// names which differs). `flags`: COW_OPEN_READ_ONLY opens for inspection
/// and cloning only (replaying in memory, the file untouched). A store open
/// for writing elsewhere fails with COW_ERR_LOCKED; a damaged one with
/// COW_ERR_CORRUPT naming the structure and offset. Ownership of `src` as
/// COW_CreateCowOverlay: adopted on success, still the caller's on failure.
#[no_mangle]
pub unsafe extern "C" fn COW_OpenCowOverlay(
    store_path: *const c_char,
    src: HVDDR,
    flags: u32,
) -> HVDDR {
    guard(|| {
        non_null(store_path, "store_path")?;
        if flags & !COW_OPEN_READ_ONLY != 0 {
            return Err(Error::invalid_argument(format!("unknown flags {flags:#x}")));
        }
        let read_only = flags & COW_OPEN_READ_ONLY != 0;
        // SAFETY: non-NULL, NUL-terminated per the contract.
        let path = unsafe { c_path(store_path) }.unwrap_or_default();
        let store = StoreChoice::Open {
            path: &path,
            read_only,
        };
        let overlay = adopt_source(src, |disk| {
            Overlay::build(disk, store, OverlayOptions::default())
        })?;
        Ok(handle::register(Object::Overlay(Box::new(overlay))))
    })
}

/// The durability point of a persistent overlay: every edit and write
/// acknowledged before it survives a crash. Returns a COW_ERR_* code, 0 on
/// success (also for an anonymous store, where there is nothing to do).
#[no_mangle]
pub unsafe extern "C" fn COW_Flush(h: HCOW) -> c_int {
    guard_code(|| with_overlay(h, |ov| ov.flush()))
}

/// Checks the consistency of the persistent store at `store_path` without
/// changing it (its log is replayed in memory): structures and CRCs, the
/// extent map, sectors used twice, and the free-space bitmap against what
/// the map references. Fills `report` (set report->struct_size first).
/// Returns COW_ERR_NONE (0) when the check ran - read report->consistent
/// for the verdict - or a COW_ERR_* code when it could not run: the file
/// cannot be opened (COW_ERR_OPEN), is not a store (COW_ERR_CORRUPT) or is
/// locked by a writer (COW_ERR_LOCKED).
#[no_mangle]
pub unsafe extern "C" fn COW_CheckOverlayStore(
    store_path: *const c_char,
    report: *mut COW_CHECK_REPORT,
) -> c_int {
    guard_code(|| {
        non_null(store_path, "store_path")?;
        non_null(report, "report")?;
        // SAFETY: non-NULL; struct_size is the first member.
        let size = unsafe { std::ptr::addr_of!((*report).struct_size).read_unaligned() };
        if (size as usize) < std::mem::size_of::<COW_CHECK_REPORT>() {
            return Err(Error::invalid_argument(format!(
                "COW_CHECK_REPORT.struct_size {size} is smaller than {}",
                std::mem::size_of::<COW_CHECK_REPORT>()
            )));
        }
        // SAFETY: non-NULL, NUL-terminated per the contract.
        let path = unsafe { c_path(store_path) }.unwrap_or_default();
        let found = crate::store::check_store_file(&path)?;
        let mut problems = [0 as c_char; 512];
        let text = found.problems.join("\n");
        for (dst, src) in problems.iter_mut().zip(text.bytes().take(511)) {
            *dst = src as c_char;
        }
        let out = COW_CHECK_REPORT {
            struct_size: size,
            consistent: u32::from(found.is_consistent()),
            extents: found.extents,
            units_total: found.units_total,
            units_in_use: found.units_in_use,
            leaked_units: found.leaked_units,
            unmarked_units: found.unmarked_units,
            doubly_used_sectors: found.doubly_used_sectors,
            pending_transactions: found.pending_transactions,
            problems,
        };
        // SAFETY: non-NULL, large enough (checked above).
        unsafe { report.write_unaligned(out) };
        Ok(())
    })
}
