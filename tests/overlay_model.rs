//! Model-based tests of the overlay: a deliberately naive model (a byte
//! vector of the whole drive and a status per sector, edited with plain
//! `Vec::splice`) against the real overlay, over random edit sequences.

mod support;

use cowdisk::{Disk, Overlay, OverlayOptions, SectorStatus};
use proptest::prelude::*;
use support::model::{assert_same, len, op, pos, source, status_runs_match, Model, Op, S};

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
    assert!(
        status_runs_match(&mut overlay, &model),
        "status_run claims a sector the model says differs"
    );
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

/// The units the overlay's store extents touch, which must be exactly the
/// units in use.
fn units_referenced(overlay: &Overlay, granularity: u64) -> u64 {
    let mut units: Vec<u64> = overlay
        .extents()
        .to_vec()
        .iter()
        .filter(|(_, e)| e.kind.in_store())
        .flat_map(|(_, e)| e.base / granularity..(e.base + e.len).div_ceil(granularity))
        .collect();
    units.sort_unstable();
    units.dedup();
    units.len() as u64
}

/// One scripted edit, applied to the overlay and the model alike.
#[derive(Debug, Clone, Copy)]
enum Step {
    Insert(u64, u64),
    Move(u64, u64, u64),
    Write(u64, u64),
    Discard(u64, u64),
    Delete(u64, u64),
}

/// The cases sector-exact allocation is about, at every granularity: a
/// write next to inserted space, writes after moves (units landing where no
/// data was), writes into a partly written unit, discarding part of a
/// written unit and writing again. Positions scale with the granularity so
/// small ones span several units and large ones hold the whole drive in
/// one. After every step: every byte, the status of every sector, every
/// status run, and the store units in use.
#[test]
fn sector_exact_status_after_scripted_edits_at_every_granularity() {
    for g_shift in 3..=16 {
        let g = 1u64 << g_shift;
        for layout in [1u64, 0x9E37_79B9, 0xDEAD_BEEF] {
            let src = source(3000, layout);
            let mut model = Model::of(&src, g);
            let options = OverlayOptions {
                granularity: g,
                ..OverlayOptions::default()
            };
            let mut overlay = Overlay::new(Box::new(src), options).unwrap();
            let u = g.min(600);
            let steps = [
                Step::Insert(u / 2 + 1, 3),
                Step::Write(u / 2 + 4, 1),
                Step::Write(u / 2, 1),
                Step::Insert(u + 7, u + 9),
                Step::Move(0, 3000, u + 5),
                Step::Write(2950, 2),
                Step::Move(2 * u + 1, 5, u / 2 + 3),
                Step::Write(6, 1),
                Step::Write(2 * u + 1, 1),
                Step::Write(2 * u + 3, 1),
                Step::Write(2 * u + 2, 1),
                Step::Discard(2 * u + 2, 2),
                Step::Write(2 * u + 2, 1),
                Step::Discard(u / 2, u),
                Step::Write(u / 2 + 1, 2),
                Step::Delete(u / 2 + 2, u / 3 + 1),
                Step::Write(0, 3),
                Step::Insert(0, 2),
                Step::Write(3, 1),
            ];
            for (i, step) in steps.iter().enumerate() {
                let data = vec![0xC0 ^ i as u8; S * 3];
                let (got, want) = match *step {
                    Step::Insert(at, n) => (overlay.insert(at, n), model.insert(at, n)),
                    Step::Move(from, to, n) => (
                        overlay.move_sectors(from, to, n),
                        model.move_sectors(from, to, n),
                    ),
                    Step::Write(at, n) => {
                        let bytes = &data[..n as usize * S];
                        (overlay.write(at, bytes), model.write(at, bytes))
                    }
                    Step::Discard(at, n) => (overlay.discard(at, n), model.discard(at, n)),
                    Step::Delete(at, n) => (overlay.delete(at, n), model.delete(at, n)),
                };
                let when = format!("granularity {g}, layout {layout:#x}, step {i}: {step:?}");
                assert_eq!(got.map_err(|e| e.code()), want, "{when}");
                assert_same(&mut overlay, &model, &when);
                assert_eq!(
                    overlay.store_units_used(),
                    units_referenced(&overlay, g),
                    "{when}"
                );
            }
        }
    }
}

