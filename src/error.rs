//! The library's one error type and its stable numeric codes.
//!
//! The codes are the C ABI's `COW_ERR_*` values. The first seven are the
//! legacy module's and keep their values; new codes are appended and a value
//! is never reused.

use std::io;

/// Stable numeric error codes, shared by the Rust API and the C ABI.
pub mod code {
    pub const NONE: u32 = 0;
    pub const INVHANDLE: u32 = 0x60001;
    pub const OUTOFMEM: u32 = 0x60002;
    pub const INVBLOCK: u32 = 0x60003;
    pub const SEEK: u32 = 0x60004;
    pub const READ: u32 = 0x60005;
    pub const INVALIDMOVE: u32 = 0x60006;
    pub const WRITE: u32 = 0x60007;
    pub const INVALID_ARG: u32 = 0x60008;
    pub const CORRUPT: u32 = 0x60009;
    pub const UNSUPPORTED: u32 = 0x6000A;
    pub const SOURCE_MISMATCH: u32 = 0x6000B;
    pub const READ_ONLY: u32 = 0x6000C;
    pub const NO_SPACE: u32 = 0x6000D;
    pub const OPEN: u32 = 0x6000E;
    pub const BLOCK_FREE: u32 = 0x6000F;
    pub const CANCELLED: u32 = 0x60010;
    pub const LOCKED: u32 = 0x60011;
    pub const INTERNAL: u32 = 0x60012;
    pub const NOT_OVERLAY: u32 = 0x60013;
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
    /// The stable `COW_ERR_*` code of this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::InvalidHandle(_) => code::INVHANDLE,
            Error::OutOfMemory(_) => code::OUTOFMEM,
            Error::InvalidBlock(_) => code::INVBLOCK,
            Error::Seek(_) => code::SEEK,
            Error::Read(_) => code::READ,
            Error::InvalidMove(_) => code::INVALIDMOVE,
            Error::Write(_) => code::WRITE,
            Error::InvalidArgument(_) => code::INVALID_ARG,
            Error::Corrupt(_) => code::CORRUPT,
            Error::Unsupported(_) => code::UNSUPPORTED,
            Error::SourceMismatch(_) => code::SOURCE_MISMATCH,
            Error::ReadOnly(_) => code::READ_ONLY,
            Error::NoSpace(_) => code::NO_SPACE,
            Error::Open(_) => code::OPEN,
            Error::BlockFree(_) => code::BLOCK_FREE,
            Error::Cancelled(_) => code::CANCELLED,
            Error::Locked(_) => code::LOCKED,
            Error::Internal(_) => code::INTERNAL,
            Error::NotOverlay(_) => code::NOT_OVERLAY,
        }
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

/// The short, fixed description of a code, used when no detail is at hand.
pub fn describe(code: u32) -> &'static str {
    match code {
        code::NONE => "no error",
        code::INVHANDLE => "invalid handle",
        code::OUTOFMEM => "out of memory",
        code::INVBLOCK => "sector range outside the drive",
        code::SEEK => "seek failed",
        code::READ => "read failed",
        code::INVALIDMOVE => "invalid move: the destination lies inside the moved range",
        code::WRITE => "write failed",
        code::INVALID_ARG => "invalid argument",
        code::CORRUPT => "corrupt image",
        code::UNSUPPORTED => "unsupported image or feature",
        code::SOURCE_MISMATCH => "the source is not the disk this overlay was made on",
        code::READ_ONLY => "read-only",
        code::NO_SPACE => "no space left",
        code::OPEN => "cannot open file",
        code::BLOCK_FREE => "block not allocated",
        code::CANCELLED => "cancelled",
        code::LOCKED => "locked by another user",
        code::INTERNAL => "internal error",
        code::NOT_OVERLAY => "the handle is not an overlay",
        _ => "unknown error code",
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_codes_keep_their_legacy_values() {
        // Values fixed by the legacy cow.h; see API.md section 4.
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
