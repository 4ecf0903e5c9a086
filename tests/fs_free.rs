//! Filesystem-aware clones against real filesystems made by the real
//! tools (mke2fs, debugfs, mkfs.fat, mtools, mkswap, sfdisk, sgdisk),
//! without mounting. The oracles are the tools' own free counts (dumpe2fs,
//! fsck.fat -v) and, above all, safety: after a compact clone every file
//! reads back identically with the tools, fsck is clean, and the deleted
//! file's bytes are gone; refused filesystems clone exactly as a plain
//! clone does.

mod support;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cowdisk::clone::{allocated_bytes, clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::fs::{FilesystemView, FsKind, Report};
use support::{pattern, run, sh_ok};

const MIB: u64 = 1 << 20;
/// The start of the first partition (1 MiB).
const P1: u64 = 2048;
/// What the deleted file holds: a pattern that appears nowhere else.
const MARKER: &[u8] = b"--cowdisk deleted file marker--";

/// The files put on every filesystem: (name, bytes).
fn kept_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(3 * MIB as usize, 1)),
        ("b.bin", pattern(700 * 1024 + 13, 2)),
        ("c.bin", pattern(5 * MIB as usize + 4096, 3)),
    ]
}

fn deleted_bytes() -> Vec<u8> {
    MARKER
        .iter()
        .copied()
        .cycle()
        .take(6 * MIB as usize)
        .collect()
}

/// A folder with the kept files and `gone.bin`.
fn populate(dir: &Path) -> PathBuf {
    let src = dir.join("files");
    fs::create_dir_all(&src).unwrap();
    for (name, bytes) in kept_files() {
        fs::write(src.join(name), bytes).unwrap();
    }
    fs::write(src.join("gone.bin"), deleted_bytes()).unwrap();
    src
}

/// An empty disk of `mib` MiB partitioned by sfdisk with `script`.
fn partitioned(dir: &Path, mib: u64, script: &str) -> PathBuf {
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(mib * MIB).unwrap();
    sh_ok(&format!(
        "printf '{script}' | sfdisk --quiet '{}'",
        disk.display()
    ));
    disk
}

/// Copies the filesystem image into the disk at sector `start`.
fn place(disk: &Path, image: &Path, start: u64) {
    let bytes = fs::read(image).unwrap();
    let mut f = fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(start * 512)).unwrap();
    f.write_all(&bytes).unwrap();
}

/// Sectors `[start, start + sectors)` of an image file, as a new file.
fn extract(dir: &Path, image: &Path, start: u64, sectors: u64, name: &str) -> PathBuf {
    let bytes = fs::read(image).unwrap();
    let out = dir.join(name);
    fs::write(
        &out,
        &bytes[(start * 512) as usize..((start + sectors) * 512) as usize],
    )
    .unwrap();
    out
}

fn clone(disk: Box<dyn cowdisk::Disk>, path: &Path, compact: bool) -> Option<Report> {
    let options = CloneOptions {
        format: CloneFormat::Raw,
        replace: false,
        ..CloneOptions::default()
    };
    if compact {
        let (mut view, report) = FilesystemView::new(disk).unwrap();
        clone_to_file(&mut view, path, &options, &mut no_progress()).unwrap();
        Some(report)
    } else {
        let mut disk = disk;
        clone_to_file(disk.as_mut(), path, &options, &mut no_progress()).unwrap();
        None
    }
}

fn open(path: &Path) -> Box<dyn cowdisk::Disk> {
    open_path(path, &OpenOptions::default()).unwrap()
}

/// The 1 MiB pages of `image` holding a non-zero sector that is not a
/// stretch of the deleted file's marker stream: what a clone that leaves
/// out exactly the deleted file (and zeros) must store, at its page
/// resolution. (Blocks freed with the file that are not its data - ext2/3
/// indirect blocks - count as stored here, so this is an upper bound.)
fn pages_without_marker_sectors(image: &[u8]) -> u64 {
    // Some phase of the marker stream gives every byte.
    let is_marker = |sector: &[u8]| {
        (0..MARKER.len()).any(|phase| {
            sector
                .iter()
                .enumerate()
                .all(|(i, &b)| b == MARKER[(phase + i) % MARKER.len()])
        })
    };
    image
        .chunks(MIB as usize)
        .filter(|page| {
            page.chunks(512)
                .any(|sector| sector.iter().any(|&b| b != 0) && !is_marker(sector))
        })
        .count() as u64
}

