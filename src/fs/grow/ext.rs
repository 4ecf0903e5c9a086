//! Growing ext2, ext3 and ext4 to fill an enlarged partition, offline, as
//! `resize2fs` grows a filesystem: new block groups after the old ones,
//! the descriptor table extended into the reserved descriptor blocks, or
//! with `meta_bg` into the new meta groups.
//!
//! # Format facts relied on (the kernel's ext4 on-disk documentation, and
//! what `mke2fs`/`resize2fs` 1.47 leave on disk, read with `dumpe2fs` and
//! `debugfs`)
//!
//! Beyond those in `fs/ext.rs`:
//!
//! * Superblock: inodes count (0x00), reserved blocks (0x08, high half
//!   0x154), free blocks (0x0C, high half 0x158), free inodes (0x10), the
//!   group number of a backup copy (0x5A, u16), the head of the orphan
//!   list (0xE8), the overhead blocks count (0x248; 0 = the kernel counts
//!   them itself, and `resize2fs` leaves 0). `resize2fs` keeps the
//!   reserved blocks' share of the filesystem: the old share, as a
//!   percentage, of the new size.
//! * Descriptor (beyond the fields read): free inodes (0x0E, high half
//!   0x2E), directories (0x10, 0x30), block bitmap checksum (0x18, high
//!   half 0x38 in 64-byte descriptors) and inode bitmap checksum (0x1A,
//!   0x3A), unused inodes (0x1C, 0x32); flags 1 inodes uninitialised, 2
//!   blocks uninitialised, 4 inode table zeroed. A bitmap checksum is
//!   CRC32C seeded like the others over the group's bits (blocks or inodes
//!   per group / 8 bytes); `mke2fs` stores 0 for a bitmap that is not
//!   initialised. Bits past the group's last block (and past the inodes
//!   per group) up to the end of the bitmap block are set.
//! * The resize inode (7, feature `resize_inode`) reserves the descriptor
//!   blocks after the table: its double-indirect block (`i_block[13]`)
//!   holds, at index `(table blocks + r) mod (block size / 4)`, the
//!   primary reserved block `r` (block `first data block + 1 + table
//!   blocks + r`); that block, used as an indirect block, lists the same
//!   block in every backup group (`+ group * blocks per group`), in group
//!   order. Its block count (`i_blocks`, 0x1C, high half 0x74; in 512-byte
//!   units unless the inode's flag 0x40000 says blocks) counts the
//!   double-indirect block, the reserved blocks and their backups. With
//!   `metadata_csum` its checksum (0x7C, high half 0x82 when the extra
//!   fields reach it) is CRC32C over the inode number, its generation
//!   (0x64) and the whole inode with both halves zero.
//! * A last group smaller than its metadata plus 50 blocks is left out,
//!   as `resize2fs` does.
//! * `meta_bg` (as mke2fs makes it, first meta group 0): the descriptor
//!   block of meta group `m` (groups `m * per block` on) is in its first,
//!   second and last group, after the superblock copy if that group has
//!   one; no table follows a superblock copy there.
//!
//! # What this grower writes
//!
//! The added space past the old end is first discarded in the overlay (it
//! reads as zeros, so the new inode tables are zeroed for free and flagged
//! so). Each new group holds its own bitmaps and inode table right after
//! its superblock copy and descriptor blocks (any placement is valid with
//! `flex_bg`, this one also without). With `uninit_bg` or `metadata_csum`
//! a new group's block bitmap is left uninitialised (but the last one's)
//! and every new inode bitmap is too, as `mke2fs` does; without them both
//! bitmaps are written. The old last group's bitmap releases the blocks
//! it gains. The descriptor table, extended into the reserved blocks when
//! it needs more blocks, is written to every group with a superblock copy,
//! with the superblock; the resize inode then describes the reserved
//! blocks left (with `meta_bg`, each descriptor block goes to its three
//! groups). Everything is computed and checked before the first write.

use super::GrowReport;
use crate::disk::{Disk, SECTOR_BYTES};
use crate::error::{Error, Result};
use crate::fs::ext::{
    compat, crc32c_raw, desc_checksum, incompat, ro_compat, ExtFs, GroupDesc, Superblock,
    SUPERBLOCK_AT, SUPERBLOCK_BYTES,
};
use crate::fs::volume::{le16, le32, Volume};
use crate::overlay::Overlay;

