//! The filesystem parsers on damaged input: real images (mke2fs, mkfs.fat,
//! mkntfs, each in an sfdisk partition) with random bytes of their
//! metadata changed. Whatever the damage, `analyze` must return (no panic,
//! no hang, no huge allocation), and what it calls free must lie inside
//! the region it reports it for; the view must read.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use cowdisk::fs::{analyze, AnalyzeOptions, FilesystemView};
use cowdisk::{Disk, MemDisk, SectorStatus};

const P1: u64 = 2048;

fn sh(script: &str) {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk of `mib` MiB with one partition from 1 MiB holding the
/// filesystem `make` writes into the file it is given.
fn disk_bytes(dir: &Path, mib: u64, kind: &str, make: &str) -> Vec<u8> {
    let image = dir.join("fs.img");
    let disk = dir.join("disk.raw");
    let files = dir.join("files");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("a.bin"), support::pattern(300 * 1024, 5)).unwrap();
    let part_mib = mib - 2;
    sh(&format!(
        "set -e; export MTOOLS_SKIP_CHECK=1; f='{f}'; d='{d}'; files='{files}'; \
         rm -f \"$f\" \"$d\"; truncate -s {part_mib}M \"$f\"; {make}; truncate -s {mib}M \"$d\"; \
         printf 'label: dos\\nstart={P1}, size={}, type={kind}\\n' | sfdisk -q \"$d\"; \
         dd if=\"$f\" of=\"$d\" bs=512 seek={P1} conv=notrunc status=none",
        part_mib * 2048,
        f = image.display(),
        d = disk.display(),
        files = files.display(),
    ));
    fs::read(&disk).unwrap()
}

/// A small deterministic generator (xorshift), so a failure can be
/// replayed from its seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Damages `original` `rounds` times (a few random bytes of the first
/// `span` bytes of the partition each time) and checks every analysis.
fn fuzz(name: &str, original: &[u8], span: u64, rounds: u64) {
    let sectors = original.len() / 512;
    for round in 0..rounds {
        let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (round + 1);
        let mut bytes = original.to_vec();
        let hits = 1 + next(&mut seed) % 8;
        for _ in 0..hits {
            let at = (P1 * 512 + next(&mut seed) % span) as usize;
            bytes[at] = next(&mut seed) as u8;
        }
        let mut disk = MemDisk::new(bytes, vec![SectorStatus::Normal; sectors]).unwrap();
        let analysis = analyze(&mut disk, &AnalyzeOptions::default())
            .unwrap_or_else(|e| panic!("{name} round {round}: analyze failed: {e}"));
        // Every free sector lies in a region reported with free space
        // (runs of neighbouring regions may merge, so count by overlap).
        for &(start, count) in analysis.free.runs() {
            let covered: u64 = analysis
                .report
                .regions
                .iter()
                .filter(|r| r.free_sectors > 0)
                .map(|r| {
                    let (a, b) = (start.max(r.start), (start + count).min(r.start + r.sectors));
                    b.saturating_sub(a)
                })
                .sum();
            assert_eq!(
                covered, count,
                "{name} round {round}: free run {start}+{count} outside the regions: {:#?}",
                analysis.report
            );
        }
        let reported: u64 = analysis.report.regions.iter().map(|r| r.free_sectors).sum();
        assert_eq!(reported, analysis.free.sectors(), "{name} round {round}");
        let (view, _) = FilesystemView::from_analysis(Box::new(disk), analysis);
        let mut buf = vec![0u8; 512 * 64];
        view.read_sectors(0, &mut buf).unwrap();
    }
}

#[test]
fn damaged_ext2_and_ext4_never_panic_and_free_stays_inside() {
    let dir = support::temp_dir();
    let ext2 = disk_bytes(
        dir.path(),
        10,
        "83",
        "mke2fs -q -F -t ext2 -b 1024 -d \"$files\" \"$f\"",
    );
    fuzz("ext2", &ext2, 64 * 1024, 300);
    let ext4 = disk_bytes(
        dir.path(),
        10,
        "83",
        "mke2fs -q -F -t ext4 -O 64bit,^metadata_csum,uninit_bg -d \"$files\" \"$f\"",
    );
    fuzz("ext4", &ext4, 64 * 1024, 300);
}

#[test]
fn damaged_fat_never_panics_and_free_stays_inside() {
    for (flags, mib) in [("-F 12", 6), ("-F 16", 20), ("-F 32 -s 1", 40)] {
        let dir = support::temp_dir();
        let disk = disk_bytes(
            dir.path(),
            mib,
            "c",
            &format!(
                "rm -f \"$f\"; mkfs.fat {flags} -C \"$f\" {} >/dev/null; \
                 mcopy -i \"$f\" \"$files/a.bin\" ::/A.BIN",
                (mib - 2) * 1024
            ),
        );
        fuzz(flags, &disk, 128 * 1024, 200);
    }
}

#[test]
fn damaged_ntfs_never_panics_and_free_stays_inside() {
    let dir = support::temp_dir();
    let disk = disk_bytes(
        dir.path(),
        18,
        "7",
        "mkntfs -q -F -f \"$f\" 2>/dev/null; ntfscp -q \"$f\" \"$files/a.bin\" a.bin",
    );
    fuzz("ntfs", &disk, 96 * 1024, 300);
}
