//! Damaged store files: truncated, bit-flipped, overwritten and random
//! ones give an error (naming what is wrong) or, where the damage hit
//! nothing that matters, a working overlay — never a panic, a hang or an
//! allocation sized by a damaged field. The check function reports rather
//! than fails.

mod support;

use std::path::Path;

use cowdisk::error::code;
use cowdisk::store::check_store_file;
use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions};
use proptest::prelude::*;
use support::model::{apply, random_op, source, Model};

const PAGE: usize = 4096;

/// A store with edits in it and a log that still holds transactions (the
/// last flush was not followed by a close).
fn valid_store(dir: &Path) -> (Vec<u8>, MemDisk) {
    let path = dir.join("valid.cow");
    let src = source(300, 5);
    let mut model = Model::of(&src, 8);
    let options = OverlayOptions {
        granularity: 8,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::create_persistent(Box::new(src.clone()), &path, options).unwrap();
    let mut rng = 77u64;
    for i in 0..60 {
        apply(&mut overlay, &mut model, &random_op(&mut rng)).unwrap();
        if i % 20 == 19 {
            overlay.flush().unwrap();
        }
    }
    overlay.flush().unwrap();
    // Leave the log un-checkpointed, as after a crash.
    std::mem::forget(overlay);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (bytes, src)
}

/// Opens a damaged store both ways, reads everything, and checks it. A
/// successful open is fine; a failed one must say what is wrong.
fn exercise(dir: &Path, bytes: &[u8], src: &MemDisk, read_write: bool) {
    let path = dir.join("damaged.cow");
    std::fs::write(&path, bytes).unwrap();
    let modes: &[bool] = if read_write { &[true, false] } else { &[true] };
    for &read_only in modes {
        match Overlay::open_persistent(&path, Box::new(src.clone()), read_only) {
            Ok(overlay) => {
                let n = overlay.sector_count();
                let mut buf = vec![0u8; 512 * 64];
                let mut at = 0;
                while at < n {
                    let k = (n - at).min(64);
                    let _ = overlay.read_sectors(at, &mut buf[..k as usize * 512]);
                    let _ = overlay.block_status(at, k);
                    at += k;
                }
            }
            Err(e) => {
                assert!(
                    [
                        code::CORRUPT,
                        code::UNSUPPORTED,
                        code::SOURCE_MISMATCH,
                        code::READ
                    ]
                    .contains(&e.code()),
                    "unexpected error kind: {e}"
                );
                assert!(!e.to_string().is_empty());
            }
        }
    }
    let report = check_store_file(&path).unwrap();
    if !report.is_consistent() {
        assert!(report.problems.iter().all(|p| !p.is_empty()));
    }
    std::fs::remove_file(&path).unwrap();
}

/// Offsets of the pages of the file that hold anything.
fn nonzero_pages(bytes: &[u8]) -> Vec<usize> {
    bytes
        .chunks(PAGE)
        .enumerate()
        .filter(|(_, page)| page.iter().any(|&b| b != 0))
        .map(|(i, _)| i * PAGE)
        .collect()
}

#[test]
fn every_single_bit_flip_in_the_metadata_is_survived() {
    let dir = support::temp_dir();
    let (bytes, src) = valid_store(dir.path());
    let pages = nonzero_pages(&bytes);
    assert!(pages.len() > 5);
    let mut rng = 99u64;
    // Flip bits spread over every metadata page and the log, page by page.
    for &page in &pages {
        for k in 0..6 {
            let mut damaged = bytes.clone();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // The first 128 bytes hold every header field; weight them.
            let within = if k < 3 {
                rng as usize % 128
            } else {
                rng as usize % PAGE
            };
            damaged[page + within] ^= 1 << (rng % 8);
            exercise(dir.path(), &damaged, &src, k == 0);
        }
    }
}

#[test]
fn truncations_give_clear_errors() {
    let dir = support::temp_dir();
    let (bytes, src) = valid_store(dir.path());
    for len in [
        0,
        100,
        PAGE,
        2 * PAGE + 7,
        65536,
        70000,
        1 << 20,
        (1 << 20) + 5000,
        bytes.len() - 1,
    ] {
        let cut = &bytes[..len.min(bytes.len())];
        let path = dir.path().join("short.cow");
        std::fs::write(&path, cut).unwrap();
        if let Err(e) = Overlay::open_persistent(&path, Box::new(src.clone()), true) {
            assert!(
                e.to_string().contains("short.cow"),
                "the error names the file: {e}"
            );
        }
        exercise(dir.path(), cut, &src, false);
    }
}

#[test]
fn a_huge_recorded_unit_count_is_refused_before_anything_is_allocated() {
    // Rewrite the state page with an absurd unit count (and a valid CRC):
    // the open refuses it by the file's real length.
    let dir = support::temp_dir();
    let (mut bytes, src) = valid_store(dir.path());
    // Make the log empty so the state page at its home is the one read.
    let path = dir.path().join("s.cow");
    std::fs::write(&path, &bytes).unwrap();
    Overlay::open_persistent(&path, Box::new(src.clone()), false)
        .unwrap()
        .close()
        .unwrap();
    bytes = std::fs::read(&path).unwrap();
    let state = 65536;
    bytes[state + 16 + 16..state + 16 + 24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    bytes[state + 4..state + 8].fill(0);
    let crc = crc32c::crc32c(&bytes[state..state + PAGE]);
    bytes[state + 4..state + 8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Overlay::open_persistent(&path, Box::new(src), true).unwrap_err();
    assert_eq!(err.code(), code::CORRUPT);
    assert!(err.to_string().contains("units recorded"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_never_a_store(data in prop::collection::vec(any::<u8>(), 0..20000)) {
        let dir = support::temp_dir();
        let src = source(16, 1);
        exercise(dir.path(), &data, &src, true);
    }

    #[test]
    fn overwritten_ranges_are_survived(at in any::<u32>(), len in 1usize..600, fill in any::<u8>()) {
        let dir = support::temp_dir();
        let (mut bytes, src) = valid_store(dir.path());
        let pages = nonzero_pages(&bytes);
        let start = pages[at as usize % pages.len()] + (at as usize >> 16) % PAGE;
        let end = (start + len).min(bytes.len());
        bytes[start..end].fill(fill);
        exercise(dir.path(), &bytes, &src, false);
    }
}
