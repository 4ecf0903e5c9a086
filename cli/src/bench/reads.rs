//! `cowdisk bench`, part 9 (`--only reads`): sequential reads through the
//! C ABI with the buffers real callers have, and readers in parallel.
//!
//! 1. For each format, a fully written image made by `qemu-img convert`
//!    from the same raw file is read front to back in 1 MiB pages through
//!    `VDDR_Open` + `COW_ReadPage` (the legacy caller's path) into buffers
//!    placed five ways: 4096-aligned, fresh from `malloc` (glibc puts a
//!    1 MiB block 16 bytes past a page boundary), and 1, 16 and 512 bytes
//!    past a page boundary; side by side with `qemu-img bench -c N -s 1M
//!    -d 1` on the same file, and with two ceilings of this machine: `pread`
//!    of the raw file into a 4096-aligned buffer (the page cache's best
//!    copy) and `memcpy` between two buffers. Best of N, page cache warm,
//!    filled by a read as a cloning tool's source on disk is (one line
//!    shows the raw file as its writer left the cache: small pages).
//! 2. Two threads reading disjoint halves of one overlay handle against
//!    one thread reading it all.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowdisk::ffi::api::{
    COW_Close, COW_CreateCowOverlay, COW_ReadPage, COW_ReadSectors, VDDR_Open,
};
use cowdisk::ffi::types::HVDDR;

use super::{err, run_quiet, Bench};

const MIB: usize = 1 << 20;
/// 2^11 sectors: 1 MiB pages.
const PAGE_SHIFT: u32 = 11;

/// Our row name, qemu's format name, `qemu-img convert` options.
const FORMATS: &[(&str, &str, &[&str])] = &[
    ("raw", "raw", &[]),
    ("qcow2", "qcow2", &[]),
    ("vdi", "vdi", &[]),
    ("vhd", "vpc", &["-o", "subformat=dynamic,force_size=on"]),
    ("vhdx", "vhdx", &[]),
    ("vmdk", "vmdk", &[]),
    ("parallels", "parallels", &[]),
];

/// Where a read buffer sits: its name in the table and its distance past a
/// page boundary (`None`: whatever `malloc` gives).
const PLACEMENTS: &[(&str, Option<usize>)] = &[
    ("aligned", Some(0)),
    ("malloc", None),
    ("+1", Some(1)),
    ("+16", Some(16)),
    ("+512", Some(512)),
];

/// A 1 MiB buffer at a chosen placement, kept with its allocation.
struct Placed {
    backing: Vec<u8>,
    start: usize,
}

impl Placed {
    fn new(placement: Option<usize>) -> Placed {
        match placement {
            // A plain allocation of the page's size, as a C caller makes.
            None => Placed {
                backing: vec![0u8; MIB],
                start: 0,
            },
            Some(past) => {
                let backing = vec![0u8; MIB + 8192];
                let start = (4096 - backing.as_ptr() as usize % 4096) % 4096 + past;
                Placed { backing, start }
            }
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + MIB]
    }

    fn past_page(&self) -> usize {
        (self.backing.as_ptr() as usize + self.start) % 4096
    }
}

/// A handle of the library, closed when dropped.
struct Handle(HVDDR);

// SAFETY: library handles may be used from any thread (the header says so).
unsafe impl Send for Handle {}
// SAFETY: as above; reads of one handle may run concurrently.
unsafe impl Sync for Handle {}