/// The 1 MiB pages of `image` that are not all zeros.
fn nonzero_pages(image: &[u8]) -> u64 {
    image
        .chunks(MIB as usize)
        .filter(|page| page.iter().any(|&b| b != 0))
        .count() as u64
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The plain and the compact clone of `disk`, and the compact one's report.
struct Clones {
    plain: PathBuf,
    compact: PathBuf,
    report: Report,
}

fn both_clones(dir: &Path, disk: &Path) -> Clones {
    let plain = dir.join("plain.raw");
    let compact = dir.join("compact.raw");
    clone(open(disk), &plain, false);
    let report = clone(open(disk), &compact, true).unwrap();
    Clones {
        plain,
        compact,
        report,
    }
}

fn region(report: &Report, number: u32) -> &cowdisk::fs::RegionReport {
    report
        .regions
        .iter()
        .find(|r| r.number == number && r.filesystem != FsKind::Unpartitioned)
        .unwrap_or_else(|| panic!("no partition {number} in {report:#?}"))
}

/// The numbers in lines like "  1234 free blocks, ..." of `dumpe2fs`
/// (one per group), summed, the block size, and the number of groups.
fn dumpe2fs_free(image: &Path) -> (u64, u64, u64) {
    let text = sh_ok(&format!("dumpe2fs '{}' 2>/dev/null", image.display()));
    let mut free = 0;
    let mut block_size = 0;
    let mut groups = 0;
    for line in text.lines() {
        if line.starts_with("Group ") {
            groups += 1;
        }
        if let Some(rest) = line.strip_prefix("Block size:") {
            block_size = rest.trim().parse().unwrap();
        }
        if line.contains(" free blocks, ") {
            free += line
                .trim()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    assert!(block_size > 0, "no block size in dumpe2fs output");
    (free, block_size, groups)
}

/// The ext filesystem made from `files` by `mke2fs ARGS`, with gone.bin
/// deleted by debugfs.
fn make_ext(dir: &Path, mkfs_args: &str, mib: u64) -> PathBuf {
    let files = populate(dir);
    let image = dir.join("fs.img");
    sh_ok(&format!(
        "mke2fs -q -F {mkfs_args} -d '{}' '{}' {mib}M",
        files.display(),
        image.display()
    ));
    sh_ok(&format!(
        "debugfs -w -R 'rm gone.bin' '{}'",
        image.display()
    ));
    image
}

/// Every kept file read back from an ext image with `debugfs dump`.
fn check_ext_files(dir: &Path, image: &Path) {
    for (name, bytes) in kept_files() {
        let out = dir.join(format!("out-{name}"));
        sh_ok(&format!(
            "debugfs -R 'dump /{name} {}' '{}'",
            out.display(),
            image.display()
        ));
        assert!(
            fs::read(&out).unwrap() == bytes,
            "{name} differs after the compact clone"
        );
    }
}

/// One ext variant: made, partitioned (MBR, 1 MiB gap, 15 MiB after),
/// cloned plain and compact, checked.
fn ext_case(mkfs_args: &str, expect: FsKind) {
    let dir = support::temp_dir();
    let fs_mib = 64;
    let image = make_ext(dir.path(), mkfs_args, fs_mib);
    let (tool_free_blocks, block_size, groups) = dumpe2fs_free(&image);
    let part_sectors = fs_mib * MIB / 512;
    let disk = partitioned(
        dir.path(),
        80,
        &format!("label: dos\\nstart={P1}, size={part_sectors}, type=83\\n"),
    );
    place(&disk, &image, P1);
    let clones = both_clones(dir.path(), &disk);
    let report = &clones.report;
    let part = region(report, 1);
    assert_eq!(part.filesystem, expect, "{report:#?}");
    assert_eq!(part.reason, None, "{report:#?}");
    assert_eq!(
        part.free_sectors,
        tool_free_blocks * block_size / 512,
        "free space differs from dumpe2fs's free blocks ({tool_free_blocks} of {block_size} \
         bytes)"
    );
    let tail = report
        .regions
        .iter()
        .find(|r| r.filesystem == FsKind::Unpartitioned)
        .expect("the space after the partition");
    assert_eq!(
        (tail.start, tail.sectors, tail.free_sectors),
        (
            P1 + part_sectors,
            80 * MIB / 512 - P1 - part_sectors,
            80 * MIB / 512 - P1 - part_sectors
        )
    );
    // Safety: fsck clean, files identical, deleted bytes gone.
    let cloned = extract(dir.path(), &clones.compact, P1, part_sectors, "part.img");
    sh_ok(&format!("e2fsck -fn '{}'", cloned.display()));
    check_ext_files(dir.path(), &cloned);
    let compact_bytes = fs::read(&clones.compact).unwrap();
    assert!(
        !contains(&compact_bytes, MARKER),
        "the deleted file's bytes were cloned"
    );
    assert!(
        contains(&fs::read(&clones.plain).unwrap(), MARKER),
        "the plain clone should still hold the deleted file's bytes (the test's premise)"
    );
    // Size: smaller than the plain clone by about the deleted file, and
    // close to what the filesystem uses. The clone writes whole 1 MiB
    // pages, so each block group's metadata at its start (superblock copy,
    // bitmaps) may bring in one partly used page; that is allowed for.
    let plain = allocated_bytes(&clones.plain).unwrap();
    let compact = allocated_bytes(&clones.compact).unwrap();
    let used = (fs_mib * MIB / block_size - tool_free_blocks) * block_size;
    assert!(
        compact + 5 * MIB <= plain,
        "compact {compact} vs plain {plain}: the 6 MiB deleted file was not left out"
    );
    let needed = pages_without_marker_sectors(&fs::read(&clones.plain).unwrap());
    let stored = nonzero_pages(&compact_bytes);
    assert!(
        stored <= needed,
        "compact clone: {stored} pages with data, more than the {needed} holding kept data"
    );
    let qemu = dir.path().join("qemu.raw");
    support::qemu_img(&[
        "convert",
        "-O",
        "raw",
        disk.to_str().unwrap(),
        qemu.to_str().unwrap(),
    ]);
    // The clone leaves out whole 1 MiB pages, qemu-img every 4 KiB run of
    // zeros; compared at the clone's resolution (the 1 MiB pages holding
    // any of qemu-img's data, from `qemu-img map`), the compact clone must
    // be smaller by about the 6 MiB deleted file (less the pages it shares
    // with kept data).
    let qemu_pages: std::collections::BTreeSet<u64> = support::qemu_map(&qemu)
        .iter()
        .filter(|e| e.data)
        .flat_map(|e| e.start / MIB..(e.start + e.length).div_ceil(MIB))
        .collect();
    let qemu = qemu_pages.len() as u64 * MIB;
    assert!(
        compact + 4 * MIB <= qemu,
        "compact {compact} vs qemu-img convert's {qemu} in 1 MiB pages"
    );
    assert!(
        compact <= used + used / 50 + (groups + 2) * MIB,
        "compact clone {compact} bytes, the filesystem uses {used} in {groups} groups"
    );
}

#[test]
fn ext2_free_blocks_are_left_out_and_files_survive() {
    ext_case("-t ext2", FsKind::Ext2);
}

#[test]
fn ext3_free_blocks_are_left_out_and_files_survive() {
    ext_case("-t ext3", FsKind::Ext3);
}

#[test]
fn ext4_default_free_blocks_are_left_out_and_files_survive() {
    ext_case("-t ext4", FsKind::Ext4);
}

#[test]
fn ext4_64bit_flex_bg_metadata_csum_1k_blocks() {
    ext_case(
        "-t ext4 -b 1024 -O 64bit,flex_bg,metadata_csum",
        FsKind::Ext4,
    );
}

#[test]
fn ext4_without_64bit_and_flex_bg_with_uninit_bg() {
    ext_case(
        "-t ext4 -O ^64bit,^flex_bg,^metadata_csum,uninit_bg",
        FsKind::Ext4,
    );
}

#[test]
fn ext4_meta_bg_without_resize_inode() {
    ext_case("-t ext4 -O meta_bg,^resize_inode", FsKind::Ext4);
}

#[test]
fn ext4_2k_blocks_sparse_super2() {
    ext_case("-t ext4 -b 2048 -O sparse_super2", FsKind::Ext4);
}

/// A FAT volume made by mkfs.fat, filled by mcopy, gone.bin deleted by
/// mdel.
fn make_fat(dir: &Path, mkfs_args: &str, kib: u64) -> PathBuf {
    let files = populate(dir);
    let image = dir.join("fs.img");
    sh_ok(&format!(
        "mkfs.fat {mkfs_args} -C '{}' {kib} >/dev/null",
        image.display()
    ));
    for name in ["a.bin", "b.bin", "c.bin", "gone.bin"] {
        sh_ok(&format!(
            "mcopy -i '{}' '{}' ::/{name}",
            image.display(),
            files.join(name).display()
        ));
    }
    sh_ok(&format!("mdel -i '{}' ::/gone.bin", image.display()));
    image
}

/// (free clusters, bytes per cluster) as `fsck.fat -n -v` counts them.
fn fsck_fat_free(image: &Path) -> (u64, u64) {
    let text = sh_ok(&format!("fsck.fat -n -v '{}'", image.display()));
    let mut cluster = 0;
    let mut free = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_suffix(" bytes per cluster") {
            cluster = n.trim().parse().unwrap();
        }
        // "fs.img: 4 files, 1234/8000 clusters"
        if let Some(counts) = line.strip_suffix(" clusters") {
            let counts = counts.rsplit(' ').next().unwrap();
            let (used, total) = counts.split_once('/').unwrap();
            free = Some(total.parse::<u64>().unwrap() - used.parse::<u64>().unwrap());
        }
    }
    (free.expect("no cluster count from fsck.fat"), cluster)
}

fn fat_case(mkfs_args: &str, kib: u64, expect: FsKind) {
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), mkfs_args, kib);
    let (tool_free, cluster) = fsck_fat_free(&image);
    let part_sectors = kib * 2;
    let disk = partitioned(
        dir.path(),
        kib / 1024 + 4,
        &format!("label: dos\\nstart={P1}, size={part_sectors}, type=c\\n"),
    );
    place(&disk, &image, P1);
    let clones = both_clones(dir.path(), &disk);
    let part = region(&clones.report, 1);
    assert_eq!(part.filesystem, expect, "{:#?}", clones.report);
    assert_eq!(part.reason, None);
    assert_eq!(
        part.free_sectors,
        tool_free * cluster / 512,
        "fsck.fat: {tool_free} free"
    );
    let cloned = extract(dir.path(), &clones.compact, P1, part_sectors, "part.img");
    sh_ok(&format!("fsck.fat -n '{}'", cloned.display()));
    for (name, bytes) in kept_files() {
        let out = dir.path().join(format!("out-{name}"));
        sh_ok(&format!(
            "mcopy -i '{}' ::/{name} '{}'",
            cloned.display(),
            out.display()
        ));
        assert!(
            fs::read(&out).unwrap() == bytes,
            "{name} differs after the compact clone"
        );
    }
    assert!(!contains(&fs::read(&clones.compact).unwrap(), MARKER));
    assert!(contains(&fs::read(&clones.plain).unwrap(), MARKER));
    let plain = allocated_bytes(&clones.plain).unwrap();
    let compact = allocated_bytes(&clones.compact).unwrap();
    assert!(
        compact + 5 * MIB <= plain,
        "compact {compact} vs plain {plain}"
    );
    let needed = pages_without_marker_sectors(&fs::read(&clones.plain).unwrap());
    let stored = nonzero_pages(&fs::read(&clones.compact).unwrap());
    assert_eq!(
        stored, needed,
        "the pages holding anything but the deleted file"
    );
    // Within 2% of the space fsck.fat counts as used (the reserved area,
    // FATs and root directory included), plus the clone's 1 MiB page
    // rounding at both ends of the used area and the MBR's page.
    let used = part_sectors * 512 - tool_free * cluster;
    assert!(
        compact <= used + used / 50 + 3 * MIB,
        "compact {compact}, fsck.fat's used space {used}"
    );
}

