// Every number C sees - error codes, drive types, read results, flags and
// the few special values - defined once, here.
//
// The crate's enums and constants are generated from these tables, and
// `build.rs` includes this very file to write the header's `#define`s (in
// hex where they are codes or masks), so the Rust values and the header
// cannot disagree. (Not cbindgen enums: C enumerators must fit an `int`
// under -Wpedantic, which `VDD_TYPE_INVALID` and `COW_BACKEND_VERSION` do
// not, and the legacy names have always been `#define`s.)
//
// This file must stay self-contained (no `crate::` paths, no inner
// attributes): build.rs includes it on its own.

/// One `#define` of the header: name, value, documentation, and whether
/// the value reads better in hex.
#[derive(Debug, Clone, Copy)]
pub struct CDefine {
    pub name: &'static str,
    pub value: u64,
    pub doc: &'static str,
    pub hex: bool,
}

/// An enum whose values C sees under prefixed names. Generates the enum,
/// `ALL`, `c_name`, `from_u32`, the header's defines, and a module of
/// `u32` constants under the C names for the FFI layer.
macro_rules! c_enum {
    (
        $(#[doc = $doc:literal])*
        pub enum $name:ident in $consts:ident (hex: $hex:literal) {
            $( $(#[doc = $vdoc:literal])* $var:ident = $val:literal as $cname:ident, )+
        }
    ) => {
        $(#[doc = $doc])*
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $vdoc])* $var = $val, )+
        }

        impl $name {
            /// Every value, in the order the header lists them.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The header's defines for this enum.
            pub const C_DEFINES: &'static [CDefine] = &[$(CDefine {
                name: stringify!($cname),
                value: $val,
                doc: concat!($($vdoc, "\n"),*),
                hex: $hex,
            }),+];

            /// The name C knows this value by.
            pub const fn c_name(self) -> &'static str {
                match self {
                    $($name::$var => stringify!($cname),)+
                }
            }

            /// The value numbered `value`, if there is one.
            pub const fn from_u32(value: u32) -> Option<$name> {
                match value {
                    $($val => Some($name::$var),)+
                    _ => None,
                }
            }
        }

        /// The values of the enum of the same group as `u32` constants
        /// under their C names, for the FFI layer.
        pub mod $consts {
            $(
                #[doc = concat!("`", stringify!($name), "::", stringify!($var), "` as C sees it.")]
                pub const $cname: u32 = $val;
            )+
        }
    };
}

