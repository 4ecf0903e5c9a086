//! Growing FAT12/16/32 through the overlay after `partition::enlarge`,
//! checked with the real tools on a clone, without mounting: `fsck.fat -n`
//! says nothing but its summary, `fsck.fat -v` counts the new partition
//! size as the volume's and the clusters the new layout allows, every file
//! reads back with `mcopy`, the free space grew by about the added space,
//! and a file larger than the old free space can be written and read back.
//! Dirty or inconsistent volumes, and growth that would change the FAT
//! type, are refused with the overlay untouched.

mod support;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cowdisk::clone::{clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::error::ErrorCode;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::fs::{grow_filesystem, FsKind};
use cowdisk::partition::{self, Alignment, EnlargeOptions};
use cowdisk::{Disk, Overlay, OverlayOptions};
use support::{pattern, sh, sh_ok};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const P1: u64 = 2048;

fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(300 * KIB as usize + 7, 1)),
        ("b.bin", pattern(40 * KIB as usize, 2)),
        ("DIR/c.bin", pattern(200 * KIB as usize + 512, 3)),
    ]
}

/// A FAT image of `kib` KiB made by mkfs.fat with `mkfs_args`, holding
/// [`files`].
fn make_fat(dir: &Path, mkfs_args: &str, kib: u64) -> PathBuf {
    let image = dir.join("fs.img");
    sh_ok(&format!(
        "mkfs.fat {mkfs_args} -C '{}' {kib} >/dev/null",
        image.display()
    ));
    sh_ok(&format!("mmd -i '{}' ::/DIR", image.display()));
    for (i, (name, bytes)) in files().into_iter().enumerate() {
        let host = dir.join(format!("in{i}"));
        fs::write(&host, bytes).unwrap();
        sh_ok(&format!(
            "mcopy -i '{}' '{}' ::/{name}",
            image.display(),
            host.display()
        ));
    }
    image
}

/// A disk of `mib` MiB partitioned by sfdisk with `script`, the image
/// placed at sector P1, and partition 2 (if any) filled with a pattern.
fn disk_with(dir: &Path, mib: u64, script: &str, image: &Path) -> PathBuf {
    disk_with_at(dir, mib, script, image, P1)
}

/// [`disk_with`] with the image placed at sector `at` (sparse, so a
/// gigabyte-sized image stays cheap).
fn disk_with_at(dir: &Path, mib: u64, script: &str, image: &Path, at: u64) -> PathBuf {
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(mib * MIB).unwrap();
    sh_ok(&format!(
        "printf '{script}' | sfdisk --quiet '{}'",
        disk.display()
    ));
    support::place_sparse(&disk, at, image);
    disk
}

fn open(path: &Path) -> Box<dyn Disk> {
    open_path(path, &OpenOptions::default()).unwrap()
}

fn clone_raw(disk: &mut dyn Disk, path: &Path) {
    let options = CloneOptions {
        format: CloneFormat::Raw,
        replace: false,
        ..CloneOptions::default()
    };
    clone_to_file(disk, path, &options, &mut no_progress()).unwrap();
}

/// The partition `start..start + sectors` of `disk` as a sparse file.
fn extract(dir: &Path, disk: &dyn Disk, start: u64, sectors: u64, name: &str) -> PathBuf {
    let out = dir.join(name);
    support::extract_sparse(disk, start, sectors, &out);
    out
}

/// What `fsck.fat -n -v` says of a volume.
#[derive(Debug)]
struct Fsck {
    total_sectors: u64,
    fat_sectors: u64,
    cluster_bytes: u64,
    clusters: u64,
    free_clusters: u64,
}

