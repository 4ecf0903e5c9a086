//! VHD reader tests. Images come from `qemu-img create -f vpc` filled by
//! `qemu-io`, and are checked byte for byte against `qemu-img convert` and
//! for allocation against `qemu-img map`. QEMU cannot make differencing VHDs,
//! so those are built here from the format facts (a small writer checked
//! against QEMU on a dynamic image first) with expected bytes worked out
//! from the parent's QEMU bytes and the sectors the child holds.

mod support;

use std::path::{Path, PathBuf};

use cowdisk::disk::MemDisk;
use cowdisk::formats::vhd::VhdDisk;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};
use support::vhd::{child_block, overlay, utf16le, Block, VhdBuilder, BLOCK};

const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    support::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        opts,
        &path.display().to_string(),
        size,
    ]);
    path
}

/// `qemu-img convert -f vpc -O raw`: the fixed format must be named, as
/// QEMU's probe takes a fixed VHD for raw.
fn qemu_bytes(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-expected.raw");
    support::qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        &image.display().to_string(),
        &out.display().to_string(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

fn read_all(disk: &mut dyn Disk) -> Vec<u8> {
    let total = disk.sector_count();
    let mut out = vec![0u8; (total * 512) as usize];
    let mut lba = 0;
    while lba < total {
        // Odd-sized chunks so reads straddle block boundaries.
        let n = (total - lba).min(1531);
        let at = (lba * 512) as usize;
        disk.read_sectors(lba, &mut out[at..at + (n * 512) as usize])
            .unwrap();
        lba += n;
    }
    out
}

/// QEMU's data ranges must not be NotAlloc for us; ranges QEMU calls
/// not-data must not be Normal for us.
fn check_allocation(disk: &mut dyn Disk, image: &Path) {
    for entry in support::qemu_map(image) {
        let first = entry.start / 512;
        let count = entry.length / 512;
        if count == 0 {
            continue;
        }
        if entry.data {
            let mut lba = first;
            while lba < first + count {
                let n = (first + count - lba).min(8);
                assert_ne!(
                    disk.block_status(lba, n).unwrap(),
                    SectorStatus::NotAlloc,
                    "qemu says data at sector {lba}"
                );
                lba += n;
            }
        } else {
            assert_ne!(
                disk.block_status(first, count).unwrap(),
                SectorStatus::Normal,
                "qemu says no data in sectors {first}..+{count}"
            );
        }
    }
}

fn footer_unique_id(image: &Path) -> [u8; 16] {
    let bytes = std::fs::read(image).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    footer[68..84].try_into().unwrap()
}

fn fill_dynamic(image: &Path, size: u64) {
    support::qemu_io(
        image,
        "vpc",
        &[
            "write -P 0x11 0 512".into(),
            "write -P 0x22 1234567 70000".into(),
            format!("write -P 0x33 {} 4096", BLOCK - 1024),
            "write -z 5M 64k".into(),
            "write -P 0x55 6M 1M".into(),
            "discard 6M 512k".into(),
            format!("write -P 0x66 {} 3000", 9 * MIB + 777),
            format!("write -P 0x44 {} 512", size - 512),
        ],
    );
}

#[test]
fn dynamic_chs_sized_image_matches_qemu() {
    let dir = support::temp_dir();
    // 37 MiB rounds to a CHS size QEMU reports as 38819840 bytes: not a
    // multiple of the 2 MiB block.
    let image = create(dir.path(), "dyn.vhd", "subformat=dynamic", "37M");
    let expected_size = qemu_bytes(&image, dir.path()).len() as u64;
    assert_ne!(expected_size % BLOCK, 0);
    fill_dynamic(&image, expected_size);
    let expected = qemu_bytes(&image, dir.path());
    let before = support::fingerprint(&image);

    let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhd);
    assert_eq!(disk.byte_size(), expected.len() as u64);
    assert!(!disk.is_snapshot());
    assert_eq!(disk.uuid(), Some(footer_unique_id(&image)));
    let got = read_all(disk.as_mut());
    assert!(got == expected, "bytes differ from qemu-img convert");
    check_allocation(disk.as_mut(), &image);
    // Never-written blocks are NotAlloc, written ones Normal.
    assert_eq!(
        disk.block_status(15 * 4096, 4096).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(disk.block_status(0, 1).unwrap(), SectorStatus::Normal);
    let mut one = vec![0u8; 512];
    assert_eq!(
        disk.read_sectors(15 * 4096, &mut one).unwrap(),
        SectorStatus::NotAlloc
    );
    drop(disk);
    support::assert_unchanged(&image, &before);
}

#[test]
fn dynamic_forced_size_image_matches_qemu() {
    let dir = support::temp_dir();
    let size = 13 * MIB + 512 * 3;
    let image = create(
        dir.path(),
        "forced.vhd",
        "subformat=dynamic,force_size=on",
        &size.to_string(),
    );
    fill_dynamic(&image, size);
    let expected = qemu_bytes(&image, dir.path());
    assert_eq!(expected.len() as u64, size);
    let before = support::fingerprint(&image);
    let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhd);
    assert!(read_all(disk.as_mut()) == expected);
    check_allocation(disk.as_mut(), &image);
    drop(disk);
    support::assert_unchanged(&image, &before);
}

#[test]
fn fixed_image_matches_qemu() {
    let dir = support::temp_dir();
    let image = create(dir.path(), "fixed.vhd", "subformat=fixed", "11M");
    let size = qemu_bytes(&image, dir.path()).len() as u64;
    support::qemu_io(
        &image,
        "vpc",
        &[
            "write -P 0x71 0 512".into(),
            "write -P 0x72 4000 10000".into(),
            format!("write -P 0x73 {} 512", size - 512),
        ],
    );
    let expected = qemu_bytes(&image, dir.path());
    let before = support::fingerprint(&image);
    let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhd);
    assert_eq!(disk.byte_size(), size);
    assert_eq!(disk.uuid(), Some(footer_unique_id(&image)));
    assert!(read_all(disk.as_mut()) == expected);
    // A fixed disk stores every sector.
    assert_eq!(
        disk.block_status(0, disk.sector_count()).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(disk.block_status(9000, 1).unwrap(), SectorStatus::Normal);
    drop(disk);
    support::assert_unchanged(&image, &before);
}

// ---------------------------------------------------------------------------
// Differencing images from the VHD writer in `support::vhd`.
// ---------------------------------------------------------------------------

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn test_writer_agrees_with_qemu_on_a_dynamic_image() {
    let dir = support::temp_dir();
    let size = 6 * MIB;
    let blocks = vec![
        child_block(0, |_| true, 1),
        child_block(2, |s| s < 4000, 2), // absent tail sectors keep garbage...
    ];
    // ...so for QEMU, which reads the whole block, store zeros there.
    let mut blocks = blocks;
    for s in 4000..4096 {
        blocks[1].data[s * 512..(s + 1) * 512].fill(0);
    }
    let builder = VhdBuilder {
        size,
        disk_type: 3,
        unique_id: [7; 16],
        parent_id: [0; 16],
        parent_name: String::new(),
        locators: Vec::new(),
        blocks,
    };
    let image = dir.path().join("built.vhd");
    write(&image, &builder.build());
    let qemu = qemu_bytes(&image, dir.path());
    let mut expected = vec![0u8; size as usize];
    overlay(&mut expected, &builder.blocks);
    assert!(qemu == expected, "the test writer disagrees with QEMU");

    let before = support::fingerprint(&image);
    let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert!(read_all(disk.as_mut()) == expected);
    // Sectors whose bitmap bit is clear are not allocated, even inside an
    // allocated block.
    assert_eq!(
        disk.block_status(2 * 4096 + 4000, 96).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(
        disk.block_status(2 * 4096 + 3999, 2).unwrap(),
        SectorStatus::Normal
    );
    assert_eq!(
        disk.block_status(4096, 4096).unwrap(),
        SectorStatus::NotAlloc
    );
    drop(disk);
    support::assert_unchanged(&image, &before);
}

struct DiffSetup {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    child: PathBuf,
    expected: Vec<u8>,
    blocks: Vec<Block>,
}

/// A QEMU-made parent in `base/parent.vhd` and a differencing child next to
/// `base/` whose locators say `.\base\parent.vhd`.
fn differencing_setup(locators: impl Fn(&Path) -> Vec<([u8; 4], Vec<u8>)>) -> DiffSetup {
    let dir = support::temp_dir();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    let size = 6 * MIB;
    let parent = create(
        &dir.path().join("base"),
        "parent.vhd",
        "subformat=dynamic,force_size=on",
        &size.to_string(),
    );
    support::qemu_io(
        &parent,
        "vpc",
        &[
            "write -P 0xA1 0 64k".into(),
            "write -P 0xA2 2M 1M".into(),
            format!("write -P 0xA3 {} 4096", 5 * MIB),
        ],
    );
    let parent_bytes = qemu_bytes(&parent, dir.path());
    let blocks = vec![
        // Block 0: a few sectors in the child, the rest from the parent.
        child_block(0, |s| s < 8 || (100..104).contains(&s) || s == 4095, 10),
        // Block 1 untouched; block 2 wholly in the child.
        child_block(2, |_| true, 11),
    ];
    let mut expected = parent_bytes;
    overlay(&mut expected, &blocks);
    let child = dir.path().join("child.vhd");
    let builder = VhdBuilder {
        size,
        disk_type: 4,
        unique_id: [9; 16],
        parent_id: footer_unique_id(&parent),
        parent_name: "parent.vhd".into(),
        locators: locators(&parent),
        blocks,
    };
    write(&child, &builder.build());
    DiffSetup {
        _dir: dir,
        parent,
        child,
        expected,
        blocks: builder.blocks,
    }
}

fn windows_locators(_parent: &Path) -> Vec<([u8; 4], Vec<u8>)> {
    vec![
        (*b"W2ku", utf16le(r"C:\images\base\parent.vhd")),
        (*b"W2ru", utf16le(r".\base\parent.vhd")),
    ]
}

#[test]
fn differencing_image_needs_the_follow_flag() {
    let setup = differencing_setup(windows_locators);
    let before = support::fingerprint(&setup.child);
    let err = support::open_error(&setup.child, &OpenOptions::default());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    let text = err.to_string();
    assert!(text.contains("base/parent.vhd"), "{text}");
    assert!(text.contains("follow"), "{text}");
    support::assert_unchanged(&setup.child, &before);
}

#[test]
fn differencing_image_reads_through_to_its_parent() {
    let setup = differencing_setup(windows_locators);
    let child_before = support::fingerprint(&setup.child);
    let parent_before = support::fingerprint(&setup.parent);
    let mut disk = open_path(&setup.child, &support::follow()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhd);
    assert!(disk.is_snapshot());
    assert_eq!(disk.uuid(), Some([9; 16]));
    assert!(read_all(disk.as_mut()) == setup.expected);

    // Status: child sectors Normal; parent data Normal; neither NotAlloc.
    assert_eq!(disk.block_status(0, 8).unwrap(), SectorStatus::Normal);
    assert_eq!(disk.block_status(100, 4).unwrap(), SectorStatus::Normal);
    // Sector 200 of block 0: not in the child, but in the parent's data.
    assert_eq!(disk.block_status(200, 1).unwrap(), SectorStatus::Normal);
    // Block 1 (sectors 4096..8192) is not in the child; the parent wrote
    // 2M..3M there, allocating its block 1.
    assert_eq!(disk.block_status(4096, 4096).unwrap(), SectorStatus::Normal);

    // The same through the constructor taking the parent.
    let parent: Box<dyn Disk> =
        Box::new(VhdDisk::open(&setup.parent, &OpenOptions::default()).unwrap());
    let mut disk2 = VhdDisk::open_with_parent(&setup.child, parent).unwrap();
    assert!(read_all(&mut disk2) == setup.expected);
    drop(disk);
    drop(disk2);
    support::assert_unchanged(&setup.child, &child_before);
    support::assert_unchanged(&setup.parent, &parent_before);
}

#[test]
fn differencing_image_without_parent_data_is_not_allocated() {
    let setup = differencing_setup(windows_locators);
    // A parent that holds nothing: the child's absent sectors are NotAlloc.
    let size = 6 * MIB as usize;
    let parent = MemDisk::new(vec![0u8; size], vec![SectorStatus::NotAlloc; size / 512])
        .unwrap()
        .with_uuid(footer_unique_id(&setup.parent));
    let disk = VhdDisk::open_with_parent(&setup.child, Box::new(parent)).unwrap();
    assert_eq!(disk.block_status(8, 92).unwrap(), SectorStatus::NotAlloc);
    assert_eq!(
        disk.block_status(4096, 4096).unwrap(),
        SectorStatus::NotAlloc
    );
    assert_eq!(disk.block_status(7, 2).unwrap(), SectorStatus::Normal);
    let mut buf = vec![0u8; 512 * 4096];
    assert_eq!(
        disk.read_sectors(0, &mut buf).unwrap(),
        SectorStatus::Normal
    );
    let mut expected = vec![0u8; 512 * 4096];
    overlay(&mut expected, &setup.blocks[..1]);
    assert!(
        buf == expected,
        "absent sectors must read as zeros, never the 0xEE filler"
    );
}

#[test]
fn differencing_image_rejects_a_parent_with_another_id() {
    let setup = differencing_setup(windows_locators);
    let size = 6 * MIB as usize;
    let wrong = MemDisk::new(vec![0u8; size], vec![SectorStatus::NotAlloc; size / 512])
        .unwrap()
        .with_uuid([1; 16]);
    let err = VhdDisk::open_with_parent(&setup.child, Box::new(wrong)).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );

    // A different QEMU image put where the locator points.
    std::fs::remove_file(&setup.parent).unwrap();
    create(
        setup.parent.parent().unwrap(),
        "parent.vhd",
        "subformat=dynamic,force_size=on",
        &(6 * MIB).to_string(),
    );
    let err = support::open_error(&setup.child, &support::follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
}

#[test]
fn differencing_image_finds_its_parent_through_a_macx_url() {
    let setup = differencing_setup(|parent| {
        let url = format!(
            "file://localhost{}",
            parent.display().to_string().replace(' ', "%20")
        );
        vec![(*b"MacX", url.into_bytes())]
    });
    let mut disk = open_path(&setup.child, &support::follow()).unwrap();
    assert!(read_all(disk.as_mut()) == setup.expected);
}

#[test]
fn missing_parent_is_a_clear_error() {
    let setup = differencing_setup(windows_locators);
    std::fs::remove_file(&setup.parent).unwrap();
    let err = support::open_error(&setup.child, &support::follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("parent.vhd"), "{err}");
}

// ---------------------------------------------------------------------------
// Bad input: truncated, bit-flipped and randomized metadata never panics.
// ---------------------------------------------------------------------------

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Returns how many damaged images opened and how many were refused.
fn fuzz(
    original: &[u8],
    dir: &Path,
    seed: u64,
    rounds: usize,
    parent_id: Option<[u8; 16]>,
) -> (usize, usize) {
    let mut outcome = (0, 0);
    let mut rng = Rng(seed);
    let path = dir.join("fuzzed.vhd");
    // The metadata: footer copy, dynamic header, BAT, the first bitmaps
    // and the trailing footer.
    let hot = 8192.min(original.len()) as u64;
    for round in 0..rounds {
        let mut bytes = original.to_vec();
        match round % 4 {
            0 => bytes.truncate(rng.below(original.len() as u64) as usize),
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = if rng.below(4) == 0 {
                        original.len() as u64 - 1 - rng.below(512)
                    } else {
                        rng.below(hot)
                    } as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let at = rng.below(hot) as usize;
                let len = (1 + rng.below(64) as usize).min(bytes.len() - at);
                for b in &mut bytes[at..at + len] {
                    *b = rng.next() as u8;
                }
            }
            _ => {
                // Fields that size things: BAT entries count, block size,
                // current size, BAT offset, data offset, locator lengths.
                let fields = [
                    540usize,
                    544,
                    528,
                    16,
                    48,
                    40,
                    576 + 512 + 8,
                    576 + 512 + 16,
                ];
                let at = fields[rng.below(fields.len() as u64) as usize];
                let v = rng.next().to_be_bytes();
                let len = 4.min(bytes.len().saturating_sub(at));
                bytes[at..at + len].copy_from_slice(&v[..len]);
            }
        }
        write(&path, &bytes);
        let opened = match parent_id {
            None => VhdDisk::open(&path, &OpenOptions::default()),
            Some(id) => {
                let size = 6 * MIB as usize;
                let parent =
                    MemDisk::new(vec![0u8; size], vec![SectorStatus::NotAlloc; size / 512])
                        .unwrap()
                        .with_uuid(id);
                VhdDisk::open_with_parent(&path, Box::new(parent))
            }
        };
        match opened {
            Ok(mut disk) => {
                outcome.0 += 1;
                support::fuzz::exercise(&mut disk);
            }
            Err(_) => outcome.1 += 1,
        }
    }
    outcome
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let started = std::time::Instant::now();
    let dir = support::temp_dir();
    let image = create(
        dir.path(),
        "small.vhd",
        "subformat=dynamic,force_size=on",
        "4M",
    );
    support::qemu_io(
        &image,
        "vpc",
        &[
            "write -P 0x5A 1000 5000".into(),
            "write -P 0x5B 3M 4k".into(),
        ],
    );
    let original = std::fs::read(&image).unwrap();
    let (opened, refused) = fuzz(&original, dir.path(), 0x1234_5678, 240, None);
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );

    let setup = differencing_setup(windows_locators);
    let child = std::fs::read(&setup.child).unwrap();
    let (opened, refused) = fuzz(
        &child,
        dir.path(),
        0x9876_5432,
        160,
        Some(footer_unique_id(&setup.parent)),
    );
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );
    // Truncations and a corrupt checksum give Corrupt errors.
    write(&dir.path().join("t.vhd"), &original[..300]);
    assert!(VhdDisk::open(&dir.path().join("t.vhd"), &OpenOptions::default()).is_err());
    let mut flipped = original.clone();
    let n = flipped.len();
    flipped[n - 512 + 50] ^= 1;
    flipped[50] ^= 1;
    write(&dir.path().join("f.vhd"), &flipped);
    let err = VhdDisk::open(&dir.path().join("f.vhd"), &OpenOptions::default()).unwrap_err();
    assert!(err.kind() == cowdisk::error::ErrorCode::Corrupt, "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(started.elapsed().as_secs() < 60, "fuzzing took too long");
}

#[test]
fn damaged_trailing_footer_falls_back_to_the_copy() {
    let dir = support::temp_dir();
    let image = create(
        dir.path(),
        "copy.vhd",
        "subformat=dynamic,force_size=on",
        "4M",
    );
    support::qemu_io(&image, "vpc", &["write -P 0x5A 1000 5000".into()]);
    let expected = qemu_bytes(&image, dir.path());
    let mut bytes = std::fs::read(&image).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 70] ^= 0xFF; // trailing footer's unique id: bad checksum
    let damaged = dir.path().join("damaged.vhd");
    write(&damaged, &bytes);
    let mut disk = VhdDisk::open(&damaged, &OpenOptions::default()).unwrap();
    assert!(read_all(&mut disk) == expected);
}
