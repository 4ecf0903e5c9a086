//! Growing FAT12, FAT16 and FAT32 to fill an enlarged partition.
//!
//! # Format facts relied on (Microsoft's FAT specification)
//!
//! * Total sectors: the 16-bit field at 0x13 when the count fits and the
//!   volume is not FAT32, else 0 there and the 32-bit field at 0x20.
//!   Sectors per FAT: 0x16 (u16) on FAT12/16, 0x24 (u32) on FAT32.
//! * The FAT type follows from the cluster count alone: below 4085 FAT12,
//!   below 65525 FAT16, else FAT32 (at most 0x0FFFFFF5 - 2 clusters). A
//!   grown volume whose count crosses a threshold would be read as another
//!   type, so that growth is refused.
//! * FAT32: FSInfo at the sector named at 0x30 (signatures 0x41615252 at
//!   0, 0x61417272 at 484, 0xAA550000 at 508; free cluster count at 488,
//!   0xFFFFFFFF when unknown), the backup boot sector at the sector named
//!   at 0x32 (6 by convention) followed by its own copy of FSInfo at the
//!   same distance.
//!
//! # How the FAT grows without copying data
//!
//! When the new cluster count needs more sectors per FAT, `k` sectors are
//! inserted into the overlay after each FAT copy (last copy first, so the
//! earlier positions stay valid): the root directory and the data area
//! slide up by `fats * k` sectors and no byte is copied. The same number
//! of sectors is then deleted from the end of the partition (space past
//! the old filesystem) so the partition and everything after it stay where
//! they are. The new FAT sectors read as zeros: free clusters.

use super::GrowReport;
use crate::disk::{Disk, SECTOR_BYTES};
use crate::error::{Error, Result};
use crate::fs::fat::{self as reader, BootSector};
use crate::fs::volume::{le16, le32, Volume};
use crate::fs::FsKind;
use crate::overlay::Overlay;

/// The first cluster count that is FAT16, and the first that is FAT32.
const FAT16_MIN_CLUSTERS: u64 = 4085;
const FAT32_MIN_CLUSTERS: u64 = 65525;
/// The most clusters FAT32 can number (entries 0x0FFFFFF5 and up are
/// reserved; clusters start at 2).
const FAT32_MAX_CLUSTERS: u64 = 0x0FFF_FFF5 - 2;

const FSINFO_LEAD: u32 = 0x4161_5252;
const FSINFO_STRUCT: u32 = 0x6141_7272;
const FSINFO_TRAIL: u32 = 0xAA55_0000;
const FSINFO_FREE_AT: usize = 488;

/// The layout after growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub total_sectors: u64,
    pub fat_sectors: u64,
    pub clusters: u64,
}

/// The layout of `boot`'s volume grown to `new_sectors` sectors: the FAT
/// as small as can hold every cluster (never smaller than it is), or an
/// error when the type would change or the size does not fit the fields.
pub fn plan(boot: &BootSector, new_sectors: u64) -> Result<Plan> {
    let total = new_sectors.min(u64::from(u32::MAX));
    let (fat_sectors, clusters) = layout(boot, total)?;
    let (range, limit) = match boot.kind {
        FsKind::Fat12 => ("FAT12", FAT16_MIN_CLUSTERS - 1),
        FsKind::Fat16 => ("FAT16", FAT32_MIN_CLUSTERS - 1),
        _ => ("FAT32", FAT32_MAX_CLUSTERS),
    };
    if clusters > limit {
        let max_sectors = max_total_sectors(boot, limit);
        return Err(Error::unsupported(format!(
            "FAT: {new_sectors} sectors would make {clusters} clusters of {} bytes, more than \
             {range} can have ({limit}; the Microsoft FAT specification's thresholds are 4085 \
             and 65525 clusters), and the FAT type is never changed; grow to at most \
             {max_sectors} sectors",
            boot.cluster_bytes()
        )));
    }
    if boot.kind != FsKind::Fat32 && fat_sectors > u64::from(u16::MAX) {
        return Err(Error::unsupported(format!(
            "FAT: {fat_sectors} sectors per FAT do not fit the 16-bit field"
        )));
    }
    Ok(Plan {
        total_sectors: total,
        fat_sectors,
        clusters,
    })
}

