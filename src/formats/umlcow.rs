//! User-Mode-Linux COW files (the `ubd` driver's copy-on-write layer, also
//! read by QEMU's old `cow` driver), read and written.
//!
//! # Format facts relied on
//!
//! A COW file starts with a header naming a backing file, then a bitmap with
//! one bit per COW sector (bit `n % 8` of byte `n / 8`, least significant
//! first; set = the sector's data is in this file), then the data area,
//! where COW sector `n` lives at `data offset + n * sector size` whether or
//! not it is set. Unset sectors read from the backing file. The magic is
//! `0x4F4F4F4D` ("OOOM" in big-endian bytes). Layouts, in the order of the
//! header's `version` field:
//!
//! * **v1**: packed; magic, version (u32 each), a 256-byte backing path,
//!   mtime (u32), size (u64), sector size (u32): 280 bytes. Fields are in
//!   the writing machine's byte order; we take the order the magic is in.
//!   The bitmap follows the header directly.
//! * **v2**, Linux layout: packed, big-endian; magic, version, a 4096-byte
//!   path, mtime (u32), size (u64), sector size (u32): 4120 bytes, bitmap
//!   right after.
//! * **v2**, QEMU's old driver: the same fields but a 1024-byte path and
//!   natural C alignment (4 bytes of padding after mtime): mtime at 1032,
//!   size at 1040, sector size at 1048, 1056 bytes in all; bitmap right
//!   after. QEMU writes mtime 0 when it has no backing file.
//! * For v1 and v2 the bitmap is `(size + ss - 1) / (8 * ss)` bytes (a
//!   historical rounding bug: sectors past a multiple of 8 may have no
//!   whole byte) and the data starts at the bitmap's end rounded up to the
//!   sector size. QEMU's driver instead uses `ceil(sectors / 8)` bytes.
//!   We read bits wherever they fall before the data area and treat the
//!   rest as unset; a sector whose bit would lie in the data area cannot be
//!   written.
//! * **v3** (what Linux and `uml_mkcow` write): packed, big-endian; magic,
//!   version, mtime (u32) at 8, size (u64) at 12, sector size at 20,
//!   alignment at 24, a format word (0 = bitmap) at 28 and a 4096-byte
//!   path at 32: 4128 bytes. The bitmap starts at the header size rounded
//!   up to the alignment, is `ceil(ceil(size / ss) / 8)` bytes, and the
//!   data starts at its end rounded up to the alignment.
//! * **"broken" v3**, written by old 64-bit builds that lacked the packed
//!   attribute: mtime took 8 bytes (its low-address 4 bytes hold the
//!   big-endian 32-bit value), size at 16, sector size at 24, alignment at
//!   28, format at 32, the path at 36; 4136 bytes with tail padding. It is
//!   recognised the way Linux does: in a proper v3 file the path starts
//!   at 32, and a path never starts with four zero bytes.
//!
//! Before using the backing file, Linux checks that its size equals the
//! header's size and its modification time (seconds) equals the header's
//! mtime; we do the same and refuse a mismatch with `SOURCE_MISMATCH`
//! (except QEMU-layout files with mtime 0, QEMU's "no mtime" marker).
//! The path in the header is followed only when the caller allows it; the
//! caller may instead supply the backing file.
//!
//! Writes put data in the data area and mark the bitmap in memory; a flush
//! makes the data durable (fdatasync) *before* it writes the changed bitmap
//! bytes and syncs again, so a crash never leaves a bit set over data that
//! is not on disk.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::open_read_only;
use super::raw::RawDisk;
use super::registry::ImageOpenOptions;
use crate::disk::{
    check_range, sectors_in, Disk, DriveType, ImageFile, ImageMetadata, SectorStatus, WritableDisk,
    SECTOR_BYTES, SECTOR_SIZE,
};
use crate::error::{Error, Result};

/// The magic as a big-endian u32 ("OOOM").
pub const MAGIC: u32 = 0x4F4F_4F4D;

const V1_HEADER: u64 = 280;
const V2_HEADER: u64 = 4120;
const V2_QEMU_HEADER: u64 = 1056;
const V3_HEADER: u64 = 4128;
const V3_BROKEN_HEADER: u64 = 4136;
/// Bytes read to parse any layout.
const HEADER_READ: usize = V3_BROKEN_HEADER as usize;

