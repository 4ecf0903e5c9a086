//! Model-based tests of the overlay: a deliberately naive model (a byte
//! vector of the whole drive and a status per sector, edited with plain
//! `Vec::splice`, in `support::model`) against the real overlay, over random
//! edit sequences.

mod support;

use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions, SectorStatus};
use proptest::prelude::*;
use support::model::{op, run_ops, Model, Op, S};

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

fn run(source_sectors: u64, layout_seed: u64, granularity: u64, ops: &[Op]) {
    let src = source(source_sectors, layout_seed);
    let mut model = Model::new(src.data().to_vec(), src.statuses().to_vec(), granularity);
    let options = OverlayOptions {
        granularity,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::new(Box::new(src), options).unwrap();
    run_ops(&mut overlay, &mut model, ops);
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
    let mut model = Model::new(src.data().to_vec(), src.statuses().to_vec(), 8);
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
