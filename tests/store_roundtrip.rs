//! Persistent stores round-trip: any sequence of edits, with the overlay
//! closed and reopened at several points, reads back exactly as the naive
//! model says — bytes and block status of every sector.

mod support;

use cowdisk::error::code;
use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions};

use proptest::prelude::*;
use support::model::{apply, assert_same, op, source, Model};

fn reopen(path: &std::path::Path, src: &MemDisk, read_only: bool) -> Overlay {
    Overlay::open_persistent(path, Box::new(src.clone()), read_only).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn edits_survive_close_and_reopen(
        sectors in 1u64..300,
        layout in any::<u64>(),
        g_shift in 3u32..8,
        ops in prop::collection::vec(op(), 1..40),
        reopen_every in 3usize..12,
    ) {
        let dir = support::temp_dir();
        let path = dir.path().join("overlay.cow");
        let src = source(sectors, layout);
        let granularity = 1u64 << g_shift;
        let mut model = Model::of(&src, granularity);
        let options = OverlayOptions { granularity, ..OverlayOptions::default() };
        let mut overlay = Overlay::create_persistent(Box::new(src.clone()), &path, options).unwrap();
        for (i, op) in ops.iter().enumerate() {
            apply(&mut overlay, &mut model, op).unwrap();
            if i % reopen_every == reopen_every - 1 {
                // Alternate: a clean close, and a plain drop after a flush.
                if i % 2 == 0 {
                    overlay.close().unwrap();
                } else {
                    overlay.flush().unwrap();
                    drop(overlay);
                }
                // A read-only look first, then reopen for writing.
                let mut ro = reopen(&path, &src, true);
                assert_same(&mut ro, &model, &format!("read-only after op {i}"));
                drop(ro);
                overlay = reopen(&path, &src, false);
                assert_same(&mut overlay, &model, &format!("after reopen at op {i}"));
            }
        }
        overlay.close().unwrap();
        let mut last = reopen(&path, &src, false);
        assert_same(&mut last, &model, "at the end");
        drop(last);
        let report = cowdisk::store::check_store_file(&path).unwrap();
        prop_assert!(report.is_consistent(), "{:?}", report.problems);
    }
}

#[test]
fn a_store_refuses_another_source_naming_the_reason() {
    let dir = support::temp_dir();
    let path = dir.path().join("overlay.cow");
    let src = source(100, 1);
    let overlay =
        Overlay::create_persistent(Box::new(src.clone()), &path, OverlayOptions::default())
            .unwrap();
    overlay.close().unwrap();

    let bigger = source(101, 1);
    let err = Overlay::open_persistent(&path, Box::new(bigger), false).unwrap_err();
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert!(err.to_string().contains("size"), "{err}");

    let mut changed_data = src.data().to_vec();
    changed_data[..512].fill(0x77);
    let changed = MemDisk::new(changed_data, src.statuses().to_vec()).unwrap();
    let err = Overlay::open_persistent(&path, Box::new(changed), false).unwrap_err();
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert!(err.to_string().contains("fingerprint"), "{err}");

    let with_uuid = Overlay::create_persistent(
        Box::new(src.clone().with_uuid([1; 16])),
        &dir.path().join("u.cow"),
        OverlayOptions::default(),
    )
    .unwrap();
    with_uuid.close().unwrap();
    let err = Overlay::open_persistent(
        &dir.path().join("u.cow"),
        Box::new(src.clone().with_uuid([2; 16])),
        true,
    )
    .unwrap_err();
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert!(err.to_string().contains("UUID"), "{err}");
}

#[test]
fn a_store_refused_for_its_source_is_left_unchanged() {
    // Opening for writing checkpoints the store; a refusal must come first.
    let dir = support::temp_dir();
    let path = dir.path().join("overlay.cow");
    let src = source(100, 1);
    let mut overlay =
        Overlay::create_persistent(Box::new(src.clone()), &path, OverlayOptions::default())
            .unwrap();
    overlay.write(3, &[0x5A; 512]).unwrap();
    overlay.close().unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut changed_data = src.data().to_vec();
    changed_data[..512].fill(0x77);
    let changed = MemDisk::new(changed_data, src.statuses().to_vec()).unwrap();
    for read_only in [false, true] {
        let err =
            Overlay::open_persistent(&path, Box::new(changed.clone()), read_only).unwrap_err();
        assert_eq!(err.code(), code::SOURCE_MISMATCH);
        assert!(
            std::fs::read(&path).unwrap() == before,
            "read_only {read_only}: the store changed"
        );
    }
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_store() {
    let dir = support::temp_dir();
    let path = dir.path().join("overlay.cow");
    let src = source(64, 2);
    let first = Overlay::create_persistent(Box::new(src.clone()), &path, OverlayOptions::default())
        .unwrap();
    let err = Overlay::open_persistent(&path, Box::new(src.clone()), false).unwrap_err();
    assert_eq!(err.code(), code::LOCKED);
    let err = Overlay::open_persistent(&path, Box::new(src.clone()), true).unwrap_err();
    assert_eq!(err.code(), code::LOCKED);
    first.close().unwrap();
    let reader = Overlay::open_persistent(&path, Box::new(src.clone()), true).unwrap();
    let second_reader = Overlay::open_persistent(&path, Box::new(src.clone()), true).unwrap();
    assert!(reader.is_read_only() && second_reader.is_read_only());
}

#[test]
fn a_read_only_overlay_refuses_edits_and_leaves_the_file_alone() {
    let dir = support::temp_dir();
    let path = dir.path().join("overlay.cow");
    let src = source(64, 3);
    let mut overlay =
        Overlay::create_persistent(Box::new(src.clone()), &path, OverlayOptions::default())
            .unwrap();
    overlay.write(5, &[9u8; 512]).unwrap();
    overlay.close().unwrap();
    let before = support::fingerprint(&path);
    let mut ro = reopen(&path, &src, true);
    assert_eq!(
        ro.write(0, &[1u8; 512]).unwrap_err().code(),
        code::READ_ONLY
    );
    assert_eq!(ro.insert(0, 1).unwrap_err().code(), code::READ_ONLY);
    let mut sector = vec![0u8; 512];
    ro.read_sectors(5, &mut sector).unwrap();
    assert_eq!(sector, vec![9u8; 512]);
    drop(ro);
    support::assert_unchanged(&path, &before);
}

#[test]
fn creating_over_an_existing_file_is_refused() {
    let dir = support::temp_dir();
    let path = dir.path().join("exists.cow");
    std::fs::write(&path, b"precious").unwrap();
    let err = Overlay::create_persistent(Box::new(source(8, 1)), &path, OverlayOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), code::OPEN);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
