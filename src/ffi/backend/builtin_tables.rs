//! The built-in formats as C `COW_BACKEND` tables (static, one per
//! format), and the pinning of the data behind their pBackendData
//! (validate-then-pin: a live set of tokens, Arc + quarantine).
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use super::table::{c_path, COW_BACKEND};
use crate::disk::{check_range, Disk, SECTOR_SIZE};
use crate::error::{code, Error, Result};
use crate::ffi::builtin::{self as core, BackendInfo, Image};
use crate::ffi::registry::Registry;
use crate::ffi::types::{COW_PROGRESS_FN, S_UUID};
use crate::ffi::{guard, guard_or, non_null};
use crate::formats::CreateParams;

// COW_BACKEND_VERSION, COW_OPEN_*, COW_IMAGE_*: src/numbers.rs.
use crate::ffi::types::{
    COW_BACKEND_VERSION, COW_IMAGE_DIFF, COW_IMAGE_FIXED, COW_OPEN_READ_WRITE,
};

// ---------------------------------------------------------------------------
// Status helpers

/// Runs a table function's body: the COW_ERR_* code it returns (0 on
/// success), also recorded as the thread's last error.
fn status(body: impl FnOnce() -> Result<()>) -> c_int {
    let mut result = code::INTERNAL;
    guard_or((), || {
        let r = body();
        result = match &r {
            Ok(()) => code::NONE,
            Err(e) => e.code(),
        };
        r
    });
    result as c_int
}

// ---------------------------------------------------------------------------
// Built-in formats as tables

/// Most built-in formats the table set can hold.
const MAX_BUILTINS: usize = 24;

/// The static tables of the built-in backends, and the strings they point
/// to (kept for the program's life).
pub(super) struct Builtins {
    pub(super) infos: Vec<BackendInfo>,
    /// Never resized after it is built, so the tables never move.
    pub(super) tables: Vec<COW_BACKEND>,
    _names: Vec<CString>,
    _exts: Vec<Vec<CString>>,
    _ext_ptrs: Vec<Vec<*const c_char>>,
}

// SAFETY: built once, never mutated; the raw pointers point into the
// struct's own heap data.
unsafe impl Sync for Builtins {}
unsafe impl Send for Builtins {}

type ProbeFn = unsafe extern "C" fn(*const c_char) -> c_int;
type OpenFn = unsafe extern "C" fn(*const c_char, u32, *mut *mut c_void) -> c_int;
type CreateFn = unsafe extern "C" fn(
    *const c_char,
    u64,
    u32,
    *const c_char,
    *const S_UUID,
    u32,
    COW_PROGRESS_FN,
    *mut c_void,
    *mut *mut c_void,
) -> c_int;

macro_rules! per_index {
    ($f:ident; $($i:literal)*) => { [$($f::<$i> as _),*] };
}

fn probe_fns() -> [ProbeFn; MAX_BUILTINS] {
    per_index!(builtin_probe; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23)
}
fn open_fns() -> [OpenFn; MAX_BUILTINS] {
    per_index!(builtin_open; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23)
}
fn create_fns() -> [CreateFn; MAX_BUILTINS] {
    per_index!(builtin_create; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23)
}

