//! Read-ahead of source images on the second core, for sequential reads
//! into badly placed buffers.
//!
//! A read into a buffer the kernel copies slowly (see `file_io`) costs two
//! copies: the kernel's into a well-placed bounce buffer, then ours into
//! the caller's buffer. When such reads run front to back through a file
//! (a legacy cloning tool reading 1 MiB pages into a `malloc`ed buffer),
//! a background thread makes the kernel's copy of the next piece while the
//! caller copies the current one out, so the caller's thread only copies
//! from memory and the sequence runs at the speed of the kernel's copy into
//! an aligned buffer.
//!
//! Only source images use it (they are opened read-only; a store or a
//! writable image is never read ahead, so nothing can be served stale by
//! our own writes). A piece read ahead is used only by a read of exactly
//! that file (device and inode), offset and length; its errors are never
//! reported (the read is simply made again, in the caller's thread). A
//! caller waits at most `WAIT` for a piece in flight, and a worker lost to
//! `fork` is started again in the child.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::file_io;

/// Reads shorter than this are not worth a thread hand-off.
const AHEAD_MIN: usize = 256 * 1024;
/// Nor are reads longer than this held in memory twice.
const AHEAD_MAX: usize = 8 << 20;
/// Pieces read ahead or in flight, over all files and threads.
const SLOTS: usize = 4;
const PAGE: usize = 4096;
const WAIT: Duration = Duration::from_secs(2);

type FileKey = (u64, u64);

enum State {
    Queued(File),
    Reading,
    /// The bytes, from `start` in the buffer.
    Ready(Vec<u8>, usize),
    Failed,
}

struct Slot {
    key: FileKey,
    offset: u64,
    len: usize,
    state: State,
}

struct Shared {
    slots: Vec<Slot>,
    spare: Vec<Vec<u8>>,
    worker_pid: u32,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared {
    slots: Vec::new(),
    spare: Vec::new(),
    worker_pid: 0,
});
/// Wakes the worker (a piece was queued).
static QUEUED: Condvar = Condvar::new();
/// Wakes callers (a piece is ready or failed).
static FINISHED: Condvar = Condvar::new();

/// Files per thread whose last read's end is remembered (a qcow2 chain or
/// a multi-extent VMDK reads several files in turn).
const STREAMS: usize = 4;

thread_local! {
    /// Where this thread's last reads of its last few files ended, most
    /// recent first.
    static LAST_ENDS: std::cell::RefCell<[Option<(FileKey, u64)>; STREAMS]> =
        const { std::cell::RefCell::new([None; STREAMS]) };
}

/// Whether this thread's last read of `key` ended at `offset`; records
/// that its read now ends at `end`.
fn continues(key: FileKey, offset: u64, end: u64) -> bool {
    LAST_ENDS.with(|cell| {
        let Ok(mut ends) = cell.try_borrow_mut() else {
            return false;
        };
        let at = ends
            .iter()
            .position(|e| matches!(e, Some((k, _)) if *k == key))
            .unwrap_or(STREAMS - 1);
        let was = ends[at];
        ends.copy_within(0..at, 1);
        ends[0] = Some((key, end));
        was == Some((key, offset))
    })
}

