//! `cowdisk bench`: the project's benchmark. Ratios measured side by side
//! in one run, on data it generates. Not a test: it prints figures and
//! never fails on speed (it fails only when it cannot run, e.g. qemu-img
//! is missing).
//!
//! 1. sequential 1 MiB reads of a raw source through a fresh overlay vs
//!    plain `pread` of the same file (target >= 0.9x), and through an
//!    overlay with 10% written vs `qemu-img bench` on a qcow2 overlay with
//!    the same writes;
//! 2. random 4 KiB reads through overlays with 10, 1,000, 10,000, 100,000
//!    and 1,000,000 extents (targets: 100,000 at least 0.8x the 10-extent
//!    rate, 1,000,000 at least 0.6x; `--only extents` runs this part
//!    alone);
//! 3. random 4 KiB copy-on-write writes vs `qemu-io` on a qcow2 overlay
//!    (64 KiB units on both sides: the qcow2 cluster size);
//! 4. clone of a 2 GiB image with 10% written through an overlay to raw
//!    (and to VDI) vs `qemu-img convert` of the equivalent qcow2 overlay,
//!    on the same filesystem (target: at least as fast);
//! 5. memory per extent of the extent map (100,000 and 1,000,000 extents);
//! 6. sequential reads of an image of each format vs `qemu-img convert`
//!    (`formats.rs`);
//! 7. the persistent store: flush cost, random writes vs `qemu-io`, open
//!    time with 1,000,000 extents (`store.rs`);
//! 8. a clone of a sparse raw image with 10% and with 90% data into every
//!    writable format vs `qemu-img convert -O <format>`
//!    (`clone_formats.rs`; target: at least 1.0x, 1.5x for compressed
//!    qcow2). `--only clone-formats` runs this part alone;
//! 9. sequential 1 MiB pages through the C ABI of an image of each format,
//!    with buffers aligned, from `malloc` and 1, 16 and 512 bytes past a
//!    page, vs `qemu-img bench` (target 1.2x) and this machine's `pread`
//!    and `memcpy` ceilings (target: within 1.2x); two threads reading one
//!    overlay handle vs one (target 1.8x) (`reads.rs`; `--only reads`).
//! 10. a clone of a fully written and of a 10%-written VDI to raw with the
//!     reader on a thread ahead of the writer, on one thread, and by
//!     `qemu-img convert -O raw` (`clone_pipeline.rs`; target: at least
//!     1.2x qemu-img fully written, never slower than one thread at 10%).
//!     `--only clone-pipeline` runs this part alone.

mod clone_formats;
mod clone_pipeline;
mod formats;
mod reads;
mod store;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowdisk::clone::{clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::formats::raw::RawDisk;
use cowdisk::overlay::extents::{Extent, ExtentKind, ExtentMap};
use cowdisk::{Disk, Overlay, OverlayOptions};

const MIB: usize = 1 << 20;

type Bench<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("bench: {e}")
}

/// How big a run is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Full,
    Quick,
    /// A smoke run for the CLI tests: tiny sizes, figures meaningless.
    Tiny,
}

/// The parts `--only` can pick.
pub const PARTS: [&str; 4] = ["clone-formats", "clone-pipeline", "extents", "reads"];

