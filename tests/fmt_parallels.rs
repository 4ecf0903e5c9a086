//! Parallels reader tests: images made by qemu-img/qemu-io, compared byte
//! for byte and allocation for allocation with qemu's reading of them.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cowdisk::formats::mapped::{MappedImage, Mapping};
use cowdisk::formats::parallels::ParallelsDisk;
use cowdisk::formats::{self, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};
use proptest::prelude::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `qemu-img create -f parallels [-o OPTS] PATH SIZE`, then qemu-io.
fn make_hdd(dir: &Path, name: &str, size: u64, opts: &[&str], cmds: &[String]) -> PathBuf {
    let path = support::path_in(dir, name);
    let mut args = vec!["create", "-q", "-f", "parallels"];
    args.extend_from_slice(opts);
    let path_text = path.display().to_string();
    let size_text = size.to_string();
    args.push(&path_text);
    args.push(&size_text);
    support::qemu_img(&args);
    if !cmds.is_empty() {
        support::qemu_io(&path, "parallels", cmds);
    }
    path
}

fn write(byte: u8, offset: u64, len: u64) -> String {
    format!("write -P {byte:#x} {offset} {len}")
}

/// Reads the whole disk in `chunk`-byte reads.
fn read_all(disk: &mut dyn Disk, chunk: usize) -> Vec<u8> {
    let total = disk.sector_count() as usize * 512;
    let mut out = vec![0u8; total];
    let mut at = 0;
    while at < total {
        let len = chunk.min(total - at);
        disk.read_sectors((at / 512) as u64, &mut out[at..at + len])
            .unwrap();
        at += len;
    }
    out
}

/// qemu's `data: true` ranges are Normal for us and its other ranges are
/// not (both answer per cluster).
fn check_map(disk: &mut dyn Disk, path: &Path) {
    for entry in support::qemu_map(path) {
        let lba = entry.start / 512;
        let count = (entry.start + entry.length).div_ceil(512) - lba;
        let status = disk.block_status(lba, count).unwrap();
        if entry.data {
            assert_eq!(status, SectorStatus::Normal, "{entry:?}");
        } else {
            assert_ne!(status, SectorStatus::Normal, "{entry:?}");
        }
    }
}

/// Opens `path` through the probe, checks it is Parallels, and compares
/// every byte (in several read sizes) and the allocation with qemu's view.
/// Returns qemu's bytes.
fn check_against_qemu(path: &Path, dir: &Path) -> Vec<u8> {
    let before = support::fingerprint(path);
    let expected = support::qemu_raw_bytes(path, dir);
    let mut disk = formats::open_path(path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Parallels);
    assert_eq!(disk.byte_size(), expected.len() as u64);
    assert_eq!(disk.uuid(), None);
    assert!(!disk.is_snapshot());
    for chunk in [MIB as usize, 3 * 512, 64 * 1024 + 512] {
        let got = read_all(disk.as_mut(), chunk);
        assert!(got == expected, "bytes differ from qemu (chunk {chunk})");
    }
    check_map(disk.as_mut(), path);
    drop(disk);
    support::assert_unchanged(path, &before);
    expected
}

/// Writes that exercise a 64 KiB-cluster image of `size` bytes.
fn small_cluster_writes(size: u64) -> Vec<String> {
    vec![
        write(0x11, 0, 512),                                // first sector
        write(0x22, 1000, 3000),                            // unaligned
        write(0x33, 64 * KIB - 700, 2000),                  // straddles clusters 0/1
        write(0x44, 9 * 64 * KIB + 77, 5000),               // cluster 9 before 4..8
        write(0x55, 4 * 64 * KIB, 3 * 64 * KIB),            // clusters 4..6 in order
        write(0x58, 3 * 64 * KIB + 5, 64 * KIB), // clusters 3..4: 3 lands after 6 in the file
        write(0x66, size - 512, 512),            // last sector
        write(0x77, 12 * 64 * KIB, 64 * KIB),    // cluster 12, then
        format!("discard {} {}", 12 * 64 * KIB, 64 * KIB), // discarded
        "write -z 2048 1024".to_string(),        // zeros inside cluster 0
        format!("write -z {} {}", 20 * 64 * KIB, 64 * KIB), // zeros, unallocated
    ]
}

