//! GUID partition tables.
//!
//! # Format facts relied on
//!
//! * The primary header is at LBA 1, the backup header at the disk's last
//!   LBA. Header fields (little-endian): signature `EFI PART` (0), revision
//!   (8), header size (12; 92 in every current writer), CRC32 of the header
//!   (16; computed over `header size` bytes with this field zero), reserved
//!   (20), this header's LBA (24), the other header's LBA (32), first and
//!   last usable LBA (40, 48; inclusive), disk GUID (56), LBA of the entry
//!   array (72), number of entries (80), bytes per entry (84), CRC32 of the
//!   entry array (88; over `number * size` bytes).
//! * The primary entry array usually starts at LBA 2; the backup array sits
//!   just before the backup header. Both arrays are identical.
//! * An entry: type GUID (0; all zero = unused), unique GUID (16), first
//!   and last LBA (32, 40; inclusive), attributes (48), name in UTF-16LE
//!   (56, 72 bytes).
//! * The CRC is CRC-32/IEEE (the zlib/Ethernet one).
//! * Sector 0 holds a protective MBR: one entry of type 0xEE from LBA 1
//!   covering the disk (or 0xFFFFFFFF sectors when the disk is larger).
//! * Partitions are numbered by their entry's index plus one (as `sgdisk`
//!   and `sfdisk` show them).

use crate::disk::{Disk, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};

pub(crate) const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: u32 = 92;
/// The largest entry array read (bytes): 128 KiB is 8x the usual.
const MAX_ARRAY_BYTES: u64 = 128 * 1024;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// A GPT header's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The raw header bytes (`header_size` of them), kept so fields this
    /// code does not know survive a rewrite.
    pub raw: Vec<u8>,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
}

impl Header {
    /// Sectors the entry array occupies.
    pub(crate) fn array_sectors(&self) -> u64 {
        self.array_bytes().div_ceil(SECTOR_BYTES)
    }

