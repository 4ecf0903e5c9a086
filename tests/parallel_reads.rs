//! Reads of one handle from several threads at once.
//!
//! Reads and BlockStatus share a handle's lock, so they run concurrently
//! (on one overlay, and inside every format reader with its caches);
//! writes and edits take it alone. These tests check, against bytes
//! computed by hand from a pattern (not against our own reads):
//!
//! * several threads reading random pages of images of every format made
//!   by `qemu-img convert` from a raw pattern file get the pattern's bytes;
//! * the same through the C ABI (`VDDR_Open`, `COW_CreateCowOverlay`,
//!   `COW_ReadPage`, `COW_BlockStatus`) on one shared overlay handle while
//!   another thread writes sectors: every sector a reader sees is either
//!   the pattern or a version the writer wrote whole (a write is never
//!   seen half done), and each thread's last error is its own;
//! * the reads did overlap (the threads were inside a read at the same
//!   time), so the test is not passing by accident of scheduling.
//!
//! `scripts/race-check.sh` runs this file under ThreadSanitizer.

mod support;

use std::ffi::{c_void, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cowdisk::ffi::api::{
    COW_BlockStatus, COW_Close, COW_CreateCowOverlay, COW_GetLastError, COW_ReadPage,
    COW_WriteSectors, VDDR_Open,
};
use cowdisk::ffi::types::{HCOW, HVDDR};
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::Disk;

use support::sh_ok;

const SECTOR: usize = 512;
/// 16 MiB: big enough for many pages and several qcow2 L2 tables.
const SECTORS: u64 = 32 * 1024;
const PAGE_SHIFT: u32 = 7; // 64 KiB pages
const PAGE_SECTORS: u64 = 1 << PAGE_SHIFT;

/// The pattern: every 8-byte word names its sector and position.
fn pattern_sector(lba: u64, out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let v = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64) << 3;
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// What the writer thread writes: version `v` of sector `lba`, each word
/// tagged so a torn sector (words of two versions) is caught.
fn written_sector(lba: u64, version: u64, out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let v = (version << 40) ^ (lba << 12) ^ i as u64 ^ 0xA5A5_0000_0000_0000;
        word.copy_from_slice(&v.to_le_bytes());
    }
}

