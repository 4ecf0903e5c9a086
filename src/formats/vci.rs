//! VirtualBox cache images (VCI), read and written — including the write
//! path VirtualBox itself never finished.
//!
//! # Format facts relied on
//!
//! All numbers little-endian, all structures packed; the file is addressed
//! in 512-byte *blocks*.
//!
//! * **Header**, 1024 bytes at block 0: signature `0x00494356` ("VCI\0")
//!   at 0, version 1 at 4, `cBlocksCache` (u64, the file's maximum size in
//!   blocks, metadata included) at 8, the unclean-shutdown flag (u8, 1 =
//!   not closed cleanly) at 16, the cache type (u32: 1 dynamic, 2 fixed) at
//!   17, the B+-tree root's address (u64) at 21, the block bitmap's address
//!   (u64) at 29 and its size in blocks (u32) at 37, the image UUID at 41,
//!   the modification UUID at 57, then reserved bytes to 1024.
//! * **Block bitmap**: a 512-byte header (magic `0x4B4C4256` at 0, version
//!   1 at 4, then u64 counts: blocks managed at 8, free at 16, allocated to
//!   metadata at 24, allocated to data at 32), followed by one bit per block
//!   of the file (bit `n % 8` of byte `n / 8`, set = allocated).
//! * **Tree nodes**, 4096 bytes (8 blocks): a type byte (1 internal, 2
//!   leaf) and packed entries. A leaf holds up to 107 extents of 38 bytes:
//!   LRU previous and next (u64 each), flags (u8, 0), a reserved byte, the
//!   first cached block of the disk (u64), the number of blocks (u32) and
//!   the block in the file where the data is (u64). An internal node holds
//!   up to 204 entries of 20 bytes: first disk block (u64), blocks covered
//!   (u32), child node address (u64). An entry with a zero count or zero
//!   address is unused.
//!
//! # Where the upstream code is ambiguous, and what we chose
//!
//! * **Units of the header's offsets.** The header's comments say the tree
//!   root and bitmap offsets are in blocks; upstream's open code passes them
//!   to byte-addressed reads, and its create code writes the bitmap and root
//!   at those numbers taken as bytes. We use blocks everywhere, as the
//!   structure documents.
//! * **Bitmap size.** Upstream's create rounds `cBlocks / 8` *up* to a
//!   whole block; its load demands it rounded *down*. We write and demand
//!   `ceil(ceil(cBlocks / 8) / 512)` bitmap blocks plus the one header block.
//! * **Bitmap counts.** Upstream swaps the metadata and data counters when
//!   allocating and converts the u64 counts with 32-bit helpers. We store
//!   true u64 counts and check `free + meta + data == blocks`.
//! * **The disk's size.** The header has no virtual disk size (a cache
//!   serves offsets of some other disk; upstream reports the cache's size).
//!   We store the disk's size in bytes as a u64 in the reserved area at
//!   byte 73; 0 there (as in upstream-made images) means the disk is as
//!   large as the cache (`cBlocksCache * 512`).
//! * **Capacity.** We create `cBlocksCache` large enough for the whole disk
//!   plus header, bitmap and the worst-case tree twice over (old and new
//!   tree coexist while a flush commits), so a cache of a disk never runs
//!   full. A fixed image is made at that full length up front.
//! * **Internal entries' block count.** We write the span from the child's
//!   first extent to the end of its last (capped at `u32::MAX`) and navigate
//!   by the first-block keys; a child's extents must lie inside its key
//!   range and its span.
//! * **Used entries** must be contiguous from the start of a node (upstream
//!   counts them anywhere but then searches only the first ones); LRU links
//!   are written as 0 and ignored; non-zero extent flags are refused.
//! * **Commit and crash safety** (upstream has none): the tree is kept in
//!   memory and written, whole and copy-on-write, into free blocks at each
//!   flush; then the bitmap; a sync; then the header is switched to the new
//!   root and synced. Blocks freed since the last commit (old tree nodes,
//!   discarded data) are not reused before the next commit. The unclean flag
//!   is set while the image is open for writing and cleared by a clean
//!   close. An image found with the flag set is refused unless the caller
//!   asks for repair; repair validates the committed tree (it is complete by
//!   the ordering above) and rebuilds the bitmap from it. Anything
//!   inconsistent is refused as corrupt.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::open_read_only;
use super::registry::{CreateParams, ImageOpenOptions};
use crate::disk::{
    check_range, sectors_in, DiscardDisk, Disk, DriveType, ImageFile, ImageMetadata, SectorStatus,
    WritableDisk, SECTOR_SIZE,
};
use crate::error::{Error, Result};