/// The largest bitmap kept in memory (512 MiB: 2 PiB at 512-byte sectors).
const MAX_BITMAP_BYTES: u64 = 1 << 29;
/// The largest alignment accepted (v3).
const MAX_ALIGNMENT: u32 = 1 << 20;
/// The largest COW sector size accepted.
const MAX_SECTOR_SIZE: u32 = 1 << 16;

/// Which header layout a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Version 1, in the byte order the magic was written in.
    V1 { big_endian: bool },
    /// Version 2 as Linux writes it (4096-byte path, packed).
    V2Linux,
    /// Version 2 as QEMU's old driver wrote it (1024-byte path, padded).
    V2Qemu,
    /// Version 3 (packed).
    V3,
    /// Version 3 written by old 64-bit builds (unpacked).
    V3Broken,
}

/// A parsed and validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmlCowHeader {
    pub layout: Layout,
    /// The backing file's path as stored (bytes up to the first NUL).
    pub backing_file: Vec<u8>,
    /// The backing file's mtime in seconds, as stored.
    pub mtime: u64,
    /// The disk's (and backing file's) size in bytes.
    pub size: u64,
    /// COW granularity in bytes.
    pub sector_size: u32,
    /// Alignment of bitmap and data (v3; the sector size before).
    pub alignment: u32,
    /// Where the bitmap starts.
    pub bitmap_offset: u64,
    /// Where the data area starts (the bitmap area ends).
    pub data_offset: u64,
}

impl UmlCowHeader {
    /// The header's version number.
    pub fn version(&self) -> u32 {
        match self.layout {
            Layout::V1 { .. } => 1,
            Layout::V2Linux | Layout::V2Qemu => 2,
            Layout::V3 | Layout::V3Broken => 3,
        }
    }

    /// Number of COW sectors.
    pub fn cow_sectors(&self) -> u64 {
        self.size.div_ceil(u64::from(self.sector_size))
    }

    /// Bytes between the bitmap's start and the data area.
    pub fn bitmap_area(&self) -> u64 {
        self.data_offset - self.bitmap_offset
    }

    /// The backing path as a Path.
    pub fn backing_path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.backing_file))
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn round_up(x: u64, to: u64) -> Option<u64> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

/// The path bytes of a NUL-terminated field, or an error when the field
/// has no NUL.
fn c_path(field: &[u8], what: &str) -> Result<Vec<u8>> {
    match field.iter().position(|&b| b == 0) {
        Some(end) => Ok(field[..end].to_vec()),
        None => Err(Error::Corrupt(format!(
            "UML COW {what}: the backing file name is not NUL-terminated"
        ))),
    }
}

/// True when `bytes` starts with the COW magic in either byte order.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && (be32(bytes, 0) == MAGIC || le32(bytes, 0) == MAGIC)
}

