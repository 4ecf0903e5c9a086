//! The 1024-byte header: parsed and validated, and its mutable fields
//! (unclean flag, root, UUIDs) written back.

use byteorder::{ByteOrder, LittleEndian};
use std::os::unix::fs::FileExt;

use super::{
    Vci, BLOCK, HEADER_BLOCKS, HEADER_BYTES, H_BLKMAP, H_BLOCKS, H_CBLKMAP, H_DISK_SIZE,
    H_MOD_UUID, H_ROOT, H_SIG, H_TYPE, H_UNCLEAN, H_UUID, H_VERSION, MAX_BLOCKS, NODE_BLOCKS,
    SIGNATURE, TYPE_DYNAMIC, TYPE_FIXED, VERSION,
};
use crate::error::{Error, Result};

/// Blocks of the bitmap (header block included) for a cache of `blocks`.
pub(super) fn blkmap_blocks(blocks: u64) -> u64 {
    1 + blocks.div_ceil(8).div_ceil(BLOCK)
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VciHeader {
    pub blocks: u64,
    pub unclean: bool,
    pub fixed: bool,
    pub root: u64,
    pub blkmap: u64,
    pub blkmap_blocks: u32,
    pub uuid: [u8; 16],
    pub modification_uuid: [u8; 16],
    /// The disk's size in bytes (resolved: never 0).
    pub disk_size: u64,
    /// Length of the file in blocks when the header was read.
    pub file_blocks: u64,
}

/// Parses and validates the 1024-byte header of a file `file_len` long.
pub fn parse_header(b: &[u8], file_len: u64) -> Result<VciHeader> {
    if b.len() < HEADER_BYTES || file_len < HEADER_BYTES as u64 {
        return Err(Error::corrupt("VCI: file shorter than its header".into()));
    }
    if LittleEndian::read_u32(&b[H_SIG..]) != SIGNATURE {
        return Err(Error::unsupported("not a VCI image (no signature)".into()));
    }
    let version = LittleEndian::read_u32(&b[H_VERSION..]);
    if version != VERSION {
        return Err(Error::unsupported(format!("VCI version {version}")));
    }
    let blocks = LittleEndian::read_u64(&b[H_BLOCKS..]);
    if blocks == 0 || blocks > MAX_BLOCKS {
        return Err(Error::corrupt(format!(
            "VCI: cache of {blocks} blocks is not in 1..={MAX_BLOCKS}"
        )));
    }
    let unclean = match b[H_UNCLEAN] {
        0 => false,
        1 => true,
        v => return Err(Error::corrupt(format!("VCI: unclean-shutdown flag {v}"))),
    };
    let fixed = match LittleEndian::read_u32(&b[H_TYPE..]) {
        TYPE_DYNAMIC => false,
        TYPE_FIXED => true,
        t => return Err(Error::corrupt(format!("VCI: cache type {t}"))),
    };
    let root = LittleEndian::read_u64(&b[H_ROOT..]);
    let blkmap = LittleEndian::read_u64(&b[H_BLKMAP..]);
    let cblkmap = LittleEndian::read_u32(&b[H_CBLKMAP..]);
    if u64::from(cblkmap) != blkmap_blocks(blocks) {
        return Err(Error::corrupt(format!(
            "VCI: bitmap of {cblkmap} blocks for a cache of {blocks} blocks (expected {})",
            blkmap_blocks(blocks)
        )));
    }
    let file_blocks = file_len / BLOCK;
    let inside = |start: u64, len: u64, what: &str| -> Result<()> {
        match start.checked_add(len) {
            Some(end) if start >= HEADER_BLOCKS && end <= blocks && end <= file_blocks => Ok(()),
            _ => Err(Error::corrupt(format!(
                "VCI: {what} at block {start} (+{len}) lies outside the cache \
                 ({blocks} blocks) or the file ({file_blocks} blocks)"
            ))),
        }
    };
    inside(blkmap, u64::from(cblkmap), "block bitmap")?;
    inside(root, NODE_BLOCKS, "tree root")?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[H_UUID..H_UUID + 16]);
    let mut modification_uuid = [0u8; 16];
    modification_uuid.copy_from_slice(&b[H_MOD_UUID..H_MOD_UUID + 16]);
    let stored_size = LittleEndian::read_u64(&b[H_DISK_SIZE..]);
    let disk_size = if stored_size == 0 {
        blocks * BLOCK
    } else {
        stored_size
    };
    if disk_size.div_ceil(BLOCK) > MAX_BLOCKS {
        return Err(Error::corrupt(format!("VCI: disk size {disk_size}")));
    }
    Ok(VciHeader {
        blocks,
        unclean,
        fixed,
        root,
        blkmap,
        blkmap_blocks: cblkmap,
        uuid,
        modification_uuid,
        disk_size,
        file_blocks,
    })
}

impl Vci {
    pub(super) fn write_header(&self) -> Result<()> {
        let mut b = vec![0u8; HEADER_BYTES];
        self.file
            .read_exact_at(&mut b, 0)
            .map_err(|e| Error::read("VCI header", 0, e))?;
        b[H_UNCLEAN] = u8::from(self.header.unclean);
        LittleEndian::write_u64(&mut b[H_ROOT..], self.header.root);
        b[H_UUID..H_UUID + 16].copy_from_slice(&self.header.uuid);
        b[H_MOD_UUID..H_MOD_UUID + 16].copy_from_slice(&self.header.modification_uuid);
        self.file
            .write_all_at(&b, 0)
            .map_err(|e| Error::write("VCI header", 0, e))
    }
}