pub fn run(scale: Scale, dir: Option<&Path>, only: Option<&str>) -> Bench<()> {
    let pick = |full: u64, quick: u64, tiny: u64| match scale {
        Scale::Full => full,
        Scale::Quick => quick,
        Scale::Tiny => tiny,
    };
    if let Some(part) = only.filter(|p| !PARTS.contains(p)) {
        return Err(format!(
            "bench: no part called {part:?} (parts: {})",
            PARTS.join(", ")
        ));
    }
    let temp = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            tempfile::tempdir_in(d)
        }
        None => tempfile::tempdir(),
    }
    .map_err(err)?;
    let dir = temp.path();
    let clone_formats = || {
        clone_formats::run_clone_formats(
            pick(2048, 256, 16),
            pick(2, 2, 1) as u32,
            // The compressed outputs are the slowest rows: once, as in
            // the full run, keeps the quick run under two minutes.
            1,
            dir,
        )
    };
    let read_speeds = || {
        let size_mib = pick(1024, 256, 16) as usize;
        let raw = dir.join("reads.raw");
        make_source(&raw, size_mib)?;
        reads::run_reads(dir, &raw, size_mib, pick(5, 3, 1) as u32)
    };
    let clone_pipeline =
        || clone_pipeline::run_clone_pipeline(pick(2048, 512, 16), pick(3, 2, 1) as u32, dir);
    match only {
        Some("clone-formats") => return clone_formats(),
        Some("clone-pipeline") => return clone_pipeline(),
        Some("extents") => {
            let size_mib = pick(1024, 1024, 16) as usize;
            let raw = dir.join("extents.raw");
            make_source(&raw, size_mib)?;
            return random_read_rows(&raw, pick(300_000, 100_000, 2_000), pick(3, 2, 1));
        }
        Some(_) => return read_speeds(),
        None => {}
    }
    // Memory first: peak RSS growth is only meaningful before the other
    // cases have raised the peak.
    let memory: Vec<(u64, usize, u64)> = [
        pick(100_000, 100_000, 1_000),
        pick(1_000_000, 1_000_000, 10_000),
    ]
    .into_iter()
    .map(|n| map_memory(n).map(|(bytes, rss)| (n, bytes, rss)))
    .collect::<Bench<_>>()?;
    let size_mib = pick(1024, 256, 16) as usize;
    let path = dir.join("source.raw");
    make_source(&path, size_mib)?;
    println!(
        "cowdisk benchmark ({}; source {size_mib} MiB raw, page cache warm, in {})",
        ["full", "quick", "tiny"][pick(0, 1, 2) as usize],
        dir.display()
    );
    println!();

    // 1. Sequential reads, interleaved rounds, best of each.
    let rounds = pick(5, 3, 1);
    let (mut best_pread, mut best_overlay) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        best_pread = best_pread.min(time_pread(&path, size_mib)?);
        best_overlay = best_overlay.min(time_overlay_sequential(&path, size_mib)?);
    }
    let mbps = |d: Duration, mib: usize| mib as f64 / d.as_secs_f64();
    println!("sequential 1 MiB reads of {size_mib} MiB");
    println!(
        "  plain pread            {:>8.0} MiB/s",
        mbps(best_pread, size_mib)
    );
    println!(
        "  through a fresh overlay {:>7.0} MiB/s",
        mbps(best_overlay, size_mib)
    );
    println!(
        "  ratio overlay/pread     {:>7.2}x   (target >= 0.90x)",
        best_pread.as_secs_f64() / best_overlay.as_secs_f64()
    );
    let writes = ten_percent_writes(size_mib as u64);
    let qcow = dir.join("overlay-10pct.qcow2");
    make_qcow2_overlay(&path, &qcow, &writes)?;
    let (mut best_ours, mut best_qemu) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        best_ours = best_ours.min(time_overlay_written_sequential(&path, size_mib, &writes)?);
        best_qemu = best_qemu.min(time_qemu_bench(&qcow, size_mib)?);
    }
    println!("  with 10% written (1 MiB pieces), vs qemu-img bench (qcow2 overlay, depth 1):");
    println!(
        "    cowdisk overlay       {:>8.0} MiB/s",
        mbps(best_ours, size_mib)
    );
    println!(
        "    qemu-img bench        {:>8.0} MiB/s",
        mbps(best_qemu, size_mib)
    );
    println!(
        "    ratio cowdisk/qemu    {:>8.2}x",
        best_qemu.as_secs_f64() / best_ours.as_secs_f64()
    );
    println!();

    // 2. Random 4 KiB reads against extent count, on a 1 GiB source in
    // the quick run too (a smaller one would put a million extents an
    // insert every other sector apart).
    let extents_mib = pick(1024, 1024, 16) as usize;
    let extents_source = if extents_mib == size_mib {
        path.clone()
    } else {
        let other = dir.join("extents.raw");
        make_source(&other, extents_mib)?;
        other
    };
    random_read_rows(
        &extents_source,
        pick(300_000, 100_000, 2_000),
        pick(3, 2, 1),
    )?;
    if extents_source != path {
        std::fs::remove_file(&extents_source).map_err(err)?;
    }

    // 3. Random COW writes.
    let count = pick(20_000, 5_000, 200) as usize;
    let offsets = random_offsets(size_mib as u64 * MIB as u64, 4096, count);
    let ours = time_overlay_writes(&path, &offsets)?;
    let qemu = time_qemu_io_writes(&path, &dir.join("writes.qcow2"), &offsets)?;
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!("random 4 KiB copy-on-write writes ({count}, 64 KiB COW units)");
    println!("  cowdisk overlay        {:>10.0} writes/s", rate(ours));
    println!("  qemu-io (qcow2)        {:>10.0} writes/s", rate(qemu));
    println!(
        "  ratio cowdisk/qemu-io  {:>10.2}x",
        qemu.as_secs_f64() / ours.as_secs_f64()
    );
    println!();

    // 4. Clone.
    let clone_mib = pick(2048, 512, 32) as usize;
    let big = dir.join("clone-base.raw");
    make_source(&big, clone_mib)?;
    let writes = ten_percent_writes(clone_mib as u64);
    let qcow = dir.join("clone-overlay.qcow2");
    make_qcow2_overlay(&big, &qcow, &writes)?;
    println!(
        "clone of a {clone_mib} MiB image with 10% written through an overlay \
         (both outputs synced; qemu-img convert's output is also fsynced after it, \
         inside the timing, in case it did not sync)"
    );
    for (format, qemu_format) in [(CloneFormat::Raw, "raw"), (CloneFormat::Vdi, "vdi")] {
        let (mut best_ours, mut best_qemu) = (Duration::MAX, Duration::MAX);
        for _ in 0..pick(3, 2, 1) {
            // Each timing starts with nothing dirty in the page cache, so
            // neither side pays for the other's (or the set-up's) writeback.
            settle()?;
            let out = dir.join(format!("clone-ours.{qemu_format}"));
            best_ours = best_ours.min(time_clone(&big, &writes, &out, format)?);
            std::fs::remove_file(&out).map_err(err)?;
            settle()?;
            let out = dir.join(format!("clone-qemu.{qemu_format}"));
            best_qemu = best_qemu.min(time_qemu_convert(&qcow, &out, qemu_format)?);
            std::fs::remove_file(&out).map_err(err)?;
        }
        println!("  to {qemu_format}:");
        println!(
            "    cowdisk clone         {:>8.2} s  {:>7.0} MiB/s",
            best_ours.as_secs_f64(),
            mbps(best_ours, clone_mib)
        );
        println!(
            "    qemu-img convert      {:>8.2} s  {:>7.0} MiB/s",
            best_qemu.as_secs_f64(),
            mbps(best_qemu, clone_mib)
        );
        println!(
            "    ratio cowdisk/qemu    {:>8.2}x   (target >= 1.00x)",
            best_qemu.as_secs_f64() / best_ours.as_secs_f64()
        );
    }
    std::fs::remove_file(&big).map_err(err)?;
    println!();

    // 5. Memory per extent.
    println!("extent map memory");
    for (extents, bytes, rss) in memory {
        println!(
            "  {:>9} extents: {:>5.1} bytes/extent (heap), {:>5.1} bytes/extent (peak RSS growth)",
            extents,
            bytes as f64 / extents as f64,
            rss as f64 / extents as f64
        );
    }
    println!();

    // 6. Each format's reader.
    formats::run_formats(pick(1024, 256, 16), dir)?;
    println!();

    // 7. The persistent store.
    let store = dir.join("bench.cow");
    println!("persistent overlay store (64 KiB units)");
    let count = pick(20_000, 5_000, 200) as usize;
    let offsets = random_offsets(size_mib as u64 * MIB as u64, 4096, count);
    let (mut best_ours, mut best_qemu) = (Duration::MAX, Duration::MAX);
    for _ in 0..pick(3, 2, 1) {
        settle()?;
        best_ours = best_ours.min(store::persistent_writes(&path, &store, &offsets)?);
        settle()?;
        best_qemu = best_qemu.min(store::qemu_io_writes(
            &path,
            &dir.join("w.qcow2"),
            &offsets,
        )?);
    }
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "  {count} random 4 KiB writes, then flush and close (qemu-io: start-up, writes, flush)"
    );
    println!(
        "    cowdisk persistent store {:>9.0} writes/s",
        rate(best_ours)
    );
    println!(
        "    qemu-io (qcow2 overlay)  {:>9.0} writes/s",
        rate(best_qemu)
    );
    println!(
        "    ratio cowdisk/qemu-io    {:>9.2}x   (target >= 1.00x)",
        best_qemu.as_secs_f64() / best_ours.as_secs_f64()
    );
    for writes in [1usize, 100, pick(10_000, 10_000, 1_000) as usize] {
        let d = store::flush_after(&path, &store, &offsets, writes)?;
        println!(
            "  flush after {writes:>6} writes: {:>8.2} ms",
            d.as_secs_f64() * 1000.0
        );
    }
    let (made, rw, ro) = store::open_time(&path, &store, pick(1_000_000, 1_000_000, 10_000))?;
    println!(
        "  open a store of {made} extents: {:.0} ms read-write, {:.0} ms read-only   (target < 1000 ms)",
        rw.as_secs_f64() * 1000.0,
        ro.as_secs_f64() * 1000.0
    );
    println!();

    // 8. A clone into every format.
    clone_formats()?;
    println!();

    // 9. Reads with every buffer placement, and parallel readers.
    read_speeds()?;
    println!();

    // 10. A clone reading ahead of its writer.
    clone_pipeline()
}