impl Handle {
    fn open(path: &Path) -> Bench<Handle> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(err)?;
        // SAFETY: a NUL-terminated path.
        let h = unsafe { VDDR_Open(c.as_ptr(), 0) };
        if h.is_null() {
            return Err(format!("bench: VDDR_Open {} failed", path.display()));
        }
        Ok(Handle(h))
    }

    fn overlay(self) -> Bench<Handle> {
        // SAFETY: a live handle, adopted on success.
        let ov = unsafe { COW_CreateCowOverlay(self.0) };
        if ov.is_null() {
            return Err("bench: COW_CreateCowOverlay failed".into());
        }
        std::mem::forget(self);
        Ok(Handle(ov))
    }

    /// `count` random 4 KiB reads of the `sectors` sectors from `first`.
    fn random_reads(&self, seed: u64, count: u32, first: u64, sectors: u64) -> Bench<()> {
        let mut rng = seed | 1;
        let mut buf = vec![0u8; 4096];
        for _ in 0..count {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let lba = first + rng % (sectors - 8);
            // SAFETY: a live handle and an 8-sector buffer.
            let rc = unsafe { COW_ReadSectors(self.0, buf.as_mut_ptr().cast(), lba, 8) };
            if rc == 0 {
                return Err(format!("bench: ReadSectors at {lba} failed"));
            }
        }
        std::hint::black_box(&buf);
        Ok(())
    }

    fn read_pages(&self, pages: std::ops::Range<u32>, buf: &mut [u8]) -> Bench<()> {
        self.read_pages_of(PAGE_SHIFT, pages, buf)
    }

    /// Pages of 2^`shift` sectors; `buf` holds at least one.
    fn read_pages_of(&self, shift: u32, pages: std::ops::Range<u32>, buf: &mut [u8]) -> Bench<()> {
        assert!(buf.len() >= 512 << shift);
        for page in pages {
            // SAFETY: a live handle and a whole-page buffer.
            let rc = unsafe { COW_ReadPage(self.0, buf.as_mut_ptr().cast(), page, shift) };
            if rc == 0 {
                return Err(format!("bench: ReadPage {page} failed"));
            }
        }
        std::hint::black_box(&buf);
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a live handle, closed once.
        unsafe { COW_Close(self.0) };
    }
}

fn time_handle(path: &Path, pages: u32, buf: &mut [u8]) -> Bench<Duration> {
    let handle = Handle::open(path)?;
    let start = Instant::now();
    handle.read_pages(0..pages, buf)?;
    Ok(start.elapsed())
}

fn time_qemu_bench(image: &Path, format: &str, pages: u32) -> Bench<Duration> {
    super::qemu_bench(image, format, pages as usize)
}

fn time_pread(path: &Path, pages: u32, buf: &mut [u8]) -> Bench<Duration> {
    let file = std::fs::File::open(path).map_err(err)?;
    let start = Instant::now();
    for i in 0..pages as u64 {
        file.read_exact_at(buf, i * MIB as u64).map_err(err)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

/// The best times of one thread calling `read` on every page of `count`
/// and of two threads each calling it on one half, in alternating rounds.
fn one_and_two(
    rounds: u32,
    count: u32,
    read: impl Fn(std::ops::Range<u32>) -> Bench<()> + Sync,
) -> Bench<(Duration, Duration)> {
    let (mut one, mut two) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        let start = Instant::now();
        read(0..count)?;
        one = one.min(start.elapsed());
        let start = Instant::now();
        std::thread::scope(|s| {
            let other = s.spawn(|| read(count / 2..count));
            read(0..count / 2)?;
            other
                .join()
                .map_err(|_| "bench: a reader panicked".to_string())?
        })?;
        two = two.min(start.elapsed());
    }
    Ok((one, two))
}

/// Reads the whole file once (into the page cache).
fn read_whole(path: &Path, buf: &mut [u8]) -> Bench<()> {
    let pages = std::fs::metadata(path)
        .map_err(err)?
        .len()
        .div_ceil(MIB as u64);
    let file = std::fs::File::open(path).map_err(err)?;
    for i in 0..pages {
        // The last page may be short: read what is there.
        file.read_at(buf, i * MIB as u64).map_err(err)?;
    }
    Ok(())
}

/// Writes the file's dirty pages back and drops its pages from the page
/// cache, so the next read fills it as a read of a file on disk does.
fn drop_from_cache(path: &Path) -> Bench<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(err)?;
    file.sync_all().map_err(err)?;
    // SAFETY: a valid descriptor; advice only, no memory is touched.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!(
            "bench: posix_fadvise {}: error {rc}",
            path.display()
        ));
    }
    Ok(())
}

fn time_memcpy(pages: u32) -> Duration {
    // A 64 MiB source (beyond the caches), copied round and round.
    let from = vec![0x5Au8; 64 * MIB];
    let mut to = Placed::new(Some(0));
    let start = Instant::now();
    for i in 0..pages as usize {
        let at = (i % 64) * MIB;
        to.buf().copy_from_slice(&from[at..at + MIB]);
    }
    std::hint::black_box(to.buf());
    start.elapsed()
}

fn make_images(dir: &Path, raw: &Path) -> Bench<Vec<(&'static str, &'static str, PathBuf)>> {
    let mut out = Vec::new();
    for &(name, format, options) in FORMATS {
        if format == "raw" {
            out.push((name, format, raw.to_path_buf()));
            continue;
        }
        let path = dir.join(format!("reads.{name}"));
        let (raw_s, path_s) = (raw.display().to_string(), path.display().to_string());
        let mut args = vec!["convert", "-f", "raw", "-O", format];
        args.extend_from_slice(options);
        args.extend_from_slice(&[&raw_s, &path_s]);
        run_quiet("qemu-img", &args)?;
        out.push((name, format, path));
    }
    Ok(out)
}

