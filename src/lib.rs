//! # cowdisk
//!
//! A copy-on-write overlay for virtual disks, for disk-cloning tools: open a
//! source disk, wrap it in an [`overlay::Overlay`], insert, move, write,
//! delete and discard sectors freely without ever writing the source, then
//! read the result page by page to write a compact clone.
//!
//! The crate is also shipped as `libcowdisk.so` with a C ABI that is a
//! drop-in replacement for the legacy `cow.h`/`vddr.h` module; see the
//! generated `include/cowdisk.h`.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]

pub mod clone;
pub mod disk;
pub mod error;
pub mod file_io;
pub mod formats;
pub mod fs;
pub mod newfile;
pub mod numbers;
pub mod overlay;
pub mod partition;
pub mod store;

pub mod ffi;

/// An in-memory disk for tests (the `test-utils` feature).
#[cfg(feature = "test-utils")]
pub use disk::MemDisk;
pub use disk::{Disk, DriveType, Rejected, SectorStatus, SECTOR_SIZE};
pub use error::{Error, Result};
pub use overlay::{Overlay, OverlayOptions};
