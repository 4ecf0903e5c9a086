//! The text descriptor: recognised, read (its own file, or embedded in a
//! monolithic sparse file) and parsed (keys, extent lines, UUIDs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::sparse::{read_sparse_header, SparseHeader, COWD_MAGIC, SPARSE_MAGIC};
use super::{file_length, name, read_prefix, MAX_EXTENTS};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::open_read_only;

/// A descriptor is a few kilobytes; more is not a descriptor.
pub(super) const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// A descriptor is plain text whose first meaningful line is the
/// `# Disk DescriptorFile` banner, or which sets `createType`. QEMU pads
/// descriptors it rewrites with NULs to a whole sector, so trailing NULs
/// are allowed; NULs followed by anything else are not text.
pub(super) fn looks_like_descriptor(head: &[u8]) -> bool {
    let text_len = head.iter().position(|b| *b == 0).unwrap_or(head.len());
    if text_len == 0 || head[text_len..].iter().any(|b| *b != 0) {
        return false;
    }
    let text = String::from_utf8_lossy(&head[..text_len]);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let banner = lines
        .clone()
        .next()
        .is_some_and(|l| l.eq_ignore_ascii_case("# Disk DescriptorFile"));
    banner || lines.any(|l| l.starts_with("createType"))
}

/// What a descriptor says.
#[derive(Debug, Default)]
pub(super) struct Descriptor {
    pub(super) create_type: Option<String>,
    pub(super) parent_hint: Option<String>,
    pub(super) uuid: Option<[u8; 16]>,
    /// `ddb.uuid.parent`, unless absent or all zeros (a base disk).
    pub(super) parent_uuid: Option<[u8; 16]>,
    pub(super) extents: Vec<ExtentLine>,
}

#[derive(Debug)]
pub(super) struct ExtentLine {
    pub(super) access: String,
    pub(super) sectors: u64,
    pub(super) kind: String,
    pub(super) file: Option<String>,
    pub(super) offset: u64,
}

/// The descriptor embedded in a monolithic sparse file (an empty one when
/// the header points at none).
pub(super) fn read_embedded_descriptor(
    file: &File,
    path: &Path,
    file_len: u64,
    header: &SparseHeader,
) -> Result<Descriptor> {
    if header.descriptor_sector != 0 && header.descriptor_sectors != 0 {
        let bytes = header
            .descriptor_sectors
            .checked_mul(SECTOR_BYTES)
            .filter(|b| *b <= MAX_DESCRIPTOR_BYTES);
        let start = header.descriptor_sector.checked_mul(SECTOR_BYTES);
        let (bytes, start) = match (bytes, start) {
            (Some(b), Some(s)) if s.checked_add(b).is_some_and(|e| e <= file_len) => (b, s),
            _ => {
                return Err(Error::corrupt(format!(
                    "{}: embedded descriptor at sector {} ({} sectors) is too large or past the end of the file",
                    path.display(),
                    header.descriptor_sector,
                    header.descriptor_sectors
                )))
            }
        };
        let mut text = vec![0u8; bytes as usize];
        file.read_exact_at(&mut text, start)
            .map_err(|e| Error::read(&format!("{} descriptor", name(path)), start, e))?;
        // The descriptor area is NUL-padded after the text.
        let used = text.iter().position(|b| *b == 0).unwrap_or(text.len());
        text.truncate(used);
        parse_descriptor(&text, path)
    } else {
        Ok(Descriptor::default())
    }
}

/// A descriptor that is its own small text file.
pub(super) fn read_text_descriptor(file: &File, path: &Path, file_len: u64) -> Result<Descriptor> {
    if file_len > MAX_DESCRIPTOR_BYTES {
        return Err(Error::corrupt(format!(
            "{}: not a sparse extent, and at {file_len} bytes too large for a VMDK descriptor",
            path.display()
        )));
    }
    let mut text = vec![0u8; file_len as usize];
    file.read_exact_at(&mut text, 0)
        .map_err(|e| Error::read(&format!("{} descriptor", name(path)), 0, e))?;
    // A rewritten descriptor may be NUL-padded after its text.
    let used = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    parse_descriptor(&text[..used], path)
}

