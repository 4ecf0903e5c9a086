//! ext2, ext3 and ext4: the superblock, the group descriptors and the
//! block bitmaps.
//!
//! # Format facts relied on (the kernel's ext4 on-disk documentation)
//!
//! * The superblock is the 1024 bytes at byte 1024 of the volume, magic
//!   0xEF53 at 0x38. Fields used (little-endian): blocks count (0x04, high
//!   half at 0x150 with `64bit`), first data block (0x14), log2(block size)
//!   minus 10 (0x18), log2(cluster size) (0x1C), blocks per group (0x20),
//!   inodes per group (0x28), state (0x3A: bit 0 cleanly unmounted, bit 1
//!   errors), revision (0x4C), inode size (0x58; 128 in revision 0),
//!   feature sets compat (0x5C), incompat (0x60), ro_compat (0x64), UUID
//!   (0x68), reserved GDT blocks (0xCE), descriptor size (0xFE, with
//!   `64bit`), first meta block group (0x104), backup groups of
//!   `sparse_super2` (0x24C, two u32), checksum seed (0x270, with
//!   `csum_seed`), superblock checksum (0x3FC, with `metadata_csum`).
//! * Block group `g` starts at block `first_data_block + g * per_group`.
//!   The descriptor table follows the superblock's block; with `meta_bg`,
//!   descriptor block `m` (from `first_meta_bg` on) is the first block of
//!   group `m * per_block` (after its superblock copy, if any).
//! * A descriptor (32 bytes, or the descriptor size with `64bit`): block
//!   bitmap (0x00, high half 0x20), inode bitmap (0x04, 0x24), inode table
//!   (0x08, 0x28), free blocks (0x0C, u16, high half 0x2C), flags (0x12:
//!   1 inodes uninitialised, 2 blocks uninitialised), checksum (0x1E, u16).
//! * A block bitmap is one block; bit `i` (LSB first) is block `i` of the
//!   group, set = used. A group flagged blocks-uninitialised has no bitmap
//!   on disk: only its superblock copy and descriptor blocks are used
//!   there (and the bitmaps and inode tables any descriptor places there).
//! * Superblock copies are in group 0 and, with `sparse_super`, groups 1
//!   and the powers of 3, 5 and 7 (with `sparse_super2`: the two groups it
//!   names), else in every group; each copy is followed by the descriptor
//!   table and the reserved GDT blocks (without `meta_bg`).
//! * Checksums: with `metadata_csum`, CRC32C seeded by the UUID's CRC32C
//!   (or the stored seed) - the superblock's over its first 1020 bytes, a
//!   descriptor's (low 16 bits) over the group number (le32) and the
//!   descriptor with its checksum field as zeros; with `gdt_csum`
//!   (`uninit_bg`), CRC16 (polynomial 0x8005, reflected, initial 0xFFFF)
//!   over the UUID, the group number and the descriptor without its
//!   checksum field.

use super::volume::{le16, le32, Volume};
use super::FsKind;
use crate::error::{Error, Result};

pub const MAGIC: u16 = 0xEF53;
/// Where the superblock starts in the volume.
pub const SUPERBLOCK_AT: u64 = 1024;
pub const SUPERBLOCK_BYTES: usize = 1024;

pub mod compat {
    pub const HAS_JOURNAL: u32 = 0x4;
    pub const RESIZE_INODE: u32 = 0x10;
    pub const SPARSE_SUPER2: u32 = 0x200;
}

pub mod incompat {
    pub const COMPRESSION: u32 = 0x1;
    pub const FILETYPE: u32 = 0x2;
    pub const RECOVER: u32 = 0x4;
    pub const JOURNAL_DEV: u32 = 0x8;
    pub const META_BG: u32 = 0x10;
    pub const EXTENTS: u32 = 0x40;
    pub const BIT64: u32 = 0x80;
    pub const MMP: u32 = 0x100;
    pub const FLEX_BG: u32 = 0x200;
    pub const EA_INODE: u32 = 0x400;
    pub const DIRDATA: u32 = 0x1000;
    pub const CSUM_SEED: u32 = 0x2000;
    pub const LARGEDIR: u32 = 0x4000;
    pub const INLINE_DATA: u32 = 0x8000;
    pub const ENCRYPT: u32 = 0x10000;
    pub const CASEFOLD: u32 = 0x20000;
    /// The incompatible features whose meaning for block allocation this
    /// code knows (they either do not change where blocks are recorded, or
    /// are handled: `meta_bg`, `64bit`, `flex_bg`).
    pub const KNOWN: u32 = FILETYPE
        | META_BG
        | EXTENTS
        | BIT64
        | MMP
        | FLEX_BG
        | EA_INODE
        | DIRDATA
        | CSUM_SEED
        | LARGEDIR
        | INLINE_DATA
        | ENCRYPT
        | CASEFOLD;
}

