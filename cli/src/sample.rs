//! `cowdisk sample`: writes a small sample disk with recognisable data, so
//! the main job can be shown on a fresh machine with no input of the
//! user's. Every sector of a partition reads "PARTITION-<n> sector <lba>",
//! repeated; everything else is left as holes (zeros).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cowdisk::partition::mbr;

const SECTOR: u64 = 512;
const MIB: u64 = 2048; // sectors

/// The sample's partitions: (first sector, sectors).
fn layout(gpt: bool) -> Vec<(u64, u64)> {
    if gpt {
        vec![(MIB, 40 * MIB), (41 * MIB, 16 * MIB)]
    } else {
        vec![(MIB, 40 * MIB), (41 * MIB, 20 * MIB)]
    }
}

/// Writes a 64 MiB sample disk at `path` (which must not exist): an MBR or
/// a GPT with two Linux partitions.
pub fn write_sample(path: &Path, gpt: bool) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let disk_sectors = 64 * MIB;
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(fail)?;
    file.set_len(disk_sectors * SECTOR).map_err(fail)?;
    let parts = layout(gpt);
    for (number, &(start, len)) in parts.iter().enumerate() {
        let mut chunk = Vec::with_capacity((MIB * SECTOR) as usize);
        for first in (start..start + len).step_by(MIB as usize) {
            chunk.clear();
            for s in first..(first + MIB).min(start + len) {
                let text = format!("PARTITION-{} sector {s:>10} ", number + 1);
                chunk.extend(text.bytes().cycle().take(SECTOR as usize));
            }
            file.write_all_at(&chunk, first * SECTOR).map_err(fail)?;
        }
    }
    let mut sector0 = vec![0u8; SECTOR as usize];
    sector0[510] = 0x55;
    sector0[511] = 0xAA;
    sector0[440..444].copy_from_slice(&0x5EED_D15Cu32.to_le_bytes());
    if !gpt {
        for (slot, &(start, len)) in parts.iter().enumerate() {
            let entry = mbr::Entry {
                boot: 0,
                kind: 0x83,
                start: start as u32,
                sectors: len as u32,
            };
            mbr::write_entry(&mut sector0, slot, &entry, start);
        }
        file.write_all_at(&sector0, 0).map_err(fail)?;
        return file.sync_all().map_err(fail);
    }
    let entry = mbr::Entry {
        boot: 0,
        kind: mbr::TYPE_PROTECTIVE,
        start: 1,
        sectors: (disk_sectors - 1) as u32,
    };
    mbr::write_entry(&mut sector0, 0, &entry, 1);
    file.write_all_at(&sector0, 0).map_err(fail)?;
    // 128 entries of 128 bytes: 32 sectors.
    let mut array = vec![0u8; 128 * 128];
    // The Linux filesystem data type GUID, in its on-disk byte order.
    let linux: [u8; 16] = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];
    for (i, &(start, len)) in parts.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&linux);
        e[16..32].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        e[32..40].copy_from_slice(&start.to_le_bytes());
        e[40..48].copy_from_slice(&(start + len - 1).to_le_bytes());
        let name: Vec<u8> = format!("sample-{}", i + 1)
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        e[56..56 + name.len()].copy_from_slice(&name);
    }
    let array_crc = crc32fast::hash(&array);
    let last = disk_sectors - 1;
    let disk_guid = *uuid::Uuid::new_v4().as_bytes();
    let header = |my: u64, other: u64, entries: u64| {
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&other.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid);
        h[72..80].copy_from_slice(&entries.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&array_crc.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h.resize(SECTOR as usize, 0);
        h
    };
    file.write_all_at(&header(1, last, 2), SECTOR)
        .map_err(fail)?;
    file.write_all_at(&array, 2 * SECTOR).map_err(fail)?;
    file.write_all_at(&array, (last - 32) * SECTOR)
        .map_err(fail)?;
    file.write_all_at(&header(last, 1, last - 32), last * SECTOR)
        .map_err(fail)?;
    file.sync_all().map_err(fail)
}
