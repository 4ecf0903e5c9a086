//! The header: its layouts (v1, v2 as Linux and QEMU wrote it, v3 and the
//! "broken" unpacked v3), parsed and validated, and built for `create`.

use std::path::PathBuf;

use byteorder::{BigEndian, ByteOrder, LittleEndian};

use crate::error::{Error, Result};

/// The magic as a big-endian u32 ("OOOM").
pub const MAGIC: u32 = 0x4F4F_4F4D;

const V1_HEADER: u64 = 280;
const V2_HEADER: u64 = 4120;
const V2_QEMU_HEADER: u64 = 1056;
const V3_HEADER: u64 = 4128;
const V3_BROKEN_HEADER: u64 = 4136;
/// Bytes read to parse any layout.
pub(super) const HEADER_READ: usize = V3_BROKEN_HEADER as usize;

/// The largest bitmap kept in memory (512 MiB: 2 PiB at 512-byte sectors).
const MAX_BITMAP_BYTES: u64 = 1 << 29;
/// The largest alignment accepted (v3).
pub(super) const MAX_ALIGNMENT: u32 = 1 << 20;
/// The largest COW sector size accepted.
pub(super) const MAX_SECTOR_SIZE: u32 = 1 << 16;

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
pub(super) fn round_up(x: u64, to: u64) -> Option<u64> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

/// The path bytes of a NUL-terminated field, or an error when the field
/// has no NUL.
fn c_path(field: &[u8], what: &str) -> Result<Vec<u8>> {
    match field.iter().position(|&b| b == 0) {
        Some(end) => Ok(field[..end].to_vec()),
        None => Err(Error::corrupt(format!(
            "UML COW {what}: the backing file name is not NUL-terminated"
        ))),
    }
}

/// True when `bytes` starts with the COW magic in either byte order.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 8
        && (BigEndian::read_u32(&bytes[0..]) == MAGIC
            || LittleEndian::read_u32(&bytes[0..]) == MAGIC)
}

