//! `enlarge` grows the filesystem in the grown partition too (ext2/3/4,
//! FAT12/16/32 and NTFS, through the overlay); `--no-grow-fs` keeps it as
//! it is.

use cowdisk::disk::SECTOR_BYTES;
use cowdisk::fs::{grow_filesystem, FsKind, GrowReport};
use cowdisk::partition::EnlargeReport;
use cowdisk::Overlay;

use crate::size::human;

#[derive(clap::Args)]
pub(crate) struct GrowArgs {
    /// Grow only the partition; leave its filesystem at its old size (by
    /// default an ext2/3/4, FAT12/16/32 or NTFS filesystem grows to fill
    /// it).
    #[arg(long)]
    pub(crate) no_grow_fs: bool,
}

fn describe(number: u32, r: &GrowReport) -> String {
    let fat = if r.inserted_sectors > 0 {
        format!("; the FATs grew by {} sectors in all", r.inserted_sectors)
    } else {
        String::new()
    };
    let unit = match r.filesystem {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => "blocks",
        _ => "clusters",
    };
    format!(
        "partition {number}: {} grown from {} to {} ({} -> {} {unit} of {}{fat}), free {} -> {}",
        r.filesystem.name(),
        human(r.old_sectors * SECTOR_BYTES),
        human(r.new_sectors * SECTOR_BYTES),
        r.old_clusters,
        r.new_clusters,
        human(r.cluster_bytes),
        human(r.old_free_bytes),
        human(r.new_free_bytes),
    )
}

/// Grows the filesystem of the partition `report` grew, and says what it
/// did. A filesystem that cannot be grown (unknown, dirty, damaged, ext
/// past its reserved descriptor blocks, a FAT that would change type) is left untouched - the grower
/// writes nothing when it refuses - with a warning: the partition still
/// grows.
pub(crate) fn after_enlarge(overlay: &mut Overlay, report: &EnlargeReport, args: &GrowArgs) {
    if args.no_grow_fs {
        println!("filesystem: not grown (--no-grow-fs)");
        return;
    }
    let Some(part) = report.after.iter().find(|p| p.number == report.partition) else {
        return;
    };
    match grow_filesystem(overlay, part.start, part.sectors) {
        Ok(done) => println!("filesystem: {}", describe(part.number, &done)),
        Err(e) => eprintln!(
            "warning: the filesystem of partition {} was not grown: {e} (the partition \
             grew; the filesystem keeps its size)",
            part.number
        ),
    }
}
