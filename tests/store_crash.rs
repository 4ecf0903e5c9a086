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
//! `COWDISK_CRASH_POINTS` sets the number of crash points (CI: 2,000;
//! `scripts/crash-soak.sh` runs 100,000).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cowdisk::error::{Error, Result};
use cowdisk::overlay::space::Storage;
use cowdisk::store::{self, check_store};
use cowdisk::{Overlay, OverlayOptions};
use support::model::{apply, random_op, same, source, Model};

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
            return Err(Error::Corrupt(format!(
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
    Error::Write("power lost (fault injection)".into())
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
    // flush; the others log their pages.
    store::set_shadow_threshold(if case.is_multiple_of(2) { 1 } else { 96 });
    let identity = store::identify(&mut src.clone()).unwrap();
    let mut overlay = Overlay::create_on(
        Box::new(device.clone()),
        Box::new(src.clone()),
        identity,
        options,
    )
    .unwrap();
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
    device.0.lock().unwrap().dead = true;
    let image = device.0.lock().unwrap().after_power_loss(&mut rng);
    drop(overlay); // its close fails: the power is off

    // Read-only: replayed in memory, the image untouched.
    let ro_device = FaultStorage(Arc::new(Mutex::new(Device::new(image.clone()))));
    let mut ro_storage: Box<dyn Storage> = Box::new(ro_device.clone());
    let opened = store::open_store(ro_storage.as_mut(), true)
        .unwrap_or_else(|e| panic!("case {case}: read-only open after the crash failed: {e}"));
    let mut ro = Overlay::from_opened(ro_storage, opened, Box::new(src.clone()), true);
    let ro_match = acknowledged.iter().position(|m| same(&mut ro, m));
    drop(ro);
    assert!(
        ro_device.0.lock().unwrap().live == image,
        "case {case}: a read-only open changed the store"
    );

    // Read-write: the log replayed into the file.
    let rw_device = FaultStorage(Arc::new(Mutex::new(Device::new(image))));
    let mut rw_storage: Box<dyn Storage> = Box::new(rw_device.clone());
    let opened = store::open_store(rw_storage.as_mut(), false)
        .unwrap_or_else(|e| panic!("case {case}: open after the crash failed: {e}"));
    let mut rw = Overlay::from_opened(rw_storage, opened, Box::new(src.clone()), false);
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
    // The recovered store keeps working and stays consistent.
    let mut recovered = acknowledged[rw_match.unwrap_or(0)].clone();
    for _ in 0..5 {
        let op = random_op(&mut rng);
        apply(&mut rw, &mut recovered, &op).unwrap();
    }
    rw.close().unwrap();
    let report = check_store(&rw_device);
    assert!(report.is_consistent(), "case {case}: {:?}", report.problems);
    acknowledged.len()
}

#[test]
fn every_crash_point_recovers_the_last_flush_or_a_later_acknowledged_state() {
    let points = crash_points();
    let mut later = 0usize;
    for case in 0..points {
        later += crash_once(case);
    }
    println!("{points} crash points recovered; {later} acknowledged states were candidates");
}
