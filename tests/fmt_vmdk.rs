//! VMDK reader tests against qemu-img/qemu-io as the oracle: images are
//! made by qemu at test time (or hand-written descriptors qemu also reads)
//! and read back byte for byte against `qemu-img convert -O raw`, with
//! allocation checked against `qemu-img map`.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cowdisk::formats::vmdk::VmdkDisk;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};
use support::*;

const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, opts: &[&str], size: &str) -> PathBuf {
    support::qemu_create(dir, name, "vmdk", opts, size)
}

fn io(image: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io(image, "vmdk", &cmds);
}

/// Writes that touch the first and last sector, unaligned offsets, partial
/// grains and a zero write.
fn fill_varied(image: &Path, size: u64) {
    let last = size - 512;
    io(
        image,
        &[
            "write -P 0x11 0 512",
            "write -P 0x22 1234567 70001",
            &format!("write -P 0x33 {last} 512"),
            "write -P 0x44 3000000 300000",
            "write -z 2000000 100000",
            "write -P 0x55 4096 1536",
        ],
    );
}

/// Every file of the image in `dir` (descriptor and extents), fingerprinted.
fn fingerprints(dir: &Path) -> Vec<(PathBuf, Fingerprint)> {
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".expected.raw"))
        .map(|p| {
            let f = fingerprint(&p);
            (p, f)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn assert_all_unchanged(before: &[(PathBuf, Fingerprint)]) {
    for (path, print) in before {
        assert_unchanged(path, print);
    }
}

/// Opens `image` through the probe, checks it is VMDK, compares every byte
/// with qemu's conversion and the allocation with qemu's map.
fn check_matches_qemu(image: &Path, dir: &Path, options: &OpenOptions) -> Box<dyn Disk> {
    let expected = qemu_raw_bytes(image, dir);
    let before = fingerprints(dir);
    let mut disk = open_path(image, options).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vmdk);
    assert_eq!(disk.byte_size(), expected.len() as u64);
    support::compare_bytes(disk.as_mut(), &expected);
    support::compare_allocation(disk.as_mut(), image);
    assert_all_unchanged(&before);
    disk
}

#[test]
fn monolithic_sparse_with_odd_size_matches_qemu() {
    let dir = temp_dir();
    // Not a multiple of the 64 KiB grain.
    let size = 5 * MIB + 1536;
    let image = create(dir.path(), "ms.vmdk", &[], &size.to_string());
    fill_varied(&image, size);
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert!(!disk.is_snapshot());
    assert_eq!(disk.uuid(), None, "qemu writes no ddb.uuid.image");
}

#[test]
fn sequential_grains_map_as_one_run() {
    use cowdisk::formats::mapped::{MappedImage, Mapping};
    let dir = temp_dir();
    let image = create(dir.path(), "seq.vmdk", &[], "4M");
    io(&image, &["write -P 0x09 0 2M"]);
    let disk = VmdkDisk::open(&image, &OpenOptions::default()).unwrap();
    let (mapping, run) = disk.map(0, 2048).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }), "{mapping:?}");
    assert_eq!(run, 2048, "1 MiB of contiguous grains should be one run");
    let (mapping, run) = disk.map(4096, 4096).unwrap();
    assert_eq!(mapping, Mapping::Unallocated);
    assert_eq!(run, 4096);
}

#[test]
fn zeroed_grain_entries_are_blank() {
    let dir = temp_dir();
    let image = create(dir.path(), "zg.vmdk", &["-o", "zeroed_grain=on"], "2M");
    io(
        &image,
        &[
            "write -P 0x61 0 1M",
            "write -z 65536 65536",
            "write -z 1M 131072",
        ],
    );
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert_eq!(disk.block_status(128, 128).unwrap(), SectorStatus::Blank);
    assert_eq!(disk.block_status(2048, 256).unwrap(), SectorStatus::Blank);
    assert_eq!(
        disk.block_status(2304, 128).unwrap(),
        SectorStatus::NotAlloc
    );
}

#[test]
fn monolithic_flat_matches_qemu() {
    let dir = temp_dir();
    let size = 5 * MIB + 512;
    let image = create(
        dir.path(),
        "mf.vmdk",
        &["-o", "subformat=monolithicFlat"],
        &size.to_string(),
    );
    fill_varied(&image, size);
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert_eq!(
        disk.block_status(0, disk.sector_count()).unwrap(),
        SectorStatus::Normal
    );
}

