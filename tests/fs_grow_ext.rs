//! Growing ext2/ext3/ext4 through the overlay after `partition::enlarge`,
//! checked with e2fsprogs on the clone: `e2fsck -fn` says nothing but its
//! passes, `dumpe2fs -h` counts the partition's blocks, every file made by
//! `mke2fs -d` reads back with `debugfs dump`, a file larger than the old
//! free space can be written with `debugfs write` (and e2fsck stays
//! clean), and the same filesystem grown by `resize2fs` to the same size
//! has the same block count, group count and free blocks. Refusals (a dirty filesystem, one whose journal needs
//! recovery, one without reserved descriptor blocks that needs more, a
//! size beyond them) leave the overlay untouched.

mod support;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use cowdisk::clone::{clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::error::ErrorCode;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::fs::{grow_filesystem, FsKind};
use cowdisk::partition::{self, Alignment, EnlargeOptions, Partition};
use cowdisk::{Disk, Overlay, OverlayOptions};
use support::pattern;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const P1: u64 = 2048;

fn sh(script: &str) -> (bool, String) {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sh_ok(script: &str) -> String {
    let (ok, text) = sh(script);
    assert!(ok, "{script} failed: {text}");
    text
}

fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(900 * KIB as usize + 7, 1)),
        ("b.bin", pattern(3000, 2)),
        ("c.bin", pattern(2 * MIB as usize + 512, 3)),
    ]
}

/// An ext image of `mib` MiB made by `mke2fs -t {kind} {opts}`, holding
/// [`files`].
fn make_ext(dir: &Path, mib: u64, kind: &str, opts: &str) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    for (name, bytes) in files() {
        fs::write(src.join(name), bytes).unwrap();
    }
    let image = dir.join("fs.img");
    sh_ok(&format!(
        "mke2fs -q -F -t {kind} {opts} -d '{}' '{}' {}k",
        src.display(),
        image.display(),
        mib * 1024
    ));
    image
}

fn disk_with(dir: &Path, bytes: u64, script: &str, image: &Path) -> PathBuf {
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(bytes).unwrap();
    sh_ok(&format!(
        "printf '{script}' | sfdisk --quiet '{}'",
        disk.display()
    ));
    let bytes = fs::read(image).unwrap();
    let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(P1 * 512)).unwrap();
    f.write_all(&bytes).unwrap();
    disk
}

fn open(path: &Path) -> Box<dyn Disk> {
    open_path(path, &OpenOptions::default()).unwrap()
}