fn make_source(path: &Path, size_mib: usize) -> Bench<()> {
    let mut file = File::create(path).map_err(err)?;
    let mut chunk = vec![0u8; MIB];
    for i in 0..size_mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i * 131 + j * 7) as u8 | 1;
        }
        file.write_all(&chunk).map_err(err)?;
    }
    file.sync_all().map_err(err)?;
    // Warm the page cache so both readers see the same conditions.
    time_pread(path, size_mib)?;
    Ok(())
}

/// Whether MiB `index` of an image with `percent`% data holds data: the
/// pieces are spread evenly (deterministically) through the image.
fn holds_data(index: u64, percent: u64) -> bool {
    percent >= 100 || (index * 7 + index / 10) % 10 < percent / 10
}

/// A raw image of `size_mib` MiB whose MiB pieces chosen by [`holds_data`]
/// hold the words of a xorshift stream (seeded with `seed ^ percent`) as
/// `word` shapes them, and the rest are holes.
fn make_sparse_raw(
    path: &Path,
    size_mib: u64,
    percent: u64,
    seed: u64,
    word: impl Fn(u64) -> u64,
) -> Bench<File> {
    let file = File::create(path).map_err(err)?;
    let mut piece = vec![0u8; MIB];
    let mut rng = seed ^ percent;
    for index in 0..size_mib {
        if !holds_data(index, percent) {
            continue;
        }
        for chunk in piece.chunks_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            chunk.copy_from_slice(&word(rng).to_le_bytes());
        }
        file.write_all_at(&piece, index * MIB as u64).map_err(err)?;
    }
    file.set_len(size_mib * MIB as u64).map_err(err)?;
    Ok(file)
}