const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;
const BG_ITABLE_ZEROED: u16 = 0x4;
const RESIZE_INO: u64 = 7;
const HUGE_FILE_FL: u32 = 0x40000;
/// The blocks a last group must hold beyond its metadata (as resize2fs).
const LAST_GROUP_SLACK: u64 = 50;
/// The largest descriptor table built in memory.
const MAX_TABLE_BYTES: u64 = 256 << 20;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Splits `v` into the low half at `lo` and, in 64-byte descriptors, the
/// high half at `hi` (`bits` wide each); refuses a value that does not
/// fit.
fn put_split(desc: &mut [u8], lo: usize, hi: usize, bits: u32, v: u64, what: &str) -> Result<()> {
    let wide = desc.len() >= 64;
    let limit = if wide { 2 * bits } else { bits };
    if limit < 64 && v >> limit != 0 {
        return Err(Error::unsupported(format!(
            "ext: {what} {v} does not fit a {}-byte group descriptor",
            desc.len()
        )));
    }
    if bits == 16 {
        put16(desc, lo, v as u16);
        if wide {
            put16(desc, hi, (v >> 16) as u16);
        }
    } else {
        put32(desc, lo, v as u32);
        if wide {
            put32(desc, hi, (v >> 32) as u32);
        }
    }
    Ok(())
}

fn split_get(desc: &[u8], lo: usize, hi: usize, bits: u32) -> u64 {
    let wide = desc.len() >= 64;
    if bits == 16 {
        u64::from(le16(desc, lo))
            | if wide {
                u64::from(le16(desc, hi)) << 16
            } else {
                0
            }
    } else {
        u64::from(le32(desc, lo))
            | if wide {
                u64::from(le32(desc, hi)) << 32
            } else {
                0
            }
    }
}

fn seal_desc(sb: &Superblock, g: u64, raw: &mut [u8]) {
    if let Some(c) = desc_checksum(sb, g, raw) {
        put16(raw, 0x1E, c);
    }
}

