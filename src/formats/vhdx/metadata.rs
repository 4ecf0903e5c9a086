//! The metadata region: its table, the items this reader uses and a
//! differencing image's parent locator.

use byteorder::{ByteOrder, LittleEndian};

use super::header::ms_guid;
use super::log::FileView;
use super::{MAX_TABLE_ENTRIES, MIB};
use crate::error::{Error, Result};
use crate::formats::guid::swap_guid_fields;

/// The metadata table: at the start of the region, 64 KiB; items follow.
pub(super) const METADATA_TABLE_BYTES: usize = 64 * 1024;
const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
const METADATA_COUNT_AT: usize = 10;
const METADATA_ENTRIES_AT: usize = 32;
const METADATA_ENTRY_BYTES: usize = 32;
// Entry fields: item GUID at 0, then these.
const ENTRY_OFFSET_AT: usize = 16;
const ENTRY_LENGTH_AT: usize = 20;
const ENTRY_FLAGS_AT: usize = 24;
/// Entry flags: the item describes the virtual disk (kept when forking a
/// differencing child) rather than this file; the item must be understood.
const ENTRY_IS_VIRTUAL_DISK: u32 = 2;
const ENTRY_IS_REQUIRED: u32 = 4;
/// File parameters flag: a differencing image.
const HAS_PARENT: u32 = 2;
/// The specification's largest virtual disk.
const MAX_VIRTUAL_BYTES: u64 = 64 << 40;
/// A parent locator is a handful of paths; anything larger is not one.
const MAX_LOCATOR_BYTES: u64 = MIB;

pub(super) const ITEM_FILE_PARAMETERS: [u8; 16] = ms_guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(super) const ITEM_VIRTUAL_DISK_SIZE: [u8; 16] = ms_guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub(super) const ITEM_PAGE83: [u8; 16] = ms_guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(super) const ITEM_LOGICAL_SECTOR_SIZE: [u8; 16] = ms_guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const ITEM_PARENT_LOCATOR: [u8; 16] = ms_guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
const LOCATOR_TYPE_VHDX: [u8; 16] = ms_guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// A differencing image's parent locator.
#[derive(Debug, Clone, Default)]
pub struct VhdxParentLocator {
    /// All key/value pairs, in file order.
    pub entries: Vec<(String, String)>,
    /// Candidate parent paths, best first, with `/` separators.
    pub names: Vec<String>,
    /// `parent_linkage` and `parent_linkage2` as on-disk GUID bytes: the
    /// parent's data-write GUID must be one of them.
    pub linkages: Vec<[u8; 16]>,
}

pub(super) struct Metadata {
    pub(super) block_bytes: u64,
    pub(super) virtual_bytes: u64,
    pub(super) logical_sector_bytes: u64,
    pub(super) page83: Option<[u8; 16]>,
    pub(super) locator: Option<VhdxParentLocator>,
}

