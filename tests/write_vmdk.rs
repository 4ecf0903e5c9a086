//! The VMDK writers (monolithicSparse and streamOptimized), judged by QEMU:
//! every clone passes `qemu-img check`, `qemu-img compare` calls it
//! identical to the raw twin of the source, `qemu-img map` shows data in
//! exactly the 64 KiB grains where the source has a non-zero byte, and our
//! own reader reads it back identically. A streamOptimized clone converted
//! back to raw by `qemu-img convert` is byte-identical to the source, and
//! its header, footer and end-of-stream marker are where the Virtual Disk
//! Format puts them (checked here byte by byte). The disk over 2 TiB is
//! checked in windows (qemu-io pattern reads, `qemu-img map` ranges): whole
//! passes of qemu over it take minutes. A monolithicSparse clone stays a
//! working disk: qemu-io writes into a span whose grain table held nothing.

#[path = "support/clone_out.rs"]
mod clone_out;
mod support;

use std::path::Path;

use clone_out::*;
use cowdisk::clone::CloneFormat;
use cowdisk::formats::{open_path, OpenOptions};
use support::{pattern, qemu_img, qemu_map, qemu_map_range};

const GRAIN: u64 = 64 * KIB;
const VARIANTS: [(CloneFormat, &str); 2] = [
    (CloneFormat::VmdkSparse, "sparse"),
    (CloneFormat::VmdkStream, "stream"),
];

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// qemu's data ranges, merged, equal the grains holding non-zero bytes.
fn assert_map_is_the_data_grains(image: &Path, disk: &PieceDisk) {
    let virtual_bytes = disk.bytes.div_ceil(512) * 512;
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in qemu_map(image).into_iter().filter(|e| e.data) {
        match data.last_mut() {
            Some(last) if last.1 == e.start => last.1 = e.start + e.length,
            _ => data.push((e.start, e.start + e.length)),
        }
    }
    let expected = unit_ranges(&disk.nonzero_units(GRAIN), GRAIN, virtual_bytes);
    assert_eq!(data, expected, "{}: data ranges", image.display());
}

/// The stream-optimized layout facts OVA consumers rely on, read by hand:
/// header version 3 with the compressed and markers flags, deflate, the
/// grain directory "at the end" (all ones) in the header and real in the
/// footer, which sits in the second-to-last sector after a footer marker
/// (type 3), and a last sector of zeros (the end-of-stream marker).
fn assert_stream_layout(image: &Path) {
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(bytes.len() % 512, 0);
    let header = &bytes[..512];
    assert_eq!(&header[0..4], b"KDMV");
    assert_eq!(u32_at(header, 4), 3, "version");
    let flags = u32_at(header, 8);
    assert_eq!(
        flags & (1 << 16 | 1 << 17),
        1 << 16 | 1 << 17,
        "flags {flags:#x}"
    );
    assert_eq!(u16::from_le_bytes([header[77], header[78]]), 1, "deflate");
    assert_eq!(u64_at(header, 56), u64::MAX, "header gdOffset");
    let n = bytes.len();
    assert!(
        bytes[n - 512..].iter().all(|b| *b == 0),
        "end-of-stream marker"
    );
    let footer = &bytes[n - 1024..n - 512];
    assert_eq!(&footer[0..4], b"KDMV");
    let marker = &bytes[n - 1536..n - 1024];
    assert_eq!((u64_at(marker, 0), u32_at(marker, 8)), (1, 0));
    assert_eq!(u32_at(marker, 12), 3, "footer marker type");
    let gd = u64_at(footer, 56);
    assert!(gd > 0 && gd < (n as u64) / 512, "footer gdOffset {gd}");
    let gd_marker = &bytes[(gd as usize - 1) * 512..gd as usize * 512];
    assert_eq!(u32_at(gd_marker, 12), 2, "grain directory marker type");
    let descriptor = String::from_utf8_lossy(&bytes[512..512 * 21]);
    assert!(
        descriptor.contains("createType=\"streamOptimized\""),
        "{descriptor}"
    );
}

