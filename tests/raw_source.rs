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

    let disk = open_path(&path, &OpenOptions::default()).unwrap();
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

/// Our status runs of a raw file as byte ranges (clipped to the file's
/// size, neighbours of the same kind joined): (start, length, data).
fn our_runs(path: &std::path::Path) -> Vec<(u64, u64, bool)> {
    let disk = open_path(path, &OpenOptions::default()).unwrap();
    let (sectors, bytes) = (disk.sector_count(), disk.byte_size());
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut lba = 0;
    while lba < sectors {
        let (status, n) = disk.status_run(lba, sectors - lba).unwrap();
        assert!(n > 0 && lba + n <= sectors);
        assert_ne!(status, SectorStatus::Blank, "raw files have no blank state");
        // block_status of the same run agrees with it.
        assert_eq!(disk.block_status(lba, n).unwrap(), status);
        let start = lba * 512;
        let len = ((lba + n) * 512).min(bytes) - start;
        push_run(&mut runs, (start, len, status == SectorStatus::Normal));
        lba += n;
    }
    runs
}

fn push_run(runs: &mut Vec<(u64, u64, bool)>, run: (u64, u64, bool)) {
    match runs.last_mut() {
        Some(last) if last.2 == run.2 && last.0 + last.1 == run.0 => last.1 += run.1,
        _ => runs.push(run),
    }
}

/// `qemu-img map` of the same raw file, in the same shape. qemu rounds an
/// odd-sized raw file up to whole sectors and maps the padding as a hole of
/// its own: clipped at the file's size.
fn qemu_runs(path: &std::path::Path) -> Vec<(u64, u64, bool)> {
    let size = std::fs::metadata(path).unwrap().len();
    let mut runs = Vec::new();
    for entry in support::qemu_map(path) {
        let end = (entry.start + entry.length).min(size);
        if entry.start < end {
            push_run(&mut runs, (entry.start, end - entry.start, entry.data));
        }
    }
    runs
}

#[test]
fn holes_of_a_sparse_raw_file_are_unallocated_exactly_where_qemu_img_map_says() {
    let dir = support::temp_dir();
    // File name, size, and the pieces written: (offset, bytes).
    type Case = (&'static str, u64, Vec<(u64, Vec<u8>)>);
    let cases: Vec<Case> = vec![
        // Holes around data, written zeros (allocated: data), an odd-sized
        // tail holding data.
        (
            "mixed.img",
            10 * (1 << 20) + 1000,
            vec![
                (1 << 20, support::pattern(64 << 10, 1)),
                (3 << 20, vec![0u8; 128 << 10]),
                (5 << 20, support::pattern(8 << 10, 2)),
                (10 << 20, support::pattern(1000, 3)),
            ],
        ),
        // Data from the first byte, then a hole to an odd-sized end.
        (
            "head.img",
            4 * (1 << 20) + 300,
            vec![(0, support::pattern(256 << 10, 4))],
        ),
        ("empty.img", 8 << 20, vec![]),
    ];
    for (name, size, pieces) in cases {
        let path = dir.path().join(name);
        let file = std::fs::File::create(&path).unwrap();
        for (at, bytes) in &pieces {
            std::os::unix::fs::FileExt::write_all_at(&file, bytes, *at).unwrap();
        }
        file.set_len(size).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let qemu = qemu_runs(&path);
        assert!(
            qemu.iter().any(|r| !r.2),
            "{name}: the file system keeps no holes"
        );
        assert_eq!(our_runs(&path), qemu, "{name}");
        // And the bytes still read as in the file.
        let mut disk = open_path(&path, &OpenOptions::default()).unwrap();
        let mut expected = std::fs::read(&path).unwrap();
        expected.resize((disk.sector_count() * 512) as usize, 0);
        support::compare_bytes(disk.as_mut(), &expected);
    }
}
