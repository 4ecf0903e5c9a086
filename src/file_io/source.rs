//! A source image file: read-only, with reads at memory speed into any
//! buffer.
//!
//! A read into a buffer the kernel copies slowly (see `file_io`: a `malloc`
//! block 16 bytes past a page boundary) costs the kernel's copy into a
//! bounce buffer plus ours out of it: about half the speed of a read into
//! an aligned buffer. Copying the bytes from a read-only map of the file
//! costs one copy, at `memcpy` speed, whatever the buffer's placement (the
//! benchmark shows both).
//!
//! A map turns an I/O error while faulting a page in into SIGBUS, which
//! would end the caller's process where `pread` returns EIO: a real risk
//! for an imaging tool reading failing media. So no page is touched by the
//! copy before it is known to need no I/O, one of two ways (`Check`): the
//! range is faulted in with `MADV_POPULATE_READ` (Linux 5.14), which
//! reports a page it cannot bring in (an I/O error, a file truncated under
//! the map) as an error instead of a signal; or `mincore` says every page
//! is resident (and if not, the populate decides). Each file times both
//! and takes the one that has cost it less: how the file's pages sit in
//! the page cache decides which (docs/PERFORMANCE.md). On an error the
//! read goes through `pread` (via `file_io`), which returns the real one.
//! A kernel without `MADV_POPULATE_READ` reads the map only where
//! `mincore` says every page is resident.
//!
//! What remains is a race: a page reclaimed again (memory pressure) or
//! truncated away by another process in the microseconds between the
//! check and the copy, whose fault then fails, ends the process with
//! SIGBUS (as it would in git or ripgrep, which map files the same way).
//! Sources are opened read-only and are not expected to change while read;
//! `COWDISK_NO_MMAP=1` in the environment turns the map off (reads into
//! slowly placed buffers then run at the bounce buffer's speed).
//!
//! The only `unsafe` outside the C layer lives here: mapping the file and
//! asking `mincore` about the map (the populate is memmap2's safe call).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use memmap2::{Advice, Mmap};

use super as file_io;

const PAGE: usize = 4096;

/// A source image's file (read-only); derefs to the `File`.
#[derive(Debug)]
pub struct SourceFile {
    file: File,
    /// The map, made at the first read that can use it (`None` when the
    /// file cannot be mapped or maps are turned off).
    map: OnceLock<Option<Mmap>>,
    /// What a copy from the map has cost lately, each way of checking.
    costs: CheckCosts,
}

impl Deref for SourceFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl std::os::fd::AsFd for SourceFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<File> for SourceFile {
    fn from(file: File) -> SourceFile {
        SourceFile::new(file)
    }
}

fn maps_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var_os("COWDISK_NO_MMAP").is_none_or(|v| v == "0"))
}

impl SourceFile {
    pub fn new(file: File) -> SourceFile {
        SourceFile {
            file,
            map: OnceLock::new(),
            costs: CheckCosts::default(),
        }
    }

    /// `FileExt::read_exact_at`, fast for any placement of `buf`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if file_io::needs_bounce(buf.as_ptr() as usize, offset, buf.len())
            && self.copy_mapped(buf, offset)
        {
            return Ok(());
        }
        file_io::read_exact_at(&self.file, buf, offset)
    }

    fn mapped(&self) -> Option<&Mmap> {
        self.map
            .get_or_init(|| {
                if !maps_allowed() {
                    return None;
                }
                // SAFETY: a read-only, shared map of a file this library
                // opened read-only and never writes; its bytes are only
                // copied out, after a check that they need no I/O (see the
                // module documentation for the race that remains).
                let map = unsafe { Mmap::map(&self.file) }.ok()?;
                Some(map)
            })
            .as_ref()
    }

    /// Copies `[offset, offset + buf.len())` from the map when it lies
    /// inside it and every page could be faulted in; false (nothing
    /// copied) when not. Checked the way that has cost this file less.
    fn copy_mapped(&self, buf: &mut [u8], offset: u64) -> bool {
        let check = self.costs.pick();
        let started = Instant::now();
        let copied = self.copy_mapped_with(check, buf, offset);
        if copied {
            self.costs.record(check, started.elapsed(), buf.len());
        }
        copied
    }

    fn copy_mapped_with(&self, check: Check, buf: &mut [u8], offset: u64) -> bool {
        let Some(map) = self.mapped() else {
            return false;
        };
        let Ok(start) = usize::try_from(offset) else {
            return false;
        };
        let Some(end) = start.checked_add(buf.len()).filter(|&e| e <= map.len()) else {
            return false;
        };
        let safe = match check {
            Check::Populate => populated(map, start, end),
            // Pages not all resident are populated (their I/O's errors
            // reported, not signalled), as the other way does.
            Check::Resident => resident(map, start, end) || populated(map, start, end),
        };
        if !safe {
            return false;
        }
        buf.copy_from_slice(&map[start..end]);
        true
    }
}

