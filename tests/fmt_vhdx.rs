//! VHDX reader tests. Images come from `qemu-img create -f vhdx` filled by
//! `qemu-io` and are checked byte for byte against `qemu-img convert`.
//! QEMU's VHDX driver has no block-status support (`qemu-img map` calls
//! every byte data), so allocation is checked against the ranges the test
//! wrote. Differencing images and dirty logs, which QEMU cannot make, are
//! built here from the format facts (the writer is first checked against
//! QEMU on non-differencing images), with expected bytes worked out from
//! QEMU's bytes and the changes the test made.

mod support;

use std::path::{Path, PathBuf};

use cowdisk::disk::MemDisk;
use cowdisk::formats::vhdx::{self, VhdxDisk};
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType, SectorStatus};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    support::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        opts,
        &path.display().to_string(),
        size,
    ]);
    path
}

fn read_all(disk: &mut dyn Disk) -> Vec<u8> {
    let total = disk.sector_count();
    let mut out = vec![0u8; (total * 512) as usize];
    let mut lba = 0;
    while lba < total {
        let n = (total - lba).min(1531);
        let at = (lba * 512) as usize;
        disk.read_sectors(lba, &mut out[at..at + (n * 512) as usize])
            .unwrap();
        lba += n;
    }
    out
}

/// Written ranges must be Normal; blocks no write touched must not be.
fn check_allocation(disk: &mut dyn Disk, written: &[(u64, u64)], block: u64) {
    for &(offset, len) in written {
        let first = offset / 512;
        let last = (offset + len).div_ceil(512);
        for lba in first..last {
            assert_eq!(
                disk.block_status(lba, 1).unwrap(),
                SectorStatus::Normal,
                "sector {lba} was written"
            );
        }
    }
    let size = disk.byte_size();
    let mut start = 0;
    while start < size {
        let end = (start + block).min(size);
        let touched = written.iter().any(|&(o, l)| o < end && o + l > start);
        if !touched {
            assert_ne!(
                disk.block_status(start / 512, (end - start) / 512).unwrap(),
                SectorStatus::Normal,
                "block at {start} was never written"
            );
        }
        start = end;
    }
}

fn qemu_write_all(image: &Path, writes: &[(u8, u64, u64)], zero: &[(u64, u64)]) {
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    cmds.extend(zero.iter().map(|(o, l)| format!("write -z {o} {l}")));
    support::qemu_io(image, "vhdx", &cmds);
}

#[test]
fn dynamic_image_matches_qemu() {
    let dir = support::temp_dir();
    // Not a multiple of the 1 MiB block.
    let size = 41 * MIB + 3 * 512;
    let image = create(dir.path(), "dyn.vhdx", "block_size=1M", &size.to_string());
    let writes = [
        (0x11, 0, 512),
        (0x22, 1_234_567, 70_000),
        (0x33, MIB - 1024, 4096),
        (0x44, 5 * MIB, 3 * MIB), // consecutive blocks, coalesced runs
        (0x55, 20 * MIB + 777, 3000),
        (0x66, size - 512, 512),
    ];
    let zeroes = [(12 * MIB, 64 * KIB)];
    qemu_write_all(&image, &writes, &zeroes);
    let expected = support::qemu_raw_bytes(&image, dir.path());
    assert_eq!(expected.len() as u64, size);
    let before = support::fingerprint(&image);

    let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhdx);
    assert_eq!(disk.byte_size(), size);
    assert!(!disk.is_snapshot());
    assert!(
        read_all(disk.as_mut()) == expected,
        "bytes differ from qemu"
    );
    let mut written: Vec<(u64, u64)> = writes.iter().map(|w| (w.1, w.2)).collect();
    written.extend(zeroes);
    check_allocation(disk.as_mut(), &written, MIB);
    // What QEMU's map can say: no byte it calls data is NotAlloc... except
    // that it calls every byte data, so only check the converse: nothing we
    // call Normal is outside its map.
    for entry in support::qemu_map(&image) {
        if !entry.data {
            assert_ne!(
                disk.block_status(entry.start / 512, entry.length / 512)
                    .unwrap(),
                SectorStatus::Normal
            );
        }
    }
    drop(disk);
    support::assert_unchanged(&image, &before);
}

#[test]
fn uuid_is_the_page83_guid() {
    let dir = support::temp_dir();
    let image = create(dir.path(), "id.vhdx", "block_size=1M", "3M");
    let disk = VhdxDisk::open(&image, &OpenOptions::default()).unwrap();
    let id = disk.uuid().expect("page 83 data");
    assert_ne!(id, [0; 16]);
    // The on-disk GUID sits in the metadata region (Windows byte order).
    let bytes = std::fs::read(&image).unwrap();
    let mut on_disk = id;
    on_disk[0..4].reverse();
    on_disk[4..6].reverse();
    on_disk[6..8].reverse();
    assert!(
        bytes.windows(16).any(|w| w == on_disk),
        "page 83 GUID not found in the file"
    );
    assert_ne!(disk.block_status(0, 6144).unwrap(), SectorStatus::Normal);
}

