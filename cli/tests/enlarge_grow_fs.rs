//! `cowdisk enlarge` grows the filesystem in the grown partition by
//! default and says so; `--no-grow-fs` leaves it at its old size; a
//! filesystem it cannot grow (a dirty ext4) gets a warning and the
//! partition still grows. Judged by the real tools on the written clone:
//! `sfdisk --json` for the partition, `fsck.fat -n -v` / `ntfsinfo -m` /
//! `ntfsfix -n` / `dumpe2fs -h` and `e2fsck -fn` for the filesystem,
//! mtools / ntfscat / debugfs for the files.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{pattern, sh_ok};

const MIB: u64 = 1 << 20;

fn cowdisk(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cowdisk"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "cowdisk {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

/// A disk: partition 1 (`mib` MiB at 1 MiB) made by `mkfs` (a shell
/// command given the image path as $1) and populated by `fill` ($1 the
/// image, $2 the host file), partition 2 (8 MiB) after it.
fn disk(dir: &Path, mib: u64, mkfs: &str, fill: &str) -> PathBuf {
    let disk = dir.join("disk.raw");
    let part = dir.join("p1.img");
    let file = dir.join("file.bin");
    fs::write(&file, pattern(1536 * 1024 + 5, 7)).unwrap();
    sh_ok(&format!(
        "set -e; truncate -s {disk_mib}M '{d}'; \
         printf 'label: dos\\nstart=2048, size={size}, type=c\\nstart={p2}, size=16384, type=83\\n' \
         | sfdisk --quiet '{d}'; truncate -s {mib}M '{p}'; set -- '{p}' '{f}'; {mkfs}; {fill}; \
         dd if='{p}' of='{d}' bs=512 seek=2048 conv=notrunc status=none",
        disk_mib = mib + 10,
        size = mib * 2048,
        p2 = 2048 + mib * 2048,
        d = disk.display(),
        p = part.display(),
        f = file.display()
    ));
    disk
}

/// Partition 1 of `image` (start, size) as sfdisk reads it, extracted.
fn partition_1(dir: &Path, image: &Path) -> (PathBuf, u64) {
    let json = sh_ok(&format!("sfdisk --json '{}'", image.display()));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let p = &v["partitiontable"]["partitions"][0];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let out = dir.join("grown-p1.img");
    sh_ok(&format!(
        "dd if='{}' of='{}' bs=512 skip={start} count={size} status=none",
        image.display(),
        out.display()
    ));
    (out, size)
}

fn fsck_total(image: &Path) -> u64 {
    let text = sh_ok(&format!("fsck.fat -n -v '{}'", image.display()));
    let clean = sh_ok(&format!("fsck.fat -n '{}'", image.display()));
    assert_eq!(clean.lines().count(), 2, "fsck.fat complained: {clean}");
    text.lines()
        .find_map(|l| l.trim().strip_suffix(" sectors total"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn enlarge_grows_fat32_by_default_and_not_with_no_grow_fs() {
    let dir = support::temp_dir();
    let d = dir.path();
    let src = disk(
        d,
        40,
        "mkfs.fat -F 32 -s 1 \"$1\" >/dev/null",
        "mcopy -i \"$1\" \"$2\" ::/FILE.BIN",
    );
    let big = d.join("big.raw");
    let src_s = src.display().to_string();
    let big_s = big.display().to_string();
    let (out, _) = cowdisk(&[
        "enlarge",
        &src_s,
        &big_s,
        "--size",
        "100M",
        "--partition",
        "1",
    ]);
    assert!(
        out.contains("filesystem: partition 1: fat32 grown"),
        "{out}"
    );
    let (p1, size) = partition_1(d, &big);
    assert_eq!(size, 81920 + 50 * 2048);
    assert_eq!(fsck_total(&p1), size);
    let back = d.join("back.bin");
    sh_ok(&format!(
        "mcopy -i '{}' ::/FILE.BIN '{}' && cmp '{}' '{}'",
        p1.display(),
        back.display(),
        back.display(),
        d.join("file.bin").display()
    ));

    let same = d.join("same.raw");
    let same_s = same.display().to_string();
    let (out, _) = cowdisk(&[
        "enlarge",
        &src_s,
        &same_s,
        "--size",
        "100M",
        "--partition",
        "1",
        "--no-grow-fs",
    ]);
    assert!(out.contains("not grown (--no-grow-fs)"), "{out}");
    let (p1, size) = partition_1(d, &same);
    assert_eq!(size, 81920 + 50 * 2048);
    assert_eq!(fsck_total(&p1), 81920);
}

#[test]
fn enlarge_grows_ntfs_by_default() {
    let dir = support::temp_dir();
    let d = dir.path();
    let src = disk(
        d,
        24,
        "mkntfs -q -F -Q \"$1\" >/dev/null 2>&1",
        "ntfscp -f \"$1\" \"$2\" file.bin >/dev/null",
    );
    let big = d.join("big.raw");
    let (out, _) = cowdisk(&[
        "enlarge",
        &src.display().to_string(),
        &big.display().to_string(),
        "--size",
        "100M",
        "--partition",
        "1",
    ]);
    assert!(out.contains("filesystem: partition 1: ntfs grown"), "{out}");
    let (p1, size) = partition_1(d, &big);
    let info = sh_ok(&format!("ntfsinfo -m '{}'", p1.display()));
    let clusters: u64 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Volume Size in Clusters:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cluster: u64 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Cluster Size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(clusters, (size - 1) * 512 / cluster);
    let fix = sh_ok(&format!("ntfsfix -n '{}'", p1.display()));
    assert!(fix.contains("processed successfully"), "{fix}");
    let back = d.join("back.bin");
    sh_ok(&format!(
        "ntfscat '{}' file.bin > '{}' && cmp '{}' '{}'",
        p1.display(),
        back.display(),
        back.display(),
        d.join("file.bin").display()
    ));
}

#[test]
fn enlarge_grows_ext4_by_default() {
    let dir = support::temp_dir();
    let d = dir.path();
    let src = disk(
        d,
        24,
        "mkfs.ext4 -q -F \"$1\"",
        "debugfs -w -R \"write $2 file.bin\" \"$1\" >/dev/null 2>&1",
    );
    let big = d.join("big.raw");
    let (out, _) = cowdisk(&[
        "enlarge",
        &src.display().to_string(),
        &big.display().to_string(),
        "--size",
        "100M",
        "--partition",
        "1",
    ]);
    assert!(
        out.contains("filesystem: partition 1: ext4 grown") && out.contains(" blocks of "),
        "{out}"
    );
    let (p1, size) = partition_1(d, &big);
    assert_eq!(size, 49152 + 66 * 2048);
    let header = sh_ok(&format!("dumpe2fs -h '{}' 2>/dev/null", p1.display()));
    let number = |key: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(number("Block count:") * number("Block size:"), size * 512);
    let check = sh_ok(&format!("e2fsck -fn '{}' 2>&1", p1.display()));
    assert!(
        check
            .lines()
            .all(|l| l.starts_with("Pass ") || l.starts_with("e2fsck ") || l.contains(" files (")),
        "{check}"
    );
    let back = d.join("back.bin");
    sh_ok(&format!(
        "debugfs -R 'dump /file.bin {}' '{}' 2>/dev/null && cmp '{}' '{}'",
        back.display(),
        p1.display(),
        back.display(),
        d.join("file.bin").display()
    ));
}

#[test]
fn enlarge_warns_that_a_dirty_ext4_is_not_grown_and_grows_the_partition() {
    let dir = support::temp_dir();
    let d = dir.path();
    let src = disk(
        d,
        24,
        "mkfs.ext4 -q -F \"$1\"",
        "debugfs -w -R \"ssv state 0\" \"$1\" >/dev/null 2>&1",
    );
    let big = d.join("big.raw");
    let (_, err) = cowdisk(&[
        "enlarge",
        &src.display().to_string(),
        &big.display().to_string(),
        "--size",
        "100M",
        "--partition",
        "1",
    ]);
    assert!(err.contains("not cleanly unmounted"), "{err}");
    let (p1, size) = partition_1(d, &big);
    assert_eq!(size, 49152 + 66 * 2048);
    let header = sh_ok(&format!("dumpe2fs -h '{}' 2>/dev/null", p1.display()));
    let number = |key: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(number("Block count:") * number("Block size:"), 24 * MIB);
}
