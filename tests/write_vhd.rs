//! The VHD writer, dynamic and fixed, judged by qemu-img and by the
//! specification: `qemu-img compare` finds the image identical to the raw
//! source, `qemu-img map` shows no data where the source has none, our own
//! reader reads it back identically, and the footer, dynamic header and BAT
//! are checked field by field against the specification (qemu-img has no
//! check for VHD); odd, empty and fully written disks; a disk over 2040
//! GiB is refused and leaves nothing behind.

mod support;

use std::path::Path;

use cowdisk::clone::{clone_to_file, no_progress, CloneFormat, CloneOptions};
use cowdisk::formats::{open_path, OpenOptions};
use support::pattern;
use support::vhd::checksum;
use support::written::{no_data_where_source_has_none, qemu_compare, reads_back, sparse_raw};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn clone(raw: &Path, out: &Path, format: CloneFormat) {
    let mut disk = open_path(raw, &OpenOptions::default()).unwrap();
    let options = CloneOptions {
        format,
        ..CloneOptions::default()
    };
    clone_to_file(disk.as_mut(), out, &options, &mut no_progress()).unwrap();
}

/// The footer's fields by the specification; returns the footer.
fn check_footer(footer: &[u8], size: u64, disk_type: u32) {
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(be32(footer, 8), 2, "features");
    assert_eq!(be32(footer, 12), 0x0001_0000, "version");
    assert_eq!(be64(footer, 40), size, "original size");
    assert_eq!(be64(footer, 48), size, "current size");
    assert_eq!(be32(footer, 60), disk_type, "disk type");
    assert_eq!(be32(footer, 64), checksum(footer, 64), "footer checksum");
    let data_offset = be64(footer, 16);
    if disk_type == 2 {
        assert_eq!(data_offset, u64::MAX);
    } else {
        assert_eq!(data_offset, 512);
    }
}

/// Checks the whole file's structure; returns the allocated block count.
fn check_structure(image: &Path, size: u64, dynamic: bool) -> usize {
    let bytes = std::fs::read(image).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    check_footer(footer, size, if dynamic { 3 } else { 2 });
    if !dynamic {
        assert_eq!(bytes.len() as u64, size + 512);
        return 0;
    }
    assert_eq!(
        &bytes[..512],
        footer,
        "the footer copy at 0 equals the footer"
    );
    let header = &bytes[512..1536];
    assert_eq!(&header[..8], b"cxsparse");
    assert_eq!(be64(header, 8), u64::MAX);
    assert_eq!(be32(header, 24), 0x0001_0000);
    assert_eq!(
        be32(header, 36),
        checksum(header, 36),
        "dynamic header checksum"
    );
    let entries = be32(header, 28) as u64;
    assert_eq!(entries, size.div_ceil(BLOCK));
    assert_eq!(be32(header, 32) as u64, BLOCK);
    let bat_at = be64(header, 16) as usize;
    let mut blocks: Vec<u64> = (0..entries as usize)
        .map(|i| be32(&bytes, bat_at + 4 * i))
        .filter(|&e| e != u32::MAX)
        .map(|e| u64::from(e) * 512)
        .collect();
    blocks.sort_unstable();
    let data_end = bytes.len() as u64 - 512;
    for pair in blocks.windows(2) {
        assert!(pair[0] + 512 + BLOCK <= pair[1], "blocks overlap: {pair:?}");
    }
    for &at in &blocks {
        assert!(at >= (bat_at as u64 + entries * 4), "block over the BAT");
        assert!(
            at + 512 + BLOCK <= data_end,
            "block at {at} runs into the footer"
        );
    }
    blocks.len()
}

