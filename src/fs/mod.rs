//! Filesystems inside a disk's partitions: which blocks they use.
//!
//! [`analyze`] walks the partition table (MBR with its logical partitions,
//! or GPT; a disk without a table is probed as one filesystem), recognises
//! the filesystem of each partition and reads its own free-space map:
//! ext2/3/4 block bitmaps ([`ext`]), the FAT of FAT12/16/32 ([`fat`]),
//! NTFS's `$Bitmap` ([`ntfs`]) and Linux swap ([`swap`]). The space after the last partition is free too,
//! except the GPT backup structures; the gap before the first partition is
//! kept (boot loaders live there). [`FilesystemView`] ([`view`]) is a disk
//! that reads the free sectors as unallocated zeros, so a clone through it
//! leaves them out.
//!
//! The rule throughout: anything not fully understood - an unknown type, a
//! feature this code does not know, a journal that needs recovery, a
//! checksum or count that does not add up - keeps the whole partition as
//! used, and the report says why. A wrong "free" loses files; a wrong
//! "used" only costs space.
//!
//! The readers ([`volume::Volume`], the ext superblock and descriptors, the
//! FAT boot sector) are public so that a filesystem grower can reuse them.

pub mod ext;
pub mod fat;
pub mod grow;
pub mod ntfs;
pub mod swap;
pub mod view;
pub mod volume;

pub use crate::numbers::FsKind;
pub use grow::{grow_filesystem, grow_filesystem_with, GrowOptions, GrowReport};
pub use view::FilesystemView;

use crate::disk::{Disk, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::Result;
use crate::partition::{self, Table};
use volume::Volume;

/// What one region of the disk (a partition, or the space after the last
/// one) holds, and how much of it is free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionReport {
    /// The partition's number (as Linux numbers them); 0 for the space
    /// after the last partition and for a disk without a partition table.
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
    pub filesystem: FsKind,
    /// Sectors left in the clone.
    pub used_sectors: u64,
    /// Sectors the view reads as unallocated.
    pub free_sectors: u64,
    /// Why the region is kept whole although it might hold free space (an
    /// unknown or refused filesystem), or `None`.
    pub reason: Option<String>,
}

/// What [`analyze`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// "mbr", "gpt", or `None` for a disk without a partition table.
    pub table: Option<&'static str>,
    /// Why the partition table was not used, when it could not be read.
    pub table_reason: Option<String>,
    pub disk_sectors: u64,
    /// The regions, partitions in number order, then the space after the
    /// last partition.
    pub regions: Vec<RegionReport>,
    /// Sectors the view reads as unallocated, over the whole disk.
    pub free_sectors: u64,
}

/// Options of [`analyze`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AnalyzeOptions {
    /// Keep the space after the last partition (it is free by default).
    pub keep_unpartitioned: bool,
}

/// The free sectors of a disk as sorted, disjoint, non-adjacent runs
/// `(first sector, count)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FreeMap {
    runs: Vec<(u64, u64)>,
}

impl FreeMap {
    /// Builds the map from runs in any order (overlaps are merged).
    pub fn from_runs(mut runs: Vec<(u64, u64)>) -> FreeMap {
        runs.retain(|&(_, n)| n > 0);
        runs.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (start, n) in runs {
            match out.last_mut() {
                Some((s, len)) if start <= *s + *len => *len = (*len).max(start + n - *s),
                _ => out.push((start, n)),
            }
        }
        FreeMap { runs: out }
    }