#[test]
fn small_cluster_image_matches_qemu() {
    let dir = support::temp_dir();
    // Not a whole number of clusters: 30 clusters, 3 sectors.
    let size = 30 * 64 * KIB + 3 * 512;
    let path = make_hdd(
        dir.path(),
        "small.hdd",
        size,
        &["-o", "cluster_size=64K"],
        &small_cluster_writes(size),
    );
    check_against_qemu(&path, dir.path());

    // Clusters 4..6 were allocated one after another: one run (one pread).
    let before = support::fingerprint(&path);
    let hdd = ParallelsDisk::open(&path).unwrap();
    assert!(hdd.header().bat_in_clusters);
    let (mapping, run) = hdd.map(4 * 128, 10 * 128).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }), "{mapping:?}");
    assert_eq!(run, 3 * 128);
    assert_eq!(
        hdd.map(7 * 128, 2 * 128).unwrap(),
        (Mapping::Unallocated, 2 * 128)
    );
    assert_eq!(
        hdd.block_status(12 * 128, 128).unwrap(),
        SectorStatus::NotAlloc
    );
    drop(hdd);
    support::assert_unchanged(&path, &before);
}

#[test]
fn default_cluster_image_matches_qemu() {
    let dir = support::temp_dir();
    let size = 5 * MIB + 7 * 512;
    let cmds = vec![
        write(0x81, 4096 + 3, 100_000),
        write(0x82, 3 * MIB - 100, 200),
        write(0x83, size - 4096, 4096),
    ];
    let path = make_hdd(dir.path(), "default.hdd", size, &[], &cmds);
    check_against_qemu(&path, dir.path());
}

#[test]
fn preallocated_image_matches_qemu() {
    let dir = support::temp_dir();
    let size = 2 * MIB + 512;
    let cmds = vec![write(0x91, MIB + 1, 1000)];
    let path = make_hdd(
        dir.path(),
        "falloc.hdd",
        size,
        &["-o", "preallocation=falloc,cluster_size=256K"],
        &cmds,
    );
    check_against_qemu(&path, dir.path());
}

/// The older `WithoutFreeSpace` variant counts BAT entries in sectors. qemu
/// cannot create it, so a qemu-made image is rewritten: new magic, each
/// BAT entry multiplied by the cluster size in sectors, no extension. qemu
/// still reads the result, and it must read as the original did.
#[test]
fn sector_addressed_variant_matches_qemu() {
    let dir = support::temp_dir();
    let size = 30 * 64 * KIB + 3 * 512;
    let original = make_hdd(
        dir.path(),
        "ext.hdd",
        size,
        &["-o", "cluster_size=64K"],
        &small_cluster_writes(size),
    );
    let original_bytes = support::qemu_raw_bytes(&original, dir.path());

    let mut bytes = std::fs::read(&original).unwrap();
    assert_eq!(&bytes[..16], b"WithouFreSpacExt");
    let cluster_sectors = u32::from_le_bytes(bytes[28..32].try_into().unwrap());
    let bat_entries = u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize;
    bytes[..16].copy_from_slice(b"WithoutFreeSpace");
    bytes[56..64].fill(0);
    for i in 0..bat_entries {
        let at = 64 + i * 4;
        let entry = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        bytes[at..at + 4].copy_from_slice(&(entry * cluster_sectors).to_le_bytes());
    }
    let old = dir.path().join("old.hdd");
    std::fs::write(&old, &bytes).unwrap();

    let via_qemu = check_against_qemu(&old, dir.path());
    assert!(via_qemu == original_bytes);
    let before = support::fingerprint(&old);
    let hdd = ParallelsDisk::open(&old).unwrap();
    assert!(!hdd.header().bat_in_clusters);
    drop(hdd);
    support::assert_unchanged(&old, &before);
}