    fn array_bytes(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size)
    }

    /// The header as one sector, with the given positions and the CRCs
    /// recomputed.
    pub(crate) fn to_sector(
        &self,
        my_lba: u64,
        alternate_lba: u64,
        last_usable: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut raw = self.raw.clone();
        raw[24..32].copy_from_slice(&my_lba.to_le_bytes());
        raw[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        raw[48..56].copy_from_slice(&last_usable.to_le_bytes());
        raw[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        raw[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        raw[16..20].fill(0);
        let crc = crc32fast::hash(&raw);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut sector = vec![0u8; SECTOR_SIZE];
        sector[..raw.len()].copy_from_slice(&raw);
        sector
    }
}

/// One used entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index in the array (the partition number is this plus one).
    pub index: usize,
    pub type_guid: [u8; 16],
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub name: String,
}

impl Entry {
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

/// A parsed GPT: the primary header and its entry array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub header: Header,
    /// The whole entry array, as read (entries unknown here survive).
    pub array: Vec<u8>,
    pub entries: Vec<Entry>,
}

/// A GUID's text form from its on-disk mixed-endian bytes.
pub(crate) fn guid_text(stored: &[u8; 16]) -> String {
    let mut b = *stored;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    uuid::Uuid::from_bytes(b)
        .hyphenated()
        .to_string()
        .to_uppercase()
}

impl Gpt {
    /// Reads and checks the primary header and entry array. `what` names
    /// the image in errors.
    pub(crate) fn read(disk: &mut dyn Disk, what: &str) -> Result<Gpt> {
        let disk_sectors = disk.sector_count();
        if disk_sectors < 3 {
            return Err(Error::corrupt(format!(
                "{what}: too small for a GPT ({disk_sectors} sectors)"
            )));
        }
        let mut sector = vec![0u8; SECTOR_SIZE];
        disk.read_sectors(1, &mut sector)?;
        if &sector[..8] != SIGNATURE {
            return Err(Error::corrupt(format!(
                "{what}: the protective MBR announces a GPT, but sector 1 has no \
                 'EFI PART' signature"
            )));
        }
        let size = u32_at(&sector, 12);
        if !(MIN_HEADER_SIZE..=SECTOR_SIZE as u32).contains(&size) {
            return Err(Error::corrupt(format!(
                "{what}: GPT header size {size} is not between {MIN_HEADER_SIZE} and 512"
            )));
        }
        let mut raw = sector[..size as usize].to_vec();
        let stored_crc = u32_at(&raw, 16);
        raw[16..20].fill(0);
        let crc = crc32fast::hash(&raw);
        raw[16..20].copy_from_slice(&stored_crc.to_le_bytes());
        if crc != stored_crc {
            return Err(Error::corrupt(format!(
                "{what}: GPT header CRC32 is {stored_crc:#010x}, the header's bytes give \
                 {crc:#010x}"
            )));
        }
        let header = Header {
            my_lba: u64_at(&raw, 24),
            alternate_lba: u64_at(&raw, 32),
            first_usable: u64_at(&raw, 40),
            last_usable: u64_at(&raw, 48),
            entries_lba: u64_at(&raw, 72),
            entry_count: u32_at(&raw, 80),
            entry_size: u32_at(&raw, 84),
            raw,
        };
        if header.my_lba != 1 {
            return Err(Error::corrupt(format!(
                "{what}: the primary GPT header says it is at LBA {}, not 1",
                header.my_lba
            )));
        }
        if header.entry_size < 128 || !header.entry_size.is_multiple_of(8) {
            return Err(Error::corrupt(format!(
                "{what}: GPT entry size {} is not a multiple of 8 of at least 128",
                header.entry_size
            )));
        }
        if header.array_bytes() > MAX_ARRAY_BYTES || header.entry_count == 0 {
            return Err(Error::unsupported(format!(
                "{what}: GPT entry array of {} entries of {} bytes",
                header.entry_count, header.entry_size
            )));
        }
        let array_end = header.entries_lba + header.array_sectors();
        if header.entries_lba < 2
            || array_end > header.first_usable
            || header.first_usable > header.last_usable
            || header.last_usable >= disk_sectors - 1
        {
            return Err(Error::corrupt(format!(
                "{what}: GPT layout does not fit the disk of {disk_sectors} sectors (entries at \
                 LBA {}, usable LBAs {}..={}; a truncated image?)",
                header.entries_lba, header.first_usable, header.last_usable
            )));
        }
        let mut array = vec![0u8; (header.array_sectors() * SECTOR_BYTES) as usize];
        disk.read_sectors(header.entries_lba, &mut array)?;
        array.truncate(header.array_bytes() as usize);
        let entries_crc = crc32fast::hash(&array);
        let stored = u32_at(&header.raw, 88);
        if entries_crc != stored {
            return Err(Error::corrupt(format!(
                "{what}: GPT entry array CRC32 is {stored:#010x}, its bytes give \
                 {entries_crc:#010x}"
            )));
        }
        let mut entries = Vec::new();
        for (index, e) in array.chunks(header.entry_size as usize).enumerate() {
            let mut type_guid = [0u8; 16];
            type_guid.copy_from_slice(&e[..16]);
            if type_guid == [0u8; 16] {
                continue;
            }
            let first_lba = u64_at(e, 32);
            let last_lba = u64_at(e, 40);
            if first_lba < header.first_usable
                || last_lba < first_lba
                || last_lba > header.last_usable
            {
                return Err(Error::corrupt(format!(
                    "{what}: GPT partition {} (LBAs {first_lba}..={last_lba}) lies outside the \
                     usable LBAs {}..={}",
                    index + 1,
                    header.first_usable,
                    header.last_usable
                )));
            }
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            entries.push(Entry {
                index,
                type_guid,
                first_lba,
                last_lba,
                name: String::from_utf16_lossy(&units),
            });
        }
        Ok(Gpt {
            header,
            array,
            entries,
        })
    }

    /// Sets an entry's first and last LBA in the array.
    pub(crate) fn set_range(&mut self, index: usize, first_lba: u64, last_lba: u64) {
        let at = index * self.header.entry_size as usize;
        self.array[at + 32..at + 40].copy_from_slice(&first_lba.to_le_bytes());
        self.array[at + 40..at + 48].copy_from_slice(&last_lba.to_le_bytes());
    }

    /// The entry array padded to whole sectors.
    pub(crate) fn array_sectors_bytes(&self) -> Vec<u8> {
        let mut bytes = self.array.clone();
        bytes.resize((self.header.array_sectors() * SECTOR_BYTES) as usize, 0);
        bytes
    }

    /// The CRC32 of the entry array.
    pub(crate) fn array_crc(&self) -> u32 {
        crc32fast::hash(&self.array)
    }
}