/// The UUIDs a VMDK descriptor records (VirtualBox writes them; QEMU does
/// not), in the byte order of their text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmdkUuids {
    /// `ddb.uuid.image`.
    pub image: Option<[u8; 16]>,
    /// `ddb.uuid.parent`, unless it is all zeros (a base disk).
    pub parent: Option<[u8; 16]>,
}

/// Reads the descriptor of the VMDK at `path` (a descriptor file or a
/// monolithic sparse file) for its UUIDs, without opening extents or parent.
pub fn descriptor_uuids(path: &Path) -> Result<VmdkUuids> {
    let file = open_read_only(path)?;
    let file_len = file_length(&file, path)?;
    let mut magic = [0u8; 4];
    let have = read_prefix(&file, &mut magic).map_err(|e| Error::read(&name(path), 0, e))?;
    if have == 4 && magic == COWD_MAGIC {
        return Err(Error::unsupported(format!(
            "{}: COWD (ESX/legacy) sparse VMDK extents are not supported",
            path.display()
        )));
    }
    let descriptor = if have == 4 && magic == SPARSE_MAGIC {
        let header = read_sparse_header(&file, path, file_len)?;
        read_embedded_descriptor(&file, path, file_len, &header)?
    } else {
        read_text_descriptor(&file, path, file_len)?
    };
    Ok(VmdkUuids {
        image: descriptor.uuid,
        parent: descriptor.parent_uuid,
    })
}

