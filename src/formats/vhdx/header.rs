//! The two headers and the region table: where the current header, the
//! BAT and the metadata region are.

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{ByteOrder, LittleEndian};

use super::log::FileView;
use super::metadata::guid_text;
use super::{KIB, MAX_TABLE_ENTRIES, MIB};
use crate::error::{Error, ErrorCode, Result};

pub(super) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The file type identifier: the signature, then a UTF-16 creator string
/// of up to 512 bytes, in a 64 KiB area.
pub(super) const CREATOR_AT: usize = 8;
pub(super) const CREATOR_BYTES: usize = 512;
pub(super) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(super) const HEADER_BYTES: usize = 4096;
pub(super) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(super) const REGION_TABLE_BYTES: usize = 64 * 1024;

// Header fields (byte offsets in the 4 KiB header).
const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// CRC-32C of the structure with this field zeroed (headers and region
/// tables alike).
const CHECKSUM_AT: usize = 4;
const SEQUENCE_AT: usize = 8;
const FILE_WRITE_GUID_AT: usize = 16;
const DATA_WRITE_GUID_AT: usize = 32;
const LOG_GUID_AT: usize = 48;
const LOG_VERSION_AT: usize = 64;
const VERSION_AT: usize = 66;
const LOG_LENGTH_AT: usize = 68;
const LOG_OFFSET_AT: usize = 72;

// Region table fields: a 16-byte header then 32-byte entries (GUID, file
// offset u64, length u32, flags u32 with bit 0 "required").
const REGION_SIGNATURE: &[u8; 4] = b"regi";
const REGION_COUNT_AT: usize = 8;
const REGION_ENTRIES_AT: usize = 16;
const REGION_ENTRY_BYTES: usize = 32;
const REGION_ENTRY_OFFSET_AT: usize = 16;
const REGION_ENTRY_LENGTH_AT: usize = 24;
const REGION_ENTRY_FLAGS_AT: usize = 28;
const REGION_REQUIRED: u32 = 1;

/// A GUID's on-disk bytes: the first three fields little-endian.
pub(super) const fn ms_guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub(super) const REGION_BAT: [u8; 16] = ms_guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(super) const REGION_METADATA: [u8; 16] = ms_guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

/// The fields of the current header this reader uses.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) sequence: u64,
    pub(super) file_write_guid: [u8; 16],
    pub(super) data_write_guid: [u8; 16],
    pub(super) log_guid: [u8; 16],
    pub(super) log_version: u16,
    pub(super) version: u16,
    pub(super) log_length: u32,
    pub(super) log_offset: u64,
}

/// Reads both headers and returns the valid one with the higher sequence
/// number.
pub(super) fn read_header(file: &File, name: &str) -> Result<Header> {
    let mut best: Option<Header> = None;
    let mut problems = Vec::new();
    for at in HEADER_OFFSETS {
        let mut raw = [0u8; HEADER_BYTES];
        if let Err(e) = file.read_exact_at(&mut raw, at) {
            problems.push(format!("header at byte offset {at}: {e}"));
            continue;
        }
        if &raw[0..4] != HEADER_SIGNATURE {
            problems.push(format!("no 'head' signature at byte offset {at}"));
            continue;
        }
        let stored = LittleEndian::read_u32(&raw[CHECKSUM_AT..]);
        let computed = checksum(&mut raw);
        if stored != computed {
            problems.push(format!(
                "header CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
                at + CHECKSUM_AT as u64
            ));
            continue;
        }
        let guid = |from: usize| -> [u8; 16] {
            let mut g = [0u8; 16];
            g.copy_from_slice(&raw[from..from + 16]);
            g
        };
        let header = Header {
            sequence: LittleEndian::read_u64(&raw[SEQUENCE_AT..]),
            file_write_guid: guid(FILE_WRITE_GUID_AT),
            data_write_guid: guid(DATA_WRITE_GUID_AT),
            log_guid: guid(LOG_GUID_AT),
            log_version: LittleEndian::read_u16(&raw[LOG_VERSION_AT..]),
            version: LittleEndian::read_u16(&raw[VERSION_AT..]),
            log_length: LittleEndian::read_u32(&raw[LOG_LENGTH_AT..]),
            log_offset: LittleEndian::read_u64(&raw[LOG_OFFSET_AT..]),
        };
        if best.as_ref().is_none_or(|b| header.sequence > b.sequence) {
            best = Some(header);
        }
    }
    best.ok_or_else(|| {
        Error::corrupt(format!(
            "{name}: neither VHDX header is valid ({})",
            problems.join("; ")
        ))
    })
}

/// (offset, length) of the BAT and metadata regions.
pub(super) struct Regions {
    pub(super) bat: (u64, u64),
    pub(super) metadata: (u64, u64),
}

pub(super) fn read_region_table(view: &FileView) -> Result<Regions> {
    let mut problems = Vec::new();
    for at in REGION_TABLE_OFFSETS {
        match parse_region_table(view, at) {
            Ok(regions) => return Ok(regions),
            Err(e) if e.kind() == ErrorCode::Corrupt => problems.push(e.message().to_string()),
            Err(other) => return Err(other),
        }
    }
    Err(Error::corrupt(format!(
        "{}: no valid region table ({})",
        view.name(),
        problems.join("; ")
    )))
}