/// Parses the header at the start of `bytes` (at most [`HEADER_READ`]
/// bytes are looked at) of a file `file_len` bytes long, validating every
/// field and that bitmap and data offsets are consistent.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<UmlCowHeader> {
    if bytes.len() < 8 {
        return Err(Error::Corrupt("UML COW: file shorter than a header".into()));
    }
    let big_endian = if be32(bytes, 0) == MAGIC {
        true
    } else if le32(bytes, 0) == MAGIC {
        false
    } else {
        return Err(Error::Unsupported("not a UML COW file (no magic)".into()));
    };
    let version = if big_endian {
        be32(bytes, 4)
    } else {
        le32(bytes, 4)
    };
    let need = |n: u64, what: &str| -> Result<()> {
        if (bytes.len() as u64) < n {
            Err(Error::Corrupt(format!(
                "UML COW {what}: the file ends inside the {n}-byte header"
            )))
        } else {
            Ok(())
        }
    };
    let (layout, backing, mtime, size, ss, align, bitmap_offset);
    match version {
        1 => {
            need(V1_HEADER, "v1")?;
            let (m, s, q) = if big_endian {
                (
                    u64::from(be32(bytes, 264)),
                    be64(bytes, 268),
                    be32(bytes, 276),
                )
            } else {
                (
                    u64::from(le32(bytes, 264)),
                    le64(bytes, 268),
                    le32(bytes, 276),
                )
            };
            layout = Layout::V1 { big_endian };
            backing = c_path(&bytes[8..264], "v1")?;
            (mtime, size, ss) = (m, s, q);
            align = ss;
            bitmap_offset = V1_HEADER;
        }
        2 => {
            if !big_endian {
                return Err(Error::Unsupported(
                    "UML COW v2 with a little-endian magic".into(),
                ));
            }
            need(V2_QEMU_HEADER, "v2")?;
            let qemu_ok = valid_sector_size(be32(bytes, 1048))
                && bytes[8..8 + 1024].contains(&0)
                && be64(bytes, 1040) > 0;
            let linux_ok = bytes.len() as u64 >= V2_HEADER
                && valid_sector_size(be32(bytes, 4116))
                && bytes[8..8 + 4096].contains(&0);
            // A Linux header whose path is shorter than 1024 bytes has
            // zeros where QEMU keeps sector size and size, so QEMU's fields
            // validating means QEMU's layout unless the path runs on.
            let linux_path_long = !bytes[8..8 + 1024].contains(&0);
            let use_qemu = qemu_ok && !(linux_ok && linux_path_long);
            if use_qemu {
                layout = Layout::V2Qemu;
                backing = c_path(&bytes[8..8 + 1024], "v2")?;
                mtime = u64::from(be32(bytes, 1032));
                size = be64(bytes, 1040);
                ss = be32(bytes, 1048);
                bitmap_offset = V2_QEMU_HEADER;
            } else {
                need(V2_HEADER, "v2")?;
                layout = Layout::V2Linux;
                backing = c_path(&bytes[8..8 + 4096], "v2")?;
                mtime = u64::from(be32(bytes, 4104));
                size = be64(bytes, 4108);
                ss = be32(bytes, 4116);
                bitmap_offset = V2_HEADER;
            }
            align = ss;
        }
        3 => {
            if !big_endian {
                return Err(Error::Unsupported(
                    "UML COW v3 with a little-endian magic".into(),
                ));
            }
            need(36, "v3")?;
            let broken = bytes[32..36] == [0, 0, 0, 0];
            let (hdr, base) = if broken {
                (V3_BROKEN_HEADER, 4)
            } else {
                (V3_HEADER, 0)
            };
            need(hdr, "v3")?;
            layout = if broken { Layout::V3Broken } else { Layout::V3 };
            mtime = u64::from(be32(bytes, 8));
            size = be64(bytes, 12 + base);
            ss = be32(bytes, 20 + base);
            align = be32(bytes, 24 + base);
            let format = be32(bytes, 28 + base);
            if format != 0 {
                return Err(Error::Unsupported(format!(
                    "UML COW v3 with COW format {format} (only 0, the bitmap, exists)"
                )));
            }
            backing = c_path(&bytes[32 + base..32 + base + 4096], "v3")?;
            if align == 0 || align > MAX_ALIGNMENT {
                return Err(Error::Corrupt(format!(
                    "UML COW v3: alignment {align} is not in 1..={MAX_ALIGNMENT}"
                )));
            }
            bitmap_offset = round_up(hdr, u64::from(align)).unwrap_or(u64::MAX);
        }
        v => {
            return Err(Error::Unsupported(format!("UML COW version {v}")));
        }
    }
    if !valid_sector_size(ss) {
        return Err(Error::Corrupt(format!(
            "UML COW: sector size {ss} is not a power of two in 512..={MAX_SECTOR_SIZE}"
        )));
    }
    if size == 0 {
        return Err(Error::Corrupt("UML COW: the disk size is 0".into()));
    }
    let ss64 = u64::from(ss);
    let bitmap_len = match layout {
        Layout::V1 { .. } | Layout::V2Linux => size.checked_add(ss64 - 1).map(|v| v / (8 * ss64)),
        Layout::V2Qemu => Some((size / 512).div_ceil(8)),
        Layout::V3 | Layout::V3Broken => Some(size.div_ceil(ss64).div_ceil(8)),
    }
    .ok_or_else(|| Error::Corrupt(format!("UML COW: size {size} overflows")))?;
    if bitmap_len > MAX_BITMAP_BYTES {
        return Err(Error::Unsupported(format!(
            "UML COW: a bitmap of {bitmap_len} bytes (disk of {size} bytes) is larger than \
             this library keeps in memory"
        )));
    }
    let data_align = match layout {
        Layout::V2Qemu => 512,
        _ => u64::from(align),
    };
    let data_offset = bitmap_offset
        .checked_add(bitmap_len)
        .and_then(|v| round_up(v, data_align))
        .ok_or_else(|| Error::Corrupt("UML COW: data offset overflows".into()))?;
    if data_offset.checked_add(size).is_none() {
        return Err(Error::Corrupt(format!(
            "UML COW: size {size} overflows the file's offsets"
        )));
    }
    if file_len < data_offset {
        return Err(Error::Corrupt(format!(
            "UML COW: the file ({file_len} bytes) ends before its data area at {data_offset}"
        )));
    }
    Ok(UmlCowHeader {
        layout,
        backing_file: backing,
        mtime,
        size,
        sector_size: ss,
        alignment: align,
        bitmap_offset,
        data_offset,
    })
}