#[test]
fn stream_optimized_matches_qemu() {
    let dir = temp_dir();
    let image = stream_optimized(dir.path(), "so.vmdk");
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert_eq!(disk.sector_count(), (3 * MIB + 4608) / 512);
}

fn stream_optimized(dir: &Path, name: &str) -> PathBuf {
    let raw = path_in(dir, &format!("{name}.src"));
    let size = 3 * MIB + 4608;
    let mut bytes = vec![0u8; size as usize];
    bytes[0..700_000].fill(0x71);
    bytes[800_000..1_000_000].copy_from_slice(&pattern(200_000, 4));
    bytes[size as usize - 512..].fill(0x72);
    std::fs::write(&raw, &bytes).unwrap();
    let image = path_in(dir, name);
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &raw.display().to_string(),
        &image.display().to_string(),
    ]);
    std::fs::remove_file(&raw).unwrap();
    image
}

/// VMware writes stream-optimized files with the grain directory located
/// by a footer; qemu writes it in the header. Rewrite qemu's file into the
/// footer layout and check both readers still agree.
#[test]
fn stream_optimized_with_footer_matches_qemu() {
    let dir = temp_dir();
    let image = stream_optimized(dir.path(), "sf.vmdk");
    let mut bytes = std::fs::read(&image).unwrap();
    let header: Vec<u8> = bytes[..512].to_vec();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    // Footer marker (one sector of metadata, type 3), footer, end-of-stream.
    let mut marker = vec![0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&marker);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&image, &bytes).unwrap();
    check_matches_qemu(&image, dir.path(), &OpenOptions::default());
}

/// A hand-written descriptor joining sparse, flat (with an offset) and
/// stream-optimized extents; qemu reads the same descriptor as the oracle.
#[test]
fn multi_extent_descriptor_matches_qemu() {
    let dir = temp_dir();
    extent_files(dir.path());
    let c = create(dir.path(), "c.vmdk", &[], "2M");
    io(&c, &["write -P 0x0c 0 512", "write -P 0x0d 1000000 5000"]);
    stream_optimized(dir.path(), "d.vmdk");
    let descriptor = path_in(dir.path(), "multi.vmdk");
    std::fs::write(
        &descriptor,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
         RW 2048 SPARSE \"a.vmdk\"\n\
         RW 2048 FLAT \"b.bin\" 8\n\
         RW 4096 SPARSE \"c.vmdk\"\n\
         RW 6153 SPARSE \"d.vmdk\"\n\n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.uuid.image = \"0b7e1f4c-2d3a-4e5f-8a9b-0c1d2e3f4a5b\"\n",
    )
    .unwrap();
    let disk = check_matches_qemu(&descriptor, dir.path(), &OpenOptions::default());
    assert_eq!(disk.sector_count(), 2048 + 2048 + 4096 + 6153);
    assert_eq!(
        disk.uuid(),
        Some([
            0x0b, 0x7e, 0x1f, 0x4c, 0x2d, 0x3a, 0x4e, 0x5f, 0x8a, 0x9b, 0x0c, 0x1d, 0x2e, 0x3f,
            0x4a, 0x5b
        ])
    );
}

/// A sparse extent with data and a flat file whose extent starts 8 sectors
/// in.
fn extent_files(dir: &Path) -> (PathBuf, PathBuf) {
    let a = create(dir, "a.vmdk", &[], "1M");
    io(&a, &["write -P 0x0a 100000 300000"]);
    let flat = path_in(dir, "b.bin");
    let mut flat_bytes = vec![0xEEu8; 4096];
    flat_bytes.extend_from_slice(&pattern(MIB as usize, 7));
    std::fs::write(&flat, &flat_bytes).unwrap();
    (a, flat)
}

