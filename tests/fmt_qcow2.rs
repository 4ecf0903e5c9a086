//! qcow2 reader tests against qemu-img/qemu-io as the oracle: images are
//! made by qemu at test time and read back byte for byte against
//! `qemu-img convert -O raw`, with allocation checked against
//! `qemu-img map`.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowdisk::formats::mapped::{MappedImage, Mapping};
use cowdisk::formats::qcow2::Qcow2Disk;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};
use support::*;

const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, opts: &[&str], size: &str) -> PathBuf {
    support::qemu_create(dir, name, "qcow2", opts, size)
}

fn io(image: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io(image, "qcow2", &cmds);
}

/// Writes that touch the first and last sector, unaligned offsets, partial
/// clusters, a discard and a zero write, on a disk of `size` bytes.
fn fill_varied(image: &Path, size: u64) {
    let last = size - 512;
    io(
        image,
        &[
            "write -P 0x11 0 512",
            "write -P 0x22 1234567 70001",
            &format!("write -P 0x33 {last} 512"),
            "write -P 0x44 3000000 300000",
            "discard 3145728 65536",
            "write -z 2000000 100000",
            "write -P 0x55 4096 1536",
        ],
    );
}

/// Opens `image` through the probe, checks it is qcow2, compares every byte
/// with qemu's conversion and the allocation with qemu's map, and checks
/// the file was not modified.
fn check_matches_qemu(image: &Path, dir: &Path, options: &OpenOptions) -> Box<dyn Disk> {
    let before = fingerprint(image);
    let expected = qemu_raw_bytes(image, dir);
    let mut disk = open_path(image, options).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Qcow2);
    assert_eq!(disk.byte_size(), expected.len() as u64);
    support::compare_bytes(disk.as_mut(), &expected);
    support::compare_allocation(disk.as_mut(), image);
    assert_unchanged(image, &before);
    disk
}

#[test]
fn v3_image_with_odd_size_matches_qemu() {
    let dir = temp_dir();
    // 5 MiB + 1536 bytes: not a multiple of the 64 KiB cluster.
    let size = 5 * MIB + 1536;
    let image = create(
        dir.path(),
        "v3.qcow2",
        &["-o", "compat=1.1"],
        &size.to_string(),
    );
    fill_varied(&image, size);
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert!(!disk.is_snapshot());
    assert_eq!(disk.uuid(), None);
}

#[test]
fn v3_zero_clusters_are_blank() {
    let dir = temp_dir();
    let image = create(dir.path(), "z.qcow2", &["-o", "compat=1.1"], "1M");
    io(&image, &["write -P 0x66 0 1M", "write -z 131072 131072"]);
    let before = fingerprint(&image);
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.block_status(256, 256).unwrap(), SectorStatus::Blank);
    let mut buf = vec![1u8; 512 * 256];
    assert_eq!(
        disk.read_sectors(256, &mut buf).unwrap(),
        SectorStatus::Blank
    );
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(disk.block_status(0, 2048).unwrap(), SectorStatus::Normal);
    assert_eq!(disk.block_status(1024, 1024).unwrap(), SectorStatus::Normal);
    drop(disk);
    assert_unchanged(&image, &before);
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
}

#[test]
fn v2_image_with_small_clusters_matches_qemu() {
    let dir = temp_dir();
    let size = 5 * MIB + 1536;
    let image = create(
        dir.path(),
        "v2.qcow2",
        &["-o", "compat=0.10,cluster_size=4096"],
        &size.to_string(),
    );
    fill_varied(&image, size);
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
}

#[test]
fn large_clusters_match_qemu() {
    let dir = temp_dir();
    let size = 9 * MIB + 512;
    let image = create(
        dir.path(),
        "big.qcow2",
        &["-o", "cluster_size=2M"],
        &size.to_string(),
    );
    fill_varied(&image, size);
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
}

fn compressed_from_raw(dir: &Path, name: &str, cluster: &str) -> PathBuf {
    let raw = path_in(dir, &format!("{name}.src.raw"));
    let size = 3 * MIB + 4608;
    std::fs::write(&raw, vec![0u8; size as usize]).unwrap();
    let cmds: Vec<String> = [
        "write -P 0x71 0 700000",
        "write -P 0x72 1500000 12345",
        "write -P 0x73 2500000 600000",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    qemu_io(&raw, "raw", &cmds);
    // Some incompressible data too, so clusters of both kinds exist.
    let noise = pattern(200_000, 9);
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[800_000..1_000_000].copy_from_slice(&noise);
    std::fs::write(&raw, &bytes).unwrap();
    let image = path_in(dir, name);
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        &raw.display().to_string(),
        &image.display().to_string(),
    ]);
    image
}

