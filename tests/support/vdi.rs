//! A differencing-VDI builder for tests, written from the VDI format facts
//! (VirtualBox makes these; qemu-img cannot), and the bytes such an image
//! should read as, worked out independently of the reader.

use std::path::Path;

const MIB: u64 = 1 << 20;

/// A GUID's text form from its stored bytes (first three fields stored
/// little-endian), computed independently of the reader.
pub fn stored_guid_text(raw: &[u8]) -> String {
    let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
    let hex: Vec<String> = order.iter().map(|&i| format!("{:02x}", raw[i])).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

pub fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: Vec<String> = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

/// What one block of a hand-built differencing image holds.
#[derive(Clone, Copy)]
pub enum ChildBlock {
    /// Not written in the child: the parent shows through.
    Free,
    /// Marked as reading zeros.
    Zero,
    /// Stored at this index of the data area, filled with
    /// `super::pattern(.., seed)`.
    Stored { index: u32, seed: u64 },
}

pub const BLOCK: u64 = MIB;

/// Writes a differencing VDI of `disk_bytes` whose linkage field holds
/// `parent_stored_uuid` (the parent's image UUID as stored in its file) and
/// whose own stored image UUID is `own_stored_uuid`, with `blocks` (one per
/// 1 MiB block of the disk). Layout per the VDI format: 72-byte pre-header,
/// version-1 header at 0x48, block map at 0x200, data after it.
pub fn build_differencing_vdi(
    path: &Path,
    disk_bytes: u64,
    own_stored_uuid: [u8; 16],
    parent_stored_uuid: &[u8],
    blocks: &[ChildBlock],
) {
    assert_eq!(blocks.len() as u64, disk_bytes.div_ceil(BLOCK));
    let stored = blocks
        .iter()
        .filter(|b| matches!(b, ChildBlock::Stored { .. }))
        .count() as u64;
    let map_at = 0x200u64;
    let data_at = (map_at + blocks.len() as u64 * 4).next_multiple_of(512);
    let mut file = vec![0u8; (data_at + stored * BLOCK) as usize];
    let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
    file[..text.len()].copy_from_slice(text);
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut file, 0x40, 0xBEDA_107F); // signature
    put32(&mut file, 0x44, 0x0001_0001); // version 1.1
    put32(&mut file, 0x48, 0x190); // header size
    put32(&mut file, 0x4C, 4); // differencing
    put32(&mut file, 0x154, map_at as u32);
    put32(&mut file, 0x158, data_at as u32);
    file[0x170..0x178].copy_from_slice(&disk_bytes.to_le_bytes());
    put32(&mut file, 0x178, BLOCK as u32);
    put32(&mut file, 0x180, blocks.len() as u32); // block count
    put32(&mut file, 0x184, stored as u32); // allocated
    file[0x188..0x198].copy_from_slice(&own_stored_uuid);
    file[0x198..0x1A8].copy_from_slice(&[0x42; 16]); // modification UUID
    file[0x1A8..0x1B8].copy_from_slice(&parent_stored_uuid[..16]);
    for (i, block) in blocks.iter().enumerate() {
        let entry = match *block {
            ChildBlock::Free => 0xFFFF_FFFF,
            ChildBlock::Zero => 0xFFFF_FFFE,
            ChildBlock::Stored { index, seed } => {
                let at = (data_at + u64::from(index) * BLOCK) as usize;
                file[at..at + BLOCK as usize]
                    .copy_from_slice(&super::pattern(BLOCK as usize, seed));
                index
            }
        };
        put32(&mut file, map_at as usize + i * 4, entry);
    }
    std::fs::write(path, file).unwrap();
}

/// The bytes a differencing image over `parent_bytes` should read as.
pub fn overlay(parent_bytes: &[u8], blocks: &[ChildBlock]) -> Vec<u8> {
    let mut out = parent_bytes.to_vec();
    for (i, block) in blocks.iter().enumerate() {
        let start = i * BLOCK as usize;
        let end = (start + BLOCK as usize).min(out.len());
        match *block {
            ChildBlock::Free => {}
            ChildBlock::Zero => out[start..end].fill(0),
            ChildBlock::Stored { seed, .. } => out[start..end]
                .copy_from_slice(&super::pattern(BLOCK as usize, seed)[..end - start]),
        }
    }
    out
}
