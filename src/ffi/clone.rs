//! COW_CloneToFile: writing any disk to a new image file.
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::handle;
use super::source::CallerDisk;
use super::types::{COW_CLONE_REPLACE, COW_PROGRESS_FN, HVDDR, VDD_TYPE_RAW, VDD_TYPE_VDI};
use super::{guard_code, non_null};
use crate::clone::{clone_to_file, CloneFormat, CloneOptions};
use crate::error::{Error, Result};

/// Writes the whole of `disk` (any HVDDR: an opened image, an overlay, or
/// the caller's own object starting with a VDDR table) to a new image file
/// at `path`, in `format`:
/// - VDD_TYPE_RAW: a flat image, sparse (holes where pages are NOTALLOC,
///   BLANKPAGE or all zeros);
/// - VDD_TYPE_VDI: a dynamic VDI image with 1 MiB blocks; such pages are
///   left unallocated.
///
/// `flags` is 0 or COW_CLONE_REPLACE. `progress` may be NULL; otherwise it
/// is called with `user` as COW_PROGRESS_FN says, and may cancel.
///
/// The finish is atomic: the image is written to a temporary file in the
/// same folder, synced, and renamed to `path` only when complete. On any
/// failure - a cancel (COW_ERR_CANCELLED), a read error, a full disk
/// (COW_ERR_NO_SPACE) - the temporary file is removed and nothing is left
/// at `path`. Returns a COW_ERR_* code, 0 on success (also the thread's
/// last error: COW_ERR_INVHANDLE, COW_ERR_INVALID_ARG for NULL `path`
/// or unknown flags, COW_ERR_UNSUPPORTED for another format, COW_ERR_OPEN
/// when `path` exists or its folder is not writable). `disk` stays open
/// and owned by the caller; its lock is held for the whole clone.
#[no_mangle]
pub unsafe extern "C" fn COW_CloneToFile(
    disk: HVDDR,
    path: *const c_char,
    format: u32,
    flags: u32,
    progress: COW_PROGRESS_FN,
    user: *mut c_void,
) -> c_int {
    guard_code(|| {
        if disk.is_null() {
            return Err(Error::invalid_handle("the disk handle is NULL".into()));
        }
        non_null(path, "path")?;
        if flags & !COW_CLONE_REPLACE != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown COW_CloneToFile flags {:#x}",
                flags & !COW_CLONE_REPLACE
            )));
        }
        let format = match format {
            VDD_TYPE_RAW => CloneFormat::Raw,
            VDD_TYPE_VDI => CloneFormat::Vdi,
            other => {
                return Err(Error::unsupported(format!(
                    "COW_CloneToFile writes VDD_TYPE_RAW ({VDD_TYPE_RAW}) and VDD_TYPE_VDI \
                     ({VDD_TYPE_VDI}) images, not type {other}"
                )))
            }
        };
        // SAFETY: non-NULL; the caller passes a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let path = Path::new(OsStr::from_bytes(bytes));
        let options = CloneOptions {
            format,
            replace: flags & COW_CLONE_REPLACE != 0,
        };
        let mut report = |percent: u32| call_progress(progress, user, percent);
        let cloned: Result<()> = if handle::is_ours(disk) {
            handle::with_object(disk, |object| {
                clone_to_file(object.disk(), path, &options, &mut report).map(|_| ())
            })
        } else {
            // SAFETY: not ours and not NULL: per the contract, the caller's
            // own object starting with a VDDR table. It is never dropped
            // (dropping would Close it), not even on a panic: the caller
            // keeps it.
            let mut caller = std::mem::ManuallyDrop::new(unsafe { CallerDisk::new(disk) }?);
            clone_to_file(&mut *caller, path, &options, &mut report).map(|_| ())
        };
        cloned
    })
}

/// Calls the caller's progress callback (if any): true to go on.
fn call_progress(progress: COW_PROGRESS_FN, user: *mut c_void, percent: u32) -> bool {
    match progress {
        // SAFETY: the caller's callback, called as documented.
        Some(f) => unsafe { f(user, percent) == 0 },
        None => true,
    }
}
