//! Zero detection (`set_detect_zeros`) over huge inserted ranges and over
//! overlays stacked on them: the answer is the one a plain reading gives
//! (`Blank` exactly when the range is `Normal` and every byte is zero), and
//! it comes from the extent maps without reading terabytes of zeros (the C
//! API fuzzer found block status calls taking minutes).

use std::time::{Duration, Instant};

use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions, SectorStatus};

const HUGE: u64 = 1 << 40;

/// A 64-sector source: sectors 30..34 are zeros, the rest a pattern.
fn source() -> MemDisk {
    let data: Vec<u8> = (0..64 * 512)
        .map(|i| {
            if (30 * 512..34 * 512).contains(&i) {
                0
            } else {
                (i % 251) as u8 | 1
            }
        })
        .collect();
    MemDisk::new(data, vec![SectorStatus::Normal; 64]).unwrap()
}

/// The inner overlay: a huge inserted range at 32 (between zero sectors),
/// a zero sector written just after it and a data sector at 10.
fn inner() -> Overlay {
    let mut o = Overlay::new(Box::new(source()), OverlayOptions::default()).unwrap();
    o.insert(32, HUGE).unwrap();
    o.write(32 + HUGE, &[0u8; 512]).unwrap();
    o.write(10, &[7u8; 512]).unwrap();
    o
}

fn stacked(detect: bool) -> Overlay {
    let mut o = Overlay::new(Box::new(inner()), OverlayOptions::default()).unwrap();
    o.set_detect_zeros(detect);
    o
}

#[test]
fn zero_detection_over_huge_inserted_ranges_is_right_and_quick() {
    // Ranges whose bytes are known by construction: (first, count, zeros).
    let cases = [
        (30, 2 + HUGE + 2, true),  // zero sectors, the inserted range, zeros
        (31, 1 + HUGE + 1, true),  // the same, narrower
        (30, 2 + HUGE + 3, false), // reaches source data after the zeros
        (10, 1, false),            // the written data sector
        (32 + HUGE, 1, true),      // the written zero sector alone
        (32, HUGE, true),          // only the inserted range
    ];
    for mut detecting in [inner(), stacked(false)] {
        detecting.set_detect_zeros(true);
        let plain = stacked(false);
        for &(lba, count, zeros) in &cases {
            let started = Instant::now();
            let found = detecting.block_status(lba, count).unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{lba}+{count}: {:?}",
                started.elapsed()
            );
            let undetected = plain.block_status(lba, count).unwrap();
            let expected = if zeros && undetected == SectorStatus::Normal {
                SectorStatus::Blank
            } else {
                undetected
            };
            assert_eq!(found, expected, "{lba}+{count}");
            assert_eq!(
                detecting.reads_as_zeros(lba, count).unwrap(),
                zeros,
                "{lba}+{count}"
            );
        }
    }
    // Two levels of overlay with detection on.
    let mut top = Overlay::new(Box::new(stacked(true)), OverlayOptions::default()).unwrap();
    top.set_detect_zeros(true);
    let started = Instant::now();
    assert_eq!(
        top.block_status(30, 2 + HUGE + 2).unwrap(),
        SectorStatus::Blank
    );
    assert!(!top.reads_as_zeros(9, 2).unwrap());
    assert!(started.elapsed() < Duration::from_secs(2));
    // Small ranges agree with reading the bytes.
    let mut buf = vec![0u8; 8 * 512];
    for lba in [0u64, 8, 26, 30, 28 + HUGE, 32 + HUGE] {
        top.read_sectors(lba, &mut buf).unwrap();
        assert_eq!(
            top.reads_as_zeros(lba, 8).unwrap(),
            buf.iter().all(|&b| b == 0),
            "{lba}"
        );
    }
}
