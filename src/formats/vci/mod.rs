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

mod bitmap;
mod commit;
mod create;
mod header;
mod tree;

pub use create::capacity_for;
pub use header::{parse_header, VciHeader};

use self::bitmap::read_blkmap;
use self::tree::{load_tree, Ext};

use byteorder::{ByteOrder, LittleEndian};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::open_read_only;
use super::registry::{CreateParams, ImageOpenOptions};
use crate::disk::{
    check_range, sectors_in, DiscardDisk, Disk, DriveType, ImageFile, ImageMetadata, SectorStatus,
    WritableDisk, SECTOR_SIZE,
};
use crate::error::{Error, ErrorCode, Result};

pub(super) const BLOCK: u64 = 512;
pub const SIGNATURE: u32 = 0x0049_4356;
pub(super) const VERSION: u32 = 1;
pub(super) const HEADER_BYTES: usize = 1024;
pub(super) const HEADER_BLOCKS: u64 = 2;
pub(super) const BLKMAP_MAGIC: u32 = 0x4B4C_4256;
pub(super) const BLKMAP_VERSION: u32 = 1;
pub(super) const NODE_BYTES: usize = 4096;
pub(super) const NODE_BLOCKS: u64 = 8;
pub(super) const NODE_INTERNAL: u8 = 1;
pub(super) const NODE_LEAF: u8 = 2;
pub(super) const EXTENT_BYTES: usize = 38;
pub(super) const INTERNAL_BYTES: usize = 20;
/// Extents per leaf.
pub const LEAF_ENTRIES: usize = (NODE_BYTES - 1) / EXTENT_BYTES;
/// Children per internal node.
pub const INTERNAL_ENTRIES: usize = (NODE_BYTES - 1) / INTERNAL_BYTES;
pub(super) const TYPE_DYNAMIC: u32 = 1;
pub(super) const TYPE_FIXED: u32 = 2;
/// Deepest tree accepted (107 * 204^7 extents is beyond any disk).
pub(super) const MAX_DEPTH: u32 = 8;
/// Largest cache accepted, in blocks (2^48 blocks = 128 PiB).
pub(super) const MAX_BLOCKS: u64 = 1 << 48;

// Header field offsets.
pub(super) const H_SIG: usize = 0;
pub(super) const H_VERSION: usize = 4;
pub(super) const H_BLOCKS: usize = 8;
pub(super) const H_UNCLEAN: usize = 16;
pub(super) const H_TYPE: usize = 17;
pub(super) const H_ROOT: usize = 21;
pub(super) const H_BLKMAP: usize = 29;
pub(super) const H_CBLKMAP: usize = 37;
pub(super) const H_UUID: usize = 41;
pub(super) const H_MOD_UUID: usize = 57;
pub(super) const H_DISK_SIZE: usize = 73;

/// True when the file starts with the VCI signature and version.
pub fn probe(file: &File) -> bool {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 0).is_ok()
        && LittleEndian::read_u32(&b[0..]) == SIGNATURE
        && LittleEndian::read_u32(&b[4..]) == VERSION
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
    /// Opens an image, validating header, bitmap and the whole tree.
    pub fn open(path: &Path, options: &VciOptions) -> Result<Vci> {
        let file = if options.writable {
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::open(e.to_string()).with_path(path))?
        } else {
            open_read_only(path)?
        };
        let name = path.display().to_string();
        let with_path = |e: Error| match e.kind() {
            ErrorCode::Corrupt | ErrorCode::Unsupported => e.with_path(path),
            _ => e,
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::open(format!("{name}: {e}")))?
            .len();
        let mut hb = vec![0u8; HEADER_BYTES.min(file_len as usize)];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| Error::read(&name, 0, e))?;
        let header = parse_header(&hb, file_len).map_err(with_path)?;
        if header.unclean && !options.repair {
            return Err(Error::corrupt(format!(
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
                    return Err(Error::corrupt(format!(
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
            return Err(Error::corrupt(format!(
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

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only(format!(
                "{} is open read-only",
                self.path.display()
            )));
        }
        Ok(())
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
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
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
                    crate::file_io::read_exact_at(&self.file, part, at)
                        .map_err(|err| Error::read("VCI data", at, err))?;
                    status = status.combine(SectorStatus::Normal);
                }
                None => part.fill(0),
            }
            done += run;
        }
        Ok(status)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
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
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Err(Error::invalid_argument(
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
        if let Ok(img) = Vci::open(&path, &options) {
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