fn valid_sector_size(ss: u32) -> bool {
    ss.is_power_of_two() && (512..=MAX_SECTOR_SIZE).contains(&ss)
}

/// Serialises a header for `create`: v3 (Linux's layout) or v2 (Linux's).
fn build_header(
    version: u32,
    backing: &[u8],
    mtime: u32,
    size: u64,
    ss: u32,
    align: u32,
) -> Vec<u8> {
    let mut h;
    if version == 2 {
        h = vec![0u8; V2_HEADER as usize];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        h[8..8 + backing.len()].copy_from_slice(backing);
        h[4104..4108].copy_from_slice(&mtime.to_be_bytes());
        h[4108..4116].copy_from_slice(&size.to_be_bytes());
        h[4116..4120].copy_from_slice(&ss.to_be_bytes());
    } else {
        h = vec![0u8; V3_HEADER as usize];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..12].copy_from_slice(&mtime.to_be_bytes());
        h[12..20].copy_from_slice(&size.to_be_bytes());
        h[20..24].copy_from_slice(&ss.to_be_bytes());
        h[24..28].copy_from_slice(&align.to_be_bytes());
        // 28..32: format 0, the bitmap.
        h[32..32 + backing.len()].copy_from_slice(backing);
    }
    h
}

/// Where the data of unchanged sectors comes from.
#[derive(Debug, Clone, Default)]
pub enum Backing {
    /// Nowhere: unchanged sectors read as unallocated zeros (for callers
    /// that read the backing themselves, as the backend table does).
    #[default]
    None,
    /// The path named in the header (a path inside a file: only when the
    /// caller allows it). Relative paths are taken from the COW file's
    /// folder.
    FollowHeader,
    /// This file, supplied by the caller (still checked for size/mtime).
    Path(PathBuf),
}

/// How to open a COW file.
#[derive(Debug, Clone, Default)]
pub struct UmlCowOptions {
    /// Open for writing.
    pub writable: bool,
    pub backing: Backing,
}

/// Options of [`UmlCow::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// 3 (as Linux writes today) or 2.
    pub version: u32,
    /// COW granularity (512 as Linux uses).
    pub sector_size: u32,
    /// v3 alignment of bitmap and data (4096 as `uml_mkcow` uses).
    pub alignment: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            version: 3,
            sector_size: 512,
            alignment: 4096,
        }
    }
}

/// An open UML COW file.
pub struct UmlCow {
    file: File,
    path: PathBuf,
    header: UmlCowHeader,
    /// The bitmap area, `data_offset - bitmap_offset` bytes.
    bitmap: Vec<u8>,
    /// Range of bitmap bytes changed since the last flush.
    dirty: Option<(usize, usize)>,
    backing: Option<RawDisk>,
    writable: bool,
    /// Data written since the last flush.
    unsynced: bool,
}

/// True when `path` starts with the COW magic and a version we know.
pub fn probe_path(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => probe(&f),
        Err(_) => false,
    }
}