#[test]
fn fat12_free_clusters_are_left_out_and_files_survive() {
    fat_case("-F 12 -s 16", 24 * 1024, FsKind::Fat12);
}

#[test]
fn fat16_free_clusters_are_left_out_and_files_survive() {
    fat_case("-F 16", 32 * 1024, FsKind::Fat16);
}

#[test]
fn fat32_free_clusters_are_left_out_and_files_survive() {
    fat_case("-F 32 -s 1", 80 * 1024, FsKind::Fat32);
}

#[test]
fn gpt_disk_keeps_backup_table_and_frees_the_tail() {
    let dir = support::temp_dir();
    let ext = make_ext(dir.path(), "-t ext4", 32);
    let fat_dir = dir.path().join("fat");
    fs::create_dir(&fat_dir).unwrap();
    let fat = make_fat(&fat_dir, "-F 32 -s 1", 40 * 1024);
    let disk = dir.path().join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(100 * MIB).unwrap();
    // sgdisk: partition 1 ext4 (32 MiB), 2 FAT32 (40 MiB); ~27 MiB after.
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+32M",
            "-t",
            "1:8300",
            "-n",
            "2:0:+40M",
            "-t",
            "2:0700",
            disk.to_str().unwrap(),
        ],
    );
    let p2 = P1 + 32 * MIB / 512;
    place(&disk, &ext, P1);
    place(&disk, &fat, p2);
    let clones = both_clones(dir.path(), &disk);
    let report = &clones.report;
    assert_eq!(report.table, Some("gpt"));
    assert_eq!(region(report, 1).filesystem, FsKind::Ext4);
    assert_eq!(region(report, 2).filesystem, FsKind::Fat32);
    let tail = report
        .regions
        .iter()
        .find(|r| r.filesystem == FsKind::Unpartitioned)
        .unwrap();
    let disk_sectors = 100 * MIB / 512;
    // sgdisk keeps 33 sectors at the end: the backup array (32) and header.
    assert_eq!(tail.start, p2 + 40 * MIB / 512);
    assert_eq!(tail.start + tail.sectors, disk_sectors - 33);
    let verify = sh_ok(&format!("sgdisk -v '{}'", clones.compact.display()));
    assert!(verify.contains("No problems found"), "{verify}");
    let ext_clone = extract(dir.path(), &clones.compact, P1, 32 * MIB / 512, "p1.img");
    sh_ok(&format!("e2fsck -fn '{}'", ext_clone.display()));
    check_ext_files(dir.path(), &ext_clone);
    let fat_clone = extract(dir.path(), &clones.compact, p2, 40 * MIB / 512, "p2.img");
    sh_ok(&format!("fsck.fat -n '{}'", fat_clone.display()));
    assert!(!contains(&fs::read(&clones.compact).unwrap(), MARKER));
}

