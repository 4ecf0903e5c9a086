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
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_BYTES: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_BYTES: usize = 64 * 1024;

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
const REGION_METADATA: [u8; 16] = ms_guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

/// The fields of the current header this reader uses.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) sequence: u64,
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
        if &raw[0..4] != b"head" {
            problems.push(format!("no 'head' signature at byte offset {at}"));
            continue;
        }
        let stored = LittleEndian::read_u32(&raw[4..]);
        raw[4..8].fill(0);
        let computed = crc32c::crc32c(&raw);
        if stored != computed {
            problems.push(format!(
                "header CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
                at + 4
            ));
            continue;
        }
        let guid = |from: usize| -> [u8; 16] {
            let mut g = [0u8; 16];
            g.copy_from_slice(&raw[from..from + 16]);
            g
        };
        let header = Header {
            sequence: LittleEndian::read_u64(&raw[8..]),
            data_write_guid: guid(32),
            log_guid: guid(48),
            log_version: LittleEndian::read_u16(&raw[64..]),
            version: LittleEndian::read_u16(&raw[66..]),
            log_length: LittleEndian::read_u32(&raw[68..]),
            log_offset: LittleEndian::read_u64(&raw[72..]),
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
    if &raw[0..4] != b"regi" {
        return Err(Error::corrupt(format!(
            "no 'regi' signature at byte offset {at}"
        )));
    }
    let stored = LittleEndian::read_u32(&raw[4..]);
    raw[4..8].fill(0);
    let computed = crc32c::crc32c(&raw);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "region table CRC-32C at byte offset {} is {stored:#010x}, expected {computed:#010x}",
            at + 4
        )));
    }
    let count = LittleEndian::read_u32(&raw[8..]) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(format!(
            "region table at byte offset {at} has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    for index in 0..count {
        let entry = &raw[16 + index * 32..16 + (index + 1) * 32];
        let offset = LittleEndian::read_u64(&entry[16..]);
        let length = u64::from(LittleEndian::read_u32(&entry[24..]));
        let required = LittleEndian::read_u32(&entry[28..]) & 1 != 0;
        let entry_at = at + 16 + index as u64 * 32;
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
