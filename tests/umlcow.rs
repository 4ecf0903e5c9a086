//! UML COW interoperability: files made by `uml_mkcow`, written through
//! our backend and merged by `uml_moo`, compared with a naive model; files
//! we create, merged by `uml_moo`; hand-built v1, v2 (both layouts) and
//! broken-v3 headers; backing files with the wrong size or mtime.

mod support;

use std::path::{Path, PathBuf};

use cowdisk::disk::{ImageFile, WritableDisk};
use cowdisk::error::code;
use cowdisk::formats::umlcow::{
    self, Backing, CreateOptions, Layout, UmlCow, UmlCowOptions, MAGIC,
};
use cowdisk::formats::{self, OpenOptions};
use cowdisk::{Disk, SectorStatus};
use support::{assert_unchanged, fingerprint, path_in, pattern, run, temp_dir};

fn with_backing(p: &Path, writable: bool) -> UmlCowOptions {
    UmlCowOptions {
        writable,
        backing: Backing::Path(p.to_path_buf()),
    }
}

fn read_all(d: &mut dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; d.sector_count() as usize * 512];
    d.read_sectors(0, &mut buf).unwrap();
    buf.truncate(d.byte_size() as usize);
    buf
}

/// Deterministic pseudo-random writes: (lba, sectors, seed).
fn writes(sectors: u64, n: usize, seed: u64) -> Vec<(u64, u64, u64)> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let len = 1 + next() % 9;
            let lba = next() % (sectors - len);
            (lba, len, i as u64 + 100)
        })
        .collect()
}

fn apply(model: &mut [u8], lba: u64, data: &[u8]) {
    let start = lba as usize * 512;
    let end = (start + data.len()).min(model.len());
    model[start..end].copy_from_slice(&data[..end - start]);
}

fn merge(cow: &Path, out: &Path) -> Vec<u8> {
    run(
        "uml_moo",
        &[&cow.display().to_string(), &out.display().to_string()],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn uml_mkcow_file_written_by_us_merges_to_the_model() {
    let dir = temp_dir();
    // An odd size: the last sector is partial.
    let size = 3 * 1024 * 1024 + 1000;
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(size, 1)).unwrap();
    let cow = path_in(dir.path(), "disk.cow");
    run(
        "uml_mkcow",
        &[&cow.display().to_string(), &backing.display().to_string()],
    );
    let base_print = fingerprint(&backing);
    let mut model = std::fs::read(&backing).unwrap();

    let mut img = UmlCow::open(&cow, &with_backing(&backing, true)).unwrap();
    assert_eq!(img.header().layout, Layout::V3);
    assert_eq!(img.byte_size(), size as u64);
    let sectors = img.sector_count();
    for (lba, len, seed) in writes(sectors, 200, 7) {
        let data = pattern(len as usize * 512, seed);
        img.write_sectors(lba, &data).unwrap();
        apply(&mut model, lba, &data);
    }
    // The last, partial sector and sector 0.
    let tail = pattern(512, 9);
    img.write_sectors(sectors - 1, &tail).unwrap();
    apply(&mut model, sectors - 1, &tail);
    img.write_sectors(0, &pattern(512, 10)).unwrap();
    apply(&mut model, 0, &pattern(512, 10));
    assert_eq!(read_all(&mut img), model, "our reads before close");
    assert_eq!(img.block_status(0, 1).unwrap(), SectorStatus::Normal);
    Box::new(img).close().unwrap();

    // uml_moo merges COW + backing into a new image: must equal the model.
    let merged = merge(&cow, &path_in(dir.path(), "merged.raw"));
    // uml_moo merges whole sectors only: it leaves out the partial tail.
    assert_eq!(merged.len(), size / 512 * 512);
    assert!(
        merged[..] == model[..merged.len()],
        "uml_moo's merge differs from the model"
    );
    assert_unchanged(&backing, &base_print);

    // Reopened read-only, through the format table with the path followed.
    let mut again = formats::open_path(
        &cow,
        &OpenOptions {
            follow_parent_paths: true,
        },
    )
    .unwrap();
    assert_eq!(read_all(again.as_mut()), model);
    assert_unchanged(&backing, &base_print);
}

#[test]
fn v3_file_we_create_is_merged_by_uml_moo() {
    let dir = temp_dir();
    let size = 2 * 1024 * 1024;
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(size, 2)).unwrap();
    let base_print = fingerprint(&backing);
    let mut model = std::fs::read(&backing).unwrap();
    let cow = path_in(dir.path(), "ours.cow");
    let mut img = UmlCow::create(&cow, &backing, &CreateOptions::default()).unwrap();
    for (lba, len, seed) in writes(img.sector_count(), 150, 11) {
        let data = pattern(len as usize * 512, seed);
        img.write_sectors(lba, &data).unwrap();
        apply(&mut model, lba, &data);
    }
    Box::new(img).close().unwrap();
    // Header bytes worked out by hand: magic, version 3, size, 512, 4096.
    let head = std::fs::read(&cow).unwrap();
    assert_eq!(&head[0..8], &[0x4F, 0x4F, 0x4F, 0x4D, 0, 0, 0, 3]);
    assert_eq!(&head[12..20], &(size as u64).to_be_bytes());
    assert_eq!(&head[20..28], &[0, 0, 2, 0, 0, 0, 0x10, 0]);
    assert!(head[32..].starts_with(b"/"), "absolute backing path");
    // Bitmap at 8192 (4128 rounded up to 4096), data at 8192+512 -> 12288.
    assert_eq!(head.len() as u64, 12288 + size as u64);

    let merged = merge(&cow, &path_in(dir.path(), "merged.raw"));
    assert!(merged == model, "uml_moo's merge of our v3 file differs");
    assert_unchanged(&backing, &base_print);
}

