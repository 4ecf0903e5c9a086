//! COW_CloneToFile: writing any disk to a new image file.
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::handle;
use super::source::CallerDisk;
use super::types::{
    COW_CLONE_COMPRESS, COW_CLONE_OPTIONS, COW_CLONE_REPLACE, COW_CLONE_VHD_FIXED,
    COW_CLONE_VMDK_STREAM, COW_PROGRESS_FN, HVDDR, VDD_TYPE_QCOW2, VDD_TYPE_RAW, VDD_TYPE_VDI,
    VDD_TYPE_VHD, VDD_TYPE_VHDX, VDD_TYPE_VMDK,
};
use super::{guard_code, non_null};
use crate::clone::{clone_overlay_to_file, clone_to_file, CloneFormat, CloneOptions};
use crate::error::{Error, Result};
use crate::formats::writer::BackingFile;

/// Writes the whole of `disk` (any HVDDR: an opened image, an overlay, or
/// the caller's own object starting with a VDDR table) to a new image file
/// at `path`, in `format` (a drive-type constant); pages that are
/// NOTALLOC, BLANKPAGE or all zeros are not stored:
/// - VDD_TYPE_RAW: a flat image, sparse (holes there);
/// - VDD_TYPE_VDI: a dynamic VDI image with 1 MiB blocks;
/// - VDD_TYPE_QCOW2: a qcow2 (version 3) image, 64 KiB clusters
///   (COW_CLONE_COMPRESS: clusters deflate-compressed);
/// - VDD_TYPE_VHD: a dynamic VHD, 2 MiB blocks (COW_CLONE_VHD_FIXED: a
///   fixed VHD); at most 2040 GiB;
/// - VDD_TYPE_VHDX: a dynamic VHDX;
/// - VDD_TYPE_VMDK: a monolithicSparse VMDK (COW_CLONE_VMDK_STREAM:
///   streamOptimized).
///
/// `flags` is 0 or COW_CLONE_REPLACE, plus the format's own flag above.
/// `progress` may be NULL; otherwise it is called with `user` as
/// COW_PROGRESS_FN says, and may cancel.
///
/// The finish is atomic: the image is written to a temporary file in the
/// same folder, synced, and renamed to `path` only when complete. On any
/// failure - a cancel (COW_ERR_CANCELLED), a read error, a full disk
/// (COW_ERR_NO_SPACE) - the temporary file is removed and nothing is left
/// at `path`. Returns a COW_ERR_* code, 0 on success (also the thread's
/// last error: COW_ERR_INVHANDLE, COW_ERR_INVALID_ARG for NULL `path`
/// or unknown flags or a flag of another format, COW_ERR_UNSUPPORTED for
/// another format or a disk the format cannot hold, COW_ERR_OPEN when
/// `path` exists or its folder is not writable). `disk` stays open and
/// owned by the caller; its lock is held for the whole clone. The disk is
/// read on a thread of the library ahead of the writer (the calling
/// thread, which also calls `progress`): a caller's own object or backend
/// table is called from that thread, one call at a time.
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
        non_null(path, "path")?;
        let options = clone_options(format, flags, 0, None)?;
        // SAFETY: non-NULL; the caller passes a NUL-terminated string.
        let path = unsafe { c_str_path(path) };
        run_clone(disk, &path, &options, progress, user)
    })
}

/// Fills `options` with the defaults (struct_size set, VDD_TYPE_RAW, no
/// flags, default cluster size, no backing file). Returns COW_ERR_NONE (0),
/// or COW_ERR_INVALID_ARG if `options` is NULL.
#[no_mangle]
pub unsafe extern "C" fn COW_InitCloneOptions(options: *mut COW_CLONE_OPTIONS) -> c_int {
    guard_code(|| {
        non_null(options, "options")?;
        // SAFETY: non-NULL and points to a COW_CLONE_OPTIONS per the
        // contract.
        unsafe {
            options.write(COW_CLONE_OPTIONS {
                struct_size: std::mem::size_of::<COW_CLONE_OPTIONS>() as u32,
                format: VDD_TYPE_RAW,
                flags: 0,
                cluster_size: 0,
                backing_file: std::ptr::null(),
                backing_format: std::ptr::null(),
            })
        };
        Ok(())
    })
}

/// COW_CloneToFile with options (see COW_CLONE_OPTIONS; NULL = a raw
/// clone): the format and flags as COW_CloneToFile takes them, the qcow2
/// cluster size, and for qcow2 a backing file: then `disk` must be an
/// overlay (COW_ERR_NOT_OVERLAY otherwise) whose source is the backing
/// file, and only the clusters holding what the overlay changed are
/// written (zeros over source data as zero clusters); the rest reads
/// through to the backing file. Fails with COW_ERR_INVALID_ARG for a
/// struct_size smaller than the first version of COW_CLONE_OPTIONS, a bad
/// cluster size, or options the format does not take. Progress, cancel,
/// atomic finish and return codes as COW_CloneToFile.
#[no_mangle]
pub unsafe extern "C" fn COW_CloneToFileEx(
    disk: HVDDR,
    path: *const c_char,
    options: *const COW_CLONE_OPTIONS,
    progress: COW_PROGRESS_FN,
    user: *mut c_void,
) -> c_int {
    guard_code(|| {
        non_null(path, "path")?;
        let options = if options.is_null() {
            clone_options(VDD_TYPE_RAW, 0, 0, None)?
        } else {
            // SAFETY: non-NULL; struct_size is the first member.
            let size = unsafe { std::ptr::addr_of!((*options).struct_size).read_unaligned() };
            if (size as usize) < std::mem::size_of::<COW_CLONE_OPTIONS>() {
                return Err(Error::invalid_argument(format!(
                    "COW_CLONE_OPTIONS.struct_size {size} is smaller than the first version \
                     ({} bytes; call COW_InitCloneOptions first)",
                    std::mem::size_of::<COW_CLONE_OPTIONS>()
                )));
            }
            // SAFETY: struct_size covers the whole first version.
            let o = unsafe { options.read_unaligned() };
            let backing = if o.backing_file.is_null() {
                None
            } else {
                // SAFETY: non-NULL, NUL-terminated per the contract; the
                // format NULL or NUL-terminated.
                let name = unsafe { c_text(o.backing_file, "backing_file") }?;
                let format = if o.backing_format.is_null() {
                    None
                } else {
                    // SAFETY: as above.
                    Some(unsafe { c_text(o.backing_format, "backing_format") }?)
                };
                Some(BackingFile { name, format })
            };
            clone_options(o.format, o.flags, o.cluster_size, backing)?
        };
        // SAFETY: non-NULL; the caller passes a NUL-terminated string.
        let path = unsafe { c_str_path(path) };
        run_clone(disk, &path, &options, progress, user)
    })
}

