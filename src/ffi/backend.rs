//! The format backend table (`COW_BACKEND`), its registry, the built-in
//! formats exposed as tables, and the adapter that makes a caller's C
//! backend a [`Disk`].
#![allow(non_snake_case, non_camel_case_types)]

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString, OsStr};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::builtin::{self as core, BackendInfo, Image};
use super::handle::{self, Object};
use super::types::{COW_OPEN_FOLLOW_PARENTS, COW_PROGRESS_FN, HVDDR, S_UUID};
use super::{guard, guard_code, guard_or, non_null};
use crate::disk::{check_range, sectors_in, Disk, DriveType, ImageFile, SectorStatus, SECTOR_SIZE};
use crate::error::{code, Error, Result};
use crate::formats::{self, registry, umlcow, CreateParams, ImageOpenOptions, OpenOptions};

// COW_BACKEND_VERSION, COW_CAP_*, COW_OPEN_*, COW_IMAGE_*: src/numbers.rs.
use super::types::{
    COW_BACKEND_VERSION, COW_CAP_CREATE_DYNAMIC, COW_CAP_CREATE_FIXED, COW_CAP_DISCARD,
    COW_CAP_WRITE, COW_IMAGE_DIFF, COW_IMAGE_FIXED, COW_OPEN_READ_WRITE, COW_OPEN_REPAIR,
};

/// A format driver (modelled on VirtualBox's VDCACHEBACKEND, with plain
/// buffers). Functions returning int return COW_ERR_NONE (0) on success or
/// a COW_ERR_* code. Offsets and sizes are in bytes and multiples of 512.
/// pfnRead may return COW_ERR_BLOCK_FREE for a range the image does not
/// hold, with *pcbActuallyRead set to the length of that range; the disk
/// object reads it as zeros with VDDR_RSLT_NOTALLOC.
///
/// Required in every table: both version markers equal to
/// COW_BACKEND_VERSION, pszBackendName, pfnProbe, pfnOpen, pfnClose,
/// pfnRead, pfnGetSize; pfnCreate when a CREATE cap is set; pfnDiscard with
/// COW_CAP_DISCARD; pfnWrite and pfnFlush with COW_CAP_WRITE. Other members
/// may be NULL. Fill a table with COW_InitBackend first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct COW_BACKEND {
    pub u32Version: u32,
    pub pszBackendName: *const c_char,
    pub uBackendCaps: u64,
    /// NULL-terminated array of extensions without the dot; may be NULL.
    pub papszFileExtensions: *const *const c_char,
    /// COW_ERR_NONE if the file is in this format.
    pub pfnProbe: Option<unsafe extern "C" fn(filename: *const c_char) -> c_int>,
    pub pfnOpen: Option<
        unsafe extern "C" fn(
            filename: *const c_char,
            uOpenFlags: u32,
            ppBackendData: *mut *mut c_void,
        ) -> c_int,
    >,
    pub pfnCreate: Option<
        unsafe extern "C" fn(
            filename: *const c_char,
            cbSize: u64,
            uImageFlags: u32,
            pszComment: *const c_char,
            pUuid: *const S_UUID,
            uOpenFlags: u32,
            pfnProgress: COW_PROGRESS_FN,
            pvUser: *mut c_void,
            ppBackendData: *mut *mut c_void,
        ) -> c_int,
    >,
    pub pfnClose: Option<unsafe extern "C" fn(pBackendData: *mut c_void, fDelete: c_int) -> c_int>,
    pub pfnRead: Option<
        unsafe extern "C" fn(
            pBackendData: *mut c_void,
            uOffset: u64,
            cbToRead: usize,
            pvBuf: *mut c_void,
            pcbActuallyRead: *mut usize,
        ) -> c_int,
    >,
    pub pfnWrite: Option<
        unsafe extern "C" fn(
            pBackendData: *mut c_void,
            uOffset: u64,
            cbToWrite: usize,
            pvBuf: *const c_void,
            pcbWriteProcess: *mut usize,
        ) -> c_int,
    >,
    pub pfnFlush: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> c_int>,
    pub pfnDiscard: Option<
        unsafe extern "C" fn(pBackendData: *mut c_void, uOffset: u64, cbDiscard: usize) -> c_int,
    >,
    pub pfnGetVersion: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> c_uint>,
    /// The disk's size in bytes.
    pub pfnGetSize: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> u64>,
    pub pfnGetFileSize: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> u64>,
    pub pfnGetImageFlags: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> c_uint>,
    pub pfnGetOpenFlags: Option<unsafe extern "C" fn(pBackendData: *mut c_void) -> c_uint>,
    pub pfnSetOpenFlags:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, uOpenFlags: c_uint) -> c_int>,
    pub pfnGetComment: Option<
        unsafe extern "C" fn(
            pBackendData: *mut c_void,
            pszComment: *mut c_char,
            cbComment: usize,
        ) -> c_int,
    >,
    pub pfnSetComment:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, pszComment: *const c_char) -> c_int>,
    pub pfnGetUuid:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, pUuid: *mut S_UUID) -> c_int>,
    pub pfnSetUuid:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, pUuid: *const S_UUID) -> c_int>,
    pub pfnGetModificationUuid:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, pUuid: *mut S_UUID) -> c_int>,
    pub pfnSetModificationUuid:
        Option<unsafe extern "C" fn(pBackendData: *mut c_void, pUuid: *const S_UUID) -> c_int>,
    /// Prints a description of the image to stderr.
    pub pfnDump: Option<unsafe extern "C" fn(pBackendData: *mut c_void)>,
    pub u32VersionEnd: u32,
}

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