/// Best times of one table: the pread ceiling, qemu-img bench per image,
/// ours per image and placement.
struct Table {
    pread: Duration,
    qemu: Vec<Duration>,
    ours: Vec<Vec<Duration>>,
}

/// Rounds interleaved over the whole table, best of each cell: a slow
/// moment of the machine (its memory bandwidth is shared with other
/// guests) then costs one sample of several cells, not every sample of
/// one cell.
fn measure(
    images: &[(&str, &str, PathBuf)],
    raw: &Path,
    placements: &[(&str, Option<usize>)],
    pages: u32,
    rounds: u32,
) -> Bench<Table> {
    let mut aligned = Placed::new(Some(0));
    let mut bufs: Vec<Placed> = placements.iter().map(|(_, p)| Placed::new(*p)).collect();
    let mut table = Table {
        pread: Duration::MAX,
        qemu: vec![Duration::MAX; images.len()],
        ours: vec![vec![Duration::MAX; placements.len()]; images.len()],
    };
    for _ in 0..rounds {
        table.pread = table.pread.min(time_pread(raw, pages, aligned.buf())?);
        for (i, (_, format, path)) in images.iter().enumerate() {
            table.qemu[i] = table.qemu[i].min(time_qemu_bench(path, format, pages)?);
            for (j, buf) in bufs.iter_mut().enumerate() {
                table.ours[i][j] = table.ours[i][j].min(time_handle(path, pages, buf.buf())?);
            }
        }
    }
    Ok(table)
}

impl Table {
    /// Prints the rows; returns the lowest ratio to qemu-img and the
    /// lowest share of the pread ceiling.
    fn print(
        &self,
        images: &[(&str, &str, PathBuf)],
        placements: &[(&str, Option<usize>)],
        mbps: impl Fn(Duration) -> f64,
    ) -> (f64, f64) {
        print!("  {:<10} {:>14}", "format", "qemu-img bench");
        for (name, _) in placements {
            print!(" {name:>15}");
        }
        println!();
        let (mut lowest_qemu, mut lowest_ceiling) = (f64::MAX, f64::MAX);
        for (i, (name, _, _)) in images.iter().enumerate() {
            print!("  {name:<10} {:>14.0}", mbps(self.qemu[i]));
            for &cell in &self.ours[i] {
                let ratio = self.qemu[i].as_secs_f64() / cell.as_secs_f64();
                lowest_qemu = lowest_qemu.min(ratio);
                lowest_ceiling = lowest_ceiling.min(self.pread.as_secs_f64() / cell.as_secs_f64());
                print!(" {:>7.0} ({ratio:>4.2}x)", mbps(cell));
            }
            println!();
        }
        (lowest_qemu, lowest_ceiling)
    }
}

