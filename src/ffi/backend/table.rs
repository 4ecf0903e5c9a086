//! The C `COW_BACKEND` table type, the checks of a caller's table, and
//! the helpers every table call shares (C paths, codes back to errors).
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::{code, Error, Result};
use crate::ffi::builtin as core;
use crate::ffi::non_null;
use crate::ffi::types::{COW_PROGRESS_FN, S_UUID};

// COW_BACKEND_VERSION, COW_CAP_*: src/numbers.rs.
use crate::ffi::types::{
    COW_BACKEND_VERSION, COW_CAP_CREATE_DYNAMIC, COW_CAP_CREATE_FIXED, COW_CAP_DISCARD,
    COW_CAP_WRITE,
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

/// An Error for a code a C backend returned.
pub(super) fn error_from_code(rc: c_int, what: String) -> Error {
    let rc_code = rc as u32;
    match rc_code {
        code::INVHANDLE => Error::invalid_handle(what),
        code::OUTOFMEM => Error::out_of_memory(what),
        code::INVBLOCK => Error::invalid_block(what),
        code::SEEK => Error::seek(what),
        code::READ => Error::read_failed(what),
        code::WRITE => Error::write_failed(what),
        code::INVALID_ARG => Error::invalid_argument(what),
        code::CORRUPT => Error::corrupt(what),
        code::UNSUPPORTED => Error::unsupported(what),
        code::SOURCE_MISMATCH => Error::source_mismatch(what),
        code::READ_ONLY => Error::read_only(what),
        code::NO_SPACE => Error::no_space(what),
        code::OPEN => Error::open(what),
        code::BLOCK_FREE => Error::block_free(what),
        code::CANCELLED => Error::cancelled(what),
        code::LOCKED => Error::locked(what),
        _ => Error::read_failed(format!("{what} (code {rc:#x})")),
    }
}

pub(super) unsafe fn c_path(p: *const c_char, name: &str) -> Result<PathBuf> {
    non_null(p, name)?;
    // SAFETY: non-NULL, NUL-terminated per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid_argument(format!("{name} is empty")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(bytes)))
}

pub(super) unsafe fn table_name(table: &COW_BACKEND) -> String {
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
pub(super) unsafe fn validate(table: *const COW_BACKEND) -> Result<COW_BACKEND> {
    non_null(table, "backend")?;
    // SAFETY: non-NULL; the caller passes a COW_BACKEND.
    let t = unsafe { *table };
    let magic = COW_BACKEND_VERSION >> 16;
    if t.u32Version >> 16 != magic
        || (t.u32Version >> 8) & 0xFF != (COW_BACKEND_VERSION >> 8) & 0xFF
    {
        return Err(Error::unsupported(format!(
            "COW_BACKEND.u32Version is {:#x}; this library implements {COW_BACKEND_VERSION:#x} \
             (fill the table with COW_InitBackend)",
            t.u32Version
        )));
    }
    if t.u32VersionEnd != t.u32Version {
        return Err(Error::unsupported(format!(
            "COW_BACKEND.u32VersionEnd ({:#x}) differs from u32Version ({:#x}): the table was \
             built against another layout of COW_BACKEND",
            t.u32VersionEnd, t.u32Version
        )));
    }
    // SAFETY: the name pointer is NULL or a C string.
    let name = unsafe { table_name(&t) };
    if name.is_empty() || name.len() > 64 {
        return Err(Error::invalid_argument(
            "COW_BACKEND.pszBackendName must be a name of 1 to 64 bytes".into(),
        ));
    }
    if t.uBackendCaps & !core::caps::ALL != 0 {
        return Err(Error::invalid_argument(format!(
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
        return Err(Error::invalid_argument(format!(
            "backend '{name}' lacks required members: {}",
            missing.join(", ")
        )));
    }
    Ok(t)
}