/// Parses descriptor text. Unknown keys and lines are ignored, as VMware's
/// own readers do; extent lines must be well formed.
pub(super) fn parse_descriptor(text: &[u8], path: &Path) -> Result<Descriptor> {
    let text = String::from_utf8_lossy(text);
    let mut descriptor = Descriptor::default();
    for (number, raw_line) in text.lines().enumerate() {
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if ["RW", "RDONLY", "NOACCESS"]
            .iter()
            .any(|a| first.eq_ignore_ascii_case(a))
        {
            let extent = parse_extent_line(line).ok_or_else(|| {
                Error::corrupt(format!(
                    "{}: descriptor line {}: malformed extent line '{line}'",
                    path.display(),
                    number + 1
                ))
            })?;
            if descriptor.extents.len() >= MAX_EXTENTS {
                return Err(Error::unsupported(format!(
                    "{}: VMDK descriptor lists more than {MAX_EXTENTS} extents",
                    path.display()
                )));
            }
            descriptor.extents.push(extent);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        if key.eq_ignore_ascii_case("createType") {
            descriptor.create_type = Some(value.to_string());
        } else if key.eq_ignore_ascii_case("parentFileNameHint") && !value.is_empty() {
            descriptor.parent_hint = Some(value.to_string());
        } else if key.eq_ignore_ascii_case("ddb.uuid.image") {
            descriptor.uuid = parse_uuid(value);
        } else if key.eq_ignore_ascii_case("ddb.uuid.parent") {
            descriptor.parent_uuid = parse_uuid(value).filter(|u| *u != [0u8; 16]);
        }
    }
    Ok(descriptor)
}

pub(super) fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; the file name may hold spaces.
pub(super) fn parse_extent_line(line: &str) -> Option<ExtentLine> {
    let mut rest = line;
    let mut word = || -> Option<&str> {
        let trimmed = rest.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let (w, r) = trimmed.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    let access = word()?.to_string();
    let sectors = word()?.parse::<u64>().ok()?;
    let kind = word()?.to_string();
    let tail = rest.trim();
    let (file, offset) = if tail.is_empty() {
        (None, 0)
    } else {
        let quoted = tail.strip_prefix('"')?;
        let close = quoted.find('"')?;
        let file = quoted[..close].to_string();
        let after = quoted[close + 1..].trim();
        let offset = if after.is_empty() {
            0
        } else {
            after.parse::<u64>().ok()?
        };
        (Some(file), offset)
    };
    Some(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

/// Accepts both `xxxxxxxx-xxxx-...` and VMware's `xx xx ... xx-xx ...`
/// spellings: 32 hex digits once spaces and dashes are dropped.
pub(super) fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'-')
        .collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

/// What the writer puts in the descriptor of a one-extent sparse image.
pub(super) struct NewDescriptor<'a> {
    /// `monolithicSparse` or `streamOptimized`.
    pub(super) create_type: &'a str,
    /// Capacity in sectors.
    pub(super) sectors: u64,
    /// The extent file's name (the image itself).
    pub(super) file_name: &'a str,
    /// The content ID: a random 32-bit value that changes with the data.
    pub(super) cid: u32,
    /// `ddb.uuid.image`, in text byte order.
    pub(super) uuid: [u8; 16],
}

/// Descriptor text for a base image of one sparse extent: the `version=1`
/// line readers recognise, content IDs (`parentCID=ffffffff`: no parent),
/// the extent line `RW SECTORS SPARSE "FILE"`, and the disk database with
/// the hardware version, a legacy IDE geometry (16 heads, 63 sectors,
/// cylinders capped at 16383) and the image UUID.
pub(super) fn build_descriptor(new: &NewDescriptor) -> String {
    const HEADS: u64 = 16;
    const SECTORS_PER_TRACK: u64 = 63;
    let cylinders = (new.sectors / (HEADS * SECTORS_PER_TRACK)).clamp(1, 16383);
    // A quote or line break would end the extent line early.
    let name = new
        .file_name
        .replace(|c: char| c == '"' || c.is_control(), "_");
    let uuid = uuid::Uuid::from_bytes(new.uuid).hyphenated().to_string();
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"{create_type}\"\n\
         \n\
         # Extent description\n\
         RW {sectors} SPARSE \"{name}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.adapterType = \"ide\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{HEADS}\"\n\
         ddb.geometry.sectors = \"{SECTORS_PER_TRACK}\"\n\
         ddb.uuid.image = \"{uuid}\"\n",
        cid = new.cid,
        create_type = new.create_type,
        sectors = new.sectors,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_lines_parse_with_spaces_and_offsets() {
        let e = parse_extent_line(r#"RW 4194304 SPARSE "my disk-s001.vmdk""#).unwrap();
        assert_eq!(e.sectors, 4194304);
        assert_eq!(e.kind, "SPARSE");
        assert_eq!(e.file.as_deref(), Some("my disk-s001.vmdk"));
        let e = parse_extent_line(r#"RDONLY 20480 FLAT "f-flat.vmdk" 128"#).unwrap();
        assert_eq!(e.offset, 128);
        let e = parse_extent_line("RW 100 ZERO").unwrap();
        assert!(e.file.is_none());
        assert!(parse_extent_line("RW lots SPARSE \"x\"").is_none());
        assert!(parse_extent_line("RW 5 FLAT \"unterminated").is_none());
        assert!(parse_extent_line("RW 5 FLAT \"x\" notanumber").is_none());
    }

    #[test]
    fn uuids_in_both_spellings() {
        let a = parse_uuid("0123abcd-0000-1111-2222-333344445555").unwrap();
        let b = parse_uuid("01 23 ab cd 00 00 11 11-22 22 33 33 44 44 55 55").unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 0x01);
        assert!(parse_uuid("xyz").is_none());
    }

    #[test]
    fn descriptor_probe_needs_text() {
        assert!(looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(looks_like_descriptor(
            b"version=1\ncreateType=\"monolithicFlat\"\n"
        ));
        assert!(looks_like_descriptor(
            b"# Disk DescriptorFile\ncreateType=\"x\"\n\0\0"
        ));
        assert!(!looks_like_descriptor(b"# Disk DescriptorFile\n\0\x01"));
        assert!(!looks_like_descriptor(b"hello world"));
    }
}
