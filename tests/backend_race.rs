//! Calls through a built-in backend table racing with its close: threads
//! read, size and query an image through the table while another thread
//! closes it. Every call must either work (and read the right bytes) or be
//! refused with an error code; none may touch freed memory. Run plainly in
//! CI, and under ThreadSanitizer by `scripts/race-check.sh` (which also
//! catches the use-after-free the old code had).
//!
//! `COWDISK_RACE_ROUNDS` sets the rounds (default 300).

use std::ffi::{c_void, CString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use cowdisk::ffi::backend::{COW_FindBackend, COW_BACKEND};
use cowdisk::ffi::types::S_UUID;

const SIZE: usize = 1 << 20;

fn byte_at(i: usize) -> u8 {
    (i / 512) as u8 ^ (i as u8).wrapping_mul(13)
}

fn raw_table() -> COW_BACKEND {
    let name = CString::new("raw").unwrap();
    // SAFETY: a NUL-terminated name; built-in tables are static.
    let table = unsafe { COW_FindBackend(name.as_ptr()) };
    assert!(!table.is_null());
    // SAFETY: non-NULL, static.
    unsafe { *table }
}

/// The table's data pointer crosses threads as an integer (it is opaque to
/// the caller; the library validates it on every call).
#[derive(Clone, Copy)]
struct Data(usize);

impl Data {
    fn ptr(self) -> *mut c_void {
        self.0 as *mut c_void
    }
}

#[derive(Default)]
struct Tally {
    worked: AtomicU64,
    refused: AtomicU64,
}

/// One reader thread: calls through the table until it has seen the image
/// refused a few times (closed) or made `limit` calls.
fn reader(data: Data, seed: usize, limit: usize, tally: &Tally) {
    let table = raw_table();
    let mut buf = vec![0u8; 4096];
    let mut refused_here = 0;
    for i in 0..limit {
        let ok = match (seed + i) % 4 {
            0 => {
                let offset = ((seed * 7919 + i * 4096) % (SIZE - 4096)) as u64;
                let mut done = 0usize;
                // SAFETY: a buffer of 4096 bytes and an out pointer.
                let rc = unsafe {
                    (table.pfnRead.unwrap())(
                        data.ptr(),
                        offset,
                        buf.len(),
                        buf.as_mut_ptr().cast(),
                        &mut done,
                    )
                };
                if rc == 0 {
                    assert_eq!(done, buf.len());
                    for (j, &b) in buf.iter().enumerate() {
                        assert_eq!(b, byte_at(offset as usize + j), "wrong byte read");
                    }
                }
                rc == 0
            }
            1 => {
                // SAFETY: data only.
                let size = unsafe { (table.pfnGetSize.unwrap())(data.ptr()) };
                size == SIZE as u64
            }
            2 => {
                let mut uuid = S_UUID::default();
                // SAFETY: an out pointer; raw images have no UUID (refused
                // even while open: only "no crash" is checked here).
                let _ = unsafe { (table.pfnGetUuid.unwrap())(data.ptr(), &mut uuid) };
                // SAFETY: data only.
                unsafe { (table.pfnGetOpenFlags.unwrap())(data.ptr()) };
                continue;
            }
            _ => {
                let mut comment = [0 as std::ffi::c_char; 32];
                // SAFETY: a buffer of 32 bytes.
                let _ = unsafe {
                    (table.pfnGetComment.unwrap())(data.ptr(), comment.as_mut_ptr(), comment.len())
                };
                // SAFETY: data only.
                unsafe { (table.pfnGetFileSize.unwrap())(data.ptr()) > 0 }
            }
        };
        if ok {
            tally.worked.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            refused_here += 1;
            if refused_here > 8 {
                break;
            }
        }
    }
}

#[test]
fn calls_racing_with_close_work_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.raw");
    std::fs::write(&path, (0..SIZE).map(byte_at).collect::<Vec<u8>>()).unwrap();
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let table = raw_table();
    let rounds: usize = std::env::var("COWDISK_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tally = Arc::new(Tally::default());
    let mut double_closes_refused = 0;
    for round in 0..rounds {
        let mut data: *mut c_void = std::ptr::null_mut();
        // SAFETY: a path and an out pointer.
        let rc = unsafe { (table.pfnOpen.unwrap())(cpath.as_ptr(), 0, &mut data) };
        assert_eq!(rc, 0, "open");
        let data = Data(data as usize);
        let start = Arc::new(Barrier::new(5));
        let readers: Vec<_> = (0..4)
            .map(|t| {
                let (start, tally) = (start.clone(), tally.clone());
                std::thread::spawn(move || {
                    start.wait();
                    reader(data, round * 4 + t, 400, &tally);
                })
            })
            .collect();
        start.wait();
        // Close after a varying head start of the readers; on some rounds
        // two threads close at once (one of them must be refused).
        for _ in 0..round % 64 {
            std::thread::yield_now();
        }
        let second = (round % 5 == 0).then(|| {
            std::thread::spawn(move || {
                // SAFETY: the data pointer (maybe closed by then).
                unsafe { (raw_table().pfnClose.unwrap())(data.ptr(), 0) }
            })
        });
        // SAFETY: as above.
        let first = unsafe { (table.pfnClose.unwrap())(data.ptr(), 0) };
        let closes = [Some(first), second.map(|h| h.join().unwrap())];
        let ok_closes = closes.iter().flatten().filter(|&&rc| rc == 0).count();
        assert_eq!(ok_closes, 1, "round {round}: closes {closes:?}");
        if closes[1].is_some() {
            double_closes_refused += 1;
        }
        for r in readers {
            r.join().unwrap();
        }
        // A stale pointer stays refused.
        // SAFETY: data only.
        assert_eq!(unsafe { (table.pfnGetSize.unwrap())(data.ptr()) }, 0);
    }
    let worked = tally.worked.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    println!(
        "{rounds} rounds: {worked} calls worked, {refused} were refused after a close, \
         {double_closes_refused} concurrent double closes had one refused"
    );
    // Both sides of the race happened.
    assert!(
        worked > 0 && refused > 0,
        "{worked} worked, {refused} refused"
    );
}