#[test]
fn fixed_image_matches_qemu() {
    // QEMU's default marks a fixed image's unwritten blocks ZERO (its
    // non-standard block_state_zero); with it off every block is present.
    for zero_blocks in [true, false] {
        let dir = support::temp_dir();
        let size = 9 * MIB + 512;
        let opts = format!(
            "subformat=fixed,block_size=1M,block_state_zero={}",
            if zero_blocks { "on" } else { "off" }
        );
        let image = create(dir.path(), "fixed.vhdx", &opts, &size.to_string());
        let writes = [
            (0x71, 0, 512),
            (0x72, 4000, 10_000),
            (0x73, size - 512, 512),
        ];
        qemu_write_all(&image, &writes, &[]);
        let expected = support::qemu_raw_bytes(&image, dir.path());
        let before = support::fingerprint(&image);
        let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
        assert_eq!(disk.drive_type(), DriveType::Vhdx);
        assert!(read_all(disk.as_mut()) == expected);
        if zero_blocks {
            let written: Vec<(u64, u64)> = writes.iter().map(|w| (w.1, w.2)).collect();
            check_allocation(disk.as_mut(), &written, MIB);
            assert_eq!(disk.block_status(5000, 1).unwrap(), SectorStatus::Blank);
        } else {
            assert_eq!(
                disk.block_status(0, disk.sector_count()).unwrap(),
                SectorStatus::Normal
            );
            assert_eq!(disk.block_status(5000, 1).unwrap(), SectorStatus::Normal);
        }
        drop(disk);
        support::assert_unchanged(&image, &before);
    }
}

#[test]
fn sparse_image_over_two_tib() {
    let dir = support::temp_dir();
    let size: u64 = 3 << 40;
    let image = create(dir.path(), "big.vhdx", "block_size=32M", "3T");
    let far = (5u64 << 39) + 1536; // 2.5 TiB + 3 sectors
    let writes = [
        (0x61u8, 0u64, 4096u64),
        (0x62, far, 70_000),
        (0x63, size - 512, 512),
    ];
    qemu_write_all(&image, &writes, &[]);
    let before = support::fingerprint(&image);
    let disk = open_path(&image, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhdx);
    assert_eq!(disk.byte_size(), size);
    for &(fill, offset, len) in &writes {
        // A window of 64 KiB before and after each write.
        let start = (offset / 512).saturating_sub(128);
        let end = ((offset + len).div_ceil(512) + 128).min(disk.sector_count());
        let mut got = vec![0u8; ((end - start) * 512) as usize];
        disk.read_sectors(start, &mut got).unwrap();
        let mut expected = vec![0u8; got.len()];
        let at = (offset - start * 512) as usize;
        expected[at..at + len as usize].fill(fill);
        assert!(got == expected, "window around {offset}");
        assert_eq!(
            disk.block_status(offset / 512, 1).unwrap(),
            SectorStatus::Normal
        );
    }
    // Untouched terabytes are not data.
    assert_ne!(
        disk.block_status(1 << 31, 1 << 30).unwrap(),
        SectorStatus::Normal
    );
    drop(disk);
    support::assert_unchanged(&image, &before);
}

// ---------------------------------------------------------------------------
// Writing VHDX structures from the format facts.
// ---------------------------------------------------------------------------

/// A GUID's text as its on-disk (Windows) bytes.
fn guid(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let b: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).unwrap())
        .collect();
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15],
    ]
}