/// 1 MiB pieces covering a tenth of a disk of `size_mib` MiB, at evenly
/// spread (deterministic) positions: their MiB indices.
fn ten_percent_writes(size_mib: u64) -> Vec<u64> {
    (0..size_mib / 10).map(|i| i * 10 + (i * 7) % 10).collect()
}

fn written_piece(index: u64) -> Vec<u8> {
    vec![(index as u8) ^ 0x5A | 0x80; MIB]
}

/// A qcow2 overlay on the raw `base` with the 1 MiB pieces written.
fn make_qcow2_overlay(base: &Path, qcow: &Path, writes: &[u64]) -> Bench<()> {
    run_quiet(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &base.display().to_string(),
            &qcow.display().to_string(),
        ],
    )?;
    let script: String = writes
        .iter()
        .map(|&i| {
            format!(
                "write -q -P {} {} 1M\n",
                written_piece(i)[0],
                i * MIB as u64
            )
        })
        .collect();
    qemu_io_script(qcow, &script)?;
    Ok(())
}

fn overlay_with_writes(path: &Path, writes: &[u64]) -> Bench<Overlay> {
    let mut overlay = Overlay::new(
        Box::new(RawDisk::open(path).map_err(err)?),
        OverlayOptions::default(),
    )
    .map_err(err)?;
    for &i in writes {
        overlay
            .write(i * (MIB as u64 / 512), &written_piece(i))
            .map_err(err)?;
    }
    Ok(overlay)
}