#[test]
fn v2_file_we_create_is_merged_by_uml_moo() {
    let dir = temp_dir();
    let size = 1024 * 1024;
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(size, 3)).unwrap();
    let mut model = std::fs::read(&backing).unwrap();
    let cow = path_in(dir.path(), "ours2.cow");
    let options = CreateOptions {
        version: 2,
        ..Default::default()
    };
    let mut img = UmlCow::create(&cow, &backing, &options).unwrap();
    assert_eq!(img.header().layout, Layout::V2Linux);
    for (lba, len, seed) in writes(img.sector_count(), 60, 5) {
        let data = pattern(len as usize * 512, seed);
        img.write_sectors(lba, &data).unwrap();
        apply(&mut model, lba, &data);
    }
    Box::new(img).close().unwrap();
    let merged = merge(&cow, &path_in(dir.path(), "merged.raw"));
    assert!(merged == model, "uml_moo's merge of our v2 file differs");
}

/// A hand-built COW file: header bytes, bitmap and data placed by the
/// offsets the format defines, over a backing file with known bytes.
struct HandBuilt {
    _dir: tempfile::TempDir,
    cow: PathBuf,
    backing: PathBuf,
    expected: Vec<u8>,
}

/// Sectors 1, 2 and 9 of a 16-sector disk are in the COW file, filled with
/// 0xA0 + sector; the rest come from the backing file.
fn hand_built(layout: Layout) -> HandBuilt {
    let dir = temp_dir();
    let size: u64 = 16 * 512;
    let backing = path_in(dir.path(), "base.raw");
    let base = pattern(size as usize, 4);
    std::fs::write(&backing, &base).unwrap();
    let mtime = std::fs::metadata(&backing)
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    let name = backing.display().to_string();
    let mut h: Vec<u8>;
    let (bitmap_at, data_at);
    match layout {
        Layout::V1 { big_endian } => {
            h = vec![0u8; 280];
            let w32 = |v: u32| {
                if big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            h[0..4].copy_from_slice(&w32(MAGIC));
            h[4..8].copy_from_slice(&w32(1));
            h[8..8 + name.len()].copy_from_slice(name.as_bytes());
            h[264..268].copy_from_slice(&w32(mtime));
            let sz = if big_endian {
                size.to_be_bytes()
            } else {
                size.to_le_bytes()
            };
            h[268..276].copy_from_slice(&sz);
            h[276..280].copy_from_slice(&w32(512));
            // bitmap (16+511)/4096 = 0 bytes by the v1 rounding bug, data
            // at 280 rounded up to 512; the bits sit in the padding.
            bitmap_at = 280;
            data_at = 512;
        }
        Layout::V2Linux => {
            h = vec![0u8; 4120];
            h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&2u32.to_be_bytes());
            h[8..8 + name.len()].copy_from_slice(name.as_bytes());
            h[4104..4108].copy_from_slice(&mtime.to_be_bytes());
            h[4108..4116].copy_from_slice(&size.to_be_bytes());
            h[4116..4120].copy_from_slice(&512u32.to_be_bytes());
            bitmap_at = 4120;
            data_at = 4608;
        }
        Layout::V2Qemu => {
            h = vec![0u8; 1056];
            h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&2u32.to_be_bytes());
            h[8..8 + name.len()].copy_from_slice(name.as_bytes());
            h[1032..1036].copy_from_slice(&mtime.to_be_bytes());
            h[1040..1048].copy_from_slice(&size.to_be_bytes());
            h[1048..1052].copy_from_slice(&512u32.to_be_bytes());
            bitmap_at = 1056;
            data_at = 1536; // (1056 + 2) rounded up to 512
        }
        Layout::V3 => unreachable!("v3 comes from uml_mkcow"),
        Layout::V3Broken => {
            h = vec![0u8; 4136];
            h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&3u32.to_be_bytes());
            h[8..12].copy_from_slice(&mtime.to_be_bytes()); // low half of the s64
            h[16..24].copy_from_slice(&size.to_be_bytes());
            h[24..28].copy_from_slice(&512u32.to_be_bytes());
            h[28..32].copy_from_slice(&512u32.to_be_bytes()); // alignment
                                                              // 32..36: cow_format 0, where a v3 path would start
            h[36..36 + name.len()].copy_from_slice(name.as_bytes());
            bitmap_at = 4608; // 4136 rounded up to 512
            data_at = 5120;
        }
    }
    let mut file = h;
    file.resize(data_at + size as usize, 0);
    // Bits for sectors 1, 2 (byte 0) and 9 (byte 1).
    file[bitmap_at] = 0b0000_0110;
    file[bitmap_at + 1] = 0b0000_0010;
    let mut expected = base.clone();
    for s in [1usize, 2, 9] {
        let block = vec![0xA0 + s as u8; 512];
        file[data_at + s * 512..data_at + (s + 1) * 512].copy_from_slice(&block);
        expected[s * 512..(s + 1) * 512].copy_from_slice(&block);
    }
    let cow = path_in(dir.path(), "hand.cow");
    std::fs::write(&cow, &file).unwrap();
    HandBuilt {
        _dir: dir,
        cow,
        backing,
        expected,
    }
}

