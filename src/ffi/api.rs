//! The exported functions. Each body runs inside `guard`, which catches
//! panics and sets the calling thread's last error (0 on success).
#![allow(non_snake_case)]

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::handle::{self, Object};
use super::source::CallerDisk;
use super::types::*;
use super::{
    guard, guard_code, guard_or, guard_quiet, last_error_code, last_error_location,
    last_error_text, non_null,
};
use crate::disk::{check_range, Disk, SectorStatus, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::formats::{media_registry, OpenOptions};
use crate::overlay::{Overlay, OverlayOptions, DEFAULT_GRANULARITY};
use crate::store::extents::{Extent, ExtentKind};
use crate::store::space::FileStorage;

/// Largest SPBshift accepted by ReadPage and GetDriveBlockCount: pages of
/// up to 2^24 sectors (8 GiB). The legacy tool uses 11 (1 MiB pages).
const MAX_PAGE_SHIFT: u32 = 24;

const TRUE: c_int = 1;

fn status_code(status: SectorStatus) -> c_int {
    status.legacy_code() as c_int
}

fn page_sectors(shift: u32) -> Result<u64> {
    if shift > MAX_PAGE_SHIFT {
        return Err(Error::InvalidArgument(format!(
            "SPBshift {shift}: pages of more than 2^{MAX_PAGE_SHIFT} sectors are not supported"
        )));
    }
    Ok(1u64 << shift)
}

fn hcow(h: HCOW) -> HVDDR {
    h.cast::<VDDR>()
}

// ---------------------------------------------------------------------------
// Errors and version

/// Returns the calling thread's last error code (COW_ERR_NONE after a call
/// that succeeded). Does not change the last error.
#[no_mangle]
pub extern "C" fn COW_GetLastError() -> u32 {
    guard_quiet(COW_ERR_INTERNAL, last_error_code)
}

/// Returns a description of error code `code`; for COW_LAST_ERROR
/// (0xFFFFFFFF) the detailed text of the calling thread's last error (with
/// file, offset and OS reason where known). The text belongs to the
/// library: do not modify or free it. A fixed description stays valid for
/// the program's life; the detailed text until the thread's next call into
/// the library. Does not change the last error.
#[no_mangle]
pub extern "C" fn COW_GetErrorString(code: u32) -> COW_PSTR {
    guard_quiet(c"internal error".as_ptr().cast_mut(), || {
        let text: *const c_char = if code == COW_LAST_ERROR {
            last_error_text()
        } else {
            static_description(code)
        };
        text.cast_mut()
    })
}

pub(crate) fn static_description(code: u32) -> *const c_char {
    // NUL-terminated copies of every code's fixed description, built once.
    use crate::error::ErrorCode;
    use std::ffi::CString;
    use std::sync::OnceLock;
    static TEXTS: OnceLock<Vec<(u32, CString)>> = OnceLock::new();
    let texts = TEXTS.get_or_init(|| {
        ErrorCode::ALL
            .iter()
            .map(|c| (*c as u32, CString::new(c.describe()).unwrap_or_default()))
            .collect()
    });
    match texts.iter().find(|(c, _)| *c == code) {
        Some((_, text)) => text.as_ptr(),
        None => c"unknown error code".as_ptr(),
    }
}

/// Same as COW_GetLastError (one error state per thread serves both names).
#[no_mangle]
pub extern "C" fn VDDR_GetLastError() -> u32 {
    COW_GetLastError()
}

/// Same as COW_GetErrorString.
#[no_mangle]
pub extern "C" fn VDDR_GetErrorString(code: u32) -> COW_PSTR {
    COW_GetErrorString(code)
}

/// The address of the calling thread's last error code (valid for the
/// thread's life). The header's `VDDR_LastError` macro is
/// `(*COW_LastErrorLocation())`, so legacy reader code that assigns the
/// legacy global (`VDDR_LastError = code;`) sets the value
/// COW_GetLastError returns; a legacy reader that fails a call from this
/// library after setting it has its code named in the library's error.
/// Does not change the last error.
#[no_mangle]
pub extern "C" fn COW_LastErrorLocation() -> *mut u32 {
    guard_quiet(std::ptr::null_mut(), last_error_location)
}

/// Returns the library version as (major << 16) | (minor << 8) | patch.
#[no_mangle]
pub extern "C" fn COW_GetVersion() -> u32 {
    guard(|| {
        let part = |s: &str| s.parse::<u32>().unwrap_or(0) & 0xFF;
        Ok(part(env!("CARGO_PKG_VERSION_MAJOR")) << 16
            | part(env!("CARGO_PKG_VERSION_MINOR")) << 8
            | part(env!("CARGO_PKG_VERSION_PATCH")))
    })
}

// ---------------------------------------------------------------------------
// Opening disks and creating overlays

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
    let follow = if media_registry::snapshot().is_empty() {
        0
    } else {
        COW_OPEN_FOLLOW_PARENTS
    };
    if iChain == 0 {
        // SAFETY: forwarded contract.
        return unsafe { VDDR_OpenEx(path, follow) };
    }
    guard(|| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let path =
            unsafe { c_path(path) }.ok_or_else(|| Error::InvalidArgument("path is NULL".into()))?;
        let options = OpenOptions {
            follow_parent_paths: follow != 0,
        };
        let disk = media_registry::open_chain(&path, chain_index(iChain), &options)?;
        Ok(handle::register(Object::Disk(disk)))
    })
}

