//! The filesystem-aware parts of the tool: the filesystems `info` lists,
//! and `--compact` on `clone` and `enlarge` (the clone is written through
//! a view reading the blocks the filesystems do not use as unallocated).

use std::path::Path;

use serde_json::json;

use cowdisk::disk::SECTOR_BYTES;
use cowdisk::fs::{analyze, AnalyzeOptions, FilesystemView, FsKind, Report};
use cowdisk::Disk;

use crate::size::human;
use crate::{about, Fallible};

#[derive(clap::Args)]
pub(crate) struct CompactArgs {
    /// Leave out the blocks the filesystems do not use (ext2/3/4 block
    /// bitmaps, FAT tables, NTFS $Bitmap, Linux swap) and the space after the last
    /// partition. A partition not fully understood (unknown type, journal
    /// to recover, unclean or damaged) is kept whole; the reason is shown.
    #[arg(long)]
    pub(crate) compact: bool,
}

/// One line per region: number, where, filesystem, used/free or why not.
fn region_lines(report: &Report) -> Vec<String> {
    report
        .regions
        .iter()
        .map(|r| {
            let name = if r.filesystem == FsKind::Unpartitioned {
                "after the last partition".to_string()
            } else if r.number == 0 {
                "whole disk".to_string()
            } else {
                format!("partition {}", r.number)
            };
            let usage = match &r.reason {
                Some(reason) => format!("kept whole: {reason}"),
                None => format!(
                    "{} used, {} free",
                    human(r.used_sectors * SECTOR_BYTES),
                    human(r.free_sectors * SECTOR_BYTES)
                ),
            };
            format!(
                "{name:<25} {:<13} {:>10}  {usage}",
                r.filesystem.name(),
                human(r.sectors * SECTOR_BYTES)
            )
        })
        .collect()
}

/// `info`'s filesystem section (text).
pub(crate) fn print_info(disk: &mut dyn Disk, path: &Path) -> Fallible<()> {
    let analysis = analyze(disk, &AnalyzeOptions::default()).map_err(|e| about(path, e))?;
    let report = analysis.report;
    println!(
        "filesystems:     {} free inside filesystems and after the partitions",
        human(report.free_sectors * SECTOR_BYTES)
    );
    if let Some(reason) = &report.table_reason {
        println!("  {reason}");
    }
    for line in region_lines(&report) {
        println!("  {line}");
    }
    Ok(())
}

/// `info --json`'s filesystem section.
pub(crate) fn info_json(disk: &mut dyn Disk, path: &Path) -> Fallible<serde_json::Value> {
    let report = analyze(disk, &AnalyzeOptions::default())
        .map_err(|e| about(path, e))?
        .report;
    let regions: Vec<serde_json::Value> = report
        .regions
        .iter()
        .map(|r| {
            json!({
                "number": r.number,
                "start": r.start,
                "sectors": r.sectors,
                "filesystem": r.filesystem.name(),
                "used_bytes": r.used_sectors * SECTOR_BYTES,
                "free_bytes": r.free_sectors * SECTOR_BYTES,
                "kept_whole_because": r.reason,
            })
        })
        .collect();
    Ok(json!({
        "free_bytes": report.free_sectors * SECTOR_BYTES,
        "table_problem": report.table_reason,
        "regions": regions,
    }))
}

/// The disk to clone: `disk` itself, or with `--compact` the filesystem
/// view of it (its report printed, and how much it leaves out).
pub(crate) fn maybe_compact(
    disk: Box<dyn Disk>,
    args: &CompactArgs,
    what: &Path,
) -> Fallible<Box<dyn Disk>> {
    if !args.compact {
        return Ok(disk);
    }
    let (view, report) = FilesystemView::new(disk).map_err(|e| about(what, e))?;
    if let Some(reason) = &report.table_reason {
        println!("compact: {reason}");
    }
    for line in region_lines(&report) {
        println!("compact: {line}");
    }
    println!(
        "compact: {} of free filesystem space left out of the clone (it reads as zeros \
         there; the verification compares with that)",
        human(report.free_sectors * SECTOR_BYTES)
    );
    Ok(Box::new(view))
}