/// The partition as e2fsprogs open it: extracted (small) or addressed in
/// place with `?offset=` (large, sparse).
fn extract(dir: &Path, image: &Path, start: u64, sectors: u64) -> String {
    if sectors * 512 > 4 << 30 {
        return format!("{}?offset={}", image.display(), start * 512);
    }
    let out = dir.join("part.img");
    sh_ok(&format!(
        "dd if='{}' of='{}' bs=512 skip={start} count={sectors} conv=sparse status=none",
        image.display(),
        out.display()
    ));
    out.display().to_string()
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// (blocks, free blocks, block size, groups) by dumpe2fs.
fn counts(image: &str) -> (u64, u64, u64, u64) {
    let h = sh_ok(&format!("dumpe2fs -h '{image}' 2>/dev/null"));
    let full = sh_ok(&format!("dumpe2fs '{image}' 2>/dev/null"));
    let groups = full
        .lines()
        .filter(|l| l.starts_with("Group ") && l.contains(": (Blocks "))
        .count() as u64;
    (
        field(&h, "Block count:"),
        field(&h, "Free blocks:"),
        field(&h, "Block size:"),
        groups,
    )
}

fn assert_clean(image: &str) {
    let (ok, out) = sh(&format!("e2fsck -fn '{image}'"));
    let noise: Vec<&str> = out
        .lines()
        .filter(|l| !(l.starts_with("Pass ") || l.starts_with("e2fsck ") || l.contains(" files (")))
        .collect();
    assert!(ok && noise.is_empty(), "e2fsck -fn: {out}");
}

fn assert_files(dir: &Path, image: &str) {
    for (name, bytes) in files() {
        let out = dir.join("out.bin");
        let _ = fs::remove_file(&out);
        sh_ok(&format!(
            "debugfs -R 'dump /{name} {}' '{image}'",
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == bytes, "{name} differs");
    }
}

fn enlarge(overlay: &mut Overlay, new_sectors: u64) -> Partition {
    let report = partition::enlarge(
        overlay,
        &EnlargeOptions {
            new_sectors,
            partition: Some(1),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap();
    report.after.into_iter().find(|p| p.number == 1).unwrap()
}

fn clone_raw(overlay: &mut Overlay, dir: &Path) -> PathBuf {
    let cloned = dir.join("grown.raw");
    clone_to_file(
        overlay,
        &cloned,
        &CloneOptions {
            format: CloneFormat::Raw,
            replace: false,
            ..CloneOptions::default()
        },
        &mut no_progress(),
    )
    .unwrap();
    cloned
}

/// The grown filesystem `image` (at `sectors` sectors) against the
/// original `original` grown by resize2fs to the same size; returns
/// (blocks, free) of ours.
fn compare_with_resize2fs(dir: &Path, original: &Path, image: &str, sectors: u64) -> (u64, u64) {
    let (blocks, free, bs, groups) = counts(image);
    let reference = dir.join("reference.img");
    fs::copy(original, &reference).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&reference)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap();
    sh_ok(&format!("resize2fs -f '{}'", reference.display()));
    let reference = reference.display().to_string();
    let (r_blocks, r_free, _, r_groups) = counts(&reference);
    eprintln!(
        "cowdisk: {blocks} blocks of {bs}, {groups} groups, {free} free; resize2fs: {r_blocks} \
         blocks, {r_groups} groups, {r_free} free"
    );
    assert_eq!(blocks, r_blocks);
    assert_eq!(groups, r_groups);
    // sparse_super2's backup groups (the second one follows the last
    // group), when the filesystem has them.
    let backup_groups = |image: &str| {
        sh_ok(&format!("dumpe2fs -h '{image}' 2>/dev/null"))
            .lines()
            .find(|l| l.starts_with("Backup block groups:"))
            .map(str::to_owned)
    };
    assert_eq!(backup_groups(image), backup_groups(&reference));
    // Both place the same metadata in every new group (only where
    // differs), so the free counts are equal.
    assert_eq!(free, r_free, "free blocks: ours, resize2fs");
    (blocks, free)
}

struct Case {
    kind: &'static str,
    opts: &'static str,
    fs_mib: u64,
    /// The sfdisk script of the small disk (partition 1 at 2048).
    table: &'static str,
    disk_bytes: u64,
    /// The new disk size, in sectors.
    new_disk_sectors: u64,
}

fn grow_case(c: &Case) {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ext(dir, c.fs_mib, c.kind, c.opts);
    let img_s = image.display().to_string();
    let (old_blocks, old_free, bs, _) = counts(&img_s);
    let disk = disk_with(dir, c.disk_bytes, c.table, &image);
    let before = support::fingerprint(&disk);
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, c.new_disk_sectors);
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert!(
        matches!(
            report.filesystem,
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4
        ),
        "{report:?}"
    );
    let cloned = clone_raw(&mut overlay, dir);
    drop(overlay);
    assert_eq!(
        support::fingerprint(&disk),
        before,
        "the source was written"
    );
    let verify = sh_ok(&format!("sfdisk --verify '{}' 2>&1", cloned.display()));
    assert!(verify.contains("No errors detected"), "{verify}");
    let grown = extract(dir, &cloned, part.start, part.sectors);
    assert_clean(&grown);
    let (blocks, free) = compare_with_resize2fs(dir, &image, &grown, part.sectors);
    assert_eq!(blocks, part.sectors * 512 / bs, "the partition's blocks");
    assert_eq!(report.new_clusters, blocks);
    assert_eq!(report.new_free_bytes, free * bs);
    assert_eq!(report.old_clusters, old_blocks);
    assert_files(dir, &grown);

    // A file larger than the old free space.
    let size = (old_free * bs + 4 * MIB).min(old_free * bs + (free - old_free) * bs / 2);
    let big = pattern(size as usize, 9);
    let host = dir.join("big.in");
    fs::write(&host, &big).unwrap();
    sh_ok(&format!(
        "debugfs -w -R 'write {} big.bin' '{grown}'",
        host.display()
    ));
    let out = dir.join("big.out");
    sh_ok(&format!(
        "debugfs -R 'dump /big.bin {}' '{grown}'",
        out.display()
    ));
    assert!(fs::read(&out).unwrap() == big, "big.bin differs");
    assert_clean(&grown);
    assert_files(dir, &grown);
}

const MBR_LAST: &str = "label: dos\\nstart=2048, size=131072, type=83\\n";
const GPT_AFTER: &str = "label: gpt\\nstart=2048, size=131072\\nstart=133120, size=8192\\n";
const MBR_AFTER: &str =
    "label: dos\\nstart=2048, size=131072, type=83\\nstart=133120, size=8192, type=83\\n";

#[test]
fn ext4_default_grows_on_mbr_as_the_last_partition() {
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 4096",
        fs_mib: 64,
        table: MBR_LAST,
        disk_bytes: 66 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext4_32bit_1k_blocks_grows_its_descriptor_table_on_gpt_with_a_partition_after() {
    // 1 KiB blocks, 32-byte descriptors: 32 per block, 8192 blocks per
    // group: 8 groups become 37, the table 1 block then 2.
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O ^64bit",
        fs_mib: 64,
        table: GPT_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext4_uninit_bg_without_flex_bg_or_metadata_csum_grows() {
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O ^flex_bg,^metadata_csum,uninit_bg,^64bit",
        fs_mib: 64,
        table: MBR_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext4_64bit_flex_bg_1k_blocks_grows_across_descriptor_blocks() {
    // 64-byte descriptors: 16 per 1 KiB block: 8 groups become 37 (3
    // blocks).
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O 64bit",
        fs_mib: 64,
        table: MBR_LAST,
        disk_bytes: 66 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext3_grows_with_written_bitmaps() {
    grow_case(&Case {
        kind: "ext3",
        opts: "-b 1024",
        fs_mib: 64,
        table: GPT_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext2_grows_with_a_partition_after_it() {
    grow_case(&Case {
        kind: "ext2",
        opts: "-b 4096",
        fs_mib: 64,
        table: MBR_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 400 * 2048,
    });
}

#[test]
fn ext4_grows_by_a_single_block() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // 60 MiB of 4 KiB blocks in a partition one block larger.
    let image = make_ext(dir, 60, "ext4", "-b 4096");
    let img_s = image.display().to_string();
    let (old_blocks, old_free, bs, _) = counts(&img_s);
    let sectors = 60 * 2048 + 8;
    let disk = disk_with(
        dir,
        62 * MIB,
        &format!("label: dos\\nstart=2048, size={sectors}, type=83\\n"),
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let report = grow_filesystem(&mut overlay, P1, sectors).unwrap();
    assert_eq!(report.new_clusters, old_blocks + 1);
    let cloned = clone_raw(&mut overlay, dir);
    let grown = extract(dir, &cloned, P1, sectors);
    assert_clean(&grown);
    let (blocks, free) = compare_with_resize2fs(dir, &image, &grown, sectors);
    assert_eq!(blocks, old_blocks + 1);
    assert_eq!(blocks, sectors * 512 / bs);
    assert_eq!(free, old_free + 1);
    assert_files(dir, &grown);
}

#[test]
fn ext4_grows_from_64_mib_to_40_gib_and_refuses_2_tib() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // mke2fs reserves descriptor blocks for 1024 times the size: 64 GiB.
    let image = make_ext(dir, 64, "ext4", "-b 4096");
    let disk = disk_with(dir, 66 * MIB, MBR_LAST, &image);

    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 2 << 31);
    let map = format!("{:?}", overlay.extents());
    let units = overlay.store_units_used();
    let err = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap_err();
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    assert!(
        err.to_string().contains("descriptor blocks") && err.to_string().contains("meta_bg"),
        "{err}"
    );
    eprintln!("2 TiB: {err}");
    assert_eq!(format!("{:?}", overlay.extents()), map);
    assert_eq!(overlay.store_units_used(), units);
    drop(overlay);

    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 40 << 21);
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(report.new_clusters, part.sectors / 8);
    let cloned = clone_raw(&mut overlay, dir);
    drop(overlay);
    let grown = extract(dir, &cloned, part.start, part.sectors);
    assert_clean(&grown);
    let (blocks, _) = compare_with_resize2fs(dir, &image, &grown, part.sectors);
    assert_eq!(blocks, part.sectors / 8);
    assert_files(dir, &grown);
}

/// Grows the partition of a filesystem changed by `debugfs -w -R {edit}`
/// (or made with `opts`) and expects a refusal naming `reason`, with the
/// overlay untouched.
fn refused(opts: &str, edit: Option<&str>, reason: &str) {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ext(dir, 64, "ext4", opts);
    if let Some(edit) = edit {
        sh_ok(&format!("debugfs -w -R '{edit}' '{}'", image.display()));
    }
    let disk = disk_with(dir, 66 * MIB, MBR_LAST, &image);
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 300 * 2048);
    let map = format!("{:?}", overlay.extents());
    let units = overlay.store_units_used();
    let err = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap_err();
    assert!(err.to_string().contains(reason), "{err}");
    assert_eq!(format!("{:?}", overlay.extents()), map);
    assert_eq!(overlay.store_units_used(), units);
}

#[test]
fn a_dirty_filesystem_is_refused_and_nothing_is_written() {
    refused("-b 4096", Some("ssv state 0"), "not cleanly unmounted");
}

#[test]
fn a_filesystem_with_errors_is_refused() {
    refused("-b 4096", Some("ssv state 3"), "errors");
}

#[test]
fn a_journal_needing_recovery_is_refused() {
    refused("-b 4096", Some("feature needs_recovery"), "needs recovery");
}

#[test]
fn more_descriptor_blocks_without_resize_inode_are_refused() {
    refused("-b 1024 -O ^resize_inode", None, "descriptor blocks");
}

#[test]
fn an_orphan_list_is_refused() {
    refused("-b 4096", Some("ssv last_orphan 12"), "orphan");
}

#[test]
fn more_than_2_pow_32_blocks_without_64bit_are_refused() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ext(dir, 64, "ext4", "-b 4096 -O ^64bit");
    let disk = disk_with(dir, 66 * MIB, MBR_LAST, &image);
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    // A 16 TiB + 1 GiB partition: 2^32 + 2^18 blocks of 4 KiB. Past 2^32
    // sectors the MBR cannot hold the partition, so the test grows the
    // filesystem as if the partition had been enlarged (the grower reads
    // only the volume).
    let sectors = (1u64 << 35) + (1 << 21);
    let disk_sectors = overlay.sector_count();
    overlay
        .insert(disk_sectors, P1 + sectors - disk_sectors)
        .unwrap();
    let map = format!("{:?}", overlay.extents());
    let err = grow_filesystem(&mut overlay, P1, sectors).unwrap_err();
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    assert!(
        err.to_string().contains("without the 64bit feature"),
        "{err}"
    );
    assert_eq!(format!("{:?}", overlay.extents()), map);
}

#[test]
fn a_descriptor_whose_free_count_differs_from_its_bitmap_is_refused() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // ext2 has no descriptor checksum: the count itself is wrong. 4 KiB
    // blocks: the descriptor table is block 1, group 0's free blocks
    // count the u16 at 0x0C of its descriptor.
    let image = make_ext(dir, 64, "ext2", "-b 4096");
    let mut raw = fs::read(&image).unwrap();
    raw[4096 + 0x0C] ^= 1;
    fs::write(&image, raw).unwrap();
    let disk = disk_with(dir, 66 * MIB, MBR_LAST, &image);
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 300 * 2048);
    let map = format!("{:?}", overlay.extents());
    let err = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap_err();
    assert_eq!(err.kind(), ErrorCode::Corrupt, "{err}");
    assert!(err.to_string().contains("free blocks"), "{err}");
    assert_eq!(format!("{:?}", overlay.extents()), map);
}

#[test]
fn a_tail_too_small_for_a_group_is_left_out_as_resize2fs_does() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // 4 KiB blocks, 32768 per group: 64 MiB is half a group; a partition
    // of one group and 40 blocks would make a second group of 40 blocks,
    // less than its bitmaps and inode table.
    let image = make_ext(dir, 64, "ext4", "-b 4096");
    let sectors = (32768 + 40) * 8;
    let disk = disk_with(
        dir,
        130 * MIB,
        &format!("label: dos\\nstart=2048, size={sectors}, type=83\\n"),
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let report = grow_filesystem(&mut overlay, P1, sectors).unwrap();
    assert_eq!(report.new_clusters, 32768);
    let cloned = clone_raw(&mut overlay, dir);
    let grown = extract(dir, &cloned, P1, sectors);
    assert_clean(&grown);
    let (blocks, _) = compare_with_resize2fs(dir, &image, &grown, sectors);
    assert_eq!(blocks, 32768);
    assert_files(dir, &grown);
}

#[test]
fn ext4_with_sparse_super2_grows() {
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O sparse_super2",
        fs_mib: 64,
        table: MBR_LAST,
        disk_bytes: 66 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn a_dry_run_reports_the_growth_and_writes_nothing() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ext(dir, 64, "ext4", "-b 1024");
    let disk = disk_with(dir, 66 * MIB, MBR_LAST, &image);
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 300 * 2048);
    let map = format!("{:?}", overlay.extents());
    let units = overlay.store_units_used();
    let dry = cowdisk::fs::grow_filesystem_with(
        &mut overlay,
        part.start,
        part.sectors,
        &cowdisk::fs::GrowOptions { dry_run: true },
    )
    .unwrap();
    assert_eq!(format!("{:?}", overlay.extents()), map);
    assert_eq!(overlay.store_units_used(), units);
    let done = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(dry, done);
}

#[test]
fn bigalloc_is_refused() {
    refused("-b 4096 -O bigalloc", None, "bigalloc");
}

#[test]
fn ext4_with_meta_bg_grows_into_new_meta_groups() {
    // 64-byte descriptors, 16 per 1 KiB block: groups 16 and 32 start meta
    // groups (their descriptor block there, copies in 17, 31 and 33).
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O meta_bg,^resize_inode",
        fs_mib: 64,
        table: MBR_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext4_32bit_with_meta_bg_grows() {
    // 32 descriptors per block: group 32 starts the second meta group.
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 1024 -O meta_bg,^resize_inode,^64bit",
        fs_mib: 64,
        table: GPT_AFTER,
        disk_bytes: 72 * MIB,
        new_disk_sectors: 300 * 2048,
    });
}