#[test]
fn sparse_image_over_2_tib() {
    let dir = support::temp_dir();
    let size = 3 << 40; // 3 TiB
    let far = (5 << 39) + 12_345; // 2.5 TiB, unaligned
    let cmds = vec![
        write(0x5a, 0, 4096),
        write(0xa5, far, 70_000),
        write(0x3c, size - 512, 512),
    ];
    let path = make_hdd(dir.path(), "big.hdd", size, &[], &cmds);
    let before = support::fingerprint(&path);
    let disk = formats::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Parallels);
    assert_eq!(disk.sector_count(), size / 512);

    let writes = [
        (0, 4096, 0x5a),
        (far, 70_000, 0xa5),
        (size - 512, 512, 0x3c),
    ];
    let check_region = |start: u64, len: usize| {
        let mut buf = vec![0xEEu8; len];
        disk.read_sectors(start / 512, &mut buf).unwrap();
        for (i, byte) in buf.iter().enumerate() {
            let at = start + i as u64;
            let want = writes
                .iter()
                .find(|(off, n, _)| (*off..off + n).contains(&at))
                .map_or(0, |w| w.2);
            assert_eq!(*byte, want, "byte {at}");
        }
    };
    check_region(0, 8192);
    check_region(far - 12_345 - MIB, 3 * MIB as usize);
    check_region(size - MIB, MIB as usize);
    check_region(1 << 40, 64 * 1024);

    assert_eq!(
        disk.block_status((1 << 40) / 512, (1 << 30) / 512).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(
        disk.block_status(far / 512, 1).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(
        disk.block_status(8, size / 512 - 8 - 1).unwrap(),
        SectorStatus::Normal
    );
    // qemu-img 10 asserts when mapping this whole image (an unallocated
    // run of terabytes), so compare qemu's map window by window.
    for start in [0, far - MIB, size - (1 << 30), 1 << 40] {
        for entry in support::qemu_map_range(&path, start, 1 << 30) {
            let lba = entry.start / 512;
            let count = (entry.start + entry.length).div_ceil(512) - lba;
            let status = disk.block_status(lba, count).unwrap();
            assert_eq!(status == SectorStatus::Normal, entry.data, "{entry:?}");
        }
    }
    drop(disk);
    support::assert_unchanged(&path, &before);
}

// ---------------------------------------------------------------------------
// Bad input.

/// A small qemu-made image (1 MiB in 64 KiB clusters, three allocated).
fn small_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = make_hdd(
        dir,
        "fuzz.hdd",
        MIB,
        &["-o", "cluster_size=64K"],
        &[
            write(0x61, 0, 512),
            write(0x62, 5 * 64 * KIB + 9, 100),
            write(0x63, MIB - 512, 512),
        ],
    );
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// Overwrites bytes at `at` of the file at `path` (a copy of `original`),
/// runs the open-and-read check, and restores the file.
fn with_damage(path: &Path, original: &[u8], at: usize, damaged: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(damaged, at as u64).unwrap();
    support::fuzz::open_and_exercise(path);
    file.write_all_at(&original[at..at + damaged.len()], at as u64)
        .unwrap();
}

#[test]
fn damaged_headers_and_bats_never_panic() {
    let dir = support::temp_dir();
    let (path, original) = small_image(dir.path());
    let started = Instant::now();
    // Every bit of the header and BAT (16 entries), flipped one at a time.
    for at in 0..64 + 16 * 4 {
        for bit in 0..8 {
            with_damage(&path, &original, at, &[original[at] ^ (1 << bit)]);
        }
    }
    // Header fields and BAT entries set to interesting values.
    for at in [28, 32, 36, 40, 48].into_iter().chain((64..128).step_by(4)) {
        for value in [0u32, 1, 2, 0x7F, 0x80, 0x81, 0xFFFF, 0x7FFF_FFFF, u32::MAX] {
            with_damage(&path, &original, at, &value.to_le_bytes());
        }
    }
    // Truncations, including inside the header, BAT and data.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for len in [
        0,
        1,
        16,
        63,
        64,
        100,
        127,
        128,
        512,
        64 * 1024,
        64 * 1024 + 1,
        original.len() - 1,
    ] {
        file.set_len(len as u64).unwrap();
        support::fuzz::open_and_exercise(&path);
    }
    drop(file);
    std::fs::write(&path, &original).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), original);
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random bytes over random spans of the header and BAT, and a random
    /// truncation: Ok or Err, never a panic.
    #[test]
    fn random_header_and_bat_damage_never_panics(
        spans in proptest::collection::vec((0usize..128, proptest::collection::vec(any::<u8>(), 1..16)), 1..6),
        truncate_to in proptest::option::of(0usize..0x30000),
    ) {
        let dir = support::temp_dir();
        let (path, mut bytes) = small_image(dir.path());
        let before = support::fingerprint(&path);
        for (at, data) in &spans {
            let end = (*at + data.len()).min(bytes.len());
            bytes[*at..end].copy_from_slice(&data[..end - at]);
        }
        if let Some(len) = truncate_to {
            bytes.truncate(len);
        }
        let damaged = dir.path().join("damaged.hdd");
        std::fs::write(&damaged, &bytes).unwrap();
        let damaged_before = support::fingerprint(&damaged);
        support::fuzz::open_and_exercise(&damaged);
        support::assert_unchanged(&damaged, &damaged_before);
        support::assert_unchanged(&path, &before);
    }
}

#[test]
fn probe_needs_the_magic() {
    let dir = support::temp_dir();
    let path = dir.path().join("almost.hdd");
    let mut bytes = vec![0u8; 4096];
    bytes[..16].copy_from_slice(b"WithoutFreeSpacf");
    std::fs::write(&path, &bytes).unwrap();
    assert!(!cowdisk::formats::parallels::probe(
        &File::open(&path).unwrap()
    ));
    let disk = formats::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Raw);
}