pub mod ro_compat {
    pub const SPARSE_SUPER: u32 = 0x1;
    pub const LARGE_FILE: u32 = 0x2;
    pub const BTREE_DIR: u32 = 0x4;
    pub const HUGE_FILE: u32 = 0x8;
    pub const GDT_CSUM: u32 = 0x10;
    pub const DIR_NLINK: u32 = 0x20;
    pub const EXTRA_ISIZE: u32 = 0x40;
    pub const HAS_SNAPSHOT: u32 = 0x80;
    pub const QUOTA: u32 = 0x100;
    pub const BIGALLOC: u32 = 0x200;
    pub const METADATA_CSUM: u32 = 0x400;
    pub const READONLY: u32 = 0x1000;
    pub const PROJECT: u32 = 0x2000;
    pub const VERITY: u32 = 0x8000;
    pub const ORPHAN_PRESENT: u32 = 0x10000;
    /// Read-only-compatible features that do not change block allocation.
    pub const KNOWN: u32 = SPARSE_SUPER
        | LARGE_FILE
        | BTREE_DIR
        | HUGE_FILE
        | GDT_CSUM
        | DIR_NLINK
        | EXTRA_ISIZE
        | QUOTA
        | METADATA_CSUM
        | READONLY
        | PROJECT
        | VERITY
        | ORPHAN_PRESENT;
}

/// Descriptor flag: the group's block bitmap was never written.
pub const BG_BLOCK_UNINIT: u16 = 0x2;

/// The superblock fields this code uses, checked for consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The 1024 bytes as read (a grower rewrites from them).
    pub raw: Vec<u8>,
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub block_size: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub state: u16,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub reserved_gdt_blocks: u64,
    /// Bytes per group descriptor (32, or the stored size with `64bit`).
    pub desc_size: u64,
    pub first_meta_bg: u64,
    pub backup_bgs: [u32; 2],
    pub checksum_seed: u32,
}

/// True when the volume carries an ext superblock magic.
pub fn has_magic(sb: &[u8]) -> bool {
    sb.len() >= SUPERBLOCK_BYTES && le16(sb, 0x38) == MAGIC
}

/// The checksum of ext4's `metadata_csum`: CRC32C without its final
/// inversion, continuing from `seed` (the kernel's `crc32c(seed, ...)`).
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// CRC16 (polynomial 0x8005 reflected, as `gdt_csum` uses), continuing
/// from `crc`.
pub fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