/// A group of named constants C sees (flags or special values).
macro_rules! c_consts {
    (
        $(#[doc = $doc:literal])*
        pub mod $group:ident as $ty:ty, hex: $hex:literal, {
            $( $(#[doc = $vdoc:literal])* $cname:ident = $val:literal, )+
        }
    ) => {
        $(#[doc = $doc])*
        pub mod $group {
            use super::CDefine;

            /// The constants (a module of their own, for glob imports).
            pub mod names {
                $( $(#[doc = $vdoc])* pub const $cname: $ty = $val; )+
            }

            /// The header's defines for this group.
            pub const C_DEFINES: &[CDefine] = &[$(CDefine {
                name: stringify!($cname),
                value: $val,
                doc: concat!($($vdoc, "\n"),*),
                hex: $hex,
            }),+];
        }
    };
}

c_enum! {
    /// Result of a page or sector read and of BlockStatus (`VDDR_RSLT_*`,
    /// the legacy values; `VDDR_RSLT_FAIL`, 0, is in [`results`]). The order
    /// of the variants is also their precedence when ranges are combined: a
    /// range with any `Normal` sector is `Normal`; else any `Blank` makes it
    /// `Blank`; else it is `NotAlloc`.
    pub enum SectorStatus in sector_status_codes (hex: false) {
        /// Read ok; the range holds data (which may happen to be zeros).
        Normal = 1 as VDDR_RSLT_NORMAL,
        /// Read ok; the range is known to read as zeros (the format says so).
        Blank = 2 as VDDR_RSLT_BLANKPAGE,
        /// Read ok; never allocated (zeros) - a clone need not store it.
        NotAlloc = 3 as VDDR_RSLT_NOTALLOC,
    }
}

c_consts! {
    /// The read result that is not a status.
    pub mod results as u32, hex: false, {
        /// Result of a page or sector read and of BlockStatus: the read
        /// failed (COW_GetLastError() says why).
        VDDR_RSLT_FAIL = 0,
    }
}

c_enum! {
    /// The kind of an open disk (`GetDriveType`, `VDD_TYPE_*`): the legacy
    /// values 0..6, then the ones appended after them. Stable once shipped.
    pub enum DriveType in drive_type_codes (hex: false) {
        /// VirtualBox VDI.
        Vdi = 0 as VDD_TYPE_VDI,
        /// Microsoft VHD.
        Vhd = 1 as VDD_TYPE_VHD,
        /// VMware VMDK.
        Vmdk = 2 as VDD_TYPE_VMDK,
        /// A raw image.
        Raw = 3 as VDD_TYPE_RAW,
        /// A raw partition image (legacy; never returned).
        PartRaw = 4 as VDD_TYPE_PART_RAW,
        /// Parallels.
        Parallels = 5 as VDD_TYPE_PARALLELS,
        /// A copy-on-write overlay.
        Cow = 6 as VDD_TYPE_COW,
        /// QEMU qcow2.
        Qcow2 = 7 as VDD_TYPE_QCOW2,
        /// Microsoft VHDX.
        Vhdx = 8 as VDD_TYPE_VHDX,
        /// A UML COW file.
        UmlCow = 9 as VDD_TYPE_UMLCOW,
        /// A VirtualBox VCI image.
        Vci = 10 as VDD_TYPE_VCI,
        /// A disk served by a caller-registered backend or object.
        Custom = 11 as VDD_TYPE_CUSTOM,
    }
}

c_enum! {
    /// Error codes (`COW_ERR_*`, COW_GetLastError). The first seven are the
    /// legacy module's and keep their values (and their spelling, hence
    /// `Invhandle`); new codes are appended and a value is never reused.
    pub enum ErrorCode in error_codes (hex: true) {
        /// No error.
        None = 0 as COW_ERR_NONE,
        /// A NULL, closed or foreign handle.
        Invhandle = 0x60001 as COW_ERR_INVHANDLE,
        /// Out of memory.
        Outofmem = 0x60002 as COW_ERR_OUTOFMEM,
        /// A sector range not wholly inside the drive.
        Invblock = 0x60003 as COW_ERR_INVBLOCK,
        /// A seek failed.
        Seek = 0x60004 as COW_ERR_SEEK,
        /// A read failed.
        Read = 0x60005 as COW_ERR_READ,
        /// MoveSectors with from <= to <= from + n.
        Invalidmove = 0x60006 as COW_ERR_INVALIDMOVE,
        /// A write failed.
        Write = 0x60007 as COW_ERR_WRITE,
        /// An invalid argument.
        InvalidArg = 0x60008 as COW_ERR_INVALID_ARG,
        /// An image or store whose structures are damaged.
        Corrupt = 0x60009 as COW_ERR_CORRUPT,
        /// An image format or feature this library does not handle.
        Unsupported = 0x6000A as COW_ERR_UNSUPPORTED,
        /// The source is not the disk an overlay store was made on.
        SourceMismatch = 0x6000B as COW_ERR_SOURCE_MISMATCH,
        /// Writing to something opened read-only.
        ReadOnly = 0x6000C as COW_ERR_READ_ONLY,
        /// No space left.
        NoSpace = 0x6000D as COW_ERR_NO_SPACE,
        /// A file could not be opened (missing, no permission, ...).
        Open = 0x6000E as COW_ERR_OPEN,
        /// A backend does not hold the block asked for (reads as NOTALLOC).
        BlockFree = 0x6000F as COW_ERR_BLOCK_FREE,
        /// A progress callback asked to stop.
        Cancelled = 0x60010 as COW_ERR_CANCELLED,
        /// The file is in use by another writer.
        Locked = 0x60011 as COW_ERR_LOCKED,
        /// A bug inside the library (a caught panic); the message says where.
        Internal = 0x60012 as COW_ERR_INTERNAL,
        /// An overlay-only function called on a handle that is not an overlay.
        NotOverlay = 0x60013 as COW_ERR_NOT_OVERLAY,
    }
}

impl ErrorCode {
    /// The short, fixed description of the code, used when no detail is at
    /// hand (COW_GetErrorString of a code).
    pub const fn describe(self) -> &'static str {
        match self {
            ErrorCode::None => "no error",
            ErrorCode::Invhandle => "invalid handle",
            ErrorCode::Outofmem => "out of memory",
            ErrorCode::Invblock => "sector range outside the drive",
            ErrorCode::Seek => "seek failed",
            ErrorCode::Read => "read failed",
            ErrorCode::Invalidmove => "invalid move: the destination lies inside the moved range",
            ErrorCode::Write => "write failed",
            ErrorCode::InvalidArg => "invalid argument",
            ErrorCode::Corrupt => "corrupt image",
            ErrorCode::Unsupported => "unsupported image or feature",
            ErrorCode::SourceMismatch => "the source is not the disk this overlay was made on",
            ErrorCode::ReadOnly => "read-only",
            ErrorCode::NoSpace => "no space left",
            ErrorCode::Open => "cannot open file",
            ErrorCode::BlockFree => "block not allocated",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Locked => "locked by another user",
            ErrorCode::Internal => "internal error",
            ErrorCode::NotOverlay => "the handle is not an overlay",
        }
    }
}

c_consts! {
    /// Special values.
    pub mod special as u32, hex: true, {
        /// Returned by GetDriveType for an invalid handle.
        VDD_TYPE_INVALID = 0xFFFFFFFF,
        /// Pass to COW_GetErrorString for the detailed text of the calling
        /// thread's last error.
        COW_LAST_ERROR = 0xFFFFFFFF,
        /// The version of the COW_BACKEND layout this library implements:
        /// 0xC0BE in the high 16 bits, then major (8 bits) and minor (8 bits).
        /// Both u32Version and u32VersionEnd of a table must hold it.
        COW_BACKEND_VERSION = 0xC0BE0100,
    }
}

c_consts! {
    /// Sizes.
    pub mod sizes as u32, hex: false, {
        /// The legacy COW granularity: 2048 sectors (1 MiB).
        COW_DEFAULT_GRANULARITY = 2048,
    }
}

c_consts! {
    /// COW_OPTIONS.flags.
    pub mod overlay_flags as u64, hex: true, {
        /// COW_OPTIONS.flags: report data that reads as all zeros as
        /// VDDR_RSLT_BLANKPAGE (BlockStatus then reads the data to find out).
        COW_OPT_DETECT_ZEROS = 0x1,
    }
}

c_consts! {
    /// Open flags (VDDR_OpenEx, COW_OpenCowOverlay, a backend's pfnOpen).
    pub mod open_flags as u32, hex: true, {
        /// Follow parent/backing paths named inside an image (off by
        /// default: such a path is untrusted input).
        COW_OPEN_FOLLOW_PARENTS = 0x1,
        /// Backend open flag (pfnOpen, pfnCreate): open the image for
        /// writing. VDDR_* functions refuse it: disks behind an HVDDR are
        /// read-only.
        COW_OPEN_READ_WRITE = 0x2,
        /// Accept an image left dirty by a crash (VCI's unclean flag) after
        /// checking it and rebuilding what can be rebuilt; without it such
        /// an image is refused with COW_ERR_CORRUPT.
        COW_OPEN_REPAIR = 0x4,
        /// COW_OpenCowOverlay: open the store read-only (edits fail with
        /// COW_ERR_READ_ONLY; a log that needs replay is replayed in memory
        /// and the file is not touched).
        COW_OPEN_READ_ONLY = 0x8,
    }
}

c_consts! {
    /// A backend's uBackendCaps.
    pub mod caps as u64, hex: true, {
        /// uBackendCaps: can create images with all space allocated up front.
        COW_CAP_CREATE_FIXED = 0x1,
        /// uBackendCaps: can create images that grow as they are written.
        COW_CAP_CREATE_DYNAMIC = 0x2,
        /// uBackendCaps: images are files named by a path.
        COW_CAP_FILE = 0x4,
        /// uBackendCaps: images may be differencing images over a backing file.
        COW_CAP_DIFF = 0x8,
        /// uBackendCaps: supports pfnDiscard.
        COW_CAP_DISCARD = 0x10,
        /// uBackendCaps: images can be opened for writing (pfnWrite, pfnFlush).
        COW_CAP_WRITE = 0x20,
    }
}

c_consts! {
    /// Image flags (pfnCreate's uImageFlags, pfnGetImageFlags).
    pub mod image_flags as u32, hex: true, {
        /// pfnCreate uImageFlags / pfnGetImageFlags: all space allocated up
        /// front.
        COW_IMAGE_FIXED = 0x1,
        /// pfnGetImageFlags: a differencing image over a backing file.
        COW_IMAGE_DIFF = 0x2,
    }
}

c_consts! {
    /// COW_CloneToFile flags.
    pub mod clone_flags as u32, hex: true, {
        /// COW_CloneToFile flags: replace an existing file at `path` (by
        /// default an existing file is an error and is left alone).
        COW_CLONE_REPLACE = 0x1,
        /// COW_CloneToFile flags, with VDD_TYPE_VHD: a fixed VHD (the disk's
        /// bytes and a footer; what Azure takes) instead of a dynamic one.
        COW_CLONE_VHD_FIXED = 0x2,
        /// COW_CloneToFile flags, with VDD_TYPE_VMDK: a streamOptimized VMDK
        /// (compressed grains, as OVA packages use) instead of
        /// monolithicSparse.
        COW_CLONE_VMDK_STREAM = 0x4,
        /// COW_CloneToFile flags, with VDD_TYPE_QCOW2: deflate-compress the
        /// clusters (as `qemu-img convert -c`).
        COW_CLONE_COMPRESS = 0x8,
    }
}

c_consts! {
    /// COW_EXTENT.kind.
    pub mod extent_kinds as u32, hex: false, {
        /// COW_EXTENT.kind: inserted or discarded space (reads zero, NOTALLOC).
        COW_EXTENT_NONE = 0,
        /// COW_EXTENT.kind: a range of the source disk.
        COW_EXTENT_SOURCE = 1,
        /// COW_EXTENT.kind: a range of the overlay store holding data (NORMAL).
        COW_EXTENT_STORE = 2,
        /// COW_EXTENT.kind: store space reserved by a copy-on-write but never
        /// written: reads zero, NOTALLOC.
        COW_EXTENT_STORE_HOLE = 3,
        /// COW_EXTENT.kind: store space reserved by a copy-on-write over
        /// known-zero source sectors: reads zero, BLANKPAGE.
        COW_EXTENT_STORE_ZERO = 4,
    }
}

c_enum! {
    /// What a region of a disk holds, as the filesystem view reports it
    /// (`COW_FS_REGION.filesystem`). Stable once shipped.
    pub enum FsKind in fs_kinds (hex: false) {
        /// COW_FS_REGION.filesystem: no filesystem this library reads
        /// (kept whole).
        Unknown = 0 as COW_FS_UNKNOWN,
        /// COW_FS_REGION.filesystem: ext2.
        Ext2 = 1 as COW_FS_EXT2,
        /// COW_FS_REGION.filesystem: ext3 (ext2 with a journal).
        Ext3 = 2 as COW_FS_EXT3,
        /// COW_FS_REGION.filesystem: ext4 (extents, flex_bg, 64bit, ...).
        Ext4 = 3 as COW_FS_EXT4,
        /// COW_FS_REGION.filesystem: FAT12.
        Fat12 = 4 as COW_FS_FAT12,
        /// COW_FS_REGION.filesystem: FAT16.
        Fat16 = 5 as COW_FS_FAT16,
        /// COW_FS_REGION.filesystem: FAT32.
        Fat32 = 6 as COW_FS_FAT32,
        /// COW_FS_REGION.filesystem: NTFS.
        Ntfs = 7 as COW_FS_NTFS,
        /// COW_FS_REGION.filesystem: Linux swap.
        Swap = 8 as COW_FS_SWAP,
        /// COW_FS_REGION.filesystem: the space after the last partition
        /// (number 0).
        Unpartitioned = 9 as COW_FS_UNPARTITIONED,
    }
}

c_consts! {
    /// COW_OpenFilesystemView flags.
    pub mod fs_view_flags as u32, hex: true, {
        /// COW_OpenFilesystemView flags: keep the space after the last
        /// partition (by default it reads as unallocated).
        COW_FS_KEEP_UNPARTITIONED = 0x1,
    }
}

c_consts! {
    /// COW_GrowFilesystem flags.
    pub mod grow_flags as u32, hex: true, {
        /// COW_GrowFilesystem flags: check the filesystem and fill the
        /// report with what growing would do, but write nothing.
        COW_GROW_DRY_RUN = 0x1,
    }
}

/// Every define of the header, in the order it lists them.
pub const ALL_C_DEFINES: &[&[CDefine]] = &[
    results::C_DEFINES,
    SectorStatus::C_DEFINES,
    DriveType::C_DEFINES,
    ErrorCode::C_DEFINES,
    special::C_DEFINES,
    sizes::C_DEFINES,
    overlay_flags::C_DEFINES,
    open_flags::C_DEFINES,
    caps::C_DEFINES,
    image_flags::C_DEFINES,
    clone_flags::C_DEFINES,
    extent_kinds::C_DEFINES,
    FsKind::C_DEFINES,
    fs_view_flags::C_DEFINES,
    grow_flags::C_DEFINES,
];