#[test]
fn logical_partitions_fat16_ext2_and_swap() {
    let dir = support::temp_dir();
    let fat = make_fat(dir.path(), "-F 16", 20 * 1024);
    let ext_dir = dir.path().join("ext");
    fs::create_dir(&ext_dir).unwrap();
    let ext = make_ext(&ext_dir, "-t ext2", 24);
    let swap = dir.path().join("swap.img");
    fs::File::create(&swap).unwrap().set_len(8 * MIB).unwrap();
    sh_ok(&format!("mkswap '{}' >/dev/null", swap.display()));
    // Fill the swap area with the marker (as if pages had been swapped
    // out): it must all be left out.
    let mut swap_bytes = fs::read(&swap).unwrap();
    for (i, b) in swap_bytes[4096..].iter_mut().enumerate() {
        *b = MARKER[i % MARKER.len()];
    }
    fs::write(&swap, &swap_bytes).unwrap();
    // p1 FAT16 (20 MiB), p2 extended; p5 ext2 (24 MiB), p6 swap (8 MiB).
    let p5 = P1 + 20 * 2048 + 2048;
    let p6 = p5 + 24 * 2048 + 2048;
    let disk = partitioned(
        dir.path(),
        64,
        &format!(
            "label: dos\\nstart={P1}, size={}, type=6\\nstart={}, type=5\\n\
             start={p5}, size={}, type=83\\nstart={p6}, size={}, type=82\\n",
            20 * 2048,
            P1 + 20 * 2048,
            24 * 2048,
            8 * 2048
        ),
    );
    place(&disk, &fat, P1);
    place(&disk, &ext, p5);
    place(&disk, &swap, p6);
    let clones = both_clones(dir.path(), &disk);
    let report = &clones.report;
    assert_eq!(region(report, 1).filesystem, FsKind::Fat16);
    assert_eq!(region(report, 5).filesystem, FsKind::Ext2);
    let swap_region = region(report, 6);
    assert_eq!(swap_region.filesystem, FsKind::Swap);
    assert_eq!(swap_region.free_sectors, 8 * 2048 - 8);
    let cloned = extract(dir.path(), &clones.compact, p5, 24 * 2048, "p5.img");
    sh_ok(&format!("e2fsck -fn '{}'", cloned.display()));
    check_ext_files(dir.path(), &cloned);
    let cloned_swap = extract(dir.path(), &clones.compact, p6, 8 * 2048, "p6.img");
    let blkid = sh_ok(&format!(
        "blkid -p -o value -s TYPE '{}'",
        cloned_swap.display()
    ));
    assert_eq!(blkid.trim(), "swap");
    // The EBRs survived: sfdisk reads the same table back.
    let table = |p: &Path| {
        sh_ok(&format!(
            "sfdisk --dump '{}' | grep -v '^label-id\\|^device\\|^unit\\|^sector-size'",
            p.display()
        ))
    };
    assert_eq!(
        table(&clones.compact).replace("compact.raw", "X"),
        table(&disk).replace("disk.raw", "X")
    );
    assert!(!contains(&fs::read(&clones.compact).unwrap(), MARKER));
}

