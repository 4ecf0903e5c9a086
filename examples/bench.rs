//! The benchmark: ratios measured side by side in one run, on data it
//! generates. Not a test: it prints figures and never fails on speed.
//!
//! 1. sequential 1 MiB reads of a 1 GiB raw source through a fresh overlay
//!    vs plain `pread` of the same file (target >= 0.9x);
//! 2. random 4 KiB reads through overlays with 10, 1,000 and 100,000
//!    extents (target: 100,000 at least 0.5x the 10-extent rate);
//! 3. memory per extent of the extent map (100,000 and 1,000,000 extents).
//!
//! Run: `cargo run --release --example bench [-- --quick]`

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cowdisk::formats::raw::RawDisk;
use cowdisk::overlay::extents::{Extent, ExtentKind, ExtentMap};
use cowdisk::{Disk, Overlay, OverlayOptions};

const MIB: usize = 1 << 20;

type Bench<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Bench<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let size_mib = if quick { 256 } else { 1024 };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("source.raw");
    make_source(&path, size_mib)?;
    println!(
        "cowdisk benchmark ({}; source {size_mib} MiB raw, page cache warm)",
        if quick { "quick" } else { "full" }
    );
    println!();

    // 1. Sequential reads, interleaved rounds, best of each.
    let rounds = if quick { 3 } else { 5 };
    let (mut best_pread, mut best_overlay) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        best_pread = best_pread.min(time_pread(&path, size_mib)?);
        best_overlay = best_overlay.min(time_overlay_sequential(&path, size_mib)?);
    }
    let mbps = |d: Duration| size_mib as f64 / d.as_secs_f64();
    println!("sequential 1 MiB reads of {size_mib} MiB");
    println!("  plain pread            {:>8.0} MiB/s", mbps(best_pread));
    println!(
        "  through a fresh overlay {:>7.0} MiB/s",
        mbps(best_overlay)
    );
    println!(
        "  ratio overlay/pread     {:>7.2}x   (target >= 0.90x)",
        best_pread.as_secs_f64() / best_overlay.as_secs_f64()
    );
    println!();

    // 2. Random 4 KiB reads against extent count.
    let reads = if quick { 100_000 } else { 300_000 };
    println!("random 4 KiB reads ({reads} per case)");
    let mut base_rate = 0.0;
    for extents in [10u64, 1_000, 100_000] {
        let rate = random_reads(&path, extents, reads)?;
        if extents == 10 {
            base_rate = rate;
        }
        println!(
            "  {:>7} extents {:>10.0} reads/s   {:>5.2}x of the 10-extent rate",
            extents,
            rate,
            rate / base_rate
        );
    }
    println!("  (target: the 100000-extent case >= 0.50x)");
    println!();

    // 3. Memory per extent.
    println!("extent map memory");
    for extents in [100_000u64, 1_000_000] {
        let (bytes, rss) = map_memory(extents)?;
        println!(
            "  {:>9} extents: {:>5.1} bytes/extent (heap), {:>5.1} bytes/extent (peak RSS growth)",
            extents,
            bytes as f64 / extents as f64,
            rss as f64 / extents as f64
        );
    }
    Ok(())
}

fn make_source(path: &Path, size_mib: usize) -> Bench<()> {
    let mut file = File::create(path)?;
    let mut chunk = vec![0u8; MIB];
    for i in 0..size_mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i * 131 + j * 7) as u8 | 1;
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    // Warm the page cache so both readers see the same conditions.
    time_pread(path, size_mib)?;
    Ok(())
}

fn time_pread(path: &Path, size_mib: usize) -> Bench<Duration> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    for i in 0..size_mib {
        file.read_exact_at(&mut buf, (i * MIB) as u64)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

fn time_overlay_sequential(path: &Path, size_mib: usize) -> Bench<Duration> {
    let mut overlay = Overlay::new(Box::new(RawDisk::open(path)?), OverlayOptions::default())?;
    let mut buf = vec![0u8; MIB];
    let per = (MIB / 512) as u64;
    let start = Instant::now();
    for i in 0..size_mib as u64 {
        overlay.read_sectors(i * per, &mut buf)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

/// An overlay with about `extents` extents: single inserted sectors spread
/// evenly through the drive, so most reads still come from the source.
fn random_reads(path: &Path, extents: u64, reads: u64) -> Bench<f64> {
    let mut overlay = Overlay::new(Box::new(RawDisk::open(path)?), OverlayOptions::default())?;
    let size = overlay.sector_count();
    let inserts = extents.saturating_sub(1) / 2;
    for i in 0..inserts {
        overlay.insert((inserts - i) * (size / (inserts + 1)), 1)?;
    }
    let count = overlay.extents().extent_count();
    assert!(count + 1 >= extents, "made {count} extents");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let sectors = overlay.sector_count() - 8;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for _ in 0..reads {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        overlay.read_sectors(rng % sectors, &mut buf)?;
    }
    std::hint::black_box(&buf);
    Ok(reads as f64 / start.elapsed().as_secs_f64())
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Heap bytes of a map with `extents` extents, and the growth of the
/// process's peak RSS while building it.
fn map_memory(extents: u64) -> Bench<(usize, u64)> {
    let before = peak_rss_bytes();
    let mut map = ExtentMap::with_extent(Extent {
        len: extents * 4,
        kind: ExtentKind::Source,
        base: 0,
    });
    for i in 0..extents / 2 {
        map.replace(i * 8, 1, Extent::none(1))?;
    }
    let bytes = map.heap_bytes();
    let grown = peak_rss_bytes().saturating_sub(before);
    std::hint::black_box(&map);
    Ok((bytes, grown))
}