/// How a range of the map is made safe to copy, i.e. known to need no
/// I/O that could fail during the copy.
///
/// Which costs less depends on how the file's pages sit in the page cache
/// (measured, docs/PERFORMANCE.md): pages that came in by read-ahead, in
/// large folios, populate for next to nothing, where `mincore` asks about
/// each page (a fifth of a pass); pages a writer left in smaller folios
/// populate one by one (a third slower than letting the copy fault them
/// in), where `mincore` costs less. So each file times both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// `MADV_POPULATE_READ`: faults every page in, or fails; also brings
    /// pages that are not in the cache in.
    Populate,
    /// `mincore`: every page already resident (the copy's page faults then
    /// map them), else as `Populate`.
    Resident,
}

/// A copy in every `EXPLORE` tries the way not in favour, so a file whose
/// pages change state (written back, read in anew) gets the other way
/// when it becomes the cheaper one; the cost is one copy in 32 made the
/// dearer way.
const EXPLORE: u32 = 32;

thread_local! {
    static COPIES: Cell<u32> = const { Cell::new(0) };
}

/// Recent cost of a copy from the map each way, in nanoseconds per KiB
/// (0: not measured yet); an estimate several threads update without
/// coordination.
#[derive(Debug, Default)]
struct CheckCosts {
    populate: AtomicU64,
    resident: AtomicU64,
}

impl CheckCosts {
    fn cost(&self, check: Check) -> &AtomicU64 {
        match check {
            Check::Populate => &self.populate,
            Check::Resident => &self.resident,
        }
    }

    fn pick(&self) -> Check {
        if NO_POPULATE.load(Ordering::Relaxed) {
            return Check::Resident;
        }
        self.choose()
    }

    /// The way in favour, the other one in every `EXPLORE` copies on this
    /// thread, and a way not measured yet first.
    fn choose(&self) -> Check {
        let (populate, resident) = (
            self.populate.load(Ordering::Relaxed),
            self.resident.load(Ordering::Relaxed),
        );
        let favoured = match (populate, resident) {
            (0, _) => return Check::Populate,
            (_, 0) => return Check::Resident,
            _ if populate <= resident => Check::Populate,
            _ => Check::Resident,
        };
        let n = COPIES.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        match (n.is_multiple_of(EXPLORE), favoured) {
            (false, _) => favoured,
            (true, Check::Populate) => Check::Resident,
            (true, Check::Resident) => Check::Populate,
        }
    }

    /// Folds one copy's cost into the way's estimate: a minimum that
    /// creeps up by an eighth a copy. A copy slowed by something else (the
    /// machine's other work) does not count against its way; a way that
    /// has really become dearer is seen so within a few copies.
    fn record(&self, check: Check, took: std::time::Duration, bytes: usize) {
        let kib = (bytes as u64 / 1024).max(1);
        let sample = (u64::try_from(took.as_nanos()).unwrap_or(u64::MAX) / kib).max(1);
        let cost = self.cost(check);
        let old = cost.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            sample.min(old.saturating_add(old / 8).max(old + 1))
        };
        cost.store(new, Ordering::Relaxed);
    }
}

/// Whether the kernel refused `MADV_POPULATE_READ` as unknown (before
/// Linux 5.14); then `mincore` decides.
static NO_POPULATE: AtomicBool = AtomicBool::new(false);

/// Faults every page of `map[start..end]` in, reporting a page that cannot
/// be brought in as false instead of a SIGBUS on the copy. Without
/// `MADV_POPULATE_READ`: whether every page is resident already.
fn populated(map: &Mmap, start: usize, end: usize) -> bool {
    if !NO_POPULATE.load(Ordering::Relaxed) {
        match map.advise_range(Advice::PopulateRead, start, end - start) {
            Ok(()) => return true,
            // The range is inside the map: EINVAL means an unknown advice.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                NO_POPULATE.store(true, Ordering::Relaxed);
            }
            Err(_) => return false,
        }
    }
    resident(map, start, end)
}

