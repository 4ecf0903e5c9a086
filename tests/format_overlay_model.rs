//! An overlay over each source format passes the model-based test: small
//! images made by qemu-img and patterned by qemu-io (with unallocated and
//! zeroed areas), opened through the probe, wrapped in an overlay with a
//! small granularity and edited at random, against the naive model of
//! `support::model`.
//!
//! The model's bytes come from qemu (`qemu-img convert -O raw`), not from
//! our reader; its per-sector statuses are the source reader's own answers
//! (what the overlay must pass through). Every source is checked unchanged
//! afterwards.

mod support;

use std::path::{Path, PathBuf};

use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, Overlay, OverlayOptions, SectorStatus};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::model::{op, run_ops, Model, S};

/// A small image of one format.
struct Image {
    path: PathBuf,
    drive_type: DriveType,
    /// What qemu says the image holds, padded to whole sectors.
    bytes: Vec<u8>,
    /// The source reader's status of every sector.
    status: Vec<SectorStatus>,
}

/// Writes that touch the first and last sectors, unaligned ranges, a zero
/// write and leave gaps never written, on a disk of `size` bytes.
fn pattern_commands(size: u64) -> Vec<String> {
    vec![
        "write -P 0x11 0 512".into(),
        "write -P 0x22 70000 200000".into(),
        "write -P 0x33 1048576 307200".into(),
        "write -z 2097152 131072".into(),
        "write -P 0x44 2300000 5000".into(),
        format!("write -P 0x55 {} 4096", size - 4096),
    ]
}

/// Makes `name` with `qemu-img create -f FORMAT OPTS`, patterns it with
/// qemu-io and takes the model's seed from qemu and from our reader.
fn make(dir: &Path, name: &str, format: &str, opts: &[&str], size: u64) -> Image {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(opts);
    let p = path.display().to_string();
    let size_text = size.to_string();
    args.extend([p.as_str(), size_text.as_str()]);
    support::qemu_img(&args);
    support::qemu_io(&path, format, &pattern_commands(size));
    seed(path)
}

fn seed(path: PathBuf) -> Image {
    let dir = path.parent().unwrap().to_path_buf();
    let mut bytes = support::qemu_raw_bytes(&path, &dir);
    let disk = open_path(&path, &OpenOptions::default()).unwrap();
    let sectors = disk.sector_count();
    assert_eq!(sectors, (bytes.len() as u64).div_ceil(S as u64));
    bytes.resize(sectors as usize * S, 0);
    // Read everything once first: a raw file's holes come from the file
    // system, and ext4 reports a range allocated but never written (what
    // `qemu-io write -z` leaves) as a hole until its pages are in the page
    // cache, then as data (so does `qemu-img map`). The overlay's reads
    // would otherwise change the answers the model was seeded with.
    let mut warm = vec![0u8; bytes.len()];
    disk.read_sectors(0, &mut warm).unwrap();
    assert!(
        warm == bytes,
        "{}: our reader differs from qemu",
        path.display()
    );
    let status: Vec<SectorStatus> = (0..sectors)
        .map(|s| disk.block_status(s, 1).unwrap())
        .collect();
    // The reader's status runs (what the overlay builds its sector-exact
    // map from) agree with its sector-by-sector answers, from every start.
    for start in (0..sectors).step_by(97).chain([sectors.saturating_sub(1)]) {
        let mut lba = start;
        while lba < sectors {
            let (run_status, run) = disk.status_run(lba, sectors - lba).unwrap();
            assert!(run > 0 && lba + run <= sectors, "run of {run} at {lba}");
            let claimed = &status[lba as usize..(lba + run) as usize];
            assert!(
                claimed.iter().all(|&s| s == run_status),
                "{}: status run {run_status:?} x{run} at sector {lba}",
                path.display()
            );
            lba += run;
        }
    }
    Image {
        drive_type: disk.drive_type(),
        path,
        bytes,
        status,
    }
}

/// Runs `cases` random edit sequences over overlays of `image`.
fn check(image: &Image, expected_type: DriveType, cases: u32) {
    assert_eq!(image.drive_type, expected_type, "{}", image.path.display());
    let before = support::fingerprint(&image.path);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (3u32..=6, prop::collection::vec(op(), 1..40));
    let result = runner.run(&strategy, |(g_shift, ops)| {
        let granularity = 1u64 << g_shift;
        let source = open_path(&image.path, &OpenOptions::default()).unwrap();
        let options = OverlayOptions {
            granularity,
            ..OverlayOptions::default()
        };
        let mut overlay = Overlay::new(source, options).unwrap();
        let mut model = Model::new(image.bytes.clone(), image.status.clone(), granularity);
        run_ops(&mut overlay, &mut model, &ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{}: {e}", image.path.display());
    }
    support::assert_unchanged(&image.path, &before);
}

/// The images must have both data and never-written sectors, or the test
/// would not cover what the overlay passes through.
fn assert_mixed(image: &Image) {
    let normal = image.status.contains(&SectorStatus::Normal);
    let other = image.status.iter().any(|s| *s != SectorStatus::Normal);
    assert!(
        normal && other,
        "{}: statuses not mixed",
        image.path.display()
    );
}

const MIB: u64 = 1 << 20;
const CASES: u32 = 64;

#[test]
fn raw() {
    let dir = support::temp_dir();
    let path = dir.path().join("odd.raw");
    // An odd size: the last sector is partial and reads zero-padded.
    let size = 5 * MIB + 1000;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    support::qemu_io(&path, "raw", &pattern_commands(size - 1000));
    let image = seed(path);
    check(&image, DriveType::Raw, CASES);
}

#[test]
fn vdi_dynamic() {
    let dir = support::temp_dir();
    let image = make(dir.path(), "d.vdi", "vdi", &[], 8 * MIB);
    assert_mixed(&image);
    check(&image, DriveType::Vdi, CASES);
}

#[test]
fn parallels() {
    let dir = support::temp_dir();
    let opts = ["-o", "cluster_size=65536"];
    let image = make(dir.path(), "p.hdd", "parallels", &opts, 8 * MIB);
    assert_mixed(&image);
    check(&image, DriveType::Parallels, CASES);
}

#[test]
fn vhd_dynamic() {
    let dir = support::temp_dir();
    let opts = ["-o", "subformat=dynamic,force_size=on"];
    let image = make(dir.path(), "d.vhd", "vpc", &opts, 8 * MIB);
    assert_mixed(&image);
    check(&image, DriveType::Vhd, CASES);
}

#[test]
fn vhdx() {
    let dir = support::temp_dir();
    let opts = ["-o", "block_size=1M"];
    let image = make(dir.path(), "d.vhdx", "vhdx", &opts, 8 * MIB);
    assert_mixed(&image);
    check(&image, DriveType::Vhdx, CASES);
}

#[test]
fn qcow2() {
    let dir = support::temp_dir();
    let opts = ["-o", "cluster_size=16384"];
    let image = make(dir.path(), "d.qcow2", "qcow2", &opts, 8 * MIB + 7 * 512);
    assert_mixed(&image);
    // The zero write made zero clusters: some sectors are Blank.
    assert!(image.status.contains(&SectorStatus::Blank));
    check(&image, DriveType::Qcow2, CASES);
}

#[test]
fn vmdk_monolithic_sparse() {
    let dir = support::temp_dir();
    let opts = ["-o", "subformat=monolithicSparse"];
    let image = make(dir.path(), "d.vmdk", "vmdk", &opts, 8 * MIB + 3 * 512);
    assert_mixed(&image);
    check(&image, DriveType::Vmdk, CASES);
}
