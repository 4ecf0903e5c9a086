//! C types and constants of the ABI. cbindgen reads this file (and
//! `api/`) to generate `include/cowdisk.h`; nothing else is exported.
#![allow(non_snake_case, non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_longlong, c_uint, c_void};

pub use super::uuid::S_UUID;

// The C-visible numbers (VDDR_RSLT_*, VDD_TYPE_*, COW_ERR_*, flags, ...)
// are defined once in src/numbers.rs; build.rs writes their #defines.
pub use crate::numbers::clone_flags::names::*;
pub use crate::numbers::drive_type_codes::*;
pub use crate::numbers::error_codes::*;
pub use crate::numbers::extent_kinds::names::*;
pub use crate::numbers::fs_kinds::*;
pub use crate::numbers::fs_view_flags::names::*;
pub use crate::numbers::grow_flags::names::*;
pub use crate::numbers::open_flags::names::*;
pub use crate::numbers::overlay_flags::names::*;
pub use crate::numbers::results::names::*;
pub use crate::numbers::sector_status_codes::*;
pub use crate::numbers::sizes::names::*;
pub use crate::numbers::special::names::*;
pub use crate::numbers::{caps::names::*, image_flags::names::*};

/// Handle of any open disk (a struct whose first member is a VDDR table).
pub type HVDDR = *mut VDDR;
/// Handle of an overlay (a struct whose first member is a COWOVL table).
pub type HCOW = *mut COWOVL;

/// A path argument of the legacy functions: `CPFN` (`const unsigned char
/// *`) when the legacy `djtypes.h` was included first, else `const char *`
/// (the same ABI). Defined in the header's prelude (cbindgen.toml).
pub type COW_CPFN = *const c_char;
/// A string result of the legacy functions: `PSTR` (`signed char *`) when
/// the legacy `djtypes.h` was included first, else `char *`.
pub type COW_PSTR = *mut c_char;

/// The disk method table, in the legacy layout and with the legacy member
/// types (`BOOL` and `UINT` are `unsigned int`, `HUGE` is `long long`), so
/// a legacy reader's functions fill it without casts. Every open disk -
/// ours or a caller's own legacy reader object - starts with it (`struct
/// t_VDDR`, the legacy `CLASS(VDDR)`). What follows the table is private
/// to whoever made the object. New code may prefer the COW_* functions,
/// which take fixed-width types.
#[repr(C)]
pub struct VDDR {
    /// `UINT GetDriveType(HVDDR)`: a VDD_TYPE_* value.
    pub GetDriveType: Option<unsafe extern "C" fn(HVDDR) -> c_uint>,
    /// `BOOL GetDriveSize(HVDDR, HUGE *bytes)`.
    pub GetDriveSize: Option<unsafe extern "C" fn(HVDDR, *mut c_longlong) -> c_uint>,
    /// `UINT GetDriveBlockCount(HVDDR, UINT SPBshift)`.
    pub GetDriveBlockCount: Option<unsafe extern "C" fn(HVDDR, c_uint) -> c_uint>,
    /// `UINT BlockStatus(HVDDR, HUGE first, HUGE last)`: VDDR_RSLT_*.
    pub BlockStatus: Option<unsafe extern "C" fn(HVDDR, c_longlong, c_longlong) -> c_uint>,
    /// `BOOL GetDriveUUID(HVDDR, S_UUID *)`.
    pub GetDriveUUID: Option<unsafe extern "C" fn(HVDDR, *mut S_UUID) -> c_uint>,
    /// `BOOL IsSnapshot(HVDDR)`.
    pub IsSnapshot: Option<unsafe extern "C" fn(HVDDR) -> c_uint>,
    /// `int ReadPage(HVDDR, void *, UINT iPage, UINT SPBshift)`: VDDR_RSLT_*.
    pub ReadPage: Option<unsafe extern "C" fn(HVDDR, *mut c_void, c_uint, c_uint) -> c_int>,
    /// `int ReadSectors(HVDDR, void *, HUGE LBA, UINT n)`: VDDR_RSLT_*.
    pub ReadSectors: Option<unsafe extern "C" fn(HVDDR, *mut c_void, c_longlong, c_uint) -> c_int>,
    /// `HVDDR Close(HVDDR)`: always NULL.
    pub Close: Option<unsafe extern "C" fn(HVDDR) -> HVDDR>,
}

