//! VDI reader tests. Base images are made by qemu-img/qemu-io and compared
//! with qemu's own reading of them; differencing images (which qemu cannot
//! make) are built here from the format's documented layout and compared
//! with bytes worked out independently.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cowdisk::formats::mapped::{MappedImage, Mapping};
use cowdisk::formats::vdi::VdiDisk;
use cowdisk::formats::{self, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};
use proptest::prelude::*;
use support::vdi::{build_differencing_vdi, overlay, stored_guid_text, uuid_text, ChildBlock};

const MIB: u64 = 1 << 20;

fn follow() -> OpenOptions {
    OpenOptions {
        follow_parent_paths: true,
    }
}

/// `qemu-img create -f vdi [-o OPTS] PATH SIZE`, then qemu-io writes.
fn make_vdi(dir: &Path, name: &str, size: u64, opts: &[&str], cmds: &[String]) -> PathBuf {
    let path = support::path_in(dir, name);
    let mut args = vec!["create", "-q", "-f", "vdi"];
    args.extend_from_slice(opts);
    let path_text = path.display().to_string();
    let size_text = size.to_string();
    args.push(&path_text);
    args.push(&size_text);
    support::qemu_img(&args);
    if !cmds.is_empty() {
        support::qemu_io(&path, "vdi", cmds);
    }
    path
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

/// Opens `path` through the probe, checks it is a VDI, and compares every
/// byte (in several read sizes) and the allocation with qemu's view.
fn check_against_qemu(path: &Path, dir: &Path) {
    let before = support::fingerprint(path);
    let expected = support::qemu_raw_bytes(path, dir);
    let mut disk = formats::open_path(path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vdi);
    assert_eq!(disk.byte_size(), expected.len() as u64);
    assert_eq!(disk.sector_count(), (expected.len() as u64).div_ceil(512));
    for chunk in [MIB as usize, 3 * 512, 64 * 1024 + 512] {
        let got = read_all(disk.as_mut(), chunk);
        assert!(got == expected, "bytes differ from qemu (chunk {chunk})");
    }
    check_map(disk.as_mut(), path);
    drop(disk);
    support::assert_unchanged(path, &before);
}

/// qemu's `data: true` ranges are Normal for us, and its other ranges are
/// not (qemu and VDI both answer per 1 MiB block).
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

fn write(byte: u8, offset: u64, len: u64) -> String {
    format!("write -P {byte:#x} {offset} {len}")
}

#[test]
fn dynamic_image_matches_qemu() {
    let dir = support::temp_dir();
    // Not a whole number of 1 MiB blocks: 7 MiB and 3 sectors.
    let size = 7 * MIB + 3 * 512;
    let cmds = vec![
        write(0x11, 0, 512),                // first sector
        write(0x22, 1000, 3000),            // unaligned, inside block 0
        write(0x33, MIB - 700, 2000),       // straddles blocks 0 and 1
        write(0x44, 5 * MIB + 12345, 4321), // block 5 allocated before 2..4
        write(0x55, 2 * MIB, 2 * MIB),      // blocks 2 and 3, in order
        write(0x66, size - 512, 512),       // last (partial-block) sector
        "write -z 8192 4096".to_string(),
        "discard 3145728 1048576".to_string(),
    ];
    let path = make_vdi(dir.path(), "dyn.vdi", size, &[], &cmds);
    check_against_qemu(&path, dir.path());

    // Blocks 2 and 3 were allocated one after the other, so one map run
    // (one pread) covers both; block 4 is a separate unallocated run.
    let before = support::fingerprint(&path);
    let vdi = VdiDisk::open(&path, &OpenOptions::default()).unwrap();
    let (mapping, run) = vdi.map(2 * 2048, 3 * 2048).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }), "{mapping:?}");
    assert_eq!(run, 2 * 2048);
    assert_eq!(
        vdi.map(4 * 2048, 2048).unwrap(),
        (Mapping::Unallocated, 2048)
    );
    assert_eq!(
        vdi.block_status(4 * 2048, 2048).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(!vdi.is_snapshot());
    assert_eq!(vdi.parent_uuid(), None);
    // The image UUID is the header's, with the GUID fields byte-swapped.
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(
        uuid_text(&vdi.uuid().unwrap()),
        stored_guid_text(&raw[0x188..0x198])
    );
    drop(vdi);
    support::assert_unchanged(&path, &before);
}

