//! MBR partition tables: the four primary entries, and the chain of
//! extended boot records (EBRs) that holds logical partitions.
//!
//! # Format facts relied on
//!
//! * Sector 0 ends with the bytes `55 AA` (offsets 510, 511). Its four
//!   16-byte entries start at byte 446.
//! * An entry: boot flag (byte 0), CHS of the first sector (bytes 1..4),
//!   type (byte 4; 0 = empty), CHS of the last sector (bytes 5..8), first
//!   sector as an LBA (bytes 8..12, u32 LE) and length in sectors (bytes
//!   12..16, u32 LE).
//! * CHS bytes: head; sector (bits 0..5) with the cylinder's bits 8..9 in
//!   bits 6..7; the cylinder's low 8 bits. Positions past cylinder 1023 are
//!   written as the largest value, `FE FF FF` (1023/254/63).
//! * Types 0x05, 0x0F and 0x85 are extended partitions: a container for
//!   logical partitions. Its first sector is an EBR, laid out like sector 0.
//!   An EBR's first entry is a logical partition whose start is relative to
//!   that EBR; its second entry, when not empty, points to the next EBR,
//!   with a start relative to the start of the extended partition and a
//!   length that runs to the end of the next logical partition.
//! * Type 0xEE in sector 0 marks a protective MBR: the disk holds a GPT.
//! * Linux numbers primaries 1..4 by slot and logical partitions 5, 6, ...
//!   in chain order (as `sfdisk` shows them).

use crate::disk::{Disk, SECTOR_SIZE};
use crate::error::{Error, Result};

/// First byte of the partition entries in an MBR or EBR.
pub(crate) const ENTRIES_AT: usize = 446;
/// Bytes per entry.
pub(crate) const ENTRY_SIZE: usize = 16;
/// The protective MBR's partition type.
pub const TYPE_PROTECTIVE: u8 = 0xEE;
/// Longest EBR chain followed (a loop or damage ends in an error).
const MAX_LOGICAL: usize = 1024;

/// Heads per cylinder and sectors per track of the usual LBA-assist
/// geometry, used for CHS fields (and the cylinder alignment option).
pub(crate) const HEADS: u64 = 255;
pub(crate) const SECTORS_PER_TRACK: u64 = 63;

/// True for the extended-partition types.
pub(crate) fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// One 16-byte entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub boot: u8,
    pub kind: u8,
    /// First sector, relative as the table's kind says.
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    fn parse(sector: &[u8], slot: usize) -> Entry {
        let e = &sector[ENTRIES_AT + ENTRY_SIZE * slot..][..ENTRY_SIZE];
        Entry {
            boot: e[0],
            kind: e[4],
            start: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    }

    /// True when the slot holds nothing.
    pub fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }
}

/// Writes an entry into a table sector: start and length, and CHS fields
/// computed from the absolute first sector `absolute_start`.
pub fn write_entry(sector: &mut [u8], slot: usize, entry: &Entry, absolute_start: u64) {
    let e = &mut sector[ENTRIES_AT + ENTRY_SIZE * slot..][..ENTRY_SIZE];
    e[0] = entry.boot;
    e[4] = entry.kind;
    e[8..12].copy_from_slice(&entry.start.to_le_bytes());
    e[12..16].copy_from_slice(&entry.sectors.to_le_bytes());
    if entry.is_empty() {
        e[1..4].fill(0);
        e[5..8].fill(0);
    } else {
        e[1..4].copy_from_slice(&chs(absolute_start));
        e[5..8].copy_from_slice(&chs(absolute_start + u64::from(entry.sectors) - 1));
    }
}

/// The CHS bytes of an LBA in the 255-head, 63-sector geometry.
pub(crate) fn chs(lba: u64) -> [u8; 3] {
    let cylinder = lba / (HEADS * SECTORS_PER_TRACK);
    if cylinder > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let head = (lba / SECTORS_PER_TRACK) % HEADS;
    let sector = lba % SECTORS_PER_TRACK + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 8) as u8) << 6),
        cylinder as u8,
    ]
}

/// True when the sector ends with the boot signature.
pub(crate) fn has_signature(sector: &[u8]) -> bool {
    sector.len() >= SECTOR_SIZE && sector[510] == 0x55 && sector[511] == 0xAA
}

/// A logical partition and the EBR that describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logical {
    /// Absolute LBA of the EBR.
    pub ebr: u64,
    /// The EBR's first entry (start relative to `ebr`).
    pub entry: Entry,
    /// The EBR's second entry, pointing to the next EBR (start relative to
    /// the extended partition), or empty.
    pub link: Entry,
}