fn fsck_fat(image: &Path) -> Fsck {
    let text = sh_ok(&format!("fsck.fat -n -v '{}'", image.display()));
    let mut f = Fsck {
        total_sectors: 0,
        fat_sectors: 0,
        cluster_bytes: 0,
        clusters: 0,
        free_clusters: 0,
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_suffix(" sectors total") {
            f.total_sectors = n.trim().parse().unwrap();
        }
        if let Some(n) = line.strip_suffix(" bytes per cluster") {
            f.cluster_bytes = n.trim().parse().unwrap();
        }
        // "20480 bytes per FAT (= 40 sectors)"
        if let Some(rest) = line.split_once("bytes per FAT (= ") {
            f.fat_sectors = rest.1.trim_end_matches(" sectors)").parse().unwrap();
        }
        if let Some(counts) = line.strip_suffix(" clusters") {
            let counts = counts.rsplit(' ').next().unwrap();
            let (used, total) = counts.split_once('/').unwrap();
            f.clusters = total.parse().unwrap();
            f.free_clusters = f.clusters - used.parse::<u64>().unwrap();
        }
    }
    f
}

/// `fsck.fat -n` finds nothing: it prints its version and the summary
/// line, no complaint (it exits 0 even for some differences it reports).
fn assert_fsck_clean(image: &Path) {
    let out = sh(&format!("fsck.fat -n '{}'", image.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fsck.fat failed:\n{text}");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "fsck.fat complained:\n{text}");
    assert!(lines[0].starts_with("fsck.fat "), "{text}");
    assert!(lines[1].ends_with(" clusters"), "{text}");
}

fn assert_files_intact(dir: &Path, image: &Path) {
    for (name, bytes) in files() {
        let out = dir.join("out.bin");
        let _ = fs::remove_file(&out);
        sh_ok(&format!(
            "mcopy -i '{}' ::/{name} '{}'",
            image.display(),
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == bytes, "{name} differs");
    }
}

struct Case {
    mkfs: &'static str,
    kib: u64,
    kind: FsKind,
    disk_mib: u64,
    /// The sfdisk script; the grown partition at `fs_at` of `kib` KiB.
    table: &'static str,
    new_mib: u64,
    fat_must_grow: bool,
    /// The partition to grow (1, or 5 for a logical one) and its first
    /// sector.
    number: u32,
    fs_at: u64,
    /// The most bytes the new file may take beyond the old free space
    /// (writing half a terabyte is not the point of the huge cases).
    big_extra_cap: u64,
    /// Fill the volume with a file of zeros but 8 MiB before growing it,
    /// so a modest new file must use the added space.
    fill: bool,
}

const SMALL: Case = Case {
    mkfs: "",
    kib: 0,
    kind: FsKind::Fat16,
    disk_mib: 0,
    table: "",
    new_mib: 0,
    fat_must_grow: true,
    number: 1,
    fs_at: P1,
    big_extra_cap: u64::MAX,
    fill: false,
};

fn grow_case(case: Case) {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_fat(dir, case.mkfs, case.kib);
    if case.fill {
        let free = fsck_fat(&image);
        let host = dir.join("fill.in");
        fs::File::create(&host)
            .unwrap()
            .set_len(free.free_clusters * free.cluster_bytes - 8 * MIB)
            .unwrap();
        sh_ok(&format!(
            "mcopy -i '{}' '{}' ::/FILL.BIN",
            image.display(),
            host.display()
        ));
        fs::remove_file(&host).unwrap();
    }
    let before = fsck_fat(&image);
    let disk = disk_with_at(dir, case.disk_mib, case.table, &image, case.fs_at);
    let others_before: Vec<(u32, Vec<u8>)> = {
        let table = partition::read_table(open(&disk).as_mut(), "disk")
            .unwrap()
            .unwrap();
        let parts = table.partitions();
        let grown = parts.iter().find(|p| p.number == case.number).unwrap();
        assert_eq!(grown.start, case.fs_at);
        parts
            .iter()
            .filter(|p| !p.container && p.number != case.number)
            .map(|p| {
                let bytes = pattern((p.sectors * 512) as usize, 40 + u64::from(p.number));
                poke(&disk, p.start * 512, &bytes);
                (p.number, bytes)
            })
            .collect()
    };
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let enlarged = partition::enlarge(
        &mut overlay,
        &EnlargeOptions {
            new_sectors: case.new_mib * MIB / 512,
            partition: Some(case.number),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap();
    let part = enlarged
        .after
        .iter()
        .find(|p| p.number == case.number)
        .unwrap()
        .clone();
    assert_eq!(part.start, case.fs_at);
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(report.filesystem, case.kind);
    assert_eq!(report.new_sectors, part.sectors);
    let cloned = dir.join("grown.raw");
    clone_raw(&mut overlay, &cloned);
    let fs_img = extract(dir, &overlay, part.start, part.sectors, "part.img");
    // The partition table around it is still sound (sfdisk checks MBR and
    // GPT, both GPT headers and arrays included, and the EBR chain).
    let verify = sh_ok(&format!("sfdisk --verify '{}' 2>&1", cloned.display()));
    assert!(verify.contains("No errors detected"), "{verify}");
    // sfdisk reads the grown partition where it is, at its new size.
    let dump = sh_ok(&format!("sfdisk -d '{}'", cloned.display()));
    let line = format!(
        "grown.raw{} : start={:>12}, size={:>12}",
        case.number, part.start, part.sectors
    );
    assert!(dump.contains(&line), "no {line:?} in\n{dump}");

    assert_fsck_clean(&fs_img);
    let after = fsck_fat(&fs_img);
    eprintln!("before {before:?}\nafter  {after:?}\n{report:?}");
    assert_eq!(after.total_sectors, part.sectors, "{after:?}");
    assert_eq!(after.cluster_bytes, before.cluster_bytes);
    assert_eq!(after.clusters, report.new_clusters);
    if case.fat_must_grow {
        assert!(
            after.fat_sectors > before.fat_sectors,
            "{before:?} {after:?}"
        );
    }
    // The FAT is the smallest that holds every entry, as the spec sizes it.
    let bits = match case.kind {
        FsKind::Fat12 => 12,
        FsKind::Fat16 => 16,
        _ => 32,
    };
    assert_eq!(
        after.fat_sectors,
        ((after.clusters + 2) * bits)
            .div_ceil(8)
            .div_ceil(512)
            .max(before.fat_sectors)
    );
    let added = (part.sectors - before.total_sectors) * 512;
    let fat_growth = (after.fat_sectors - before.fat_sectors) * 2 * 512;
    let gained = (after.free_clusters - before.free_clusters) * after.cluster_bytes;
    assert!(
        gained <= added && gained + fat_growth + after.cluster_bytes >= added,
        "free space grew by {gained} for {added} bytes added: {before:?} {after:?}"
    );
    assert_eq!(
        report.new_free_bytes,
        after.free_clusters * after.cluster_bytes
    );
    assert_files_intact(dir, &fs_img);

    // The other partitions are intact where the table now puts them.
    for (number, bytes) in others_before {
        let p = enlarged.after.iter().find(|p| p.number == number).unwrap();
        assert!(
            support::read_sectors_of(&cloned, p.start, p.sectors) == bytes,
            "partition {number} changed"
        );
    }

    // A file larger than the old free space fits now.
    let big_len = (before.free_clusters * before.cluster_bytes
        + (gained / 2).min(case.big_extra_cap)) as usize;
    let big = pattern(big_len, 9);
    let host = dir.join("big.in");
    fs::write(&host, &big).unwrap();
    sh_ok(&format!(
        "mcopy -i '{}' '{}' ::/big.bin",
        fs_img.display(),
        host.display()
    ));
    assert_fsck_clean(&fs_img);
    let out = dir.join("big.out");
    sh_ok(&format!(
        "mcopy -i '{}' ::/big.bin '{}'",
        fs_img.display(),
        out.display()
    ));
    assert!(fs::read(&out).unwrap() == big);
    assert_files_intact(dir, &fs_img);
}

#[test]
fn fat12_grows_with_its_fat_and_stays_clean() {
    grow_case(Case {
        mkfs: "-F 12 -s 4",
        kib: 2 * 1024,
        kind: FsKind::Fat12,
        disk_mib: 4,
        table: "label: dos\\nstart=2048, size=4096, type=1\\n",
        new_mib: 6,
        fat_must_grow: true,
        ..SMALL
    });
}

#[test]
fn fat16_grows_with_a_partition_after_it() {
    grow_case(Case {
        mkfs: "-F 16",
        kib: 24 * 1024,
        kind: FsKind::Fat16,
        disk_mib: 30,
        table: "label: dos\\nstart=2048, size=49152, type=6\\nstart=53248, size=8192, type=83\\n",
        new_mib: 62,
        fat_must_grow: true,
        ..SMALL
    });
}

#[test]
fn fat32_grows_on_gpt_with_fsinfo_and_backup_boot_sector() {
    grow_case(Case {
        mkfs: "-F 32 -s 1",
        kib: 40 * 1024,
        kind: FsKind::Fat32,
        disk_mib: 42,
        table: "label: gpt\\nstart=2048, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\\n",
        new_mib: 100,
        fat_must_grow: true,
        ..SMALL
    });
}

#[test]
fn fat16_grown_by_one_mib_keeps_its_fat_when_it_is_large_enough() {
    grow_case(Case {
        mkfs: "-F 16",
        kib: 24 * 1024,
        kind: FsKind::Fat16,
        disk_mib: 26,
        table: "label: dos\\nstart=2048, size=49152, type=6\\n",
        new_mib: 27,
        fat_must_grow: false,
        ..SMALL
    });
}

/// A 2.25 GiB FAT32 of 32 KiB clusters (73,000 clusters, just above the
/// FAT32 minimum of 65525), nearly full, grown through the overlay to the
/// largest partition an MBR describes: 2 TiB less the first MiB, 67
/// million clusters and a FAT of 256 MiB per copy inserted without moving
/// a byte. The source is a sparse file, the partition is extracted
/// sparse, and `fsck.fat` reads both FATs whole (half a gigabyte), so
/// this runs in tens of seconds.
#[test]
fn fat32_grows_to_two_tebibytes_on_mbr() {
    grow_case(Case {
        mkfs: "-F 32 -s 64",
        kib: 2304 * 1024,
        kind: FsKind::Fat32,
        disk_mib: 2306,
        table: "label: dos\\nstart=2048, size=4718592, type=c\\n",
        // 2^32 sectors: the partition ends 2048 sectors short of it.
        new_mib: 2 * 1024 * 1024,
        big_extra_cap: 16 * MIB,
        fill: true,
        ..SMALL
    });
}

/// A FAT16 in logical partition 5 of an extended partition, with logical
/// partition 6 after it: the extended partition, partition 5 and the EBR
/// chain grow, partition 6 moves intact.
#[test]
fn fat16_in_a_logical_partition_grows_with_a_logical_partition_after_it() {
    grow_case(Case {
        mkfs: "-F 16",
        kib: 24 * 1024,
        kind: FsKind::Fat16,
        disk_mib: 32,
        table: "label: dos\\nstart=2048, size=61440, type=5\\n\
                start=4096, size=49152, type=6\\nstart=55296, size=8192, type=83\\n",
        new_mib: 70,
        number: 5,
        fs_at: 4096,
        ..SMALL
    });
}

/// The boot sector fields the FAT specification sizes a FAT from.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    reserved: u64,
    fats: u64,
    root_sectors: u64,
    per_cluster: u64,
    fat_sectors: u64,
    total_sectors: u64,
    bits: u64,
}

/// Read by hand from the boot sector (offsets of the FAT specification).
fn geometry(image: &Path, bits: u64) -> Geometry {
    let raw = fs::read(image).unwrap();
    let le16 = |at: usize| u64::from(u16::from_le_bytes([raw[at], raw[at + 1]]));
    let fat16 = le16(0x16);
    Geometry {
        reserved: le16(0x0E),
        fats: u64::from(raw[0x10]),
        root_sectors: (le16(0x11) * 32).div_ceil(512),
        per_cluster: u64::from(raw[0x0D]),
        fat_sectors: if fat16 != 0 {
            fat16
        } else {
            u64::from(u32::from_le_bytes(raw[0x24..0x28].try_into().unwrap()))
        },
        total_sectors: match le16(0x13) {
            0 => u64::from(u32::from_le_bytes(raw[0x20..0x24].try_into().unwrap())),
            n => n,
        },
        bits,
    }
}

impl Geometry {
    /// Clusters of a volume of `total` sectors with FATs of `fat` sectors.
    fn clusters(&self, total: u64, fat: u64) -> u64 {
        (total - self.reserved - self.fats * fat - self.root_sectors) / self.per_cluster
    }

    /// True when a FAT of `fat` sectors holds an entry for every cluster
    /// (and the two reserved entries).
    fn holds(&self, total: u64, fat: u64) -> bool {
        (self.clusters(total, fat) + 2) * self.bits <= fat * 512 * 8
    }

    /// The smallest FAT, not smaller than the volume's, that holds every
    /// entry of a volume of `total` sectors: tried one sector at a time.
    fn fat_for(&self, total: u64) -> u64 {
        (self.fat_sectors..)
            .find(|&fat| self.holds(total, fat))
            .unwrap()
    }

    /// The smallest size above `from` whose FAT needs more than `fat`
    /// sectors, tried one sector at a time.
    fn boundary_above(&self, from: u64, fat: u64) -> u64 {
        (from..).find(|&total| self.fat_for(total) > fat).unwrap()
    }
}

/// Grows the volume of partition 1 of `disk` to `total` sectors inside a
/// partition enlarged to `new_mib`, and checks it with fsck.fat; returns
/// what fsck.fat says.
fn grow_to(dir: &Path, disk: &Path, new_mib: u64, total: u64) -> Fsck {
    let mut overlay = Overlay::new(open(disk), OverlayOptions::default()).unwrap();
    let part = enlarge_to(&mut overlay, new_mib);
    assert!(total <= part.sectors);
    let report = grow_filesystem(&mut overlay, part.start, total).unwrap();
    let fs_img = extract(dir, &overlay, part.start, total, "part.img");
    assert_fsck_clean(&fs_img);
    let after = fsck_fat(&fs_img);
    assert_eq!(after.total_sectors, total, "{after:?}");
    assert_eq!(after.clusters, report.new_clusters, "{after:?}");
    assert_files_intact(dir, &fs_img);
    after
}

/// Grows to the sizes just below and at two FAT-size boundaries found
/// with the specification's formula, one sector at a time: the first size
/// whose clusters no longer fit the volume's FAT, and the first whose
/// clusters no longer fit one sector more.
fn fat_size_boundaries(mkfs: &str, kib: u64, bits: u64, table: &str, disk_mib: u64) {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_fat(dir, mkfs, kib);
    let g = geometry(&image, bits);
    let first = g.boundary_above(g.total_sectors, g.fat_sectors);
    let second = g.boundary_above(first, g.fat_sectors + 1);
    let disk = disk_with(dir, disk_mib, table, &image);
    let new_mib = (P1 + second).div_ceil(2048) + 1;
    for (n, fat_below) in [(first, g.fat_sectors), (second, g.fat_sectors + 1)] {
        // At n - 1 the FAT of `fat_below` sectors holds every cluster; at
        // n, with as many FAT sectors, one cluster more would not fit, and
        // one more FAT sector is needed.
        assert!(g.holds(n - 1, fat_below));
        assert!(!g.holds(n, fat_below));
        assert!(g.holds(n, fat_below + 1));
        let below = grow_to(dir, &disk, new_mib, n - 1);
        let at = grow_to(dir, &disk, new_mib, n);
        eprintln!("{mkfs}: {} sectors: {below:?}\n{n} sectors: {at:?}", n - 1);
        assert_eq!(below.fat_sectors, fat_below, "{below:?}");
        assert_eq!(at.fat_sectors, fat_below + 1, "{at:?}");
        assert_eq!(below.clusters, g.clusters(n - 1, fat_below));
        assert_eq!(at.clusters, g.clusters(n, fat_below + 1));
    }
}

#[test]
fn fat16_grows_to_just_below_and_at_fat_size_boundaries() {
    fat_size_boundaries(
        "-F 16",
        24 * 1024,
        16,
        "label: dos\\nstart=2048, size=49152, type=6\\n",
        26,
    );
}

#[test]
fn fat32_grows_to_just_below_and_at_fat_size_boundaries() {
    fat_size_boundaries(
        "-F 32 -s 1",
        40 * 1024,
        32,
        "label: dos\\nstart=2048, size=81920, type=c\\n",
        42,
    );
}

/// FAT16's type limit: 512-byte clusters, so 65524 clusters (the most
/// FAT16 has) are about 32 MiB; one sector more is refused.
#[test]
fn fat16_grows_to_exactly_65524_clusters_the_largest_size_it_names() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_fat(dir, "-F 16 -s 1", 16 * 1024);
    let disk = disk_with(
        dir,
        18,
        "label: dos\\nstart=2048, size=32768, type=6\\n",
        &image,
    );
    let err = refused(&disk, 40);
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    let text = err.to_string();
    assert!(text.contains("FAT16") && text.contains("65525"), "{text}");
    let max: u64 = text
        .rsplit("grow to at most ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {text}"));
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge_to(&mut overlay, 40);
    assert!(max < part.sectors);
    assert_eq!(
        grow_filesystem(&mut overlay, part.start, max + 1)
            .unwrap_err()
            .kind(),
        ErrorCode::Unsupported
    );
    let after = grow_to(dir, &disk, 40, max);
    // fsck.fat counts 65524 clusters: the most FAT16 can have.
    assert_eq!(after.clusters, 65524, "{after:?}");
}

/// Enlarges `disk` to `new_mib` and asks to grow partition 1's filesystem;
/// returns the error and checks the grow call left the overlay as the
/// enlargement did.
fn refused(disk: &Path, new_mib: u64) -> cowdisk::Error {
    let mut overlay = Overlay::new(open(disk), OverlayOptions::default()).unwrap();
    let enlarged = partition::enlarge(
        &mut overlay,
        &EnlargeOptions {
            new_sectors: new_mib * MIB / 512,
            partition: Some(1),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap();
    let part = enlarged
        .after
        .iter()
        .find(|p| p.number == 1)
        .unwrap()
        .clone();
    let map = format!("{:?}", overlay.extents());
    let units = overlay.store_units_used();
    let mut before = vec![0u8; (part.sectors * 512) as usize];
    overlay.read_sectors(part.start, &mut before).unwrap();
    let err = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap_err();
    assert_eq!(format!("{:?}", overlay.extents()), map);
    assert_eq!(overlay.store_units_used(), units);
    let mut after = vec![0u8; before.len()];
    overlay.read_sectors(part.start, &mut after).unwrap();
    assert!(after == before, "the refused grow changed the partition");
    err
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn dirty_fat16_is_refused_and_nothing_is_written() {
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), "-F 16", 24 * 1024);
    // Linux's dirty bit: byte 0x25 of the FAT16 boot sector.
    poke(&image, 0x25, &[1]);
    let disk = disk_with(
        dir.path(),
        26,
        "label: dos\\nstart=2048, size=49152, type=6\\n",
        &image,
    );
    let err = refused(&disk, 40);
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    assert!(err.to_string().contains("dirty"), "{err}");
}

#[test]
fn fat32_with_clean_bit_clear_is_refused_and_nothing_is_written() {
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), "-F 32 -s 1", 40 * 1024);
    let fsck = fsck_fat(&image);
    // Entry 1 of both FATs: clear bit 27 (clean shutdown).
    let raw = fs::read(&image).unwrap();
    let reserved = u64::from(u16::from_le_bytes(raw[14..16].try_into().unwrap()));
    for copy in 0..2 {
        let at = (reserved + copy * fsck.fat_sectors) * 512 + 4 + 3;
        poke(&image, at, &[raw[at as usize] & !0x08]);
    }
    let disk = disk_with(
        dir.path(),
        42,
        "label: dos\\nstart=2048, size=81920, type=c\\n",
        &image,
    );
    let err = refused(&disk, 60);
    assert!(err.to_string().contains("clean-shutdown"), "{err}");
}

#[test]
fn fat_copies_that_differ_are_refused_and_nothing_is_written() {
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), "-F 16", 24 * 1024);
    let fsck = fsck_fat(&image);
    // Mark a free cluster used in the second FAT only.
    let second = (4 + fsck.fat_sectors) * 512;
    poke(&image, second + 2 * (fsck.clusters), &[0xFF, 0xFF]);
    let disk = disk_with(
        dir.path(),
        26,
        "label: dos\\nstart=2048, size=49152, type=6\\n",
        &image,
    );
    let err = refused(&disk, 40);
    assert_eq!(err.kind(), ErrorCode::Corrupt, "{err}");
    assert!(err.to_string().contains("differs"), "{err}");
}

