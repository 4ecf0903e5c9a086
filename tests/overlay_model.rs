//! Model-based tests of the overlay: a deliberately naive model (a byte
//! vector of the whole drive and a status per sector, edited with plain
//! `Vec::splice`) against the real overlay, over random edit sequences.

mod support;

use cowdisk::{Disk, Overlay, OverlayOptions, SectorStatus};
use proptest::prelude::*;
use support::model::{len, op, pos, source, Model, Op, S};

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
    // Store space is reused: the units in use are exactly the units that
    // store extents touch.
    let mut units: Vec<u64> = overlay
        .extents()
        .to_vec()
        .iter()
        .filter(|(_, e)| e.kind.in_store())
        .flat_map(|(_, e)| e.base / granularity..(e.base + e.len).div_ceil(granularity))
        .collect();
    units.sort_unstable();
    units.dedup();
    assert_eq!(overlay.store_units_used(), units.len() as u64);
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
