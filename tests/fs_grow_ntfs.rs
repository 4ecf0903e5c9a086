//! Growing NTFS through the overlay after `partition::enlarge`, checked
//! with the ntfs-3g tools on a clone, without mounting: `ntfsfix -n` and
//! `ntfsresize --info` (which checks the cluster accounting against
//! `$Bitmap`) are clean, `ntfsinfo -m` counts the clusters of the whole
//! partition but its last sector (as mkntfs and ntfsresize size a volume),
//! the backup boot sector is the partition's last sector, every file reads
//! back with `ntfscat`, the free clusters (`ntfscluster -i`) equal those
//! of the same volume grown by `ntfsresize`, and a file larger than the old
//! free space can be written with `ntfscp`. A dirty volume is refused with
//! the overlay untouched.

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

fn sh_ok(script: &str) -> String {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(900 * KIB as usize + 7, 1)),
        ("b.bin", pattern(3000, 2)),
        ("c.bin", pattern(2 * MIB as usize + 512, 3)),
    ]
}

/// An NTFS image of `mib` MiB (whole partition) made by mkntfs, holding
/// [`files`].
fn make_ntfs(dir: &Path, mib: u64, cluster: u64) -> PathBuf {
    let image = dir.join("fs.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    sh_ok(&format!(
        "mkntfs -q -F -Q -c {cluster} '{}'",
        image.display()
    ));
    for (i, (name, bytes)) in files().into_iter().enumerate() {
        let host = dir.join(format!("in{i}"));
        fs::write(&host, bytes).unwrap();
        sh_ok(&format!(
            "ntfscp -f '{}' '{}' {name}",
            image.display(),
            host.display()
        ));
    }
    image
}

fn disk_with(dir: &Path, mib: u64, script: &str, image: &Path) -> PathBuf {
    disk_with_at(dir, mib, script, image, P1)
}

/// [`disk_with`] with the image placed at sector `at`.
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

