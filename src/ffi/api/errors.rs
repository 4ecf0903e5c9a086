//! Errors and version: the last error, error strings, the library version.

use std::os::raw::c_char;

use crate::ffi::types::*;
use crate::ffi::{guard, guard_quiet, last_error_code, last_error_location, last_error_text};

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
