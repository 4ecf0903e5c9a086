//! Opening disks (VDDR_Open*, the media registry) and creating overlays (COW_CreateCowOverlay*).

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_uint};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, Rejected};
use crate::error::{Error, Result};
use crate::ffi::handle::{self, Object};
use crate::ffi::source::CallerDisk;
use crate::ffi::types::*;
use crate::ffi::{guard, guard_code, non_null};
use crate::formats::{media_registry, OpenOptions};
use crate::overlay::{Overlay, OverlayOptions, StoreChoice, DEFAULT_GRANULARITY};

/// Opens a disk image read-only as an HVDDR, choosing the reader by the
/// file's content: every registered backend's pfnProbe first (in
/// registration order), then the built-in formats (raw last). `path` is a
/// `CPFN` (`const unsigned char *`) when the legacy djtypes.h was included
/// first, else `const char *`.
///
/// `iChain` is the legacy chain index: this disk's position in a chain of
/// differencing disks, 0 for the disk a user names (its parents are opened
/// at iChain+1, iChain+2, ...; the chain below always opens with it). It
/// counts against the chain depth cap of 32; 32 or more fails with
/// COW_ERR_INVALID_ARG. Above 0, only the built-in formats are probed.
///
/// Parents: without a loaded media registry, parent/backing paths named
/// inside an image are not followed (use VDDR_OpenEx with
/// COW_OPEN_FOLLOW_PARENTS). Once the caller has loaded one
/// (VDDR_OpenMediaRegistry), the caller has said where its disks are, and
/// VDDR_Open follows parents - by path, then through the registry by UUID,
/// as the legacy module did. Returns NULL on failure (COW_GetLastError:
/// COW_ERR_OPEN, COW_ERR_CORRUPT, COW_ERR_UNSUPPORTED, ...). Close the
/// handle with COW_Close (or its Close method) unless an overlay adopts it.
#[no_mangle]
pub unsafe extern "C" fn VDDR_Open(path: COW_CPFN, iChain: u32) -> HVDDR {
    let follow = if media_registry::is_loaded() {
        COW_OPEN_FOLLOW_PARENTS
    } else {
        0
    };
    if iChain == 0 {
        // SAFETY: forwarded contract.
        return unsafe { VDDR_OpenEx(path, follow) };
    }
    guard(|| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path) }
            .ok_or_else(|| Error::invalid_argument("path is NULL".into()))?;
        let options = OpenOptions {
            follow_parent_paths: follow != 0,
        };
        let disk = media_registry::open_chain(&path, chain_index(iChain), &options)?;
        Ok(handle::register(Object::Disk(disk)))
    })
}

pub(super) fn chain_index(i_chain: u32) -> usize {
    usize::try_from(i_chain).unwrap_or(usize::MAX)
}

/// Loads the VirtualBox media registry that describes the disk image at
/// `path`, so differencing images whose parents sit in other folders (a
/// machine's `Snapshots/`) open - by VDDR_Open, VDDR_OpenByUUID, and
/// VDDR_OpenEx with COW_OPEN_FOLLOW_PARENTS. It reads, highest priority
/// first, `CloneVDI_Media.xml` beside the image, the `.vbox` files beside it
/// and in the folder above, and the global `VirtualBox.xml` (in
/// `$VBOX_USER_HOME`, else `~/.config/VirtualBox` then `~/.VirtualBox`).
/// Loads accumulate for the process (a later entry for a UUID replaces an
/// earlier one). Returns TRUE, or FALSE when no registry file was found
/// (COW_ERR_OPEN, naming where it looked) or one is malformed or over the
/// limits (COW_ERR_CORRUPT or COW_ERR_UNSUPPORTED naming the file and
/// line); nothing of a failed load is kept. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenMediaRegistry(path: COW_CPFN) -> c_uint {
    guard(|| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path) }
            .ok_or_else(|| Error::invalid_argument("path is NULL".into()))?;
        media_registry::load_for_image(&path)?;
        Ok(1)
    })
}

