//! The naive reference model of an overlay: a byte vector of the whole
//! drive and a status per sector, edited with plain `Vec` splicing; plus a
//! patterned source, and random edit operations with edge-biased positions.
#![allow(dead_code)]

use cowdisk::error::code;
use cowdisk::{MemDisk, SectorStatus};
use proptest::prelude::*;

pub const S: usize = 512;

/// The naive model of the virtual drive.
#[derive(Clone)]
pub struct Model {
    pub data: Vec<u8>,
    pub status: Vec<SectorStatus>,
    pub granularity: u64,
}

impl Model {
    pub fn sectors(&self) -> u64 {
        self.status.len() as u64
    }

    pub fn range_ok(&self, lba: u64, n: u64) -> bool {
        lba.checked_add(n).is_some_and(|e| e <= self.sectors())
    }

    pub fn insert(&mut self, lba: u64, n: u64) -> Result<(), u32> {
        if lba > self.sectors() {
            return Err(code::INVBLOCK);
        }
        let (l, n) = (lba as usize, n as usize);
        self.data.splice(l * S..l * S, vec![0u8; n * S]);
        self.status.splice(l..l, vec![SectorStatus::NotAlloc; n]);
        Ok(())
    }

    pub fn cut(&mut self, lba: u64, n: u64) -> (Vec<u8>, Vec<SectorStatus>) {
        let (l, n) = (lba as usize, n as usize);
        let data = self.data.drain(l * S..(l + n) * S).collect();
        let status = self.status.drain(l..l + n).collect();
        (data, status)
    }

    pub fn paste(&mut self, lba: u64, piece: (Vec<u8>, Vec<SectorStatus>)) {
        let l = lba as usize;
        self.data.splice(l * S..l * S, piece.0);
        self.status.splice(l..l, piece.1);
    }

    pub fn move_sectors(&mut self, from: u64, to: u64, n: u64) -> Result<(), u32> {
        if !self.range_ok(from, n) || to > self.sectors() {
            return Err(code::INVBLOCK);
        }
        if from <= to && to <= from + n {
            return Err(code::INVALIDMOVE);
        }
        let piece = self.cut(from, n);
        let dest = if to < from { to } else { to - n };
        self.paste(dest, piece);
        Ok(())
    }

    pub fn write(&mut self, lba: u64, bytes: &[u8]) -> Result<(), u32> {
        let n = (bytes.len() / S) as u64;
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        if n == 0 {
            return Ok(());
        }
        // Sector-exact: exactly the written sectors become data; the rest of
        // the COW units the write touches keeps its status, whatever the
        // granularity.
        let l = lba as usize;
        self.status[l..l + n as usize].fill(SectorStatus::Normal);
        self.data[l * S..l * S + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    pub fn delete(&mut self, lba: u64, n: u64) -> Result<(), u32> {
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        self.cut(lba, n);
        Ok(())
    }

    pub fn discard(&mut self, lba: u64, n: u64) -> Result<(), u32> {
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        let (l, n) = (lba as usize, n as usize);
        self.data[l * S..(l + n) * S].fill(0);
        self.status[l..l + n].fill(SectorStatus::NotAlloc);
        Ok(())
    }

    pub fn status_of(&self, lba: u64, n: u64) -> Result<SectorStatus, u32> {
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        let slice = &self.status[lba as usize..(lba + n) as usize];
        Ok(if slice.contains(&SectorStatus::Normal) {
            SectorStatus::Normal
        } else if slice.contains(&SectorStatus::Blank) {
            SectorStatus::Blank
        } else {
            SectorStatus::NotAlloc
        })
    }

    pub fn read(&self, lba: u64, n: u64) -> Result<(Vec<u8>, SectorStatus), u32> {
        let status = self.status_of(lba, n)?;
        let l = lba as usize;
        Ok((self.data[l * S..(l + n as usize) * S].to_vec(), status))
    }
}

/// A source with patterned data in runs of Normal, Blank and NotAlloc
/// sectors (non-Normal sectors hold zeros, as a real format reports them).
pub fn source(sectors: u64, layout_seed: u64) -> MemDisk {
    let mut data = vec![0u8; sectors as usize * S];
    let mut status = Vec::with_capacity(sectors as usize);
    let mut rng = layout_seed | 1;
    let mut s = 0;
    while s < sectors {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run = 1 + rng % 40;
        let kind = match rng >> 60 {
            0..=9 => SectorStatus::Normal,
            10..=12 => SectorStatus::Blank,
            _ => SectorStatus::NotAlloc,
        };
        for _ in 0..run.min(sectors - s) {
            if kind == SectorStatus::Normal {
                for (i, b) in data[s as usize * S..(s as usize + 1) * S]
                    .iter_mut()
                    .enumerate()
                {
                    *b = (s as u8).wrapping_mul(31) ^ (i as u8) ^ 0x5A | 1;
                }
            }
            status.push(kind);
            s += 1;
        }
    }
    MemDisk::new(data, status).unwrap()
}

#[derive(Debug, Clone)]
pub enum Op {
    Insert(u32, u32),
    Move(u32, u32, u32),
    Write(u32, u32, u8),
    Delete(u32, u32),
    Discard(u32, u32),
    Read(u32, u32),
    Status(u32, u32),
}

pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Insert(a, b)),
        3 => (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| Op::Move(a, b, c)),
        4 => (any::<u32>(), any::<u32>(), any::<u8>()).prop_map(|(a, b, c)| Op::Write(a, b, c)),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Delete(a, b)),
        2 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Discard(a, b)),
        2 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Read(a, b)),
        2 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Status(a, b)),
    ]
}