#[test]
fn compressed_clusters_match_qemu() {
    let dir = temp_dir();
    for cluster in ["4096", "65536"] {
        let image = compressed_from_raw(dir.path(), &format!("c{cluster}.qcow2"), cluster);
        let map = qemu_map(&image);
        assert!(
            map.iter().any(|e| e.data) && std::fs::metadata(&image).unwrap().len() < 2 * MIB,
            "qemu did not compress the image"
        );
        check_matches_qemu(&image, dir.path(), &OpenOptions::default());
        let disk = Qcow2Disk::open(&image, &OpenOptions::default()).unwrap();
        let (mapping, _) = disk.map(0, 8).unwrap();
        assert!(matches!(mapping, Mapping::Encoded { .. }), "{mapping:?}");
    }
}

#[test]
fn extended_l2_subclusters_match_qemu() {
    let dir = temp_dir();
    let size = 6 * MIB + 512;
    let image = create(
        dir.path(),
        "ext.qcow2",
        &["-o", "extended_l2=on,cluster_size=64k"],
        &size.to_string(),
    );
    fill_varied(&image, size);
    io(
        &image,
        &["write -P 0x77 70000 1000", "write -z 200704 2048"],
    );
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    // A 2 KiB subcluster written alone is data; its neighbours are not.
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.block_status(8, 4).unwrap(), SectorStatus::Normal);
    assert_eq!(disk.block_status(16, 4).unwrap(), SectorStatus::NotAlloc);
}

#[test]
fn extended_l2_over_backing_falls_through_per_subcluster() {
    let dir = temp_dir();
    let base = create(dir.path(), "base.qcow2", &[], "2M");
    io(&base, &["write -P 0x10 0 2M"]);
    let top = create(
        dir.path(),
        "top.qcow2",
        &[
            "-o",
            "extended_l2=on,cluster_size=64k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        "",
    );
    io(&top, &["write -P 0x20 4096 2048", "write -z 65536 4096"]);
    let base_before = fingerprint(&base);
    let disk = check_matches_qemu(&top, dir.path(), &support::follow());
    assert!(disk.is_snapshot());
    assert_unchanged(&base, &base_before);
}

#[test]
fn backing_chain_needs_the_flag_and_then_matches_qemu() {
    let dir = temp_dir();
    let base_raw = path_in(dir.path(), "base.raw");
    std::fs::write(&base_raw, pattern(3 * MIB as usize, 1)).unwrap();
    let mid = create(
        dir.path(),
        "mid.qcow2",
        &["-b", "base.raw", "-F", "raw", "-o", "compat=0.10"],
        "",
    );
    io(&mid, &["write -P 0x21 100000 200000"]);
    // The top is larger than its backing chain.
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-b", "mid.qcow2", "-F", "qcow2"],
        "4M",
    );
    io(
        &top,
        &[
            "write -P 0x31 150000 5000",
            "write -z 1048576 65536",
            "write -P 0x32 3500000 1000",
        ],
    );

    let top_before = fingerprint(&top);
    let err = support::open_error(&top, &OpenOptions::default());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("mid.qcow2"), "{err}");
    assert_unchanged(&top, &top_before);

    let base_before = fingerprint(&base_raw);
    let mid_before = fingerprint(&mid);
    let disk = check_matches_qemu(&top, dir.path(), &support::follow());
    assert!(disk.is_snapshot());
    // A zero cluster in the child hides the parent's data.
    assert_eq!(disk.block_status(2048, 128).unwrap(), SectorStatus::Blank);
    // Past the backing chain's end: unallocated.
    assert_eq!(
        disk.block_status(7000, 100).unwrap(),
        SectorStatus::NotAlloc
    );
    drop(disk);

    // The caller may supply the parent instead.
    let parent = open_path(&mid, &support::follow()).unwrap();
    let mut supplied = Qcow2Disk::open_with_parent(&top, parent).unwrap();
    assert_eq!(supplied.backing_file_name(), Some("mid.qcow2"));
    let expected = qemu_raw_bytes(&top, dir.path());
    support::compare_bytes(&mut supplied, &expected);
    assert_unchanged(&top, &top_before);
    assert_unchanged(&mid, &mid_before);
    assert_unchanged(&base_raw, &base_before);
}

