//! `cowdisk info` lists the filesystems, `clone --compact` and `enlarge
//! --compact` leave out their free blocks: judged with mke2fs/debugfs
//! (the free count of dumpe2fs, e2fsck -fn on the result, files dumped
//! back) on an image partitioned by sfdisk.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::pattern;

const MIB: u64 = 1 << 20;

fn sh(script: &str) -> String {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cowdisk(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cowdisk"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cowdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 48 MiB disk: partition 1 (1 MiB..33 MiB) an ext4 holding `keep.bin`
/// after an 8 MiB `gone.bin` was deleted, 15 MiB unpartitioned after it.
/// Returns the disk, the kept bytes, and dumpe2fs's free bytes.
fn make_disk(dir: &Path) -> (PathBuf, Vec<u8>, u64) {
    let files = dir.join("files");
    std::fs::create_dir(&files).unwrap();
    let keep = pattern(2 * MIB as usize + 100, 7);
    std::fs::write(files.join("keep.bin"), &keep).unwrap();
    std::fs::write(files.join("gone.bin"), pattern(8 * MIB as usize, 8)).unwrap();
    let fs = dir.join("fs.img");
    let disk = dir.join("disk.raw");
    sh(&format!(
        "set -e; mke2fs -q -F -t ext4 -b 4096 -d '{f}' '{fs}' 32M; \
         debugfs -w -R 'rm gone.bin' '{fs}' 2>/dev/null; truncate -s 48M '{d}'; \
         printf 'label: dos\\nstart=2048, size=65536, type=83\\n' | sfdisk -q '{d}'; \
         dd if='{fs}' of='{d}' bs=512 seek=2048 conv=notrunc status=none",
        f = files.display(),
        fs = fs.display(),
        d = disk.display()
    ));
    let free_blocks: u64 = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", fs.display()))
        .lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (disk, keep, free_blocks * 4096)
}

#[test]
fn info_lists_each_partitions_filesystem_with_its_free_space() {
    let dir = support::temp_dir();
    let (disk, _, free) = make_disk(dir.path());
    let json: Value =
        serde_json::from_str(&cowdisk(&["info", "--json", disk.to_str().unwrap()])).unwrap();
    let regions = json["filesystems"]["regions"].as_array().unwrap();
    assert_eq!(regions[0]["number"], 1);
    assert_eq!(regions[0]["filesystem"], "ext4");
    assert_eq!(regions[0]["free_bytes"].as_u64().unwrap(), free);
    assert_eq!(regions[1]["filesystem"], "unpartitioned");
    assert_eq!(regions[1]["free_bytes"].as_u64().unwrap(), 15 * MIB);
    let text = cowdisk(&["info", disk.to_str().unwrap()]);
    assert!(
        text.contains("partition 1") && text.contains("ext4"),
        "{text}"
    );
}

/// The ext4 of partition 1 of `image` passes e2fsck and gives keep.bin.
fn check_ext(dir: &Path, image: &Path, start: u64, keep: &[u8]) {
    let part = dir.join("part.img");
    let back = dir.join("back.bin");
    sh(&format!(
        "set -e; dd if='{i}' of='{p}' bs=512 skip={start} count=65536 status=none; \
         e2fsck -fn '{p}' >/dev/null; debugfs -R 'dump /keep.bin {b}' '{p}' 2>/dev/null",
        i = image.display(),
        p = part.display(),
        b = back.display()
    ));
    assert!(std::fs::read(&back).unwrap() == keep, "keep.bin differs");
}

#[test]
fn clone_compact_leaves_out_free_blocks_and_says_how_much() {
    let dir = support::temp_dir();
    let (disk, keep, _) = make_disk(dir.path());
    let plain = dir.path().join("plain.raw");
    let compact = dir.path().join("compact.raw");
    cowdisk(&["clone", disk.to_str().unwrap(), plain.to_str().unwrap()]);
    let out = cowdisk(&[
        "clone",
        "--compact",
        disk.to_str().unwrap(),
        compact.to_str().unwrap(),
    ]);
    assert!(out.contains("left out of the clone"), "{out}");
    assert!(out.contains("verified"), "{out}");
    check_ext(dir.path(), &compact, 2048, &keep);
    let size = |p: &Path| cowdisk::clone::allocated_bytes(p).unwrap();
    assert!(
        size(&compact) + 7 * MIB <= size(&plain),
        "compact {} vs plain {}",
        size(&compact),
        size(&plain)
    );
}

#[test]
fn enlarge_compact_grows_and_leaves_out_free_blocks() {
    let dir = support::temp_dir();
    let (disk, keep, _) = make_disk(dir.path());
    let plain = dir.path().join("plain.raw");
    let compact = dir.path().join("big.raw");
    let args = |dest: &Path, extra: &[&'static str]| {
        let mut v: Vec<String> = vec!["enlarge".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(["--size".into(), "64M".into()]);
        v.push(disk.display().to_string());
        v.push(dest.display().to_string());
        v
    };
    let plain_args = args(&plain, &[]);
    cowdisk(&plain_args.iter().map(String::as_str).collect::<Vec<_>>());
    let compact_args = args(&compact, &["--compact"]);
    let out = cowdisk(&compact_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("left out of the clone"), "{out}");
    check_ext(dir.path(), &compact, 2048, &keep);
    let size = |p: &Path| cowdisk::clone::allocated_bytes(p).unwrap();
    assert!(
        size(&compact) + 7 * MIB <= size(&plain),
        "compact {} vs plain {}",
        size(&compact),
        size(&plain)
    );
}