/// A position in `0..=size`, biased to the edges, sometimes past the end
/// (to exercise the errors).
pub fn pos(raw: u32, size: u64) -> u64 {
    match raw % 16 {
        0 => 0,
        1 => size,
        2 => size.saturating_sub(1),
        15 => size + 1 + u64::from(raw >> 4) % 3,
        _ => u64::from(raw >> 4) % (size + 1),
    }
}

/// A length for a range starting at `start`, biased to zero and to "to the
/// end", bounded by `cap`.
pub fn len(raw: u32, start: u64, size: u64, cap: u64) -> u64 {
    let room = size.saturating_sub(start);
    match raw % 12 {
        0 => 0,
        1 => room,
        2 => room + 1,
        _ => u64::from(raw >> 4) % (room.min(cap) + 1),
    }
}

impl Model {
    /// The model of a fresh overlay over `source`.
    pub fn of(source: &MemDisk, granularity: u64) -> Model {
        Model {
            data: source.data().to_vec(),
            status: source.statuses().to_vec(),
            granularity,
        }
    }
}

/// Applies `op` to the overlay, and to the model when the overlay accepted
/// it. An outcome the model agrees with (success, or the same error with
/// both unchanged) is `Ok`; any other overlay error is returned (a crash
/// test expects one when its storage has lost power).
pub fn apply(
    overlay: &mut cowdisk::Overlay,
    model: &mut Model,
    op: &Op,
) -> Result<(), cowdisk::Error> {
    use cowdisk::Disk;
    let size = model.sectors();
    let write_bytes = |n: u64, seed: u8| -> Vec<u8> {
        (0..n as usize * S)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    };
    let (result, expected) = match *op {
        Op::Insert(a, b) => {
            let (at, n) = (pos(a, size), u64::from(b) % 300);
            (overlay.insert(at, n), model.clone().insert(at, n))
        }
        Op::Move(a, b, c) => {
            let from = pos(a, size);
            let n = len(c, from, size, 400);
            let to = pos(b, size);
            (
                overlay.move_sectors(from, to, n),
                model.clone().move_sectors(from, to, n),
            )
        }
        Op::Write(a, b, seed) => {
            let at = pos(a, size);
            let bytes = write_bytes(len(b, at, size, 200), seed);
            (overlay.write(at, &bytes), model.clone().write(at, &bytes))
        }
        Op::Delete(a, b) => {
            let at = pos(a, size);
            let n = len(b, at, size, 300);
            (overlay.delete(at, n), model.clone().delete(at, n))
        }
        Op::Discard(a, b) => {
            let at = pos(a, size);
            let n = len(b, at, size, 300);
            (overlay.discard(at, n), model.clone().discard(at, n))
        }
        Op::Read(a, b) => {
            let at = pos(a, size);
            let n = len(b, at, size, u64::MAX);
            let mut buf = vec![0u8; n as usize * S];
            let got = overlay.read_sectors(at, &mut buf);
            match (&got, model.read(at, n)) {
                (Ok(status), Ok((bytes, want))) => {
                    assert_eq!(*status, want, "status of {op:?}");
                    assert!(buf == bytes, "bytes of {op:?}");
                    return Ok(());
                }
                (Err(e), Err(code)) if e.code() == code => return Ok(()),
                (Ok(_), Err(code)) => panic!("{op:?} succeeded; the model says error {code:#x}"),
                (Err(_), _) => return got.map(|_| ()),
            }
        }
        Op::Status(a, b) => {
            let at = pos(a, size);
            let n = len(b, at, size, u64::MAX);
            let got = overlay.block_status(at, n);
            match (&got, model.status_of(at, n)) {
                (Ok(s), Ok(want)) => {
                    assert_eq!(*s, want, "{op:?}");
                    return Ok(());
                }
                (Err(e), Err(code)) if e.code() == code => return Ok(()),
                (Ok(_), Err(code)) => panic!("{op:?} succeeded; the model says error {code:#x}"),
                (Err(_), _) => return got.map(|_| ()),
            }
        }
    };
    match (result, expected) {
        (Ok(()), Ok(())) => {
            // Replay on the real model now that the overlay acknowledged.
            let mut again = model.clone();
            let _ = match *op {
                Op::Insert(a, b) => again.insert(pos(a, size), u64::from(b) % 300),
                Op::Move(a, b, c) => {
                    let from = pos(a, size);
                    again.move_sectors(from, pos(b, size), len(c, from, size, 400))
                }
                Op::Write(a, b, seed) => {
                    let at = pos(a, size);
                    again.write(at, &write_bytes(len(b, at, size, 200), seed))
                }
                Op::Delete(a, b) => {
                    let at = pos(a, size);
                    again.delete(at, len(b, at, size, 300))
                }
                Op::Discard(a, b) => {
                    let at = pos(a, size);
                    again.discard(at, len(b, at, size, 300))
                }
                Op::Read(..) | Op::Status(..) => Ok(()),
            };
            *model = again;
            Ok(())
        }
        (Err(e), Err(code)) if e.code() == code => Ok(()),
        (Ok(()), Err(code)) => panic!("{op:?} succeeded; the model says error {code:#x}"),
        (Err(e), _) => Err(e),
    }
}

