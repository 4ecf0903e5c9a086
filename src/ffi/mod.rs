//! The C ABI: every `extern "C"` function of the library, and nothing else.
//!
//! - one panic boundary ([`guard`]) around every exported body;
//! - the calling thread's last error, set by every call;
//! - handles: each open disk is a heap object starting with the method
//!   table, registered by address; a handle is looked up in the registry
//!   before anything is dereferenced, so NULL, closed and foreign handles
//!   are errors, never crashes. Calls on one handle are serialised by a
//!   lock inside it.
#![allow(unsafe_code)]
#![allow(clippy::missing_safety_doc)]

pub mod api;
pub mod backend;
pub mod builtin;
mod clone;
mod handle;
mod legacy;
mod registry;
mod source;
pub mod types;
mod uuid;

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{code, Error, Result};

thread_local! {
    /// The calling thread's last error code. Its address is handed to C
    /// (`COW_LastErrorLocation`, behind the legacy `VDDR_LastError`
    /// macro), so legacy reader code may assign it; it is only ever
    /// touched from its own thread.
    static LAST_ERROR_CODE: Cell<u32> = const { Cell::new(0) };
    /// The detailed text of the last error the library set, with the code
    /// it was set for: when C has assigned another code since, the text no
    /// longer applies and the code's fixed description is used instead.
    static LAST_ERROR_TEXT: RefCell<(u32, CString)> = RefCell::new((0, CString::default()));
}

fn set_last_error(code: u32, message: &str) {
    // Interior NULs would cut the C string short; show them instead.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR_CODE.with(|cell| cell.set(code));
    LAST_ERROR_TEXT.with(|cell| *cell.borrow_mut() = (code, text));
}

/// The calling thread's last error code.
pub(crate) fn last_error_code() -> u32 {
    LAST_ERROR_CODE.with(Cell::get)
}

/// The address of the calling thread's last error code, valid for the
/// thread's life.
pub(crate) fn last_error_location() -> *mut u32 {
    LAST_ERROR_CODE.with(Cell::as_ptr)
}

/// A pointer to the calling thread's last error text, valid until the
/// thread's next call into the library.
pub(crate) fn last_error_text() -> *const std::os::raw::c_char {
    let code = last_error_code();
    if code == code::NONE {
        return c"no error".as_ptr();
    }
    LAST_ERROR_TEXT.with(|cell| {
        let cell = cell.borrow();
        if cell.0 == code {
            cell.1.as_ptr()
        } else {
            api::static_description(code)
        }
    })
}

/// What an exported function returns when it fails or panics.
pub(crate) trait Fallback {
    fn fallback() -> Self;
}

impl Fallback for std::os::raw::c_int {
    fn fallback() -> Self {
        0 // FALSE, or VDDR_RSLT_FAIL
    }
}

impl Fallback for u32 {
    fn fallback() -> Self {
        0 // VDDR_RSLT_FAIL, or a count of 0
    }
}

impl<T> Fallback for *mut T {
    fn fallback() -> Self {
        std::ptr::null_mut()
    }
}

/// Runs an exported function's body: catches panics, records the last
/// error (cleared on success) and returns the type's fallback on failure.
pub(crate) fn guard<T: Fallback>(body: impl FnOnce() -> Result<T>) -> T {
    guard_or(T::fallback(), body)
}

/// `guard` with an explicit fallback value.
pub(crate) fn guard_or<T>(fallback: T, body: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => {
            set_last_error(code::NONE, "");
            value
        }
        Ok(Err(error)) => {
            set_last_error(error.code(), &error.to_string());
            fallback
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let error = Error::internal(format!("caught a panic: {what}"));
            set_last_error(error.code(), &error.to_string());
            fallback
        }
    }
}

/// The panic boundary of the functions that return a COW_ERR_* code: 0 on
/// success, the error's code on failure (a caught panic is
/// COW_ERR_INTERNAL), and the same code as the thread's last error.
pub(crate) fn guard_code(body: impl FnOnce() -> Result<()>) -> c_int {
    guard_or((), body);
    // `guard_or` recorded the outcome as the thread's last error; every
    // code is below 2^31, so it is returned unchanged.
    last_error_code() as c_int
}

/// The panic boundary of the functions that read the last error: catches
/// panics like `guard` but leaves the last error as it is.
pub(crate) fn guard_quiet<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// Checks a pointer argument is not NULL.
pub(crate) fn non_null<T>(ptr: *const T, name: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::invalid_argument(format!("{name} is NULL")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let r: u32 = guard(|| -> Result<u32> { panic!("boom") });
        assert_eq!(r, 0);
        assert_eq!(last_error_code(), code::INTERNAL);
    }
}
