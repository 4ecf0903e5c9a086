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

thread_local! {
    /// Where this thread's last read-ahead candidate ended.
    static LAST_END: std::cell::Cell<Option<(FileKey, u64)>> = const { std::cell::Cell::new(None) };
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
    let sequential = served || LAST_END.get() == Some((key, offset));
    LAST_END.set(Some((key, end)));
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