fn lock() -> MutexGuard<'static, Shared> {
    // Every change below leaves the slots consistent between statements.
    SHARED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters for tests: pieces served from read-ahead, and read into.
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many reads so far were served by a piece read ahead.
pub fn served_count() -> u64 {
    SERVED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `file_io::read_exact_at` for a source image: the same bytes, with
/// read-ahead for sequential reads into slowly copied buffers.
pub fn read_source_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let len = buf.len();
    if !(AHEAD_MIN..=AHEAD_MAX).contains(&len)
        || !file_io::needs_bounce(buf.as_ptr() as usize, offset, len)
    {
        return file_io::read_exact_at(file, buf, offset);
    }
    let meta = file.metadata()?;
    let key = (meta.dev(), meta.ino());
    let end = offset.saturating_add(len as u64);
    let served = match take(key, offset, len) {
        Some((data, start)) => {
            buf.copy_from_slice(&data[start..start + len]);
            give_back(data);
            SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
        None => {
            file_io::read_exact_at(file, buf, offset)?;
            false
        }
    };
    let sequential = continues(key, offset, end) || served;
    if sequential && end < meta.len() {
        if let Ok(copy) = file.try_clone() {
            request(key, copy, end, len);
        }
    }
    Ok(())
}

/// The piece for exactly (`key`, `offset`, `len`), waiting for it if it is
/// in flight; `None` when there is none (or it failed, or took too long).
fn take(key: FileKey, offset: u64, len: usize) -> Option<(Vec<u8>, usize)> {
    let mut shared = lock();
    loop {
        let at = shared
            .slots
            .iter()
            .position(|s| s.key == key && s.offset == offset && s.len == len)?;
        match shared.slots[at].state {
            State::Ready(..) | State::Failed => {
                return match shared.slots.remove(at).state {
                    State::Ready(data, start) => Some((data, start)),
                    _ => None,
                };
            }
            State::Queued(_) | State::Reading => {
                ensure_worker(&mut shared);
                let (next, timeout) = FINISHED
                    .wait_timeout(shared, WAIT)
                    .unwrap_or_else(|p| p.into_inner());
                shared = next;
                if timeout.timed_out() {
                    return None;
                }
            }
        }
    }
}

fn give_back(buffer: Vec<u8>) {
    let mut shared = lock();
    if shared.spare.len() < SLOTS {
        shared.spare.push(buffer);
    }
}

/// Queues the piece (`key`, `offset`, `len`) to be read from `file`.
fn request(key: FileKey, file: File, offset: u64, len: usize) {
    let mut shared = lock();
    if shared
        .slots
        .iter()
        .any(|s| s.key == key && s.offset == offset)
    {
        return;
    }
    if shared.slots.len() >= SLOTS {
        // Make room by dropping the oldest piece nobody is reading.
        let Some(old) = shared
            .slots
            .iter()
            .position(|s| !matches!(s.state, State::Reading))
        else {
            return;
        };
        if let State::Ready(data, _) = shared.slots.remove(old).state {
            if shared.spare.len() < SLOTS {
                shared.spare.push(data);
            }
        }
    }
    shared.slots.push(Slot {
        key,
        offset,
        len,
        state: State::Queued(file),
    });
    ensure_worker(&mut shared);
    QUEUED.notify_one();
}

/// Starts the worker unless this process has one (a `fork` leaves the
/// child without it).
fn ensure_worker(shared: &mut Shared) {
    let pid = std::process::id();
    if shared.worker_pid == pid {
        return;
    }
    let started = std::thread::Builder::new()
        .name("cowdisk-read-ahead".into())
        .spawn(work);
    if started.is_ok() {
        shared.worker_pid = pid;
    }
}

fn work() {
    let mut shared = lock();
    loop {
        let queued = shared
            .slots
            .iter()
            .position(|s| matches!(s.state, State::Queued(_)));
        let Some(at) = queued else {
            shared = QUEUED.wait(shared).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let State::Queued(file) = std::mem::replace(&mut shared.slots[at].state, State::Reading)
        else {
            continue;
        };
        let (key, offset, len) = (
            shared.slots[at].key,
            shared.slots[at].offset,
            shared.slots[at].len,
        );
        let mut buffer = shared.spare.pop().unwrap_or_default();
        drop(shared);
        if buffer.len() < len + PAGE {
            buffer.resize(len + PAGE, 0);
        }
        // Half a page from the offset's place in its page: fast for the
        // kernel's copy in, and for the copy out to a slowly placed buffer.
        let wanted = (offset as usize).wrapping_add(PAGE / 2) % PAGE;
        let start = (wanted + PAGE - buffer.as_ptr() as usize % PAGE) % PAGE;
        let result = file.read_exact_at(&mut buffer[start..start + len], offset);
        drop(file);
        shared = lock();
        if let Some(slot) = shared
            .slots
            .iter_mut()
            .find(|s| s.key == key && s.offset == offset && s.len == len)
        {
            slot.state = match result {
                Ok(()) => State::Ready(buffer, start),
                Err(_) => State::Failed,
            };
        }
        FINISHED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: usize = 1 << 20;

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    /// A 1 MiB buffer 16 bytes past a page boundary (where malloc puts one).
    fn misplaced(backing: &mut Vec<u8>) -> &mut [u8] {
        backing.resize(MIB + 2 * PAGE, 0);
        let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE + 16;
        &mut backing[start..start + MIB]
    }

    #[test]
    fn sequential_misplaced_reads_are_served_ahead_with_the_files_bytes() {
        let a = pattern(12 * MIB, 1);
        let b = pattern(12 * MIB, 2);
        let (fa, fb) = (file_of(&a), file_of(&b));
        let mut backing = Vec::new();
        let before = served_count();
        // Two files read front to back in turn, at the same offsets: each
        // gets its own bytes.
        for page in 0..12 {
            for (file, bytes) in [(&fa, &a), (&fb, &b)] {
                let buf = misplaced(&mut backing);
                read_source_at(file, buf, (page * MIB) as u64).unwrap();
                assert!(buf == &bytes[page * MIB..(page + 1) * MIB], "page {page}");
            }
        }
        assert!(served_count() - before >= 10, "read-ahead never served a read");
    }

    #[test]
    fn a_file_truncated_after_its_piece_was_read_ahead_reads_like_a_plain_read() {
        let bytes = pattern(4 * MIB, 3);
        let file = file_of(&bytes);
        let mut backing = Vec::new();
        for page in 0..2 {
            let buf = misplaced(&mut backing);
            read_source_at(&file, buf, (page * MIB) as u64).unwrap();
        }
        // Page 2 is (being) read ahead; the file now loses its last half.
        file.set_len(2 * MIB as u64 + 100).unwrap();
        let buf = misplaced(&mut backing);
        let got = read_source_at(&file, buf, 2 * MIB as u64);
        // Either the piece read ahead before the truncation (the bytes the
        // file had) or the plain read's error; never other bytes.
        match got {
            Ok(()) => assert!(buf == &bytes[2 * MIB..3 * MIB]),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
        }
        let buf = misplaced(&mut backing);
        let err = read_source_at(&file, buf, 3 * MIB as u64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn short_and_well_placed_reads_go_straight_in() {
        let bytes = pattern(2 * MIB, 4);
        let file = file_of(&bytes);
        let mut backing = vec![0u8; MIB + 2 * PAGE];
        let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE;
        let aligned = &mut backing[start..start + MIB];
        read_source_at(&file, aligned, 0).unwrap();
        assert!(aligned == &bytes[..MIB]);
        read_source_at(&file, &mut aligned[..4096], MIB as u64).unwrap();
        assert!(aligned[..4096] == bytes[MIB..MIB + 4096]);
    }
}
