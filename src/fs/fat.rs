//! FAT12, FAT16 and FAT32: the boot sector and the allocation table.
//!
//! # Format facts relied on (Microsoft's FAT specification)
//!
//! * The boot sector (sector 0 of the volume) starts with a jump (0xEB xx
//!   or 0xE9 xx xx) and ends with 0x55 0xAA at 510. BPB fields
//!   (little-endian): bytes per sector (0x0B: 512, 1024, 2048 or 4096),
//!   sectors per cluster (0x0D: a power of two), reserved sectors (0x0E,
//!   at least 1), number of FATs (0x10), root directory entries (0x11;
//!   0 on FAT32), total sectors (0x13, or 0x20 when that is 0), sectors per
//!   FAT (0x16, or 0x24 on FAT32 when that is 0).
//! * The root directory takes `entries * 32` bytes rounded up to sectors
//!   after the FATs; the data area follows, cluster 2 first.
//! * The type is decided by the cluster count alone: fewer than 4085 is
//!   FAT12, fewer than 65525 FAT16, else FAT32.
//! * FAT entries: 12 bits (entry `n` at byte `n * 3 / 2`, the low 12 bits
//!   of the little-endian u16 there for even `n`, the high 12 for odd),
//!   16 bits, or 32 bits of which the low 28 count. Entry 0 is free.
//! * Entry 1 of FAT16/FAT32 carries the clean-shutdown bit (0x8000, or
//!   0x08000000): clear means the volume was not unmounted cleanly.
//!   Linux's dirty bit is bit 0 of byte 0x25 (FAT12/16) or 0x41 (FAT32).

use super::volume::{le16, le32, Volume};
use super::FsKind;
use crate::error::{Error, Result};

/// The boot sector's fields, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSector {
    /// The sector as read (a grower rewrites from it).
    pub raw: Vec<u8>,
    pub bytes_per_sector: u64,
    pub sectors_per_cluster: u64,
    pub reserved_sectors: u64,
    pub fats: u64,
    pub root_entries: u64,
    pub total_sectors: u64,
    pub fat_sectors: u64,
    pub kind: FsKind,
    /// Clusters in the data area (numbered 2..clusters+2).
    pub clusters: u64,
}

impl BootSector {
    /// Parses a boot sector (at least 512 bytes): `None` when it does not
    /// look like one at all, an error when it does but is inconsistent.
    pub fn parse(raw: &[u8]) -> Result<Option<BootSector>> {
        if raw.len() < 512 || raw[510] != 0x55 || raw[511] != 0xAA {
            return Ok(None);
        }
        if raw[0] != 0xEB && raw[0] != 0xE9 {
            return Ok(None);
        }
        let bytes_per_sector = u64::from(le16(raw, 0x0B));
        let sectors_per_cluster = u64::from(raw[0x0D]);
        let reserved_sectors = u64::from(le16(raw, 0x0E));
        let fats = u64::from(raw[0x10]);
        let root_entries = u64::from(le16(raw, 0x11));
        let total16 = u64::from(le16(raw, 0x13));
        let fat16 = u64::from(le16(raw, 0x16));
        let total_sectors = if total16 != 0 {
            total16
        } else {
            u64::from(le32(raw, 0x20))
        };
        let fat_sectors = if fat16 != 0 {
            fat16
        } else {
            u64::from(le32(raw, 0x24))
        };
        // An NTFS or exFAT boot sector has the jump and signature too but
        // names itself at byte 3 and has no FAT.
        if &raw[3..11] == b"NTFS    " || &raw[3..11] == b"EXFAT   " {
            return Ok(None);
        }
        if ![512, 1024, 2048, 4096].contains(&bytes_per_sector)
            || sectors_per_cluster == 0
            || !sectors_per_cluster.is_power_of_two()
            || reserved_sectors == 0
            || fats == 0
            || fat_sectors == 0
            || total_sectors == 0
        {
            // Not a BPB this code recognises (it may be an MBR or a boot
            // loader): not FAT.
            return Ok(None);
        }
        let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
        let data_start = reserved_sectors + fats * fat_sectors + root_sectors;
        if data_start >= total_sectors {
            return Err(Error::corrupt(format!(
                "FAT: the data area starts at sector {data_start}, past the {total_sectors} \
                 sectors of the volume"
            )));
        }
        let clusters = (total_sectors - data_start) / sectors_per_cluster;
        let kind = if clusters < 4085 {
            FsKind::Fat12
        } else if clusters < 65525 {
            FsKind::Fat16
        } else {
            FsKind::Fat32
        };
        let boot = BootSector {
            raw: raw[..512].to_vec(),
            bytes_per_sector,
            sectors_per_cluster,
            reserved_sectors,
            fats,
            root_entries,
            total_sectors,
            fat_sectors,
            kind,
            clusters,
        };
        if kind == FsKind::Fat32 && (fat16 != 0 || root_entries != 0) {
            return Err(Error::corrupt(format!(
                "FAT: {clusters} clusters make FAT32, but the boot sector has FAT16 fields \
                 (sectors per FAT {fat16}, root entries {root_entries})"
            )));
        }
        let entry_bits = boot.entry_bits();
        let needed = ((clusters + 2) * entry_bits).div_ceil(8);
        if fat_sectors * bytes_per_sector < needed {
            return Err(Error::corrupt(format!(
                "FAT: {fat_sectors} sectors per FAT cannot hold {} entries",
                clusters + 2
            )));
        }
        Ok(Some(boot))
    }