pub(super) fn builtins() -> &'static Builtins {
    static BUILTINS: OnceLock<Builtins> = OnceLock::new();
    BUILTINS.get_or_init(|| {
        let infos: Vec<BackendInfo> = core::builtin_backends()
            .into_iter()
            .take(MAX_BUILTINS)
            .collect();
        let mut names = Vec::new();
        let mut exts = Vec::new();
        let mut ext_ptrs = Vec::new();
        let mut tables = Vec::new();
        let (probes, opens, creates) = (probe_fns(), open_fns(), create_fns());
        for (i, info) in infos.iter().enumerate() {
            let name = CString::new(info.name()).unwrap_or_default();
            let e: Vec<CString> = info
                .extensions()
                .iter()
                .map(|x| CString::new(*x).unwrap_or_default())
                .collect();
            let mut p: Vec<*const c_char> = e.iter().map(|c| c.as_ptr()).collect();
            p.push(std::ptr::null());
            let caps = info.caps();
            let can_create = caps & (core::caps::CREATE_FIXED | core::caps::CREATE_DYNAMIC) != 0;
            let writes = caps & core::caps::WRITE != 0;
            tables.push(COW_BACKEND {
                u32Version: COW_BACKEND_VERSION,
                pszBackendName: name.as_ptr(),
                uBackendCaps: caps,
                papszFileExtensions: p.as_ptr(),
                pfnProbe: Some(probes[i]),
                pfnOpen: Some(opens[i]),
                pfnCreate: if can_create { Some(creates[i]) } else { None },
                pfnClose: Some(builtin_close),
                pfnRead: Some(builtin_read),
                pfnWrite: if writes { Some(builtin_write) } else { None },
                pfnFlush: if writes { Some(builtin_flush) } else { None },
                pfnDiscard: if caps & core::caps::DISCARD != 0 {
                    Some(builtin_discard)
                } else {
                    None
                },
                pfnGetVersion: Some(builtin_get_version),
                pfnGetSize: Some(builtin_get_size),
                pfnGetFileSize: Some(builtin_get_file_size),
                pfnGetImageFlags: Some(builtin_get_image_flags),
                pfnGetOpenFlags: Some(builtin_get_open_flags),
                pfnSetOpenFlags: Some(builtin_set_open_flags),
                pfnGetComment: Some(builtin_get_comment),
                pfnSetComment: Some(builtin_set_comment),
                pfnGetUuid: Some(builtin_get_uuid),
                pfnSetUuid: Some(builtin_set_uuid),
                pfnGetModificationUuid: Some(builtin_get_modification_uuid),
                pfnSetModificationUuid: Some(builtin_set_modification_uuid),
                pfnDump: Some(builtin_dump),
                u32VersionEnd: COW_BACKEND_VERSION,
            });
            names.push(name);
            exts.push(e);
            ext_ptrs.push(p);
        }
        Builtins {
            infos,
            tables,
            _names: names,
            _exts: exts,
            _ext_ptrs: ext_ptrs,
        }
    })
}

/// The index of `table` among the built-in tables.
pub(super) fn builtin_index(table: *const COW_BACKEND) -> Option<usize> {
    builtins()
        .tables
        .iter()
        .position(|t| std::ptr::eq(t, table))
}

/// An image opened through a built-in table: what pBackendData points to.
struct BuiltinData {
    backend: usize,
    path: PathBuf,
    image: Option<Box<dyn Image>>,
}

/// The pBackendData of built-in tables: the address of a token the library
/// allocates (and never dereferences), the key of this live set.
/// Validate-then-pin, as for handles (`ffi/registry.rs`): a call looks the
/// key up and clones the `Arc`, so a close racing with it can retire the
/// key but never free the data while the call uses it (the call then finds
/// the image closed and fails cleanly). Retired tokens stay allocated in a
/// quarantine for a while, so their address is not handed out again soon
/// and a stale pointer is refused.
static LIVE: Registry<u64, Mutex<BuiltinData>> = Registry::new();

fn new_data(backend: usize, path: PathBuf, image: Box<dyn Image>) -> *mut c_void {
    let data = Mutex::new(BuiltinData {
        backend,
        path,
        image: Some(image),
    });
    LIVE.insert(Box::new(0u64), data).cast()
}

/// Retires pBackendData `data`: removes it from the live set (once; a
/// second close, or one racing with it, gets an error) and returns its
/// data, which calls in flight may still hold.
fn retire_data(data: *mut c_void) -> Result<Arc<Mutex<BuiltinData>>> {
    LIVE.retire(data as usize).ok_or_else(|| {
        Error::invalid_handle(format!(
            "{data:p} is not an open image of a built-in backend"
        ))
    })
}

