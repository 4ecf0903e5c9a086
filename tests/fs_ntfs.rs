//! NTFS free space against a real volume made by mkntfs and filled by
//! ntfs-3g's offline tools (ntfscp; ntfstruncate frees a file's clusters,
//! leaving its bytes on disk), without mounting. Oracles: ntfscluster's
//! free count, and after a compact clone ntfsfix -n clean, every file read
//! back identically with ntfscat, the freed bytes gone; a volume marked
//! dirty is kept whole.

mod support;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cowdisk::clone::{allocated_bytes, clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::fs::{FilesystemView, FsKind, Report};
use support::{pattern, sh_ok as sh};

const MIB: u64 = 1 << 20;
const P1: u64 = 2048;
const PART_SECTORS: u64 = 64 * 2048;
const MARKER: &[u8] = b"--cowdisk freed NTFS file marker--";

fn kept_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(3 * MIB as usize, 11)),
        ("b.bin", pattern(700 * 1024 + 13, 12)),
        ("c.bin", pattern(5 * MIB as usize + 4096, 13)),
    ]
}

/// A 64 MiB NTFS volume with the kept files and a 6 MiB `gone.bin` whose
/// clusters were freed by `ntfstruncate` (its bytes stay on disk).
fn make_ntfs(dir: &Path) -> PathBuf {
    let image = dir.join("fs.img");
    fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    sh(&format!(
        "mkntfs -q -F -f '{}' 2>/dev/null",
        image.display()
    ));
    for (name, bytes) in kept_files() {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        sh(&format!(
            "ntfscp -q '{}' '{}' {name}",
            image.display(),
            path.display()
        ));
    }
    let gone = dir.join("gone.bin");
    let bytes: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(6 * MIB as usize)
        .collect();
    fs::write(&gone, bytes).unwrap();
    sh(&format!(
        "ntfscp -q '{}' '{}' gone.bin",
        image.display(),
        gone.display()
    ));
    let inode = sh(&format!("ntfsls -i '{}'", image.display()))
        .lines()
        .find(|l| l.ends_with("gone.bin"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap();
    sh(&format!(
        "ntfstruncate '{}' {inode} 0x80 0 >/dev/null 2>&1",
        image.display()
    ));
    image
}

/// "bytes of free space" as `ntfscluster -i` counts it.
fn ntfscluster_free(image: &Path) -> u64 {
    sh(&format!("ntfscluster -i '{}' 2>/dev/null", image.display()))
        .lines()
        .find_map(|l| l.strip_prefix("bytes of free space"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn disk_with(dir: &Path, image: &Path) -> PathBuf {
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(72 * MIB).unwrap();
    sh(&format!(
        "printf 'label: dos\\nstart={P1}, size={PART_SECTORS}, type=7\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(P1 * 512)).unwrap();
    f.write_all(&fs::read(image).unwrap()).unwrap();
    disk
}

fn clones(dir: &Path, disk: &Path) -> (PathBuf, PathBuf, Report) {
    let options = CloneOptions {
        format: CloneFormat::Raw,
        replace: false,
        ..CloneOptions::default()
    };
    let plain = dir.join("plain.raw");
    let compact = dir.join("compact.raw");
    let mut d = open_path(disk, &OpenOptions::default()).unwrap();
    clone_to_file(d.as_mut(), &plain, &options, &mut no_progress()).unwrap();
    let d = open_path(disk, &OpenOptions::default()).unwrap();
    let (mut view, report) = FilesystemView::new(d).unwrap();
    clone_to_file(&mut view, &compact, &options, &mut no_progress()).unwrap();
    (plain, compact, report)
}

/// The 1 MiB pages of `image` with a non-zero 4 KiB block that is not a
/// stretch of the marker stream.
fn pages_without_marker_clusters(image: &[u8]) -> u64 {
    // Some phase of the marker stream gives every byte.
    let is_marker = |block: &[u8]| {
        (0..MARKER.len()).any(|phase| {
            block
                .iter()
                .enumerate()
                .all(|(i, &b)| b == MARKER[(phase + i) % MARKER.len()])
        })
    };
    image
        .chunks(MIB as usize)
        .filter(|page| {
            page.chunks(4096)
                .any(|block| block.iter().any(|&b| b != 0) && !is_marker(block))
        })
        .count() as u64
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn extract(dir: &Path, image: &Path) -> PathBuf {
    let bytes = fs::read(image).unwrap();
    let out = dir.join("part.img");
    fs::write(
        &out,
        &bytes[(P1 * 512) as usize..((P1 + PART_SECTORS) * 512) as usize],
    )
    .unwrap();
    out
}

#[test]
fn ntfs_free_clusters_are_left_out_and_files_survive() {
    let dir = support::temp_dir();
    let image = make_ntfs(dir.path());
    let tool_free = ntfscluster_free(&image);
    let disk = disk_with(dir.path(), &image);
    let (plain, compact, report) = clones(dir.path(), &disk);
    let part = &report.regions[0];
    assert_eq!(part.number, 1);
    assert_eq!(part.filesystem, FsKind::Ntfs, "{report:#?}");
    assert_eq!(part.reason, None, "{report:#?}");
    assert_eq!(
        part.free_sectors * 512,
        tool_free,
        "ntfscluster: {tool_free} free"
    );
    let cloned = extract(dir.path(), &compact);
    sh(&format!("ntfsfix -n '{}'", cloned.display()));
    for (name, bytes) in kept_files() {
        let out = dir.path().join(format!("out-{name}"));
        sh(&format!(
            "ntfscat '{}' {name} > '{}'",
            cloned.display(),
            out.display()
        ));
        assert!(
            fs::read(&out).unwrap() == bytes,
            "{name} differs after the compact clone"
        );
    }
    assert!(!contains(&fs::read(&compact).unwrap(), MARKER));
    assert!(
        contains(&fs::read(&plain).unwrap(), MARKER),
        "the test's premise"
    );
    let (p, c) = (
        allocated_bytes(&plain).unwrap(),
        allocated_bytes(&compact).unwrap(),
    );
    assert!(c + 5 * MIB <= p, "compact {c} vs plain {p}");
    // Exactly the 1 MiB pages of the plain clone that hold data other
    // than the freed file: a 4 KiB cluster made only of the marker stream
    // is the freed file's (the fresh volume's other free clusters are
    // zeros), so the compact clone must store every other non-zero page
    // and nothing else.
    let expected = pages_without_marker_clusters(&fs::read(&plain).unwrap());
    let stored = fs::read(&compact)
        .unwrap()
        .chunks(MIB as usize)
        .filter(|page| page.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(
        stored, expected,
        "pages with data; used by ntfscluster {tool_free}"
    );
}

/// Sets the dirty bit of `$VOLUME_INFORMATION` in `$Volume` (MFT record
/// 3), located by hand from the format: boot sector fields, the record's
/// attribute list, the value offset; the flag is value byte 0x0A. The
/// same byte of the record's copy in `$MFTMirr` (cluster at 0x38) too, as
/// the tools compare the two.
fn mark_dirty(image: &Path) {
    let mut b = fs::read(image).unwrap();
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let cluster = u16_at(&b, 0x0B) * b[0x0D] as usize;
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) as usize * cluster;
    let record = mft + 3 * 1024;
    assert_eq!(&b[record..record + 4], b"FILE");
    let mut at = record + u16_at(&b, record + 0x14);
    while u32_at(&b, at) != 0x70 {
        assert_ne!(u32_at(&b, at), 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        at += u32_at(&b, at + 4) as usize;
    }
    let flags = at + u16_at(&b, at + 0x14) + 0x0A;
    // Not the last two bytes of a sector (those hold the fixup).
    assert!(flags % 512 < 510);
    b[flags] |= 1;
    let mirror = u64::from_le_bytes(b[0x38..0x40].try_into().unwrap()) as usize * cluster;
    b[flags - mft + mirror] |= 1;
    fs::write(image, b).unwrap();
}

#[test]
fn ntfs_marked_dirty_is_kept_whole() {
    let dir = support::temp_dir();
    let image = make_ntfs(dir.path());
    mark_dirty(&image);
    let info = sh(&format!("ntfsinfo -m '{}' 2>&1 || true", image.display()));
    // ntfs-3g agrees: it refuses the volume as scheduled for a check.
    assert!(info.contains("scheduled for check"), "{info}");
    let disk = disk_with(dir.path(), &image);
    let (plain, compact, report) = clones(dir.path(), &disk);
    let part = &report.regions[0];
    assert_eq!(part.filesystem, FsKind::Ntfs);
    assert_eq!(part.free_sectors, 0);
    assert!(
        part.reason.as_deref().unwrap_or("").contains("dirty"),
        "{report:#?}"
    );
    let (a, b) = (fs::read(&plain).unwrap(), fs::read(&compact).unwrap());
    let range = (P1 * 512) as usize..((P1 + PART_SECTORS) * 512) as usize;
    assert!(
        a[range.clone()] == b[range],
        "the dirty volume's bytes differ"
    );
}

/// Writes a `$LogFile` restart page (as Windows leaves it when it did not
/// shut down cleanly, or hibernated) over the start of the log: built by
/// hand from the format (`RSTR`, update sequence array at 0x1E with 9
/// entries for a 4096-byte page, the restart area at 0x30 with a client in
/// use and without the clean flag). The log's first cluster is found from
/// `$LogFile`'s (MFT record 2) first data run.
fn make_log_unclean(image: &Path) {
    let mut b = fs::read(image).unwrap();
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let cluster = u16_at(&b, 0x0B) * b[0x0D] as usize;
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) as usize * cluster;
    let record = mft + 2 * 1024;
    let mut at = record + u16_at(&b, record + 0x14);
    while u32_at(&b, at) != 0x80 {
        at += u32_at(&b, at + 4) as usize;
    }
    let runs = at + u16_at(&b, at + 0x20);
    let (len_bytes, off_bytes) = ((b[runs] & 15) as usize, (b[runs] >> 4) as usize);
    let mut lcn = 0usize;
    for i in 0..off_bytes {
        lcn |= (b[runs + 1 + len_bytes + i] as usize) << (8 * i);
    }
    let mut page = vec![0u8; 4096];
    page[..4].copy_from_slice(b"RSTR");
    page[4..6].copy_from_slice(&0x1Eu16.to_le_bytes()); // update sequence array
    page[6..8].copy_from_slice(&9u16.to_le_bytes());
    page[0x10..0x14].copy_from_slice(&4096u32.to_le_bytes()); // system page size
    page[0x14..0x18].copy_from_slice(&4096u32.to_le_bytes()); // log page size
    page[0x18..0x1A].copy_from_slice(&0x30u16.to_le_bytes()); // restart area
    page[0x1A..0x1C].copy_from_slice(&1u16.to_le_bytes());
    page[0x1C..0x1E].copy_from_slice(&1u16.to_le_bytes());
    let area = 0x30;
    page[area + 8..area + 10].copy_from_slice(&1u16.to_le_bytes()); // clients
    page[area + 0x0A..area + 0x0C].copy_from_slice(&0xFFFFu16.to_le_bytes()); // free list
    page[area + 0x0C..area + 0x0E].copy_from_slice(&0u16.to_le_bytes()); // in use: client 0
    page[area + 0x0E..area + 0x10].copy_from_slice(&0u16.to_le_bytes()); // flags: not clean
                                                                         // Update sequence number 1 at the end of every sector; the array keeps
                                                                         // the bytes that belong there (zeros).
    page[0x1E..0x20].copy_from_slice(&1u16.to_le_bytes());
    for sector in 0..8 {
        page[sector * 512 + 510..sector * 512 + 512].copy_from_slice(&1u16.to_le_bytes());
    }
    let start = lcn * cluster;
    b[start..start + 4096].copy_from_slice(&page);
    fs::write(image, b).unwrap();
}

#[test]
fn ntfs_with_a_log_to_replay_is_kept_whole() {
    let dir = support::temp_dir();
    let image = make_ntfs(dir.path());
    make_log_unclean(&image);
    // (The page carries only the fields the format documents for the
    // clean test; ntfs-3g checks more of a restart area and calls this one
    // damaged rather than unclean - either way it will not write to it.)
    let disk = disk_with(dir.path(), &image);
    let (plain, compact, report) = clones(dir.path(), &disk);
    let part = &report.regions[0];
    assert_eq!(part.free_sectors, 0);
    assert!(
        part.reason.as_deref().unwrap_or("").contains("hibernated"),
        "{report:#?}"
    );
    let (a, b) = (fs::read(&plain).unwrap(), fs::read(&compact).unwrap());
    let range = (P1 * 512) as usize..((P1 + PART_SECTORS) * 512) as usize;
    assert!(a[range.clone()] == b[range]);
}

#[test]
fn ntfs_filling_the_whole_disk_without_a_table_is_read() {
    let dir = support::temp_dir();
    let image = make_ntfs(dir.path());
    let tool_free = ntfscluster_free(&image);
    let options = CloneOptions {
        format: CloneFormat::Raw,
        replace: false,
        ..CloneOptions::default()
    };
    let compact = dir.path().join("compact.raw");
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    let (mut view, report) = FilesystemView::new(disk).unwrap();
    clone_to_file(&mut view, &compact, &options, &mut no_progress()).unwrap();
    let region = &report.regions[0];
    assert_eq!(
        (region.number, region.filesystem),
        (0, FsKind::Ntfs),
        "{report:#?}"
    );
    assert_eq!(region.free_sectors * 512, tool_free);
    sh(&format!("ntfsfix -n '{}'", compact.display()));
    for (name, bytes) in kept_files() {
        let out = dir.path().join(format!("out-{name}"));
        sh(&format!(
            "ntfscat '{}' {name} > '{}'",
            compact.display(),
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == bytes, "{name} differs");
    }
    assert!(!contains(&fs::read(&compact).unwrap(), MARKER));
}