fn parse_region_table(view: &FileView, at: u64) -> Result<Regions> {
    let mut raw = vec![0u8; REGION_TABLE_BYTES];
    view.read_exact("region table", at, &mut raw)?;
    if &raw[0..4] != REGION_SIGNATURE {
        return Err(Error::corrupt(format!(
            "no 'regi' signature at byte offset {at}"
        )));
    }
    let stored = LittleEndian::read_u32(&raw[CHECKSUM_AT..]);
    let computed = checksum(&mut raw);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "region table CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
            at + CHECKSUM_AT as u64
        )));
    }
    let count = LittleEndian::read_u32(&raw[REGION_COUNT_AT..]) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(format!(
            "region table at byte offset {at} has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    for index in 0..count {
        let from = REGION_ENTRIES_AT + index * REGION_ENTRY_BYTES;
        let entry = &raw[from..from + REGION_ENTRY_BYTES];
        let offset = LittleEndian::read_u64(&entry[REGION_ENTRY_OFFSET_AT..]);
        let length = u64::from(LittleEndian::read_u32(&entry[REGION_ENTRY_LENGTH_AT..]));
        let required =
            LittleEndian::read_u32(&entry[REGION_ENTRY_FLAGS_AT..]) & REGION_REQUIRED != 0;
        let entry_at = at + from as u64;
        let known = entry[0..16] == REGION_BAT || entry[0..16] == REGION_METADATA;
        if !known {
            if required {
                return Err(Error::unsupported(format!(
                    "{}: required region {} (region table entry at byte offset {entry_at})",
                    view.name(),
                    guid_text(&entry[0..16])
                )));
            }
            continue;
        }
        // Regions must lie in the real file: their sizes drive allocations.
        let inside = matches!(offset.checked_add(length), Some(end) if end <= view.file_len());
        if offset < MIB || offset % MIB != 0 || length == 0 || !inside {
            return Err(Error::corrupt(format!(
                "region table entry at byte offset {entry_at}: {length} bytes at byte offset \
                 {offset} is not a MiB-aligned range inside the {}-byte file",
                view.file_len()
            )));
        }
        if entry[0..16] == REGION_BAT {
            bat = Some((offset, length));
        } else {
            metadata = Some((offset, length));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(Error::corrupt(format!(
            "region table at byte offset {at} lacks the BAT or metadata region"
        ))),
    }
}

/// The CRC-32C of a header or region table: computed with the checksum
/// field zeroed (this zeroes it in `raw`).
fn checksum(raw: &mut [u8]) -> u32 {
    raw[CHECKSUM_AT..CHECKSUM_AT + 4].fill(0);
    crc32c::crc32c(raw)
}

/// The file type identifier area (64 KiB): signature and `creator`.
pub(super) fn build_file_identifier(creator: &str) -> Vec<u8> {
    let mut raw = vec![0u8; HEADER_OFFSETS[0] as usize];
    raw[..FILE_SIGNATURE.len()].copy_from_slice(FILE_SIGNATURE);
    let text: Vec<u8> = creator.encode_utf16().flat_map(u16::to_le_bytes).collect();
    // Leave room for a terminating NUL.
    let len = text.len().min(CREATOR_BYTES - 2);
    raw[CREATOR_AT..CREATOR_AT + len].copy_from_slice(&text[..len]);
    raw
}

/// One 4 KiB header with its checksum, from the fields `read_header`
/// returns.
pub(super) fn build_header(header: &Header) -> Vec<u8> {
    let mut raw = vec![0u8; HEADER_BYTES];
    raw[0..4].copy_from_slice(HEADER_SIGNATURE);
    LittleEndian::write_u64(&mut raw[SEQUENCE_AT..], header.sequence);
    raw[FILE_WRITE_GUID_AT..FILE_WRITE_GUID_AT + 16].copy_from_slice(&header.file_write_guid);
    raw[DATA_WRITE_GUID_AT..DATA_WRITE_GUID_AT + 16].copy_from_slice(&header.data_write_guid);
    raw[LOG_GUID_AT..LOG_GUID_AT + 16].copy_from_slice(&header.log_guid);
    LittleEndian::write_u16(&mut raw[LOG_VERSION_AT..], header.log_version);
    LittleEndian::write_u16(&mut raw[VERSION_AT..], header.version);
    LittleEndian::write_u32(&mut raw[LOG_LENGTH_AT..], header.log_length);
    LittleEndian::write_u64(&mut raw[LOG_OFFSET_AT..], header.log_offset);
    let crc = checksum(&mut raw);
    LittleEndian::write_u32(&mut raw[CHECKSUM_AT..], crc);
    raw
}

/// A 64 KiB region table with its checksum listing the BAT and metadata
/// regions, both required.
pub(super) fn build_region_table(regions: &Regions) -> Vec<u8> {
    let mut raw = vec![0u8; REGION_TABLE_BYTES];
    raw[0..4].copy_from_slice(REGION_SIGNATURE);
    let entries = [
        (REGION_BAT, regions.bat),
        (REGION_METADATA, regions.metadata),
    ];
    LittleEndian::write_u32(&mut raw[REGION_COUNT_AT..], entries.len() as u32);
    for (index, (guid, (offset, length))) in entries.iter().enumerate() {
        let from = REGION_ENTRIES_AT + index * REGION_ENTRY_BYTES;
        let entry = &mut raw[from..from + REGION_ENTRY_BYTES];
        entry[0..16].copy_from_slice(guid);
        LittleEndian::write_u64(&mut entry[REGION_ENTRY_OFFSET_AT..], *offset);
        // Region lengths are u32 in the table; the writer keeps them small.
        LittleEndian::write_u32(&mut entry[REGION_ENTRY_LENGTH_AT..], *length as u32);
        LittleEndian::write_u32(&mut entry[REGION_ENTRY_FLAGS_AT..], REGION_REQUIRED);
    }
    let crc = checksum(&mut raw);
    LittleEndian::write_u32(&mut raw[CHECKSUM_AT..], crc);
    raw
}
