//! Crash consistency of the persistent store, under a fault-injecting
//! storage layer that loses power after a random write.
//!
//! At the power loss every write since the last flush independently
//! survives whole, survives torn at a random sector boundary, or is lost —
//! a harsher disk than "drop everything unflushed", since writes may also
//! land out of order. The store is then reopened (for writing, and
//! read-only with the log replayed in memory) and must equal the naive
//! model's state at the last flush or after a later acknowledged edit —
//! never anything else, and never fail to open.
//!
//! The cases vary the store's log size from the smallest the format allows
//! (64 KiB) to the default (16 MiB) and the pages per log entry (1 to the
//! format's 1,024), so transactions of several entries, transactions larger
//! than the log's free space (a checkpoint before the transaction), log
//! wraps and replays across a wrap all happen; a second test makes
//! transactions of hundreds of pages on fragmented maps, larger than the
//! whole of a small log (the flush must fail cleanly). Each test reads the
//! journal's counters and fails if a path was not reached; the figures are
//! printed.
//!
//! `COWDISK_CRASH_POINTS` sets the number of crash points of the first test
//! (CI: 2,000; `scripts/crash-soak.sh` runs 100,000), and a twentieth of it
//! (at least 100) for the second.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cowdisk::error::{Error, Result};
use cowdisk::overlay::space::Storage;
use cowdisk::overlay::StoreChoice;
use cowdisk::store::{self, check_store, journal_counters, JournalCounters};
use cowdisk::{Overlay, OverlayOptions};
use support::model::{apply, random_op, same, source, Model, Op};

/// The journal's knobs are process-wide: the tests take turns.
static KNOBS: Mutex<()> = Mutex::new(());

/// Log sizes the cases use: the format's smallest (64 KiB), a few small
/// ones, and the default.
const LOG_SIZES: [u64; 6] = [64 << 10, 68 << 10, 96 << 10, 256 << 10, 1 << 20, 16 << 20];
/// Pages per log entry the cases use (1,024 is the writer's default).
const ENTRY_PAGES: [usize; 4] = [1, 2, 5, 1024];

const PAGE: u64 = 4096;

/// A sparse byte space in 4 KiB pages.
#[derive(Clone, Default, PartialEq)]
struct Media {
    pages: BTreeMap<u64, Vec<u8>>,
    len: u64,
}