#[test]
fn ext4_with_descriptor_blocks_reserved_for_it_grows_from_64_mib_to_2_tib() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // -E resize=2^29 reserves descriptor blocks for 2^29 blocks of 4 KiB
    // (2 TiB): 255, with the one in use 256 blocks of 64 descriptors, so
    // the 16384 groups of 2 TiB use every reserved block.
    let image = make_ext(dir, 64, "ext4", "-b 4096 -E resize=536870912");
    let disk = disk_with(
        dir,
        66 * MIB,
        "label: gpt\\nstart=2048, size=131072\\n",
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, (2 << 31) + 4096);
    assert_eq!(part.sectors, 2 << 31, "{part:?}");
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(report.new_clusters, 1 << 29);
    let cloned = clone_raw(&mut overlay, dir);
    drop(overlay);
    let grown = extract(dir, &cloned, part.start, part.sectors);
    assert_clean(&grown);
    let (blocks, _) = compare_with_resize2fs(dir, &image, &grown, part.sectors);
    assert_eq!(blocks, 1 << 29);
    let header = sh_ok(&format!("dumpe2fs -h '{grown}' 2>/dev/null"));
    assert!(!header.contains("Reserved GDT blocks"), "{header}");
    assert_files(dir, &grown);
}

#[test]
fn ext4_with_64_kib_blocks_grows() {
    // mke2fs makes groups of 65528 blocks (4 GiB): 64 MiB grows to 11
    // groups, the last of 16432 blocks.
    grow_case(&Case {
        kind: "ext4",
        opts: "-b 65536",
        fs_mib: 64,
        table: MBR_LAST,
        disk_bytes: 66 * MIB,
        new_disk_sectors: 41 << 21,
    });
}

#[test]
fn ext4_with_meta_bg_grows_from_64_mib_to_2_tib() {
    let dir = support::temp_dir();
    let dir = dir.path();
    // meta_bg needs no reserved descriptor blocks: each meta group of 64
    // groups holds its own descriptor block.
    let image = make_ext(dir, 64, "ext4", "-b 4096 -O meta_bg,^resize_inode");
    let disk = disk_with(
        dir,
        66 * MIB,
        "label: gpt\\nstart=2048, size=131072\\n",
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, (2 << 31) + 4096);
    assert_eq!(part.sectors, 2 << 31, "{part:?}");
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(report.new_clusters, 1 << 29);
    let cloned = clone_raw(&mut overlay, dir);
    drop(overlay);
    let grown = extract(dir, &cloned, part.start, part.sectors);
    assert_clean(&grown);
    let (blocks, _) = compare_with_resize2fs(dir, &image, &grown, part.sectors);
    assert_eq!(blocks, 1 << 29);
    assert_files(dir, &grown);
}