/// Sets the bits `[from, 8 * bitmap.len())`.
fn set_tail(bitmap: &mut [u8], from: u64) {
    for bit in from..8 * bitmap.len() as u64 {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
}

/// The layout after growth, computed and checked before any write.
struct Plan {
    old: Superblock,
    new: Superblock,
    old_groups: u64,
    new_groups: u64,
    /// The whole new descriptor table.
    gdt: Vec<u8>,
    /// The new superblock (primary; backups differ in 0x5A and checksum).
    sb_raw: Vec<u8>,
    /// The old last group's new block bitmap, at its block.
    last_bitmap: Option<(u64, Vec<u8>)>,
    /// Blocks to write for the resize inode: (block, bytes).
    resize_blocks: Vec<(u64, Vec<u8>)>,
    old_free: u64,
    new_free: u64,
}

/// True when descriptors and bitmaps carry the uninitialised flags.
fn has_uninit(sb: &Superblock) -> bool {
    sb.has_ro(ro_compat::GDT_CSUM | ro_compat::METADATA_CSUM)
}

/// The blocks at the start of group `g` that hold its superblock copy and
/// descriptor blocks (and reserved ones). Without `meta_bg`, a group with
/// a superblock copy holds the whole table and the reserved blocks; with
/// it, the groups of the first `first_meta_bg` meta groups that have a
/// copy hold the first `first_meta_bg` descriptor blocks, and in the
/// later meta groups the first, second and last group hold their meta
/// group's descriptor block after the superblock copy, if any.
fn overhead(sb: &Superblock, g: u64) -> u64 {
    let sup = u64::from(sb.has_super(g));
    if !sb.has_incompat(incompat::META_BG) {
        return sb.group_overhead(g);
    }
    let per = sb.descs_per_block();
    if g / per < sb.first_meta_bg {
        return if sup == 1 {
            1 + sb.first_meta_bg + sb.reserved_gdt_blocks
        } else {
            0
        };
    }
    let at = g % per;
    sup + u64::from(at == 0 || at == 1 || at == per - 1)
}

/// True when `sparse_super2`'s second backup group is the old last group
/// and growth to `new_groups` makes another group the last.
fn moves_backup(old: &Superblock, old_groups: u64, new_groups: u64) -> bool {
    let last = old_groups - 1;
    old.has_compat(compat::SPARSE_SUPER2)
        && last > 0
        && u64::from(old.backup_bgs[1]) == last
        && u64::from(old.backup_bgs[0]) != last
        && new_groups > old_groups
}

/// Where a new group's metadata lies: (block bitmap, inode bitmap, inode
/// table, free blocks).
fn new_group_layout(sb: &Superblock, g: u64) -> (u64, u64, u64, u64) {
    let start = sb.group_first_block(g);
    let bb = start + overhead(sb, g);
    let used = overhead(sb, g) + 2 + sb.inode_table_blocks();
    (bb, bb + 1, bb + 2, sb.group_blocks(g).saturating_sub(used))
}

/// A new group's block bitmap (one block).
fn new_block_bitmap(sb: &Superblock, g: u64) -> Vec<u8> {
    let mut bitmap = vec![0u8; sb.block_size as usize];
    let used = overhead(sb, g) + 2 + sb.inode_table_blocks();
    for bit in 0..used {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    set_tail(&mut bitmap, sb.group_blocks(g));
    bitmap
}

/// A new group's inode bitmap: no inode used, the padding set.
fn new_inode_bitmap(sb: &Superblock) -> Vec<u8> {
    let mut bitmap = vec![0u8; sb.block_size as usize];
    set_tail(&mut bitmap, sb.inodes_per_group);
    bitmap
}

fn bitmap_csum(sb: &Superblock, bitmap: &[u8], bits: u64) -> u32 {
    crc32c_raw(sb.checksum_seed, &bitmap[..(bits / 8) as usize])
}

/// Stores the block bitmap checksum of `bitmap` in descriptor `d` (32 bits
/// in a 64-byte descriptor, the low 16 in a 32-byte one).
fn put_block_bitmap_csum(d: &mut [u8], sb: &Superblock, bitmap: &[u8]) -> Result<()> {
    let c = u64::from(bitmap_csum(sb, bitmap, sb.blocks_per_group));
    let kept = if d.len() >= 64 { 0xFFFF_FFFF } else { 0xFFFF };
    put_split(d, 0x18, 0x38, 16, c & kept, "checksum")
}

/// Grows the ext filesystem at `part_start` to fill `new_sectors` sectors
/// as the module doc describes.
pub fn grow(
    overlay: &mut Overlay,
    part_start: u64,
    new_sectors: u64,
    dry_run: bool,
) -> Result<GrowReport> {
    let plan = {
        let mut vol = Volume::new(overlay as &mut dyn Disk, part_start, new_sectors)?;
        plan(&mut vol, new_sectors)?
    };
    let bs = plan.old.block_size;
    let report = GrowReport {
        filesystem: plan.old.kind(),
        old_sectors: plan.old.blocks_count * bs / SECTOR_BYTES,
        new_sectors: plan.new.blocks_count * bs / SECTOR_BYTES,
        cluster_bytes: bs,
        old_clusters: plan.old.blocks_count,
        new_clusters: plan.new.blocks_count,
        inserted_sectors: 0,
        old_free_bytes: plan.old_free * bs,
        new_free_bytes: plan.new_free * bs,
    };
    if dry_run {
        return Ok(report);
    }

    // Writes from here on.
    let sector_of = |byte: u64| part_start + byte / SECTOR_BYTES;
    let old_end = plan.old.blocks_count * bs;
    let new_end = plan.new.blocks_count * bs;
    overlay.discard(sector_of(old_end), (new_end - old_end) / SECTOR_BYTES)?;
    let new = &plan.new;
    let uninit = has_uninit(new);
    let inode_bitmap = new_inode_bitmap(new);
    for g in plan.old_groups..plan.new_groups {
        let (bb, ib, _, _) = new_group_layout(new, g);
        if !uninit || g == plan.new_groups - 1 {
            overlay.write(sector_of(bb * bs), &new_block_bitmap(new, g))?;
        }
        if !uninit {
            overlay.write(sector_of(ib * bs), &inode_bitmap)?;
        }
    }
    if let Some((block, bytes)) = &plan.last_bitmap {
        overlay.write(sector_of(block * bs), bytes)?;
    }
    for (block, bytes) in &plan.resize_blocks {
        overlay.write(sector_of(block * bs), bytes)?;
    }
    for g in 0..plan.new_groups {
        if !new.has_super(g) {
            continue;
        }
        let first = new.group_first_block(g);
        let mut sb = plan.sb_raw.clone();
        put16(&mut sb, 0x5A, g as u16);
        if new.has_ro(ro_compat::METADATA_CSUM) {
            let c = crc32c_raw(!0, &sb[..0x3FC]);
            put32(&mut sb, 0x3FC, c);
        }
        let sb_at = if g == 0 { 1024 } else { first * bs };
        overlay.write(sector_of(sb_at), &sb)?;
    }
    for (block, i) in table_copies(new, plan.new_groups) {
        let at = (i * bs) as usize;
        overlay.write(sector_of(block * bs), &plan.gdt[at..at + bs as usize])?;
    }
    Ok(report)
}

/// Every copy of every descriptor block of the grown filesystem: (block,
/// descriptor block index).
fn table_copies(sb: &Superblock, groups: u64) -> Vec<(u64, u64)> {
    let table = sb.gdt_blocks();
    let meta = sb.has_incompat(incompat::META_BG);
    let per = sb.descs_per_block();
    let classic = if meta {
        sb.first_meta_bg.min(table)
    } else {
        table
    };
    let mut out = Vec::new();
    for g in 0..groups {
        if sb.has_super(g) && (!meta || g / per < sb.first_meta_bg) {
            let first = sb.group_first_block(g);
            out.extend((0..classic).map(|i| (first + 1 + i, i)));
        }
    }
    if meta {
        for i in sb.first_meta_bg..table {
            let m = i * per;
            let mut at = vec![m, m + 1, m + per - 1];
            at.retain(|&x| x / per == i && x < groups);
            at.dedup();
            for x in at {
                let block = sb.group_first_block(x) + u64::from(sb.has_super(x));
                out.push((block, i));
            }
        }
    }
    out
}

fn plan(vol: &mut Volume, new_sectors: u64) -> Result<Plan> {
    // bigalloc first: its blocks-per-group field counts blocks of a
    // cluster bitmap, which the reader rejects as damage.
    let raw = vol.read(SUPERBLOCK_AT, SUPERBLOCK_BYTES as u64, "ext superblock")?;
    if le32(&raw, 0x4C) >= 1 && le32(&raw, 0x64) & ro_compat::BIGALLOC != 0 {
        return Err(Error::unsupported(
            "ext: growing a filesystem with bigalloc is not supported (grow it with resize2fs)"
                .into(),
        ));
    }
    let fs = ExtFs::open(vol)?;
    let old = fs.sb.clone();
    old.check_bitmaps_trustworthy()?;
    let meta_bg = old.has_incompat(incompat::META_BG);
    if meta_bg && old.first_meta_bg != 0 {
        return Err(Error::unsupported(format!(
            "ext: meta_bg from meta group {} on (a table converted by resize2fs) is not \
             supported; grow it with resize2fs",
            old.first_meta_bg
        )));
    }
    if meta_bg && old.has_compat(compat::RESIZE_INODE) {
        return Err(Error::unsupported(
            "ext: meta_bg together with resize_inode (mke2fs never makes this); not grown".into(),
        ));
    }
    if le32(&old.raw, 0xE8) != 0 || old.has_ro(ro_compat::ORPHAN_PRESENT) {
        return Err(Error::unsupported(
            "ext: the filesystem has inodes on its orphan list (mount it once or run e2fsck)"
                .into(),
        ));
    }
    // Every group's bitmap against its descriptor's free count.
    fs.free_block_runs(vol)?;
    let bs = old.block_size;
    let ipg = old.inodes_per_group;
    if ipg < RESIZE_INO || ipg % 8 != 0 || ipg > 8 * bs || old.blocks_per_group % 8 != 0 {
        return Err(Error::corrupt(format!(
            "ext superblock: {ipg} inodes and {} blocks per group",
            old.blocks_per_group
        )));
    }
    if !old.inode_size.is_power_of_two() {
        return Err(Error::corrupt(format!(
            "ext superblock: inode size {}",
            old.inode_size
        )));
    }
    let bit64 = old.has_incompat(incompat::BIT64);
    let max_blocks = if bit64 { 1u64 << 48 } else { (1u64 << 32) - 1 };
    let mut new_blocks = new_sectors.saturating_mul(SECTOR_BYTES) / bs;
    if new_blocks > max_blocks {
        return Err(Error::unsupported(format!(
            "ext: {new_blocks} blocks of {bs} bytes are more than the {max_blocks} the \
             filesystem can number{}",
            if bit64 {
                ""
            } else {
                " without the 64bit feature"
            }
        )));
    }
    let old_groups = old.group_count();
    let old_gdt = old.gdt_blocks();
    let mut new = old.clone();
    // The new layout: the last group left out when too small (resize2fs).
    loop {
        if new_blocks <= old.blocks_count {
            return Err(Error::invalid_argument(format!(
                "ext: the partition of {new_sectors} sectors holds {new_blocks} usable blocks \
                 of {bs} bytes, no more than the filesystem's {}",
                old.blocks_count
            )));
        }
        new.blocks_count = new_blocks;
        let groups = new.group_count();
        let gdt = new.gdt_blocks();
        if !meta_bg {
            new.reserved_gdt_blocks = old
                .reserved_gdt_blocks
                .saturating_sub(gdt.saturating_sub(old_gdt));
        }
        let last = groups - 1;
        // sparse_super2: the second backup, in the old last group, moves
        // to the new last group (as resize2fs moves it).
        if moves_backup(&old, old_groups, groups) {
            new.backup_bgs[1] = last as u32;
        }
        let rem = (new_blocks - old.first_data_block) % old.blocks_per_group;
        let need = overhead(&new, last) + 2 + new.inode_table_blocks() + LAST_GROUP_SLACK;
        if groups > old_groups && rem != 0 && rem < need {
            new_blocks -= rem;
            continue;
        }
        break;
    }
    let new_groups = new.group_count();
    if new_groups > 1 << 22 {
        return Err(Error::unsupported(format!(
            "ext: {new_groups} block groups (more than {})",
            1u64 << 22
        )));
    }
    let new_gdt = new.gdt_blocks();
    let extra_gdt = new_gdt - old_gdt;
    // With meta_bg a new descriptor block goes into the new groups.
    if extra_gdt > 0 && !meta_bg {
        let has_resize = old.has_compat(compat::RESIZE_INODE);
        if extra_gdt > old.reserved_gdt_blocks || !has_resize {
            let max_groups = (old_gdt
                + if has_resize {
                    old.reserved_gdt_blocks
                } else {
                    0
                })
                * old.descs_per_block();
            return Err(Error::unsupported(format!(
                "ext: {new_groups} block groups need {new_gdt} descriptor blocks; the \
                 filesystem has {old_gdt} and {} reserved{} (resize_inode), so it grows to at \
                 most {max_groups} groups ({} blocks) this way; growing further needs a \
                 conversion to meta_bg, which is not supported (resize2fs can)",
                if has_resize {
                    old.reserved_gdt_blocks
                } else {
                    0
                },
                if has_resize { "" } else { " usable without" },
                max_groups * old.blocks_per_group + old.first_data_block
            )));
        }
    }
    if new_gdt * bs > MAX_TABLE_BYTES {
        return Err(Error::unsupported(format!(
            "ext: a descriptor table of {new_gdt} blocks of {bs} bytes (more than {} MiB)",
            MAX_TABLE_BYTES >> 20
        )));
    }
    let inodes = new_groups * old.inodes_per_group;
    if inodes > u64::from(u32::MAX) {
        return Err(Error::unsupported(format!(
            "ext: {new_groups} groups of {} inodes are more than 2^32 - 1 inodes",
            old.inodes_per_group
        )));
    }

    // The descriptor table: the old bytes, the old last group's
    // descriptor updated, the new descriptors appended.
    let ds = old.desc_size as usize;
    let mut gdt = vec![0u8; (new_gdt * bs) as usize];
    for i in 0..old_gdt {
        let raw = vol.read(old.desc_block(i) * bs, bs, "ext group descriptors")?;
        gdt[(i * bs) as usize..((i + 1) * bs) as usize].copy_from_slice(&raw);
    }
    // Clear anything past the last descriptor (never used before).
    gdt[old_groups as usize * ds..].fill(0);
    let mut old_free_blocks = 0u64;
    let mut old_free_inodes = 0u64;
    for g in 0..old_groups as usize {
        let d = &gdt[g * ds..(g + 1) * ds];
        old_free_blocks += split_get(d, 0x0C, 0x2C, 16);
        old_free_inodes += split_get(d, 0x0E, 0x2E, 16);
    }
    if old_free_inodes > inodes {
        return Err(Error::corrupt(format!(
            "ext: the descriptors count {old_free_inodes} free inodes of {}",
            old_groups * old.inodes_per_group
        )));
    }

    // The old last group gains the blocks up to the end of its group.
    let last = old_groups - 1;
    let mut last_bitmap = None;
    let mut new_free_blocks = old_free_blocks;
    let old_in_last = old.group_blocks(last);
    let new_in_last = new.group_blocks(last);
    // The old last group's superblock copy, table and reserved blocks
    // when its backup moves (sparse_super2); they become free.
    let released = if moves_backup(&old, old_groups, new_groups) {
        old.group_overhead(last).min(old_in_last)
    } else {
        0
    };
    if new_in_last > old_in_last || released > 0 {
        let desc: GroupDesc = fs.groups[last as usize];
        if desc.flags & BG_BLOCK_UNINIT != 0 {
            return Err(Error::unsupported(format!(
                "ext: the last group ({last}) has no block bitmap (BLOCK_UNINIT); not grown"
            )));
        }
        let mut bitmap = vol.read(desc.block_bitmap * bs, bs, "ext block bitmap")?;
        let csum = old.has_ro(ro_compat::METADATA_CSUM);
        let d = &mut gdt[last as usize * ds..(last as usize + 1) * ds];
        if csum {
            let stored = split_get(d, 0x18, 0x38, 16);
            let computed = u64::from(bitmap_csum(&old, &bitmap, old.blocks_per_group));
            let mask = if ds >= 64 { 0xFFFF_FFFF } else { 0xFFFF };
            if stored != computed & mask {
                return Err(Error::corrupt(format!(
                    "ext: group {last}'s block bitmap checksum {stored:#x}, its bytes give \
                     {:#x}",
                    computed & mask
                )));
            }
        }
        for bit in (0..released).chain(old_in_last..new_in_last) {
            if released > 0 && bit < released && bitmap[(bit / 8) as usize] & (1 << (bit % 8)) == 0
            {
                return Err(Error::corrupt(format!(
                    "ext: group {last}'s backup superblock area is free in its bitmap"
                )));
            }
            bitmap[(bit / 8) as usize] &= !(1 << (bit % 8));
        }
        set_tail(&mut bitmap, new_in_last);
        let gained = new_in_last - old_in_last + released;
        let free = desc.free_blocks + gained;
        put_split(d, 0x0C, 0x2C, 16, free, "free block count")?;
        if csum {
            put_block_bitmap_csum(d, &new, &bitmap)?;
        }
        seal_desc(&new, last, d);
        new_free_blocks += gained;
        last_bitmap = Some((desc.block_bitmap, bitmap));
    }

    // The new groups.
    let uninit = has_uninit(&new);
    let csum = new.has_ro(ro_compat::METADATA_CSUM);
    for g in old_groups..new_groups {
        let (bb, ib, it, free) = new_group_layout(&new, g);
        if free == 0 {
            return Err(Error::unsupported(format!(
                "ext: new group {g}'s metadata ({} blocks) leaves it no free block",
                overhead(&new, g) + 2 + new.inode_table_blocks()
            )));
        }
        let d = &mut gdt[g as usize * ds..(g as usize + 1) * ds];
        put_split(d, 0x00, 0x20, 32, bb, "block bitmap")?;
        put_split(d, 0x04, 0x24, 32, ib, "inode bitmap")?;
        put_split(d, 0x08, 0x28, 32, it, "inode table")?;
        put_split(d, 0x0C, 0x2C, 16, free, "free block count")?;
        put_split(d, 0x0E, 0x2E, 16, ipg, "free inode count")?;
        if uninit {
            let last_new = g == new_groups - 1;
            let mut flags = BG_INODE_UNINIT | BG_ITABLE_ZEROED;
            if !last_new {
                flags |= BG_BLOCK_UNINIT;
            }
            put16(d, 0x12, flags);
            put_split(d, 0x1C, 0x32, 16, ipg, "unused inode count")?;
            if csum && last_new {
                put_block_bitmap_csum(d, &new, &new_block_bitmap(&new, g))?;
            }
        }
        seal_desc(&new, g, d);
        new_free_blocks += free;
    }
    let new_free_inodes = old_free_inodes + (new_groups - old_groups) * ipg;

    let resize_blocks = resize_inode(vol, &fs, &new, old_groups, new_groups)?;

    // The superblock.
    let mut sb = old.raw.clone();
    let set_blocks = |sb: &mut Vec<u8>, lo: usize, hi: usize, v: u64| {
        put32(sb, lo, v as u32);
        if bit64 {
            put32(sb, hi, (v >> 32) as u32);
        }
    };
    set_blocks(&mut sb, 0x04, 0x150, new.blocks_count);
    let old_r = u64::from(le32(&old.raw, 0x08))
        | if bit64 {
            u64::from(le32(&old.raw, 0x154)) << 32
        } else {
            0
        };
    let percent = old_r as f64 * 100.0 / old.blocks_count as f64;
    let new_r = ((percent * new.blocks_count as f64) / 100.0) as u64;
    set_blocks(&mut sb, 0x08, 0x154, new_r.min(new.blocks_count));
    set_blocks(&mut sb, 0x0C, 0x158, new_free_blocks);
    put32(&mut sb, 0x00, inodes as u32);
    put32(&mut sb, 0x10, new_free_inodes as u32);
    put16(&mut sb, 0xCE, new.reserved_gdt_blocks as u16);
    put32(&mut sb, 0x250, new.backup_bgs[1]);
    put32(&mut sb, 0x248, 0);
    new.raw = sb.clone();
    Ok(Plan {
        old,
        new,
        old_groups,
        new_groups,
        gdt,
        sb_raw: sb,
        last_bitmap,
        resize_blocks,
        old_free: old_free_blocks,
        new_free: new_free_blocks,
    })
}

/// The inode checksum (`metadata_csum`) of inode `ino` (`raw`: its
/// `inode size` bytes), with where the halves go: (value, high half
/// present).
fn inode_csum(sb: &Superblock, ino: u64, raw: &[u8]) -> (u32, bool) {
    let hi = raw.len() > 128 && 128 + usize::from(le16(raw, 0x80)) >= 0x84;
    let mut copy = raw.to_vec();
    copy[0x7C..0x7E].fill(0);
    if hi {
        copy[0x82..0x84].fill(0);
    }
    let crc = crc32c_raw(sb.checksum_seed, &(ino as u32).to_le_bytes());
    let crc = crc32c_raw(crc, &raw[0x64..0x68]);
    (crc32c_raw(crc, &copy), hi)
}

/// The backup groups below `groups` (not group 0).
fn backups(sb: &Superblock, groups: u64) -> Vec<u64> {
    let mut out = Vec::new();
    if sb.has_ro(ro_compat::SPARSE_SUPER) || sb.has_compat(compat::SPARSE_SUPER2) {
        // Only a few groups: 1, powers of 3, 5, 7 (or the two named).
        let mut cands = vec![1u64];
        for base in [3u64, 5, 7] {
            let mut p = base;
            while p < groups {
                cands.push(p);
                p *= base;
            }
        }
        cands.extend(sb.backup_bgs.iter().map(|&b| u64::from(b)));
        cands.sort_unstable();
        cands.dedup();
        out.extend(
            cands
                .into_iter()
                .filter(|&g| g > 0 && g < groups && sb.has_super(g)),
        );
    } else {
        out.extend((1..groups).filter(|&g| sb.has_super(g)));
    }
    out
}

/// Checks the resize inode against the old layout and returns the blocks
/// to rewrite for the new one (none without `resize_inode` or reserved
/// blocks).
fn resize_inode(
    vol: &mut Volume,
    fs: &ExtFs,
    new: &Superblock,
    old_groups: u64,
    new_groups: u64,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let old = &fs.sb;
    if !old.has_compat(compat::RESIZE_INODE) || old.reserved_gdt_blocks == 0 {
        return Ok(Vec::new());
    }
    let bad = |why: String| {
        Err(Error::unsupported(format!(
            "ext: the resize inode is not laid out as e2fsck expects ({why}); run e2fsck"
        )))
    };
    let bs = old.block_size;
    let apb = bs / 4;
    let isz = old.inode_size;
    let table = fs.groups[0].inode_table;
    let inode_at = table * bs + (RESIZE_INO - 1) * isz;
    let block_at = inode_at / bs * bs;
    let mut block = vol.read(block_at, bs, "ext resize inode")?;
    let off = (inode_at - block_at) as usize;
    let mut inode = block[off..off + isz as usize].to_vec();
    let csum = old.has_ro(ro_compat::METADATA_CSUM);
    if csum {
        let (c, hi) = inode_csum(old, RESIZE_INO, &inode);
        let stored = u32::from(le16(&inode, 0x7C))
            | if hi {
                u32::from(le16(&inode, 0x82)) << 16
            } else {
                0
            };
        let c = if hi { c } else { c & 0xFFFF };
        if c != stored {
            return Err(Error::corrupt(format!(
                "ext: the resize inode's checksum {stored:#x}, its bytes give {c:#x}"
            )));
        }
    }
    for i in 0..15 {
        let v = le32(&inode, 0x28 + 4 * i);
        if (i == 13) != (v != 0) {
            return bad(format!("block pointer {i} is {v}"));
        }
    }
    let dind = u64::from(le32(&inode, 0x28 + 4 * 13));
    if dind >= old.blocks_count {
        return bad(format!(
            "double-indirect block {dind} outside the filesystem"
        ));
    }
    let huge = old.has_ro(ro_compat::HUGE_FILE) && le32(&inode, 0x20) & HUGE_FILE_FL != 0;
    let units = if huge { 1 } else { bs / 512 };
    let i_blocks = u64::from(le32(&inode, 0x1C))
        | if old.has_ro(ro_compat::HUGE_FILE) {
            u64::from(le16(&inode, 0x74)) << 32
        } else {
            0
        };
    let count = |sb: &Superblock, groups: u64| {
        1 + sb.reserved_gdt_blocks * (1 + backups(sb, groups).len() as u64)
    };
    let old_backups = backups(old, old_groups);
    let new_backups = backups(new, new_groups);
    if new_backups.len() as u64 > apb {
        return Err(Error::unsupported(format!(
            "ext: {} backup groups do not fit one indirect block of the resize inode",
            new_backups.len()
        )));
    }
    if i_blocks != count(old, old_groups) * units {
        return bad(format!(
            "{i_blocks} blocks counted, {} expected",
            count(old, old_groups) * units
        ));
    }
    let old_gdt = old.gdt_blocks();
    let new_gdt = new.gdt_blocks();
    let primary = |r: u64| old.first_data_block + 1 + old_gdt + r;
    let mut dind_block = vol.read(dind * bs, bs, "ext resize inode block")?;
    let mut expected = vec![0u8; bs as usize];
    for r in 0..old.reserved_gdt_blocks {
        put32(
            &mut expected,
            (((old_gdt + r) % apb) * 4) as usize,
            primary(r) as u32,
        );
    }
    if dind_block != expected {
        return bad("its double-indirect block".into());
    }
    let mut writes = Vec::new();
    let used = new_gdt - old_gdt;
    for r in 0..old.reserved_gdt_blocks {
        let p = primary(r);
        let ind = vol.read(p * bs, bs, "ext reserved descriptor block")?;
        let mut want = vec![0u8; bs as usize];
        for (i, g) in old_backups.iter().enumerate() {
            put32(&mut want, i * 4, (p + g * old.blocks_per_group) as u32);
        }
        if ind != want {
            return bad(format!("reserved descriptor block {p}"));
        }
        if r < used {
            // Becomes a descriptor block.
            put32(&mut dind_block, (((old_gdt + r) % apb) * 4) as usize, 0);
            continue;
        }
        let mut grown = vec![0u8; bs as usize];
        for (i, g) in new_backups.iter().enumerate() {
            let b = p + g * new.blocks_per_group;
            if b > u64::from(u32::MAX) {
                return Err(Error::unsupported(format!(
                    "ext: the resize inode cannot address block {b} (past 2^32)"
                )));
            }
            put32(&mut grown, i * 4, b as u32);
        }
        if grown != ind {
            writes.push((p, grown));
        }
    }
    writes.push((dind, dind_block));
    let n = count(new, new_groups) * units;
    put32(&mut inode, 0x1C, n as u32);
    if old.has_ro(ro_compat::HUGE_FILE) {
        put16(&mut inode, 0x74, (n >> 32) as u16);
    } else if n >> 32 != 0 {
        return Err(Error::unsupported(
            "ext: the resize inode's block count overflows".into(),
        ));
    }
    if csum {
        let (c, hi) = inode_csum(old, RESIZE_INO, &inode);
        put16(&mut inode, 0x7C, c as u16);
        if hi {
            put16(&mut inode, 0x82, (c >> 16) as u16);
        }
    }
    block[off..off + isz as usize].copy_from_slice(&inode);
    writes.push((block_at / bs, block));
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(ro: u32, compat_bits: u32, backup_bgs: [u32; 2]) -> Superblock {
        let mut raw = vec![0u8; 1024];
        raw[0x38..0x3A].copy_from_slice(&crate::fs::ext::MAGIC.to_le_bytes());
        raw[0x4C] = 1;
        raw[0x5C..0x60].copy_from_slice(&compat_bits.to_le_bytes());
        raw[0x64..0x68].copy_from_slice(&ro.to_le_bytes());
        raw[0x04..0x08].copy_from_slice(&(1u32 << 24).to_le_bytes());
        raw[0x18] = 2;
        raw[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        raw[0x58] = 128;
        raw[0x24C..0x250].copy_from_slice(&backup_bgs[0].to_le_bytes());
        raw[0x250..0x254].copy_from_slice(&backup_bgs[1].to_le_bytes());
        Superblock::parse(&raw).unwrap()
    }

    #[test]
    fn backup_groups_follow_the_sparse_rules() {
        // The powers of 3, 5 and 7 below 130, by hand.
        let s = sb(ro_compat::SPARSE_SUPER, 0, [0, 0]);
        assert_eq!(backups(&s, 130), [1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
        let s = sb(0, 0, [0, 0]);
        assert_eq!(backups(&s, 5), [1, 2, 3, 4]);
        let s = sb(0, compat::SPARSE_SUPER2, [1, 40]);
        assert_eq!(backups(&s, 41), [1, 40]);
        assert_eq!(backups(&s, 40), [1]);
    }

    #[test]
    fn tail_bits_and_split_fields() {
        let mut b = vec![0u8; 4];
        set_tail(&mut b, 13);
        assert_eq!(b, [0, 0xE0, 0xFF, 0xFF]);
        let mut d = vec![0u8; 32];
        assert!(put_split(&mut d, 0x0C, 0x2C, 16, 0x1_0000, "n").is_err());
        put_split(&mut d, 0x0C, 0x2C, 16, 0xFFFF, "n").unwrap();
        assert_eq!(split_get(&d, 0x0C, 0x2C, 16), 0xFFFF);
        let mut d = vec![0u8; 64];
        put_split(&mut d, 0x0C, 0x2C, 16, 0x12_3456, "n").unwrap();
        assert_eq!((d[0x0C], d[0x0D], d[0x2C], d[0x2D]), (0x56, 0x34, 0x12, 0));
        put_split(&mut d, 0x00, 0x20, 32, 0x1_0000_0002, "n").unwrap();
        assert_eq!(split_get(&d, 0x00, 0x20, 32), 0x1_0000_0002);
    }
}