/// Whether every page of `map[start..end]` is in the page cache.
fn resident(map: &Mmap, start: usize, end: usize) -> bool {
    let first = start - start % PAGE;
    let pages = (end - first).div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `first` is page-aligned inside the map (the map starts on a
    // page), the range lies inside the map, and `vec` holds one byte per
    // page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(first) as *mut libc::c_void,
            end - first,
            vec.as_mut_ptr(),
        )
    };
    rc == 0 && vec.iter().all(|v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_equal_the_files_bytes_resident_or_not_at_every_placement() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        file.write_all(&data).unwrap();
        let source = SourceFile::new(file);
        let mut backing = vec![0u8; 1 << 21];
        let mut from_map = 0;
        for past in [0usize, 1, 16, 31, 32, 512] {
            for (offset, len) in [
                (0u64, 1 << 20),
                (4096, 65_536),
                (77, 300_001),
                (2_900_000, 100_000),
            ] {
                let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE + past;
                let buf = &mut backing[start..start + len];
                buf.fill(0xEE);
                if file_io::needs_bounce(buf.as_ptr() as usize, offset, len)
                    && source.copy_mapped(buf, offset)
                {
                    from_map += 1;
                }
                buf.fill(0xEE);
                source.read_exact_at(buf, offset).unwrap();
                assert!(
                    buf == &data[offset as usize..offset as usize + len],
                    "{past} {offset} {len}"
                );
            }
        }
        // The slowly placed reads came from the map.
        assert!(from_map >= 4, "the map served {from_map} reads");
        // The kernels without MADV_POPULATE_READ ask mincore: the file was
        // just written, so every page is resident.
        let map = source.mapped().unwrap();
        assert!(resident(map, 0, data.len()));
        // Past the end: the plain read's error.
        let mut buf = vec![0u8; 1 << 20];
        let err = source.read_exact_at(&mut buf[1..], 2_500_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_file_truncated_under_its_map_gives_the_reads_error_not_sigbus() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![0x5Au8; 3 << 20]).unwrap();
        let source = SourceFile::new(std::fs::File::open(file.path()).unwrap());
        let mut backing = vec![0u8; (1 << 20) + 2 * PAGE];
        let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE + 16;
        let buf = &mut backing[start..start + (1 << 20)];
        // A first read makes the 3 MiB map; the file then shrinks to 1 MiB
        // under it, so touching the map past 1 MiB would raise SIGBUS.
        source.read_exact_at(buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5A));
        assert_eq!(source.mapped().map(|m| m.len()), Some(3 << 20));
        file.as_file().set_len(1 << 20).unwrap();
        assert!(file_io::needs_bounce(
            buf.as_ptr() as usize,
            2 << 20,
            buf.len()
        ));
        for check in [Check::Populate, Check::Resident] {
            assert!(
                !source.copy_mapped_with(check, buf, 2 << 20),
                "{check:?} copied from a truncated map"
            );
            // Inside the remaining bytes the map still serves.
            assert!(source.copy_mapped_with(check, &mut buf[..PAGE * 8], PAGE as u64 * 4 - 16));
        }
        let err = source.read_exact_at(buf, 2 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn copies_take_the_cheaper_check_and_try_the_other_now_and_then() {
        let costs = CheckCosts::default();
        // Unmeasured ways are tried first.
        assert_eq!(costs.choose(), Check::Populate);
        costs.record(
            Check::Populate,
            std::time::Duration::from_micros(40),
            1 << 20,
        );
        assert_eq!(costs.choose(), Check::Resident);
        costs.record(
            Check::Resident,
            std::time::Duration::from_micros(60),
            1 << 20,
        );
        let picks: Vec<Check> = (0..EXPLORE * 4).map(|_| costs.choose()).collect();
        let other = picks.iter().filter(|&&c| c == Check::Resident).count();
        assert_eq!(other, 4, "the dearer way tried once in {EXPLORE}");
        // One slow copy (the machine was busy) does not turn the choice.
        costs.record(
            Check::Populate,
            std::time::Duration::from_micros(400),
            1 << 20,
        );
        assert_eq!(costs.choose(), Check::Populate);
        // A way that became dearer for good is seen so within a few copies.
        for _ in 0..5 {
            costs.record(
                Check::Populate,
                std::time::Duration::from_micros(100),
                1 << 20,
            );
        }
        let picks: Vec<Check> = (0..EXPLORE).map(|_| costs.choose()).collect();
        assert!(picks.iter().filter(|&&c| c == Check::Resident).count() > 1);
        // The other way turns cheaper (a file's pages were read in anew):
        // after a few of its copies it is the favoured one.
        for _ in 0..8 {
            costs.record(
                Check::Resident,
                std::time::Duration::from_micros(10),
                1 << 20,
            );
        }
        let picks: Vec<Check> = (0..EXPLORE * 4).map(|_| costs.choose()).collect();
        let other = picks.iter().filter(|&&c| c == Check::Populate).count();
        assert_eq!(other, 4);
    }
}