    /// The runs, sorted.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Total free sectors.
    pub fn sectors(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n).sum()
    }

    /// The map without the sectors of `keep` (each `(first, count)`).
    fn without(&self, keep: &[(u64, u64)]) -> FreeMap {
        let mut runs = self.runs.clone();
        for &(k, kn) in keep {
            let kend = k + kn;
            let mut next = Vec::with_capacity(runs.len() + 1);
            for (s, n) in runs {
                let end = s + n;
                if kend <= s || k >= end {
                    next.push((s, n));
                    continue;
                }
                if s < k {
                    next.push((s, k - s));
                }
                if kend < end {
                    next.push((kend, end - kend));
                }
            }
            runs = next;
        }
        FreeMap { runs }
    }

    /// Free sectors among `[start, start + count)`.
    pub fn sectors_in(&self, start: u64, count: u64) -> u64 {
        let end = start + count;
        let first = self.runs.partition_point(|&(s, n)| s + n <= start);
        self.runs[first..]
            .iter()
            .take_while(|&&(s, _)| s < end)
            .map(|&(s, n)| (s + n).min(end) - s.max(start))
            .sum()
    }

    /// Whether sector `lba` is free, and how many sectors from it (up to
    /// `limit`) share that answer.
    pub fn run_at(&self, lba: u64, limit: u64) -> (bool, u64) {
        // The first run that ends after `lba`.
        let i = self.runs.partition_point(|&(s, n)| s + n <= lba);
        match self.runs.get(i) {
            Some(&(s, n)) if s <= lba => (true, (s + n - lba).min(limit)),
            Some(&(s, _)) => (false, (s - lba).min(limit)),
            None => (false, limit),
        }
    }
}

/// The partition report, the free map, and what the view needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub report: Report,
    pub free: FreeMap,
}

/// What a filesystem reader found: the filesystem and its free byte runs
/// `(offset, length)` inside the volume, or why it is kept whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub kind: FsKind,
    /// Free byte runs relative to the volume's start, whole sectors.
    pub free: Vec<(u64, u64)>,
}

/// Recognises the filesystem on a volume by its signatures: `None` when
/// none is known.
pub fn probe(vol: &mut Volume) -> Result<Option<FsKind>> {
    if let Some(kind) = ext::probe(vol)? {
        return Ok(Some(kind));
    }
    if ntfs::probe(vol)? {
        return Ok(Some(FsKind::Ntfs));
    }
    if let Some(kind) = fat::probe(vol)? {
        return Ok(Some(kind));
    }
    if swap::probe(vol)? {
        return Ok(Some(FsKind::Swap));
    }
    Ok(None)
}

/// Reads the free space of the filesystem on `vol`. The outer error is the
/// reason the volume is kept whole; the kind found (if any) comes with it.
fn read_usage(vol: &mut Volume) -> std::result::Result<Usage, (FsKind, String)> {
    let kind = match probe(vol) {
        Ok(Some(kind)) => kind,
        Ok(None) => return Err((FsKind::Unknown, "no filesystem this library reads".into())),
        Err(e) => return Err((FsKind::Unknown, e.to_string())),
    };
    let free = match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext::free_space(vol),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => fat::free_space(vol),
        FsKind::Swap => swap::free_space(vol),
        FsKind::Ntfs => ntfs::free_space(vol),
        _ => return Err((kind, "not read by this library".into())),
    };
    match free {
        Ok(free) => Ok(Usage { kind, free }),
        Err(e) => Err((kind, e.to_string())),
    }
}

/// Analyses one region: its report and its free sector runs (absolute).
fn analyze_region(
    disk: &mut dyn Disk,
    number: u32,
    start: u64,
    sectors: u64,
    free_out: &mut Vec<(u64, u64)>,
) -> RegionReport {
    let mut report = RegionReport {
        number,
        start,
        sectors,
        filesystem: FsKind::Unknown,
        used_sectors: sectors,
        free_sectors: 0,
        reason: None,
    };
    let usage = match Volume::new(disk, start, sectors) {
        Ok(mut vol) => read_usage(&mut vol),
        Err(e) => Err((FsKind::Unknown, e.to_string())),
    };
    match usage {
        Ok(usage) => {
            report.filesystem = usage.kind;
            let mut runs = Vec::with_capacity(usage.free.len());
            for (offset, len) in usage.free {
                // Whole sectors inside the volume only; the readers
                // promise this, the check keeps a mistake from freeing a
                // neighbour's sectors.
                let first = offset.div_ceil(SECTOR_BYTES);
                let end = ((offset + len) / SECTOR_BYTES).min(sectors);
                if end > first {
                    runs.push((start + first, end - first));
                }
            }
            let map = FreeMap::from_runs(runs);
            report.free_sectors = map.sectors();
            report.used_sectors = sectors - report.free_sectors;
            free_out.extend_from_slice(map.runs());
        }
        Err((kind, reason)) => {
            report.filesystem = kind;
            report.reason = Some(reason);
        }
    }
    report
}

