//! The library's one error type and its stable numeric codes.
//!
//! The codes are the C ABI's `COW_ERR_*` values. The first seven are the
//! legacy module's and keep their values; new codes are appended and a value
//! is never reused.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use crate::numbers::ErrorCode;

/// The codes as `u32`, for comparing with [`Error::code`]; derived from
/// [`ErrorCode`], where each is defined.
pub mod code {
    use super::ErrorCode;
    pub const NONE: u32 = ErrorCode::None as u32;
    pub const INVHANDLE: u32 = ErrorCode::Invhandle as u32;
    pub const OUTOFMEM: u32 = ErrorCode::Outofmem as u32;
    pub const INVBLOCK: u32 = ErrorCode::Invblock as u32;
    pub const SEEK: u32 = ErrorCode::Seek as u32;
    pub const READ: u32 = ErrorCode::Read as u32;
    pub const INVALIDMOVE: u32 = ErrorCode::Invalidmove as u32;
    pub const WRITE: u32 = ErrorCode::Write as u32;
    pub const INVALID_ARG: u32 = ErrorCode::InvalidArg as u32;
    pub const CORRUPT: u32 = ErrorCode::Corrupt as u32;
    pub const UNSUPPORTED: u32 = ErrorCode::Unsupported as u32;
    pub const SOURCE_MISMATCH: u32 = ErrorCode::SourceMismatch as u32;
    pub const READ_ONLY: u32 = ErrorCode::ReadOnly as u32;
    pub const NO_SPACE: u32 = ErrorCode::NoSpace as u32;
    pub const OPEN: u32 = ErrorCode::Open as u32;
    pub const BLOCK_FREE: u32 = ErrorCode::BlockFree as u32;
    pub const CANCELLED: u32 = ErrorCode::Cancelled as u32;
    pub const LOCKED: u32 = ErrorCode::Locked as u32;
    pub const INTERNAL: u32 = ErrorCode::Internal as u32;
    pub const NOT_OVERLAY: u32 = ErrorCode::NotOverlay as u32;
}

/// Everything that can go wrong: a stable code (the C ABI's `COW_ERR_*`),
/// what happened in words, and where — the file and the byte offset when
/// they are known — kept apart so callers can use them without parsing
/// text. Displayed as "label: path: message (byte offset N)".
#[derive(Debug)]
pub struct Error {
    code: ErrorCode,
    message: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
}

impl Error {
    /// An error with `code` and `message` and no location yet.
    pub fn new(code: ErrorCode, message: String) -> Error {
        Error {
            code,
            message,
            path: None,
            offset: None,
        }
    }

    /// An error with code [`ErrorCode::Invhandle`].
    pub fn invalid_handle(message: String) -> Error {
        Error::new(ErrorCode::Invhandle, message)
    }
    /// An error with code [`ErrorCode::Outofmem`].
    pub fn out_of_memory(message: String) -> Error {
        Error::new(ErrorCode::Outofmem, message)
    }
    /// An error with code [`ErrorCode::Invblock`].
    pub fn invalid_block(message: String) -> Error {
        Error::new(ErrorCode::Invblock, message)
    }
    /// An error with code [`ErrorCode::Seek`].
    pub fn seek(message: String) -> Error {
        Error::new(ErrorCode::Seek, message)
    }
    /// An error with code [`ErrorCode::Read`].
    pub fn read_failed(message: String) -> Error {
        Error::new(ErrorCode::Read, message)
    }
    /// An error with code [`ErrorCode::Invalidmove`].
    pub fn invalid_move(message: String) -> Error {
        Error::new(ErrorCode::Invalidmove, message)
    }
    /// An error with code [`ErrorCode::Write`].
    pub fn write_failed(message: String) -> Error {
        Error::new(ErrorCode::Write, message)
    }
    /// An error with code [`ErrorCode::InvalidArg`].
    pub fn invalid_argument(message: String) -> Error {
        Error::new(ErrorCode::InvalidArg, message)
    }
    /// An error with code [`ErrorCode::Corrupt`].
    pub fn corrupt(message: String) -> Error {
        Error::new(ErrorCode::Corrupt, message)
    }
    /// An error with code [`ErrorCode::Unsupported`].
    pub fn unsupported(message: String) -> Error {
        Error::new(ErrorCode::Unsupported, message)
    }
    /// An error with code [`ErrorCode::SourceMismatch`].
    pub fn source_mismatch(message: String) -> Error {
        Error::new(ErrorCode::SourceMismatch, message)
    }
    /// An error with code [`ErrorCode::ReadOnly`].
    pub fn read_only(message: String) -> Error {
        Error::new(ErrorCode::ReadOnly, message)
    }
    /// An error with code [`ErrorCode::NoSpace`].
    pub fn no_space(message: String) -> Error {
        Error::new(ErrorCode::NoSpace, message)
    }
    /// An error with code [`ErrorCode::Open`].
    pub fn open(message: String) -> Error {
        Error::new(ErrorCode::Open, message)
    }
    /// An error with code [`ErrorCode::BlockFree`].
    pub fn block_free(message: String) -> Error {
        Error::new(ErrorCode::BlockFree, message)
    }
    /// An error with code [`ErrorCode::Cancelled`].
    pub fn cancelled(message: String) -> Error {
        Error::new(ErrorCode::Cancelled, message)
    }
    /// An error with code [`ErrorCode::Locked`].
    pub fn locked(message: String) -> Error {
        Error::new(ErrorCode::Locked, message)
    }
    /// An error with code [`ErrorCode::Internal`].
    pub fn internal(message: String) -> Error {
        Error::new(ErrorCode::Internal, message)
    }
    /// An error with code [`ErrorCode::NotOverlay`].
    pub fn not_overlay(message: String) -> Error {
        Error::new(ErrorCode::NotOverlay, message)
    }