/// An Error for a code a C backend returned.
fn error_from_code(rc: c_int, what: String) -> Error {
    let rc_code = rc as u32;
    match rc_code {
        code::INVHANDLE => Error::InvalidHandle(what),
        code::OUTOFMEM => Error::OutOfMemory(what),
        code::INVBLOCK => Error::InvalidBlock(what),
        code::SEEK => Error::Seek(what),
        code::READ => Error::Read(what),
        code::WRITE => Error::Write(what),
        code::INVALID_ARG => Error::InvalidArgument(what),
        code::CORRUPT => Error::Corrupt(what),
        code::UNSUPPORTED => Error::Unsupported(what),
        code::SOURCE_MISMATCH => Error::SourceMismatch(what),
        code::READ_ONLY => Error::ReadOnly(what),
        code::NO_SPACE => Error::NoSpace(what),
        code::OPEN => Error::Open(what),
        code::BLOCK_FREE => Error::BlockFree(what),
        code::CANCELLED => Error::Cancelled(what),
        code::LOCKED => Error::Locked(what),
        _ => Error::Read(format!("{what} (code {rc:#x})")),
    }
}

unsafe fn c_path(p: *const c_char, name: &str) -> Result<PathBuf> {
    non_null(p, name)?;
    // SAFETY: non-NULL, NUL-terminated per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::InvalidArgument(format!("{name} is empty")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(bytes)))
}

// ---------------------------------------------------------------------------
// Built-in formats as tables

/// Most built-in formats the table set can hold.
const MAX_BUILTINS: usize = 24;