fn chain_index(i_chain: u32) -> usize {
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
        let path =
            unsafe { c_path(path) }.ok_or_else(|| Error::InvalidArgument("path is NULL".into()))?;
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
        let path =
            unsafe { c_path(path) }.ok_or_else(|| Error::InvalidArgument("path is NULL".into()))?;
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
            return Err(Error::InvalidArgument(format!(
                "unknown open flags {flags:#x}"
            )));
        }
        // SAFETY: non-NULL; the caller passes a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let path = Path::new(OsStr::from_bytes(bytes));
        let disk = super::backend::open_probing(path, flags)?;
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
        // Everything that can fail happens before the source is taken, so
        // on failure the caller still owns it.
        let build = |disk: &mut dyn Disk| -> Result<Builder> {
            match &store_path {
                Some(path) => Ok(Builder::Persistent(Box::new(Overlay::prepare_persistent(
                    path,
                    disk,
                    overlay_options,
                )?))),
                None => {
                    Overlay::check_source(disk, &overlay_options)?;
                    Ok(Builder::Anonymous(FileStorage::anonymous()?))
                }
            }
        };
        let finish = |builder: Builder, disk: Box<dyn Disk>| match builder {
            Builder::Persistent(prepared) => prepared.attach(disk),
            Builder::Anonymous(store) => Overlay::assemble(disk, Box::new(store), overlay_options),
        };
        let overlay = adopt_source(src, build, finish)?;
        Ok(handle::register(Object::Overlay(Box::new(overlay))))
    })
}

/// An overlay's store, prepared before the source is taken.
enum Builder {
    Persistent(Box<crate::overlay::PreparedStore>),
    Anonymous(FileStorage),
}

/// Takes `src` (a handle of ours or a caller's own object) to build an
/// overlay: `prepare` may fail and leaves the source with the caller;
/// `attach` cannot fail and takes it.
fn adopt_source<P>(
    src: HVDDR,
    prepare: impl FnOnce(&mut dyn Disk) -> Result<P>,
    attach: impl FnOnce(P, Box<dyn Disk>) -> Overlay,
) -> Result<Overlay> {
    if src.is_null() {
        return Err(Error::InvalidHandle("the source handle is NULL".into()));
    }
    if handle::is_ours(src) {
        handle::adopt(src, |mut object| match prepare(object.disk()) {
            Ok(prepared) => Ok(attach(prepared, object.into_disk())),
            Err(e) => Err((object, e)),
        })
    } else {
        // SAFETY: not ours and not NULL: per the contract, the caller's own
        // object starting with a VDDR table.
        let mut caller = unsafe { CallerDisk::new(src) }?;
        match prepare(&mut caller) {
            Ok(prepared) => Ok(attach(prepared, Box::new(caller))),
            Err(e) => {
                caller.release();
                Err(e)
            }
        }
    }
}