/// The smallest FAT (never smaller than the current one) that holds an
/// entry for every cluster of a volume of `total` sectors, and the
/// clusters that leaves.
fn layout(boot: &BootSector, total: u64) -> Result<(u64, u64)> {
    let root_sectors = (boot.root_entries * 32).div_ceil(boot.bytes_per_sector);
    let bits = boot.entry_bits();
    let clusters_with = |fat_sectors: u64| -> Result<u64> {
        let meta = boot.reserved_sectors + boot.fats * fat_sectors + root_sectors;
        if meta >= total {
            return Err(Error::unsupported(format!(
                "FAT: {total} sectors leave no room for data after {meta} sectors of metadata"
            )));
        }
        Ok((total - meta) / boot.sectors_per_cluster)
    };
    let fat_for = |clusters: u64| {
        ((clusters + 2) * bits)
            .div_ceil(8)
            .div_ceil(boot.bytes_per_sector)
    };
    // A larger FAT leaves fewer clusters, so "the FAT holds every entry"
    // holds from some size on: bisect for the smallest such size between
    // the current one and one large enough for the clusters the current
    // size leaves.
    let mut fat_sectors = boot.fat_sectors;
    if fat_for(clusters_with(fat_sectors)?) > fat_sectors {
        let (mut lo, mut hi) = (fat_sectors + 1, fat_for(clusters_with(fat_sectors)?));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fat_for(clusters_with(mid)?) <= mid {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        fat_sectors = hi;
    }
    Ok((fat_sectors, clusters_with(fat_sectors)?))
}

/// The largest volume (in sectors) with at most `limit` clusters, for the
/// error message: bisection keeping a size that is known to fit (the
/// current one to begin with).
fn max_total_sectors(boot: &BootSector, limit: u64) -> u64 {
    let fits = |total: u64| layout(boot, total).is_ok_and(|(_, c)| c <= limit);
    let (mut lo, mut hi) = (boot.total_sectors, u64::from(u32::MAX));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Grows the FAT volume at `part_start` to `new_sectors` sectors as the
/// module doc describes.
pub fn grow(
    overlay: &mut Overlay,
    part_start: u64,
    new_sectors: u64,
    dry_run: bool,
) -> Result<GrowReport> {
    // Everything is read and checked before the first write.
    let mut vol = Volume::new(overlay as &mut dyn Disk, part_start, new_sectors)?;
    let raw = vol.read(0, 512, "FAT boot sector")?;
    let boot = BootSector::parse(&raw)?
        .ok_or_else(|| Error::corrupt("FAT: the boot sector is not a FAT boot sector".into()))?;
    if boot.bytes_per_sector != SECTOR_BYTES {
        return Err(Error::unsupported(format!(
            "FAT: growing a volume of {}-byte sectors on a disk of 512-byte sectors is not \
             supported",
            boot.bytes_per_sector
        )));
    }
    if boot.total_sectors > new_sectors {
        return Err(Error::invalid_argument(format!(
            "FAT: the volume has {} sectors, more than the partition's new {new_sectors}",
            boot.total_sectors
        )));
    }
    // Dirty bits, a clear clean-shutdown bit and FAT copies that differ
    // are refused here.
    let free_bytes: u64 = reader::free_space(&mut vol)?.iter().map(|&(_, n)| n).sum();
    let old_free_clusters = free_bytes / boot.cluster_bytes();
    let plan = plan(&boot, new_sectors)?;
    let fsinfo = if boot.kind == FsKind::Fat32 {
        Some(read_fsinfo(&mut vol, &boot)?)
    } else {
        None
    };
    if plan.clusters < boot.clusters {
        return Err(Error::unsupported(format!(
            "FAT: {new_sectors} sectors would hold {} clusters, fewer than the {} the volume has",
            plan.clusters, boot.clusters
        )));
    }
    let grow_by = plan.fat_sectors - boot.fat_sectors;
    let inserted = boot.fats * grow_by;
    if boot.total_sectors + inserted > new_sectors {
        return Err(Error::internal(format!(
            "FAT: the grown FATs need {inserted} sectors but the partition grew by only {}",
            new_sectors - boot.total_sectors
        )));
    }
    // The tail of the old last FAT sector past the last entry becomes the
    // entries of new clusters: it must read as free.
    let bits = boot.entry_bits();
    let old_end_bit = (boot.clusters + 2) * bits;
    let tail_sector = old_end_bit / 8 / SECTOR_BYTES;
    let tail = if tail_sector < boot.fat_sectors {
        let mut s = vol.read(boot.fat_offset(0) + tail_sector * SECTOR_BYTES, 512, "FAT")?;
        let bit_in_sector = (old_end_bit - tail_sector * SECTOR_BYTES * 8) as usize;
        let byte = bit_in_sector / 8;
        if !bit_in_sector.is_multiple_of(8) {
            s[byte] &= 0x0F;
        }
        let first_whole = bit_in_sector.div_ceil(8);
        s[first_whole..].fill(0);
        Some(s)
    } else {
        None
    };
    let new_free_clusters = old_free_clusters + (plan.clusters - boot.clusters);
    let report = GrowReport {
        filesystem: boot.kind,
        old_sectors: boot.total_sectors,
        new_sectors: plan.total_sectors,
        cluster_bytes: boot.cluster_bytes(),
        old_clusters: boot.clusters,
        new_clusters: plan.clusters,
        inserted_sectors: inserted,
        old_free_bytes: free_bytes,
        new_free_bytes: new_free_clusters * boot.cluster_bytes(),
    };
    drop(vol);
    if dry_run {
        return Ok(report);
    }

    // Writes from here on.
    if grow_by > 0 {
        for copy in (0..boot.fats).rev() {
            let after = part_start + boot.reserved_sectors + (copy + 1) * boot.fat_sectors;
            overlay.insert(after, grow_by)?;
        }
        overlay.delete(part_start + new_sectors, inserted)?;
    }
    let mut new_boot = boot.raw.clone();
    if boot.kind != FsKind::Fat32 && plan.total_sectors <= u64::from(u16::MAX) {
        new_boot[0x13..0x15].copy_from_slice(&(plan.total_sectors as u16).to_le_bytes());
        new_boot[0x20..0x24].fill(0);
    } else {
        new_boot[0x13..0x15].fill(0);
        new_boot[0x20..0x24].copy_from_slice(&(plan.total_sectors as u32).to_le_bytes());
    }
    if boot.kind == FsKind::Fat32 {
        new_boot[0x24..0x28].copy_from_slice(&(plan.fat_sectors as u32).to_le_bytes());
    } else {
        new_boot[0x16..0x18].copy_from_slice(&(plan.fat_sectors as u16).to_le_bytes());
    }
    if let Some(sector) = &tail {
        for copy in 0..boot.fats {
            let lba = part_start + boot.reserved_sectors + copy * plan.fat_sectors + tail_sector;
            overlay.write(lba, sector)?;
        }
    }
    overlay.write(part_start, &new_boot)?;
    if let Some(info) = fsinfo {
        for &(lba, ref bytes) in &info.sectors {
            let mut bytes = bytes.clone();
            bytes[FSINFO_FREE_AT..FSINFO_FREE_AT + 4]
                .copy_from_slice(&(new_free_clusters as u32).to_le_bytes());
            overlay.write(part_start + lba, &bytes)?;
        }
        if let Some(backup) = info.backup_boot {
            overlay.write(part_start + backup, &new_boot)?;
        }
    }
    Ok(report)
}

/// FAT32's FSInfo sectors (the primary and the backup's copy) as read,
/// and where the backup boot sector is.
struct FsInfo {
    /// (sector in the volume, bytes).
    sectors: Vec<(u64, Vec<u8>)>,
    backup_boot: Option<u64>,
}

fn read_fsinfo(vol: &mut Volume, boot: &BootSector) -> Result<FsInfo> {
    let info_sector = u64::from(le16(&boot.raw, 0x30));
    let backup = u64::from(le16(&boot.raw, 0x32));
    let reserved = boot.reserved_sectors;
    let backup_boot = (backup != 0 && backup != 0xFFFF).then_some(backup);
    if let Some(b) = backup_boot {
        if b >= reserved {
            return Err(Error::corrupt(format!(
                "FAT32: the backup boot sector {b} lies outside the {reserved} reserved sectors"
            )));
        }
    }
    let mut sectors = Vec::new();
    if info_sector == 0 || info_sector == 0xFFFF {
        return Ok(FsInfo {
            sectors,
            backup_boot,
        });
    }
    let mut candidates = vec![info_sector];
    if let Some(b) = backup_boot {
        candidates.push(b + info_sector);
    }
    for (i, lba) in candidates.into_iter().enumerate() {
        if lba >= reserved {
            return Err(Error::corrupt(format!(
                "FAT32: the FSInfo sector {lba} lies outside the {reserved} reserved sectors"
            )));
        }
        let bytes = vol.read(lba * SECTOR_BYTES, 512, "FAT32 FSInfo")?;
        let valid = le32(&bytes, 0) == FSINFO_LEAD
            && le32(&bytes, 484) == FSINFO_STRUCT
            && le32(&bytes, 508) == FSINFO_TRAIL;
        if !valid {
            if i == 0 {
                return Err(Error::corrupt(format!(
                    "FAT32: sector {lba} named as FSInfo lacks its signatures (run fsck.fat)"
                )));
            }
            // A backup area without an FSInfo copy is left alone.
            continue;
        }
        sectors.push((lba, bytes));
    }
    Ok(FsInfo {
        sectors,
        backup_boot,
    })
}