/// Opens, read-only, the disk with creation UUID `*uuid` (an S_UUID as
/// VirtualBox holds it) through the loaded media registry
/// (VDDR_OpenMediaRegistry), with its chain of parents below it; `iChain`
/// as for VDDR_Open (a legacy reader opening its parent passes its own
/// index + 1). Returns NULL on failure: COW_ERR_OPEN when no loaded registry
/// knows the UUID or the file is missing, COW_ERR_SOURCE_MISMATCH when the
/// file found carries another UUID, COW_ERR_INVALID_ARG for a NULL `uuid`.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenByUUID(uuid: *mut S_UUID, iChain: u32) -> HVDDR {
    guard(|| {
        non_null(uuid, "uuid")?;
        // SAFETY: non-NULL; an S_UUID per the contract.
        let wanted = unsafe { uuid.read_unaligned() }.to_rfc();
        let options = OpenOptions {
            follow_parent_paths: true,
        };
        let disk = media_registry::open_by_uuid(&wanted, chain_index(iChain), &options)?;
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Stores in `*uuid` the creation UUID of the disk image at `path`, read
/// from its header alone (the parent chain is not opened, so this works for
/// a differencing image whose parent is missing), as VirtualBox holds it.
/// VDI, VHD, VMDK (with `ddb.uuid.image`), VHDX and VCI have one. Returns
/// TRUE, or FALSE with `*uuid` zeroed: COW_ERR_UNSUPPORTED for a format or
/// file without one (raw, qcow2, Parallels, UML COW, a VMDK without the
/// UUID), COW_ERR_OPEN, COW_ERR_CORRUPT.
#[no_mangle]
pub unsafe extern "C" fn VDDR_QuickGetUUID(path: COW_CPFN, uuid: *mut S_UUID) -> c_uint {
    guard(|| {
        non_null(uuid, "uuid")?;
        // SAFETY: non-NULL out pointer.
        unsafe { uuid.write_unaligned(S_UUID::default()) };
        // SAFETY: NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path) }
            .ok_or_else(|| Error::invalid_argument("path is NULL".into()))?;
        let found = media_registry::quick_registry_uuid(&path)?;
        // SAFETY: non-NULL out pointer.
        unsafe { uuid.write_unaligned(S_UUID::from_rfc(found)) };
        Ok(1)
    })
}

/// Opens a disk image read-only like VDDR_Open, with COW_OPEN_* `flags`
/// (COW_OPEN_FOLLOW_PARENTS allows opening parent images named inside the
/// file; COW_OPEN_REPAIR accepts a VCI image left dirty by a crash after
/// checking it). Registered backends (COW_RegisterBackend) are probed
/// first, then the built-in formats. Unknown flags fail with
/// COW_ERR_INVALID_ARG.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenEx(path: *const c_char, flags: u32) -> HVDDR {
    guard(|| {
        non_null(path, "path")?;
        if flags & !(COW_OPEN_FOLLOW_PARENTS | COW_OPEN_REPAIR) != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown open flags {flags:#x}"
            )));
        }
        // SAFETY: non-NULL; the caller passes a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let path = Path::new(OsStr::from_bytes(bytes));
        let disk = crate::ffi::backend::open_probing(path, flags)?;
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Fills `options` with the defaults (struct_size set, granularity 2048,
/// no flags, anonymous store). Returns COW_ERR_NONE (0), or
/// COW_ERR_INVALID_ARG if `options` is NULL.
#[no_mangle]
pub unsafe extern "C" fn COW_InitOptions(options: *mut COW_OPTIONS) -> c_int {
    guard_code(|| {
        non_null(options, "options")?;
        // SAFETY: non-NULL and points to a COW_OPTIONS per the contract.
        unsafe {
            options.write(COW_OPTIONS {
                struct_size: std::mem::size_of::<COW_OPTIONS>() as u32,
                granularity: COW_DEFAULT_GRANULARITY,
                flags: 0,
                store_path: std::ptr::null(),
            })
        };
        Ok(())
    })
}

/// Creates a copy-on-write overlay over `src` with the legacy defaults
/// (granularity 2048 sectors, anonymous store removed on close). The
/// overlay starts as one extent mapping the whole source. On success the
/// overlay owns `src` (closing the overlay closes it; do not use or close
/// `src` afterwards) and the result, an HVDDR, may be cast to HCOW for the
/// edit methods. On failure returns NULL and the caller still owns `src`.
/// `src` may be a handle of this library or the caller's own object whose
/// first member is a VDDR table (it needs GetDriveSize and ReadSectors; it
/// is called from whichever thread uses the overlay, one call at a time).
#[no_mangle]
pub unsafe extern "C" fn COW_CreateCowOverlay(src: HVDDR) -> HVDDR {
    // SAFETY: forwarded contract.
    unsafe { COW_CreateCowOverlayEx(src, std::ptr::null()) }
}

/// COW_CreateCowOverlay with options (NULL = defaults). With a store_path,
/// the overlay lives in a new persistent store file there (it must not
/// exist: COW_ERR_OPEN otherwise), locked against other users while open;
/// reopen it later with COW_OpenCowOverlay. Fails with COW_ERR_INVALID_ARG
/// for a struct_size smaller than the first version of COW_OPTIONS, a
/// granularity that is not a power of two in 8..65536, or unknown flags.
/// Ownership as COW_CreateCowOverlay.
#[no_mangle]
pub unsafe extern "C" fn COW_CreateCowOverlayEx(src: HVDDR, options: *const COW_OPTIONS) -> HVDDR {
    guard(|| {
        // SAFETY: NULL or a COW_OPTIONS of at least struct_size bytes.
        let (overlay_options, store_path) = unsafe { read_options(options) }?;
        let store = match &store_path {
            Some(path) => StoreChoice::Create(path),
            None => StoreChoice::Anonymous,
        };
        let overlay = adopt_source(src, |disk| Overlay::build(disk, store, overlay_options))?;
        Ok(handle::register(Object::Overlay(Box::new(overlay))))
    })
}

/// Builds something over `src` (a handle of ours or a caller's own
/// object) with `build`, which takes the source and, when it fails, hands
/// it back in a [`Rejected`]: on success the result owns the source; on
/// failure it stays the caller's (a handle of ours stays valid and keeps
/// its kind, a caller's object is not closed).
pub(super) fn adopt_source<T>(
    src: HVDDR,
    build: impl FnOnce(Box<dyn Disk>) -> std::result::Result<T, Rejected>,
) -> Result<T> {
    if src.is_null() {
        return Err(Error::invalid_handle("the source handle is NULL".into()));
    }
    if handle::is_ours(src) {
        handle::adopt(src, |object| {
            build(object.into_disk())
                .map_err(|rejected| (Object::from_disk(rejected.source), rejected.error))
        })
    } else {
        // SAFETY: not ours and not NULL: per the contract, the caller's own
        // object starting with a VDDR table.
        let caller = unsafe { CallerDisk::new(src) }?;
        build(Box::new(caller)).map_err(|rejected| {
            let source: Box<dyn std::any::Any> = rejected.source;
            if let Ok(caller) = source.downcast::<CallerDisk>() {
                caller.release();
            }
            rejected.error
        })
    }
}

/// Reads a caller's COW_OPTIONS, honouring its struct_size.
pub(super) unsafe fn read_options(
    options: *const COW_OPTIONS,
) -> Result<(OverlayOptions, Option<PathBuf>)> {
    if options.is_null() {
        return Ok((OverlayOptions::default(), None));
    }
    // The first version's fields; a later, larger struct starts with them.
    // SAFETY: the caller passes at least struct_size readable bytes; we read
    // the u32 first and the rest only when struct_size covers it.
    let size = unsafe { std::ptr::addr_of!((*options).struct_size).read_unaligned() };
    if (size as usize) < std::mem::size_of::<COW_OPTIONS>() {
        return Err(Error::invalid_argument(format!(
            "COW_OPTIONS.struct_size {size} is smaller than the {} bytes of its first version \
             (call COW_InitOptions first)",
            std::mem::size_of::<COW_OPTIONS>()
        )));
    }
    // SAFETY: struct_size covers the whole first version.
    let o = unsafe { options.read_unaligned() };
    if o.flags & !COW_OPT_DETECT_ZEROS != 0 {
        return Err(Error::invalid_argument(format!(
            "unknown COW_OPTIONS flags {:#x}",
            o.flags & !COW_OPT_DETECT_ZEROS
        )));
    }
    // SAFETY: NULL or a NUL-terminated string, per the contract.
    let store_path = unsafe { c_path(o.store_path) };
    let result = OverlayOptions {
        granularity: if o.granularity == 0 {
            DEFAULT_GRANULARITY
        } else {
            u64::from(o.granularity)
        },
        detect_zeros: o.flags & COW_OPT_DETECT_ZEROS != 0,
    };
    result.validate()?;
    Ok((result, store_path))
}

/// A C path string as a Path (NULL gives None). Bytes, not UTF-8: any
/// file name works.
pub(super) unsafe fn c_path(path: *const c_char) -> Option<PathBuf> {
    if path.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    Some(PathBuf::from(OsStr::from_bytes(bytes)))
}
