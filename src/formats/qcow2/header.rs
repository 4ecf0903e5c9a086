//! The header and its extensions: version, feature bits, sizes, the L1
//! table's place and the backing file's name and format.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};

pub(super) const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
/// Header extension types: end of the list, backing file format.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// The longest backing format name we accept (names are short words).
const MAX_FORMAT_NAME: u32 = 64;
/// Smallest and largest cluster sizes we accept (the specification's floor
/// and QEMU's own ceiling of 2 MiB).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB (32 subclusters of
/// at least one sector each).
const MIN_EXTENDED_CLUSTER_BITS: u32 = 14;
/// QEMU's cap on the L1 table (32 MiB); a bigger one is not a real image.
const MAX_L1_BYTES: u64 = 32 << 20;
/// The specification's cap on the backing file name.
const MAX_BACKING_NAME: u32 = 1023;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// The header fields the reader uses, validated.
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) cluster_bits: u32,
    pub(super) virtual_size: u64,
    pub(super) l1_entries_needed: u64,
    pub(super) l1_offset: u64,
    pub(super) extended_l2: bool,
    pub(super) backing_name: Option<String>,
    pub(super) backing_format: Option<String>,
}

/// Reads and validates the header, before anything sized by it is
/// allocated.
pub(super) fn read_header(file: &File, file_len: u64, path: &Path) -> Result<Header> {
    let name = path.display();
    let corrupt = |what: String| Error::corrupt(format!("{name}: qcow2 header: {what}"));
    let mut raw = [0u8; V3_MIN_HEADER_LEN as usize + 8];
    let have = (file_len.min(raw.len() as u64)) as usize;
    if (have as u64) < V2_HEADER_LEN {
        return Err(corrupt(format!("file is only {file_len} bytes long")));
    }
    file.read_exact_at(&mut raw[..have], 0)
        .map_err(|e| Error::read(&format!("{name} header"), 0, e))?;
    if raw[..4] != MAGIC {
        return Err(corrupt("bad magic at byte offset 0".into()));
    }
    let version = BigEndian::read_u32(&raw[4..]);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!(
            "{name}: qcow2 version {version} (only 2 and 3 are read)"
        )));
    }
    let backing_offset = BigEndian::read_u64(&raw[8..]);
    let backing_len = BigEndian::read_u32(&raw[16..]);
    let cluster_bits = BigEndian::read_u32(&raw[20..]);
    let virtual_size = BigEndian::read_u64(&raw[24..]);
    let crypt_method = BigEndian::read_u32(&raw[32..]);
    let l1_size = BigEndian::read_u32(&raw[36..]);
    let l1_offset = BigEndian::read_u64(&raw[40..]);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster_bits {cluster_bits} at byte offset 20 is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if crypt_method != 0 {
        let method = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown",
        };
        return Err(Error::unsupported(format!(
            "{name}: encrypted qcow2 image ({method} encryption, method {crypt_method}) is not supported"
        )));
    }

    let mut extended_l2 = false;
    let mut header_len = V2_HEADER_LEN;
    if version >= 3 {
        if (have as u64) < V3_MIN_HEADER_LEN {
            return Err(corrupt(format!(
                "version 3 header needs {V3_MIN_HEADER_LEN} bytes, file has {file_len}"
            )));
        }
        let incompatible = BigEndian::read_u64(&raw[72..]);
        header_len = u64::from(BigEndian::read_u32(&raw[100..]));
        if header_len < V3_MIN_HEADER_LEN || header_len > cluster_size.min(file_len) {
            return Err(corrupt(format!(
                "header length {header_len} at byte offset 100 is invalid"
            )));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "{name}: qcow2 incompatible feature bits {unknown:#x} are unknown to this reader"
            )));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(format!(
                "{name}: qcow2 image with an external data file (data_file) is not supported"
            )));
        }
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            let kind = if header_len > V3_MIN_HEADER_LEN {
                raw[104]
            } else {
                u8::MAX
            };
            if kind != 0 {
                let label = if kind == 1 { "zstd" } else { "unknown" };
                return Err(Error::unsupported(format!(
                    "{name}: qcow2 compression type {kind} ({label}) is not supported; only deflate"
                )));
            }
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            if cluster_bits < MIN_EXTENDED_CLUSTER_BITS {
                return Err(corrupt(format!(
                    "extended L2 entries with {cluster_size}-byte clusters (needs at least 16 KiB)"
                )));
            }
            extended_l2 = true;
        }
    }

    let entry_bytes: u64 = if extended_l2 { 16 } else { 8 };
    let l2_span = (cluster_size / entry_bytes) * cluster_size;
    let l1_entries_needed = virtual_size.div_ceil(l2_span);
    if u64::from(l1_size) < l1_entries_needed {
        return Err(corrupt(format!(
            "L1 table of {l1_size} entries (byte offset 36) cannot map a {virtual_size}-byte disk"
        )));
    }
    let l1_bytes = l1_entries_needed * 8;
    let l1_fits = l1_offset
        .checked_add(l1_bytes)
        .is_some_and(|end| end <= file_len);
    if l1_bytes > MAX_L1_BYTES || l1_offset & (cluster_size - 1) != 0 || !l1_fits {
        return Err(corrupt(format!(
            "L1 table at byte offset {l1_offset} ({l1_bytes} bytes) is unaligned, too large, \
             or not inside the {file_len}-byte file"
        )));
    }
    if virtual_size.checked_add(SECTOR_BYTES).is_none() {
        return Err(corrupt(format!("virtual size {virtual_size} is absurd")));
    }

    let backing_name = if backing_offset == 0 {
        None
    } else {
        let fits = backing_offset
            .checked_add(u64::from(backing_len))
            .is_some_and(|end| end <= file_len);
        if backing_len == 0 || backing_len > MAX_BACKING_NAME || !fits {
            return Err(corrupt(format!(
                "backing file name at byte offset {backing_offset}, {backing_len} bytes, is invalid"
            )));
        }
        let mut bytes = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut bytes, backing_offset)
            .map_err(|e| Error::read(&format!("{name} backing file name"), backing_offset, e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            corrupt(format!(
                "backing file name at byte offset {backing_offset} is not UTF-8"
            ))
        })?;
        Some(text)
    };

    let backing_format = if backing_name.is_some() {
        read_backing_format(file, header_len, cluster_size.min(file_len), &corrupt)?
    } else {
        None
    };

    Ok(Header {
        version,
        cluster_bits,
        virtual_size,
        l1_entries_needed,
        l1_offset,
        extended_l2,
        backing_name,
        backing_format,
    })
}