/// Every check on one clone of `disk` in `format`.
fn check_clone(dir: &Path, name: &str, disk: &mut PieceDisk, format: CloneFormat) {
    let raw = dir.join(format!("{name}.raw"));
    disk.write_raw(&raw);
    let image = dir.join(format!("{name}.vmdk"));
    clone(disk, &image, format);
    assert_qemu_check(&image, "vmdk");
    assert_qemu_identical(&raw, &image, "vmdk");
    assert_map_is_the_data_grains(&image, disk);
    assert_reads_back(&image, disk);
    let grains = disk.nonzero_units(GRAIN).len() as u64;
    let len = std::fs::metadata(&image).unwrap().len();
    if format == CloneFormat::VmdkStream {
        assert_stream_layout(&image);
        let back = dir.join(format!("{name}.back.raw"));
        qemu_img(&[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "raw",
            image.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        let mut expected = std::fs::read(&raw).unwrap();
        expected.resize(disk.bytes.div_ceil(512) as usize * 512, 0);
        assert!(
            std::fs::read(&back).unwrap() == expected,
            "{name}: convert back"
        );
        // Compressed grains: never more than a grain and a sector each,
        // plus 64 KiB before the first grain and the tables, directory,
        // footer and end marker.
        let tables = (disk.bytes.div_ceil(32 * MIB) + 1) * 2560;
        assert!(len <= grains * (GRAIN + 512) + 64 * KIB + tables + 4 * KIB);
    } else {
        // Uncompressed grains exactly, after the metadata: header,
        // descriptor and two copies of directory and tables (4 bytes per
        // grain entry, 2 KiB per table), padded to a grain.
        let tables = disk.bytes.div_ceil(32 * MIB);
        let metadata = 11 * KIB + 2 * (tables * 2 * KIB + tables * 4 + 512);
        assert!(
            len >= grains * GRAIN && len <= grains * GRAIN + metadata + GRAIN,
            "{name}: {len} bytes for {grains} grains"
        );
    }
}

/// 37 MiB and 3 sectors (neither whole pages nor whole grains): data at
/// the start, across grain and page boundaries, up to the last sector, and
/// a megabyte of allocated zeros that must not be stored.
fn mixed_disk() -> PieceDisk {
    let bytes = 37 * MIB + 1536;
    PieceDisk::new(
        bytes,
        vec![
            (4096, pattern(8 * KIB as usize, 1)),
            (3 * MIB + 5 * GRAIN + 512, pattern(100 * KIB as usize, 2)),
            (10 * MIB, vec![0; MIB as usize]),
            (20 * MIB - 512, pattern(1024, 3)),
            (bytes - 2048, pattern(2048, 4)),
        ],
    )
}

#[test]
fn mixed_disk_of_odd_size_round_trips_in_both_variants() {
    let dir = tempfile::tempdir().unwrap();
    for (format, name) in VARIANTS {
        check_clone(dir.path(), name, &mut mixed_disk(), format);
    }
}

#[test]
fn empty_disk_stores_no_grain() {
    let dir = tempfile::tempdir().unwrap();
    for (format, name) in VARIANTS {
        let mut disk = PieceDisk::new(100 * MIB + 3 * 512, vec![]);
        check_clone(dir.path(), name, &mut disk, format);
    }
    // The monolithicSparse clone stays a working disk: QEMU writes into a
    // span whose grain table held nothing (every table is allocated).
    let image = dir.path().join("sparse.vmdk");
    support::qemu_io(&image, "vmdk", &["write -P 119 70M 64k".to_string()]);
    assert_qemu_check(&image, "vmdk");
    assert_qemu_reads(
        &image,
        "vmdk",
        &[(119, 70 * MIB, 64 * KIB), (0, 0, 70 * MIB)],
    );
}

#[test]
fn fully_written_small_disk_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for (format, name) in VARIANTS {
        let bytes = 9 * MIB + 5 * 512;
        let mut disk = PieceDisk::new(bytes, vec![(0, pattern(bytes as usize, 9))]);
        check_clone(dir.path(), name, &mut disk, format);
    }
}

#[test]
fn odd_byte_sized_raw_file_clones_with_a_zero_padded_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    let bytes = 5 * MIB + 1000;
    let data = pattern(3000, 5);
    let disk = PieceDisk::new(bytes, vec![(0, pattern(512, 6)), (bytes - 3000, data)]);
    disk.write_raw(&src);
    for (format, name) in VARIANTS {
        let image = dir.path().join(format!("odd-{name}.vmdk"));
        let mut source = open_path(&src, &OpenOptions::default()).unwrap();
        clone(source.as_mut(), &image, format);
        assert_qemu_check(&image, "vmdk");
        assert_qemu_identical(&src, &image, "vmdk");
        assert_reads_back(&image, source.as_mut());
        let back = open_path(&image, &OpenOptions::default()).unwrap();
        assert_eq!(back.byte_size(), bytes.div_ceil(512) * 512);
    }
}

#[test]
fn disk_over_2_tib_stores_only_its_few_grains() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = 2 * TIB + 7 * MIB + 1536;
    let pieces = [
        (0x11u8, 0, GRAIN),
        (0x22, TIB + 3 * MIB, MIB),
        (0x33, 2 * TIB + MIB + GRAIN, 4 * KIB),
        (0x44, bytes - 1024, 1024),
    ];
    for (format, name) in VARIANTS {
        let mut disk = PieceDisk::new(
            bytes,
            pieces
                .iter()
                .map(|&(b, at, len)| (at, vec![b; len as usize]))
                .collect(),
        );
        let image = dir.path().join(format!("big-{name}.vmdk"));
        clone(&mut disk, &image, format);
        assert_qemu_check(&image, "vmdk");
        let mut reads: Vec<(u8, u64, u64)> = pieces.to_vec();
        // Zeros around each piece and in the middle of nowhere.
        reads.extend([
            (0, GRAIN, MIB - GRAIN),
            (0, TIB + 2 * MIB, MIB),
            (0, TIB + 4 * MIB, MIB),
            (0, 2 * TIB, MIB + GRAIN),
            (0, 2 * TIB + MIB + GRAIN + 4 * KIB, MIB),
            (0, bytes - MIB, MIB - 1024),
            (0, 1536 * GIB, 4 * MIB),
        ]);
        assert_qemu_reads(&image, "vmdk", &reads);
        for &(_, at, len) in &pieces {
            let from = (at / GRAIN * GRAIN).saturating_sub(MIB);
            let window = (3 * MIB).min(bytes - from);
            let data: Vec<(u64, u64)> = qemu_map_range(&image, from, window)
                .into_iter()
                .filter(|e| e.data)
                .map(|e| (e.start, e.start + e.length))
                .collect();
            let first = at / GRAIN * GRAIN;
            let last = ((at + len).div_ceil(GRAIN) * GRAIN).min(bytes.div_ceil(512) * 512);
            assert_eq!(data, vec![(first, last)], "{name}: map around {at}");
        }
        assert_reads_back(&image, &mut disk);
        let len = std::fs::metadata(&image).unwrap().len();
        let stored = cowdisk::clone::allocated_bytes(&image).unwrap();
        assert!(
            stored < 8 * MIB,
            "{name}: {stored} bytes allocated ({len} long)"
        );
    }
}

#[test]
fn cancelled_and_refused_clones_leave_nothing() {
    for (format, _) in VARIANTS {
        assert_failed_clones_leave_nothing(format, "vmdk");
    }
}