/// Runs `f` on the image behind a built-in table's pBackendData, holding
/// its data pinned (an `Arc`) and locked.
fn with_data<T>(data: *mut c_void, f: impl FnOnce(&mut BuiltinData) -> Result<T>) -> Result<T> {
    let cell = LIVE.get(data as usize).ok_or_else(|| {
        Error::invalid_handle(format!(
            "{data:p} is not an open image of a built-in backend"
        ))
    })?;
    let mut guard = cell
        .lock()
        .map_err(|_| Error::internal("backend data damaged by an earlier panic".into()))?;
    f(&mut guard)
}

fn with_image<T>(data: *mut c_void, f: impl FnOnce(&mut dyn Image) -> Result<T>) -> Result<T> {
    with_data(data, |d| match d.image.as_mut() {
        Some(i) => f(i.as_mut()),
        None => Err(Error::invalid_handle("the image is not open".into())),
    })
}

unsafe extern "C" fn builtin_probe<const I: usize>(filename: *const c_char) -> c_int {
    status(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(filename, "filename") }?;
        let info = builtins()
            .infos
            .get(I)
            .ok_or_else(|| Error::internal("no such built-in backend".into()))?;
        if info.probe(&path) {
            Ok(())
        } else {
            Err(Error::unsupported(format!(
                "{}: not a {} image",
                path.display(),
                info.name()
            )))
        }
    })
}

unsafe extern "C" fn builtin_open<const I: usize>(
    filename: *const c_char,
    flags: u32,
    pp: *mut *mut c_void,
) -> c_int {
    status(|| {
        non_null(pp, "ppBackendData")?;
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(filename, "filename") }?;
        let info = builtins()
            .infos
            .get(I)
            .ok_or_else(|| Error::internal("no such built-in backend".into()))?;
        let image = info.open(&path, flags)?;
        // SAFETY: non-NULL out pointer.
        unsafe { pp.write(new_data(I, path, image)) };
        Ok(())
    })
}

unsafe extern "C" fn builtin_create<const I: usize>(
    filename: *const c_char,
    size: u64,
    image_flags: u32,
    comment: *const c_char,
    uuid: *const S_UUID,
    open_flags: u32,
    progress: COW_PROGRESS_FN,
    user: *mut c_void,
    pp: *mut *mut c_void,
) -> c_int {
    status(|| {
        non_null(pp, "ppBackendData")?;
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(filename, "filename") }?;
        let info = builtins()
            .infos
            .get(I)
            .ok_or_else(|| Error::internal("no such built-in backend".into()))?;
        if image_flags & !(COW_IMAGE_FIXED | COW_IMAGE_DIFF) != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown image flags {image_flags:#x}"
            )));
        }
        if open_flags & !core::open_flags::ALL != 0 {
            return Err(Error::invalid_argument(format!(
                "unknown open flags {open_flags:#x}"
            )));
        }
        let params = CreateParams {
            size,
            fixed: image_flags & COW_IMAGE_FIXED != 0,
            differencing: image_flags & COW_IMAGE_DIFF != 0,
            // SAFETY: NULL or a valid S_UUID.
            uuid: (!uuid.is_null()).then(|| unsafe { (*uuid).to_rfc() }),
            // SAFETY: NULL or a NUL-terminated string.
            comment: (!comment.is_null()).then(|| {
                unsafe { CStr::from_ptr(comment) }
                    .to_string_lossy()
                    .into_owned()
            }),
        };
        if let Some(p) = progress {
            // SAFETY: the caller's callback with its own user pointer.
            unsafe { p(user, 0) };
        }
        let mut image = info.create(&path, &params)?;
        if open_flags & COW_OPEN_READ_WRITE == 0 {
            // Created images are reopened as the caller asked.
            image.close()?;
            image = info.open(&path, open_flags)?;
        }
        if let Some(p) = progress {
            // SAFETY: as above.
            unsafe { p(user, 100) };
        }
        // SAFETY: non-NULL out pointer.
        unsafe { pp.write(new_data(I, path, image)) };
        Ok(())
    })
}

