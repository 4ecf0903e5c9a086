//! `cowdisk bench`, part 8: a clone into every writable format against
//! `qemu-img convert -O <format>` of the same input.
//!
//! Two sparse raw images are made once per run: one with 10% of its MiB
//! holding data, one with 90% (the rest holes). Each is cloned through our
//! reader and writer into raw, VDI, qcow2, compressed qcow2, VHD (dynamic
//! and fixed), VHDX and VMDK (monolithicSparse and streamOptimized), and
//! converted by `qemu-img convert` into the same format and variant. Our
//! clone syncs its output before it returns (its atomic finish); qemu-img's
//! output is fsynced after it, inside the timing, in case it did not sync
//! (qemu-img 10 calls fdatasync itself; older ones may not). Each
//! timing starts with nothing dirty in the page cache; best of N rounds.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use cowdisk::clone::{clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::formats::raw::RawDisk;

use super::{err, run_quiet, settle, Bench};

/// Our format, whether compressed, qemu-img's format name and its extra
/// convert arguments; the row's label.
const ROWS: &[(CloneFormat, bool, &str, &[&str], &str)] = &[
    (CloneFormat::Raw, false, "raw", &[], "raw"),
    (CloneFormat::Vdi, false, "vdi", &[], "vdi"),
    (CloneFormat::Qcow2, false, "qcow2", &[], "qcow2"),
    (CloneFormat::Qcow2, true, "qcow2", &["-c"], "qcow2 -c"),
    (
        CloneFormat::VhdDynamic,
        false,
        "vpc",
        &["-o", "subformat=dynamic"],
        "vhd",
    ),
    (
        CloneFormat::VhdFixed,
        false,
        "vpc",
        &["-o", "subformat=fixed"],
        "vhd-fixed",
    ),
    (CloneFormat::Vhdx, false, "vhdx", &[], "vhdx"),
    (
        CloneFormat::VmdkSparse,
        false,
        "vmdk",
        &["-o", "subformat=monolithicSparse"],
        "vmdk",
    ),
    (
        CloneFormat::VmdkStream,
        false,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        "vmdk-stream",
    ),
];

/// Runs the comparison on images of `size_mib` MiB, best of `rounds`
/// (`compressed_rounds` for the compressed outputs: deflate runs at tens
/// of MB/s a core, so a full run times them once).
pub fn run_clone_formats(
    size_mib: u64,
    rounds: u32,
    compressed_rounds: u32,
    dir: &Path,
) -> Bench<()> {
    println!(
        "clone of a {size_mib} MiB sparse raw image into each format vs qemu-img convert -O FMT \
         (best of {rounds}, compressed outputs best of {compressed_rounds}; both outputs synced: \
         qemu-img's fsynced after it, inside the timing)"
    );
    for percent in [10u64, 90] {
        let source = dir.join(format!("clone-source-{percent}pct.raw"));
        make_sparse_source(&source, size_mib, percent)?;
        println!("  {percent}% data:");
        println!("    format        cowdisk s   qemu-img s   ratio cowdisk/qemu");
        for &(format, compress, qemu_format, qemu_args, label) in ROWS {
            let (mut best_ours, mut best_qemu) = (Duration::MAX, Duration::MAX);
            let compressed = compress || format == CloneFormat::VmdkStream;
            for _ in 0..if compressed {
                compressed_rounds
            } else {
                rounds
            } {
                settle()?;
                let out = dir.join("clone-formats-ours.out");
                best_ours = best_ours.min(time_our_clone(&source, &out, format, compress)?);
                std::fs::remove_file(&out).map_err(err)?;
                settle()?;
                let out = dir.join("clone-formats-qemu.out");
                best_qemu = best_qemu.min(time_qemu(&source, &out, qemu_format, qemu_args)?);
                std::fs::remove_file(&out).map_err(err)?;
            }
            let target = if compress { 1.5 } else { 1.0 };
            println!(
                "    {label:<12} {:>9.2}   {:>10.2}   {:>6.2}x   (target >= {target:.2}x)",
                best_ours.as_secs_f64(),
                best_qemu.as_secs_f64(),
                best_qemu.as_secs_f64() / best_ours.as_secs_f64()
            );
        }
        std::fs::remove_file(&source).map_err(err)?;
    }
    Ok(())
}

/// A sparse raw image of `size_mib` MiB whose MiB pieces chosen by
/// [`super::holds_data`] hold data (moderately compressible: 4 random bits
/// a byte) and the rest are holes; synced and left in the page cache.
fn make_sparse_source(path: &Path, size_mib: u64, percent: u64) -> Bench<()> {
    let file = super::make_sparse_raw(path, size_mib, percent, 0x9E37_79B9_7F4A_7C15, |word| {
        word & 0x0F0F_0F0F_0F0F_0F0F | 0x4040_4040_4040_4040
    })?;
    file.sync_all().map_err(err)
}

fn time_our_clone(
    source: &Path,
    out: &Path,
    format: CloneFormat,
    compress: bool,
) -> Bench<Duration> {
    let start = Instant::now();
    let mut disk = RawDisk::open(source).map_err(err)?;
    let options = CloneOptions {
        format,
        compress,
        replace: true,
        ..CloneOptions::default()
    };
    clone_to_file(&mut disk, out, &options, &mut no_progress()).map_err(err)?;
    Ok(start.elapsed())
}

fn time_qemu(source: &Path, out: &Path, format: &str, extra: &[&str]) -> Bench<Duration> {
    let (source, out_name) = (source.display().to_string(), out.display().to_string());
    let mut args = vec!["convert", "-f", "raw", "-O", format, "-t", "writeback"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&source, &out_name]);
    let start = Instant::now();
    run_quiet("qemu-img", &args)?;
    File::open(out).and_then(|f| f.sync_all()).map_err(err)?;
    Ok(start.elapsed())
}