pub(super) fn read_metadata(
    view: &FileView,
    (region_at, region_len): (u64, u64),
) -> Result<Metadata> {
    let name = view.name().to_string();
    if region_len < METADATA_TABLE_BYTES as u64 {
        return Err(Error::corrupt(format!(
            "{name}: metadata region at byte offset {region_at} is only {region_len} bytes"
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_BYTES];
    view.read_exact("metadata table", region_at, &mut table)?;
    if &table[0..8] != METADATA_SIGNATURE {
        return Err(Error::corrupt(format!(
            "{name}: no 'metadata' signature at byte offset {region_at}"
        )));
    }
    let count = usize::from(LittleEndian::read_u16(&table[METADATA_COUNT_AT..]));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(format!(
            "{name}: metadata table at byte offset {region_at} has {count} entries"
        )));
    }
    let mut file_parameters = None;
    let mut virtual_bytes = None;
    let mut logical_sector_bytes = None;
    let mut page83 = None;
    let mut locator_item = None;
    for index in 0..count {
        let from = METADATA_ENTRIES_AT + index * METADATA_ENTRY_BYTES;
        let entry = &table[from..from + METADATA_ENTRY_BYTES];
        let entry_at = region_at + from as u64;
        let item_offset = u64::from(LittleEndian::read_u32(&entry[ENTRY_OFFSET_AT..]));
        let item_len = u64::from(LittleEndian::read_u32(&entry[ENTRY_LENGTH_AT..]));
        let required = LittleEndian::read_u32(&entry[ENTRY_FLAGS_AT..]) & ENTRY_IS_REQUIRED != 0;
        if item_len > 0
            && (item_offset < METADATA_TABLE_BYTES as u64 || item_offset + item_len > region_len)
        {
            return Err(Error::corrupt(format!(
                "{name}: metadata entry at byte offset {entry_at}: {item_len} bytes at \
                 region offset {item_offset} are outside the {region_len}-byte region"
            )));
        }
        let item_at = region_at + item_offset;
        let id = &entry[0..16];
        let fixed_item = |want: usize| -> Result<Vec<u8>> {
            if item_len < want as u64 {
                return Err(Error::corrupt(format!(
                    "{name}: metadata item {} at byte offset {item_at} is {item_len} bytes, \
                     needs {want}",
                    guid_text(id)
                )));
            }
            let mut data = vec![0u8; want];
            view.read_exact("metadata item", item_at, &mut data)?;
            Ok(data)
        };
        if id == ITEM_FILE_PARAMETERS {
            let data = fixed_item(8)?;
            file_parameters = Some((
                LittleEndian::read_u32(&data[0..]),
                LittleEndian::read_u32(&data[4..]),
                item_at,
            ));
        } else if id == ITEM_VIRTUAL_DISK_SIZE {
            virtual_bytes = Some((LittleEndian::read_u64(&fixed_item(8)?), item_at));
        } else if id == ITEM_LOGICAL_SECTOR_SIZE {
            logical_sector_bytes = Some((LittleEndian::read_u32(&fixed_item(4)?), item_at));
        } else if id == ITEM_PAGE83 {
            let mut g = [0u8; 16];
            g.copy_from_slice(&fixed_item(16)?);
            page83 = Some(g);
        } else if id == ITEM_PARENT_LOCATOR {
            locator_item = Some((item_at, item_len));
        } else if required && id != ms_guid_physical_sector_size() {
            return Err(Error::unsupported(format!(
                "{name}: required metadata item {} (entry at byte offset {entry_at})",
                guid_text(id)
            )));
        }
    }
    let missing = |what: &str| {
        Error::corrupt(format!(
            "{name}: metadata region at byte offset {region_at} has no {what} item"
        ))
    };
    let (block_bytes, flags, params_at) =
        file_parameters.ok_or_else(|| missing("file parameters"))?;
    let (virtual_bytes, size_at) = virtual_bytes.ok_or_else(|| missing("virtual disk size"))?;
    let (logical, logical_at) =
        logical_sector_bytes.ok_or_else(|| missing("logical sector size"))?;
    let block_bytes = u64::from(block_bytes);
    if !block_bytes.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_bytes) {
        return Err(Error::corrupt(format!(
            "{name}: block size {block_bytes} at byte offset {params_at} is not a power of two \
             from 1 MiB to 256 MiB"
        )));
    }
    let logical = u64::from(logical);
    if logical != 512 && logical != 4096 {
        return Err(Error::corrupt(format!(
            "{name}: logical sector size {logical} at byte offset {logical_at} is not 512 or 4096"
        )));
    }
    if virtual_bytes == 0 || virtual_bytes > MAX_VIRTUAL_BYTES || virtual_bytes % logical != 0 {
        return Err(Error::corrupt(format!(
            "{name}: virtual disk size {virtual_bytes} at byte offset {size_at} is not a \
             non-zero multiple of the {logical}-byte sector up to 64 TiB"
        )));
    }
    let has_parent = flags & HAS_PARENT != 0;
    let locator = if has_parent {
        let (at, len) = locator_item.ok_or_else(|| missing("parent locator"))?;
        Some(read_parent_locator(view, at, len)?)
    } else {
        None
    };
    Ok(Metadata {
        block_bytes,
        virtual_bytes,
        logical_sector_bytes: logical,
        page83,
        locator,
    })
}

