//! Making a new image: its capacity, header, bitmap and empty tree.

use byteorder::{ByteOrder, LittleEndian};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::bitmap::write_blkmap;
use super::header::blkmap_blocks;
use super::{
    Vci, VciOptions, BLOCK, HEADER_BLOCKS, HEADER_BYTES, H_BLKMAP, H_BLOCKS, H_CBLKMAP,
    H_DISK_SIZE, H_MOD_UUID, H_ROOT, H_SIG, H_TYPE, H_UNCLEAN, H_UUID, H_VERSION, INTERNAL_ENTRIES,
    LEAF_ENTRIES, MAX_BLOCKS, NODE_BLOCKS, NODE_BYTES, NODE_LEAF, SIGNATURE, TYPE_DYNAMIC,
    TYPE_FIXED, VERSION,
};
use crate::error::{Error, Result};
use crate::formats::registry::CreateParams;

/// Tree nodes needed in the worst case for `extents` extents.
pub(super) fn worst_nodes(extents: u64) -> u64 {
    let mut level = extents.div_ceil(LEAF_ENTRIES as u64).max(1);
    let mut total = level;
    while level > 1 {
        level = level.div_ceil(INTERNAL_ENTRIES as u64);
        total += level;
    }
    total
}

/// The cache capacity (blocks) we create for a disk of `disk_blocks`.
pub fn capacity_for(disk_blocks: u64) -> u64 {
    let tree = 2 * worst_nodes(disk_blocks) * NODE_BLOCKS;
    let mut cap = disk_blocks + HEADER_BLOCKS + tree;
    loop {
        let next = disk_blocks + HEADER_BLOCKS + tree + blkmap_blocks(cap);
        if next <= cap {
            return cap;
        }
        cap = next;
    }
}

impl Vci {
    /// Creates an image for a disk of `params.size` bytes (rounded up to
    /// 512), fixed when `params.fixed`, and opens it for
    /// writing. Fails if `path` exists.
    pub fn create(path: &Path, params: &CreateParams) -> Result<Vci> {
        if params.size == 0 {
            return Err(Error::invalid_argument("VCI: disk size 0".into()));
        }
        if params.differencing {
            return Err(Error::unsupported(
                "VCI: a cache image cannot be a differencing image".into(),
            ));
        }
        let disk_blocks = params.size.div_ceil(BLOCK);
        if disk_blocks > MAX_BLOCKS / 2 {
            return Err(Error::invalid_argument(format!(
                "VCI: disk size {} too large",
                params.size
            )));
        }
        let blocks = capacity_for(disk_blocks);
        let fixed = params.fixed;
        let cblkmap = blkmap_blocks(blocks);
        let blkmap = HEADER_BLOCKS;
        let root = blkmap + cblkmap;
        let mut b = vec![0u8; HEADER_BYTES];
        LittleEndian::write_u32(&mut b[H_SIG..], SIGNATURE);
        LittleEndian::write_u32(&mut b[H_VERSION..], VERSION);
        LittleEndian::write_u64(&mut b[H_BLOCKS..], blocks);
        b[H_UNCLEAN] = 0;
        LittleEndian::write_u32(
            &mut b[H_TYPE..],
            if fixed { TYPE_FIXED } else { TYPE_DYNAMIC },
        );
        LittleEndian::write_u64(&mut b[H_ROOT..], root);
        LittleEndian::write_u64(&mut b[H_BLKMAP..], blkmap);
        LittleEndian::write_u32(&mut b[H_CBLKMAP..], cblkmap as u32);
        let uuid = params
            .uuid
            .unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
        b[H_UUID..H_UUID + 16].copy_from_slice(&uuid);
        b[H_MOD_UUID..H_MOD_UUID + 16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        LittleEndian::write_u64(&mut b[H_DISK_SIZE..], params.size);
        // Built under a temporary name, synced, renamed into place and the
        // folder synced: a crash never leaves a half-made image at `path`.
        let what = path.display().to_string();
        let (file, ()) = crate::newfile::create_atomically(path, &what, |file| {
            let end = if fixed {
                blocks * BLOCK
            } else {
                (root + NODE_BLOCKS) * BLOCK
            };
            file.set_len(end)
                .map_err(|e| Error::write("VCI file length", end, e))?;
            // Bitmap: header, bitmap and root allocated.
            let mut bitmap = vec![0u8; (cblkmap as usize - 1) * BLOCK as usize];
            let meta = root + NODE_BLOCKS;
            for n in 0..meta {
                bitmap[(n / 8) as usize] |= 1 << (n % 8);
            }
            write_blkmap(file, blkmap, blocks, meta, 0, &bitmap)?;
            let mut node = vec![0u8; NODE_BYTES];
            node[0] = NODE_LEAF;
            file.write_all_at(&node, root * BLOCK)
                .map_err(|e| Error::write("VCI root node", root * BLOCK, e))?;
            file.write_all_at(&b, 0)
                .map_err(|e| Error::write("VCI header", 0, e))
        })?;
        drop(file);
        Vci::open(
            path,
            &VciOptions {
                writable: true,
                repair: false,
            },
        )
    }
}
