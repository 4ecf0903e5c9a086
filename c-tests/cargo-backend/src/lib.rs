//! The C backend of backend.c, declared for the Rust tests.

use cowdisk::ffi::backend::COW_BACKEND;

extern "C" {
    /// The "cmem" table (filled on the first call, not registered).
    pub fn cmem_backend() -> *const COW_BACKEND;
    /// How many times the table's pfnClose ran.
    pub fn cmem_close_calls() -> std::os::raw::c_int;
}

/// The 8 magic bytes a cmem file starts with.
pub const MAGIC: &[u8; 8] = b"CMEMFMT2";