#[test]
fn fixed_image_matches_qemu() {
    let dir = support::temp_dir();
    let size = 3 * MIB + 512 * 9;
    let cmds = vec![
        write(0x77, 4096 + 17, 10_000),
        write(0x88, 2 * MIB - 512, 1024),
        write(0x99, size - 1024, 1024),
    ];
    let path = make_vdi(dir.path(), "fixed.vdi", size, &["-o", "static=on"], &cmds);
    check_against_qemu(&path, dir.path());
    let before = support::fingerprint(&path);
    let disk = formats::open_path(&path, &OpenOptions::default()).unwrap();
    // Every block of a fixed image is stored: all of it is data.
    let sectors = disk.sector_count();
    assert_eq!(disk.block_status(0, sectors).unwrap(), SectorStatus::Normal);
    // The stored blocks are consecutive, so the whole disk is one run.
    drop(disk);
    let vdi = VdiDisk::open(&path, &OpenOptions::default()).unwrap();
    let (mapping, run) = vdi.map(0, sectors).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }));
    assert_eq!(run, sectors);
    drop(vdi);
    support::assert_unchanged(&path, &before);
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
    let path = make_vdi(dir.path(), "big.vdi", size, &[], &cmds);
    let before = support::fingerprint(&path);
    let disk = formats::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vdi);
    assert_eq!(disk.sector_count(), size / 512);

    let check_region = |start: u64, len: usize, written: &[(u64, u64, u8)]| {
        let mut buf = vec![0xEEu8; len];
        disk.read_sectors(start / 512, &mut buf).unwrap();
        for (i, byte) in buf.iter().enumerate() {
            let at = start + i as u64;
            let want = written
                .iter()
                .find(|(off, n, _)| (*off..off + n).contains(&at))
                .map_or(0, |w| w.2);
            assert_eq!(*byte, want, "byte {at}");
        }
    };
    let writes = [
        (0, 4096, 0x5a),
        (far, 70_000, 0xa5),
        (size - 512, 512, 0x3c),
    ];
    check_region(0, 8192, &writes);
    check_region(far - 12_345 - MIB, 3 * MIB as usize, &writes);
    check_region(size - MIB, MIB as usize, &writes);
    check_region(1 << 40, 64 * 1024, &writes);

    assert_eq!(
        disk.block_status((1 << 40) / 512, (1 << 30) / 512).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(
        disk.block_status(far / 512, 1).unwrap(),
        SectorStatus::Normal
    );
    // Metadata-only status of the whole disk is quick even at 3 TiB.
    assert_eq!(
        disk.block_status(0, size / 512).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(
        disk.block_status(8, size / 512 - 8 - 1).unwrap(),
        SectorStatus::Normal
    );
    drop(disk);
    check_map_sampled(&path);
    support::assert_unchanged(&path, &before);
}

/// `check_map` without reading: for the big image, only the map.
fn check_map_sampled(path: &Path) {
    let mut disk = formats::open_path(path, &OpenOptions::default()).unwrap();
    check_map(disk.as_mut(), path);
}

// ---------------------------------------------------------------------------
// Differencing images, built from the format facts (`support::vdi`).

struct Chain {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    parent: PathBuf,
    child: PathBuf,
    parent_bytes: Vec<u8>,
    blocks: Vec<ChildBlock>,
    parent_uuid_text: String,
}

/// A qemu-made parent (5 MiB and 5 sectors, blocks 0, 1 and 5 written)
/// and a hand-built child over it.
fn make_chain() -> Chain {
    let dir = support::temp_dir();
    let size = 5 * MIB + 5 * 512;
    let parent = make_vdi(
        dir.path(),
        "base.vdi",
        size,
        &[],
        &[
            write(0x10, 100, 5000),
            write(0x20, MIB + 512, MIB - 1024),
            write(0x30, size - 2000, 2000), // inside the last, partial block
        ],
    );
    let parent_bytes = support::qemu_raw_bytes(&parent, dir.path());
    let parent_raw = std::fs::read(&parent).unwrap();
    let blocks = vec![
        ChildBlock::Zero,                         // zero over parent data
        ChildBlock::Stored { index: 2, seed: 7 }, // replaces parent data
        ChildBlock::Stored { index: 0, seed: 8 }, // not after index 2 in the file
        ChildBlock::Stored { index: 1, seed: 9 }, // right after index 0
        ChildBlock::Free,                         // nothing here or in the parent
        ChildBlock::Free,                         // partial last block: parent data
    ];
    let child = dir.path().join("child.vdi");
    build_differencing_vdi(&child, size, [0xC1; 16], &parent_raw[0x188..0x198], &blocks);
    Chain {
        dir: dir.path().to_path_buf(),
        parent_uuid_text: stored_guid_text(&parent_raw[0x188..0x198]),
        _dir: dir,
        parent,
        child,
        parent_bytes,
        blocks,
    }
}

#[test]
fn differencing_image_needs_follow_flag_and_names_parent_uuid() {
    let chain = make_chain();
    let before = support::fingerprint(&chain.child);
    let err = match formats::open_path(&chain.child, &OpenOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("opened a differencing image without its parent"),
    };
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    let text = err.to_string();
    assert!(text.contains(&chain.parent_uuid_text), "{text}");
    assert!(text.contains("follow-parent-paths"), "{text}");
    support::assert_unchanged(&chain.child, &before);
}

#[test]
fn differencing_image_reads_parent_under_child_blocks() {
    let chain = make_chain();
    let child_before = support::fingerprint(&chain.child);
    let parent_before = support::fingerprint(&chain.parent);
    let expected = overlay(&chain.parent_bytes, &chain.blocks);

    let mut disk = formats::open_path(&chain.child, &follow()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vdi);
    assert!(disk.is_snapshot());
    assert_eq!(disk.uuid(), Some([0xC1; 16]));
    for chunk in [MIB as usize, 512 * 7, 5 * MIB as usize + 5 * 512] {
        assert!(read_all(disk.as_mut(), chunk) == expected, "chunk {chunk}");
    }
    // Status per block: the parent's where the child is free, the child's
    // own otherwise.
    let per_block = 2048;
    let status = |d: &mut Box<dyn Disk>, b: u64| {
        let count = per_block.min(d.sector_count() - b * per_block);
        d.block_status(b * per_block, count).unwrap()
    };
    assert_eq!(status(&mut disk, 0), SectorStatus::Blank);
    assert_eq!(status(&mut disk, 1), SectorStatus::Normal);
    assert_eq!(status(&mut disk, 2), SectorStatus::Normal);
    assert_eq!(status(&mut disk, 3), SectorStatus::Normal);
    assert_eq!(status(&mut disk, 4), SectorStatus::NotAlloc);
    assert_eq!(status(&mut disk, 5), SectorStatus::Normal); // the parent's data
    let mut zeros = vec![0xEEu8; 2048 * 512];
    assert_eq!(
        disk.read_sectors(4 * per_block, &mut zeros).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(zeros.iter().all(|&b| b == 0));
    drop(disk);
    support::assert_unchanged(&chain.child, &child_before);
    support::assert_unchanged(&chain.parent, &parent_before);
}

#[test]
fn differencing_image_with_caller_supplied_parent() {
    let chain = make_chain();
    let child_before = support::fingerprint(&chain.child);
    let parent_before = support::fingerprint(&chain.parent);
    let expected = overlay(&chain.parent_bytes, &chain.blocks);

    let parent = formats::open_path(&chain.parent, &OpenOptions::default()).unwrap();
    let mut disk = VdiDisk::open_with_parent(&chain.child, parent).unwrap();
    assert!(read_all(&mut disk, MIB as usize) == expected);
    assert_eq!(
        uuid_text(&disk.parent_uuid().unwrap()),
        chain.parent_uuid_text
    );
    drop(disk);

    // A different disk as parent is refused with a clear mismatch.
    let other = make_vdi(&chain.dir, "other.vdi", 5 * MIB + 5 * 512, &[], &[]);
    let other_before = support::fingerprint(&other);
    let wrong = formats::open_path(&other, &OpenOptions::default()).unwrap();
    let err = VdiDisk::open_with_parent(&chain.child, wrong).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
    assert!(err.to_string().contains(&chain.parent_uuid_text), "{err}");

    // A disk without a UUID is refused too.
    let raw = cowdisk::MemDisk::new(vec![0; 1024], vec![SectorStatus::Normal; 2]).unwrap();
    let err = VdiDisk::open_with_parent(&chain.child, Box::new(raw)).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );

    // A base image takes no parent.
    let parent = formats::open_path(&other, &OpenOptions::default()).unwrap();
    assert!(VdiDisk::open_with_parent(&chain.parent, parent).is_err());

    support::assert_unchanged(&other, &other_before);
    support::assert_unchanged(&chain.child, &child_before);
    support::assert_unchanged(&chain.parent, &parent_before);
}

#[test]
fn differencing_image_with_missing_parent_names_the_uuid() {
    let chain = make_chain();
    let lonely = support::temp_dir();
    let child = lonely.path().join("child.vdi");
    std::fs::copy(&chain.child, &child).unwrap();
    let before = support::fingerprint(&child);
    let err = match formats::open_path(&child, &follow()) {
        Err(e) => e,
        Ok(_) => panic!("opened a differencing image whose parent is missing"),
    };
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains(&chain.parent_uuid_text), "{err}");
    support::assert_unchanged(&child, &before);
}