#[test]
fn dynamic_and_fixed_read_as_the_source() {
    let dir = support::temp_dir();
    // Odd size (not a multiple of the block or a sector), data straddling
    // a block boundary, a page of zeros, data in the last sector.
    let size = 9 * MIB + 700;
    let raw = dir.path().join("src.raw");
    sparse_raw(
        &raw,
        size,
        &[
            (4096, pattern(4096, 1)),
            (2 * MIB - 1024, pattern(4096, 2)),
            (5 * MIB, vec![0; MIB as usize]),
            (size - 200, pattern(200, 3)),
        ],
    );
    let sectors_size = size.div_ceil(512) * 512;
    for (format, dynamic) in [
        (CloneFormat::VhdDynamic, true),
        (CloneFormat::VhdFixed, false),
    ] {
        let out = dir.path().join(format!("{}.vhd", format.name()));
        clone(&raw, &out, format);
        let blocks = check_structure(&out, sectors_size, dynamic);
        if dynamic {
            // Blocks 0 and 4 hold data; 2 (zeros) and the rest do not.
            assert_eq!(blocks, 3 - 1 + 1, "blocks 0, 1 (the straddle's tail) and 4");
        }
        // QEMU recognises a fixed VHD only when told its format.
        let info = String::from_utf8(support::qemu_img(&[
            "info",
            "-f",
            "vpc",
            out.to_str().unwrap(),
        ]))
        .unwrap();
        assert!(info.contains(&format!("({sectors_size} bytes)")), "{info}");
        qemu_compare(&raw, &out, "vpc");
        if dynamic {
            no_data_where_source_has_none(&raw, &out, BLOCK);
        }
        reads_back(&raw, &out);
    }
}

#[test]
fn empty_and_full_disks() {
    let dir = support::temp_dir();
    for (name, size, pieces) in [
        ("empty", 0, vec![]),
        ("zeros", 5 * MIB, vec![]),
        ("full", 6 * MIB, vec![(0, pattern(6 * MIB as usize, 4))]),
    ] {
        let raw = dir.path().join(format!("{name}.raw"));
        sparse_raw(&raw, size, &pieces);
        for (format, dynamic) in [
            (CloneFormat::VhdDynamic, true),
            (CloneFormat::VhdFixed, false),
        ] {
            let out = dir.path().join(format!("{name}-{}.vhd", format.name()));
            clone(&raw, &out, format);
            let blocks = check_structure(&out, size, dynamic);
            if dynamic {
                let want = if name == "full" { 3 } else { 0 };
                assert_eq!(blocks, want, "{name}");
            }
            // A fixed VHD of 0 bytes is its footer alone, at offset 0,
            // where QEMU takes it for a dynamic image's footer copy and
            // looks for a dynamic header; QEMU cannot open it.
            if size > 0 || dynamic {
                qemu_compare(&raw, &out, "vpc");
            }
            reads_back(&raw, &out);
        }
    }
}

#[test]
fn the_geometry_is_the_specifications() {
    // 40 MiB = 81920 sectors, by the specification's algorithm (worked by
    // hand): 17 sectors per track, 4818 cylinders x heads, 5 heads, 963
    // cylinders.
    let dir = support::temp_dir();
    let raw = dir.path().join("two.raw");
    sparse_raw(&raw, 40 * MIB, &[]);
    let out = dir.path().join("two.vhd");
    clone(&raw, &out, CloneFormat::VhdDynamic);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[56..60], &[0x03, 0xC3, 5, 17]);
}

#[test]
fn more_than_2040_gib_is_refused_and_nothing_is_left() {
    let dir = support::temp_dir();
    let raw = dir.path().join("huge.raw");
    sparse_raw(&raw, (2040u64 << 30) + 512, &[]);
    for format in [CloneFormat::VhdDynamic, CloneFormat::VhdFixed] {
        let out = dir.path().join("huge.vhd");
        let mut disk = open_path(&raw, &OpenOptions::default()).unwrap();
        let options = CloneOptions {
            format,
            ..CloneOptions::default()
        };
        let err = clone_to_file(disk.as_mut(), &out, &options, &mut no_progress()).unwrap_err();
        assert!(err.to_string().contains("2040 GiB"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn a_cancelled_clone_leaves_nothing() {
    let dir = support::temp_dir();
    let raw = dir.path().join("src.raw");
    sparse_raw(&raw, 8 * MIB, &[(0, pattern(8 * MIB as usize, 5))]);
    for format in [CloneFormat::VhdDynamic, CloneFormat::VhdFixed] {
        let out = dir.path().join("out.vhd");
        let mut disk = open_path(&raw, &OpenOptions::default()).unwrap();
        let options = CloneOptions {
            format,
            ..CloneOptions::default()
        };
        let err = clone_to_file(disk.as_mut(), &out, &options, &mut |p: u32| p < 50).unwrap_err();
        assert_eq!(err.kind(), cowdisk::error::ErrorCode::Cancelled, "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