/// The physical sector size item: required by the specification but only
/// informational for a reader.
pub(super) fn ms_guid_physical_sector_size() -> [u8; 16] {
    ms_guid(
        0xCDA3_48C7,
        0x445D,
        0x4471,
        [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
    )
}

fn read_parent_locator(view: &FileView, at: u64, len: u64) -> Result<VhdxParentLocator> {
    let name = view.name().to_string();
    if !(20..=MAX_LOCATOR_BYTES).contains(&len) {
        return Err(Error::corrupt(format!(
            "{name}: parent locator at byte offset {at} is {len} bytes"
        )));
    }
    let mut item = vec![0u8; len as usize];
    view.read_exact("parent locator", at, &mut item)?;
    if item[0..16] != LOCATOR_TYPE_VHDX {
        return Err(Error::unsupported(format!(
            "{name}: parent locator type {} at byte offset {at} (only VHDX parents are read)",
            guid_text(&item[0..16])
        )));
    }
    let count = usize::from(LittleEndian::read_u16(&item[18..]));
    if 20 + count * 12 > item.len() {
        return Err(Error::corrupt(format!(
            "{name}: parent locator at byte offset {at} declares {count} entries in {len} bytes"
        )));
    }
    let text = |offset: u32, length: u16| -> Result<String> {
        let from = offset as usize;
        let to = from + usize::from(length);
        if to > item.len() || !length.is_multiple_of(2) {
            return Err(Error::corrupt(format!(
                "{name}: parent locator string of {length} bytes at item offset {offset} \
                 (locator at byte offset {at}) is outside the item"
            )));
        }
        let units: Vec<u16> = item[from..to]
            .chunks_exact(2)
            .map(LittleEndian::read_u16)
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut locator = VhdxParentLocator::default();
    for index in 0..count {
        let e = &item[20 + index * 12..20 + (index + 1) * 12];
        let key = text(
            LittleEndian::read_u32(&e[0..]),
            LittleEndian::read_u16(&e[8..]),
        )?;
        let value = text(
            LittleEndian::read_u32(&e[4..]),
            LittleEndian::read_u16(&e[10..]),
        )?;
        locator.entries.push((key, value));
    }
    let value = |key: &str| {
        locator
            .entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    for key in ["parent_linkage", "parent_linkage2"] {
        if let Some(v) = value(key) {
            let guid = parse_guid_text(&v).ok_or_else(|| {
                Error::corrupt(format!(
                    "{name}: parent locator at byte offset {at}: {key} '{v}' is not a GUID"
                ))
            })?;
            locator.linkages.push(guid);
        }
    }
    if locator.linkages.is_empty() {
        return Err(Error::corrupt(format!(
            "{name}: parent locator at byte offset {at} has no parent_linkage"
        )));
    }
    let relative = value("relative_path").map(|p| p.replace('\\', "/"));
    let absolute =
        value("absolute_win32_path").map(|p| p.trim_start_matches(r"\\?\").replace('\\', "/"));
    // volume_path (\\?\Volume{..}\...) names a Windows volume: only its
    // file name is of use here.
    let volume = value("volume_path").map(|p| p.replace('\\', "/"));
    let mut names: Vec<String> = Vec::new();
    names.extend(relative.iter().cloned());
    // A drive-letter path means nothing here; an absolute Unix path does.
    names.extend(absolute.iter().filter(|p| p.starts_with('/')).cloned());
    // Last resort: the parent's file name next to the child; the linkage
    // check guards against the wrong file.
    for p in relative.iter().chain(&absolute).chain(&volume) {
        if let Some(base) = p.rsplit('/').next() {
            names.push(base.to_string());
        }
    }
    for n in names {
        if !n.is_empty() && !locator.names.contains(&n) {
            locator.names.push(n);
        }
    }
    if locator.names.is_empty() {
        return Err(Error::corrupt(format!(
            "{name}: parent locator at byte offset {at} has no usable parent path"
        )));
    }
    Ok(locator)
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case) as
/// on-disk GUID bytes.
fn parse_guid_text(text: &str) -> Option<[u8; 16]> {
    let t = text.trim_end_matches('\0').trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    let parts: Vec<&str> = t.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5
        || parts.iter().zip(lens).any(|(p, l)| p.len() != l)
        || !t.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
    {
        return None;
    }
    let d1 = u32::from_str_radix(parts[0], 16).ok()?;
    let d2 = u16::from_str_radix(parts[1], 16).ok()?;
    let d3 = u16::from_str_radix(parts[2], 16).ok()?;
    let rest = format!("{}{}", parts[3], parts[4]);
    let mut d4 = [0u8; 8];
    for (i, byte) in d4.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&rest[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(ms_guid(d1, d2, d3, d4))
}

/// On-disk GUID bytes as text.
pub(super) fn guid_text(g: &[u8]) -> String {
    let r = swap_guid_fields(g);
    uuid::Uuid::from_bytes(r).braced().to_string()
}

/// What the writer puts in the metadata region of a non-differencing image.
pub(super) struct NewMetadata {
    pub(super) block_bytes: u32,
    pub(super) virtual_bytes: u64,
    pub(super) logical_sector_bytes: u32,
    pub(super) physical_sector_bytes: u32,
    /// On-disk GUID bytes.
    pub(super) page83: [u8; 16],
}

/// The metadata region's first bytes: the table and, from 64 KiB on, the
/// items (file parameters, virtual disk size, page 83 data, logical and
/// physical sector sizes), each required; all but the file parameters
/// describe the virtual disk. The rest of the region is zeros.
pub(super) fn build_metadata(new: &NewMetadata) -> Vec<u8> {
    let mut file_parameters = new.block_bytes.to_le_bytes().to_vec();
    file_parameters.extend_from_slice(&0u32.to_le_bytes()); // no parent, not fixed
    let items: [([u8; 16], Vec<u8>, u32); 5] = [
        (ITEM_FILE_PARAMETERS, file_parameters, ENTRY_IS_REQUIRED),
        (
            ITEM_VIRTUAL_DISK_SIZE,
            new.virtual_bytes.to_le_bytes().to_vec(),
            ENTRY_IS_REQUIRED | ENTRY_IS_VIRTUAL_DISK,
        ),
        (
            ITEM_PAGE83,
            new.page83.to_vec(),
            ENTRY_IS_REQUIRED | ENTRY_IS_VIRTUAL_DISK,
        ),
        (
            ITEM_LOGICAL_SECTOR_SIZE,
            new.logical_sector_bytes.to_le_bytes().to_vec(),
            ENTRY_IS_REQUIRED | ENTRY_IS_VIRTUAL_DISK,
        ),
        (
            ms_guid_physical_sector_size(),
            new.physical_sector_bytes.to_le_bytes().to_vec(),
            ENTRY_IS_REQUIRED | ENTRY_IS_VIRTUAL_DISK,
        ),
    ];
    let items_bytes: usize = items.iter().map(|(_, data, _)| data.len()).sum();
    let mut raw = vec![0u8; METADATA_TABLE_BYTES + items_bytes];
    raw[0..8].copy_from_slice(METADATA_SIGNATURE);
    LittleEndian::write_u16(&mut raw[METADATA_COUNT_AT..], items.len() as u16);
    let mut item_at = METADATA_TABLE_BYTES;
    for (index, (id, data, flags)) in items.iter().enumerate() {
        let from = METADATA_ENTRIES_AT + index * METADATA_ENTRY_BYTES;
        let entry = &mut raw[from..from + METADATA_ENTRY_BYTES];
        entry[0..16].copy_from_slice(id);
        LittleEndian::write_u32(&mut entry[ENTRY_OFFSET_AT..], item_at as u32);
        LittleEndian::write_u32(&mut entry[ENTRY_LENGTH_AT..], data.len() as u32);
        LittleEndian::write_u32(&mut entry[ENTRY_FLAGS_AT..], *flags);
        raw[item_at..item_at + data.len()].copy_from_slice(data);
        item_at += data.len();
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::super::header::REGION_BAT;
    use super::*;

    #[test]
    fn guids_round_trip_through_text() {
        let text = "{2dc27766-f623-4200-9d64-115e9bfd4a08}";
        assert_eq!(parse_guid_text(text), Some(REGION_BAT));
        assert_eq!(guid_text(&REGION_BAT), text);
        assert_eq!(
            parse_guid_text("2DC27766-F623-4200-9D64-115E9BFD4A08"),
            Some(REGION_BAT)
        );
        assert_eq!(
            parse_guid_text("{2dc27766-f623-4200-9d64-115e9bfd4a0}"),
            None
        );
        assert_eq!(
            parse_guid_text("{2dc27766-f623-4200-9d64+115e9bfd4a08}"),
            None
        );
    }
}