/// The static tables of the built-in backends, and the strings they point
/// to (kept for the program's life).
struct Builtins {
    infos: Vec<BackendInfo>,
    /// Never resized after it is built, so the tables never move.
    tables: Vec<COW_BACKEND>,
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

fn builtins() -> &'static Builtins {
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
fn builtin_index(table: *const COW_BACKEND) -> Option<usize> {
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
/// allocates (and never dereferences), the key of the live table below.
/// Validate-then-pin, as `handle.rs` does for handles: a call looks the key
/// up and clones the `Arc` under the table's lock, so a close racing with
/// it can retire the key but never free the data while the call uses it
/// (the call then finds the image closed and fails cleanly). Retired tokens
/// stay allocated in a quarantine for a while, so their address is not
/// handed out again soon and a stale pointer is refused.
type Live = HashMap<usize, Arc<Mutex<BuiltinData>>>;

fn live() -> MutexGuard<'static, Live> {
    static LIVE: OnceLock<Mutex<Live>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // Inserts and removes are single calls: never left half-done.
        .unwrap_or_else(|p| p.into_inner())
}

/// Retired tokens kept allocated (see `Live`).
const TOKEN_QUARANTINE: usize = 4096;

fn new_data(backend: usize, path: PathBuf, image: Box<dyn Image>) -> *mut c_void {
    let token = Box::into_raw(Box::new(0u64));
    let data = Arc::new(Mutex::new(BuiltinData {
        backend,
        path,
        image: Some(image),
    }));
    live().insert(token as usize, data);
    token.cast()
}

/// Retires pBackendData `data`: removes it from the live table (once; a
/// second close, or one racing with it, gets an error) and returns its
/// data, which calls in flight may still hold.
fn retire_data(data: *mut c_void) -> Result<Arc<Mutex<BuiltinData>>> {
    let cell = live().remove(&(data as usize)).ok_or_else(|| {
        Error::InvalidHandle(format!(
            "{data:p} is not an open image of a built-in backend"
        ))
    })?;
    // SAFETY: keys of the live table come from Box::into_raw in new_data,
    // and a key is removed once.
    let token = unsafe { Box::from_raw(data.cast::<u64>()) };
    static RETIRED: Mutex<VecDeque<Box<u64>>> = Mutex::new(VecDeque::new());
    let mut retired = RETIRED.lock().unwrap_or_else(|p| p.into_inner());
    retired.push_back(token);
    if retired.len() > TOKEN_QUARANTINE {
        retired.pop_front();
    }
    Ok(cell)
}

/// Runs `f` on the image behind a built-in table's pBackendData, holding
/// its data pinned (an `Arc`) and locked.
fn with_data<T>(data: *mut c_void, f: impl FnOnce(&mut BuiltinData) -> Result<T>) -> Result<T> {
    let cell = live().get(&(data as usize)).cloned().ok_or_else(|| {
        Error::InvalidHandle(format!(
            "{data:p} is not an open image of a built-in backend"
        ))
    })?;
    let mut guard = cell
        .lock()
        .map_err(|_| Error::Internal("backend data damaged by an earlier panic".into()))?;
    f(&mut guard)
}

fn with_image<T>(data: *mut c_void, f: impl FnOnce(&mut dyn Image) -> Result<T>) -> Result<T> {
    with_data(data, |d| match d.image.as_mut() {
        Some(i) => f(i.as_mut()),
        None => Err(Error::InvalidHandle("the image is not open".into())),
    })
}

unsafe extern "C" fn builtin_probe<const I: usize>(filename: *const c_char) -> c_int {
    status(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(filename, "filename") }?;
        let info = builtins()
            .infos
            .get(I)
            .ok_or_else(|| Error::Internal("no such built-in backend".into()))?;
        if info.probe(&path) {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
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
            .ok_or_else(|| Error::Internal("no such built-in backend".into()))?;
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
            .ok_or_else(|| Error::Internal("no such built-in backend".into()))?;
        if image_flags & !(COW_IMAGE_FIXED | COW_IMAGE_DIFF) != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown image flags {image_flags:#x}"
            )));
        }
        if open_flags & !core::open_flags::ALL != 0 {
            return Err(Error::InvalidArgument(format!(
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
                .map_err(|e| Error::Write(format!("delete {}: {e}", path.display())))?;
        }
        closed
    })
}