/// The overlay object (`struct t_COWOVL`, the legacy `CLASS(COWOVL)`): the
/// inherited disk methods, the legacy three edit methods, then the methods
/// appended by this library (only ever appended). The edit methods return
/// a COW_ERR_* code, 0 = no error, as the legacy header says;
/// WriteSectors returns VDDR_RSLT_NORMAL, or VDDR_RSLT_FAIL (0) on failure,
/// as the legacy module did.
#[repr(C)]
pub struct COWOVL {
    pub vddr: VDDR,
    /// `int InsertSectors(HCOW, HUGE LBA, UINT n)`: COW_ERR_*.
    pub InsertSectors: Option<unsafe extern "C" fn(HCOW, c_longlong, c_uint) -> c_int>,
    /// `int MoveSectors(HCOW, HUGE from, HUGE to, UINT n)`: COW_ERR_*.
    pub MoveSectors: Option<unsafe extern "C" fn(HCOW, c_longlong, c_longlong, c_uint) -> c_int>,
    /// `int WriteSectors(HCOW, void *, HUGE LBA, UINT n)`: VDDR_RSLT_*.
    pub WriteSectors: Option<unsafe extern "C" fn(HCOW, *mut c_void, c_longlong, c_uint) -> c_int>,
    /// `int DeleteSectors(HCOW, HUGE LBA, HUGE n)`: COW_ERR_*.
    pub DeleteSectors: Option<unsafe extern "C" fn(HCOW, c_longlong, c_longlong) -> c_int>,
    /// `int DiscardSectors(HCOW, HUGE LBA, HUGE n)`: COW_ERR_*.
    pub DiscardSectors: Option<unsafe extern "C" fn(HCOW, c_longlong, c_longlong) -> c_int>,
}

/// Options of COW_CreateCowOverlayEx. Fill with COW_InitOptions first, then
/// change what you need; `struct_size` lets later versions grow it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_OPTIONS {
    /// sizeof(COW_OPTIONS) as the caller compiled it.
    pub struct_size: u32,
    /// COW unit in sectors: a power of two from 8 to 65536; 0 = 2048.
    pub granularity: u32,
    /// COW_OPT_* flags.
    pub flags: u64,
    /// Path of a new persistent store file (it must not exist); NULL = an
    /// anonymous temporary store removed on close (the legacy behaviour).
    pub store_path: *const c_char,
}

/// Options of COW_CloneToFileEx. Fill with COW_InitCloneOptions first,
/// then change what you need; `struct_size` lets later versions grow it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_CLONE_OPTIONS {
    /// sizeof(COW_CLONE_OPTIONS) as the caller compiled it.
    pub struct_size: u32,
    /// The image format, a drive-type constant: VDD_TYPE_RAW (the default),
    /// VDD_TYPE_VDI, VDD_TYPE_QCOW2, VDD_TYPE_VHD, VDD_TYPE_VHDX,
    /// VDD_TYPE_VMDK.
    pub format: u32,
    /// COW_CLONE_* flags.
    pub flags: u32,
    /// qcow2 cluster size in bytes: a power of two from 512 to 2097152;
    /// 0 = 65536. Other formats take 0 only.
    pub cluster_size: u32,
    /// qcow2 only: NULL for a complete image; else the backing file name to
    /// store, and `disk` must be an overlay whose source is that file: only
    /// what the overlay changed is written (a delta).
    pub backing_file: *const c_char,
    /// The backing file's format in QEMU's names ("raw", "qcow2", "vpc",
    /// ...) to store with it; NULL stores none (readers probe it).
    pub backing_format: *const c_char,
}

/// What COW_CheckOverlayStore found. Set struct_size before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct COW_CHECK_REPORT {
    /// sizeof(COW_CHECK_REPORT) as the caller compiled it.
    pub struct_size: u32,
    /// Nonzero when the store is consistent.
    pub consistent: u32,
    /// Extents in the map (0 if the map could not be read).
    pub extents: u64,
    /// Data units the store spans, and how many are in use.
    pub units_total: u64,
    pub units_in_use: u64,
    /// Units the free-space bitmap marks used that nothing references.
    pub leaked_units: u64,
    /// Units the map references that the bitmap marks free.
    pub unmarked_units: u64,
    /// Store sectors referenced more than once.
    pub doubly_used_sectors: u64,
    /// Log transactions an open would replay.
    pub pending_transactions: u64,
    /// The problems found, one per line, NUL-terminated (truncated to fit).
    pub problems: [c_char; 512],
}

/// One extent of an overlay's map (COW_GetExtent, COW_GetExtentAt).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct COW_EXTENT {
    /// First virtual sector of the extent.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// For SOURCE: first sector in the source; for STORE, STORE_HOLE and
    /// STORE_ZERO: first sector in the store; 0 for NONE.
    pub position: u64,
    /// COW_EXTENT_NONE, _SOURCE, _STORE, _STORE_HOLE or _STORE_ZERO.
    pub kind: u32,
    pub reserved: u32,
}

/// A progress callback: called with the caller's `user` pointer and a
/// percentage, 0 first and 100 last, never going down, each value at most
/// once. Return 0 to go on; any other value cancels the operation where it
/// can be cancelled (COW_CloneToFile then fails with COW_ERR_CANCELLED; a
/// backend's pfnCreate may ignore it). It must not call functions on the
/// disk the operation works on.
pub type COW_PROGRESS_FN = Option<unsafe extern "C" fn(user: *mut c_void, percent: u32) -> c_int>;