fn make_pattern_file(path: &Path) {
    let mut data = vec![0u8; SECTORS as usize * SECTOR];
    for (lba, sector) in data.chunks_exact_mut(SECTOR).enumerate() {
        pattern_sector(lba as u64, sector);
    }
    std::fs::write(path, data).unwrap();
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Counts how often a thread entered a read while another was inside one.
#[derive(Default)]
struct Overlap {
    inside: AtomicU64,
    overlapped: AtomicU64,
}

impl Overlap {
    fn enter(&self) {
        if self.inside.fetch_add(1, Ordering::SeqCst) > 0 {
            self.overlapped.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

fn images(dir: &Path) -> Vec<(String, PathBuf)> {
    let raw = dir.join("pattern.raw");
    make_pattern_file(&raw);
    let mut out = vec![("raw".to_string(), raw.clone())];
    for (format, ext, opts) in [
        ("qcow2", "qcow2", "-o cluster_size=4096"),
        ("vdi", "vdi", ""),
        ("vpc", "vhd", "-o force_size=on"),
        ("vhdx", "vhdx", ""),
        ("vmdk", "vmdk", ""),
        ("parallels", "hds", ""),
    ] {
        let path = dir.join(format!("pattern.{ext}"));
        sh_ok(&format!(
            "qemu-img convert -f raw -O {format} {opts} '{}' '{}'",
            raw.display(),
            path.display()
        ));
        out.push((format.to_string(), path));
    }
    // A compressed qcow2: its clusters go through the inflate cache.
    let path = dir.join("pattern-c.qcow2");
    sh_ok(&format!(
        "qemu-img convert -c -f raw -O qcow2 '{}' '{}'",
        raw.display(),
        path.display()
    ));
    out.push(("qcow2 -c".to_string(), path));
    out
}

#[test]
fn threads_reading_one_image_of_every_format_get_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    for (format, path) in images(dir.path()) {
        let disk: Arc<dyn Disk> = Arc::from(open_path(&path, &OpenOptions::default()).unwrap());
        assert_eq!(disk.sector_count(), SECTORS, "{format}");
        let overlap = Overlap::default();
        let threads = 4;
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (disk, overlap, start, format) = (&disk, &overlap, &start, &format);
                s.spawn(move || {
                    let mut rng = 0x1234_5678 + t as u64;
                    let mut buf = vec![0u8; 16 * SECTOR];
                    let mut want = vec![0u8; SECTOR];
                    start.wait();
                    // At least 600 reads each, and on until two overlapped
                    // (a read is short: threads may run one after another
                    // on a busy machine for a while).
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut reads = 0;
                    while reads < 600
                        || (overlap.overlapped.load(Ordering::SeqCst) == 0
                            && Instant::now() < deadline)
                    {
                        reads += 1;
                        let n = 1 + xorshift(&mut rng) % 16;
                        let lba = xorshift(&mut rng) % (SECTORS - n);
                        let part = &mut buf[..n as usize * SECTOR];
                        overlap.enter();
                        disk.read_sectors(lba, part).unwrap();
                        overlap.leave();
                        for (i, got) in part.chunks_exact(SECTOR).enumerate() {
                            pattern_sector(lba + i as u64, &mut want);
                            assert!(got == want, "{format}: sector {} differs", lba + i as u64);
                        }
                    }
                });
            }
        });
        let overlapped = overlap.overlapped.load(Ordering::SeqCst);
        println!("{format}: {overlapped} reads began while another was running");
        assert!(overlapped > 0, "{format}: the reads never overlapped");
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// A handle crosses threads as an integer.
#[derive(Clone, Copy)]
struct Handle(usize);

impl Handle {
    fn vddr(self) -> HVDDR {
        self.0 as HVDDR
    }
}

#[test]
fn readers_of_one_overlay_handle_run_while_a_writer_writes_and_errors_stay_per_thread() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("pattern.raw");
    make_pattern_file(&raw);
    let path = c_path(&raw);
    // SAFETY: a NUL-terminated path.
    let src = unsafe { VDDR_Open(path.as_ptr(), 0) };
    assert!(!src.is_null());
    // SAFETY: a live handle of the library, adopted by the overlay.
    let ov = unsafe { COW_CreateCowOverlay(src) };
    assert!(!ov.is_null());
    let handle = Handle(ov as usize);

    // The writer rewrites the sectors of the first 64 pages' first 8
    // sectors, in versions 1..; readers accept the pattern or any whole
    // version of a sector.
    let written_pages = 64u64;
    let done = AtomicBool::new(false);
    let overlap = Overlap::default();
    let readers = 3;
    let start = Barrier::new(readers + 1);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut data = vec![0u8; 8 * SECTOR];
            start.wait();
            let mut version = 1u64;
            let deadline = Instant::now() + Duration::from_millis(400);
            while Instant::now() < deadline || version < 50 {
                let page = version % written_pages;
                let lba = page * PAGE_SECTORS;
                for (i, sector) in data.chunks_exact_mut(SECTOR).enumerate() {
                    written_sector(lba + i as u64, version, sector);
                }
                // SAFETY: a live overlay handle; `data` holds 8 sectors.
                let rc = unsafe {
                    COW_WriteSectors(
                        handle.vddr() as HCOW,
                        data.as_mut_ptr().cast::<c_void>(),
                        lba,
                        8,
                    )
                };
                assert_eq!(rc, 1, "WriteSectors failed");
                assert_eq!(COW_GetLastError(), 0);
                version += 1;
            }
            writes.store(version - 1, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
        });
        for t in 0..readers {
            let (done, overlap, start) = (&done, &overlap, &start);
            s.spawn(move || {
                let mut rng = 0xDEAD_BEEF + t as u64;
                let mut page = vec![0u8; PAGE_SECTORS as usize * SECTOR];
                let mut want = vec![0u8; SECTOR];
                let pages = SECTORS / PAGE_SECTORS;
                start.wait();
                let mut rounds = 0;
                while !done.load(Ordering::SeqCst) || rounds < 200 {
                    rounds += 1;
                    // Every few rounds, a page past the end: this thread's
                    // last error must say so, whatever the others do.
                    if rounds % 7 == 0 {
                        // SAFETY: a live handle, a whole-page buffer.
                        let rc = unsafe {
                            COW_ReadPage(
                                handle.vddr(),
                                page.as_mut_ptr().cast(),
                                pages as u32 + 3,
                                PAGE_SHIFT,
                            )
                        };
                        assert_eq!(rc, 0);
                        assert_eq!(COW_GetLastError(), cowdisk::error::code::INVBLOCK);
                        continue;
                    }
                    let i = xorshift(&mut rng) % pages;
                    overlap.enter();
                    // SAFETY: a live handle, a whole-page buffer.
                    let rc = unsafe {
                        COW_ReadPage(
                            handle.vddr(),
                            page.as_mut_ptr().cast(),
                            i as u32,
                            PAGE_SHIFT,
                        )
                    };
                    // SAFETY: as above.
                    let status = unsafe {
                        COW_BlockStatus(handle.vddr(), i * PAGE_SECTORS, (i + 1) * PAGE_SECTORS - 1)
                    };
                    overlap.leave();
                    assert_eq!(rc, 1, "ReadPage of page {i}");
                    assert_eq!(status, 1, "BlockStatus of page {i}");
                    assert_eq!(COW_GetLastError(), 0);
                    for (k, got) in page.chunks_exact(SECTOR).enumerate() {
                        let lba = i * PAGE_SECTORS + k as u64;
                        pattern_sector(lba, &mut want);
                        if got == want {
                            continue;
                        }
                        // Not the pattern: a whole version the writer wrote.
                        let first = u64::from_le_bytes(got[..8].try_into().unwrap());
                        let version = (first ^ 0xA5A5_0000_0000_0000 ^ (lba << 12)) >> 40;
                        written_sector(lba, version, &mut want);
                        assert!(
                            k < 8 && i < written_pages && got == want,
                            "sector {lba} is neither the pattern nor a whole written version"
                        );
                    }
                }
            });
        }
    });
    let overlapped = overlap.overlapped.load(Ordering::SeqCst);
    println!(
        "{} writes; {overlapped} reads began while another reader was inside one",
        writes.load(Ordering::SeqCst)
    );
    assert!(overlapped > 0, "the readers never overlapped");
    // SAFETY: a live handle, closed once.
    assert!(unsafe { COW_Close(ov) }.is_null());
    assert_eq!(COW_GetLastError(), 0);
}