/// Checks a byte range of a table call and returns it in sectors.
fn byte_range(offset: u64, bytes: usize, disk: &dyn Disk) -> Result<(u64, u64)> {
    if !offset.is_multiple_of(SECTOR_SIZE as u64) || !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::InvalidArgument(format!(
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
                Err(Error::BlockFree(format!(
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
            return Err(Error::InvalidArgument(format!(
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
                .ok_or_else(|| Error::Unsupported("this image has no UUID".into()))
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
                .ok_or_else(|| Error::Unsupported("this image has no modification UUID".into()))
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

// ---------------------------------------------------------------------------
// The registry of caller tables

struct Registered(Vec<usize>);

fn registry() -> MutexGuard<'static, Registered> {
    static REG: Mutex<Registered> = Mutex::new(Registered(Vec::new()));
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// The registered caller tables, in registration order (a snapshot: no
/// lock is held while C code runs).
fn registered() -> Vec<*const COW_BACKEND> {
    registry()
        .0
        .iter()
        .map(|&p| p as *const COW_BACKEND)
        .collect()
}

unsafe fn table_name(table: &COW_BACKEND) -> String {
    if table.pszBackendName.is_null() {
        return String::new();
    }
    // SAFETY: checked non-NULL; NUL-terminated per the contract.
    unsafe { CStr::from_ptr(table.pszBackendName) }
        .to_string_lossy()
        .into_owned()
}

/// Checks a caller's table: version markers, name, and the members its
/// caps require.
unsafe fn validate(table: *const COW_BACKEND) -> Result<COW_BACKEND> {
    non_null(table, "backend")?;
    // SAFETY: non-NULL; the caller passes a COW_BACKEND.
    let t = unsafe { *table };
    let magic = COW_BACKEND_VERSION >> 16;
    if t.u32Version >> 16 != magic
        || (t.u32Version >> 8) & 0xFF != (COW_BACKEND_VERSION >> 8) & 0xFF
    {
        return Err(Error::Unsupported(format!(
            "COW_BACKEND.u32Version is {:#x}; this library implements {COW_BACKEND_VERSION:#x} \
             (fill the table with COW_InitBackend)",
            t.u32Version
        )));
    }
    if t.u32VersionEnd != t.u32Version {
        return Err(Error::Unsupported(format!(
            "COW_BACKEND.u32VersionEnd ({:#x}) differs from u32Version ({:#x}): the table was \
             built against another layout of COW_BACKEND",
            t.u32VersionEnd, t.u32Version
        )));
    }
    // SAFETY: the name pointer is NULL or a C string.
    let name = unsafe { table_name(&t) };
    if name.is_empty() || name.len() > 64 {
        return Err(Error::InvalidArgument(
            "COW_BACKEND.pszBackendName must be a name of 1 to 64 bytes".into(),
        ));
    }
    if t.uBackendCaps & !core::caps::ALL != 0 {
        return Err(Error::InvalidArgument(format!(
            "backend '{name}': unknown caps {:#x}",
            t.uBackendCaps & !core::caps::ALL
        )));
    }
    let mut missing = Vec::new();
    let need = |ok: bool, member: &'static str, missing: &mut Vec<&'static str>| {
        if !ok {
            missing.push(member);
        }
    };
    need(t.pfnProbe.is_some(), "pfnProbe", &mut missing);
    need(t.pfnOpen.is_some(), "pfnOpen", &mut missing);
    need(t.pfnClose.is_some(), "pfnClose", &mut missing);
    need(t.pfnRead.is_some(), "pfnRead", &mut missing);
    need(t.pfnGetSize.is_some(), "pfnGetSize", &mut missing);
    if t.uBackendCaps & (COW_CAP_CREATE_FIXED | COW_CAP_CREATE_DYNAMIC) != 0 {
        need(
            t.pfnCreate.is_some(),
            "pfnCreate (a CREATE cap is set)",
            &mut missing,
        );
    }
    if t.uBackendCaps & COW_CAP_DISCARD != 0 {
        need(
            t.pfnDiscard.is_some(),
            "pfnDiscard (COW_CAP_DISCARD is set)",
            &mut missing,
        );
    }
    if t.uBackendCaps & COW_CAP_WRITE != 0 {
        need(
            t.pfnWrite.is_some(),
            "pfnWrite (COW_CAP_WRITE is set)",
            &mut missing,
        );
        need(
            t.pfnFlush.is_some(),
            "pfnFlush (COW_CAP_WRITE is set)",
            &mut missing,
        );
    }
    if !missing.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "backend '{name}' lacks required members: {}",
            missing.join(", ")
        )));
    }
    Ok(t)
}

// ---------------------------------------------------------------------------
// A caller's backend as a Disk

/// An image opened through a caller's table. The table is copied at open,
/// so the caller's table need not outlive the disk.
pub(crate) struct TableDisk {
    table: COW_BACKEND,
    name: String,
    data: *mut c_void,
    bytes: u64,
}

// SAFETY: the backend data is only used through `&mut self`, one call at a
// time (the handle's lock), from whichever thread uses the disk; the
// header documents that a backend must allow that.
unsafe impl Send for TableDisk {}

impl TableDisk {
    unsafe fn open(table: COW_BACKEND, path: &Path, flags: u32) -> Result<TableDisk> {
        // SAFETY: validated table.
        let name = unsafe { table_name(&table) };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidArgument("path contains a NUL byte".into()))?;
        let open = table
            .pfnOpen
            .ok_or_else(|| Error::Internal("validated table lacks pfnOpen".into()))?;
        let mut data: *mut c_void = std::ptr::null_mut();
        // SAFETY: the caller's backend, called as the table documents.
        let rc = unsafe { open(c.as_ptr(), flags, &mut data) };
        if rc != 0 {
            return Err(error_from_code(
                rc,
                format!("backend '{name}' could not open {}", path.display()),
            ));
        }
        let mut disk = TableDisk {
            table,
            name,
            data,
            bytes: 0,
        };
        if let Some(size) = table.pfnGetSize {
            // SAFETY: as above.
            disk.bytes = unsafe { size(data) };
        }
        Ok(disk)
    }

    /// Reads `buf` from byte `offset` (inside the disk's bytes), returning
    /// the combined status.
    fn read_bytes(&mut self, offset: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let read = self
            .table
            .pfnRead
            .ok_or_else(|| Error::Internal("validated table lacks pfnRead".into()))?;
        let mut status = SectorStatus::NotAlloc;
        let mut done = 0usize;
        while done < buf.len() {
            let want = buf.len() - done;
            let mut got = 0usize;
            let at = offset + done as u64;
            // SAFETY: the caller's backend; the buffer holds `want` bytes.
            let rc = unsafe {
                read(
                    self.data,
                    at,
                    want,
                    buf[done..].as_mut_ptr().cast(),
                    &mut got,
                )
            };
            let rc_code = rc as u32;
            let part = match rc_code {
                code::NONE => SectorStatus::Normal,
                code::BLOCK_FREE => SectorStatus::NotAlloc,
                _ => {
                    return Err(error_from_code(
                        rc,
                        format!("backend '{}' pfnRead at byte {at} (+{want})", self.name),
                    ))
                }
            };
            if got == 0 || got > want {
                return Err(Error::Read(format!(
                    "backend '{}' pfnRead at byte {at} reported {got} bytes of {want}",
                    self.name
                )));
            }
            if part == SectorStatus::NotAlloc {
                buf[done..done + got].fill(0);
            }
            status = status.combine(part);
            done += got;
        }
        Ok(status)
    }
}

impl Disk for TableDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Custom
    }
    fn sector_count(&self) -> u64 {
        self.bytes.div_ceil(SECTOR_SIZE as u64)
    }
    fn byte_size(&self) -> u64 {
        self.bytes
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        let get = self.table.pfnGetUuid?;
        let mut u = S_UUID::default();
        // SAFETY: the caller's backend with a valid out pointer.
        (unsafe { get(self.data, &mut u) } == 0).then_some(u.to_rfc())
    }
    fn is_snapshot(&self) -> bool {
        match self.table.pfnGetImageFlags {
            // SAFETY: the caller's backend.
            Some(f) => (unsafe { f(self.data) } & COW_IMAGE_DIFF) != 0,
            None => false,
        }
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.sector_count())?;
        let offset = lba * SECTOR_SIZE as u64;
        // The tail past an odd-sized disk's last byte is zero padding.
        let inside = self.bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(SectorStatus::NotAlloc);
        }
        self.read_bytes(offset, head)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        // The table has no status call: read (1 MiB at a time) and look at
        // what pfnRead says, stopping at the first data.
        check_range(lba, count, self.sector_count())?;
        let mut status = SectorStatus::NotAlloc;
        let mut scratch = vec![0u8; 2048 * SECTOR_SIZE];
        let mut done = 0;
        while done < count && status != SectorStatus::Normal {
            let n = (count - done).min(2048);
            let part = &mut scratch[..n as usize * SECTOR_SIZE];
            status = status.combine(self.read_sectors(lba + done, part)?);
            done += n;
        }
        Ok(status)
    }
}