/// True when every byte and every sector's status of the overlay equal the
/// model's.
pub fn same(overlay: &mut cowdisk::Overlay, model: &Model) -> bool {
    use cowdisk::Disk;
    if overlay.sector_count() != model.sectors() {
        return false;
    }
    let mut all = vec![0u8; model.data.len()];
    if overlay.read_sectors(0, &mut all).is_err() || all != model.data {
        return false;
    }
    (0..model.sectors()).all(|s| overlay.block_status(s, 1).ok() == Some(model.status[s as usize]))
        && status_runs_match(overlay, model)
}

/// True when the overlay's `status_run`, walked from every sector the
/// previous run ended at, never claims a sector whose status in the model
/// differs from the run's (runs may stop early, never late).
pub fn status_runs_match(overlay: &mut cowdisk::Overlay, model: &Model) -> bool {
    use cowdisk::Disk;
    let size = model.sectors();
    let mut pos = 0;
    while pos < size {
        let Ok((status, n)) = overlay.status_run(pos, size - pos) else {
            return false;
        };
        let run = &model.status[pos as usize..];
        if n == 0 || n > size - pos || run[..n as usize].iter().any(|&s| s != status) {
            return false;
        }
        pos += n;
    }
    true
}

/// Asserts `same`, naming the moment.
pub fn assert_same(overlay: &mut cowdisk::Overlay, model: &Model, when: &str) {
    assert!(same(overlay, model), "overlay and model differ {when}");
}

/// A random op from a xorshift state (for loops that are not proptests).
pub fn random_op(rng: &mut u64) -> Op {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng as u32
    };
    match next() % 14 {
        0 | 1 => Op::Insert(next(), next()),
        2..=4 => Op::Move(next(), next(), next()),
        5..=8 => Op::Write(next(), next(), next() as u8),
        9 => Op::Delete(next(), next()),
        10 | 11 => Op::Discard(next(), next()),
        12 => Op::Read(next(), next()),
        _ => Op::Status(next(), next()),
    }
}

impl Model {
    /// A model of a drive holding `data` with one status per sector.
    pub fn new(data: Vec<u8>, status: Vec<SectorStatus>, granularity: u64) -> Model {
        assert_eq!(data.len(), status.len() * S, "one status per sector");
        Model {
            data,
            status,
            granularity,
        }
    }
}

/// `Result<T, Error>` as `Result<T, code>`, to compare with the model.
pub fn code_of<T>(r: cowdisk::Result<T>) -> Result<T, u32> {
    r.map_err(|e| e.code())
}

/// Runs `ops` on the overlay and the model side by side, comparing every
/// result, error code and the drive's size after each step, then the whole
/// drive byte for byte and sector by sector.
pub fn run_ops(overlay: &mut cowdisk::Overlay, model: &mut Model, ops: &[Op]) {
    use cowdisk::Disk;
    for (step, op) in ops.iter().enumerate() {
        apply(overlay, model, op)
            .unwrap_or_else(|e| panic!("step {step}: {op:?}: unexpected error {e}"));
        assert_eq!(
            overlay.sector_count(),
            model.sectors(),
            "size after step {step}: {op:?}"
        );
    }
    assert_same(overlay, model, "after the last step");
}