/// The whole disk analysed as one filesystem (region number 0).
fn whole_disk(disk: &mut dyn Disk, mut report: Report) -> Analysis {
    let mut free = Vec::new();
    let region = analyze_region(disk, 0, 0, report.disk_sectors, &mut free);
    report.regions.push(region);
    // Sector 0 stays whatever the filesystem says: it is the boot sector.
    let free = FreeMap::from_runs(free).without(&[(0, 1)]);
    report.free_sectors = free.sectors();
    report.regions[0].free_sectors = report.free_sectors;
    report.regions[0].used_sectors = report.disk_sectors - report.free_sectors;
    Analysis { report, free }
}

/// True when sector 0 is a FAT or NTFS boot sector whose fields check
/// out and whose volume fits the disk.
fn whole_disk_boot_sector(disk: &mut dyn Disk) -> Result<bool> {
    let mut sector = vec![0u8; SECTOR_SIZE];
    disk.read_sectors(0, &mut sector)?;
    let sectors = disk.sector_count();
    let fat = matches!(fat::BootSector::parse(&sector), Ok(Some(b))
        if b.total_sectors * b.bytes_per_sector <= sectors * SECTOR_BYTES);
    let ntfs = matches!(ntfs::BootSector::parse(&sector), Ok(Some(b))
        if b.total_sectors * b.bytes_per_sector <= sectors * SECTOR_BYTES);
    Ok(fat || ntfs)
}