impl Drop for TableDisk {
    fn drop(&mut self) {
        if let Some(close) = self.table.pfnClose {
            // SAFETY: we own the backend data; pfnClose is its destructor.
            unsafe { close(self.data, 0) };
        }
    }
}

/// Opens `path` read-only as a disk: the registered caller backends are
/// probed first (in registration order), then the built-in formats (raw
/// last). Used by VDDR_Open/VDDR_OpenEx.
pub(crate) fn open_probing(path: &Path, flags: u32) -> Result<Box<dyn Disk>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("path contains a NUL byte".into()))?;
    for table in registered() {
        // SAFETY: registered tables are kept alive by the caller until
        // unregistered (documented), and were validated at registration.
        let t = unsafe { *table };
        if let Some(probe) = t.pfnProbe {
            // SAFETY: the caller's backend.
            if unsafe { probe(c.as_ptr()) } == 0 {
                // SAFETY: validated table.
                return Ok(Box::new(unsafe { TableDisk::open(t, path, flags) }?));
            }
        }
    }
    let options = OpenOptions {
        follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
    };
    if flags & COW_OPEN_REPAIR != 0 {
        let info = registry::detect(path)?.info();
        if let (true, Some(open_image)) = (info.repairs, info.open_image) {
            return Ok(open_image(path, &repairing_read_only(true))?);
        }
    }
    formats::open_path(path, &options)
}