fn check_hand_built(layout: Layout) {
    let hb = hand_built(layout);
    let (cp, bp) = (fingerprint(&hb.cow), fingerprint(&hb.backing));
    let mut img = UmlCow::open(&hb.cow, &with_backing(&hb.backing, false)).unwrap();
    assert_eq!(img.header().layout, layout);
    assert_eq!(read_all(&mut img), hb.expected, "{layout:?}");
    assert_eq!(img.held_run(0, 16).unwrap(), (false, 1));
    assert_eq!(img.held_run(1, 15).unwrap(), (true, 2));
    assert_eq!(img.held_run(9, 7).unwrap(), (true, 1));
    drop(img);
    assert_unchanged(&hb.cow, &cp);
    assert_unchanged(&hb.backing, &bp);
}

#[test]
fn hand_built_v1_both_byte_orders() {
    check_hand_built(Layout::V1 { big_endian: false });
    check_hand_built(Layout::V1 { big_endian: true });
}

#[test]
fn hand_built_v2_linux_layout() {
    check_hand_built(Layout::V2Linux);
}

#[test]
fn hand_built_v2_qemu_layout() {
    check_hand_built(Layout::V2Qemu);
}

#[test]
fn hand_built_broken_v3() {
    check_hand_built(Layout::V3Broken);
}

#[test]
fn uml_moo_reads_our_hand_built_v2_as_we_do() {
    // An independent check of our reading of the Linux v2 layout.
    let hb = hand_built(Layout::V2Linux);
    let out = path_in(hb._dir.path(), "merged.raw");
    assert_eq!(merge(&hb.cow, &out), hb.expected);
}

#[test]
fn backing_file_with_wrong_size_or_mtime_is_refused() {
    let dir = temp_dir();
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(64 * 512, 5)).unwrap();
    let cow = path_in(dir.path(), "d.cow");
    run(
        "uml_mkcow",
        &[&cow.display().to_string(), &backing.display().to_string()],
    );
    // Same size, other mtime.
    let other = path_in(dir.path(), "other.raw");
    std::fs::write(&other, pattern(64 * 512, 6)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let err = UmlCow::open(&cow, &with_backing(&other, false))
        .err()
        .expect("mtime mismatch must be refused");
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert!(err.to_string().contains("mtime mismatch"), "{err}");
    // Other size.
    let short = path_in(dir.path(), "short.raw");
    std::fs::write(&short, pattern(63 * 512, 6)).unwrap();
    let err = UmlCow::open(&cow, &with_backing(&short, false))
        .err()
        .expect("size mismatch must be refused");
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert!(err.to_string().contains("size mismatch"), "{err}");
    // The real backing file whose mtime changed after the COW was made.
    let print = fingerprint(&cow);
    std::fs::File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let err = UmlCow::open(
        &cow,
        &UmlCowOptions {
            writable: false,
            backing: Backing::FollowHeader,
        },
    )
    .err()
    .expect("touched backing file must be refused");
    assert_eq!(err.code(), code::SOURCE_MISMATCH);
    assert_unchanged(&cow, &print);
}