/// A write next to inserted space: the inserted sectors that share its
/// unit read as zeros and report `NotAlloc`, one by one and as a range.
#[test]
fn inserted_sectors_beside_a_write_stay_unallocated() {
    let g = 64;
    let src = cowdisk::MemDisk::new(vec![0u8; 256 * S], vec![SectorStatus::NotAlloc; 256]).unwrap();
    let options = OverlayOptions {
        granularity: g,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::new(Box::new(src), options).unwrap();
    overlay.insert(10, 20).unwrap();
    overlay.write(9, &[0x77u8; S]).unwrap();
    assert_eq!(overlay.block_status(9, 1).unwrap(), SectorStatus::Normal);
    assert_eq!(
        overlay.block_status(10, 20).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(overlay.block_status(0, 9).unwrap(), SectorStatus::NotAlloc);
    assert_eq!(
        overlay.block_status(30, 34).unwrap(),
        SectorStatus::NotAlloc
    );
    let mut buf = vec![0xEEu8; 20 * S];
    assert_eq!(
        overlay.read_sectors(10, &mut buf).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(buf.iter().all(|&b| b == 0));
    // The whole unit moved into the store all the same.
    assert_eq!(overlay.store_units_used(), 1);
}

/// N single-sector writes into one unit use one store unit: the first
/// reserves the unit, the others land in place in its reserved sectors.
#[test]
fn single_sector_writes_into_one_unit_use_one_unit() {
    for g in [8u64, 64, 2048, 65536] {
        let src = source(g * 2, 5);
        let mut model = Model::of(&src, g);
        let options = OverlayOptions {
            granularity: g,
            ..OverlayOptions::default()
        };
        let mut overlay = Overlay::new(Box::new(src), options).unwrap();
        overlay.insert(g / 2, 3).unwrap();
        model.insert(g / 2, 3).unwrap();
        // Every other sector of the first unit, backwards: each write lands
        // between sectors the earlier ones left unwritten.
        for lba in (0..g).rev().step_by(2) {
            let sector = vec![lba as u8 | 1; S];
            overlay.write(lba, &sector).unwrap();
            model.write(lba, &sector).unwrap();
        }
        assert_eq!(overlay.store_units_used(), 1, "granularity {g}");
        assert_same(&mut overlay, &model, &format!("granularity {g}"));
    }
}

/// The same in a persistent store, where units written before a flush are
/// durable and no longer written in place: a write after the flush moves
/// the unit once (to one fresh unit, the old one freed at the commit), and
/// writes after it land in place again.
#[test]
fn persistent_store_writes_after_a_flush_move_a_unit_once() {
    let g = 64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.cow");
    let src = source(1000, 11);
    let mut model = Model::of(&src, g);
    let options = OverlayOptions {
        granularity: g,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::create_persistent(Box::new(src.clone()), &path, options).unwrap();
    let base_units = overlay.store_units_used();
    let sector = vec![0x3Cu8; S];
    for lba in [70u64, 72] {
        overlay.write(lba, &sector).unwrap();
        model.write(lba, &sector).unwrap();
    }
    assert_eq!(overlay.store_units_used(), base_units + 1);
    overlay.flush().unwrap();
    for lba in [74u64, 76, 71] {
        overlay.write(lba, &sector).unwrap();
        model.write(lba, &sector).unwrap();
    }
    overlay.flush().unwrap();
    assert_same(&mut overlay, &model, "after the writes");
    overlay.close().unwrap();
    let mut again = Overlay::open_persistent(&path, Box::new(src), true).unwrap();
    assert_same(&mut again, &model, "after reopening");
    let report = cowdisk::store::check_store_file(&path).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// An overlay over an edited overlay: the outer one copies on write
    /// through the inner one's status runs, so it must stay sector-exact
    /// too. The outer model starts from the inner model's drive.
    #[test]
    fn overlay_over_an_overlay_matches_the_model(
        sectors in 1u64..600,
        layout in any::<u64>(),
        inner_shift in 3u32..8,
        outer_shift in 3u32..8,
        inner_ops in prop::collection::vec(op(), 1..25),
        outer_ops in prop::collection::vec(op(), 1..25),
    ) {
        let src = source(sectors, layout);
        let (gi, go) = (1u64 << inner_shift, 1u64 << outer_shift);
        let mut inner_model = Model::of(&src, gi);
        let options = |granularity| OverlayOptions { granularity, ..OverlayOptions::default() };
        let mut inner = Overlay::new(Box::new(src), options(gi)).unwrap();
        support::model::run_ops(&mut inner, &mut inner_model, &inner_ops);
        let mut outer_model = Model::new(inner_model.data.clone(), inner_model.status.clone(), go);
        let mut outer = Overlay::new(Box::new(inner), options(go)).unwrap();
        support::model::run_ops(&mut outer, &mut outer_model, &outer_ops);
        assert_eq!(outer.store_units_used(), units_referenced(&outer, go));
    }

    /// Zero detection keeps its meaning on top of sector-exact allocation:
    /// data that reads as zeros reports `Blank`, everything else what the
    /// model says — for every sector, every status run, and reads of
    /// random ranges.
    #[test]
    fn zero_detection_reports_zero_data_as_blank(
        sectors in 1u64..500,
        layout in any::<u64>(),
        g_shift in 3u32..8,
        ops in prop::collection::vec(op(), 1..30),
        zero_writes in prop::collection::vec((any::<u32>(), 1u64..20), 0..6),
        probes in prop::collection::vec((any::<u32>(), any::<u32>()), 1..20),
    ) {
        let src = source(sectors, layout);
        let g = 1u64 << g_shift;
        let mut model = Model::of(&src, g);
        let options = OverlayOptions { granularity: g, ..OverlayOptions::default() };
        let mut overlay = Overlay::new(Box::new(src), options).unwrap();
        support::model::run_ops(&mut overlay, &mut model, &ops);
        // Written zeros are data; with detection they report Blank.
        for (at, n) in zero_writes {
            let size = model.sectors();
            if size == 0 {
                break;
            }
            let at = u64::from(at) % size;
            let n = n.min(size - at);
            let zeros = vec![0u8; n as usize * S];
            overlay.write(at, &zeros).unwrap();
            model.write(at, &zeros).unwrap();
        }
        overlay.set_detect_zeros(true);
        let size = model.sectors();
        let expected: Vec<SectorStatus> = (0..size as usize)
            .map(|s| {
                let zero = model.data[s * S..(s + 1) * S].iter().all(|&b| b == 0);
                match model.status[s] {
                    SectorStatus::Normal if zero => SectorStatus::Blank,
                    other => other,
                }
            })
            .collect();
        let combined = |range: &[SectorStatus]| {
            range.iter().fold(SectorStatus::NotAlloc, |acc, s| acc.combine(*s))
        };
        for s in 0..size {
            prop_assert_eq!(overlay.block_status(s, 1).unwrap(), expected[s as usize], "sector {}", s);
        }
        let mut lba = 0;
        while lba < size {
            let (status, n) = overlay.status_run(lba, size - lba).unwrap();
            prop_assert!(n > 0 && lba + n <= size);
            for s in lba..lba + n {
                prop_assert_eq!(status, expected[s as usize], "run at {} claims {}", lba, s);
            }
            lba += n;
        }
        for (a, b) in probes {
            let at = pos(a, size).min(size.saturating_sub(1));
            let n = len(b, at, size, u64::MAX).min(size - at);
            if n == 0 {
                continue;
            }
            // A range with detection: the combination of its sectors'
            // (all-zero data in it counts as Blank).
            let want = combined(&expected[at as usize..(at + n) as usize]);
            let mut buf = vec![0xEEu8; n as usize * S];
            prop_assert_eq!(overlay.read_sectors(at, &mut buf).unwrap(), want, "read {}+{}", at, n);
            prop_assert_eq!(overlay.block_status(at, n).unwrap(), want, "status {}+{}", at, n);
        }
    }
}

/// In a unit that is partly store space, a run the write does not touch
/// stays where it is: no copy of source data, no unit taken for it.
#[test]
fn a_run_the_write_does_not_touch_stays_out_of_the_store() {
    for g in [8u64, 64, 2048] {
        let src = source(4 * g, 9);
        let mut model = Model::of(&src, g);
        let options = OverlayOptions {
            granularity: g,
            ..OverlayOptions::default()
        };
        let mut overlay = Overlay::new(Box::new(src), options).unwrap();
        let sector = vec![0x5Au8; S];
        overlay.write(0, &sector).unwrap();
        model.write(0, &sector).unwrap();
        assert_eq!(overlay.store_units_used(), 1);
        // Inserted space in the second half of the first unit, then a
        // write in its first half.
        overlay.insert(g / 2, g / 2).unwrap();
        model.insert(g / 2, g / 2).unwrap();
        overlay.write(1, &sector).unwrap();
        model.write(1, &sector).unwrap();
        assert_eq!(overlay.store_units_used(), 1, "granularity {g}");
        assert_same(
            &mut overlay,
            &model,
            &format!("granularity {g}, beside inserted space"),
        );
        // Source data in the second half instead, then a write in the first.
        overlay.delete(g / 2, g).unwrap();
        model.delete(g / 2, g).unwrap();
        overlay.write(2, &sector).unwrap();
        model.write(2, &sector).unwrap();
        assert_eq!(overlay.store_units_used(), 1, "granularity {g}");
        assert_same(
            &mut overlay,
            &model,
            &format!("granularity {g}, beside source data"),
        );
        // A write reaching into the second half moves it after all.
        overlay.write(g / 2 - 1, &[0x6Bu8; 2 * S]).unwrap();
        model.write(g / 2 - 1, &[0x6Bu8; 2 * S]).unwrap();
        assert_eq!(overlay.store_units_used(), 2, "granularity {g}");
        assert_same(
            &mut overlay,
            &model,
            &format!("granularity {g}, reaching in"),
        );
    }
}