impl Superblock {
    /// Parses and checks a superblock (1024 bytes). Anything this code
    /// cannot vouch for is an error naming it.
    pub fn parse(raw: &[u8]) -> Result<Superblock> {
        if !has_magic(raw) {
            return Err(Error::corrupt("no ext superblock magic".into()));
        }
        let raw = raw[..SUPERBLOCK_BYTES].to_vec();
        let rev = le32(&raw, 0x4C);
        let (compat, incompat, ro_compat) = if rev >= 1 {
            (le32(&raw, 0x5C), le32(&raw, 0x60), le32(&raw, 0x64))
        } else {
            (0, 0, 0)
        };
        let log_block = le32(&raw, 0x18);
        if log_block > 6 {
            return Err(Error::corrupt(format!(
                "ext superblock: block size 2^(10+{log_block}) is larger than 64 KiB"
            )));
        }
        let block_size = 1024u64 << log_block;
        let bit64 = incompat & incompat::BIT64 != 0;
        let mut blocks_count = u64::from(le32(&raw, 0x04));
        if bit64 {
            blocks_count |= u64::from(le32(&raw, 0x150)) << 32;
        }
        let desc_size = if bit64 {
            u64::from(le16(&raw, 0xFE))
        } else {
            32
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[0x68..0x78]);
        let sb = Superblock {
            blocks_count,
            first_data_block: u64::from(le32(&raw, 0x14)),
            block_size,
            blocks_per_group: u64::from(le32(&raw, 0x20)),
            inodes_per_group: u64::from(le32(&raw, 0x28)),
            inode_size: if rev >= 1 {
                u64::from(le16(&raw, 0x58))
            } else {
                128
            },
            state: le16(&raw, 0x3A),
            compat,
            incompat,
            ro_compat,
            uuid,
            reserved_gdt_blocks: u64::from(le16(&raw, 0xCE)),
            desc_size,
            first_meta_bg: u64::from(le32(&raw, 0x104)),
            backup_bgs: [le32(&raw, 0x24C), le32(&raw, 0x250)],
            checksum_seed: if incompat & incompat::CSUM_SEED != 0 {
                le32(&raw, 0x270)
            } else {
                crc32c_raw(!0, &uuid)
            },
            raw,
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("ext superblock: {what}")));
        if self.has_ro(ro_compat::METADATA_CSUM) {
            let stored = le32(&self.raw, 0x3FC);
            let computed = crc32c_raw(!0, &self.raw[..0x3FC]);
            if stored != computed {
                return bad(format!(
                    "checksum {stored:#010x}, the superblock's bytes give {computed:#010x}"
                ));
            }
        }
        if self.blocks_per_group == 0 || self.blocks_per_group > 8 * self.block_size {
            return bad(format!(
                "{} blocks per group (a bitmap of one {}-byte block holds at most {})",
                self.blocks_per_group,
                self.block_size,
                8 * self.block_size
            ));
        }
        if self.first_data_block != u64::from(self.block_size == 1024) {
            return bad(format!(
                "first data block {} with {}-byte blocks",
                self.first_data_block, self.block_size
            ));
        }
        if self.blocks_count <= self.first_data_block {
            return bad(format!("{} blocks", self.blocks_count));
        }
        if !(32..=1024).contains(&self.desc_size) || !self.desc_size.is_power_of_two() {
            return bad(format!("group descriptor size {}", self.desc_size));
        }
        if self.inode_size < 128 || self.inode_size > self.block_size {
            return bad(format!("inode size {}", self.inode_size));
        }
        Ok(())
    }

    pub fn has_compat(&self, bit: u32) -> bool {
        self.compat & bit != 0
    }
    pub fn has_incompat(&self, bit: u32) -> bool {
        self.incompat & bit != 0
    }
    pub fn has_ro(&self, bit: u32) -> bool {
        self.ro_compat & bit != 0
    }

    /// ext2, ext3 or ext4, as `blkid` names them: ext4 for any of the
    /// features ext3 lacks, ext3 for a journal, else ext2.
    pub fn kind(&self) -> FsKind {
        kind_of(self.compat, self.incompat, self.ro_compat)
    }
}

/// ext2, ext3 or ext4 from the feature sets, as `blkid` names them.
fn kind_of(compat_bits: u32, incompat_bits: u32, ro_bits: u32) -> FsKind {
    let ext4_incompat = incompat::EXTENTS
        | incompat::BIT64
        | incompat::FLEX_BG
        | incompat::MMP
        | incompat::EA_INODE
        | incompat::DIRDATA
        | incompat::CSUM_SEED
        | incompat::LARGEDIR
        | incompat::INLINE_DATA
        | incompat::ENCRYPT
        | incompat::CASEFOLD;
    let ext4_ro = ro_compat::HUGE_FILE
        | ro_compat::GDT_CSUM
        | ro_compat::DIR_NLINK
        | ro_compat::EXTRA_ISIZE
        | ro_compat::METADATA_CSUM
        | ro_compat::BIGALLOC
        | ro_compat::QUOTA
        | ro_compat::PROJECT
        | ro_compat::VERITY;
    if incompat_bits & ext4_incompat != 0 || ro_bits & ext4_ro != 0 {
        FsKind::Ext4
    } else if compat_bits & compat::HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    }
}

