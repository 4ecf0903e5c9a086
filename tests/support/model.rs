//! The naive model of an overlaid drive, and the driver that runs random
//! edit sequences against it and a real overlay side by side. Shared by the
//! overlay's own model test (over in-memory sources) and the per-format one
//! (over real images): the model exists once.
//!
//! The model is deliberately simple: a byte vector of the whole drive and a
//! status per sector, edited with plain `Vec::splice`. Its semantics are the
//! overlay's contract: copy-on-write units of `granularity` sectors aligned
//! in virtual sectors at the moment of a write, every sector of a unit a
//! write touches becomes `Normal`; `discard` gives `NotAlloc` zeros; the
//! legacy error codes for out-of-range requests and invalid moves.

use cowdisk::error::code;
use cowdisk::{Disk, Overlay, SectorStatus};
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
    /// A model of an overlay freshly made over a source that holds `data`
    /// with the given per-sector statuses.
    pub fn new(data: Vec<u8>, status: Vec<SectorStatus>, granularity: u64) -> Model {
        assert_eq!(data.len(), status.len() * S, "model bytes and statuses");
        Model {
            data,
            status,
            granularity,
        }
    }

    pub fn sectors(&self) -> u64 {
        self.status.len() as u64
    }

    fn range_ok(&self, lba: u64, n: u64) -> bool {
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

    fn cut(&mut self, lba: u64, n: u64) -> (Vec<u8>, Vec<SectorStatus>) {
        let (l, n) = (lba as usize, n as usize);
        let data = self.data.drain(l * S..(l + n) * S).collect();
        let status = self.status.drain(l..l + n).collect();
        (data, status)
    }

    fn paste(&mut self, lba: u64, piece: (Vec<u8>, Vec<SectorStatus>)) {
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
        // Every sector of the granularity units the write touches becomes
        // allocated data (keeping what it showed), then the write lands.
        let g = self.granularity;
        let unit_start = lba / g * g;
        let unit_end = ((lba + n).div_ceil(g) * g).min(self.sectors());
        for s in unit_start..unit_end {
            self.status[s as usize] = SectorStatus::Normal;
        }
        let l = lba as usize;
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

/// One random edit or query; the numbers are raw and become positions and
/// lengths relative to the drive's size at the moment the step runs.
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

pub fn code_of<T>(r: cowdisk::Result<T>) -> Result<T, u32> {
    r.map_err(|e| e.code())
}

/// Runs `ops` on the overlay and the model side by side, comparing every
/// result, error code and the drive's size after each step, then the whole
/// drive byte for byte and sector by sector.
pub fn run_ops(overlay: &mut Overlay, model: &mut Model, ops: &[Op]) {
    for (step, op) in ops.iter().enumerate() {
        let size = model.sectors();
        let ctx = || format!("step {step}: {op:?} on {size} sectors");
        match *op {
            Op::Insert(a, b) => {
                let (at, n) = (pos(a, size), u64::from(b) % 300);
                assert_eq!(
                    code_of(overlay.insert(at, n)),
                    model.insert(at, n),
                    "{}",
                    ctx()
                );
            }
            Op::Move(a, b, c) => {
                let from = pos(a, size);
                let n = len(c, from, size, 400);
                let to = pos(b, size);
                assert_eq!(
                    code_of(overlay.move_sectors(from, to, n)),
                    model.move_sectors(from, to, n),
                    "{}",
                    ctx()
                );
            }
            Op::Write(a, b, seed) => {
                let at = pos(a, size);
                let n = len(b, at, size, 200);
                let bytes: Vec<u8> = (0..n as usize * S)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
                    .collect();
                assert_eq!(
                    code_of(overlay.write(at, &bytes)),
                    model.write(at, &bytes),
                    "{}",
                    ctx()
                );
            }
            Op::Delete(a, b) => {
                let at = pos(a, size);
                let n = len(b, at, size, 300);
                assert_eq!(
                    code_of(overlay.delete(at, n)),
                    model.delete(at, n),
                    "{}",
                    ctx()
                );
            }
            Op::Discard(a, b) => {
                let at = pos(a, size);
                let n = len(b, at, size, 300);
                assert_eq!(
                    code_of(overlay.discard(at, n)),
                    model.discard(at, n),
                    "{}",
                    ctx()
                );
            }
            Op::Read(a, b) => {
                let at = pos(a, size);
                let n = len(b, at, size, u64::MAX);
                let expected = model.read(at, n);
                let mut buf = vec![0xEEu8; n as usize * S];
                let got = code_of(overlay.read_sectors(at, &mut buf)).map(|st| (buf, st));
                match (got, expected) {
                    (Ok((g, gs)), Ok((e, es))) => {
                        assert_eq!(gs, es, "status, {}", ctx());
                        assert!(g == e, "bytes differ, {}", ctx());
                    }
                    (g, e) => assert_eq!(g.map(|x| x.1), e.map(|x| x.1), "{}", ctx()),
                }
            }
            Op::Status(a, b) => {
                let at = pos(a, size);
                let n = len(b, at, size, u64::MAX);
                assert_eq!(
                    code_of(overlay.block_status(at, n)),
                    model.status_of(at, n),
                    "{}",
                    ctx()
                );
            }
        }
        assert_eq!(overlay.sector_count(), model.sectors(), "size, {}", ctx());
    }
    // Finally the whole drive, byte for byte and sector by sector.
    let size = model.sectors();
    let mut all = vec![0u8; size as usize * S];
    overlay.read_sectors(0, &mut all).unwrap();
    assert!(all == model.data, "final drive bytes differ");
    for s in 0..size {
        assert_eq!(
            overlay.block_status(s, 1).unwrap(),
            model.status[s as usize],
            "final status of sector {s}"
        );
    }
}