#[test]
fn backing_path_is_followed_only_when_allowed() {
    let dir = temp_dir();
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(32 * 512, 8)).unwrap();
    let cow = path_in(dir.path(), "d.cow");
    run(
        "uml_mkcow",
        &[&cow.display().to_string(), &backing.display().to_string()],
    );
    let err = formats::open_path(&cow, &OpenOptions::default())
        .err()
        .expect("refused without the follow flag");
    assert_eq!(err.code(), code::OPEN);
    assert!(err.to_string().contains("following parent paths"), "{err}");
    // Supplied by the caller: works without following anything.
    let mut d = UmlCow::open(&cow, &with_backing(&backing, false)).unwrap();
    assert_eq!(read_all(&mut d), std::fs::read(&backing).unwrap());
    // Image only (the backend table's view): unchanged sectors are free.
    let alone = UmlCow::open(&cow, &UmlCowOptions::default()).unwrap();
    let mut buf = vec![1u8; 512];
    assert_eq!(
        alone.read_sectors(3, &mut buf).unwrap(),
        SectorStatus::NotAlloc
    );
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn flush_orders_bitmap_after_data_and_reopen_sees_writes() {
    let dir = temp_dir();
    let backing = path_in(dir.path(), "base.raw");
    std::fs::write(&backing, pattern(64 * 512, 12)).unwrap();
    let cow = path_in(dir.path(), "d.cow");
    let mut img = UmlCow::create(&cow, &backing, &CreateOptions::default()).unwrap();
    let data = pattern(3 * 512, 13);
    img.write_sectors(5, &data).unwrap();
    // Before a flush the bitmap on disk is unchanged (the bits are set only
    // after the data is durable).
    let bitmap_at = img.header().bitmap_offset as usize;
    assert_eq!(std::fs::read(&cow).unwrap()[bitmap_at], 0);
    img.flush().unwrap();
    assert_eq!(std::fs::read(&cow).unwrap()[bitmap_at], 0b1110_0000);
    drop(img);
    let mut again = UmlCow::open(&cow, &with_backing(&backing, false)).unwrap();
    let mut buf = vec![0u8; 3 * 512];
    again.read_sectors(5, &mut buf).unwrap();
    assert_eq!(buf, data);
    // A read-only open refuses writes.
    assert_eq!(
        again.write_sectors(0, &[0u8; 512]).unwrap_err().code(),
        code::READ_ONLY
    );
}

#[test]
fn larger_cow_sectors_copy_the_rest_from_the_backing() {
    // Hand-built v3 with 4096-byte COW sectors: a 1-sector write must
    // carry the other 7 sectors of its COW sector from the backing file.
    let dir = temp_dir();
    let backing = path_in(dir.path(), "base.raw");
    let base = pattern(64 * 512, 14);
    std::fs::write(&backing, &base).unwrap();
    let cow = path_in(dir.path(), "d.cow");
    let options = CreateOptions {
        sector_size: 4096,
        ..Default::default()
    };
    let mut img = UmlCow::create(&cow, &backing, &options).unwrap();
    let one = pattern(512, 15);
    img.write_sectors(10, &one).unwrap();
    Box::new(img).close().unwrap();
    let mut model = base.clone();
    apply(&mut model, 10, &one);
    let mut d = UmlCow::open(&cow, &with_backing(&backing, false)).unwrap();
    assert_eq!(read_all(&mut d), model);
    assert_eq!(d.held_run(0, 64).unwrap(), (false, 8));
    assert_eq!(d.held_run(8, 56).unwrap(), (true, 8));
    assert!(umlcow::probe_path(&cow));
    assert!(!umlcow::probe_path(&backing));
    drop(d);
    // Without the backing file, a partial first write cannot be completed:
    // refused rather than filled with zeros.
    let mut alone = UmlCow::open(
        &cow,
        &UmlCowOptions {
            writable: true,
            backing: Backing::None,
        },
    )
    .unwrap();
    let err = alone.write_sectors(40, &one).unwrap_err();
    assert_eq!(err.code(), code::UNSUPPORTED);
    // A whole COW sector needs nothing from the backing file.
    alone.write_sectors(40, &pattern(4096, 16)).unwrap();
    Box::new(alone).close().unwrap();
    apply(&mut model, 40, &pattern(4096, 16));
    let mut d = UmlCow::open(&cow, &with_backing(&backing, false)).unwrap();
    assert_eq!(read_all(&mut d), model);
}