impl Superblock {
    /// Refuses what makes the block bitmaps untrustworthy or unknown:
    /// a journal to replay, errors, an unclean unmount, unknown features.
    pub fn check_bitmaps_trustworthy(&self) -> Result<()> {
        if self.has_incompat(incompat::RECOVER) {
            return Err(Error::unsupported(
                "the journal needs recovery (needs_recovery): the bitmaps may be stale".into(),
            ));
        }
        if self.has_incompat(incompat::JOURNAL_DEV) {
            return Err(Error::unsupported(
                "an external journal device, not a filesystem".into(),
            ));
        }
        let unknown = self.incompat & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "incompatible features {unknown:#x} this library does not know"
            )));
        }
        let unknown = self.ro_compat & !ro_compat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "read-only-compatible features {unknown:#x} (bigalloc, snapshots or newer) \
                 this library does not read"
            )));
        }
        if self.state & 0x2 != 0 {
            return Err(Error::unsupported(
                "the filesystem is marked as having errors (run e2fsck)".into(),
            ));
        }
        if self.state & 0x1 == 0 {
            return Err(Error::unsupported(
                "the filesystem was not cleanly unmounted (run e2fsck)".into(),
            ));
        }
        Ok(())
    }

    /// Number of block groups.
    pub fn group_count(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    /// First block of group `g`.
    pub fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    /// Blocks in group `g` (the last one may be short).
    pub fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }

    pub fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    /// Blocks of the descriptor table (all groups).
    pub fn gdt_blocks(&self) -> u64 {
        self.group_count().div_ceil(self.descs_per_block())
    }

    /// True when group `g` holds a copy of the superblock.
    pub fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.has_compat(compat::SPARSE_SUPER2) {
            return self.backup_bgs.iter().any(|&b| u64::from(b) == g);
        }
        if !self.has_ro(ro_compat::SPARSE_SUPER) || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                p *= base;
            }
            p == g
        })
    }

    /// The block holding descriptor block `i` (the primary copy).
    pub fn desc_block(&self, i: u64) -> u64 {
        if self.has_incompat(incompat::META_BG) && i >= self.first_meta_bg {
            let g = i * self.descs_per_block();
            self.group_first_block(g) + u64::from(self.has_super(g))
        } else {
            self.first_data_block + 1 + i
        }
    }

    /// The blocks at the start of group `g` that hold the superblock copy,
    /// descriptor blocks and reserved descriptor blocks (not counting
    /// `meta_bg` descriptor blocks, see [`Superblock::meta_bg_blocks`]).
    pub fn group_overhead(&self, g: u64) -> u64 {
        if !self.has_super(g) {
            return 0;
        }
        let table = if self.has_incompat(incompat::META_BG) {
            self.first_meta_bg
        } else {
            self.gdt_blocks()
        };
        1 + table + self.reserved_gdt_blocks
    }

    /// With `meta_bg`, the descriptor block group `g` holds (in the first,
    /// second and last group of its meta group), as an absolute block.
    pub fn meta_bg_block(&self, g: u64) -> Option<u64> {
        if !self.has_incompat(incompat::META_BG) {
            return None;
        }
        let per = self.descs_per_block();
        let meta = g / per;
        if meta < self.first_meta_bg {
            return None;
        }
        let at = g % per;
        (at == 0 || at == 1 || at == per - 1)
            .then(|| self.group_first_block(g) + u64::from(self.has_super(g)))
    }

    /// Blocks of one group's inode table.
    pub fn inode_table_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }
}

/// One group descriptor's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u64,
    pub flags: u16,
    pub checksum: u16,
}

/// The checksum descriptor `g` (`raw` its bytes, checksum field
/// included and skipped) should carry, or `None` without `metadata_csum`
/// / `gdt_csum`.
pub(crate) fn desc_checksum(sb: &Superblock, g: u64, raw: &[u8]) -> Option<u16> {
    let group = (g as u32).to_le_bytes();
    if sb.has_ro(ro_compat::METADATA_CSUM) {
        let crc = crc32c_raw(sb.checksum_seed, &group);
        let crc = crc32c_raw(crc, &raw[..0x1E]);
        let crc = crc32c_raw(crc, &[0, 0]);
        let crc = crc32c_raw(crc, &raw[0x20..]);
        Some((crc & 0xFFFF) as u16)
    } else if sb.has_ro(ro_compat::GDT_CSUM) {
        let crc = crc16(0xFFFF, &sb.uuid);
        let crc = crc16(crc, &group);
        let crc = crc16(crc, &raw[..0x1E]);
        Some(crc16(crc, &raw[0x20..]))
    } else {
        None
    }
}

