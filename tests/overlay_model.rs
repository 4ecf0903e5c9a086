//! Model-based tests of the overlay: a deliberately naive model (a byte
//! vector of the whole drive and a status per sector, edited with plain
//! `Vec::splice`) against the real overlay, over random edit sequences.

use cowdisk::error::code;
use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions, SectorStatus};
use proptest::prelude::*;

const S: usize = 512;

/// The naive model of the virtual drive.
#[derive(Clone)]
struct Model {
    data: Vec<u8>,
    status: Vec<SectorStatus>,
    granularity: u64,
}

impl Model {
    fn sectors(&self) -> u64 {
        self.status.len() as u64
    }

    fn range_ok(&self, lba: u64, n: u64) -> bool {
        lba.checked_add(n).is_some_and(|e| e <= self.sectors())
    }

    fn insert(&mut self, lba: u64, n: u64) -> Result<(), u32> {
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

    fn move_sectors(&mut self, from: u64, to: u64, n: u64) -> Result<(), u32> {
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

    fn write(&mut self, lba: u64, bytes: &[u8]) -> Result<(), u32> {
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

    fn delete(&mut self, lba: u64, n: u64) -> Result<(), u32> {
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        self.cut(lba, n);
        Ok(())
    }

    fn discard(&mut self, lba: u64, n: u64) -> Result<(), u32> {
        if !self.range_ok(lba, n) {
            return Err(code::INVBLOCK);
        }
        let (l, n) = (lba as usize, n as usize);
        self.data[l * S..(l + n) * S].fill(0);
        self.status[l..l + n].fill(SectorStatus::NotAlloc);
        Ok(())
    }

    fn status_of(&self, lba: u64, n: u64) -> Result<SectorStatus, u32> {
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

    fn read(&self, lba: u64, n: u64) -> Result<(Vec<u8>, SectorStatus), u32> {
        let status = self.status_of(lba, n)?;
        let l = lba as usize;
        Ok((self.data[l * S..(l + n as usize) * S].to_vec(), status))
    }
}

/// A source with patterned data in runs of Normal, Blank and NotAlloc
/// sectors (non-Normal sectors hold zeros, as a real format reports them).
fn source(sectors: u64, layout_seed: u64) -> MemDisk {
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
enum Op {
    Insert(u32, u32),
    Move(u32, u32, u32),
    Write(u32, u32, u8),
    Delete(u32, u32),
    Discard(u32, u32),
    Read(u32, u32),
    Status(u32, u32),
}

fn op() -> impl Strategy<Value = Op> {
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
fn pos(raw: u32, size: u64) -> u64 {
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
fn len(raw: u32, start: u64, size: u64, cap: u64) -> u64 {
    let room = size.saturating_sub(start);
    match raw % 12 {
        0 => 0,
        1 => room,
        2 => room + 1,
        _ => u64::from(raw >> 4) % (room.min(cap) + 1),
    }
}

fn code_of<T>(r: cowdisk::Result<T>) -> Result<T, u32> {
    r.map_err(|e| e.code())
}

fn run(source_sectors: u64, layout_seed: u64, granularity: u64, ops: &[Op]) {
    let src = source(source_sectors, layout_seed);
    let mut model = Model {
        data: src.data().to_vec(),
        status: src.statuses().to_vec(),
        granularity,
    };
    let options = OverlayOptions {
        granularity,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::new(Box::new(src), options).unwrap();
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
    // Store space is reused: what is in use never exceeds the sectors the
    // drive maps to the store.
    let mapped_to_store: u64 = overlay
        .extents()
        .to_vec()
        .iter()
        .filter(|(_, e)| e.kind == cowdisk::overlay::extents::ExtentKind::Store)
        .map(|(_, e)| e.len)
        .sum();
    assert_eq!(overlay.store_sectors_used(), mapped_to_store);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn overlay_matches_naive_model_small_granularities(
        sectors in 0u64..400,
        layout in any::<u64>(),
        g_shift in 3u32..7,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(sectors, layout, 1 << g_shift, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 280, ..ProptestConfig::default() })]

    #[test]
    fn overlay_matches_naive_model_every_granularity(
        sectors in 0u64..3000,
        layout in any::<u64>(),
        g_shift in 3u32..=16,
        ops in prop::collection::vec(op(), 1..30),
    ) {
        run(sectors, layout, 1 << g_shift, &ops);
    }
}

#[test]
fn moves_across_many_extents_and_back_restore_the_source() {
    let src = source(5000, 7);
    let expected = src.data().to_vec();
    let mut overlay = Overlay::new(Box::new(src), OverlayOptions::default()).unwrap();
    // Fragment the map: 1000 single-sector inserts.
    for i in (0..1000u64).rev() {
        overlay.insert(i * 5, 1).unwrap();
    }
    assert!(overlay.extents().extent_count() >= 2000);
    // Move a range spanning almost every extent, then move it back.
    overlay.move_sectors(3, 5990, 5000).unwrap();
    overlay.move_sectors(990, 3, 5000).unwrap();
    // Delete the inserted sectors again: the source shows through unchanged.
    for i in 0..1000u64 {
        overlay.delete(i * 5, 1).unwrap();
    }
    let mut all = vec![0u8; 5000 * S];
    overlay.read_sectors(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(
        overlay.extents().extent_count(),
        1,
        "edits that cancel leave one extent"
    );
}

#[test]
fn writes_at_lba_zero_and_the_last_sector_after_edits() {
    let src = source(100, 3);
    let mut model = Model {
        data: src.data().to_vec(),
        status: src.statuses().to_vec(),
        granularity: 8,
    };
    let mut overlay = Overlay::new(
        Box::new(src),
        OverlayOptions {
            granularity: 8,
            ..OverlayOptions::default()
        },
    )
    .unwrap();
    let sector = vec![0xA5u8; S];
    for (at, n) in [(0u64, 5u64), (50, 3)] {
        overlay.insert(at, n).unwrap();
        model.insert(at, n).unwrap();
    }
    let last = model.sectors() - 1;
    for lba in [0, last] {
        overlay.write(lba, &sector).unwrap();
        model.write(lba, &sector).unwrap();
    }
    overlay.move_sectors(0, last + 1, 4).unwrap();
    model.move_sectors(0, last + 1, 4).unwrap();
    let mut all = vec![0u8; model.sectors() as usize * S];
    assert_eq!(
        overlay.read_sectors(0, &mut all).unwrap(),
        SectorStatus::Normal
    );
    assert!(all == model.data);
}