/// On-disk GUID bytes as `{lowercase text}`.
fn guid_text(g: &[u8]) -> String {
    format!(
        "{{{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}}}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Stores the CRC-32C of `b[at..at + len]` (checksum field at +4 zeroed).
fn seal(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let crc = crc32c::crc32c(&b[at..at + len]);
    put_u32(b, at + 4, crc);
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

const BAT_REGION: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const METADATA_REGION: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const PAGE83: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
const LOGICAL_SECTOR: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const PHYSICAL_SECTOR: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
const PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";
const VHDX_LOCATOR_TYPE: &str = "B04AEFB7-D19E-4A81-B789-25B8E9445913";

const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;

/// A block in a built image.
struct BuiltBlock {
    index: u64,
    state: u64,
    /// Stored bytes (a whole block) for present and partially present
    /// blocks.
    data: Option<Vec<u8>>,
    /// Per logical sector, for partially present blocks.
    present: Vec<bool>,
}

struct VhdxBuilder {
    size: u64,
    block: u64,
    logical: u64,
    page83: [u8; 16],
    data_write: [u8; 16],
    locator: Option<Vec<(String, String)>>,
    blocks: Vec<BuiltBlock>,
}

impl VhdxBuilder {
    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical / self.block
    }

    fn build(&self) -> Vec<u8> {
        let log_at = MIB as usize;
        let metadata_at = 2 * MIB as usize;
        let bat_at = 3 * MIB as usize;
        let payload_blocks = self.size.div_ceil(self.block);
        let ratio = self.chunk_ratio();
        let entries = if self.locator.is_some() {
            payload_blocks.div_ceil(ratio) * (ratio + 1)
        } else {
            payload_blocks + (payload_blocks - 1) / ratio
        };
        let bat_len = (entries * 8).next_multiple_of(MIB) as usize;
        let mut file = vec![0u8; bat_at + bat_len];

        file[0..8].copy_from_slice(b"vhdxfile");
        for (i, at) in [64 * KIB as usize, 128 * KIB as usize]
            .into_iter()
            .enumerate()
        {
            file[at..at + 4].copy_from_slice(b"head");
            put_u64(&mut file, at + 8, 10 + i as u64);
            file[at + 16..at + 32].copy_from_slice(&[0x31; 16]);
            file[at + 32..at + 48].copy_from_slice(&self.data_write);
            put_u16(&mut file, at + 64, 0);
            put_u16(&mut file, at + 66, 1);
            put_u32(&mut file, at + 68, MIB as u32);
            put_u64(&mut file, at + 72, log_at as u64);
            seal(&mut file, at, 4096);
        }
        for at in [192 * KIB as usize, 256 * KIB as usize] {
            file[at..at + 4].copy_from_slice(b"regi");
            put_u32(&mut file, at + 8, 2);
            let e = at + 16;
            file[e..e + 16].copy_from_slice(&guid(BAT_REGION));
            put_u64(&mut file, e + 16, bat_at as u64);
            put_u32(&mut file, e + 24, bat_len as u32);
            put_u32(&mut file, e + 28, 1);
            let e = at + 48;
            file[e..e + 16].copy_from_slice(&guid(METADATA_REGION));
            put_u64(&mut file, e + 16, metadata_at as u64);
            put_u32(&mut file, e + 24, MIB as u32);
            put_u32(&mut file, e + 28, 1);
            seal(&mut file, at, 64 * KIB as usize);
        }

        // Metadata items, packed from 64 KiB into the region.
        let mut items: Vec<(&str, Vec<u8>, u32)> = Vec::new();
        let mut params = vec![0u8; 8];
        put_u32(&mut params, 0, self.block as u32);
        put_u32(&mut params, 4, if self.locator.is_some() { 2 } else { 0 });
        items.push((FILE_PARAMETERS, params, 4));
        items.push((VIRTUAL_DISK_SIZE, self.size.to_le_bytes().to_vec(), 6));
        items.push((PAGE83, self.page83.to_vec(), 6));
        items.push((
            LOGICAL_SECTOR,
            (self.logical as u32).to_le_bytes().to_vec(),
            6,
        ));
        items.push((PHYSICAL_SECTOR, 4096u32.to_le_bytes().to_vec(), 6));
        if let Some(pairs) = &self.locator {
            let mut item = vec![0u8; 20 + pairs.len() * 12];
            item[0..16].copy_from_slice(&guid(VHDX_LOCATOR_TYPE));
            put_u16(&mut item, 18, pairs.len() as u16);
            for (i, (k, v)) in pairs.iter().enumerate() {
                let (k, v) = (utf16le(k), utf16le(v));
                let key_at = item.len();
                item.extend_from_slice(&k);
                let value_at = item.len();
                item.extend_from_slice(&v);
                let e = 20 + i * 12;
                put_u32(&mut item, e, key_at as u32);
                put_u32(&mut item, e + 4, value_at as u32);
                put_u16(&mut item, e + 8, k.len() as u16);
                put_u16(&mut item, e + 10, v.len() as u16);
            }
            items.push((PARENT_LOCATOR, item, 4));
        }
        file[metadata_at..metadata_at + 8].copy_from_slice(b"metadata");
        put_u16(&mut file, metadata_at + 10, items.len() as u16);
        let mut next = 64 * KIB as usize;
        for (i, (id, bytes, flags)) in items.iter().enumerate() {
            let e = metadata_at + 32 + i * 32;
            file[e..e + 16].copy_from_slice(&guid(id));
            put_u32(&mut file, e + 16, next as u32);
            put_u32(&mut file, e + 20, bytes.len() as u32);
            put_u32(&mut file, e + 24, *flags);
            file[metadata_at + next..metadata_at + next + bytes.len()].copy_from_slice(bytes);
            next += bytes.len().next_multiple_of(8);
        }

        // Payload blocks and sector bitmaps after the BAT.
        let entry_index = |block: u64| (block + block / ratio) as usize;
        let mut bitmap: Option<Vec<u8>> = None;
        let per_block = self.block / self.logical;
        for b in &self.blocks {
            let mut entry = b.state;
            if let Some(data) = &b.data {
                let at = file.len() as u64;
                file.extend_from_slice(data);
                entry |= (at / MIB) << 20;
            }
            if b.state == PARTIALLY_PRESENT {
                let bits = bitmap.get_or_insert_with(|| vec![0u8; MIB as usize]);
                for (s, present) in b.present.iter().enumerate() {
                    if *present {
                        let bit = (b.index % ratio) * per_block + s as u64;
                        bits[(bit / 8) as usize] |= 1 << (bit % 8);
                    }
                }
            }
            put_u64(&mut file, bat_at + entry_index(b.index) * 8, entry);
        }
        if let Some(bits) = bitmap {
            let at = file.len() as u64;
            file.extend_from_slice(&bits);
            put_u64(&mut file, bat_at + ratio as usize * 8, 6 | (at / MIB) << 20);
        }
        file
    }

    /// The bytes the built image should read as, over `parent` (zeros when
    /// there is none).
    fn expected(&self, parent: Option<&[u8]>) -> Vec<u8> {
        let mut out = match parent {
            Some(p) => p.to_vec(),
            None => vec![0u8; self.size as usize],
        };
        out.resize(self.size as usize, 0);
        for b in &self.blocks {
            let start = (b.index * self.block) as usize;
            let end = (start + self.block as usize).min(self.size as usize);
            match b.state {
                FULLY_PRESENT => {
                    out[start..end].copy_from_slice(&b.data.as_ref().unwrap()[..end - start])
                }
                ZERO => out[start..end].fill(0),
                PARTIALLY_PRESENT => {
                    let data = b.data.as_ref().unwrap();
                    let l = self.logical as usize;
                    for (s, present) in b.present.iter().enumerate() {
                        if *present && start + s * l < end {
                            out[start + s * l..start + (s + 1) * l]
                                .copy_from_slice(&data[s * l..(s + 1) * l]);
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }
}

fn block_data(block: u64, seed: u64) -> Vec<u8> {
    support::pattern(block as usize, seed)
}

fn non_differencing_builder(logical: u64) -> VhdxBuilder {
    VhdxBuilder {
        size: 6 * MIB - logical,
        block: MIB,
        logical,
        page83: guid("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"),
        data_write: [0x44; 16],
        locator: None,
        blocks: vec![
            BuiltBlock {
                index: 0,
                state: FULLY_PRESENT,
                data: Some(block_data(MIB, 1)),
                present: vec![],
            },
            BuiltBlock {
                index: 1,
                state: FULLY_PRESENT,
                data: Some(block_data(MIB, 2)),
                present: vec![],
            },
            BuiltBlock {
                index: 2,
                state: ZERO,
                data: None,
                present: vec![],
            },
            BuiltBlock {
                index: 5,
                state: FULLY_PRESENT,
                data: Some(block_data(MIB, 3)),
                present: vec![],
            },
        ],
    }
}

#[test]
fn test_writer_agrees_with_qemu() {
    for logical in [512, 4096] {
        let dir = support::temp_dir();
        let builder = non_differencing_builder(logical);
        let image = dir.path().join("built.vhdx");
        std::fs::write(&image, builder.build()).unwrap();
        let expected = builder.expected(None);
        if logical == 512 {
            let qemu = support::qemu_raw_bytes(&image, dir.path());
            assert!(qemu == expected, "writer disagrees with qemu");
        }
        // QEMU refuses 4 KiB logical sectors; that variant differs from the
        // checked one only in the sector size item and the chunk ratio.

        let before = support::fingerprint(&image);
        let mut disk = open_path(&image, &OpenOptions::default()).unwrap();
        assert!(read_all(disk.as_mut()) == expected);
        assert_eq!(
            disk.uuid().map(|u| uuid::Uuid::from_bytes(u).to_string()),
            Some("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9".to_string())
        );
        // Blocks 0 and 1 are contiguous in the file: one run.
        assert_eq!(disk.block_status(0, 4096).unwrap(), SectorStatus::Normal);
        assert_eq!(disk.block_status(4096, 2048).unwrap(), SectorStatus::Blank);
        assert_eq!(
            disk.block_status(6144, 4096).unwrap(),
            SectorStatus::NotAlloc
        );
        drop(disk);
        support::assert_unchanged(&image, &before);
    }
}

// ---------------------------------------------------------------------------
// Differencing images.
// ---------------------------------------------------------------------------

struct DiffSetup {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    child: PathBuf,
    expected: Vec<u8>,
    builder: VhdxBuilder,
}

fn differencing_setup(logical: u64) -> DiffSetup {
    let dir = support::temp_dir();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    let size = 8 * MIB;
    let parent = create(
        &dir.path().join("base"),
        "parent.vhdx",
        "block_size=1M",
        &size.to_string(),
    );
    qemu_write_all(
        &parent,
        &[
            (0xA0, 0, MIB),
            (0xA2, 2 * MIB, 4096),
            (0xA3, 3 * MIB + 512, 8192),
            (0xA4, 4 * MIB, MIB),
        ],
        &[],
    );
    let parent_bytes = support::qemu_raw_bytes(&parent, dir.path());
    let linkage = guid_text(&vhdx::data_write_guid(&parent).unwrap());
    let per_block = (MIB / logical) as usize;
    let mut garbage = vec![0xEEu8; MIB as usize];
    let content = block_data(MIB, 20);
    let mut present = vec![false; per_block];
    for s in [0usize, 1, 2, 7, 100, per_block - 1] {
        present[s] = true;
        let l = logical as usize;
        garbage[s * l..(s + 1) * l].copy_from_slice(&content[s * l..(s + 1) * l]);
    }
    let builder = VhdxBuilder {
        size,
        block: MIB,
        logical,
        page83: guid("11111111-2222-3333-4444-555555555555"),
        data_write: [0x55; 16],
        locator: Some(vec![
            ("parent_linkage".into(), linkage),
            ("relative_path".into(), r".\base\parent.vhdx".into()),
            (
                "absolute_win32_path".into(),
                r"\\?\C:\vms\base\parent.vhdx".into(),
            ),
        ]),
        blocks: vec![
            BuiltBlock {
                index: 0,
                state: PARTIALLY_PRESENT,
                data: Some(garbage),
                present,
            },
            BuiltBlock {
                index: 1,
                state: FULLY_PRESENT,
                data: Some(block_data(MIB, 21)),
                present: vec![],
            },
            BuiltBlock {
                index: 2,
                state: ZERO,
                data: None,
                present: vec![],
            },
            BuiltBlock {
                index: 4,
                state: UNMAPPED,
                data: None,
                present: vec![],
            },
        ],
    };
    let expected = builder.expected(Some(&parent_bytes));
    let child = dir.path().join("child.vhdx");
    std::fs::write(&child, builder.build()).unwrap();
    DiffSetup {
        _dir: dir,
        parent,
        child,
        expected,
        builder,
    }
}

#[test]
fn differencing_image_needs_the_follow_flag() {
    let setup = differencing_setup(512);
    let before = support::fingerprint(&setup.child);
    let err = support::open_error(&setup.child, &OpenOptions::default());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("base/parent.vhdx"), "{err}");
    support::assert_unchanged(&setup.child, &before);
}

#[test]
fn differencing_image_reads_through_to_its_parent() {
    for logical in [512, 4096] {
        let setup = differencing_setup(logical);
        let child_before = support::fingerprint(&setup.child);
        let parent_before = support::fingerprint(&setup.parent);
        let mut disk = open_path(&setup.child, &support::follow()).unwrap();
        assert_eq!(disk.drive_type(), DriveType::Vhdx);
        assert!(disk.is_snapshot());
        assert!(
            read_all(disk.as_mut()) == setup.expected,
            "bytes differ ({logical}-byte sectors)"
        );
        // Block 2 is ZERO in the child though the parent has data there.
        assert_eq!(disk.block_status(4096, 2048).unwrap(), SectorStatus::Blank);
        // Block 3: the parent's data shows through.
        assert_eq!(disk.block_status(6145, 1).unwrap(), SectorStatus::Normal);
        drop(disk);

        // With a parent that holds nothing, only the child's own sectors
        // are data.
        let size = setup.builder.size as usize;
        let empty =
            MemDisk::new(vec![0u8; size], vec![SectorStatus::NotAlloc; size / 512]).unwrap();
        let alone = VhdxDisk::open_with_parent(&setup.child, Box::new(empty)).unwrap();
        let per_bit = logical / 512;
        assert_eq!(
            alone.block_status(0, 3 * per_bit).unwrap(),
            SectorStatus::Normal
        );
        assert_eq!(
            alone.block_status(3 * per_bit, 4 * per_bit).unwrap(),
            SectorStatus::NotAlloc
        );
        assert_eq!(
            alone.block_status(7 * per_bit, 1).unwrap(),
            SectorStatus::Normal
        );
        assert_eq!(alone.block_status(2047, 1).unwrap(), SectorStatus::Normal);
        assert_eq!(
            alone.block_status(6144, 2048).unwrap(),
            SectorStatus::NotAlloc
        );
        let mut block0 = vec![0u8; MIB as usize];
        alone.read_sectors(0, &mut block0).unwrap();
        let own = setup.builder.expected(Some(&vec![0u8; size]));
        assert!(block0[..] == own[..MIB as usize], "0xEE filler leaked");
        drop(alone);
        support::assert_unchanged(&setup.child, &child_before);
        support::assert_unchanged(&setup.parent, &parent_before);
    }
}

#[test]
fn differencing_image_checks_the_parent_linkage() {
    let setup = differencing_setup(512);
    let locator = VhdxDisk::open_with_parent(
        &setup.child,
        Box::new(MemDisk::new(vec![0; 512], vec![SectorStatus::NotAlloc]).unwrap()),
    )
    .unwrap()
    .parent_locator()
    .unwrap()
    .clone();
    assert_eq!(
        locator.linkages,
        vec![vhdx::data_write_guid(&setup.parent).unwrap()]
    );
    // Another QEMU image where the locator points: a different data-write
    // GUID.
    std::fs::remove_file(&setup.parent).unwrap();
    create(
        setup.parent.parent().unwrap(),
        "parent.vhdx",
        "block_size=1M",
        "8M",
    );
    let err = support::open_error(&setup.child, &support::follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
    std::fs::remove_file(&setup.parent).unwrap();
    let err = support::open_error(&setup.child, &support::follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("parent.vhdx"), "{err}");
}

// ---------------------------------------------------------------------------
// Dirty logs.
// ---------------------------------------------------------------------------

enum LogOp {
    Page(u64, Vec<u8>),
    Zero(u64, u64),
}

fn log_entry(
    log_guid: &[u8; 16],
    seq: u64,
    tail: u64,
    flushed: u64,
    last: u64,
    ops: &[LogOp],
) -> Vec<u8> {
    let descriptor_pages = (64 + 32 * ops.len()).div_ceil(4096);
    let data_pages = ops.iter().filter(|o| matches!(o, LogOp::Page(..))).count();
    let mut e = vec![0u8; (descriptor_pages + data_pages) * 4096];
    e[0..4].copy_from_slice(b"loge");
    let len = e.len() as u32;
    put_u32(&mut e, 8, len);
    put_u32(&mut e, 12, tail as u32);
    put_u64(&mut e, 16, seq);
    put_u32(&mut e, 24, ops.len() as u32);
    e[32..48].copy_from_slice(log_guid);
    put_u64(&mut e, 48, flushed);
    put_u64(&mut e, 56, last);
    let mut data_at = descriptor_pages * 4096;
    for (i, op) in ops.iter().enumerate() {
        let d = 64 + i * 32;
        match op {
            LogOp::Zero(offset, len) => {
                e[d..d + 4].copy_from_slice(b"zero");
                put_u64(&mut e, d + 8, *len);
                put_u64(&mut e, d + 16, *offset);
            }
            LogOp::Page(offset, page) => {
                e[d..d + 4].copy_from_slice(b"desc");
                e[d + 4..d + 8].copy_from_slice(&page[4092..4096]);
                e[d + 8..d + 16].copy_from_slice(&page[0..8]);
                put_u64(&mut e, d + 16, *offset);
                e[data_at..data_at + 4].copy_from_slice(b"data");
                put_u32(&mut e, data_at + 4, (seq >> 32) as u32);
                e[data_at + 8..data_at + 4092].copy_from_slice(&page[8..4092]);
                put_u32(&mut e, data_at + 4092, seq as u32);
                data_at += 4096;
            }
        }
        put_u64(&mut e, d + 24, seq);
    }
    seal(&mut e, 0, len as usize);
    e
}

/// A clean QEMU image and the facts a log writer needs about it.
struct DirtySetup {
    dir: tempfile::TempDir,
    bytes: Vec<u8>,
    clean: Vec<u8>,
    header_at: usize,
    log_at: u64,
    log_len: u64,
    bat_at: u64,
    guid: [u8; 16],
}

fn dirty_setup() -> DirtySetup {
    let dir = support::temp_dir();
    let image = create(dir.path(), "clean.vhdx", "block_size=1M", "8M");
    qemu_write_all(
        &image,
        &[(0x31, 0, 64 * KIB), (0x32, 2 * MIB + 4096, 8192)],
        &[],
    );
    let clean = support::qemu_raw_bytes(&image, dir.path());
    let bytes = std::fs::read(&image).unwrap();
    let seq = |at: usize| get_u64(&bytes, at + 8);
    let header_at = if seq(128 * 1024) > seq(64 * 1024) {
        128 * 1024
    } else {
        64 * 1024
    };
    let log_len = u64::from(get_u32(&bytes, header_at + 68));
    let log_at = get_u64(&bytes, header_at + 72);
    // The BAT region from the first region table.
    let rt = 192 * 1024;
    let bat_at = (0..get_u32(&bytes, rt + 8) as usize)
        .map(|i| rt + 16 + i * 32)
        .find(|&e| bytes[e..e + 16] == guid(BAT_REGION))
        .map(|e| get_u64(&bytes, e + 16))
        .unwrap();
    DirtySetup {
        dir,
        bytes,
        clean,
        header_at,
        log_at,
        log_len,
        bat_at,
        guid: *b"cowdisk-test-log",
    }
}

impl DirtySetup {
    /// Makes the image dirty: sets the current header's log GUID and puts
    /// `entries` (position, bytes) into the circular log.
    fn write(&self, bytes: &mut [u8], entries: &[(u64, Vec<u8>)], name: &str) -> PathBuf {
        bytes[self.header_at + 48..self.header_at + 64].copy_from_slice(&self.guid);
        seal(bytes, self.header_at, 4096);
        for (position, entry) in entries {
            for (i, b) in entry.iter().enumerate() {
                let at = self.log_at + (position + i as u64) % self.log_len;
                bytes[at as usize] = *b;
            }
        }
        let path = self.dir.path().join(name);
        std::fs::write(&path, &*bytes).unwrap();
        path
    }

    fn block_offset(&self, block: u64) -> u64 {
        let entry = get_u64(&self.bytes, (self.bat_at + block * 8) as usize);
        assert_eq!(entry & 7, FULLY_PRESENT, "block {block} allocated by qemu");
        (entry >> 20) * MIB
    }
}

/// The log changes of the main scenario and the bytes they should give:
/// block 5 mapped to a block appended to the file, a page of block 0
/// rewritten, a page of block 2 zeroed.
fn main_scenario(setup: &DirtySetup, seq: u64, tail: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut bytes = setup.bytes.clone();
    let appended_at = (bytes.len() as u64).next_multiple_of(MIB);
    let appended = block_data(MIB, 50);
    bytes.resize(appended_at as usize, 0);
    bytes.extend_from_slice(&appended);
    let file_len = bytes.len() as u64;

    let mut bat_page = bytes[setup.bat_at as usize..setup.bat_at as usize + 4096].to_vec();
    put_u64(
        &mut bat_page,
        5 * 8,
        (appended_at / MIB) << 20 | FULLY_PRESENT,
    );
    let new_page = support::pattern(4096, 51);
    let ops = [
        LogOp::Page(setup.bat_at, bat_page),
        LogOp::Page(setup.block_offset(0) + 8192, new_page.clone()),
        LogOp::Zero(setup.block_offset(2) + 4096, 4096),
    ];
    let entry = log_entry(&setup.guid, seq, tail, file_len, file_len, &ops);

    let mut expected = setup.clean.clone();
    expected[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&appended);
    expected[8192..12288].copy_from_slice(&new_page);
    expected[2 * MIB as usize + 4096..2 * MIB as usize + 8192].fill(0);
    (bytes, entry, expected)
}

fn open_and_read(path: &Path) -> (Vec<u8>, vhdx::ReplaySummary) {
    let before = support::fingerprint(path);
    let mut disk = VhdxDisk::open(path, &OpenOptions::default()).unwrap();
    let got = read_all(&mut disk);
    let summary = disk.log_replay();
    drop(disk);
    support::assert_unchanged(path, &before);
    (got, summary)
}

#[test]
fn dirty_log_is_replayed_in_memory() {
    let setup = dirty_setup();
    let (mut bytes, entry, expected) = main_scenario(&setup, 100, 0);
    let path = setup.write(&mut bytes, &[(0, entry)], "dirty.vhdx");
    // QEMU will not open it read-only: the log needs replay.
    let qemu = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&path)
        .arg(setup.dir.path().join("out.raw"))
        .output()
        .unwrap();
    assert!(!qemu.status.success(), "qemu read a dirty image");

    let disk = open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhdx);
    drop(disk);
    let (got, summary) = open_and_read(&path);
    assert_eq!(summary.entries, 1);
    assert_eq!(summary.head_sequence, 100);
    assert!(got == expected, "replayed bytes differ");
    let disk = VhdxDisk::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(
        disk.block_status(5 * 2048, 2048).unwrap(),
        SectorStatus::Normal
    );
}

#[test]
fn log_sequence_is_replayed_in_order() {
    let setup = dirty_setup();
    let (mut bytes, first, mut expected) = main_scenario(&setup, 100, 0);
    let file_len = bytes.len() as u64;
    // A second entry rewrites the same page of block 0 again.
    let later_page = support::pattern(4096, 77);
    let second = log_entry(
        &setup.guid,
        101,
        0,
        file_len,
        file_len,
        &[LogOp::Page(
            setup.block_offset(0) + 8192,
            later_page.clone(),
        )],
    );
    expected[8192..12288].copy_from_slice(&later_page);
    let at = first.len() as u64;
    let path = setup.write(&mut bytes, &[(0, first), (at, second)], "seq.vhdx");
    let (got, summary) = open_and_read(&path);
    assert_eq!(summary.entries, 2);
    assert!(got == expected);
}

#[test]
fn torn_and_foreign_entries_are_never_replayed() {
    let setup = dirty_setup();
    let (bytes0, first, expected) = main_scenario(&setup, 100, 0);
    let file_len = bytes0.len() as u64;
    let wipe_block0 = [LogOp::Zero(setup.block_offset(0), MIB)];
    // Torn: a valid-looking entry whose CRC fails.
    let mut torn = log_entry(&setup.guid, 101, 0, file_len, file_len, &wipe_block0);
    let n = torn.len();
    torn[n - 1] ^= 0xFF;
    // Foreign: a sound entry from another log GUID.
    let foreign = log_entry(&[0x99; 16], 101, 0, file_len, file_len, &wipe_block0);
    for (name, extra) in [("torn.vhdx", torn.clone()), ("foreign.vhdx", foreign)] {
        let mut bytes = bytes0.clone();
        let at = first.len() as u64;
        let path = setup.write(&mut bytes, &[(0, first.clone()), (at, extra)], name);
        let (got, summary) = open_and_read(&path);
        assert_eq!(summary.entries, 1, "{name}");
        assert!(got == expected, "{name}: a bad entry was replayed");
    }
    // A log holding only a torn entry changes nothing.
    let mut bytes = bytes0.clone();
    let (_, only, _) = main_scenario(&setup, 100, 0);
    let mut only = only;
    only[70] ^= 1;
    let path = setup.write(&mut bytes, &[(0, only)], "only-torn.vhdx");
    let (got, summary) = open_and_read(&path);
    assert_eq!(summary.entries, 0);
    assert!(got == setup.clean);
    // A data sector whose sequence number disagrees is torn too, even with
    // a CRC recomputed over it.
    let mut bytes = bytes0;
    let (_, mut mixed, _) = main_scenario(&setup, 100, 0);
    let last = mixed.len() - 4;
    put_u32(&mut mixed, last, 99);
    let n = mixed.len();
    seal(&mut mixed, 0, n);
    let path = setup.write(&mut bytes, &[(0, mixed)], "mixed.vhdx");
    let (got, _) = open_and_read(&path);
    assert!(got == setup.clean);
}

#[test]
fn log_entry_wrapping_the_log_end_is_replayed() {
    let setup = dirty_setup();
    let position = setup.log_len - 4096;
    let (mut bytes, entry, expected) = main_scenario(&setup, 7, position);
    assert!(entry.len() > 4096, "the entry must wrap");
    let path = setup.write(&mut bytes, &[(position, entry)], "wrap.vhdx");
    let (got, summary) = open_and_read(&path);
    assert_eq!(summary.entries, 1);
    assert!(got == expected);
}

#[test]
fn truncated_file_behind_the_log_is_corrupt() {
    let setup = dirty_setup();
    let (mut bytes, entry, _) = main_scenario(&setup, 100, 0);
    // Claims a flush at a larger size than the file has.
    let mut entry = entry;
    put_u64(&mut entry, 48, bytes.len() as u64 + MIB);
    let n = entry.len();
    seal(&mut entry, 0, n);
    let path = setup.write(&mut bytes, &[(0, entry)], "short.vhdx");
    let err = VhdxDisk::open(&path, &OpenOptions::default()).unwrap_err();
    assert!(err.kind() == cowdisk::error::ErrorCode::Corrupt, "{err}");
}

// ---------------------------------------------------------------------------
// Bad input.
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

/// Re-seals headers and region tables so damage reaches the parsers behind
/// the CRCs.
fn reseal(bytes: &mut [u8]) {
    for at in [64 * 1024, 128 * 1024] {
        if bytes.len() >= at + 4096 {
            seal(bytes, at, 4096);
        }
    }
    for at in [192 * 1024, 256 * 1024] {
        if bytes.len() >= at + 65536 {
            seal(bytes, at, 65536);
        }
    }
}

fn fuzz(
    original: &[u8],
    dir: &Path,
    seed: u64,
    rounds: usize,
    hot: &[(u64, u64)],
) -> (usize, usize) {
    let mut rng = Rng(seed);
    let path = dir.join("fuzzed.vhdx");
    let mut outcome = (0, 0);
    for round in 0..rounds {
        let mut bytes = original.to_vec();
        let (start, len) = hot[rng.below(hot.len() as u64) as usize];
        let pick = |rng: &mut Rng| (start + rng.below(len)) as usize;
        match round % 4 {
            0 => bytes.truncate(rng.below(original.len() as u64) as usize),
            1 => {
                for _ in 0..1 + rng.below(6) {
                    let at = pick(&mut rng);
                    bytes[at] ^= 1 << rng.below(8);
                }
                reseal(&mut bytes);
            }
            2 => {
                let at = pick(&mut rng);
                let n = (1 + rng.below(32) as usize).min(bytes.len() - at);
                for b in &mut bytes[at..at + n] {
                    *b = rng.next() as u8;
                }
                if rng.below(2) == 0 {
                    reseal(&mut bytes);
                }
            }
            _ => {
                // Overwrite an aligned 4- or 8-byte field with an extreme.
                let at = pick(&mut rng) & !3;
                let values = [0u64, 1, u64::MAX, 1 << 40, 0x7FFF_FFFF, rng.next()];
                let v = values[rng.below(values.len() as u64) as usize].to_le_bytes();
                let n = (4 + 4 * rng.below(2) as usize).min(bytes.len() - at);
                bytes[at..at + n].copy_from_slice(&v[..n]);
                reseal(&mut bytes);
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match VhdxDisk::open_with_parent(
            &path,
            Box::new(MemDisk::new(vec![0; 512], vec![SectorStatus::NotAlloc]).unwrap()),
        )
        .or_else(|_| VhdxDisk::open(&path, &OpenOptions::default()))
        {
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
    let image = create(dir.path(), "small.vhdx", "block_size=1M", "4M");
    qemu_write_all(&image, &[(0x5A, 1000, 5000), (0x5B, 3 * MIB, 4096)], &[]);
    let original = std::fs::read(&image).unwrap();
    // Headers, region tables, the log start, BAT and metadata tables.
    let hot = [
        (64 * KIB, 128),
        (128 * KIB, 128),
        (192 * KIB, 128),
        (MIB, 8192),
        (2 * MIB, 256),
        (3 * MIB, 512),
        (3 * MIB + 64 * KIB, 256),
    ];
    let (opened, refused) = fuzz(&original, dir.path(), 0xDEAD_BEEF, 200, &hot);
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );

    // A dirty image: damage inside the log, re-sealed or not.
    let setup = dirty_setup();
    let (mut bytes, entry, _) = main_scenario(&setup, 100, 0);
    let entry_len = entry.len() as u64;
    let path = setup.write(&mut bytes, &[(0, entry)], "dirty.vhdx");
    let dirty = std::fs::read(&path).unwrap();
    let mut rng = Rng(0x5EED);
    let mut outcomes = (0, 0);
    for _ in 0..80 {
        let mut b = dirty.clone();
        for _ in 0..1 + rng.below(3) {
            let at = (setup.log_at + rng.below(entry_len)) as usize;
            b[at] ^= 1 << rng.below(8);
        }
        let entry_at = setup.log_at as usize;
        seal(&mut b, entry_at, entry_len as usize);
        std::fs::write(&path, &b).unwrap();
        match VhdxDisk::open(&path, &OpenOptions::default()) {
            Ok(mut disk) => {
                outcomes.0 += 1;
                support::fuzz::exercise(&mut disk);
            }
            Err(_) => outcomes.1 += 1,
        }
    }
    assert!(outcomes.0 > 0, "{outcomes:?}");

    // The differencing child, through its parent locator and bitmaps.
    let diff = differencing_setup(512);
    let child = std::fs::read(&diff.child).unwrap();
    let hot = [
        (2 * MIB, 64 * KIB + 512),
        (3 * MIB, 512),
        (3 * MIB + 4096 * 8, 64),
    ];
    let (opened, refused) = fuzz(&child, dir.path(), 0xFACE, 120, &hot);
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );
    assert!(started.elapsed().as_secs() < 90, "fuzzing took too long");
}

#[test]
fn extreme_bat_entries_give_errors_not_panics() {
    let diff = differencing_setup(512);
    let child = std::fs::read(&diff.child).unwrap();
    let dir = support::temp_dir();
    let path = dir.path().join("extreme.vhdx");
    let bat_at = 3 * MIB as usize;
    let top = ((1u64 << 44) - 1) << 20;
    for value in [
        u64::MAX,
        u64::MAX - 1,
        top | FULLY_PRESENT,
        top | PARTIALLY_PRESENT,
        (1 << 20) | PARTIALLY_PRESENT,
        4,
    ] {
        let mut bytes = child.clone();
        // Every payload entry and the sector bitmap entry.
        for index in (0..8).chain([4096]) {
            put_u64(&mut bytes, bat_at + index * 8, value);
        }
        std::fs::write(&path, &bytes).unwrap();
        let parent = MemDisk::new(vec![0; 512], vec![SectorStatus::NotAlloc]).unwrap();
        let disk = VhdxDisk::open_with_parent(&path, Box::new(parent)).unwrap();
        let mut buf = vec![0u8; 512 * 2048];
        for block in 0..8 {
            for first in [0, 1, 2047] {
                let lba = block * 2048 + first;
                let n = 2048 - first;
                let result = disk.read_sectors(lba, &mut buf[..(n * 512) as usize]);
                assert!(result.is_err(), "entry {value:#x}: block {block} read");
                assert!(disk.block_status(lba, n).is_err());
            }
        }
        // Runs that span blocks (where contiguous blocks are coalesced).
        let mut all = vec![0u8; 8 * MIB as usize];
        assert!(disk.read_sectors(0, &mut all).is_err());
        assert!(disk.block_status(1, 16383).is_err());
    }
}