/// ZERO extents and RDONLY lines, which qemu's descriptor parser skips, so
/// the expected bytes are assembled from qemu's reading of each extent.
#[test]
fn zero_and_read_only_extents() {
    let dir = temp_dir();
    let (a, flat) = extent_files(dir.path());
    let mut expected = qemu_raw_bytes(&a, dir.path());
    expected.extend_from_slice(&vec![0u8; 1024 * 512]);
    expected.extend_from_slice(&std::fs::read(&flat).unwrap()[4096..]);
    let descriptor = path_in(dir.path(), "zero.vmdk");
    std::fs::write(
        &descriptor,
        "# Disk DescriptorFile\nversion=1\ncreateType=\"custom\"\n\
         RDONLY 2048 SPARSE \"a.vmdk\"\n\
         RW 1024 ZERO\n\
         RDONLY 2048 FLAT \"b.bin\" 8\n",
    )
    .unwrap();
    let before = fingerprints(dir.path());
    let mut disk = open_path(&descriptor, &OpenOptions::default()).unwrap();
    support::compare_bytes(disk.as_mut(), &expected);
    assert_eq!(disk.block_status(2048, 1024).unwrap(), SectorStatus::Blank);
    assert_eq!(disk.block_status(0, 100).unwrap(), SectorStatus::NotAlloc);
    assert_eq!(disk.block_status(3072, 2048).unwrap(), SectorStatus::Normal);
    assert_eq!(disk.uuid(), None);
    drop(disk);
    assert_all_unchanged(&before);
}

#[test]
fn extent_paths_outside_the_folder_need_the_flag() {
    let dir = temp_dir();
    let inner = path_in(dir.path(), "inner");
    std::fs::create_dir(&inner).unwrap();
    let outside = path_in(dir.path(), "outside.bin");
    std::fs::write(&outside, pattern(MIB as usize, 3)).unwrap();
    let descriptor = path_in(&inner, "d.vmdk");
    std::fs::write(
        &descriptor,
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n\
         RW 2048 FLAT \"../outside.bin\" 0\n",
    )
    .unwrap();
    let err = support::open_error(&descriptor, &OpenOptions::default());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("../outside.bin"), "{err}");
    let disk = open_path(&descriptor, &support::follow()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    disk.read_sectors(0, &mut buf).unwrap();
    assert_eq!(buf, std::fs::read(&outside).unwrap());
}

/// A qemu-made split sparse image over 2 GiB: compare windows around the
/// extent boundary and the writes (converting and holding the whole disk
/// would be slow). A qemu-made split flat image would need its 2 GiB
/// extent fingerprinted in memory, so the flat variant is tested on a
/// descriptor in the same layout with small extents, below.
#[test]
fn two_gb_split_sparse_matches_qemu_in_windows() {
    const GIB: u64 = 1 << 30;
    {
        let subformat = "twoGbMaxExtentSparse";
        let dir = temp_dir();
        // Two extents: 2 GiB and a small remainder.
        let size: u64 = 2 * GIB + 3 * MIB + 512;
        let image = create(
            dir.path(),
            "split.vmdk",
            &["-o", &format!("subformat={subformat}")],
            &size.to_string(),
        );
        let boundary: u64 = 2 * GIB;
        let last = size - 512;
        io(
            &image,
            &[
                "write -P 0x31 0 4096",
                &format!("write -P 0x32 {} 200000", boundary - 100_000),
                &format!("write -P 0x33 {} 70000", GIB - 12345),
                &format!("write -P 0x34 {last} 512"),
            ],
        );
        let descriptor = std::fs::read_to_string(&image).unwrap();
        assert_eq!(descriptor.matches(" \"split-").count(), 2, "{descriptor}");
        let raw = path_in(dir.path(), "split.expected.raw");
        qemu_img(&[
            "convert",
            "-q",
            "-O",
            "raw",
            &image.display().to_string(),
            &raw.display().to_string(),
        ]);
        let oracle = File::open(&raw).unwrap();
        let before = fingerprints(dir.path());
        let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
        assert_eq!(disk.drive_type(), DriveType::Vmdk);
        assert_eq!(disk.byte_size(), size);
        let windows = [0, GIB - 16384, boundary - 200_000, size - 2 * MIB];
        for start in windows {
            let start = start / 512 * 512;
            let len = (2 * MIB).min(size - start) as usize;
            let mut want = vec![0u8; len];
            oracle.read_exact_at(&mut want, start).unwrap();
            let mut got = vec![0u8; len];
            disk.read_sectors(start / 512, &mut got).unwrap();
            assert!(
                got == want,
                "{subformat}: bytes differ in the window at {start}"
            );
        }
        support::compare_allocation(disk.as_mut(), &image);
        drop(disk);
        std::fs::remove_file(&raw).unwrap();
        assert_all_unchanged(&before);
    }
}