#[test]
fn two_level_chain_and_loops() {
    let chain = make_chain();
    let size = 5 * MIB + 5 * 512;
    // A grandchild over the child: the child's stored image UUID is
    // [0xC1; 16].
    let blocks = vec![
        ChildBlock::Stored { index: 0, seed: 21 },
        ChildBlock::Free,
        ChildBlock::Free,
        ChildBlock::Zero,
        ChildBlock::Free,
        ChildBlock::Stored { index: 1, seed: 22 },
    ];
    let grandchild = chain.dir.join("grandchild.vdi");
    build_differencing_vdi(&grandchild, size, [0xD2; 16], &[0xC1; 16], &blocks);
    let before = support::fingerprint(&grandchild);
    let expected = overlay(&overlay(&chain.parent_bytes, &chain.blocks), &blocks);
    let mut disk = formats::open_path(&grandchild, &follow()).unwrap();
    assert!(read_all(disk.as_mut(), MIB as usize) == expected);
    drop(disk);
    support::assert_unchanged(&grandchild, &before);

    // Two images that name each other as parent: the depth cap ends it.
    let loop_dir = support::temp_dir();
    let a = loop_dir.path().join("a.vdi");
    let b = loop_dir.path().join("b.vdi");
    build_differencing_vdi(&a, MIB, [0xAA; 16], &[0xBB; 16], &[ChildBlock::Free]);
    build_differencing_vdi(&b, MIB, [0xBB; 16], &[0xAA; 16], &[ChildBlock::Free]);
    let a_before = support::fingerprint(&a);
    let started = Instant::now();
    let err = match formats::open_path(&a, &follow()) {
        Err(e) => e,
        Ok(_) => panic!("opened a parent loop"),
    };
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 10);
    // An image naming itself is not its own parent.
    let own = loop_dir.path().join("self.vdi");
    build_differencing_vdi(&own, MIB, [0xCC; 16], &[0xCC; 16], &[ChildBlock::Free]);
    assert!(formats::open_path(&own, &follow()).is_err());
    support::assert_unchanged(&a, &a_before);
}