/// Reads a caller's COW_OPTIONS, honouring its struct_size.
unsafe fn read_options(options: *const COW_OPTIONS) -> Result<(OverlayOptions, Option<PathBuf>)> {
    if options.is_null() {
        return Ok((OverlayOptions::default(), None));
    }
    // The first version's fields; a later, larger struct starts with them.
    // SAFETY: the caller passes at least struct_size readable bytes; we read
    // the u32 first and the rest only when struct_size covers it.
    let size = unsafe { std::ptr::addr_of!((*options).struct_size).read_unaligned() };
    if (size as usize) < std::mem::size_of::<COW_OPTIONS>() {
        return Err(Error::InvalidArgument(format!(
            "COW_OPTIONS.struct_size {size} is smaller than the {} bytes of its first version \
             (call COW_InitOptions first)",
            std::mem::size_of::<COW_OPTIONS>()
        )));
    }
    // SAFETY: struct_size covers the whole first version.
    let o = unsafe { options.read_unaligned() };
    if o.flags & !COW_OPT_DETECT_ZEROS != 0 {
        return Err(Error::InvalidArgument(format!(
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
unsafe fn c_path(path: *const c_char) -> Option<PathBuf> {
    if path.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    Some(PathBuf::from(OsStr::from_bytes(bytes)))
}

// ---------------------------------------------------------------------------
// Disk methods (the VDDR table), valid on every handle

/// Returns the drive type (VDD_TYPE_*); an overlay is VDD_TYPE_COW.
/// VDD_TYPE_INVALID for a bad handle.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveType(h: HVDDR) -> u32 {
    guard_or(VDD_TYPE_INVALID, || {
        handle::with_object(h, |o| Ok(o.disk().drive_type() as u32))
    })
}

/// Stores the drive size in bytes in `*bytes`. Returns TRUE, or FALSE for a
/// bad handle or NULL `bytes`.
#[no_mangle]
pub unsafe extern "C" fn COW_GetDriveSize(h: HVDDR, bytes: *mut u64) -> c_int {
    guard(|| {
        let size = handle::with_object(h, |o| Ok(o.disk().byte_size()))?;
        non_null(bytes, "bytes")?;
        // SAFETY: non-NULL out pointer.
        unsafe { bytes.write(size) };
        Ok(TRUE)
    })
}

fn block_count(h: HVDDR, shift: u32) -> Result<u64> {
    let per_page = page_sectors(shift)?;
    let sectors = handle::with_object(h, |o| Ok(o.disk().sector_count()))?;
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
            Error::InvalidArgument(format!(
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
        handle::with_object(h, |o| {
            let disk = o.disk();
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
        let found = handle::with_object(h, |o| {
            let kind = match o {
                Object::Overlay(ov) => ov.source().drive_type(),
                Object::Disk(d) => d.drive_type(),
            };
            Ok(o.disk()
                .uuid()
                .map(|u| media_registry::registry_key(kind, u)))
        })?;
        non_null(uuid, "uuid")?;
        // SAFETY: non-NULL out pointer.
        unsafe { uuid.write(found.map(S_UUID::from_rfc).unwrap_or_default()) };
        match found {
            Some(_) => Ok(TRUE),
            None => Err(Error::Unsupported("this disk has no UUID".into())),
        }
    })
}

/// TRUE if the disk is a differencing image or snapshot (an overlay
/// answers for its source). FALSE otherwise or on error (check
/// COW_GetLastError to tell the two apart).
#[no_mangle]
pub unsafe extern "C" fn COW_IsSnapshot(h: HVDDR) -> c_int {
    guard(|| handle::with_object(h, |o| Ok(c_int::from(o.disk().is_snapshot()))))
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
        handle::with_object(h, |o| {
            let disk = o.disk();
            let size = disk.sector_count();
            let start = u64::from(iPage) * per_page;
            if start >= size {
                return Err(Error::InvalidBlock(format!(
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
        handle::with_object(h, |o| {
            let disk = o.disk();
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

// ---------------------------------------------------------------------------
// Overlay methods (the COWOVL table); COW_ERR_NOT_OVERLAY on other disks

fn with_overlay<T>(h: HCOW, f: impl FnOnce(&mut Overlay) -> Result<T>) -> Result<T> {
    handle::with_object(hcow(h), |o| f(o.overlay()?))
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

// ---------------------------------------------------------------------------
// Inspecting an overlay's extent map

fn c_extent(start: u64, e: Extent) -> COW_EXTENT {
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
        let n = with_overlay(h, |ov| Ok(ov.extents().extent_count()))?;
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
        let found = with_overlay(h, |ov| {
            ov.extents().nth(index).ok_or_else(|| {
                Error::InvalidArgument(format!(
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
        let found = with_overlay(h, |ov| {
            ov.extents().find(LBA).ok_or_else(|| {
                Error::InvalidBlock(format!(
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

// ---------------------------------------------------------------------------
// Persistent stores

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
            return Err(Error::InvalidArgument(format!("unknown flags {flags:#x}")));
        }
        let read_only = flags & COW_OPEN_READ_ONLY != 0;
        // SAFETY: non-NULL, NUL-terminated per the contract.
        let path = unsafe { c_path(store_path) }.unwrap_or_default();
        let overlay = adopt_source(
            src,
            |disk| {
                let (storage, opened) = Overlay::load_persistent(&path, read_only)?;
                Overlay::check_store_source(&opened, disk)?;
                Ok((storage, opened))
            },
            |(storage, opened), disk| Overlay::from_opened(storage, opened, disk, read_only),
        )?;
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
            return Err(Error::InvalidArgument(format!(
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