/// The format table's probe.
pub fn probe(file: &File) -> bool {
    let mut b = [0u8; 8];
    if file.read_exact_at(&mut b, 0).is_err() || !has_magic(&b) {
        return false;
    }
    let v = if be32(&b, 0) == MAGIC {
        be32(&b, 4)
    } else {
        le32(&b, 4)
    };
    (1..=3).contains(&v)
}

/// The format table's open: read-only, the backing path followed only
/// when the options allow it.
pub fn open_boxed(
    path: &Path,
    options: &super::OpenOptions,
    _depth: usize,
) -> Result<Box<dyn Disk>> {
    if !options.follow_parent_paths {
        // Same refusal (and message) as the other differencing formats.
        let cow = UmlCow::open(path, &UmlCowOptions::default())?;
        let named = String::from_utf8_lossy(&cow.header.backing_file).into_owned();
        return Err(match super::open_parent(path, &named, options, 0) {
            Err(e) => e,
            Ok(_) => Error::Internal("backing path refused but not reported".into()),
        });
    }
    Ok(Box::new(UmlCow::open(
        path,
        &UmlCowOptions {
            writable: false,
            backing: Backing::FollowHeader,
        },
    )?))
}

/// The format table's image open: writable or read-only, the backing file
/// the header names opened only when asked.
pub fn open_image(path: &Path, options: &ImageOpenOptions) -> Result<Box<dyn ImageFile>> {
    Ok(Box::new(UmlCow::open(
        path,
        &UmlCowOptions {
            writable: options.writable,
            backing: if options.follow_backing {
                Backing::FollowHeader
            } else {
                Backing::None
            },
        },
    )?))
}

fn mtime_secs(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
}