// ---------------------------------------------------------------------------
// Bad input.

/// A small qemu-made image with two stored blocks for the damage tests.
fn small_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = make_vdi(
        dir,
        "small.vdi",
        3 * MIB,
        &[],
        &[write(0x61, 2 * MIB + 5, 100), write(0x62, 0, 512)],
    );
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// Applies `damage` to bytes `at..at+len` of the file at `path` (a copy of
/// `original`), runs the open-and-read check, and restores the file.
fn with_damage(path: &Path, original: &[u8], at: usize, damaged: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(damaged, at as u64).unwrap();
    support::fuzz::open_and_exercise(path);
    file.write_all_at(&original[at..at + damaged.len()], at as u64)
        .unwrap();
}

#[test]
fn damaged_headers_and_block_maps_never_panic() {
    let dir = support::temp_dir();
    let (path, original) = small_image(dir.path());
    let started = Instant::now();
    // Every bit of the header and block map, flipped one at a time.
    for at in 0x40..0x210 {
        for bit in 0..8 {
            let damaged = [original[at] ^ (1 << bit)];
            with_damage(&path, &original, at, &damaged);
        }
    }
    // Block map entries set to the interesting values.
    for at in (0x200..0x20C).step_by(4) {
        for value in [
            0u32,
            1,
            2,
            3,
            0x7FFF_FFFF,
            0xFFFF_FFFD,
            0xFFFF_FFFE,
            0xFFFF_FFFF,
        ] {
            with_damage(&path, &original, at, &value.to_le_bytes());
        }
    }
    // Truncations, including inside the header, map and data.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for len in [
        0,
        1,
        0x40,
        0x47,
        0x100,
        0x1C7,
        0x1C8,
        0x200,
        0x203,
        0x400,
        0x401,
        0x10000,
        original.len() - 1,
    ] {
        file.set_len(len as u64).unwrap();
        support::fuzz::open_and_exercise(&path);
    }
    drop(file);
    std::fs::write(&path, &original).unwrap();
    // The loop opened each damaged copy read-only: the restored file is
    // byte for byte the qemu-made image.
    assert_eq!(std::fs::read(&path).unwrap(), original);
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random bytes over random spans of the header and block map, and a
    /// random truncation: Ok or Err, never a panic.
    #[test]
    fn random_header_and_map_damage_never_panics(
        spans in proptest::collection::vec((0x40usize..0x20C, proptest::collection::vec(any::<u8>(), 1..16)), 1..6),
        truncate_to in proptest::option::of(0usize..0x2000),
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
        let damaged = dir.path().join("damaged.vdi");
        std::fs::write(&damaged, &bytes).unwrap();
        let damaged_before = support::fingerprint(&damaged);
        support::fuzz::open_and_exercise(&damaged);
        support::assert_unchanged(&damaged, &damaged_before);
        support::assert_unchanged(&path, &before);
    }
}

#[test]
fn probe_rejects_other_files() {
    let dir = support::temp_dir();
    let path = dir.path().join("not.vdi");
    std::fs::write(&path, vec![0x7Fu8; 4096]).unwrap();
    let file = File::open(&path).unwrap();
    assert!(!cowdisk::formats::vdi::probe(&file));
    let disk = formats::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Raw);
}