#[test]
fn fat12_growth_past_4084_clusters_is_refused_and_nothing_is_written() {
    let dir = support::temp_dir();
    let image = make_fat(dir.path(), "-F 12 -s 1", 1024);
    let disk = disk_with(
        dir.path(),
        2,
        "label: dos\\nstart=2048, size=2048, type=1\\n",
        &image,
    );
    // 512-byte clusters: 5 MiB would be ~10000 clusters.
    let err = refused(&disk, 6);
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    let text = err.to_string();
    assert!(text.contains("FAT12") && text.contains("4085"), "{text}");
}

#[test]
fn fat12_grows_to_exactly_4084_clusters_the_largest_size_it_names() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_fat(dir, "-F 12 -s 1", 1024);
    let disk = disk_with(
        dir,
        2,
        "label: dos\\nstart=2048, size=2048, type=1\\n",
        &image,
    );
    // The refusal names the largest size that keeps FAT12.
    let err = refused(&disk, 6);
    let text = err.to_string();
    let max: u64 = text
        .rsplit("grow to at most ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {text}"));
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge_to(&mut overlay, 6);
    assert!(max < part.sectors);
    assert_eq!(
        grow_filesystem(&mut overlay, part.start, max + 1)
            .unwrap_err()
            .kind(),
        ErrorCode::Unsupported
    );
    let report = grow_filesystem(&mut overlay, part.start, max).unwrap();
    assert_eq!(report.new_clusters, 4084);
    let cloned = dir.join("grown.raw");
    clone_raw(&mut overlay, &cloned);
    let fs_img = extract(dir, &overlay, part.start, max, "part.img");
    assert_fsck_clean(&fs_img);
    let after = fsck_fat(&fs_img);
    // fsck.fat counts 4084 clusters: the most FAT12 can have.
    assert_eq!(after.clusters, 4084, "{after:?}");
    assert_eq!(after.total_sectors, max);
    assert_files_intact(dir, &fs_img);
}

fn enlarge_to(overlay: &mut Overlay, new_mib: u64) -> cowdisk::partition::Partition {
    partition::enlarge(
        overlay,
        &EnlargeOptions {
            new_sectors: new_mib * MIB / 512,
            partition: Some(1),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap()
    .after
    .into_iter()
    .find(|p| p.number == 1)
    .unwrap()
}
