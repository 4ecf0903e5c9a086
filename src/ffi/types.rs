//! C types and constants of the ABI. cbindgen reads this file (and
//! `api.rs`) to generate `include/cowdisk.h`; nothing else is exported.
#![allow(non_snake_case, non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_longlong, c_uint, c_void};

pub use super::uuid::S_UUID;

/// Result of a page or sector read and of BlockStatus: the read failed
/// (COW_GetLastError() says why).
pub const VDDR_RSLT_FAIL: u32 = 0;
/// Read ok; the range holds data.
pub const VDDR_RSLT_NORMAL: u32 = 1;
/// Read ok; the range is known to read as zeros.
pub const VDDR_RSLT_BLANKPAGE: u32 = 2;
/// Read ok; never allocated (zeros) - a clone need not store it.
pub const VDDR_RSLT_NOTALLOC: u32 = 3;

/// Drive types returned by GetDriveType (legacy values 0..6, then ours).
pub const VDD_TYPE_VDI: u32 = 0;
pub const VDD_TYPE_VHD: u32 = 1;
pub const VDD_TYPE_VMDK: u32 = 2;
pub const VDD_TYPE_RAW: u32 = 3;
pub const VDD_TYPE_PART_RAW: u32 = 4;
pub const VDD_TYPE_PARALLELS: u32 = 5;
/// A copy-on-write overlay.
pub const VDD_TYPE_COW: u32 = 6;
pub const VDD_TYPE_QCOW2: u32 = 7;
pub const VDD_TYPE_VHDX: u32 = 8;
pub const VDD_TYPE_UMLCOW: u32 = 9;
pub const VDD_TYPE_VCI: u32 = 10;
/// A disk served by a caller-registered backend.
pub const VDD_TYPE_CUSTOM: u32 = 11;
/// Returned by GetDriveType for an invalid handle.
pub const VDD_TYPE_INVALID: u32 = 0xFFFFFFFF;

/// Error codes (COW_GetLastError). The first seven are the legacy values.
pub const COW_ERR_NONE: u32 = 0;
pub const COW_ERR_INVHANDLE: u32 = 0x60001;
pub const COW_ERR_OUTOFMEM: u32 = 0x60002;
/// A sector range not wholly inside the drive.
pub const COW_ERR_INVBLOCK: u32 = 0x60003;
pub const COW_ERR_SEEK: u32 = 0x60004;
pub const COW_ERR_READ: u32 = 0x60005;
/// MoveSectors with from <= to <= from + n.
pub const COW_ERR_INVALIDMOVE: u32 = 0x60006;
pub const COW_ERR_WRITE: u32 = 0x60007;
pub const COW_ERR_INVALID_ARG: u32 = 0x60008;
/// An image or store whose structures are damaged.
pub const COW_ERR_CORRUPT: u32 = 0x60009;
/// An image format or feature this library does not handle.
pub const COW_ERR_UNSUPPORTED: u32 = 0x6000A;
/// The source is not the disk an overlay store was made on.
pub const COW_ERR_SOURCE_MISMATCH: u32 = 0x6000B;
pub const COW_ERR_READ_ONLY: u32 = 0x6000C;
pub const COW_ERR_NO_SPACE: u32 = 0x6000D;
/// A file could not be opened (missing, no permission, ...).
pub const COW_ERR_OPEN: u32 = 0x6000E;
/// A backend does not hold the block asked for (reads as NOTALLOC).
pub const COW_ERR_BLOCK_FREE: u32 = 0x6000F;
/// A progress callback asked to stop.
pub const COW_ERR_CANCELLED: u32 = 0x60010;
/// The file is in use by another writer.
pub const COW_ERR_LOCKED: u32 = 0x60011;
/// A bug inside the library (a caught panic); the message says where.
pub const COW_ERR_INTERNAL: u32 = 0x60012;
/// An overlay-only function called on a handle that is not an overlay.
pub const COW_ERR_NOT_OVERLAY: u32 = 0x60013;

/// Pass to COW_GetErrorString for the detailed text of the calling
/// thread's last error.
pub const COW_LAST_ERROR: u32 = 0xFFFFFFFF;

/// The legacy COW granularity: 2048 sectors (1 MiB).
pub const COW_DEFAULT_GRANULARITY: u32 = 2048;
/// COW_OPTIONS.flags: report data that reads as all zeros as
/// VDDR_RSLT_BLANKPAGE (BlockStatus then reads the data to find out).
pub const COW_OPT_DETECT_ZEROS: u64 = 1;

/// VDDR_OpenEx flags: follow parent/backing file paths named inside an
/// image (off by default: such a path is untrusted input).
pub const COW_OPEN_FOLLOW_PARENTS: u32 = 1;
/// COW_OpenCowOverlay flags: open the store read-only (edits fail with
/// COW_ERR_READ_ONLY; a log that needs replay is replayed in memory and the
/// file is not touched).
pub const COW_OPEN_READ_ONLY: u32 = 8;

/// COW_EXTENT.kind: inserted or discarded space (reads zero, NOTALLOC).
pub const COW_EXTENT_NONE: u32 = 0;
/// COW_EXTENT.kind: a range of the source disk.
pub const COW_EXTENT_SOURCE: u32 = 1;
/// COW_EXTENT.kind: a range of the overlay store holding data (NORMAL).
pub const COW_EXTENT_STORE: u32 = 2;
/// COW_EXTENT.kind: store space reserved with a COW unit but never written:
/// reads zero, NOTALLOC. `position` is its first store sector.
pub const COW_EXTENT_STORE_HOLE: u32 = 3;
/// COW_EXTENT.kind: store space reserved with a COW unit for sectors that
/// were known zeros: reads zero, BLANK. `position` is its first store sector.
pub const COW_EXTENT_STORE_ZERO: u32 = 4;

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