/// twoGbMaxExtentFlat layout (several raw extents listed in a descriptor),
/// written through qemu-io and compared whole.
#[test]
fn split_flat_layout_matches_qemu() {
    let dir = temp_dir();
    let sizes = [2 * MIB, 2 * MIB, MIB + 512];
    let mut text = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n",
    );
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("sf-f{:03}.vmdk", i + 1);
        std::fs::write(path_in(dir.path(), &name), vec![0u8; *size as usize]).unwrap();
        text.push_str(&format!("RW {} FLAT \"{name}\" 0\n", size / 512));
    }
    text.push_str("\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n");
    let image = path_in(dir.path(), "sf.vmdk");
    std::fs::write(&image, text).unwrap();
    let total: u64 = sizes.iter().sum();
    fill_varied(&image, total);
    io(&image, &["write -P 0x66 2096000 8000"]);
    let disk = check_matches_qemu(&image, dir.path(), &OpenOptions::default());
    assert_eq!(disk.byte_size(), total);
    assert_eq!(
        disk.block_status(0, disk.sector_count()).unwrap(),
        SectorStatus::Normal
    );
}

#[test]
fn parent_needs_the_flag_and_then_matches_qemu() {
    let dir = temp_dir();
    let base = create(dir.path(), "base.vmdk", &[], "4M");
    io(&base, &["write -P 0x10 0 4M"]);
    let child = create(
        dir.path(),
        "child.vmdk",
        &["-b", "base.vmdk", "-F", "vmdk"],
        "",
    );
    io(
        &child,
        &["write -P 0x20 100000 5000", "write -P 0x21 3000000 70000"],
    );
    let before = fingerprints(dir.path());
    let err = support::open_error(&child, &OpenOptions::default());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("base.vmdk"), "{err}");
    assert_all_unchanged(&before);

    let disk = check_matches_qemu(&child, dir.path(), &support::follow());
    assert!(disk.is_snapshot());
    drop(disk);

    let parent = open_path(&base, &OpenOptions::default()).unwrap();
    let mut supplied = VmdkDisk::open_with_parent(&child, &OpenOptions::default(), parent).unwrap();
    assert_eq!(supplied.parent_file_name_hint(), Some("base.vmdk"));
    let expected = qemu_raw_bytes(&child, dir.path());
    support::compare_bytes(&mut supplied, &expected);
    assert_all_unchanged(&before);
}

#[test]
fn sparse_image_over_two_tib() {
    let dir = temp_dir();
    let size: u64 = (2 << 40) + (64 << 30);
    let image = create(dir.path(), "huge.vmdk", &[], &size.to_string());
    let spots = [0u64, 1 << 40, (2 << 40) + 12345 * 512, size - 4096];
    let cmds: Vec<String> = spots
        .iter()
        .enumerate()
        .map(|(i, off)| format!("write -P {} {off} 4096", 0x40 + i))
        .collect();
    qemu_io(&image, "vmdk", &cmds);
    let before = fingerprint(&image);
    let started = Instant::now();
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.byte_size(), size);
    for (i, off) in spots.iter().enumerate() {
        let from = (off / 512).saturating_sub(8).min(disk.sector_count() - 24);
        let mut buf = vec![0u8; 24 * 512];
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
    assert_eq!(
        disk.block_status(0, disk.sector_count()).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(
        disk.block_status(128, (1 << 40) / 512 - 128).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(disk);
    assert_unchanged(&image, &before);
}

#[test]
fn cowd_and_unknown_extent_types_are_refused() {
    let dir = temp_dir();
    let cowd = path_in(dir.path(), "cowd.vmdk");
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(b"COWD");
    std::fs::write(&cowd, &bytes).unwrap();
    let err = support::open_error(&cowd, &OpenOptions::default());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );

    let descriptor = path_in(dir.path(), "rdm.vmdk");
    std::fs::write(
        &descriptor,
        "# Disk DescriptorFile\ncreateType=\"vmfsRawDeviceMap\"\nRW 100 VMFSRDM \"x-rdm.vmdk\"\n",
    )
    .unwrap();
    let err = support::open_error(&descriptor, &OpenOptions::default());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("VMFSRDM"), "{err}");
}