/// The partition `start..start + sectors` of `disk` as a sparse file.
fn extract(dir: &Path, disk: &dyn Disk, start: u64, sectors: u64, name: &str) -> PathBuf {
    let out = dir.join(name);
    support::extract_sparse(disk, start, sectors, &out);
    out
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        .trim_start_matches([' ', ':', '\t'])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// (clusters, free clusters, bytes per cluster) by ntfsinfo and ntfscluster.
fn counts(image: &Path) -> (u64, u64, u64) {
    let info = sh_ok(&format!("ntfsinfo -m '{}'", image.display()));
    let clusters = field(&info, "Volume Size in Clusters");
    let cl = sh_ok(&format!("ntfscluster -i '{}'", image.display()));
    (
        clusters,
        field(&cl, "clusters of free space"),
        field(&cl, "bytes per cluster"),
    )
}

fn assert_clean(image: &Path) {
    let fix = sh_ok(&format!("ntfsfix -n '{}'", image.display()));
    assert!(
        fix.contains("Checking the alternate boot sector... OK")
            && fix.contains("processed successfully"),
        "{fix}"
    );
    let check = sh_ok(&format!("ntfsresize -i -f -P '{}'", image.display()));
    assert!(
        check.contains("Accounting clusters") && !check.to_lowercase().contains("error"),
        "{check}"
    );
}

fn assert_files(dir: &Path, image: &Path) {
    for (name, bytes) in files() {
        let out = dir.join("out.bin");
        sh_ok(&format!(
            "ntfscat '{}' {name} > '{}'",
            image.display(),
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == bytes, "{name} differs");
    }
}

fn enlarge(overlay: &mut Overlay, new_mib: u64) -> Partition {
    let report = partition::enlarge(
        overlay,
        &EnlargeOptions {
            new_sectors: new_mib * MIB / 512,
            partition: Some(1),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap();
    report.after.into_iter().find(|p| p.number == 1).unwrap()
}

fn grow_case(fs_mib: u64, cluster: u64, disk_mib: u64, table: &str, new_mib: u64) {
    grow_case_at(fs_mib, cluster, disk_mib, table, new_mib, 1, P1);
}

/// Grows the volume made in partition `number` (at sector `at`) after the
/// disk is enlarged to `new_mib`.
fn grow_case_at(
    fs_mib: u64,
    cluster: u64,
    disk_mib: u64,
    table: &str,
    new_mib: u64,
    number: u32,
    at: u64,
) {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ntfs(dir, fs_mib, cluster);
    let (old_clusters, old_free, _) = counts(&image);
    let disk = disk_with_at(dir, disk_mib, table, &image, at);
    // The other data partitions hold a pattern, to find it where they move.
    let others: Vec<(u32, Vec<u8>)> = partition::read_table(open(&disk).as_mut(), "disk")
        .unwrap()
        .unwrap()
        .partitions()
        .iter()
        .filter(|p| !p.container && p.number != number)
        .map(|p| {
            let bytes = pattern((p.sectors * 512) as usize, 40 + u64::from(p.number));
            let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
            f.seek(SeekFrom::Start(p.start * 512)).unwrap();
            f.write_all(&bytes).unwrap();
            (p.number, bytes)
        })
        .collect();
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let enlarged = partition::enlarge(
        &mut overlay,
        &EnlargeOptions {
            new_sectors: new_mib * MIB / 512,
            partition: Some(number),
            alignment: Alignment::MiB,
        },
        "disk",
    )
    .unwrap();
    let part = enlarged
        .after
        .iter()
        .find(|p| p.number == number)
        .unwrap()
        .clone();
    assert_eq!(part.start, at);
    let report = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap();
    assert_eq!(report.filesystem, FsKind::Ntfs);
    let cloned = dir.join("grown.raw");
    clone_to_file(
        &mut overlay,
        &cloned,
        &CloneOptions {
            format: CloneFormat::Raw,
            replace: false,
            ..CloneOptions::default()
        },
        &mut no_progress(),
    )
    .unwrap();
    let grown = extract(dir, &overlay, part.start, part.sectors, "part.img");
    // The partition table around it is still sound (sfdisk checks MBR and
    // GPT, both GPT headers and arrays included, and the EBR chain).
    let verify = sh_ok(&format!("sfdisk --verify '{}' 2>&1", cloned.display()));
    assert!(verify.contains("No errors detected"), "{verify}");
    let dump = sh_ok(&format!("sfdisk -d '{}'", cloned.display()));
    let line = format!(
        "grown.raw{number} : start={:>12}, size={:>12}",
        part.start, part.sectors
    );
    assert!(dump.contains(&line), "no {line:?} in\n{dump}");
    for (n, bytes) in others {
        let p = enlarged.after.iter().find(|p| p.number == n).unwrap();
        assert!(
            support::read_sectors_of(&cloned, p.start, p.sectors) == bytes,
            "partition {n} changed"
        );
    }
    assert_clean(&grown);
    let (clusters, free, cb) = counts(&grown);
    assert_eq!(clusters, (part.sectors - 1) * 512 / cb);
    assert_eq!(report.new_clusters, clusters);
    assert_eq!(report.new_free_bytes, free * cb);
    assert!(
        support::read_sectors_of(&grown, part.sectors - 1, 1)
            == support::read_sectors_of(&grown, 0, 1),
        "the backup boot sector is not the partition's last sector"
    );
    assert_files(dir, &grown);

    // The reference: ntfsresize grows a copy of the original volume to the
    // same partition size.
    let reference = dir.join("reference.img");
    fs::copy(&image, &reference).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&reference)
        .unwrap()
        .set_len(part.sectors * 512)
        .unwrap();
    // ntfsresize schedules a chkdsk (sets the dirty flag); ntfsfix -d
    // clears it so the other tools open the volume.
    sh_ok(&format!("ntfsresize -f -P '{}'", reference.display()));
    sh_ok(&format!("ntfsfix -d '{}'", reference.display()));
    let (ref_clusters, ref_free, _) = counts(&reference);
    eprintln!(
        "partition of {} sectors: cowdisk: {clusters} clusters, {free} free; ntfsresize: \
         {ref_clusters} clusters, {ref_free} free; before: {old_clusters} clusters, \
         {old_free} free",
        part.sectors
    );
    assert_eq!(clusters, ref_clusters);
    assert_eq!(free, ref_free);
    // Every added cluster is free but those the larger $Bitmap takes (one
    // bit per cluster, in whole 8-byte words, in whole clusters).
    let bitmap_clusters = |n: u64| (n.div_ceil(8).div_ceil(8) * 8).div_ceil(cb);
    assert_eq!(
        free,
        old_free + (clusters - old_clusters)
            - (bitmap_clusters(clusters) - bitmap_clusters(old_clusters))
    );

    // A file larger than the old free space fits now (at most 16 MiB
    // larger: writing a terabyte is not the point of the huge case).
    let extra = ((free - old_free) / 2).min(16 * MIB / cb);
    let big = pattern(((old_free + extra) * cb) as usize, 9);
    let host = dir.join("big.in");
    fs::write(&host, &big).unwrap();
    sh_ok(&format!(
        "ntfscp -f '{}' '{}' big.bin",
        grown.display(),
        host.display()
    ));
    let out = dir.join("big.out");
    sh_ok(&format!(
        "ntfscat '{}' big.bin > '{}'",
        grown.display(),
        out.display()
    ));
    assert!(fs::read(&out).unwrap() == big);
    assert_clean(&grown);
    assert_files(dir, &grown);
}

/// A 64 MiB volume grown to a 2 TiB partition (2^32 sectors, on GPT: an
/// MBR stops one sector short): 536,870,911 clusters of 4 KiB, a $Bitmap
/// of 64 MiB. Everything is sparse, and the tools read the bitmap, not
/// the volume, so this takes seconds.
#[test]
fn ntfs_grows_from_64_mib_to_two_tebibytes_on_gpt() {
    // The partition grows by 2 TiB - 64 MiB (a whole number of MiB).
    let new_mib = 66 + 2 * 1024 * 1024 - 64;
    grow_case(
        64,
        4096,
        66,
        "label: gpt\\nstart=2048, size=131072, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\\n",
        new_mib,
    );
}

/// NTFS in logical partition 5 with logical partition 6 after it (which
/// moves intact), inside an extended partition that is not the last.
#[test]
fn ntfs_in_a_logical_partition_grows_with_partitions_after_it() {
    grow_case_at(
        24,
        4096,
        40,
        "label: dos\\nstart=2048, size=61440, type=5\\nstart=63488, size=8192, type=83\\n\
         start=4096, size=49152, type=7\\nstart=55296, size=8192, type=83\\n",
        72,
        5,
        4096,
    );
}

/// NTFS in logical partition 5, the last of the extended partition.
#[test]
fn ntfs_in_a_logical_partition_grows() {
    grow_case_at(
        24,
        4096,
        28,
        "label: dos\\nstart=2048, size=53248, type=5\\nstart=4096, size=49152, type=7\\n",
        60,
        5,
        4096,
    );
}

#[test]
fn ntfs_grows_within_its_bitmap_cluster() {
    grow_case(
        24,
        4096,
        26,
        "label: dos\\nstart=2048, size=49152, type=7\\n",
        40,
    );
}

#[test]
fn ntfs_grows_its_bitmap_with_a_partition_after_it_on_gpt() {
    // 512-byte clusters: the bitmap of 24 MiB is 6 KiB, of 200 MiB 50 KiB.
    grow_case(
        24,
        512,
        30,
        "label: gpt\\nstart=2048, size=49152, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\\n\
         start=53248, size=4096\\n",
        202,
    );
}

#[test]
fn dirty_ntfs_is_refused_and_nothing_is_written() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ntfs(dir, 24, 4096);
    set_dirty(&image);
    let disk = disk_with(
        dir,
        26,
        "label: dos\\nstart=2048, size=49152, type=7\\n",
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let part = enlarge(&mut overlay, 40);
    let map = format!("{:?}", overlay.extents());
    let units = overlay.store_units_used();
    let err = grow_filesystem(&mut overlay, part.start, part.sectors).unwrap_err();
    assert_eq!(err.kind(), ErrorCode::Unsupported, "{err}");
    assert!(err.to_string().contains("dirty"), "{err}");
    assert_eq!(format!("{:?}", overlay.extents()), map);
    assert_eq!(overlay.store_units_used(), units);
}

/// Sets the dirty flag of `$Volume` (record 3) in the MFT, by the
/// documented layout: the MFT's cluster at 0x30 of the boot sector, the
/// record size at 0x40, attributes from the offset at 0x14, and
/// `$VOLUME_INFORMATION` (0x70) whose value has the flags at 0x0A.
fn set_dirty(image: &Path) {
    let mut raw = fs::read(image).unwrap();
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let cluster = le16(&raw, 0x0B) * raw[0x0D] as usize;
    let mft = u64::from_le_bytes(raw[0x30..0x38].try_into().unwrap()) as usize * cluster;
    let per = raw[0x40] as i8;
    let record = if per < 0 {
        1 << -per
    } else {
        per as usize * cluster
    };
    let rec = mft + 3 * record;
    let mut at = rec + le16(&raw, rec + 0x14);
    loop {
        let kind = le32(&raw, at);
        assert_ne!(kind, 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        if kind == 0x70 {
            let flags = at + le16(&raw, at + 0x14) + 0x0A;
            assert_ne!((flags - rec) % 512, 510, "flags under a fixup");
            raw[flags] |= 1;
            break;
        }
        at += le32(&raw, at + 4);
    }
    fs::write(image, raw).unwrap();
}

#[test]
fn ntfs_grows_by_a_single_cluster() {
    let dir = support::temp_dir();
    let dir = dir.path();
    let image = make_ntfs(dir, 24, 4096);
    let (old_clusters, old_free, cb) = counts(&image);
    // The partition holds the 24 MiB volume and 8 sectors more: with the
    // last sector kept for the backup boot sector, one more cluster.
    let part_sectors = 24 * MIB / 512 + 8;
    let disk = disk_with(
        dir,
        26,
        &format!("label: dos\\nstart=2048, size={part_sectors}, type=7\\n"),
        &image,
    );
    let mut overlay = Overlay::new(open(&disk), OverlayOptions::default()).unwrap();
    let report = grow_filesystem(&mut overlay, P1, part_sectors).unwrap();
    assert_eq!(report.new_clusters, old_clusters + 1);
    let cloned = dir.join("grown.raw");
    clone_to_file(
        &mut overlay,
        &cloned,
        &CloneOptions {
            format: CloneFormat::Raw,
            replace: false,
            ..CloneOptions::default()
        },
        &mut no_progress(),
    )
    .unwrap();
    let grown = extract(dir, &overlay, P1, part_sectors, "part.img");
    assert_clean(&grown);
    let (clusters, free, _) = counts(&grown);
    assert_eq!(clusters, (part_sectors - 1) * 512 / cb);
    assert_eq!(clusters, old_clusters + 1);
    assert_eq!(free, old_free + 1);
    assert_files(dir, &grown);
}