    /// The same error, located in the file at `path` (kept when one is
    /// already set: the innermost file is the one that failed).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Error {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// The same error, located at byte `offset` of its file.
    pub fn at_offset(mut self, offset: u64) -> Error {
        self.offset.get_or_insert(offset);
        self
    }

    /// The same error with `detail` appended to its message.
    pub fn with_detail(mut self, detail: &str) -> Error {
        self.message.push_str(detail);
        self
    }

    /// The stable error code of this error.
    pub fn kind(&self) -> ErrorCode {
        self.code
    }

    /// The stable `COW_ERR_*` code of this error, as a number.
    pub fn code(&self) -> u32 {
        self.code as u32
    }

    /// What happened, without the label and the location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The file the error is about, when known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The byte offset in [`Error::path`] the error is about, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// A read error naming what was read, where, and the OS's reason.
    pub fn read(what: &str, offset: u64, err: io::Error) -> Error {
        Error::read_failed(format!("{what}: {err}")).at_offset(offset)
    }

    /// A write error naming what was written, where, and the OS's reason
    /// (a full disk is [`ErrorCode::NoSpace`]).
    pub fn write(what: &str, offset: u64, err: io::Error) -> Error {
        let code = if err.raw_os_error() == Some(libc::ENOSPC) {
            ErrorCode::NoSpace
        } else {
            ErrorCode::Write
        };
        Error::new(code, format!("{what}: {err}")).at_offset(offset)
    }
}

/// The short label an error's text starts with.
fn label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::None => "no error",
        ErrorCode::Invhandle => "invalid handle",
        ErrorCode::Outofmem => "out of memory",
        ErrorCode::Invblock => "sector range outside the drive",
        ErrorCode::Seek => "seek failed",
        ErrorCode::Read => "read failed",
        ErrorCode::Invalidmove => "invalid move",
        ErrorCode::Write => "write failed",
        ErrorCode::InvalidArg => "invalid argument",
        ErrorCode::Corrupt => "corrupt image",
        ErrorCode::Unsupported => "unsupported",
        ErrorCode::SourceMismatch => "source mismatch",
        ErrorCode::ReadOnly => "read-only",
        ErrorCode::NoSpace => "no space",
        ErrorCode::Open => "cannot open",
        ErrorCode::BlockFree => "block not allocated",
        ErrorCode::Cancelled => "cancelled",
        ErrorCode::Locked => "locked",
        ErrorCode::Internal => "internal error",
        ErrorCode::NotOverlay => "not an overlay",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", label(self.code))?;
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.message)?;
        if let Some(offset) = self.offset {
            write!(f, " (byte offset {offset})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// The short, fixed description of a code number, used when no detail is
/// at hand ("unknown error code" for a number that is not a code).
pub fn describe(code: u32) -> &'static str {
    ErrorCode::from_u32(code).map_or("unknown error code", ErrorCode::describe)
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_codes_keep_their_legacy_values() {
        // Values fixed by the legacy cow.h; see docs/C-API.md.
        assert_eq!(Error::invalid_handle(String::new()).code(), 0x60001);
        assert_eq!(Error::out_of_memory(String::new()).code(), 0x60002);
        assert_eq!(Error::invalid_block(String::new()).code(), 0x60003);
        assert_eq!(Error::seek(String::new()).code(), 0x60004);
        assert_eq!(Error::read_failed(String::new()).code(), 0x60005);
        assert_eq!(Error::invalid_move(String::new()).code(), 0x60006);
    }

    #[test]
    fn an_error_keeps_code_message_and_location_apart() {
        let e = Error::corrupt("bad magic".into())
            .with_path("/images/a.vdi")
            .at_offset(64);
        assert_eq!(e.kind(), ErrorCode::Corrupt);
        assert_eq!(e.message(), "bad magic");
        assert_eq!(e.path(), Some(Path::new("/images/a.vdi")));
        assert_eq!(e.offset(), Some(64));
        assert_eq!(
            e.to_string(),
            "corrupt image: /images/a.vdi: bad magic (byte offset 64)"
        );
        // The innermost location wins: an outer layer adding its own file
        // does not hide the one that failed.
        let outer = e.with_path("/images/child.vdi").at_offset(0);
        assert_eq!(outer.path(), Some(Path::new("/images/a.vdi")));
        assert_eq!(outer.offset(), Some(64));
    }

    #[test]
    fn read_errors_carry_the_offset() {
        let e = Error::read("header", 4096, io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), ErrorCode::Read);
        assert_eq!(e.offset(), Some(4096));
        assert!(e.to_string().starts_with("read failed: header: "), "{e}");
    }

    #[test]
    fn enospc_maps_to_no_space() {
        let e = Error::write("store", 0, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.code(), code::NO_SPACE);
    }
}
