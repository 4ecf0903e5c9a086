//! A small VHD writer, from the format facts, for images QEMU cannot make
//! (differencing VHDs), and the bytes a child's present sectors put over
//! its parent's.

const MIB: u64 = 1 << 20;
/// The block size the writer uses.
pub const BLOCK: u64 = 2 * MIB;

pub fn checksum(bytes: &[u8], at: usize) -> u32 {
    let mut sum = 0u32;
    for (i, b) in bytes.iter().enumerate() {
        if !(at..at + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

pub struct Block {
    pub index: u32,
    /// Which sectors of the block the bitmap marks present.
    pub present: Vec<bool>,
    /// The block's data as stored in the file (absent sectors included).
    pub data: Vec<u8>,
}

pub struct VhdBuilder {
    pub size: u64,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub parent_id: [u8; 16],
    pub parent_name: String,
    pub locators: Vec<([u8; 4], Vec<u8>)>,
    pub blocks: Vec<Block>,
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

impl VhdBuilder {
    pub fn build(&self) -> Vec<u8> {
        let sectors_per_block = BLOCK / 512;
        let bitmap_bytes = (sectors_per_block / 8).next_multiple_of(512) as usize;
        let entries = self.size.div_ceil(BLOCK) as usize;
        let bat_at = 512 + 1024;
        let bat_bytes = (entries * 4).next_multiple_of(512);
        let mut file = vec![0u8; bat_at + bat_bytes];
        let mut bat = vec![0xFFu8; entries * 4];

        let mut locator_entries = Vec::new();
        for (code, data) in &self.locators {
            let at = file.len();
            file.extend_from_slice(data);
            file.resize(file.len().next_multiple_of(512), 0);
            locator_entries.push((*code, data.len(), at));
        }
        for block in &self.blocks {
            let at = file.len();
            let mut bitmap = vec![0u8; bitmap_bytes];
            for (i, present) in block.present.iter().enumerate() {
                if *present {
                    bitmap[i / 8] |= 0x80 >> (i % 8);
                }
            }
            file.extend_from_slice(&bitmap);
            file.extend_from_slice(&block.data);
            let i = block.index as usize * 4;
            bat[i..i + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
        }
        file[bat_at..bat_at + bat.len()].copy_from_slice(&bat);

        let mut header = vec![0u8; 1024];
        header[0..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        header[16..24].copy_from_slice(&(bat_at as u64).to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        header[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        header[40..56].copy_from_slice(&self.parent_id);
        for (i, unit) in self.parent_name.encode_utf16().enumerate().take(256) {
            header[64 + i * 2..66 + i * 2].copy_from_slice(&unit.to_be_bytes());
        }
        for (i, (code, len, at)) in locator_entries.iter().enumerate() {
            let e = 576 + i * 24;
            header[e..e + 4].copy_from_slice(code);
            header[e + 4..e + 8].copy_from_slice(&(len.div_ceil(512) as u32).to_be_bytes());
            header[e + 8..e + 12].copy_from_slice(&(*len as u32).to_be_bytes());
            header[e + 16..e + 24].copy_from_slice(&(*at as u64).to_be_bytes());
        }
        let sum = checksum(&header, 36);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
        file[512..1536].copy_from_slice(&header);

        let mut footer = vec![0u8; 512];
        footer[0..8].copy_from_slice(b"conectix");
        footer[8..12].copy_from_slice(&2u32.to_be_bytes());
        footer[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        footer[16..24].copy_from_slice(&512u64.to_be_bytes());
        // Hyper-V's creator tag: QEMU then takes the size from the footer's
        // current size rather than from the CHS geometry.
        footer[28..32].copy_from_slice(b"win ");
        footer[36..40].copy_from_slice(b"Wi2k");
        footer[40..48].copy_from_slice(&self.size.to_be_bytes());
        footer[48..56].copy_from_slice(&self.size.to_be_bytes());
        footer[56..60].copy_from_slice(&[0x04, 0x00, 0x10, 0x3F]);
        footer[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        footer[68..84].copy_from_slice(&self.unique_id);
        let sum = checksum(&footer, 64);
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        file[0..512].copy_from_slice(&footer);
        file.extend_from_slice(&footer);
        file
    }
}

/// A child block: sectors in `present` hold `fill ^ sector`-ish data, the
/// others hold 0xEE garbage that must never be read.
pub fn child_block(index: u32, present: impl Fn(u64) -> bool, seed: u64) -> Block {
    let sectors = BLOCK / 512;
    let content = super::pattern(BLOCK as usize, seed);
    let mut data = vec![0xEEu8; BLOCK as usize];
    let mut flags = Vec::new();
    for s in 0..sectors {
        let p = present(s);
        flags.push(p);
        if p {
            let r = (s * 512) as usize..((s + 1) * 512) as usize;
            data[r.clone()].copy_from_slice(&content[r]);
        }
    }
    Block {
        index,
        present: flags,
        data,
    }
}

/// Applies a child's present sectors over `base`.
pub fn overlay(base: &mut [u8], blocks: &[Block]) {
    for block in blocks {
        for (s, present) in block.present.iter().enumerate() {
            if *present {
                let at = block.index as usize * BLOCK as usize + s * 512;
                base[at..at + 512].copy_from_slice(&block.data[s * 512..(s + 1) * 512]);
            }
        }
    }
}
