//! The metadata region: its table, the items this reader uses and a
//! differencing image's parent locator.

use byteorder::{ByteOrder, LittleEndian};

use super::header::ms_guid;
use super::log::FileView;
use super::{MAX_TABLE_ENTRIES, MIB};
use crate::error::{Error, Result};
use crate::formats::guid::swap_guid_fields;

const METADATA_TABLE_BYTES: usize = 64 * 1024;
/// The specification's largest virtual disk.
const MAX_VIRTUAL_BYTES: u64 = 64 << 40;
/// A parent locator is a handful of paths; anything larger is not one.
const MAX_LOCATOR_BYTES: u64 = MIB;

const ITEM_FILE_PARAMETERS: [u8; 16] = ms_guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const ITEM_VIRTUAL_DISK_SIZE: [u8; 16] = ms_guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const ITEM_PAGE83: [u8; 16] = ms_guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const ITEM_LOGICAL_SECTOR_SIZE: [u8; 16] = ms_guid(
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
    if &table[0..8] != b"metadata" {
        return Err(Error::corrupt(format!(
            "{name}: no 'metadata' signature at byte offset {region_at}"
        )));
    }
    let count = usize::from(LittleEndian::read_u16(&table[10..]));
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
        let entry = &table[32 + index * 32..32 + (index + 1) * 32];
        let entry_at = region_at + 32 + index as u64 * 32;
        let item_offset = u64::from(LittleEndian::read_u32(&entry[16..]));
        let item_len = u64::from(LittleEndian::read_u32(&entry[20..]));
        let required = LittleEndian::read_u32(&entry[24..]) & 4 != 0;
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
    let has_parent = flags & 2 != 0;
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
fn ms_guid_physical_sector_size() -> [u8; 16] {
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