/// A refused filesystem is kept whole: the partition's bytes in the
/// compact clone equal the plain clone's.
fn assert_kept_whole(clones: &Clones, start: u64, sectors: u64, reason_has: &str) {
    let part = region(&clones.report, 1);
    assert_eq!(part.free_sectors, 0, "{:#?}", clones.report);
    let reason = part.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(reason_has),
        "reason {reason:?} lacks {reason_has:?}"
    );
    let a = fs::read(&clones.plain).unwrap();
    let b = fs::read(&clones.compact).unwrap();
    let range = (start * 512) as usize..((start + sectors) * 512) as usize;
    assert!(
        a[range.clone()] == b[range],
        "the refused partition's bytes differ"
    );
}

fn refused_ext(prepare: impl FnOnce(&Path), reason_has: &str) {
    let dir = support::temp_dir();
    let image = make_ext(dir.path(), "-t ext4 -b 4096 -O metadata_csum", 32);
    prepare(&image);
    let sectors = 32 * 2048;
    let disk = partitioned(
        dir.path(),
        40,
        &format!("label: dos\\nstart={P1}, size={sectors}, type=83\\n"),
    );
    place(&disk, &image, P1);
    let clones = both_clones(dir.path(), &disk);
    assert_kept_whole(&clones, P1, sectors, reason_has);
}