const BLOCK: u64 = 512;
pub const SIGNATURE: u32 = 0x0049_4356;
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 1024;
const HEADER_BLOCKS: u64 = 2;
const BLKMAP_MAGIC: u32 = 0x4B4C_4256;
const BLKMAP_VERSION: u32 = 1;
const NODE_BYTES: usize = 4096;
const NODE_BLOCKS: u64 = 8;
const NODE_INTERNAL: u8 = 1;
const NODE_LEAF: u8 = 2;
const EXTENT_BYTES: usize = 38;
const INTERNAL_BYTES: usize = 20;
/// Extents per leaf.
pub const LEAF_ENTRIES: usize = (NODE_BYTES - 1) / EXTENT_BYTES;
/// Children per internal node.
pub const INTERNAL_ENTRIES: usize = (NODE_BYTES - 1) / INTERNAL_BYTES;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
/// Deepest tree accepted (107 * 204^7 extents is beyond any disk).
const MAX_DEPTH: u32 = 8;
/// Largest cache accepted, in blocks (2^48 blocks = 128 PiB).
const MAX_BLOCKS: u64 = 1 << 48;

// Header field offsets.
const H_SIG: usize = 0;
const H_VERSION: usize = 4;
const H_BLOCKS: usize = 8;
const H_UNCLEAN: usize = 16;
const H_TYPE: usize = 17;
const H_ROOT: usize = 21;
const H_BLKMAP: usize = 29;
const H_CBLKMAP: usize = 37;
const H_UUID: usize = 41;
const H_MOD_UUID: usize = 57;
const H_DISK_SIZE: usize = 73;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Blocks of the bitmap (header block included) for a cache of `blocks`.
fn blkmap_blocks(blocks: u64) -> u64 {
    1 + blocks.div_ceil(8).div_ceil(BLOCK)
}

/// Tree nodes needed in the worst case for `extents` extents.
fn worst_nodes(extents: u64) -> u64 {
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

/// True when the file starts with the VCI signature and version.
pub fn probe(file: &File) -> bool {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 0).is_ok() && le32(&b, 0) == SIGNATURE && le32(&b, 4) == VERSION
}

/// `probe` by path.
pub fn probe_path(path: &Path) -> bool {
    File::open(path).map(|f| probe(&f)).unwrap_or(false)
}

/// The format table's open: read-only, no repair.
pub fn open_boxed(
    path: &Path,
    _options: &super::OpenOptions,
    _depth: usize,
) -> Result<Box<dyn Disk>> {
    Ok(Box::new(Vci::open(path, &VciOptions::default())?))
}

/// The format table's image open: writable or read-only, repairing when
/// asked (a VCI image has no backing file).
pub fn open_image(path: &Path, options: &ImageOpenOptions) -> Result<Box<dyn ImageFile>> {
    Ok(Box::new(Vci::open(
        path,
        &VciOptions {
            writable: options.writable,
            repair: options.repair,
        },
    )?))
}

/// The format table's create.
pub fn create_image(path: &Path, params: &CreateParams) -> Result<Box<dyn ImageFile>> {
    Ok(Box::new(Vci::create(path, params)?))
}