/// Part 9; `raw` is a fully written raw image of `size_mib` MiB.
pub fn run_reads(dir: &Path, raw: &Path, size_mib: usize, rounds: u32) -> Bench<()> {
    let pages = size_mib as u32;
    let mbps = |d: Duration| size_mib as f64 / d.as_secs_f64();
    let images = make_images(dir, raw)?;
    let mut aligned = Placed::new(Some(0));
    // The page cache as the writers left it: small pages, each mapped by
    // a fault of its own on a first pass (a +16 column for every format).
    for (_, _, path) in &images {
        read_whole(path, aligned.buf())?;
    }
    // Three rounds at most: this table shows a state, not a target.
    let written = measure(&images, raw, &PLACEMENTS[3..4], pages, rounds.min(3))?;
    // The page cache as a read of a source on disk leaves it: the kernel's
    // read-ahead fills it with large pages. This is the state a cloning
    // tool meets (its source was written long before), and the rows below
    // are measured in it.
    for (_, _, path) in &images {
        drop_from_cache(path)?;
        read_whole(path, aligned.buf())?;
    }
    let table = measure(&images, raw, PLACEMENTS, pages, rounds)?;
    let memcpy = (0..rounds)
        .map(|_| time_memcpy(pages))
        .min()
        .unwrap_or(Duration::MAX);
    let malloc_past = Placed::new(None).past_page();
    println!(
        "sequential 1 MiB pages of a {size_mib} MiB fully written image through VDDR_Open + \
         COW_ReadPage, best of {rounds} interleaved rounds, MiB/s (ratio to qemu-img bench -d 1 \
         on the same file)"
    );
    println!(
        "  this machine: pread of the raw file into a 4096-aligned buffer (the kernel's copy \
         from the page cache, the ceiling) {:.0} MiB/s; glibc memcpy of 1 MiB between buffers {:.0} MiB/s",
        mbps(table.pread),
        mbps(memcpy)
    );
    println!("  (the malloc buffer starts {malloc_past} bytes past a page boundary)");
    println!("  page cache filled by a read, as for a source written long before:");
    let (lowest_qemu, lowest_ceiling) = table.print(&images, PLACEMENTS, mbps);
    println!(
        "  lowest ratio to qemu-img bench {lowest_qemu:.2}x (target >= 1.20x); lowest share of \
         the pread ceiling {lowest_ceiling:.2} (target >= 0.83, i.e. within 1.2x)"
    );
    let (written_qemu, written_ceiling) = {
        println!(
            "  page cache as qemu-img's writes left it (small pages, each mapped by a fault of \
             its own; best of {}; pread ceiling {:.0} MiB/s):",
            rounds.min(3),
            mbps(written.pread)
        );
        written.print(&images, &PLACEMENTS[3..4], mbps)
    };
    println!(
        "  as the writes left it: lowest ratio to qemu-img bench {written_qemu:.2}x; lowest \
         share of the pread ceiling {written_ceiling:.2}"
    );
    println!();

    // 2. Parallel readers of one overlay handle, with the page sizes of a
    // legacy cloning tool (1 MiB) and of NBD requests (64 KiB).
    println!(
        "parallel readers: one overlay handle over the {size_mib} MiB qcow2 and raw images, \
         two threads reading disjoint halves vs one reading it all, best of {rounds} alternating \
         rounds"
    );
    let file = std::fs::File::open(raw).map_err(err)?;
    for shift in [PAGE_SHIFT, PAGE_SHIFT - 4] {
        let page = 512usize << shift;
        let count = (size_mib * MIB / page) as u32;
        let label = format!("{} KiB pages", page / 1024);
        let (one, two) = one_and_two(rounds, count, |range| {
            let mut buf = Placed::new(Some(0));
            for i in range {
                file.read_exact_at(&mut buf.buf()[..page], u64::from(i) * page as u64)
                    .map_err(err)?;
            }
            Ok(())
        })?;
        println!(
            "  {label:<14} plain pread of the raw file (this machine): 1 thread {:>6.0} MiB/s   \
             2 threads {:>6.0} MiB/s   speed-up {:.2}x",
            mbps(one),
            mbps(two),
            one.as_secs_f64() / two.as_secs_f64()
        );
        for (name, _, path) in images
            .iter()
            .filter(|(n, _, _)| *n == "qcow2" || *n == "raw")
        {
            let overlay = Handle::open(path)?.overlay()?;
            let (one, two) = one_and_two(rounds, count, |range| {
                let mut buf = Placed::new(None);
                overlay.read_pages_of(shift, range, buf.buf())
            })?;
            println!(
                "  {label:<14} {name:<6} overlay, malloc buffers: 1 thread {:>6.0} MiB/s   \
                 2 threads {:>6.0} MiB/s   speed-up {:.2}x (target >= 1.80x)",
                mbps(one),
                mbps(two),
                one.as_secs_f64() / two.as_secs_f64()
            );
        }
    }
    // Random 4 KiB reads, each thread in its half of the overlay: bound by
    // the work per read and the handle's lock, not by the memory
    // bandwidth.
    let overlay = Handle::open(raw)?.overlay()?;
    let sectors = u64::from(pages) * 2048;
    let count = 100 * pages;
    let (one, two) = one_and_two(rounds, count, |reads| {
        // The reads' share of the count is their share of the overlay.
        let first = u64::from(reads.start) * sectors / u64::from(count);
        let end = u64::from(reads.end) * sectors / u64::from(count);
        overlay.random_reads(
            u64::from(reads.start) + 7,
            reads.len() as u32,
            first,
            end - first,
        )
    })?;
    let rate = |d: Duration| f64::from(count) / d.as_secs_f64();
    println!(
        "  random 4 KiB reads of the raw overlay, each thread in its half: 1 thread {:>8.0} \
         reads/s   2 threads {:>8.0} reads/s   speed-up {:.2}x (target >= 1.80x)",
        rate(one),
        rate(two),
        one.as_secs_f64() / two.as_secs_f64()
    );
    println!();
    Ok(())
}