#[test]
fn ext4_needing_journal_recovery_is_kept_whole() {
    refused_ext(
        |image| {
            sh_ok(&format!(
                "debugfs -w -R 'feature needs_recovery' '{}'",
                image.display()
            ));
        },
        "recovery",
    );
}

#[test]
fn ext4_with_a_damaged_group_descriptor_is_kept_whole() {
    refused_ext(
        |image| {
            // 4 KiB blocks: the descriptor table is block 1; byte 0x0C of
            // descriptor 0 is its free-blocks count, covered by the
            // checksum.
            let mut bytes = fs::read(image).unwrap();
            bytes[4096 + 0x0C] ^= 0x40;
            fs::write(image, bytes).unwrap();
        },
        "checksum",
    );
}

#[test]
fn ext4_with_a_damaged_superblock_is_kept_whole() {
    refused_ext(
        |image| {
            // The superblock's free-blocks count (byte 1024 + 0x0C),
            // covered by its checksum.
            let mut bytes = fs::read(image).unwrap();
            bytes[1024 + 0x0C] ^= 0x01;
            fs::write(image, bytes).unwrap();
        },
        "checksum",
    );
}

#[test]
fn ext2_with_a_bitmap_contradicting_its_descriptor_is_kept_whole() {
    let dir = support::temp_dir();
    let image = make_ext(dir.path(), "-t ext2 -b 4096", 32);
    // Block bitmap of group 0, read from dumpe2fs; clear a used bit (the
    // superblock's block) so the free counts disagree.
    let text = sh_ok(&format!("dumpe2fs '{}' 2>/dev/null", image.display()));
    let bitmap_block: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Block bitmap at "))
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(&image).unwrap();
    bytes[(bitmap_block * 4096) as usize] &= !1;
    fs::write(&image, bytes).unwrap();
    let sectors = 32 * 2048;
    let disk = partitioned(
        dir.path(),
        40,
        &format!("label: dos\\nstart={P1}, size={sectors}, type=83\\n"),
    );
    place(&disk, &image, P1);
    let clones = both_clones(dir.path(), &disk);
    assert_kept_whole(&clones, P1, sectors, "free blocks");
}

