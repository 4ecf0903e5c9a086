//! Raw image sources: bytes as in the file (an odd-sized tail zero-padded),
//! and an overlay's edits never reach the file (hash and mtime unchanged).

mod support;

use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, Overlay, OverlayOptions, SectorStatus};

#[test]
fn odd_sized_raw_file_reads_zero_padded_and_reports_exact_size() {
    let dir = support::temp_dir();
    let path = dir.path().join("odd.img");
    let bytes = support::pattern(1000, 3);
    std::fs::write(&path, &bytes).unwrap();
    let before = support::fingerprint(&path);

    let mut disk = open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Raw);
    assert_eq!(disk.byte_size(), 1000);
    assert_eq!(disk.sector_count(), 2);
    let mut buf = vec![0xFFu8; 1024];
    assert_eq!(
        disk.read_sectors(0, &mut buf).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(&buf[..1000], &bytes[..]);
    assert!(buf[1000..].iter().all(|&b| b == 0));
    assert!(
        disk.read_sectors(1, &mut buf).is_err(),
        "2 sectors from 1 overrun"
    );
    drop(disk);
    support::assert_unchanged(&path, &before);
}

#[test]
fn overlay_edits_never_reach_the_source_file() {
    let dir = support::temp_dir();
    let path = dir.path().join("disk.img");
    let bytes = support::pattern(256 * 512, 9);
    std::fs::write(&path, &bytes).unwrap();
    let before = support::fingerprint(&path);

    let source = open_path(&path, &OpenOptions::default()).unwrap();
    let options = OverlayOptions {
        granularity: 16,
        ..OverlayOptions::default()
    };
    let mut overlay = Overlay::new(source, options).unwrap();
    overlay.write(0, &[0xAB; 512 * 40]).unwrap();
    overlay.insert(100, 50).unwrap();
    overlay.move_sectors(0, 300, 20).unwrap();
    overlay.discard(10, 5).unwrap();
    overlay.delete(200, 10).unwrap();
    overlay.write(250, &[0xCD; 512 * 3]).unwrap();
    let mut all = vec![0u8; overlay.sector_count() as usize * 512];
    overlay.read_sectors(0, &mut all).unwrap();
    drop(overlay);
    support::assert_unchanged(&path, &before);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn missing_file_error_names_the_path() {
    let Err(err) = open_path("/nonexistent/dir/x.img".as_ref(), &OpenOptions::default()) else {
        panic!("opening a missing file succeeded");
    };
    assert_eq!(err.code(), cowdisk::error::code::OPEN);
    assert!(err.to_string().contains("/nonexistent/dir/x.img"), "{err}");
}