impl UmlCow {
    /// Opens a COW file. Its backing file (per `options.backing`) must have
    /// the size and mtime the header records.
    pub fn open(path: &Path, options: &UmlCowOptions) -> Result<UmlCow> {
        let file = if options.writable {
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?
        } else {
            open_read_only(path)?
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?
            .len();
        let mut head = vec![0u8; HEADER_READ.min(file_len as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::read(&path.display().to_string(), 0, e))?;
        let header = parse_header(&head, file_len)
            .map_err(|e| prefix_error(e, &path.display().to_string()))?;
        let mut bitmap = vec![0u8; header.bitmap_area() as usize];
        file.read_exact_at(&mut bitmap, header.bitmap_offset)
            .map_err(|e| Error::read("UML COW bitmap", header.bitmap_offset, e))?;
        let backing_path = match &options.backing {
            Backing::None => None,
            Backing::Path(p) => Some(p.clone()),
            Backing::FollowHeader => {
                let named = header.backing_path();
                Some(if named.is_absolute() {
                    named
                } else {
                    path.parent().unwrap_or_else(|| Path::new(".")).join(named)
                })
            }
        };
        let backing = match backing_path {
            None => None,
            Some(bp) => Some(open_backing(&bp, &header, path)?),
        };
        Ok(UmlCow {
            file,
            path: path.to_path_buf(),
            header,
            bitmap,
            dirty: None,
            backing,
            writable: options.writable,
            unsynced: false,
        })
    }

    /// Creates a COW file over `backing` (which must exist; its absolute
    /// path, size and mtime go into the header) and opens it for writing
    /// with that backing file. Fails if `path` exists.
    pub fn create(path: &Path, backing: &Path, options: &CreateOptions) -> Result<UmlCow> {
        if options.version != 2 && options.version != 3 {
            return Err(Error::InvalidArgument(format!(
                "UML COW version {} cannot be written (2 or 3)",
                options.version
            )));
        }
        if !valid_sector_size(options.sector_size) {
            return Err(Error::InvalidArgument(format!(
                "sector size {} is not a power of two in 512..={MAX_SECTOR_SIZE}",
                options.sector_size
            )));
        }
        if options.version == 3 && (options.alignment == 0 || options.alignment > MAX_ALIGNMENT) {
            return Err(Error::InvalidArgument(format!(
                "alignment {} is not in 1..={MAX_ALIGNMENT}",
                options.alignment
            )));
        }
        let absolute = absolute_path(backing)?;
        use std::os::unix::ffi::OsStrExt;
        let name = absolute.as_os_str().as_bytes().to_vec();
        if name.len() > 4095 || name.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "backing path '{}' does not fit the header's 4095 bytes",
                absolute.display()
            )));
        }
        let meta = std::fs::metadata(&absolute)
            .map_err(|e| Error::Open(format!("{}: {e}", absolute.display())))?;
        let size = meta.len();
        if size == 0 {
            return Err(Error::InvalidArgument(format!(
                "backing file '{}' is empty",
                absolute.display()
            )));
        }
        let header = build_header(
            options.version,
            &name,
            mtime_secs(&meta) as u32,
            size,
            options.sector_size,
            options.alignment,
        );
        let parsed = parse_header(&header, u64::MAX)?;
        // Built under a temporary name, synced, renamed into place and the
        // folder synced: a crash never leaves a half-made file at `path`.
        let what = path.display().to_string();
        let (file, ()) = crate::newfile::create_atomically(path, &what, |file| {
            file.write_all_at(&header, 0)
                .map_err(|e| Error::write("UML COW header", 0, e))?;
            // Like Linux: the file covers the whole data area (sparse).
            file.set_len(parsed.data_offset + size)
                .map_err(|e| Error::write("UML COW file length", parsed.data_offset + size, e))
        })?;
        drop(file);
        UmlCow::open(
            path,
            &UmlCowOptions {
                writable: true,
                backing: Backing::Path(absolute),
            },
        )
    }

    /// The parsed header.
    pub fn header(&self) -> &UmlCowHeader {
        &self.header
    }

    fn bit(&self, n: u64) -> bool {
        let byte = n / 8;
        byte < self.bitmap.len() as u64 && self.bitmap[byte as usize] & (1 << (n % 8)) != 0
    }

    fn set_bit(&mut self, n: u64) -> Result<()> {
        let byte = (n / 8) as usize;
        if byte >= self.bitmap.len() {
            return Err(Error::Unsupported(format!(
                "COW sector {n} has no bit inside this file's bitmap area (the v1/v2 \
                 rounding bug); it cannot be written"
            )));
        }
        self.bitmap[byte] |= 1 << (n % 8);
        self.dirty = Some(match self.dirty {
            None => (byte, byte + 1),
            Some((a, b)) => (a.min(byte), b.max(byte + 1)),
        });
        Ok(())
    }

    /// Disk sectors per COW sector.
    fn per_cow(&self) -> u64 {
        u64::from(self.header.sector_size) / SECTOR_BYTES
    }

    /// Reads `buf.len()` bytes of the data area at disk byte `offset`,
    /// zero-filling past the disk's size.
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self
            .header
            .size
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        let at = self.header.data_offset + offset;
        self.file
            .read_exact_at(head, at)
            .map_err(|e| Error::read("UML COW data", at, e))
    }

    fn backing_read(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        match &mut self.backing {
            Some(b) => {
                let count = (buf.len() / SECTOR_SIZE) as u64;
                let inside = b.sector_count().saturating_sub(lba).min(count);
                let (head, tail) = buf.split_at_mut(inside as usize * SECTOR_SIZE);
                tail.fill(0);
                if inside == 0 {
                    return Ok(SectorStatus::NotAlloc);
                }
                b.read_sectors(lba, head)
            }
            None => {
                buf.fill(0);
                Ok(SectorStatus::NotAlloc)
            }
        }
    }

    /// Run of disk sectors from `lba` (at most `count`) whose COW bits
    /// are all equal; returns (set, run).
    fn bit_run(&self, lba: u64, count: u64) -> (bool, u64) {
        let per = self.per_cow();
        let first = lba / per;
        let set = self.bit(first);
        let mut cs = first + 1;
        let last = (lba + count - 1) / per;
        while cs <= last && self.bit(cs) == set {
            cs += 1;
        }
        let end = (cs * per).min(lba + count);
        (set, end - lba)
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "{} is open read-only",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Writes the bitmap bytes changed since the last flush, after making
    /// the data durable.
    fn sync(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.unsynced || self.dirty.is_some() {
            self.file
                .sync_data()
                .map_err(|e| Error::write("UML COW data sync", 0, e))?;
            self.unsynced = false;
        }
        if let Some((a, b)) = self.dirty {
            let at = self.header.bitmap_offset + a as u64;
            self.file
                .write_all_at(&self.bitmap[a..b], at)
                .map_err(|e| Error::write("UML COW bitmap", at, e))?;
            self.file
                .sync_data()
                .map_err(|e| Error::write("UML COW bitmap sync", at, e))?;
            self.dirty = None;
        }
        Ok(())
    }
}