/// A raw backing file whose data is a whole qcow2 image: the child names
/// its format (`-F raw`, the backing-format header extension), so it is read
/// as raw, as qemu reads it, not probed as qcow2.
#[test]
fn backing_format_extension_wins_over_the_probe() {
    let dir = temp_dir();
    let inner = create(dir.path(), "inner.qcow2", &[], "64M");
    io(&inner, &["write -P 0x77 0 65536"]);
    let mut base_bytes = std::fs::read(&inner).unwrap();
    assert_eq!(&base_bytes[..4], b"QFI\xfb");
    base_bytes.resize(2 * MIB as usize, 0x3C);
    let base_raw = path_in(dir.path(), "base.raw");
    std::fs::write(&base_raw, &base_bytes).unwrap();
    for compat in ["0.10", "1.1"] {
        let name = format!("child-{compat}.qcow2");
        let child = create(
            dir.path(),
            &name,
            &[
                "-b",
                "base.raw",
                "-F",
                "raw",
                "-o",
                &format!("compat={compat}"),
            ],
            "",
        );
        io(&child, &["write -P 0x21 100000 3000"]);
        let base_before = fingerprint(&base_raw);
        let disk = Qcow2Disk::open(&child, &support::follow()).unwrap();
        assert_eq!(disk.backing_format(), Some("raw"));
        drop(disk);
        // Bytes from qemu; the size is the raw file's, not the inner image's.
        let disk = check_matches_qemu(&child, dir.path(), &support::follow());
        assert_eq!(disk.byte_size(), 2 * MIB);
        let mut first = vec![0u8; 512];
        disk.read_sectors(0, &mut first).unwrap();
        assert!(
            first[..] == base_bytes[..512],
            "the magic sector reads as data"
        );
        assert_unchanged(&base_raw, &base_before);
    }
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = temp_dir();
    let base = create(dir.path(), "gone.qcow2", &[], "1M");
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-b", "gone.qcow2", "-F", "qcow2"],
        "",
    );
    std::fs::remove_file(&base).unwrap();
    let err = support::open_error(&top, &support::follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("gone.qcow2"), "{err}");
}

#[test]
fn internal_snapshots_do_not_change_the_active_view() {
    let dir = temp_dir();
    let image = create(dir.path(), "snap.qcow2", &[], "2M");
    io(&image, &["write -P 0x01 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", &image.display().to_string()]);
    io(
        &image,
        &["write -P 0x02 65536 65536", "discard 524288 65536"],
    );
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
}

#[test]
fn sparse_image_over_two_tib() {
    let dir = temp_dir();
    let size: u64 = 4 << 40;
    let image = create(dir.path(), "huge.qcow2", &[], &size.to_string());
    let spots = [0u64, 3 << 40, (2 << 40) + 12345 * 512, size - 4096];
    let cmds: Vec<String> = spots
        .iter()
        .enumerate()
        .map(|(i, off)| format!("write -P {} {off} 4096", 0x40 + i))
        .collect();
    qemu_io(&image, "qcow2", &cmds);
    let before = fingerprint(&image);
    let started = Instant::now();
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.byte_size(), size);
    for (i, off) in spots.iter().enumerate() {
        let lba = off / 512;
        let mut buf = vec![0u8; 3 * 4096];
        let from = lba.saturating_sub(8).min(disk.sector_count() - 24);
        disk.read_sectors(from, &mut buf).unwrap();
        for (j, b) in buf.iter().enumerate() {
            let byte = from * 512 + j as u64;
            let want = if (*off..off + 4096).contains(&byte) {
                0x40 + i as u8
            } else {
                0
            };
            assert_eq!(*b, want, "byte {byte}");
        }
    }
    // The whole disk's status, in one call, answered quickly.
    assert_eq!(
        disk.block_status(0, disk.sector_count()).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(
        // From the second cluster to just before the write past 2 TiB.
        disk.block_status(128, (2 << 40) / 512).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(disk);
    assert_unchanged(&image, &before);
}

#[test]
fn sequential_data_maps_as_one_run() {
    let dir = temp_dir();
    let image = create(dir.path(), "seq.qcow2", &["-o", "cluster_size=4096"], "4M");
    io(&image, &["write -P 0x09 0 2M"]);
    let disk = Qcow2Disk::open(&image, &OpenOptions::default()).unwrap();
    let (mapping, run) = disk.map(0, 2048).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }));
    assert_eq!(run, 2048, "1 MiB of contiguous clusters should be one run");
    let (mapping, run) = disk.map(4096, 4096).unwrap();
    assert_eq!(mapping, Mapping::Unallocated);
    assert_eq!(run, 4096);
}

fn refused(image: &Path, needle: &str) {
    let before = fingerprint(image);
    let err = support::open_error(image, &OpenOptions::default());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains(needle), "{err}");
    assert_unchanged(image, &before);
}

#[test]
fn encryption_external_data_zstd_and_unknown_features_are_refused() {
    let dir = temp_dir();
    let enc = create(
        dir.path(),
        "enc.qcow2",
        &[
            "--object",
            "secret,id=sec0,data=password",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
        "1M",
    );
    refused(&enc, "encrypt");

    // qemu-img resolves the data file against its working directory, so
    // give it a full path inside the test's folder.
    let data_opt = format!("data_file={}", path_in(dir.path(), "ext.data").display());
    let data = create(dir.path(), "ext.qcow2", &["-o", &data_opt], "1M");
    refused(&data, "external data file");

    let zstd = create(
        dir.path(),
        "zstd.qcow2",
        &["-o", "compression_type=zstd"],
        "1M",
    );
    refused(&zstd, "zstd");

    let plain = create(dir.path(), "future.qcow2", &[], "1M");
    let mut bytes = std::fs::read(&plain).unwrap();
    bytes[72 + 7] |= 0x80; // incompatible feature bit 7
    std::fs::write(&plain, &bytes).unwrap();
    refused(&plain, "incompatible");
}