unsafe extern "C" fn builtin_close(data: *mut c_void, delete: c_int) -> c_int {
    status(|| {
        let cell = retire_data(data)?;
        let (image, path) = {
            let mut d = cell.lock().unwrap_or_else(|p| p.into_inner());
            (d.image.take(), d.path.clone())
        };
        let closed = match image {
            Some(i) => i.close(),
            None => Ok(()),
        };
        if delete != 0 {
            std::fs::remove_file(&path)
                .map_err(|e| Error::write_failed(format!("delete {}: {e}", path.display())))?;
        }
        closed
    })
}

/// Checks a byte range of a table call and returns it in sectors.
fn byte_range(offset: u64, bytes: usize, disk: &dyn Disk) -> Result<(u64, u64)> {
    if !offset.is_multiple_of(SECTOR_SIZE as u64) || !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::invalid_argument(format!(
            "offset {offset} and size {bytes} must be multiples of 512"
        )));
    }
    let (lba, n) = (offset / SECTOR_SIZE as u64, (bytes / SECTOR_SIZE) as u64);
    check_range(lba, n, disk.sector_count())?;
    Ok((lba, n))
}

unsafe extern "C" fn builtin_read(
    data: *mut c_void,
    offset: u64,
    bytes: usize,
    buf: *mut c_void,
    done: *mut usize,
) -> c_int {
    status(|| {
        with_image(data, |image| {
            let (lba, n) = byte_range(offset, bytes, &*image)?;
            if n == 0 {
                return Ok(());
            }
            non_null(buf, "pvBuf")?;
            let (held, run) = image.held_run(lba, n)?;
            // SAFETY: the caller's buffer holds `bytes` bytes.
            let out = unsafe {
                std::slice::from_raw_parts_mut(buf.cast::<u8>(), run as usize * SECTOR_SIZE)
            };
            if !done.is_null() {
                // SAFETY: non-NULL out pointer.
                unsafe { done.write(out.len()) };
            }
            if held {
                image.read_sectors(lba, out)?;
                Ok(())
            } else {
                out.fill(0);
                Err(Error::block_free(format!(
                    "sectors {lba}..+{run} are not held in this image"
                )))
            }
        })
    })
}

unsafe extern "C" fn builtin_write(
    data: *mut c_void,
    offset: u64,
    bytes: usize,
    buf: *const c_void,
    done: *mut usize,
) -> c_int {
    status(|| {
        with_image(data, |image| {
            let (lba, n) = byte_range(offset, bytes, &*image)?;
            if n > 0 {
                non_null(buf, "pvBuf")?;
                // SAFETY: the caller's buffer holds `bytes` bytes.
                let src = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), bytes) };
                image.write_sectors(lba, src)?;
            }
            if !done.is_null() {
                // SAFETY: non-NULL out pointer.
                unsafe { done.write(bytes) };
            }
            Ok(())
        })
    })
}

unsafe extern "C" fn builtin_flush(data: *mut c_void) -> c_int {
    status(|| with_image(data, |i| i.flush()))
}

unsafe extern "C" fn builtin_discard(data: *mut c_void, offset: u64, bytes: usize) -> c_int {
    status(|| {
        with_image(data, |image| {
            let (lba, n) = byte_range(offset, bytes, &*image)?;
            image.discard_sectors(lba, n)
        })
    })
}

unsafe extern "C" fn builtin_get_version(data: *mut c_void) -> c_uint {
    guard(|| with_image(data, |i| Ok(i.format_version())))
}

unsafe extern "C" fn builtin_get_size(data: *mut c_void) -> u64 {
    guard_or(0, || with_image(data, |i| Ok(i.byte_size())))
}

unsafe extern "C" fn builtin_get_file_size(data: *mut c_void) -> u64 {
    guard_or(0, || with_image(data, |i| Ok(i.file_size())))
}