impl Logical {
    /// Absolute first sector of the logical partition.
    pub fn start(&self) -> u64 {
        self.ebr + u64::from(self.entry.start)
    }
}

/// A parsed MBR: the four primary slots and the logical partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mbr {
    pub primary: [Entry; 4],
    /// Slot of the extended partition, if any.
    pub extended: Option<usize>,
    pub logical: Vec<Logical>,
}

impl Mbr {
    /// Parses sector 0 (which must carry the boot signature and no
    /// protective entry) and the EBR chain, checking every partition lies
    /// inside a disk of `disk_sectors` sectors. `what` names the image.
    pub(crate) fn read(disk: &mut dyn Disk, what: &str) -> Result<Mbr> {
        let disk_sectors = disk.sector_count();
        let mut sector = vec![0u8; SECTOR_SIZE];
        disk.read_sectors(0, &mut sector)?;
        if !has_signature(&sector) {
            return Err(Error::corrupt(format!(
                "{what}: sector 0 has no MBR boot signature (55 AA)"
            )));
        }
        let primary = [0, 1, 2, 3].map(|slot| Entry::parse(&sector, slot));
        let mut extended = None;
        for (slot, e) in primary.iter().enumerate() {
            if e.is_empty() {
                continue;
            }
            check_inside(
                what,
                &format!("partition {}", slot + 1),
                u64::from(e.start),
                u64::from(e.sectors),
                disk_sectors,
            )?;
            if is_extended(e.kind) {
                if extended.is_some() {
                    return Err(Error::unsupported(format!(
                        "{what}: more than one extended partition in the MBR"
                    )));
                }
                extended = Some(slot);
            }
        }
        let mut mbr = Mbr {
            primary,
            extended,
            logical: Vec::new(),
        };
        if let Some(slot) = extended {
            mbr.read_chain(disk, what, &primary[slot])?;
        }
        Ok(mbr)
    }

    fn read_chain(&mut self, disk: &mut dyn Disk, what: &str, ext: &Entry) -> Result<()> {
        let ext_start = u64::from(ext.start);
        let ext_end = ext_start + u64::from(ext.sectors);
        let mut ebr = ext_start;
        let mut sector = vec![0u8; SECTOR_SIZE];
        loop {
            if self.logical.len() >= MAX_LOGICAL {
                return Err(Error::corrupt(format!(
                    "{what}: the chain of extended boot records is longer than \
                     {MAX_LOGICAL} (a loop?)"
                )));
            }
            disk.read_sectors(ebr, &mut sector)?;
            if !has_signature(&sector) {
                return Err(Error::corrupt(format!(
                    "{what}: the extended boot record at sector {ebr} has no boot signature"
                )));
            }
            let entry = Entry::parse(&sector, 0);
            let link = Entry::parse(&sector, 1);
            let number = 5 + self.logical.len();
            if !entry.is_empty() {
                let start = ebr + u64::from(entry.start);
                if entry.start == 0 || start + u64::from(entry.sectors) > ext_end {
                    return Err(Error::corrupt(format!(
                        "{what}: logical partition {number} (sectors {start}..+{}) does not \
                         lie inside its extended partition (sectors {ext_start}..{ext_end})",
                        entry.sectors
                    )));
                }
            }
            self.logical.push(Logical { ebr, entry, link });
            if link.is_empty() {
                return Ok(());
            }
            let next = ext_start + u64::from(link.start);
            if next <= ebr || next >= ext_end {
                return Err(Error::corrupt(format!(
                    "{what}: the extended boot record at sector {ebr} links to sector {next}, \
                     not further inside the extended partition (sectors {ext_start}..{ext_end})"
                )));
            }
            ebr = next;
        }
    }
}

/// Checks a partition lies inside the disk, naming it in the error.
pub(crate) fn check_inside(what: &str, name: &str, start: u64, len: u64, disk: u64) -> Result<()> {
    let end = start + len;
    if start == 0 || end > disk {
        return Err(Error::corrupt(format!(
            "{what}: {name} (sectors {start}..{end}) does not lie inside the disk of {disk} \
             sectors (a truncated image?)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_of_known_positions() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        // 1023 * 16065 is the first sector of cylinder 1023.
        assert_eq!(chs(1023 * 16065), [0, 0xC1, 0xFF]);
        assert_eq!(chs(1024 * 16065), [0xFE, 0xFF, 0xFF]);
    }
}