impl Media {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let page = self
                .pages
                .entry(at / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize]);
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - done);
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(Error::corrupt(format!(
                "read of {} bytes at {offset} past the end",
                buf.len()
            )));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(buf.len() - done);
            match self.pages.get(&(at / PAGE)) {
                Some(page) => buf[done..done + n].copy_from_slice(&page[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) {
        self.pages.retain(|&p, _| p * PAGE < len);
        if let Some(page) = self.pages.get_mut(&(len / PAGE)) {
            page[(len % PAGE) as usize..].fill(0);
        }
        self.len = len;
    }
}

enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

struct Device {
    durable: Media,
    live: Media,
    pending: Vec<Pending>,
    /// Writes left before the power fails (None: never).
    writes_left: Option<u64>,
    dead: bool,
}

impl Device {
    fn new(media: Media) -> Device {
        Device {
            durable: media.clone(),
            live: media,
            pending: Vec::new(),
            writes_left: None,
            dead: false,
        }
    }

    /// What the disk holds after the power failed: each write since the
    /// last flush survives, is torn at a sector boundary, or is lost.
    fn after_power_loss(&self, rng: &mut u64) -> Media {
        let mut media = self.durable.clone();
        for p in &self.pending {
            match (p, next(rng) % 3) {
                (Pending::Write(at, data), 0) => media.write(*at, data),
                (Pending::Write(at, data), 1) => {
                    let sectors = data.len() / 512;
                    let keep = if sectors == 0 {
                        0
                    } else {
                        next(rng) as usize % sectors
                    };
                    media.write(*at, &data[..keep * 512]);
                }
                (Pending::SetLen(len), 0 | 1) => media.set_len(*len),
                _ => {}
            }
        }
        media
    }
}

#[derive(Clone)]
struct FaultStorage(Arc<Mutex<Device>>);

fn power_lost() -> Error {
    Error::write_failed("power lost (fault injection)".into())
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.lock().unwrap().live.read(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.0.lock().unwrap();
        if d.dead {
            return Err(power_lost());
        }
        d.live.write(offset, buf);
        d.pending.push(Pending::Write(offset, buf.to_vec()));
        if let Some(left) = d.writes_left.as_mut() {
            *left -= 1;
            if *left == 0 {
                // This write was in flight when the power failed.
                d.dead = true;
                return Err(power_lost());
            }
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        let mut d = self.0.lock().unwrap();
        if d.dead {
            return Err(power_lost());
        }
        d.durable = d.live.clone();
        d.pending.clear();
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> Result<()> {
        let mut d = self.0.lock().unwrap();
        if d.dead {
            return Err(power_lost());
        }
        d.live.set_len(len);
        d.pending.push(Pending::SetLen(len));
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.0.lock().unwrap().live.len)
    }
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

fn crash_points() -> u64 {
    std::env::var("COWDISK_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// One crash point: random edits and flushes on a fresh store until the
/// power fails, then the checks. Returns how many acknowledged states
/// followed the last flush (for the summary).
fn crash_once(case: u64) -> usize {
    let mut rng = case.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let sectors = 1 + next(&mut rng) % 200;
    let granularity = 8 << (next(&mut rng) % 4);
    let src = source(sectors, next(&mut rng));
    let device = FaultStorage(Arc::new(Mutex::new(Device::new(Media::default()))));
    let mut model = Model::of(&src, granularity);
    let options = OverlayOptions {
        granularity,
        ..OverlayOptions::default()
    };
    // Half the cases rewrite map chunks whole (shadow paging) at every
    // flush; the others log their pages. Log size and entry size vary
    // independently of that.
    store::set_shadow_threshold(if case.is_multiple_of(2) { 1 } else { 96 });
    let log_size = LOG_SIZES[(case / 2 % LOG_SIZES.len() as u64) as usize];
    let entry_pages = ENTRY_PAGES[(next(&mut rng) % ENTRY_PAGES.len() as u64) as usize];
    store::set_log_limits(entry_pages, 1024);
    let store = StoreChoice::CreateOn {
        storage: Box::new(device.clone()),
        log_size,
    };
    let mut overlay = Overlay::build(Box::new(src.clone()), store, options).unwrap();
    // The power fails after 1..400 more writes (sometimes never, then at
    // the end of the run, with unflushed writes pending).
    device.0.lock().unwrap().writes_left = Some(1 + next(&mut rng) % 400);

    let mut acknowledged = vec![model.clone()];
    for _ in 0..80 {
        if device.0.lock().unwrap().dead {
            break;
        }
        if next(&mut rng).is_multiple_of(7) {
            if overlay.flush().is_ok() {
                acknowledged = vec![model.clone()];
            }
            continue;
        }
        let op = random_op(&mut rng);
        match apply(&mut overlay, &mut model, &op) {
            Ok(()) => acknowledged.push(model.clone()),
            Err(e) => {
                assert!(
                    device.0.lock().unwrap().dead,
                    "case {case}: {op:?} failed without a power loss: {e}"
                );
                break;
            }
        }
    }
    recover_and_check(case, device, overlay, &src, &acknowledged, &mut rng);
    acknowledged.len()
}

/// The power fails now: builds the image the disk holds, reopens it
/// read-only and read-write, and checks both against the candidates (the
/// state at the last flush, then those acknowledged after it), then that
/// the recovered store keeps working and is consistent.
fn recover_and_check(
    case: u64,
    device: FaultStorage,
    overlay: Overlay,
    src: &cowdisk::MemDisk,
    acknowledged: &[Model],
    rng: &mut u64,
) {
    device.0.lock().unwrap().dead = true;
    let image = device.0.lock().unwrap().after_power_loss(rng);
    drop(overlay); // its close fails: the power is off

    // Read-only: replayed in memory, the image untouched.
    let ro_device = FaultStorage(Arc::new(Mutex::new(Device::new(image.clone()))));
    let store = StoreChoice::OpenOn {
        storage: Box::new(ro_device.clone()),
        read_only: true,
    };
    let mut ro = Overlay::build(Box::new(src.clone()), store, OverlayOptions::default())
        .unwrap_or_else(|e| panic!("case {case}: read-only open after the crash failed: {e:?}"));
    let ro_match = acknowledged.iter().position(|m| same(&mut ro, m));
    drop(ro);
    assert!(
        ro_device.0.lock().unwrap().live == image,
        "case {case}: a read-only open changed the store"
    );

    // Read-write: the log replayed into the file.
    let rw_device = FaultStorage(Arc::new(Mutex::new(Device::new(image))));
    let store = StoreChoice::OpenOn {
        storage: Box::new(rw_device.clone()),
        read_only: false,
    };
    let mut rw = Overlay::build(Box::new(src.clone()), store, OverlayOptions::default())
        .unwrap_or_else(|e| panic!("case {case}: open after the crash failed: {e:?}"));
    let rw_match = acknowledged.iter().position(|m| same(&mut rw, m));
    assert!(
        rw_match.is_some(),
        "case {case}: the reopened store matches neither the last flushed state nor any of the {} acknowledged after it",
        acknowledged.len() - 1
    );
    assert_eq!(
        ro_match, rw_match,
        "case {case}: read-only and read-write opens disagree"
    );
    // The recovered store keeps working and stays consistent (a flush may
    // be refused as too large for a small log; the state stays usable).
    let mut recovered = acknowledged[rw_match.unwrap_or(0)].clone();
    for _ in 0..5 {
        let op = random_op(rng);
        apply(&mut rw, &mut recovered, &op).unwrap();
    }
    match rw.close() {
        Ok(()) => {}
        Err(ref e) if e.kind() == cowdisk::error::ErrorCode::NoSpace => {}
        Err(e) => panic!("case {case}: close after recovery failed: {e}"),
    }
    let report = check_store(&rw_device);
    assert!(report.is_consistent(), "case {case}: {:?}", report.problems);
}

/// Counter deltas since `before`, one per line.
fn counter_deltas(before: JournalCounters) -> JournalCounters {
    let now = journal_counters();
    JournalCounters {
        transactions: now.transactions - before.transactions,
        multi_entry_transactions: now.multi_entry_transactions - before.multi_entry_transactions,
        room_checkpoints: now.room_checkpoints - before.room_checkpoints,
        room_checkpoints_from_start: now.room_checkpoints_from_start
            - before.room_checkpoints_from_start,
        wrapped_entries: now.wrapped_entries - before.wrapped_entries,
        oversized_transactions: now.oversized_transactions - before.oversized_transactions,
        failed_transactions: now.failed_transactions - before.failed_transactions,
        replayed_wrapped_entries: now.replayed_wrapped_entries - before.replayed_wrapped_entries,
    }
}

#[test]
fn every_crash_point_recovers_the_last_flush_or_a_later_acknowledged_state() {
    let _turn = KNOBS.lock().unwrap_or_else(|p| p.into_inner());
    let before = journal_counters();
    let points = crash_points();
    let mut later = 0usize;
    for case in 0..points {
        later += crash_once(case);
    }
    store::set_log_limits(1024, 1024);
    store::set_shadow_threshold(96);
    let d = counter_deltas(before);
    println!("{points} crash points recovered; {later} acknowledged states were candidates");
    println!("journal paths reached: {d:#?}");
    // The rare paths were reached: several entries per transaction,
    // entries wrapped to offset 0 and replayed from there. (Transactions
    // larger than the free log are the next test's.)
    assert!(d.multi_entry_transactions > 0, "{d:?}");
    assert!(d.wrapped_entries > 0, "{d:?}");
    assert!(d.replayed_wrapped_entries > 0, "{d:?}");
}

/// One crash point with huge transactions: a fragmented map on a source of
/// 4,096 sectors (granularity 8), bursts of up to 400 scattered writes and
/// moves between flushes, so a transaction carries from a few to hundreds
/// of node pages, logged page by page (shadowing off) in entries of 1 to
/// 1,024 pages, on logs of 64 KiB to 1 MiB: many transactions are larger
/// than the log's free space, and some larger than the whole log (the
/// flush must then fail, acknowledging and freeing nothing). Metadata is
/// only written at flushes, so the candidates are the state at the last
/// successful flush and, if the power failed during a flush, the state
/// that flush was writing.
fn crash_huge(case: u64) {
    let mut rng = case.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    let sectors = 4096;
    let src = source(sectors, next(&mut rng));
    let device = FaultStorage(Arc::new(Mutex::new(Device::new(Media::default()))));
    let mut model = Model::of(&src, 8);
    let options = OverlayOptions {
        granularity: 8,
        ..OverlayOptions::default()
    };
    store::set_shadow_threshold(1 << 20);
    let entry_pages = [1, 3, 16, 1024][(next(&mut rng) % 4) as usize];
    store::set_log_limits(entry_pages, 1 << 20);
    let log_size = [64 << 10, 128 << 10, 512 << 10, 1 << 20][(next(&mut rng) % 4) as usize];
    let store = StoreChoice::CreateOn {
        storage: Box::new(device.clone()),
        log_size,
    };
    let mut overlay = Overlay::build(Box::new(src.clone()), store, options).unwrap();
    device.0.lock().unwrap().writes_left = Some(1 + next(&mut rng) % 3000);
    let mut flushed = model.clone();
    let mut in_flight = None;
    'run: for _ in 0..6 {
        let burst = 1 + next(&mut rng) % 400;
        for _ in 0..burst {
            let at = (next(&mut rng) % sectors) as u32;
            let op = match next(&mut rng) % 8 {
                0 => Op::Move(
                    (next(&mut rng) % sectors) as u32 * 16 + 3,
                    at * 16 + 3,
                    (1 + next(&mut rng) % 4) as u32 * 16 + 3,
                ),
                _ => Op::Write(at * 16 + 3, 16 + 3, next(&mut rng) as u8),
            };
            if let Err(e) = apply(&mut overlay, &mut model, &op) {
                assert!(
                    device.0.lock().unwrap().dead,
                    "huge case {case}: {op:?} failed without a power loss: {e}"
                );
                break 'run;
            }
        }
        match overlay.flush() {
            Ok(()) => flushed = model.clone(),
            Err(ref e) if e.kind() == cowdisk::error::ErrorCode::NoSpace => {
                // Refused before anything was written: still usable, and a
                // later flush refuses again (the pages are still dirty).
                assert!(!device.0.lock().unwrap().dead);
                assert!(same(&mut overlay, &model), "huge case {case}");
            }
            Err(_) => {
                in_flight = Some(model.clone());
                break;
            }
        }
    }
    let mut candidates = vec![flushed];
    candidates.extend(in_flight);
    recover_and_check(case, device, overlay, &src, &candidates, &mut rng);
}

#[test]
fn huge_transactions_on_small_logs_recover_or_are_refused_cleanly() {
    let _turn = KNOBS.lock().unwrap_or_else(|p| p.into_inner());
    let before = journal_counters();
    let points = (crash_points() / 20).max(100);
    for case in 0..points {
        crash_huge(case);
    }
    store::set_log_limits(1024, 1024);
    store::set_shadow_threshold(96);
    let d = counter_deltas(before);
    println!("{points} huge-transaction crash points recovered");
    println!("journal paths reached: {d:#?}");
    // Transactions of several entries, larger than the log's free space
    // (checkpoint first, sometimes restarting the log at 0), larger than
    // the whole log (refused), wrapped and replayed across the wrap.
    assert!(d.multi_entry_transactions > 0, "{d:?}");
    assert!(d.room_checkpoints > 0, "{d:?}");
    assert!(d.room_checkpoints_from_start > 0, "{d:?}");
    assert!(d.oversized_transactions > 0, "{d:?}");
    assert!(d.wrapped_entries > 0, "{d:?}");
    assert!(d.replayed_wrapped_entries > 0, "{d:?}");
}
