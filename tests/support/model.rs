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