/// Image-open options for a read-only disk handle of a format that can
/// repair: repairing only when the caller asked (COW_OPEN_REPAIR).
fn repairing_read_only(repair: bool) -> ImageOpenOptions {
    ImageOpenOptions {
        writable: false,
        follow_backing: false,
        repair,
    }
}

// ---------------------------------------------------------------------------
// Exported functions

/// Fills `backend` for a caller's own table: all members zero/NULL, both
/// version markers set to COW_BACKEND_VERSION. Returns COW_ERR_NONE (0),
/// or COW_ERR_INVALID_ARG for NULL.
#[no_mangle]
pub unsafe extern "C" fn COW_InitBackend(backend: *mut COW_BACKEND) -> c_int {
    guard_code(|| {
        non_null(backend, "backend")?;
        // SAFETY: non-NULL, points to a COW_BACKEND; all-zero is a valid
        // value for every member (NULL pointers, None functions).
        unsafe {
            std::ptr::write_bytes(backend, 0, 1);
            (*backend).u32Version = COW_BACKEND_VERSION;
            (*backend).u32VersionEnd = COW_BACKEND_VERSION;
        }
        Ok(())
    })
}

/// Registers a caller's backend table, so VDDR_Open probes it (before the
/// built-in formats, in registration order). The library keeps the
/// pointer: the table (and the strings it points to) must stay valid and
/// unchanged until COW_UnregisterBackend. Fails with COW_ERR_UNSUPPORTED
/// when a version marker is not COW_BACKEND_VERSION (or the two differ),
/// with COW_ERR_INVALID_ARG when a member its caps require is NULL, the
/// name is missing, unknown caps are set, or the table or its name is
/// already registered (built-in names included). Returns a COW_ERR_*
/// code, 0 on success. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn COW_RegisterBackend(backend: *const COW_BACKEND) -> c_int {
    guard_code(|| {
        // SAFETY: forwarded contract.
        let t = unsafe { validate(backend) }?;
        if builtin_index(backend).is_some() {
            return Err(Error::InvalidArgument(
                "this is a built-in backend table; it is always available".into(),
            ));
        }
        // SAFETY: validated.
        let name = unsafe { table_name(&t) };
        if builtins().infos.iter().any(|b| b.name() == name) {
            return Err(Error::InvalidArgument(format!(
                "a built-in backend is already called '{name}'"
            )));
        }
        let mut reg = registry();
        let key = backend as usize;
        for &p in &reg.0 {
            if p == key {
                return Err(Error::InvalidArgument(format!(
                    "backend '{name}' is already registered"
                )));
            }
            // SAFETY: registered tables are alive until unregistered.
            if unsafe { table_name(&*(p as *const COW_BACKEND)) } == name {
                return Err(Error::InvalidArgument(format!(
                    "another backend called '{name}' is registered"
                )));
            }
        }
        reg.0.push(backend as usize);
        Ok(())
    })
}

