//! `cowdisk bench`, part 9: a clone that reads ahead of its writer (two
//! threads) against the same clone on one thread and against
//! `qemu-img convert -O raw`.
//!
//! Two VDI images are made once per run by `qemu-img convert` of a raw
//! image: one fully written with random data, one with 10% of its MiB
//! holding random data (the rest never written, so not allocated in the
//! VDI). Each is cloned to raw by `clone_to_file` (the reader on a thread
//! of its own, ahead of the writer), by `clone_to_file_sequential` (one
//! thread) and by `qemu-img convert -f vdi -O raw`, whose output is
//! fsynced after it inside the timing (our clone syncs before it
//! returns). Each timing starts with nothing dirty in the page cache (a
//! `sync` first) and the source in the page cache; best of N rounds, with
//! the slowest shown beside it for the spread. The three outputs of the
//! first round are compared byte for byte.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use cowdisk::clone::{
    clone_to_file, clone_to_file_sequential, no_progress, CloneFormat, CloneOptions,
};
use cowdisk::formats::{open_path, OpenOptions};

use super::{err, run_quiet, settle, Bench};

const MIB: u64 = 1 << 20;

/// Runs the comparison on images of `size_mib` MiB, best of `rounds`
/// (three times as many for the 10%-written image: its clones take a
/// tenth of the time, so the machine's noise weighs more).
pub fn run_clone_pipeline(size_mib: u64, rounds: u32, dir: &Path) -> Bench<()> {
    println!(
        "clone of a {size_mib} MiB VDI to raw: reader thread ahead of the writer vs one thread \
         vs qemu-img convert -O raw (best of {rounds} fully written, of {} 10% written; slowest \
         in brackets; every output synced: qemu-img's fsynced after it, inside the timing)",
        rounds * 3
    );
    println!(
        "    image          read-ahead s        one thread s        qemu-img s     qemu/read-ahead  \
         qemu/one-thread  one-thread/read-ahead"
    );
    for percent in [100u64, 10] {
        let raw = dir.join(format!("pipeline-{percent}pct.raw"));
        let vdi = dir.join(format!("pipeline-{percent}pct.vdi"));
        make_raw(&raw, size_mib, percent)?;
        run_quiet(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vdi",
                &raw.display().to_string(),
                &vdi.display().to_string(),
            ],
        )?;
        std::fs::remove_file(&raw).map_err(err)?;
        // Into the page cache: every timing reads a warm source.
        read_through(&vdi)?;
        let ahead_out = dir.join("pipeline-ahead.raw");
        let single_out = dir.join("pipeline-single.raw");
        let qemu_out = dir.join("pipeline-qemu.raw");
        let (mut ahead, mut single, mut qemu) = (Vec::new(), Vec::new(), Vec::new());
        let rounds = if percent == 100 { rounds } else { rounds * 3 };
        for round in 0..rounds {
            settle()?;
            ahead.push(time_ours(&vdi, &ahead_out, true)?);
            settle()?;
            single.push(time_ours(&vdi, &single_out, false)?);
            settle()?;
            qemu.push(time_qemu(&vdi, &qemu_out)?);
            if round == 0 {
                same_bytes(&ahead_out, &qemu_out)?;
                same_bytes(&single_out, &qemu_out)?;
            }
            for out in [&ahead_out, &single_out, &qemu_out] {
                std::fs::remove_file(out).map_err(err)?;
            }
        }
        std::fs::remove_file(&vdi).map_err(err)?;
        let best = |times: &[Duration]| times.iter().min().copied().unwrap_or_default();
        let worst = |times: &[Duration]| times.iter().max().copied().unwrap_or_default();
        let (a, s, q) = (best(&ahead), best(&single), best(&qemu));
        let label = format!("{percent}% written");
        println!(
            "    {label:<12} {:>6.2} [{:>5.2}]      {:>6.2} [{:>5.2}]     {:>6.2} [{:>5.2}]     \
             {:>6.2}x          {:>6.2}x          {:>6.2}x",
            a.as_secs_f64(),
            worst(&ahead).as_secs_f64(),
            s.as_secs_f64(),
            worst(&single).as_secs_f64(),
            q.as_secs_f64(),
            worst(&qemu).as_secs_f64(),
            q.as_secs_f64() / a.as_secs_f64(),
            q.as_secs_f64() / s.as_secs_f64(),
            s.as_secs_f64() / a.as_secs_f64(),
        );
    }
    println!(
        "    (target: qemu/read-ahead >= 1.20x fully written; read-ahead never slower than one \
         thread on 10% written)"
    );
    Ok(())
}

/// A raw image of `size_mib` MiB whose MiB pieces chosen by
/// [`super::holds_data`] hold random bytes and the rest are holes.
fn make_raw(path: &Path, size_mib: u64, percent: u64) -> Bench<()> {
    super::make_sparse_raw(path, size_mib, percent, 0x2545_F491_4F6C_DD1D, |word| word)?;
    Ok(())
}

fn read_through(path: &Path) -> Bench<()> {
    let mut file = File::open(path).map_err(err)?;
    let mut buf = vec![0u8; MIB as usize];
    while file.read(&mut buf).map_err(err)? > 0 {}
    Ok(())
}

fn time_ours(source: &Path, out: &Path, read_ahead: bool) -> Bench<Duration> {
    let start = Instant::now();
    let mut disk = open_path(source, &OpenOptions::default()).map_err(err)?;
    let options = CloneOptions {
        format: CloneFormat::Raw,
        replace: true,
        ..CloneOptions::default()
    };
    if read_ahead {
        clone_to_file(disk.as_mut(), out, &options, &mut no_progress()).map_err(err)?;
    } else {
        clone_to_file_sequential(disk.as_mut(), out, &options, &mut no_progress()).map_err(err)?;
    }
    Ok(start.elapsed())
}

fn time_qemu(source: &Path, out: &Path) -> Bench<Duration> {
    let (source, out_name) = (source.display().to_string(), out.display().to_string());
    let start = Instant::now();
    run_quiet(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vdi",
            "-O",
            "raw",
            "-t",
            "writeback",
            &source,
            &out_name,
        ],
    )?;
    File::open(out).and_then(|f| f.sync_all()).map_err(err)?;
    Ok(start.elapsed())
}

/// Fails unless the two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Bench<()> {
    let (mut fa, mut fb) = (File::open(a).map_err(err)?, File::open(b).map_err(err)?);
    let (la, lb) = (
        fa.metadata().map_err(err)?.len(),
        fb.metadata().map_err(err)?.len(),
    );
    if la != lb {
        return Err(format!(
            "bench: {} is {la} bytes, {} is {lb}",
            a.display(),
            b.display()
        ));
    }
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0u64;
    while at < la {
        let n = MIB.min(la - at) as usize;
        fa.read_exact(&mut ba[..n]).map_err(err)?;
        fb.read_exact(&mut bb[..n]).map_err(err)?;
        if ba[..n] != bb[..n] {
            return Err(format!(
                "bench: {} and {} differ in the MiB at {at}",
                a.display(),
                b.display()
            ));
        }
        at += n as u64;
    }
    Ok(())
}
