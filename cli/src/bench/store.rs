//! `cowdisk bench`, part 7: the persistent overlay store.
//!
//! - the cost of `flush` after 1, 100 and 10,000 random 4 KiB writes;
//! - random 4 KiB writes into a persistent store (flushed and closed at the
//!   end) vs qemu-io writing the same pattern into a qcow2 overlay over the
//!   same raw base (64 KiB units on both sides; target: at least equal);
//! - the time to open a store holding 1,000,000 extents (target < 1 s).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowdisk::formats::raw::RawDisk;
use cowdisk::{Disk, Overlay, OverlayOptions};

type Bench<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("bench: {e}")
}

fn options() -> OverlayOptions {
    OverlayOptions {
        granularity: 128,
        detect_zeros: false,
    }
}

fn create(base: &Path, store: &Path) -> Bench<Overlay> {
    let _ = std::fs::remove_file(store);
    Overlay::create_persistent(
        Box::new(RawDisk::open(base).map_err(err)?),
        store,
        options(),
    )
    .map_err(err)
}

/// Random 4 KiB writes into a fresh persistent store, then flush and
/// close: the whole time.
pub fn persistent_writes(base: &Path, store: &Path, offsets: &[u64]) -> Bench<Duration> {
    let mut overlay = create(base, store)?;
    let data = vec![0xA5u8; 4096];
    let start = Instant::now();
    for &offset in offsets {
        overlay.write(offset / 512, &data).map_err(err)?;
    }
    overlay.close().map_err(err)?;
    let elapsed = start.elapsed();
    std::fs::remove_file(store).map_err(err)?;
    Ok(elapsed)
}

/// The time of one `flush` after `writes` random 4 KiB writes.
pub fn flush_after(base: &Path, store: &Path, offsets: &[u64], writes: usize) -> Bench<Duration> {
    let mut overlay = create(base, store)?;
    overlay.flush().map_err(err)?;
    let data = vec![0x5Au8; 4096];
    for &offset in offsets.iter().cycle().take(writes) {
        overlay.write(offset / 512, &data).map_err(err)?;
    }
    let start = Instant::now();
    overlay.flush().map_err(err)?;
    let elapsed = start.elapsed();
    drop(overlay);
    std::fs::remove_file(store).map_err(err)?;
    Ok(elapsed)
}

/// Builds a store with about `extents` extents (single inserted sectors
/// spread over the drive), closes it, and times opening it read-write and
/// read-only.
pub fn open_time(base: &Path, store: &Path, extents: u64) -> Bench<(u64, Duration, Duration)> {
    let mut overlay = create(base, store)?;
    let size = overlay.sector_count();
    let inserts = extents / 2;
    let step = size / (inserts + 1);
    if step == 0 {
        return Err(format!(
            "bench: a source of {size} sectors cannot hold {extents} extents"
        ));
    }
    for i in (1..=inserts).rev() {
        overlay.insert(i * step, 1).map_err(err)?;
    }
    let made = overlay.extents().extent_count();
    overlay.close().map_err(err)?;
    let start = Instant::now();
    let rw = Overlay::open_persistent(store, Box::new(RawDisk::open(base).map_err(err)?), false)
        .map_err(err)?;
    let rw_time = start.elapsed();
    drop(rw);
    let start = Instant::now();
    let ro = Overlay::open_persistent(store, Box::new(RawDisk::open(base).map_err(err)?), true)
        .map_err(err)?;
    let ro_time = start.elapsed();
    drop(ro);
    std::fs::remove_file(store).map_err(err)?;
    Ok((made, rw_time, ro_time))
}

/// qemu-io writing the same pattern into a fresh qcow2 overlay (64 KiB
/// clusters) over `base`, then `flush`: the whole time, start-up included.
pub fn qemu_io_writes(base: &Path, qcow: &Path, offsets: &[u64]) -> Bench<Duration> {
    let _ = std::fs::remove_file(qcow);
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(qcow)
        .status()
        .map_err(|e| format!("bench: cannot run qemu-img: {e}"))?;
    if !status.success() {
        return Err("bench: qemu-img create failed".into());
    }
    let mut script: String = offsets
        .iter()
        .map(|o| format!("write -q -P 165 {o} 4k\n"))
        .collect();
    script.push_str("flush\nquit\n");
    let start = Instant::now();
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(qcow)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("bench: cannot run qemu-io: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("bench: no stdin for qemu-io")?;
        stdin.write_all(script.as_bytes()).map_err(err)?;
    }
    let out = child.wait_with_output().map_err(err)?;
    let elapsed = start.elapsed();
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "bench: qemu-io failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::remove_file(qcow).map_err(err)?;
    Ok(elapsed)
}