impl GroupDesc {
    /// Parses descriptor `g` (`raw` is `desc_size` bytes) and checks its
    /// checksum when the filesystem has one.
    pub fn parse(sb: &Superblock, g: u64, raw: &[u8]) -> Result<GroupDesc> {
        let wide = sb.desc_size >= 64;
        let hi = |at: usize| {
            if wide {
                u64::from(le32(raw, at)) << 32
            } else {
                0
            }
        };
        let hi16 = |at: usize| {
            if wide {
                u64::from(le16(raw, at)) << 16
            } else {
                0
            }
        };
        let desc = GroupDesc {
            block_bitmap: u64::from(le32(raw, 0x00)) | hi(0x20),
            inode_bitmap: u64::from(le32(raw, 0x04)) | hi(0x24),
            inode_table: u64::from(le32(raw, 0x08)) | hi(0x28),
            free_blocks: u64::from(le16(raw, 0x0C)) | hi16(0x2C),
            flags: le16(raw, 0x12),
            checksum: le16(raw, 0x1E),
        };
        if let Some(expected) = desc_checksum(sb, g, raw) {
            if expected != desc.checksum {
                return Err(Error::corrupt(format!(
                    "group descriptor {g}: checksum {:#06x}, its bytes give {expected:#06x}",
                    desc.checksum
                )));
            }
        }
        if sb.has_ro(ro_compat::GDT_CSUM | ro_compat::METADATA_CSUM) {
            Ok(desc)
        } else {
            // Without checksums the uninitialised flags mean nothing.
            Ok(GroupDesc { flags: 0, ..desc })
        }
    }
}

/// An ext filesystem: its superblock and every group descriptor.
#[derive(Debug, Clone)]
pub struct ExtFs {
    pub sb: Superblock,
    pub groups: Vec<GroupDesc>,
}

/// The most groups read: 2^22 groups of 32768 4-KiB blocks is 512 TiB,
/// beyond any disk this library clones; the descriptors take 256 MiB.
const MAX_GROUPS: u64 = 1 << 22;

/// The ext flavour on `vol`, if its superblock magic is there.
pub fn probe(vol: &mut Volume) -> Result<Option<FsKind>> {
    if vol.bytes() < SUPERBLOCK_AT + SUPERBLOCK_BYTES as u64 {
        return Ok(None);
    }
    let raw = vol.read(SUPERBLOCK_AT, SUPERBLOCK_BYTES as u64, "ext superblock")?;
    if !has_magic(&raw) {
        return Ok(None);
    }
    // The flavour from the feature bits alone, so a superblock that fails
    // its checks is still reported as what it claims to be.
    Ok(Some(kind_of(
        le32(&raw, 0x5C),
        le32(&raw, 0x60),
        le32(&raw, 0x64),
    )))
}

impl ExtFs {
    /// Reads and checks the superblock and the descriptors.
    pub fn open(vol: &mut Volume) -> Result<ExtFs> {
        let raw = vol.read(SUPERBLOCK_AT, SUPERBLOCK_BYTES as u64, "ext superblock")?;
        let sb = Superblock::parse(&raw)?;
        let fs_bytes = sb.blocks_count.checked_mul(sb.block_size);
        if fs_bytes.is_none_or(|b| b > vol.bytes()) {
            return Err(Error::corrupt(format!(
                "ext: {} blocks of {} bytes do not fit the partition of {} bytes",
                sb.blocks_count,
                sb.block_size,
                vol.bytes()
            )));
        }
        let count = sb.group_count();
        if count > MAX_GROUPS {
            return Err(Error::unsupported(format!(
                "ext: {count} block groups (more than {MAX_GROUPS})"
            )));
        }
        let per = sb.descs_per_block();
        let mut groups = Vec::with_capacity(count as usize);
        for i in 0..sb.gdt_blocks() {
            let block = sb.desc_block(i);
            if block >= sb.blocks_count {
                return Err(Error::corrupt(format!(
                    "ext: descriptor block {i} at block {block}, outside the filesystem"
                )));
            }
            let raw = vol.read(
                block * sb.block_size,
                sb.block_size,
                "ext group descriptors",
            )?;
            for j in 0..per {
                let g = i * per + j;
                if g >= count {
                    break;
                }
                let at = (j * sb.desc_size) as usize;
                groups.push(GroupDesc::parse(
                    &sb,
                    g,
                    &raw[at..at + sb.desc_size as usize],
                )?);
            }
        }
        Ok(ExtFs { sb, groups })
    }

