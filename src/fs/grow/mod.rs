//! Growing the filesystem inside a partition that was enlarged, offline,
//! through the overlay (the source is never written).
//!
//! [`grow_filesystem`] recognises the filesystem at the start of the
//! partition and makes it fill the partition's new size: ext2/3/4
//! ([`ext`]), FAT12/16/32 ([`fat`]) and NTFS ([`ntfs`]). Every
//! grower reads and checks everything it needs before its first write, so
//! a refusal (a dirty or inconsistent volume, a size the format cannot
//! take) leaves the overlay untouched.

pub mod ext;
pub mod fat;
pub mod ntfs;

use super::volume::Volume;
use super::FsKind;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::overlay::Overlay;

/// What [`grow_filesystem`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowReport {
    pub filesystem: FsKind,
    /// The filesystem's size before, in 512-byte sectors.
    pub old_sectors: u64,
    /// Its size now, in 512-byte sectors.
    pub new_sectors: u64,
    /// Bytes per allocation unit (cluster).
    pub cluster_bytes: u64,
    /// Allocation units before and after.
    pub old_clusters: u64,
    pub new_clusters: u64,
    /// 512-byte sectors inserted into the volume for metadata (FAT growth);
    /// the data behind them moved up without being copied.
    pub inserted_sectors: u64,
    /// Free bytes before and after (as the volume's own map counts them).
    pub old_free_bytes: u64,
    pub new_free_bytes: u64,
}

/// Options of [`grow_filesystem_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrowOptions {
    /// Read and check everything and report what growing would do, but
    /// write nothing.
    pub dry_run: bool,
}

/// Grows the filesystem of the partition that starts at `part_start` (a
/// sector of the overlay) so that it fills `new_sectors` sectors, the
/// partition's size (the partition table must already say so, e.g. after
/// `partition::enlarge`). Refuses, without writing, a filesystem it does
/// not know, a dirty or inconsistent one, and a size the format cannot
/// take.
pub fn grow_filesystem(
    overlay: &mut Overlay,
    part_start: u64,
    new_sectors: u64,
) -> Result<GrowReport> {
    grow_filesystem_with(overlay, part_start, new_sectors, &GrowOptions::default())
}

/// [`grow_filesystem`] with options.
pub fn grow_filesystem_with(
    overlay: &mut Overlay,
    part_start: u64,
    new_sectors: u64,
    options: &GrowOptions,
) -> Result<GrowReport> {
    let kind = {
        let mut vol = Volume::new(overlay as &mut dyn Disk, part_start, new_sectors)?;
        super::probe(&mut vol)?
    };
    match kind {
        Some(FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32) => {
            fat::grow(overlay, part_start, new_sectors, options.dry_run)
        }
        Some(FsKind::Ntfs) => ntfs::grow(overlay, part_start, new_sectors, options.dry_run),
        Some(FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4) => {
            ext::grow(overlay, part_start, new_sectors, options.dry_run)
        }
        Some(k) => Err(Error::unsupported(format!(
            "the partition holds {}, which has no filesystem to grow",
            k.name()
        ))),
        None => Err(Error::unsupported(
            "the partition holds no filesystem this library recognises; nothing to grow".into(),
        )),
    }
}