fn run_quiet(program: &str, args: &[&str]) -> Bench<Vec<u8>> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("bench: cannot run {program}: {e} (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "bench: {program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// Feeds qemu-io a script of commands on its standard input.
fn qemu_io_script(image: &Path, script: &str) -> Bench<()> {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", &image.display().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("bench: cannot run qemu-io: {e} (is qemu-utils installed?)"))?;
    {
        let mut stdin = child.stdin.take().ok_or("bench: no stdin for qemu-io")?;
        stdin.write_all(script.as_bytes()).map_err(err)?;
        stdin.write_all(b"quit\n").map_err(err)?;
    }
    let out = child.wait_with_output().map_err(err)?;
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "bench: qemu-io failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn time_pread(path: &Path, size_mib: usize) -> Bench<Duration> {
    let file = File::open(path).map_err(err)?;
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    for i in 0..size_mib {
        file.read_exact_at(&mut buf, (i * MIB) as u64)
            .map_err(err)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

fn time_overlay_sequential(path: &Path, size_mib: usize) -> Bench<Duration> {
    let mut overlay = Overlay::new(
        Box::new(RawDisk::open(path).map_err(err)?),
        OverlayOptions::default(),
    )
    .map_err(err)?;
    read_all(&mut overlay, size_mib)
}

fn read_all(overlay: &mut Overlay, size_mib: usize) -> Bench<Duration> {
    let mut buf = vec![0u8; MIB];
    let per = (MIB / 512) as u64;
    let start = Instant::now();
    for i in 0..size_mib as u64 {
        overlay.read_sectors(i * per, &mut buf).map_err(err)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

fn time_overlay_written_sequential(
    path: &Path,
    size_mib: usize,
    writes: &[u64],
) -> Bench<Duration> {
    let mut overlay = overlay_with_writes(path, writes)?;
    read_all(&mut overlay, size_mib)
}

/// `qemu-img bench` reading the whole image sequentially in 1 MiB
/// requests at queue depth 1; the time it reports.
fn time_qemu_bench(image: &Path, size_mib: usize) -> Bench<Duration> {
    qemu_bench(image, "qcow2", size_mib)
}

/// `qemu-img bench -f FORMAT` reading the first `mib` MiB of `image`
/// sequentially in 1 MiB requests at queue depth 1 through the host's page
/// cache; the time it reports.
fn qemu_bench(image: &Path, format: &str, mib: usize) -> Bench<Duration> {
    let out = run_quiet(
        "qemu-img",
        &[
            "bench",
            "-f",
            format,
            "-c",
            &mib.to_string(),
            "-d",
            "1",
            "-s",
            "1M",
            "-S",
            "1M",
            "-t",
            "writeback",
            &image.display().to_string(),
        ],
    )?;
    let text = String::from_utf8_lossy(&out);
    let seconds = text
        .split("Run completed in")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| format!("bench: cannot read qemu-img bench's output: {text}"))?;
    Ok(Duration::from_secs_f64(seconds))
}

/// Part 2: random 4 KiB reads through overlays with 10 to 1,000,000
/// extents, each a pass of `reads` right after the edits (the flat index
/// is built during the pass, as a clone's pass would build it), best of
/// `rounds` rounds interleaved over the cases.
fn random_read_rows(path: &Path, reads: u64, rounds: u64) -> Bench<()> {
    const CASES: [u64; 5] = [10, 1_000, 10_000, 100_000, 1_000_000];
    let mut best = [0f64; CASES.len()];
    for _ in 0..rounds {
        for (rate, &extents) in best.iter_mut().zip(&CASES) {
            *rate = rate.max(random_reads(path, extents, reads)?);
        }
    }
    println!(
        "random 4 KiB reads ({reads} per case, a pass right after the edits, best of {rounds} \
         interleaved rounds)"
    );
    for (rate, extents) in best.iter().zip(CASES) {
        println!(
            "  {:>7} extents {:>10.0} reads/s   {:>5.2}x of the 10-extent rate",
            extents,
            rate,
            rate / best[0]
        );
    }
    println!("  (targets: 100000 extents >= 0.80x, 1000000 extents >= 0.60x)");
    println!();
    Ok(())
}

/// An overlay with about `extents` extents: single inserted sectors spread
/// evenly through the drive, so most reads still come from the source.
fn random_reads(path: &Path, extents: u64, reads: u64) -> Bench<f64> {
    let mut overlay = Overlay::new(
        Box::new(RawDisk::open(path).map_err(err)?),
        OverlayOptions::default(),
    )
    .map_err(err)?;
    let size = overlay.sector_count();
    let inserts = extents.saturating_sub(1) / 2;
    for i in 0..inserts {
        overlay
            .insert((inserts - i) * (size / (inserts + 1)), 1)
            .map_err(err)?;
    }
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let sectors = overlay.sector_count() - 8;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    for _ in 0..reads {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        overlay.read_sectors(rng % sectors, &mut buf).map_err(err)?;
    }
    std::hint::black_box(&buf);
    Ok(reads as f64 / start.elapsed().as_secs_f64())
}

/// `count` distinct-looking offsets, multiples of `unit`, inside `bytes`.
fn random_offsets(bytes: u64, unit: u64, count: usize) -> Vec<u64> {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    (0..count)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % (bytes / unit) * unit
        })
        .collect()
}

fn time_overlay_writes(path: &Path, offsets: &[u64]) -> Bench<Duration> {
    let mut overlay = Overlay::new(
        Box::new(RawDisk::open(path).map_err(err)?),
        OverlayOptions {
            granularity: 128,
            detect_zeros: false,
        },
    )
    .map_err(err)?;
    let data = vec![0xA5u8; 4096];
    let start = Instant::now();
    for &offset in offsets {
        overlay.write(offset / 512, &data).map_err(err)?;
    }
    Ok(start.elapsed())
}

fn time_qemu_io_writes(base: &Path, qcow: &Path, offsets: &[u64]) -> Bench<Duration> {
    make_qcow2_overlay(base, qcow, &[])?;
    let script: String = offsets
        .iter()
        .map(|o| format!("write -q -P 165 {o} 4k\n"))
        .collect();
    let start = Instant::now();
    qemu_io_script(qcow, &script)?;
    let elapsed = start.elapsed();
    std::fs::remove_file(qcow).map_err(err)?;
    Ok(elapsed)
}

fn time_clone(base: &Path, writes: &[u64], out: &Path, format: CloneFormat) -> Bench<Duration> {
    let mut overlay = overlay_with_writes(base, writes)?;
    let options = CloneOptions {
        format,
        replace: true,
        ..CloneOptions::default()
    };
    let start = Instant::now();
    clone_to_file(&mut overlay, out, &options, &mut no_progress()).map_err(err)?;
    Ok(start.elapsed())
}

fn time_qemu_convert(qcow: &Path, out: &Path, format: &str) -> Bench<Duration> {
    let start = Instant::now();
    run_quiet(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            format,
            "-t",
            "writeback",
            &qcow.display().to_string(),
            &out.display().to_string(),
        ],
    )?;
    // qemu-img convert does not fsync its output (checked with strace);
    // our clone does, for its atomic finish: sync qemu's output too, so
    // both times cover data on disk.
    File::open(out).and_then(|f| f.sync_all()).map_err(err)?;
    Ok(start.elapsed())
}

/// Writes back everything dirty (`sync`).
fn settle() -> Bench<()> {
    run_quiet("sync", &[]).map(|_| ())
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
        map.replace(i * 8, 1, Extent::none(1)).map_err(err)?;
    }
    let bytes = map.heap_bytes();
    let grown = peak_rss_bytes().saturating_sub(before);
    std::hint::black_box(&map);
    Ok((bytes, grown))
}