/// Walks the disk's partitions and reads each one's free space (see the
/// module documentation). Only I/O errors of the disk itself while reading
/// sector 0 fail; everything else is reported per region.
pub fn analyze(disk: &mut dyn Disk, options: &AnalyzeOptions) -> Result<Analysis> {
    let disk_sectors = disk.sector_count();
    let mut report = Report {
        disk_sectors,
        ..Report::default()
    };
    let mut free = Vec::new();
    if disk_sectors == 0 {
        return Ok(Analysis {
            report,
            free: FreeMap::default(),
        });
    }
    let table = match partition::read_table(disk, "disk") {
        Ok(table) => table,
        Err(e) => {
            // A FAT or NTFS volume filling the whole disk (a "superfloppy")
            // has the boot signature an MBR has, and its boot code does not
            // parse as partition entries. Only a boot sector that checks
            // out as one of them is read as such; anything else frees
            // nothing.
            if whole_disk_boot_sector(disk)? {
                return Ok(whole_disk(disk, report));
            }
            report.table_reason = Some(format!("the partition table was not read: {e}"));
            report.regions.push(RegionReport {
                number: 0,
                start: 0,
                sectors: disk_sectors,
                filesystem: FsKind::Unknown,
                used_sectors: disk_sectors,
                free_sectors: 0,
                reason: report.table_reason.clone(),
            });
            return Ok(Analysis {
                report,
                free: FreeMap::default(),
            });
        }
    };
    let Some(table) = table else {
        // No table: the whole disk may be one filesystem.
        return Ok(whole_disk(disk, report));
    };
    let partitions = table.partitions();
    if partitions.is_empty() && whole_disk_boot_sector(disk)? {
        // A FAT or NTFS superfloppy whose boot code reads as an empty MBR.
        return Ok(whole_disk(disk, report));
    }
    report.table = Some(table.kind());
    // Sectors no filesystem may free: sector 0, the GPT's structures, the
    // extended boot records.
    let mut pinned: Vec<(u64, u64)> = vec![(0, 1)];
    let mut table_end = 1;
    let mut usable_end = disk_sectors;
    match &table {
        Table::Gpt(g) => {
            let h = &g.header;
            pinned.push((1, 1));
            pinned.push((h.entries_lba, h.array_sectors()));
            table_end = h.entries_lba + h.array_sectors();
            // The backup entry array and header follow the last usable LBA.
            usable_end = (h.last_usable + 1).min(disk_sectors);
            pinned.push((usable_end, disk_sectors - usable_end));
        }
        Table::Mbr(m) => {
            for logical in &m.logical {
                pinned.push((logical.ebr, 1));
            }
        }
    }
    let data: Vec<&partition::Partition> = partitions.iter().filter(|p| !p.container).collect();
    let overlap = data.iter().enumerate().find_map(|(i, a)| {
        data[i + 1..]
            .iter()
            .find(|b| a.start < b.end() && b.start < a.end())
            .map(|b| (a.number, b.number))
    });
    if let Some((a, b)) = overlap {
        let reason = format!("partitions {a} and {b} overlap: nothing is freed");
        for p in &data {
            report.regions.push(RegionReport {
                number: p.number,
                start: p.start,
                sectors: p.sectors,
                filesystem: FsKind::Unknown,
                used_sectors: p.sectors,
                free_sectors: 0,
                reason: Some(reason.clone()),
            });
        }
        return Ok(Analysis {
            report,
            free: FreeMap::default(),
        });
    }
    for p in &data {
        let region = analyze_region(disk, p.number, p.start, p.sectors, &mut free);
        report.regions.push(region);
    }
    if !partitions.is_empty() {
        let last_end = partitions
            .iter()
            .map(|p| p.end())
            .max()
            .unwrap_or(0)
            .max(table_end);
        if last_end < usable_end {
            let sectors = usable_end - last_end;
            let (free_sectors, reason) = if options.keep_unpartitioned {
                (0, Some("kept on request".to_string()))
            } else {
                free.push((last_end, sectors));
                (sectors, None)
            };
            report.regions.push(RegionReport {
                number: 0,
                start: last_end,
                sectors,
                filesystem: FsKind::Unpartitioned,
                used_sectors: sectors - free_sectors,
                free_sectors,
                reason,
            });
        }
    }
    let free = FreeMap::from_runs(free).without(&pinned);
    report.free_sectors = free.sectors();
    for region in &mut report.regions {
        region.free_sectors = free.sectors_in(region.start, region.sectors);
        region.used_sectors = region.sectors - region.free_sectors;
    }
    Ok(Analysis { report, free })
}

/// The sector size the readers assume of the disk.
const _: () = assert!(SECTOR_SIZE == 512);

impl FsKind {
    /// The name users know it by ("ext4", "fat32", "swap", ...).
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Unknown => "unknown",
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Swap => "swap",
            FsKind::Unpartitioned => "unpartitioned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_map_merges_and_subtracts() {
        let map = FreeMap::from_runs(vec![(10, 5), (0, 3), (14, 4), (3, 1)]);
        assert_eq!(map.runs(), &[(0, 4), (10, 8)]);
        assert_eq!(
            map.without(&[(12, 2), (0, 1)]).runs(),
            &[(1, 3), (10, 2), (14, 4)]
        );
        assert_eq!(map.run_at(0, 100), (true, 4));
        assert_eq!(map.run_at(5, 100), (false, 5));
        assert_eq!(map.run_at(5, 2), (false, 2));
        assert_eq!(map.run_at(17, 100), (true, 1));
        assert_eq!(map.run_at(18, 100), (false, 100));
    }
}