    /// Every block some group's descriptor places a bitmap or inode table
    /// on, and every superblock copy, descriptor and reserved block, as
    /// sorted runs `(first block, count)`: used whatever a bitmap says.
    pub fn metadata_runs(&self) -> Result<Vec<(u64, u64)>> {
        let sb = &self.sb;
        let table = sb.inode_table_blocks();
        let mut runs = Vec::with_capacity(self.groups.len() * 4);
        if sb.first_data_block > 0 {
            runs.push((0, sb.first_data_block));
        }
        for (g, d) in self.groups.iter().enumerate() {
            let g = g as u64;
            for (what, first, n) in [
                ("block bitmap", d.block_bitmap, 1),
                ("inode bitmap", d.inode_bitmap, 1),
                ("inode table", d.inode_table, table),
            ] {
                if first < sb.first_data_block
                    || first.checked_add(n).is_none_or(|end| end > sb.blocks_count)
                {
                    return Err(Error::corrupt(format!(
                        "ext: group {g}'s {what} (blocks {first}..+{n}) lies outside the \
                         filesystem of {} blocks",
                        sb.blocks_count
                    )));
                }
                runs.push((first, n));
            }
            let overhead = sb.group_overhead(g).min(sb.group_blocks(g));
            if overhead > 0 {
                runs.push((sb.group_first_block(g), overhead));
            }
            if let Some(block) = sb.meta_bg_block(g) {
                runs.push((block, 1));
            }
        }
        runs.sort_unstable();
        Ok(runs)
    }

    /// The free blocks, as sorted runs `(first block, count)`: the clear
    /// bits of each group's bitmap (every block of a blocks-uninitialised
    /// group), minus the metadata. A group whose bitmap's free bits do not
    /// match its descriptor's free count is an error.
    pub fn free_block_runs(&self, vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
        let sb = &self.sb;
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut push = |block: u64| match free.last_mut() {
            Some((s, n)) if *s + *n == block => *n += 1,
            _ => free.push((block, 1)),
        };
        for (g, d) in self.groups.iter().enumerate() {
            let g = g as u64;
            let first = sb.group_first_block(g);
            let blocks = sb.group_blocks(g);
            if d.flags & BG_BLOCK_UNINIT != 0 {
                for b in 0..blocks {
                    push(first + b);
                }
                continue;
            }
            let bitmap = vol.read(
                d.block_bitmap * sb.block_size,
                sb.block_size,
                "ext block bitmap",
            )?;
            let mut count = 0;
            for b in 0..blocks {
                if bitmap[(b / 8) as usize] & (1 << (b % 8)) == 0 {
                    count += 1;
                    push(first + b);
                }
            }
            if count != d.free_blocks {
                return Err(Error::corrupt(format!(
                    "ext: group {g}'s bitmap has {count} free blocks, its descriptor says {} \
                     (run e2fsck)",
                    d.free_blocks
                )));
            }
        }
        Ok(subtract_runs(&free, &self.metadata_runs()?))
    }
}

/// `runs` minus `remove` (both sorted by start; `remove` may overlap
/// itself).
fn subtract_runs(runs: &[(u64, u64)], remove: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(runs.len());
    let mut r = 0;
    for &(start, n) in runs {
        let mut pos = start;
        let end = start + n;
        // Skip removals that end before this run.
        while r < remove.len() && remove[r].0 + remove[r].1 <= pos {
            r += 1;
        }
        let mut k = r;
        while pos < end && k < remove.len() && remove[k].0 < end {
            let (rs, rn) = remove[k];
            if rs > pos {
                out.push((pos, rs - pos));
            }
            pos = pos.max(rs + rn);
            k += 1;
        }
        if pos < end {
            out.push((pos, end - pos));
        }
    }
    out
}

/// The free byte runs of the ext filesystem on `vol` (see the module
/// documentation), or why it is kept whole.
pub fn free_space(vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
    let fs = ExtFs::open(vol)?;
    fs.sb.check_bitmaps_trustworthy()?;
    let bs = fs.sb.block_size;
    Ok(fs
        .free_block_runs(vol)?
        .into_iter()
        .map(|(b, n)| (b * bs, n * bs))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups_are_0_1_and_powers_of_3_5_7() {
        let mut raw = vec![0u8; 1024];
        raw[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        raw[0x4C] = 1;
        raw[0x64] = ro_compat::SPARSE_SUPER as u8;
        raw[0x04..0x08].copy_from_slice(&(1u32 << 20).to_le_bytes());
        raw[0x18] = 2;
        raw[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        raw[0x58] = 128;
        raw[0x3A] = 1;
        let sb = Superblock::parse(&raw).unwrap();
        let with: Vec<u64> = (0..400).filter(|&g| sb.has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243, 343]);
    }

    #[test]
    fn crc16_matches_the_arc_check_value() {
        // CRC-16/ARC of "123456789" is 0xBB3D (initial 0); the catalogue's
        // check value, independent of this code.
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn subtracting_runs() {
        let runs = [(0, 10), (20, 10)];
        assert_eq!(
            subtract_runs(&runs, &[(2, 2), (3, 3), (8, 14), (29, 5)]),
            vec![(0, 2), (6, 2), (22, 7)]
        );
    }
}