/// The clone options for a C format, flags and cluster size.
fn clone_options(
    format: u32,
    flags: u32,
    cluster_size: u32,
    backing: Option<BackingFile>,
) -> Result<CloneOptions> {
    let known =
        COW_CLONE_REPLACE | COW_CLONE_VHD_FIXED | COW_CLONE_VMDK_STREAM | COW_CLONE_COMPRESS;
    if flags & !known != 0 {
        return Err(Error::invalid_argument(format!(
            "unknown COW_CloneToFile flags {:#x}",
            flags & !known
        )));
    }
    // A format with a variant flag: (the format chosen, the flag used).
    let variant = |flag: u32, plain: CloneFormat, with: CloneFormat| {
        if flags & flag != 0 {
            (with, flag)
        } else {
            (plain, 0)
        }
    };
    let (format, used) = match format {
        VDD_TYPE_RAW => (CloneFormat::Raw, 0),
        VDD_TYPE_VDI => (CloneFormat::Vdi, 0),
        VDD_TYPE_QCOW2 => (CloneFormat::Qcow2, flags & COW_CLONE_COMPRESS),
        VDD_TYPE_VHD => variant(
            COW_CLONE_VHD_FIXED,
            CloneFormat::VhdDynamic,
            CloneFormat::VhdFixed,
        ),
        VDD_TYPE_VHDX => (CloneFormat::Vhdx, 0),
        VDD_TYPE_VMDK => variant(
            COW_CLONE_VMDK_STREAM,
            CloneFormat::VmdkSparse,
            CloneFormat::VmdkStream,
        ),
        other => {
            return Err(Error::unsupported(format!(
                "COW_CloneToFile writes VDD_TYPE_RAW, VDD_TYPE_VDI, VDD_TYPE_QCOW2, \
                 VDD_TYPE_VHD, VDD_TYPE_VHDX and VDD_TYPE_VMDK images, not type {other}"
            )))
        }
    };
    let foreign = flags & !COW_CLONE_REPLACE & !used;
    if foreign != 0 {
        return Err(Error::invalid_argument(format!(
            "COW_CloneToFile flags {foreign:#x} do not apply to {} images",
            format.name()
        )));
    }
    Ok(CloneOptions {
        format,
        replace: flags & COW_CLONE_REPLACE != 0,
        cluster_bytes: (cluster_size != 0).then_some(u64::from(cluster_size)),
        compress: flags & COW_CLONE_COMPRESS != 0,
        backing,
    })
}

/// A C path.
///
/// # Safety
/// `path` is non-NULL and NUL-terminated.
unsafe fn c_str_path(path: *const c_char) -> PathBuf {
    // SAFETY: per the function's contract.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    PathBuf::from(OsStr::from_bytes(bytes))
}

/// A C string that must be UTF-8 (a name stored in an image).
///
/// # Safety
/// `text` is non-NULL and NUL-terminated.
unsafe fn c_text(text: *const c_char, what: &str) -> Result<String> {
    // SAFETY: per the function's contract.
    let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::invalid_argument(format!("COW_CLONE_OPTIONS.{what} is not UTF-8")))
}

/// Clones `disk` (ours, or the caller's own object) with `options`.
fn run_clone(
    disk: HVDDR,
    path: &Path,
    options: &CloneOptions,
    progress: COW_PROGRESS_FN,
    user: *mut c_void,
) -> Result<()> {
    if disk.is_null() {
        return Err(Error::invalid_handle("the disk handle is NULL".into()));
    }
    let mut report = |percent: u32| call_progress(progress, user, percent);
    if handle::is_ours(disk) {
        handle::with_object(disk, |object| {
            if options.backing.is_some() {
                clone_overlay_to_file(object.overlay()?, path, options, &mut report).map(|_| ())
            } else {
                clone_to_file(object.disk(), path, options, &mut report).map(|_| ())
            }
        })
    } else {
        if options.backing.is_some() {
            return Err(Error::not_overlay(
                "a clone over a backing file needs an overlay of this library".into(),
            ));
        }
        // SAFETY: not ours and not NULL: per the contract, the caller's
        // own object starting with a VDDR table. It is never dropped
        // (dropping would Close it), not even on a panic: the caller
        // keeps it.
        let mut caller = std::mem::ManuallyDrop::new(unsafe { CallerDisk::new(disk) }?);
        clone_to_file(&mut *caller, path, options, &mut report).map(|_| ())
    }
}

/// Calls the caller's progress callback (if any): true to go on.
fn call_progress(progress: COW_PROGRESS_FN, user: *mut c_void, percent: u32) -> bool {
    match progress {
        // SAFETY: the caller's callback, called as documented.
        Some(f) => unsafe { f(user, percent) == 0 },
        None => true,
    }
}