#[test]
fn fat_marked_unclean_or_with_differing_copies_is_kept_whole() {
    for (what, reason_has) in [("clean bit", "clean-shutdown"), ("copies", "differs")] {
        let dir = support::temp_dir();
        let image = make_fat(dir.path(), "-F 16", 32 * 1024);
        let mut bytes = fs::read(&image).unwrap();
        // FAT16: the first FAT starts after the reserved sectors (BPB
        // 0x0E); entry 1 is its bytes 2..4, the clean bit 0x8000.
        let reserved = u16::from_le_bytes([bytes[0x0E], bytes[0x0F]]) as usize;
        let fat_sectors = u16::from_le_bytes([bytes[0x16], bytes[0x17]]) as usize;
        let fat0 = reserved * 512;
        match what {
            "clean bit" => {
                bytes[fat0 + 3] &= !0x80;
                bytes[fat0 + fat_sectors * 512 + 3] &= !0x80;
            }
            _ => bytes[fat0 + fat_sectors * 512 + 100] ^= 0xFF,
        }
        fs::write(&image, bytes).unwrap();
        let sectors = 32 * 2048;
        let disk = partitioned(
            dir.path(),
            40,
            &format!("label: dos\\nstart={P1}, size={sectors}, type=6\\n"),
        );
        place(&disk, &image, P1);
        let clones = both_clones(dir.path(), &disk);
        assert_kept_whole(&clones, P1, sectors, reason_has);
    }
}

#[test]
fn unknown_partition_contents_are_kept_whole() {
    let dir = support::temp_dir();
    let disk = partitioned(
        dir.path(),
        8,
        &format!("label: dos\\nstart={P1}, size=8192, type=83\\n"),
    );
    let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(P1 * 512)).unwrap();
    f.write_all(&deleted_bytes()[..4 * MIB as usize]).unwrap();
    drop(f);
    let clones = both_clones(dir.path(), &disk);
    assert_eq!(region(&clones.report, 1).filesystem, FsKind::Unknown);
    assert_kept_whole(&clones, P1, 8192, "no filesystem");
}

#[test]
fn fat16_filling_the_whole_disk_without_a_table_is_read() {
    // A "superfloppy": the FAT boot sector is sector 0 of the disk.
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), "-F 16", 32 * 1024);
    let (tool_free, cluster) = fsck_fat_free(&image);
    let clones = both_clones(dir.path(), &image);
    let region = &clones.report.regions[0];
    assert_eq!(
        (region.number, region.filesystem),
        (0, FsKind::Fat16),
        "{:#?}",
        clones.report
    );
    assert_eq!(region.free_sectors, tool_free * cluster / 512);
    sh_ok(&format!("fsck.fat -n '{}'", clones.compact.display()));
    for (name, bytes) in kept_files() {
        let out = dir.path().join(format!("out-{name}"));
        sh_ok(&format!(
            "mcopy -i '{}' ::/{name} '{}'",
            clones.compact.display(),
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == bytes, "{name} differs");
    }
    assert!(!contains(&fs::read(&clones.compact).unwrap(), MARKER));
}