/// How to open a VCI image.
#[derive(Debug, Clone, Default)]
pub struct VciOptions {
    pub writable: bool,
    /// Accept an image whose unclean-shutdown flag is set, after checking
    /// its tree and rebuilding its bitmap.
    pub repair: bool,
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
        return Err(Error::Corrupt("VCI: file shorter than its header".into()));
    }
    if le32(b, H_SIG) != SIGNATURE {
        return Err(Error::Unsupported("not a VCI image (no signature)".into()));
    }
    let version = le32(b, H_VERSION);
    if version != VERSION {
        return Err(Error::Unsupported(format!("VCI version {version}")));
    }
    let blocks = le64(b, H_BLOCKS);
    if blocks == 0 || blocks > MAX_BLOCKS {
        return Err(Error::Corrupt(format!(
            "VCI: cache of {blocks} blocks is not in 1..={MAX_BLOCKS}"
        )));
    }
    let unclean = match b[H_UNCLEAN] {
        0 => false,
        1 => true,
        v => return Err(Error::Corrupt(format!("VCI: unclean-shutdown flag {v}"))),
    };
    let fixed = match le32(b, H_TYPE) {
        TYPE_DYNAMIC => false,
        TYPE_FIXED => true,
        t => return Err(Error::Corrupt(format!("VCI: cache type {t}"))),
    };
    let root = le64(b, H_ROOT);
    let blkmap = le64(b, H_BLKMAP);
    let cblkmap = le32(b, H_CBLKMAP);
    if u64::from(cblkmap) != blkmap_blocks(blocks) {
        return Err(Error::Corrupt(format!(
            "VCI: bitmap of {cblkmap} blocks for a cache of {blocks} blocks (expected {})",
            blkmap_blocks(blocks)
        )));
    }
    let file_blocks = file_len / BLOCK;
    let inside = |start: u64, len: u64, what: &str| -> Result<()> {
        match start.checked_add(len) {
            Some(end) if start >= HEADER_BLOCKS && end <= blocks && end <= file_blocks => Ok(()),
            _ => Err(Error::Corrupt(format!(
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
    let stored_size = le64(b, H_DISK_SIZE);
    let disk_size = if stored_size == 0 {
        blocks * BLOCK
    } else {
        stored_size
    };
    if disk_size.div_ceil(BLOCK) > MAX_BLOCKS {
        return Err(Error::Corrupt(format!("VCI: disk size {disk_size}")));
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

/// One extent: `len` disk blocks from a start (the map's key) stored from
/// file block `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ext {
    len: u64,
    addr: u64,
}

/// An open VCI image.
pub struct Vci {
    file: File,
    path: PathBuf,
    writable: bool,
    header: VciHeader,
    /// Allocation state: committed metadata, extents, and blocks freed
    /// since the last commit (still marked until the commit).
    bitmap: Vec<u8>,
    pending_free: Vec<(u64, u64)>,
    extents: BTreeMap<u64, Ext>,
    /// Node blocks of the committed tree.
    tree_nodes: Vec<u64>,
    depth: u32,
    dirty: bool,
    header_dirty: bool,
    unsynced: bool,
    cursor: u64,
    closed: bool,
}

impl Vci {
    /// Creates an image for a disk of `params.size` bytes (rounded up to
    /// 512), fixed when `params.fixed`, and opens it for
    /// writing. Fails if `path` exists.
    pub fn create(path: &Path, params: &CreateParams) -> Result<Vci> {
        if params.size == 0 {
            return Err(Error::InvalidArgument("VCI: disk size 0".into()));
        }
        if params.differencing {
            return Err(Error::Unsupported(
                "VCI: a cache image cannot be a differencing image".into(),
            ));
        }
        let disk_blocks = params.size.div_ceil(BLOCK);
        if disk_blocks > MAX_BLOCKS / 2 {
            return Err(Error::InvalidArgument(format!(
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
        put32(&mut b, H_SIG, SIGNATURE);
        put32(&mut b, H_VERSION, VERSION);
        put64(&mut b, H_BLOCKS, blocks);
        b[H_UNCLEAN] = 0;
        put32(
            &mut b,
            H_TYPE,
            if fixed { TYPE_FIXED } else { TYPE_DYNAMIC },
        );
        put64(&mut b, H_ROOT, root);
        put64(&mut b, H_BLKMAP, blkmap);
        put32(&mut b, H_CBLKMAP, cblkmap as u32);
        let uuid = params
            .uuid
            .unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
        b[H_UUID..H_UUID + 16].copy_from_slice(&uuid);
        b[H_MOD_UUID..H_MOD_UUID + 16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        put64(&mut b, H_DISK_SIZE, params.size);
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

    /// Opens an image, validating header, bitmap and the whole tree.
    pub fn open(path: &Path, options: &VciOptions) -> Result<Vci> {
        let file = if options.writable {
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?
        } else {
            open_read_only(path)?
        };
        let name = path.display().to_string();
        let with_path = |e: Error| match e {
            Error::Corrupt(m) => Error::Corrupt(format!("{name}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{name}: {m}")),
            other => other,
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::Open(format!("{name}: {e}")))?
            .len();
        let mut hb = vec![0u8; HEADER_BYTES.min(file_len as usize)];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| Error::read(&name, 0, e))?;
        let header = parse_header(&hb, file_len).map_err(with_path)?;
        if header.unclean && !options.repair {
            return Err(Error::Corrupt(format!(
                "{name}: the VCI image was not closed cleanly (its unclean-shutdown flag is set: \
                 a writer crashed, or still has it open); open it with the repair flag \
                 (COW_OPEN_REPAIR) to check its tree and rebuild its block bitmap"
            )));
        }
        let on_disk = read_blkmap(&file, &header).map_err(with_path)?;
        let (extents, tree_nodes, depth) = load_tree(&file, &header).map_err(with_path)?;
        // The allocation state implied by the tree.
        let mut bitmap = vec![0u8; on_disk.len()];
        let mut mark = |start: u64, len: u64, what: &str| -> Result<()> {
            for n in start..start + len {
                let (byte, bit) = ((n / 8) as usize, 1u8 << (n % 8));
                if bitmap[byte] & bit != 0 {
                    return Err(Error::Corrupt(format!(
                        "{name}: block {n} ({what}) is used twice"
                    )));
                }
                bitmap[byte] |= bit;
            }
            Ok(())
        };
        mark(0, HEADER_BLOCKS, "header")?;
        mark(header.blkmap, u64::from(header.blkmap_blocks), "bitmap")?;
        for &n in &tree_nodes {
            mark(n, NODE_BLOCKS, "tree node")?;
        }
        for e in extents.values() {
            mark(e.addr, e.len, "data")?;
        }
        if !header.unclean && bitmap != on_disk {
            return Err(Error::Corrupt(format!(
                "{name}: the block bitmap disagrees with the tree"
            )));
        }
        let mut vci = Vci {
            file,
            path: path.to_path_buf(),
            writable: options.writable,
            header,
            bitmap,
            pending_free: Vec::new(),
            extents,
            tree_nodes,
            depth,
            dirty: false,
            header_dirty: false,
            unsynced: false,
            cursor: 0,
            closed: !options.writable,
        };
        if options.writable {
            // Repaired bitmap first, then mark the image in use.
            vci.write_bitmap()?;
            vci.header.unclean = true;
            vci.write_header()?;
            vci.file
                .sync_data()
                .map_err(|e| Error::write("VCI open sync", 0, e))?;
        }
        Ok(vci)
    }

    /// The parsed header (as of the last commit).
    pub fn header(&self) -> &VciHeader {
        &self.header
    }

    /// Levels of the committed tree (1: the root is a leaf).
    pub fn tree_depth(&self) -> u32 {
        self.depth
    }

    /// Extents in the (in-memory) map.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    fn disk_blocks(&self) -> u64 {
        self.header.disk_size.div_ceil(BLOCK)
    }

    fn bit(&self, n: u64) -> bool {
        self.bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    fn set_bits(&mut self, start: u64, len: u64, on: bool) {
        for n in start..start + len {
            let (byte, bit) = ((n / 8) as usize, 1u8 << (n % 8));
            if on {
                self.bitmap[byte] |= bit;
            } else {
                self.bitmap[byte] &= !bit;
            }
        }
    }

    /// Finds `want` free blocks (fewer if `contiguous` is false and no run
    /// is that long), marks them, and returns (start, len).
    fn allocate(&mut self, want: u64, contiguous: bool) -> Option<(u64, u64)> {
        let total = self.header.blocks;
        let mut scanned = 0u64;
        let mut n = if self.cursor >= total { 0 } else { self.cursor };
        while scanned < total {
            if !self.bit(n) {
                let mut len = 1;
                while len < want && n + len < total && !self.bit(n + len) {
                    len += 1;
                }
                if len == want || !contiguous {
                    self.set_bits(n, len, true);
                    self.cursor = n + len;
                    return Some((n, len));
                }
                scanned += len;
                n += len;
            } else {
                scanned += 1;
                n += 1;
            }
            if n >= total {
                n = 0;
            }
        }
        None
    }

    /// `allocate`, committing first to release pending frees if needed.
    fn allocate_or_commit(&mut self, want: u64, contiguous: bool) -> Result<(u64, u64)> {
        if let Some(r) = self.allocate(want, contiguous) {
            return Ok(r);
        }
        if !self.pending_free.is_empty() {
            self.commit()?;
            if let Some(r) = self.allocate(want, contiguous) {
                return Ok(r);
            }
        }
        Err(Error::NoSpace(format!(
            "{}: the cache ({} blocks) is full",
            self.path.display(),
            self.header.blocks
        )))
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "{} is open read-only",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// The extent holding block `b`, or the start of the next one.
    fn lookup(&self, b: u64) -> (Option<(u64, Ext)>, Option<u64>) {
        if let Some((&s, &e)) = self.extents.range(..=b).next_back() {
            if b < s + e.len {
                return (Some((s, e)), None);
            }
        }
        (None, self.extents.range(b..).next().map(|(&s, _)| s))
    }

    /// Removes blocks [start, start+len) from the map; their data blocks
    /// become pending-free.
    fn unmap(&mut self, start: u64, len: u64) {
        let end = start + len;
        let mut hit: Vec<(u64, Ext)> = Vec::new();
        if let Some((&s, &e)) = self.extents.range(..start).next_back() {
            if s + e.len > start {
                hit.push((s, e));
            }
        }
        hit.extend(self.extents.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in hit {
            self.extents.remove(&s);
            let e_end = s + e.len;
            if s < start {
                self.extents.insert(
                    s,
                    Ext {
                        len: start - s,
                        addr: e.addr,
                    },
                );
            }
            if e_end > end {
                self.extents.insert(
                    end,
                    Ext {
                        len: e_end - end,
                        addr: e.addr + (end - s),
                    },
                );
            }
            let cut_start = s.max(start);
            let cut_end = e_end.min(end);
            self.pending_free
                .push((e.addr + (cut_start - s), cut_end - cut_start));
        }
        self.dirty = true;
    }

    /// Maps [start, start+len) to file blocks from `addr`, merging with a
    /// neighbour that continues it on disk too.
    fn map(&mut self, start: u64, len: u64, addr: u64) {
        let (mut s, mut l, mut a) = (start, len, addr);
        if let Some((&ps, &pe)) = self.extents.range(..start).next_back() {
            if ps + pe.len == start && pe.addr + pe.len == addr && pe.len + l <= u64::from(u32::MAX)
            {
                self.extents.remove(&ps);
                s = ps;
                l += pe.len;
                a = pe.addr;
            }
        }
        if let Some(&ne) = self.extents.get(&(start + len)) {
            if addr + len == ne.addr && l + ne.len <= u64::from(u32::MAX) {
                self.extents.remove(&(start + len));
                l += ne.len;
            }
        }
        self.extents.insert(s, Ext { len: l, addr: a });
        self.dirty = true;
    }

    fn write_header(&self) -> Result<()> {
        let mut b = vec![0u8; HEADER_BYTES];
        self.file
            .read_exact_at(&mut b, 0)
            .map_err(|e| Error::read("VCI header", 0, e))?;
        b[H_UNCLEAN] = u8::from(self.header.unclean);
        put64(&mut b, H_ROOT, self.header.root);
        b[H_UUID..H_UUID + 16].copy_from_slice(&self.header.uuid);
        b[H_MOD_UUID..H_MOD_UUID + 16].copy_from_slice(&self.header.modification_uuid);
        self.file
            .write_all_at(&b, 0)
            .map_err(|e| Error::write("VCI header", 0, e))
    }

    fn counts(&self) -> (u64, u64) {
        let data: u64 = self.extents.values().map(|e| e.len).sum();
        let used: u64 = self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        (used - data.min(used), data.min(used))
    }

    fn write_bitmap(&self) -> Result<()> {
        let (meta, data) = self.counts();
        write_blkmap(
            &self.file,
            self.header.blkmap,
            self.header.blocks,
            meta,
            data,
            &self.bitmap,
        )
    }

    /// Writes the tree copy-on-write, the bitmap, then switches the header
    /// to the new root; see the module documentation.
    fn commit(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| Error::write("VCI data sync", 0, e))?;
            self.unsynced = false;
        }
        if !self.dirty && !self.header_dirty {
            return Ok(());
        }
        let (root, nodes, depth) = if self.dirty {
            self.write_tree()?
        } else {
            (self.header.root, self.tree_nodes.clone(), self.depth)
        };
        self.write_bitmap()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI metadata sync", 0, e))?;
        let old_root = self.header.root;
        self.header.root = root;
        if let Err(e) = self.write_header().and_then(|_| {
            self.file
                .sync_data()
                .map_err(|e| Error::write("VCI header sync", 0, e))
        }) {
            self.header.root = old_root;
            return Err(e);
        }
        if self.dirty {
            let old = std::mem::replace(&mut self.tree_nodes, nodes);
            for n in old {
                self.set_bits(n, NODE_BLOCKS, false);
            }
            self.depth = depth;
        }
        for (a, l) in std::mem::take(&mut self.pending_free) {
            self.set_bits(a, l, false);
        }
        self.dirty = false;
        self.header_dirty = false;
        Ok(())
    }

    /// Writes the in-memory map as a new tree in free blocks; returns
    /// (root, node blocks, depth).
    fn write_tree(&mut self) -> Result<(u64, Vec<u64>, u32)> {
        let mut nodes = Vec::new();
        let entries: Vec<(u64, Ext)> = self.extents.iter().map(|(&s, &e)| (s, e)).collect();
        // Level 0: leaves. Each item: (first block, end block, node addr).
        let mut level: Vec<(u64, u64, u64)> = Vec::new();
        let chunks: Vec<&[(u64, Ext)]> = if entries.is_empty() {
            vec![&[]]
        } else {
            entries.chunks(LEAF_ENTRIES).collect()
        };
        for chunk in chunks {
            let mut node = vec![0u8; NODE_BYTES];
            node[0] = NODE_LEAF;
            for (i, (s, e)) in chunk.iter().enumerate() {
                let at = 1 + i * EXTENT_BYTES;
                put64(&mut node, at + 18, *s);
                put32(&mut node, at + 26, e.len as u32);
                put64(&mut node, at + 30, e.addr);
            }
            let addr = self.write_node(&node, &mut nodes)?;
            let first = chunk.first().map_or(0, |c| c.0);
            let end = chunk.last().map_or(0, |c| c.0 + c.1.len);
            level.push((first, end, addr));
        }
        let mut depth = 1;
        while level.len() > 1 {
            let mut next = Vec::new();
            for chunk in level.chunks(INTERNAL_ENTRIES) {
                let mut node = vec![0u8; NODE_BYTES];
                node[0] = NODE_INTERNAL;
                for (i, (first, end, child)) in chunk.iter().enumerate() {
                    let at = 1 + i * INTERNAL_BYTES;
                    put64(&mut node, at, *first);
                    put32(
                        &mut node,
                        at + 8,
                        (end - first).min(u64::from(u32::MAX)) as u32,
                    );
                    put64(&mut node, at + 12, *child);
                }
                let addr = self.write_node(&node, &mut nodes)?;
                next.push((chunk[0].0, chunk[chunk.len() - 1].1, addr));
            }
            level = next;
            depth += 1;
        }
        Ok((level[0].2, nodes, depth))
    }

    fn write_node(&mut self, node: &[u8], nodes: &mut Vec<u64>) -> Result<u64> {
        let (addr, _) = match self.allocate(NODE_BLOCKS, true) {
            Some(r) => r,
            None => {
                for &n in nodes.iter() {
                    self.set_bits(n, NODE_BLOCKS, false);
                }
                return Err(Error::NoSpace(format!(
                    "{}: no room for the tree in the cache",
                    self.path.display()
                )));
            }
        };
        nodes.push(addr);
        self.file
            .write_all_at(node, addr * BLOCK)
            .map_err(|e| Error::write("VCI tree node", addr * BLOCK, e))?;
        Ok(addr)
    }

    /// Drops the image as a crash would: nothing more is written (tests).
    #[cfg(feature = "test-utils")]
    pub fn simulate_crash(mut self) {
        self.closed = true;
    }

    fn close_inner(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.commit()?;
        self.write_bitmap()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI bitmap sync", 0, e))?;
        self.header.unclean = false;
        self.write_header()?;
        self.file
            .sync_data()
            .map_err(|e| Error::write("VCI header sync", 0, e))
    }
}

fn write_blkmap(
    file: &File,
    at: u64,
    blocks: u64,
    meta: u64,
    data: u64,
    bits: &[u8],
) -> Result<()> {
    let mut h = vec![0u8; BLOCK as usize];
    put32(&mut h, 0, BLKMAP_MAGIC);
    put32(&mut h, 4, BLKMAP_VERSION);
    put64(&mut h, 8, blocks);
    put64(&mut h, 16, blocks - meta - data);
    put64(&mut h, 24, meta);
    put64(&mut h, 32, data);
    file.write_all_at(&h, at * BLOCK)
        .map_err(|e| Error::write("VCI bitmap header", at * BLOCK, e))?;
    file.write_all_at(bits, (at + 1) * BLOCK)
        .map_err(|e| Error::write("VCI bitmap", (at + 1) * BLOCK, e))
}

fn read_blkmap(file: &File, header: &VciHeader) -> Result<Vec<u8>> {
    let mut h = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut h, header.blkmap * BLOCK)
        .map_err(|e| Error::read("VCI bitmap header", header.blkmap * BLOCK, e))?;
    if le32(&h, 0) != BLKMAP_MAGIC || le32(&h, 4) != BLKMAP_VERSION {
        return Err(Error::Corrupt(
            "VCI: bad block bitmap magic or version".into(),
        ));
    }
    let (blocks, free, meta, data) = (le64(&h, 8), le64(&h, 16), le64(&h, 24), le64(&h, 32));
    let sum = free.checked_add(meta).and_then(|v| v.checked_add(data));
    if blocks != header.blocks || sum != Some(blocks) {
        return Err(Error::Corrupt(format!(
            "VCI: block bitmap counts {blocks} = {free} free + {meta} meta + {data} data \
             do not add up for a cache of {} blocks",
            header.blocks
        )));
    }
    let mut bits = vec![0u8; (u64::from(header.blkmap_blocks) - 1) as usize * BLOCK as usize];
    file.read_exact_at(&mut bits, (header.blkmap + 1) * BLOCK)
        .map_err(|e| Error::read("VCI bitmap", (header.blkmap + 1) * BLOCK, e))?;
    // Bits past the cache's end must be clear.
    for n in header.blocks..bits.len() as u64 * 8 {
        if bits[(n / 8) as usize] & (1 << (n % 8)) != 0 {
            return Err(Error::Corrupt(format!(
                "VCI: bitmap marks block {n}, past the cache's end"
            )));
        }
    }
    let set: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != meta + data {
        return Err(Error::Corrupt(format!(
            "VCI: bitmap has {set} blocks set but its header counts {}",
            meta + data
        )));
    }
    Ok(bits)
}

type Tree = (BTreeMap<u64, Ext>, Vec<u64>, u32);

/// Loads and validates the whole tree.
fn load_tree(file: &File, header: &VciHeader) -> Result<Tree> {
    let mut extents = BTreeMap::new();
    let mut nodes = Vec::new();
    let mut seen = HashSet::new();
    let limit = (0, u64::MAX);
    let mut leaf_depth = None;
    walk(
        file,
        header,
        header.root,
        1,
        limit,
        &mut extents,
        &mut nodes,
        &mut seen,
        &mut leaf_depth,
    )?;
    Ok((extents, nodes, leaf_depth.unwrap_or(1)))
}

#[allow(clippy::too_many_arguments)]
fn walk(
    file: &File,
    header: &VciHeader,
    addr: u64,
    depth: u32,
    (lo, hi): (u64, u64),
    extents: &mut BTreeMap<u64, Ext>,
    nodes: &mut Vec<u64>,
    seen: &mut HashSet<u64>,
    leaf_depth: &mut Option<u32>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Corrupt(format!(
            "VCI: tree deeper than {MAX_DEPTH} levels"
        )));
    }
    let file_blocks = header.blocks.min(header.file_blocks);
    match addr.checked_add(NODE_BLOCKS) {
        Some(end) if addr >= HEADER_BLOCKS && end <= file_blocks => {}
        _ => {
            return Err(Error::Corrupt(format!(
                "VCI: tree node at block {addr} lies outside the cache"
            )))
        }
    }
    if !seen.insert(addr) {
        return Err(Error::Corrupt(format!(
            "VCI: tree node at block {addr} is reached twice (a loop or shared node)"
        )));
    }
    nodes.push(addr);
    let mut node = vec![0u8; NODE_BYTES];
    file.read_exact_at(&mut node, addr * BLOCK)
        .map_err(|e| Error::Corrupt(format!("VCI: tree node at block {addr}: {e}")))?;
    match node[0] {
        NODE_LEAF => {
            if *leaf_depth.get_or_insert(depth) != depth {
                return Err(Error::Corrupt("VCI: leaves at different depths".into()));
            }
            let disk_blocks = header.disk_size.div_ceil(BLOCK);
            let mut prev_end = lo;
            let mut ended = false;
            for i in 0..LEAF_ENTRIES {
                let at = 1 + i * EXTENT_BYTES;
                let flags = node[at + 16];
                let start = le64(&node, at + 18);
                let len = u64::from(le32(&node, at + 26));
                let data = le64(&node, at + 30);
                // LRU links (at + 0, at + 8): ignored.
                if len == 0 || data == 0 {
                    ended = true;
                    continue;
                }
                if ended {
                    return Err(Error::Corrupt(format!(
                        "VCI: leaf at block {addr} has a used entry after an unused one"
                    )));
                }
                if flags != 0 {
                    return Err(Error::Unsupported(format!(
                        "VCI: extent flags {flags:#x} (compression/encryption) are not supported"
                    )));
                }
                let end = start.saturating_add(len);
                if start < prev_end || end > hi || end > disk_blocks {
                    return Err(Error::Corrupt(format!(
                        "VCI: extent {start}+{len} in leaf {addr} overlaps, is out of order, \
                         or lies outside its parent's range or the disk"
                    )));
                }
                match data.checked_add(len) {
                    Some(de) if data >= HEADER_BLOCKS && de <= file_blocks => {}
                    _ => {
                        return Err(Error::Corrupt(format!(
                            "VCI: extent data at block {data}+{len} lies outside the cache \
                             or the file"
                        )))
                    }
                }
                prev_end = end;
                extents.insert(start, Ext { len, addr: data });
            }
            Ok(())
        }
        NODE_INTERNAL => {
            let mut children: Vec<(u64, u64, u64)> = Vec::new();
            let mut ended = false;
            for i in 0..INTERNAL_ENTRIES {
                let at = 1 + i * INTERNAL_BYTES;
                let first = le64(&node, at);
                let span = u64::from(le32(&node, at + 8));
                let child = le64(&node, at + 12);
                if span == 0 || child == 0 {
                    ended = true;
                    continue;
                }
                if ended {
                    return Err(Error::Corrupt(format!(
                        "VCI: internal node at block {addr} has a used entry after an unused one"
                    )));
                }
                children.push((first, span, child));
            }
            if children.is_empty() {
                return Err(Error::Corrupt(format!(
                    "VCI: internal node at block {addr} has no children"
                )));
            }
            for (i, &(first, span, child)) in children.iter().enumerate() {
                let next = children.get(i + 1).map_or(hi, |c| c.0);
                if first < lo || first >= next || next > hi {
                    return Err(Error::Corrupt(format!(
                        "VCI: internal node at block {addr}: keys out of order"
                    )));
                }
                let span_end = if span == u64::from(u32::MAX) {
                    next
                } else {
                    first.saturating_add(span).min(next)
                };
                let before = extents.len();
                walk(
                    file,
                    header,
                    child,
                    depth + 1,
                    (first, span_end),
                    extents,
                    nodes,
                    seen,
                    leaf_depth,
                )?;
                if extents.len() == before {
                    return Err(Error::Corrupt(format!(
                        "VCI: internal node at block {addr} points to an empty child"
                    )));
                }
            }
            Ok(())
        }
        t => Err(Error::Corrupt(format!(
            "VCI: tree node at block {addr} has type {t}"
        ))),
    }
}

impl Disk for Vci {
    fn drive_type(&self) -> DriveType {
        DriveType::Vci
    }
    fn sector_count(&self) -> u64 {
        self.disk_blocks()
    }
    fn byte_size(&self) -> u64 {
        self.header.disk_size
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        Some(self.header.uuid)
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.sector_count())?;
        let mut status = SectorStatus::NotAlloc;
        let mut done = 0;
        while done < count {
            let b = lba + done;
            let left = count - done;
            let (run, at) = match self.lookup(b) {
                (Some((s, e)), _) => ((s + e.len - b).min(left), Some((e.addr + (b - s)) * BLOCK)),
                (None, next) => (next.unwrap_or(u64::MAX).min(lba + count) - b, None),
            };
            let part = &mut buf[done as usize * SECTOR_SIZE..(done + run) as usize * SECTOR_SIZE];
            match at {
                Some(at) => {
                    self.file
                        .read_exact_at(part, at)
                        .map_err(|err| Error::read("VCI data", at, err))?;
                    status = status.combine(SectorStatus::Normal);
                }
                None => part.fill(0),
            }
            done += run;
        }
        Ok(status)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Ok(SectorStatus::NotAlloc);
        }
        let (inside, next) = self.lookup(lba);
        Ok(match (inside, next) {
            (Some(_), _) => SectorStatus::Normal,
            (None, Some(n)) if n < lba + count => SectorStatus::Normal,
            _ => SectorStatus::NotAlloc,
        })
    }
    /// From the extent map: inside an extent, data to its end; outside,
    /// unallocated up to the next extent.
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Err(Error::InvalidArgument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        Ok(match self.lookup(lba) {
            (Some((s, e)), _) => (SectorStatus::Normal, (s + e.len - lba).min(count)),
            (None, next) => (
                SectorStatus::NotAlloc,
                next.unwrap_or(u64::MAX).min(lba + count) - lba,
            ),
        })
    }
}

impl WritableDisk for Vci {
    fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let count = sectors_in(data.len())?;
        check_range(lba, count, self.sector_count())?;
        let mut done = 0;
        while done < count {
            let b = lba + done;
            let part = |from: u64, n: u64| {
                &data[from as usize * SECTOR_SIZE..(from + n) as usize * SECTOR_SIZE]
            };
            match self.lookup(b) {
                (Some((s, e)), _) => {
                    let n = (s + e.len - b).min(count - done);
                    let at = (e.addr + (b - s)) * BLOCK;
                    self.file
                        .write_all_at(part(done, n), at)
                        .map_err(|err| Error::write("VCI data", at, err))?;
                    done += n;
                }
                (None, next) => {
                    let gap_end = next.unwrap_or(u64::MAX).min(lba + count);
                    let want = (gap_end - b).min(u64::from(u32::MAX));
                    let (addr, n) = self.allocate_or_commit(want, false)?;
                    let at = addr * BLOCK;
                    if let Err(err) = self.file.write_all_at(part(done, n), at) {
                        self.set_bits(addr, n, false);
                        return Err(Error::write("VCI data", at, err));
                    }
                    self.map(b, n, addr);
                    done += n;
                }
            }
            self.unsynced = true;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.commit()
    }
}

impl DiscardDisk for Vci {
    fn discard_sectors(&mut self, lba: u64, count: u64) -> Result<()> {
        self.check_writable()?;
        check_range(lba, count, self.sector_count())?;
        if count > 0 {
            self.unmap(lba, count);
        }
        Ok(())
    }
}

impl ImageMetadata for Vci {
    fn format_version(&self) -> u32 {
        VERSION
    }
    fn is_fixed(&self) -> bool {
        self.header.fixed
    }
    fn set_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        self.check_writable()?;
        self.header.uuid = uuid;
        self.header_dirty = true;
        Ok(())
    }
    fn modification_uuid(&self) -> Option<[u8; 16]> {
        Some(self.header.modification_uuid)
    }
    fn set_modification_uuid(&mut self, uuid: [u8; 16]) -> Result<()> {
        self.check_writable()?;
        self.header.modification_uuid = uuid;
        self.header_dirty = true;
        Ok(())
    }
}

impl ImageFile for Vci {
    fn held_run(&mut self, lba: u64, count: u64) -> Result<(bool, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Ok((false, 0));
        }
        Ok(match self.lookup(lba) {
            (Some((s, e)), _) => {
                // Follow extents that continue without a gap.
                let mut end = s + e.len;
                while end < lba + count {
                    match self.extents.get(&end) {
                        Some(n) => end += n.len,
                        None => break,
                    }
                }
                (true, end.min(lba + count) - lba)
            }
            (None, next) => (false, next.unwrap_or(u64::MAX).min(lba + count) - lba),
        })
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn file_size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    fn as_discard(&mut self) -> Option<&mut dyn DiscardDisk> {
        Some(self)
    }
    fn dump(&self) -> String {
        let (meta, data) = self.counts();
        format!(
            "VCI {}: disk {} bytes, cache {} blocks ({}), root at block {}, tree depth {}, \
             {} extents, {} data blocks, {} metadata blocks, bitmap at block {} ({} blocks), \
             unclean flag {}",
            self.path.display(),
            self.header.disk_size,
            self.header.blocks,
            if self.header.fixed {
                "fixed"
            } else {
                "dynamic"
            },
            self.header.root,
            self.depth,
            self.extents.len(),
            data,
            meta,
            self.header.blkmap,
            self.header.blkmap_blocks,
            u8::from(self.header.unclean)
        )
    }
    fn close(mut self: Box<Self>) -> Result<()> {
        self.close_inner()
    }
}

impl Drop for Vci {
    fn drop(&mut self) {
        // Best effort; close() reports errors.
        let _ = self.close_inner();
    }
}

/// Fuzz entry point: treats `bytes` as a VCI file and exercises probe,
/// open (plain and repairing) and full reads. Any outcome but a panic,
/// hang or huge allocation is fine; returns whether an open succeeded.
#[cfg(feature = "test-utils")]
pub fn fuzz_one(bytes: &[u8]) -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let path = dir.path().join("fuzz.vci");
    if std::fs::write(&path, bytes).is_err() {
        return false;
    }
    let _ = probe_path(&path);
    let mut opened = false;
    for repair in [false, true] {
        let options = VciOptions {
            writable: false,
            repair,
        };
        if let Ok(mut img) = Vci::open(&path, &options) {
            opened = true;
            let n = img.sector_count().min(4096);
            let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
            let _ = img.read_sectors(0, &mut buf);
            let _ = img.block_status(0, n);
            let _ = img.dump();
        }
    }
    opened
}