    /// Bits per FAT entry.
    pub fn entry_bits(&self) -> u64 {
        match self.kind {
            FsKind::Fat12 => 12,
            FsKind::Fat16 => 16,
            _ => 32,
        }
    }

    /// Byte offset of FAT copy `i` in the volume.
    pub fn fat_offset(&self, i: u64) -> u64 {
        (self.reserved_sectors + i * self.fat_sectors) * self.bytes_per_sector
    }

    /// Byte offset of cluster 2, the first of the data area.
    pub fn data_offset(&self) -> u64 {
        let root_sectors = (self.root_entries * 32).div_ceil(self.bytes_per_sector);
        (self.reserved_sectors + self.fats * self.fat_sectors + root_sectors)
            * self.bytes_per_sector
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * self.bytes_per_sector
    }

    /// True when the Linux dirty bit in the extended BPB is set.
    fn dirty_flag(&self) -> bool {
        let at = if self.kind == FsKind::Fat32 {
            0x41
        } else {
            0x25
        };
        let signature_at = if self.kind == FsKind::Fat32 {
            0x42
        } else {
            0x26
        };
        // Only an extended BPB (signature 0x28 or 0x29) has the field.
        matches!(self.raw[signature_at], 0x28 | 0x29) && self.raw[at] & 1 != 0
    }
}

/// The FAT flavour on `vol`, if sector 0 is a FAT boot sector.
pub fn probe(vol: &mut Volume) -> Result<Option<FsKind>> {
    if vol.bytes() < 512 {
        return Ok(None);
    }
    let raw = vol.read(0, 512, "FAT boot sector")?;
    Ok(match BootSector::parse(&raw) {
        Ok(Some(boot)) => Some(boot.kind),
        Ok(None) => None,
        // A FAT-like sector whose numbers do not add up: kept whole.
        Err(_) => Some(FsKind::Fat16),
    })
}

/// Bytes of FAT read at once (a multiple of 3 and 4, so FAT12 entry pairs
/// and FAT16/32 entries never straddle a chunk).
const CHUNK: u64 = 3 << 18;

/// The free byte runs of the FAT volume on `vol`: the data clusters whose
/// entry is 0. The reserved area, the FATs and the root directory are
/// used. Every FAT copy must match the first.
pub fn free_space(vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
    let raw = vol.read(0, 512, "FAT boot sector")?;
    let boot = BootSector::parse(&raw)?
        .ok_or_else(|| Error::corrupt("FAT: the boot sector is not a FAT boot sector".into()))?;
    if boot.total_sectors * boot.bytes_per_sector > vol.bytes() {
        return Err(Error::corrupt(format!(
            "FAT: {} sectors of {} bytes do not fit the partition of {} bytes",
            boot.total_sectors,
            boot.bytes_per_sector,
            vol.bytes()
        )));
    }
    if boot.dirty_flag() {
        return Err(Error::unsupported(
            "the volume is marked dirty (not cleanly unmounted; run fsck.fat)".into(),
        ));
    }
    let bits = boot.entry_bits();
    let fat_bytes = ((boot.clusters + 2) * bits).div_ceil(8);
    let data = boot.data_offset();
    let cluster = boot.cluster_bytes();
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut chunk_start = 0;
    while chunk_start < fat_bytes {
        let len = (fat_bytes - chunk_start).min(CHUNK);
        let first = vol.read(boot.fat_offset(0) + chunk_start, len, "FAT")?;
        for copy in 1..boot.fats {
            let other = vol.read(boot.fat_offset(copy) + chunk_start, len, "FAT copy")?;
            if other != first {
                return Err(Error::corrupt(format!(
                    "FAT copy {} differs from the first FAT (run fsck.fat)",
                    copy + 1
                )));
            }
        }
        let entries_before = chunk_start * 8 / bits;
        let entries_here = (len * 8 / bits).min(boot.clusters + 2 - entries_before);
        for i in 0..entries_here {
            let n = entries_before + i;
            let value = entry(&first, bits, i);
            if n == 1 && !clean_bit(bits, value) {
                return Err(Error::unsupported(
                    "the FAT's clean-shutdown bit is clear (not cleanly unmounted; run \
                     fsck.fat)"
                        .into(),
                ));
            }
            if n >= 2 && value == 0 {
                let offset = data + (n - 2) * cluster;
                match free.last_mut() {
                    Some((s, l)) if *s + *l == offset => *l += cluster,
                    _ => free.push((offset, cluster)),
                }
            }
        }
        chunk_start += len;
    }
    Ok(free)
}

/// Entry `i` of a chunk of FAT that starts at an entry boundary.
fn entry(chunk: &[u8], bits: u64, i: u64) -> u32 {
    match bits {
        12 => {
            let at = (i * 3 / 2) as usize;
            let pair = u16::from(chunk[at]) | (u16::from(*chunk.get(at + 1).unwrap_or(&0)) << 8);
            u32::from(if i.is_multiple_of(2) {
                pair & 0xFFF
            } else {
                pair >> 4
            })
        }
        16 => u32::from(le16(chunk, (i * 2) as usize)),
        _ => le32(chunk, (i * 4) as usize) & 0x0FFF_FFFF,
    }
}

/// FAT16/32's clean-shutdown bit in entry 1 (FAT12 has none).
fn clean_bit(bits: u64, value: u32) -> bool {
    match bits {
        16 => value & 0x8000 != 0,
        32 => value & 0x0800_0000 != 0,
        _ => true,
    }
}