fn prefix_error(e: Error, path: &str) -> Error {
    match e {
        Error::Corrupt(m) => Error::Corrupt(format!("{path}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{path}: {m}")),
        other => other,
    }
}

/// `path` made absolute the way Linux does: its folder resolved, the name
/// kept.
fn absolute_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("'{}' names no file", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir =
        std::fs::canonicalize(&dir).map_err(|e| Error::Open(format!("{}: {e}", dir.display())))?;
    Ok(dir.join(name))
}

/// Opens the backing file read-only after Linux's size and mtime checks.
fn open_backing(path: &Path, header: &UmlCowHeader, cow: &Path) -> Result<RawDisk> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::Open(format!(
            "{}: backing file '{}': {e}",
            cow.display(),
            path.display()
        ))
    })?;
    if meta.len() != header.size {
        return Err(Error::SourceMismatch(format!(
            "{}: backing file '{}' is {} bytes, the COW header says {} (size mismatch)",
            cow.display(),
            path.display(),
            meta.len(),
            header.size
        )));
    }
    let actual = mtime_secs(&meta);
    let skip = header.layout == Layout::V2Qemu && header.mtime == 0;
    if !skip && actual != header.mtime as i64 {
        return Err(Error::SourceMismatch(format!(
            "{}: backing file '{}' was modified at {actual}, the COW header says {} \
             (mtime mismatch: the backing file changed after the COW file was made)",
            cow.display(),
            path.display(),
            header.mtime
        )));
    }
    RawDisk::open(path)
}

impl Disk for UmlCow {
    fn drive_type(&self) -> DriveType {
        DriveType::UmlCow
    }
    fn sector_count(&self) -> u64 {
        self.header.size.div_ceil(SECTOR_BYTES)
    }
    fn byte_size(&self) -> u64 {
        self.header.size
    }
    fn is_snapshot(&self) -> bool {
        true
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.sector_count())?;
        let mut status = SectorStatus::NotAlloc;
        let mut done = 0;
        while done < count {
            let (set, run) = self.bit_run(lba + done, count - done);
            let part = &mut buf[done as usize * SECTOR_SIZE..(done + run) as usize * SECTOR_SIZE];
            let s = if set {
                self.read_data((lba + done) * SECTOR_BYTES, part)?;
                SectorStatus::Normal
            } else {
                self.backing_read(lba + done, part)?
            };
            status = status.combine(s);
            done += run;
        }
        Ok(status)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        let mut status = SectorStatus::NotAlloc;
        let mut done = 0;
        while done < count && status != SectorStatus::Normal {
            let (set, run) = self.bit_run(lba + done, count - done);
            let s = if set {
                SectorStatus::Normal
            } else {
                match &mut self.backing {
                    Some(b) => {
                        let inside = b.sector_count().saturating_sub(lba + done).min(run);
                        if inside == 0 {
                            SectorStatus::NotAlloc
                        } else {
                            b.block_status(lba + done, inside)?
                        }
                    }
                    None => SectorStatus::NotAlloc,
                }
            };
            status = status.combine(s);
            done += run;
        }
        Ok(status)
    }
    /// From the COW bitmap: set bits are data; clear ones take the backing
    /// file's runs (unallocated past its end, or without one).
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Err(Error::InvalidArgument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        let (set, run) = self.bit_run(lba, count);
        if set {
            return Ok((SectorStatus::Normal, run));
        }
        match &mut self.backing {
            Some(b) => {
                let inside = b.sector_count().saturating_sub(lba).min(run);
                if inside == 0 {
                    Ok((SectorStatus::NotAlloc, run))
                } else {
                    b.status_run(lba, inside)
                }
            }
            None => Ok((SectorStatus::NotAlloc, run)),
        }
    }
}