/// Unregisters a table registered with COW_RegisterBackend (the caller may
/// free it afterwards). Disks already opened through it stay usable: they
/// keep a copy of the table (its functions and their code must stay
/// loaded). Returns a COW_ERR_* code, 0 on success: COW_ERR_INVALID_ARG
/// if it is not registered.
#[no_mangle]
pub unsafe extern "C" fn COW_UnregisterBackend(backend: *const COW_BACKEND) -> c_int {
    guard_code(|| {
        non_null(backend, "backend")?;
        let mut reg = registry();
        let key = backend as usize;
        match reg.0.iter().position(|&p| p == key) {
            Some(i) => {
                reg.0.remove(i);
                Ok(())
            }
            None => Err(Error::InvalidArgument(
                "this backend table is not registered".into(),
            )),
        }
    })
}

/// Returns the number of backends: the registered ones, then the built-in
/// ones (raw, vdi, parallels, cow, vci, ...).
#[no_mangle]
pub extern "C" fn COW_GetBackendCount() -> u32 {
    guard(|| Ok((registry().0.len() + builtins().tables.len()) as u32))
}

/// Returns backend number `index` in probe order: registered tables first
/// (registration order), then the built-in ones (raw last). Built-in
/// tables are static (valid for the program's life). NULL with
/// COW_ERR_INVALID_ARG when index >= COW_GetBackendCount().
#[no_mangle]
pub extern "C" fn COW_GetBackend(index: u32) -> *const COW_BACKEND {
    guard(|| {
        let reg = registered();
        let b = builtins();
        let i = index as usize;
        let found = if i < reg.len() {
            reg[i]
        } else if i - reg.len() < b.tables.len() {
            &b.tables[i - reg.len()] as *const COW_BACKEND
        } else {
            return Err(Error::InvalidArgument(format!(
                "backend index {index} of {}",
                reg.len() + b.tables.len()
            )));
        };
        Ok(found.cast_mut())
    })
    .cast_const()
}

/// Returns the backend called `name` (registered or built-in, e.g. "raw",
/// "cow", "vci"), or NULL with COW_ERR_INVALID_ARG if there is none.
#[no_mangle]
pub unsafe extern "C" fn COW_FindBackend(name: *const c_char) -> *const COW_BACKEND {
    guard(|| {
        non_null(name, "name")?;
        // SAFETY: NUL-terminated per the contract.
        let wanted = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        for t in registered() {
            // SAFETY: registered tables are alive.
            if unsafe { table_name(&*t) } == wanted {
                return Ok(t.cast_mut());
            }
        }
        let b = builtins();
        match b.infos.iter().position(|i| i.name() == wanted) {
            Some(i) => Ok((&b.tables[i] as *const COW_BACKEND).cast_mut()),
            None => Err(Error::InvalidArgument(format!(
                "no backend is called '{wanted}'"
            ))),
        }
    })
    .cast_const()
}