unsafe extern "C" fn builtin_get_image_flags(data: *mut c_void) -> c_uint {
    guard(|| with_image(data, |i| Ok(i.image_flags())))
}

unsafe extern "C" fn builtin_get_open_flags(data: *mut c_void) -> c_uint {
    guard(|| with_image(data, |i| Ok(i.open_flags())))
}

unsafe extern "C" fn builtin_set_open_flags(data: *mut c_void, flags: c_uint) -> c_int {
    status(|| {
        with_data(data, |d| {
            let info = builtins().infos[d.backend];
            // Reopen with the new flags; on failure, with the old ones.
            let old_flags = d.image.as_ref().map_or(0, |i| i.open_flags());
            if let Some(old) = d.image.take() {
                old.close()?;
            }
            match info.open(&d.path, flags) {
                Ok(i) => {
                    d.image = Some(i);
                    Ok(())
                }
                Err(e) => {
                    d.image = info.open(&d.path, old_flags).ok();
                    Err(e)
                }
            }
        })
    })
}

unsafe extern "C" fn builtin_get_comment(
    data: *mut c_void,
    out: *mut c_char,
    size: usize,
) -> c_int {
    status(|| {
        let text = with_image(data, |i| i.comment())?;
        non_null(out, "pszComment")?;
        if text.len() + 1 > size {
            return Err(Error::invalid_argument(format!(
                "the comment needs {} bytes",
                text.len() + 1
            )));
        }
        // SAFETY: the caller's buffer holds `size` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), text.len());
            out.add(text.len()).write(0);
        }
        Ok(())
    })
}

unsafe extern "C" fn builtin_set_comment(data: *mut c_void, comment: *const c_char) -> c_int {
    status(|| {
        non_null(comment, "pszComment")?;
        // SAFETY: NUL-terminated per the contract.
        let text = unsafe { CStr::from_ptr(comment) }
            .to_string_lossy()
            .into_owned();
        with_image(data, |i| i.set_comment(&text))
    })
}

unsafe extern "C" fn builtin_get_uuid(data: *mut c_void, out: *mut S_UUID) -> c_int {
    status(|| {
        let uuid = with_image(data, |i| {
            i.uuid()
                .ok_or_else(|| Error::unsupported("this image has no UUID".into()))
        })?;
        non_null(out, "pUuid")?;
        // SAFETY: non-NULL out pointer.
        unsafe { out.write(S_UUID::from_rfc(uuid)) };
        Ok(())
    })
}

unsafe extern "C" fn builtin_set_uuid(data: *mut c_void, uuid: *const S_UUID) -> c_int {
    status(|| {
        non_null(uuid, "pUuid")?;
        // SAFETY: non-NULL.
        let bytes = unsafe { (*uuid).to_rfc() };
        with_image(data, |i| i.set_uuid(bytes))
    })
}

unsafe extern "C" fn builtin_get_modification_uuid(data: *mut c_void, out: *mut S_UUID) -> c_int {
    status(|| {
        let uuid = with_image(data, |i| {
            i.modification_uuid()
                .ok_or_else(|| Error::unsupported("this image has no modification UUID".into()))
        })?;
        non_null(out, "pUuid")?;
        // SAFETY: non-NULL out pointer.
        unsafe { out.write(S_UUID::from_rfc(uuid)) };
        Ok(())
    })
}

unsafe extern "C" fn builtin_set_modification_uuid(
    data: *mut c_void,
    uuid: *const S_UUID,
) -> c_int {
    status(|| {
        non_null(uuid, "pUuid")?;
        // SAFETY: non-NULL.
        let bytes = unsafe { (*uuid).to_rfc() };
        with_image(data, |i| i.set_modification_uuid(bytes))
    })
}

unsafe extern "C" fn builtin_dump(data: *mut c_void) {
    status(|| {
        let text = with_image(data, |i| Ok(i.dump()))?;
        eprintln!("{text}");
        Ok(())
    });
}
