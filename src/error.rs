//! The library's one error type and its stable numeric codes.
//!
//! The codes are the C ABI's `COW_ERR_*` values. The first seven are the
//! legacy module's and keep their values; new codes are appended and a value
//! is never reused.

use std::io;

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

/// Everything that can go wrong, each variant carrying the detail a user
/// needs (path, offset, OS error text) in its message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid handle: {0}")]
    InvalidHandle(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("sector range outside the drive: {0}")]
    InvalidBlock(String),
    #[error("seek failed: {0}")]
    Seek(String),
    #[error("read failed: {0}")]
    Read(String),
    #[error("invalid move: {0}")]
    InvalidMove(String),
    #[error("write failed: {0}")]
    Write(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("source mismatch: {0}")]
    SourceMismatch(String),
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("cannot open: {0}")]
    Open(String),
    #[error("block not allocated: {0}")]
    BlockFree(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("locked: {0}")]
    Locked(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("not an overlay: {0}")]
    NotOverlay(String),
}

impl Error {
    /// The stable error code of this error.
    pub fn kind(&self) -> ErrorCode {
        match self {
            Error::InvalidHandle(_) => ErrorCode::Invhandle,
            Error::OutOfMemory(_) => ErrorCode::Outofmem,
            Error::InvalidBlock(_) => ErrorCode::Invblock,
            Error::Seek(_) => ErrorCode::Seek,
            Error::Read(_) => ErrorCode::Read,
            Error::InvalidMove(_) => ErrorCode::Invalidmove,
            Error::Write(_) => ErrorCode::Write,
            Error::InvalidArgument(_) => ErrorCode::InvalidArg,
            Error::Corrupt(_) => ErrorCode::Corrupt,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::SourceMismatch(_) => ErrorCode::SourceMismatch,
            Error::ReadOnly(_) => ErrorCode::ReadOnly,
            Error::NoSpace(_) => ErrorCode::NoSpace,
            Error::Open(_) => ErrorCode::Open,
            Error::BlockFree(_) => ErrorCode::BlockFree,
            Error::Cancelled(_) => ErrorCode::Cancelled,
            Error::Locked(_) => ErrorCode::Locked,
            Error::Internal(_) => ErrorCode::Internal,
            Error::NotOverlay(_) => ErrorCode::NotOverlay,
        }
    }

    /// The stable `COW_ERR_*` code of this error, as a number.
    pub fn code(&self) -> u32 {
        self.kind() as u32
    }

    /// A read error naming what was read, where, and the OS's reason.
    pub fn read(what: &str, offset: u64, err: io::Error) -> Error {
        Error::Read(format!("{what} at byte offset {offset}: {err}"))
    }

    /// A write error naming what was written, where, and the OS's reason.
    pub fn write(what: &str, offset: u64, err: io::Error) -> Error {
        if err.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace(format!("{what} at byte offset {offset}: {err}"));
        }
        Error::Write(format!("{what} at byte offset {offset}: {err}"))
    }
}

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
        assert_eq!(Error::InvalidHandle(String::new()).code(), 0x60001);
        assert_eq!(Error::OutOfMemory(String::new()).code(), 0x60002);
        assert_eq!(Error::InvalidBlock(String::new()).code(), 0x60003);
        assert_eq!(Error::Seek(String::new()).code(), 0x60004);
        assert_eq!(Error::Read(String::new()).code(), 0x60005);
        assert_eq!(Error::InvalidMove(String::new()).code(), 0x60006);
    }

    #[test]
    fn enospc_maps_to_no_space() {
        let e = Error::write("store", 0, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.code(), code::NO_SPACE);
    }
}