impl WritableDisk for UmlCow {
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let count = sectors_in(data.len())?;
        check_range(lba, count, self.sector_count())?;
        let ss = u64::from(self.header.sector_size);
        let start = lba * SECTOR_BYTES;
        let end = start + data.len() as u64;
        let mut pos = start;
        while pos < end {
            let cs = pos / ss;
            let cs_start = cs * ss;
            let cs_end = cs_start + ss;
            let upto = end.min(cs_end);
            let chunk = &data[(pos - start) as usize..(upto - start) as usize];
            if cs_end.min(self.header.size) <= cs_start {
                break; // past the disk's bytes (the zero-padded tail)
            }
            if (cs / 8) as usize >= self.bitmap.len() {
                // Refuse before writing anything for this sector.
                self.set_bit(cs)?;
            }
            if self.bit(cs) || (pos == cs_start && upto >= cs_end.min(self.header.size)) {
                write_clipped(&self.file, &self.header, pos, chunk)?;
            } else {
                // First write to a COW sector that only partly covers it:
                // the rest comes from what the disk showed before.
                if self.backing.is_none() {
                    return Err(Error::Unsupported(format!(
                        "a first write to part of COW sector {cs} ({ss} bytes) needs the \
                         backing file to fill the rest; open with the backing file"
                    )));
                }
                let mut whole = vec![0u8; ss as usize];
                let first_lba = cs_start / SECTOR_BYTES;
                self.backing_read(first_lba, &mut whole)?;
                let off = (pos - cs_start) as usize;
                whole[off..off + chunk.len()].copy_from_slice(chunk);
                write_clipped(&self.file, &self.header, cs_start, &whole)?;
            }
            self.set_bit(cs)?;
            self.unsynced = true;
            pos = upto;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.sync()
    }
}

impl ImageMetadata for UmlCow {
    fn format_version(&self) -> u32 {
        self.header.version()
    }
}

impl ImageFile for UmlCow {
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Ok((false, 0));
        }
        Ok(self.bit_run(lba, count))
    }
    fn file_size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn has_backing(&self) -> bool {
        self.backing.is_some()
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn dump(&self) -> String {
        let set = self
            .bitmap
            .iter()
            .map(|b| b.count_ones() as u64)
            .sum::<u64>();
        format!(
            "UML COW {:?}: backing '{}', size {} bytes, mtime {}, sector size {}, alignment {}, \
             bitmap at {}, data at {}, {} COW sectors of {} written",
            self.header.layout,
            String::from_utf8_lossy(&self.header.backing_file),
            self.header.size,
            self.header.mtime,
            self.header.sector_size,
            self.header.alignment,
            self.header.bitmap_offset,
            self.header.data_offset,
            set,
            self.header.cow_sectors()
        )
    }
    fn close(mut self: Box<Self>) -> Result<()> {
        self.sync()
    }
}

/// Writes `data` at disk byte `pos`, dropping bytes past the disk's size.
fn write_clipped(file: &File, header: &UmlCowHeader, pos: u64, data: &[u8]) -> Result<()> {
    let inside = header.size.saturating_sub(pos).min(data.len() as u64) as usize;
    let at = header.data_offset + pos;
    file.write_all_at(&data[..inside], at)
        .map_err(|e| Error::write("UML COW data", at, e))
}

impl Drop for UmlCow {
    fn drop(&mut self) {
        // Best effort: close() reports errors; a plain drop cannot.
        let _ = self.sync();
    }
}

/// Fuzz entry point: treats `bytes` as a UML COW file (image only, no
/// backing) and exercises probe, header parsing, open and full reads. Any
/// outcome but a panic, hang or huge allocation is fine; returns whether
/// the open succeeded.
#[cfg(feature = "test-utils")]
pub fn fuzz_one(bytes: &[u8]) -> bool {
    let _ = parse_header(&bytes[..bytes.len().min(HEADER_READ)], bytes.len() as u64);
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let path = dir.path().join("fuzz.cow");
    if std::fs::write(&path, bytes).is_err() {
        return false;
    }
    let _ = probe_path(&path);
    match UmlCow::open(&path, &UmlCowOptions::default()) {
        Ok(mut img) => {
            let n = img.sector_count().min(4096);
            let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
            let _ = img.read_sectors(0, &mut buf);
            let _ = img.block_status(0, n);
            let _ = img.held_run(0, n);
            let _ = img.dump();
            true
        }
        Err(_) => false,
    }
}