/// Walks the header extensions between `start` and `end` (the end of the
/// first cluster, or of a shorter file) and returns the backing format
/// name, if one is there.
fn read_backing_format(
    file: &File,
    start: u64,
    end: u64,
    corrupt: &dyn Fn(String) -> Error,
) -> Result<Option<String>> {
    if start >= end {
        return Ok(None);
    }
    let mut area = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut area, start)
        .map_err(|e| Error::read("qcow2 header extensions", start, e))?;
    let mut at = 0usize;
    let mut found = None;
    // Each extension takes at least 8 bytes, so the walk ends.
    while at + 8 <= area.len() {
        let kind = BigEndian::read_u32(&area[at..]);
        let len = BigEndian::read_u32(&area[at + 4..]);
        if kind == EXT_END {
            break;
        }
        let data = at + 8;
        let padded = (u64::from(len) + 7) & !7;
        if padded > (area.len() - data) as u64 {
            return Err(corrupt(format!(
                "header extension {kind:#x} at byte offset {} ({len} bytes) runs past the \
                 first cluster",
                start + at as u64
            )));
        }
        if kind == EXT_BACKING_FORMAT {
            let bytes = &area[data..data + len as usize];
            let text = std::str::from_utf8(bytes).ok().filter(|t| {
                !t.is_empty()
                    && len <= MAX_FORMAT_NAME
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
            match text {
                Some(t) => found = Some(t.to_owned()),
                None => {
                    return Err(corrupt(format!(
                        "backing format extension at byte offset {} is not a format name",
                        start + at as u64
                    )))
                }
            }
        }
        at = data + padded as usize;
    }
    Ok(found)
}