/// Parses the header at the start of `bytes` (at most [`HEADER_READ`]
/// bytes are looked at) of a file `file_len` bytes long, validating every
/// field and that bitmap and data offsets are consistent.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<UmlCowHeader> {
    if bytes.len() < 8 {
        return Err(Error::corrupt("UML COW: file shorter than a header".into()));
    }
    let big_endian = if BigEndian::read_u32(&bytes[0..]) == MAGIC {
        true
    } else if LittleEndian::read_u32(&bytes[0..]) == MAGIC {
        false
    } else {
        return Err(Error::unsupported("not a UML COW file (no magic)".into()));
    };
    let version = if big_endian {
        BigEndian::read_u32(&bytes[4..])
    } else {
        LittleEndian::read_u32(&bytes[4..])
    };
    let need = |n: u64, what: &str| -> Result<()> {
        if (bytes.len() as u64) < n {
            Err(Error::corrupt(format!(
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
                    u64::from(BigEndian::read_u32(&bytes[264..])),
                    BigEndian::read_u64(&bytes[268..]),
                    BigEndian::read_u32(&bytes[276..]),
                )
            } else {
                (
                    u64::from(LittleEndian::read_u32(&bytes[264..])),
                    LittleEndian::read_u64(&bytes[268..]),
                    LittleEndian::read_u32(&bytes[276..]),
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
                return Err(Error::unsupported(
                    "UML COW v2 with a little-endian magic".into(),
                ));
            }
            need(V2_QEMU_HEADER, "v2")?;
            let qemu_ok = valid_sector_size(BigEndian::read_u32(&bytes[1048..]))
                && bytes[8..8 + 1024].contains(&0)
                && BigEndian::read_u64(&bytes[1040..]) > 0;
            let linux_ok = bytes.len() as u64 >= V2_HEADER
                && valid_sector_size(BigEndian::read_u32(&bytes[4116..]))
                && bytes[8..8 + 4096].contains(&0);
            // A Linux header whose path is shorter than 1024 bytes has
            // zeros where QEMU keeps sector size and size, so QEMU's fields
            // validating means QEMU's layout unless the path runs on.
            let linux_path_long = !bytes[8..8 + 1024].contains(&0);
            let use_qemu = qemu_ok && !(linux_ok && linux_path_long);
            if use_qemu {
                layout = Layout::V2Qemu;
                backing = c_path(&bytes[8..8 + 1024], "v2")?;
                mtime = u64::from(BigEndian::read_u32(&bytes[1032..]));
                size = BigEndian::read_u64(&bytes[1040..]);
                ss = BigEndian::read_u32(&bytes[1048..]);
                bitmap_offset = V2_QEMU_HEADER;
            } else {
                need(V2_HEADER, "v2")?;
                layout = Layout::V2Linux;
                backing = c_path(&bytes[8..8 + 4096], "v2")?;
                mtime = u64::from(BigEndian::read_u32(&bytes[4104..]));
                size = BigEndian::read_u64(&bytes[4108..]);
                ss = BigEndian::read_u32(&bytes[4116..]);
                bitmap_offset = V2_HEADER;
            }
            align = ss;
        }
        3 => {
            if !big_endian {
                return Err(Error::unsupported(
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
            mtime = u64::from(BigEndian::read_u32(&bytes[8..]));
            size = BigEndian::read_u64(&bytes[12 + base..]);
            ss = BigEndian::read_u32(&bytes[20 + base..]);
            align = BigEndian::read_u32(&bytes[24 + base..]);
            let format = BigEndian::read_u32(&bytes[28 + base..]);
            if format != 0 {
                return Err(Error::unsupported(format!(
                    "UML COW v3 with COW format {format} (only 0, the bitmap, exists)"
                )));
            }
            backing = c_path(&bytes[32 + base..32 + base + 4096], "v3")?;
            if align == 0 || align > MAX_ALIGNMENT {
                return Err(Error::corrupt(format!(
                    "UML COW v3: alignment {align} is not in 1..={MAX_ALIGNMENT}"
                )));
            }
            bitmap_offset = round_up(hdr, u64::from(align)).unwrap_or(u64::MAX);
        }
        v => {
            return Err(Error::unsupported(format!("UML COW version {v}")));
        }
    }
    if !valid_sector_size(ss) {
        return Err(Error::corrupt(format!(
            "UML COW: sector size {ss} is not a power of two in 512..={MAX_SECTOR_SIZE}"
        )));
    }
    if size == 0 {
        return Err(Error::corrupt("UML COW: the disk size is 0".into()));
    }
    let ss64 = u64::from(ss);
    let bitmap_len = match layout {
        Layout::V1 { .. } | Layout::V2Linux => size.checked_add(ss64 - 1).map(|v| v / (8 * ss64)),
        Layout::V2Qemu => Some((size / 512).div_ceil(8)),
        Layout::V3 | Layout::V3Broken => Some(size.div_ceil(ss64).div_ceil(8)),
    }
    .ok_or_else(|| Error::corrupt(format!("UML COW: size {size} overflows")))?;
    if bitmap_len > MAX_BITMAP_BYTES {
        return Err(Error::unsupported(format!(
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
        .ok_or_else(|| Error::corrupt("UML COW: data offset overflows".into()))?;
    if data_offset.checked_add(size).is_none() {
        return Err(Error::corrupt(format!(
            "UML COW: size {size} overflows the file's offsets"
        )));
    }
    if file_len < data_offset {
        return Err(Error::corrupt(format!(
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

pub(super) fn valid_sector_size(ss: u32) -> bool {
    ss.is_power_of_two() && (512..=MAX_SECTOR_SIZE).contains(&ss)
}

/// Serialises a header for `create`: v3 (Linux's layout) or v2 (Linux's).
pub(super) fn build_header(
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
        BigEndian::write_u32(&mut h[0..4], MAGIC);
        BigEndian::write_u32(&mut h[4..8], 2u32);
        h[8..8 + backing.len()].copy_from_slice(backing);
        BigEndian::write_u32(&mut h[4104..4108], mtime);
        BigEndian::write_u64(&mut h[4108..4116], size);
        BigEndian::write_u32(&mut h[4116..4120], ss);
    } else {
        h = vec![0u8; V3_HEADER as usize];
        BigEndian::write_u32(&mut h[0..4], MAGIC);
        BigEndian::write_u32(&mut h[4..8], 3u32);
        BigEndian::write_u32(&mut h[8..12], mtime);
        BigEndian::write_u64(&mut h[12..20], size);
        BigEndian::write_u32(&mut h[20..24], ss);
        BigEndian::write_u32(&mut h[24..28], align);
        // 28..32: format 0, the bitmap.
        h[32..32 + backing.len()].copy_from_slice(backing);
    }
    h
}