/// Opens `path` read-only with the given backend (a built-in table from
/// COW_FindBackend/COW_GetBackend, or any caller table, registered or not,
/// which is validated as COW_RegisterBackend does and copied). `flags`:
/// COW_OPEN_FOLLOW_PARENTS, COW_OPEN_REPAIR; COW_OPEN_READ_WRITE is refused
/// (COW_ERR_INVALID_ARG: an HVDDR disk is read-only; write through the
/// table's pfnWrite instead). Sectors the backend reports as
/// COW_ERR_BLOCK_FREE read as zeros with VDDR_RSLT_NOTALLOC. A caller
/// backend's functions are called from whichever thread uses the handle,
/// one call at a time; BlockStatus on such a disk reads through pfnRead.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenWithBackend(
    backend: *const COW_BACKEND,
    path: *const c_char,
    flags: u32,
) -> HVDDR {
    guard(|| {
        non_null(backend, "backend")?;
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        if flags & !(COW_OPEN_FOLLOW_PARENTS | COW_OPEN_REPAIR) != 0 {
            return Err(Error::InvalidArgument(format!(
                "flags {flags:#x}: only COW_OPEN_FOLLOW_PARENTS and COW_OPEN_REPAIR apply to a \
                 read-only HVDDR"
            )));
        }
        let disk: Box<dyn Disk> = match builtin_index(backend) {
            Some(i) => {
                let info = builtins().infos[i].format().info();
                match (info.repairs, info.open_image) {
                    // A format that can repair is opened by its image open,
                    // which honours COW_OPEN_REPAIR and checks the format.
                    (true, Some(open_image)) => {
                        open_image(&path, &repairing_read_only(flags & COW_OPEN_REPAIR != 0))?
                    }
                    _ => {
                        let options = OpenOptions {
                            follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
                        };
                        if !info.probe_path(&path) {
                            return Err(Error::Unsupported(format!(
                                "{}: not a {} image",
                                path.display(),
                                info.name
                            )));
                        }
                        (info.open_at_depth)(&path, &options, 0)?
                    }
                }
            }
            None => {
                // SAFETY: forwarded contract.
                let t = unsafe { validate(backend) }?;
                // SAFETY: validated.
                Box::new(unsafe { TableDisk::open(t, &path, flags) }?)
            }
        };
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Opens a UML COW file read-only over a backing file the caller names
/// (`backing`, checked for size and mtime against the COW header as Linux
/// does: COW_ERR_SOURCE_MISMATCH when they differ). With `backing` NULL,
/// the path stored in the COW file is used only if `flags` has
/// COW_OPEN_FOLLOW_PARENTS (else COW_ERR_OPEN). Unchanged sectors read from
/// the backing file.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenUmlCow(
    path: *const c_char,
    backing: *const c_char,
    flags: u32,
) -> HVDDR {
    guard(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        if flags & !COW_OPEN_FOLLOW_PARENTS != 0 {
            return Err(Error::InvalidArgument(format!("flags {flags:#x}")));
        }
        let disk: Box<dyn Disk> = if backing.is_null() {
            let options = OpenOptions {
                follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
            };
            umlcow::open_boxed(&path, &options, 0)?
        } else {
            // SAFETY: forwarded contract.
            let b = unsafe { c_path(backing, "backing") }?;
            Box::new(umlcow::UmlCow::open(
                &path,
                &umlcow::UmlCowOptions {
                    writable: false,
                    backing: umlcow::Backing::Path(b),
                },
            )?)
        };
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Creates a UML COW file at `path` (which must not exist) over the
/// existing file `backing`, as `uml_mkcow` does: the backing file's
/// absolute path, size and mtime go into the header. `version` 3 (Linux's
/// current layout, 512-byte sectors, 4096 alignment; 0 means 3) or 2
/// (Linux's v2 layout). Open it afterwards with the "cow" backend's pfnOpen
/// (COW_OPEN_READ_WRITE to write) or VDDR_OpenUmlCow. Returns a COW_ERR_*
/// code, 0 on success (COW_ERR_OPEN, COW_ERR_INVALID_ARG, COW_ERR_WRITE,
/// ...).
#[no_mangle]
pub unsafe extern "C" fn COW_UmlCowCreate(
    path: *const c_char,
    backing: *const c_char,
    version: u32,
) -> c_int {
    guard_code(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        // SAFETY: forwarded contract.
        let backing = unsafe { c_path(backing, "backing") }?;
        let options = umlcow::CreateOptions {
            version: if version == 0 { 3 } else { version },
            ..Default::default()
        };
        let cow = umlcow::UmlCow::create(&path, &backing, &options)?;
        Box::new(cow).close()?;
        Ok(())
    })
}
