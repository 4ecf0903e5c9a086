//! The extent map: in memory (a BTreeMap of extents, looked up, mapped
//! and unmapped) and on disk (the B+-tree, loaded and validated whole,
//! written copy-on-write at each commit).

use byteorder::{ByteOrder, LittleEndian};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{
    Vci, VciHeader, BLOCK, EXTENT_BYTES, HEADER_BLOCKS, INTERNAL_BYTES, INTERNAL_ENTRIES,
    LEAF_ENTRIES, MAX_DEPTH, NODE_BLOCKS, NODE_BYTES, NODE_INTERNAL, NODE_LEAF,
};
use crate::error::{Error, Result};

/// One extent: `len` disk blocks from a start (the map's key) stored from
/// file block `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ext {
    pub(super) len: u64,
    pub(super) addr: u64,
}

impl Vci {
    /// The extent holding block `b`, or the start of the next one.
    pub(super) fn lookup(&self, b: u64) -> (Option<(u64, Ext)>, Option<u64>) {
        if let Some((&s, &e)) = self.extents.range(..=b).next_back() {
            if b < s + e.len {
                return (Some((s, e)), None);
            }
        }
        (None, self.extents.range(b..).next().map(|(&s, _)| s))
    }

    /// Removes blocks [start, start+len) from the map; their data blocks
    /// become pending-free.
    pub(super) fn unmap(&mut self, start: u64, len: u64) {
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
    pub(super) fn map(&mut self, start: u64, len: u64, addr: u64) {
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

    /// Writes the in-memory map as a new tree in free blocks; returns
    /// (root, node blocks, depth).
    pub(super) fn write_tree(&mut self) -> Result<(u64, Vec<u64>, u32)> {
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
                LittleEndian::write_u64(&mut node[at + 18..], *s);
                LittleEndian::write_u32(&mut node[at + 26..], e.len as u32);
                LittleEndian::write_u64(&mut node[at + 30..], e.addr);
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
                    LittleEndian::write_u64(&mut node[at..], *first);
                    LittleEndian::write_u32(
                        &mut node[at + 8..],
                        (end - first).min(u64::from(u32::MAX)) as u32,
                    );
                    LittleEndian::write_u64(&mut node[at + 12..], *child);
                }
                let addr = self.write_node(&node, &mut nodes)?;
                next.push((chunk[0].0, chunk[chunk.len() - 1].1, addr));
            }
            level = next;
            depth += 1;
        }
        Ok((level[0].2, nodes, depth))
    }

    pub(super) fn write_node(&mut self, node: &[u8], nodes: &mut Vec<u64>) -> Result<u64> {
        let (addr, _) = match self.allocate(NODE_BLOCKS, true) {
            Some(r) => r,
            None => {
                for &n in nodes.iter() {
                    self.set_bits(n, NODE_BLOCKS, false);
                }
                return Err(Error::no_space(format!(
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
}

type Tree = (BTreeMap<u64, Ext>, Vec<u64>, u32);

/// Loads and validates the whole tree.
pub(super) fn load_tree(file: &File, header: &VciHeader) -> Result<Tree> {
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
pub(super) fn walk(
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
        return Err(Error::corrupt(format!(
            "VCI: tree deeper than {MAX_DEPTH} levels"
        )));
    }
    let file_blocks = header.blocks.min(header.file_blocks);
    match addr.checked_add(NODE_BLOCKS) {
        Some(end) if addr >= HEADER_BLOCKS && end <= file_blocks => {}
        _ => {
            return Err(Error::corrupt(format!(
                "VCI: tree node at block {addr} lies outside the cache"
            )))
        }
    }
    if !seen.insert(addr) {
        return Err(Error::corrupt(format!(
            "VCI: tree node at block {addr} is reached twice (a loop or shared node)"
        )));
    }
    nodes.push(addr);
    let mut node = vec![0u8; NODE_BYTES];
    file.read_exact_at(&mut node, addr * BLOCK)
        .map_err(|e| Error::corrupt(format!("VCI: tree node at block {addr}: {e}")))?;
    match node[0] {
        NODE_LEAF => {
            if *leaf_depth.get_or_insert(depth) != depth {
                return Err(Error::corrupt("VCI: leaves at different depths".into()));
            }
            let disk_blocks = header.disk_size.div_ceil(BLOCK);
            let mut prev_end = lo;
            let mut ended = false;
            for i in 0..LEAF_ENTRIES {
                let at = 1 + i * EXTENT_BYTES;
                let flags = node[at + 16];
                let start = LittleEndian::read_u64(&node[at + 18..]);
                let len = u64::from(LittleEndian::read_u32(&node[at + 26..]));
                let data = LittleEndian::read_u64(&node[at + 30..]);
                // LRU links (at + 0, at + 8): ignored.
                if len == 0 || data == 0 {
                    ended = true;
                    continue;
                }
                if ended {
                    return Err(Error::corrupt(format!(
                        "VCI: leaf at block {addr} has a used entry after an unused one"
                    )));
                }
                if flags != 0 {
                    return Err(Error::unsupported(format!(
                        "VCI: extent flags {flags:#x} (compression/encryption) are not supported"
                    )));
                }
                let end = start.saturating_add(len);
                if start < prev_end || end > hi || end > disk_blocks {
                    return Err(Error::corrupt(format!(
                        "VCI: extent {start}+{len} in leaf {addr} overlaps, is out of order, \
                         or lies outside its parent's range or the disk"
                    )));
                }
                match data.checked_add(len) {
                    Some(de) if data >= HEADER_BLOCKS && de <= file_blocks => {}
                    _ => {
                        return Err(Error::corrupt(format!(
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
                let first = LittleEndian::read_u64(&node[at..]);
                let span = u64::from(LittleEndian::read_u32(&node[at + 8..]));
                let child = LittleEndian::read_u64(&node[at + 12..]);
                if span == 0 || child == 0 {
                    ended = true;
                    continue;
                }
                if ended {
                    return Err(Error::corrupt(format!(
                        "VCI: internal node at block {addr} has a used entry after an unused one"
                    )));
                }
                children.push((first, span, child));
            }
            if children.is_empty() {
                return Err(Error::corrupt(format!(
                    "VCI: internal node at block {addr} has no children"
                )));
            }
            for (i, &(first, span, child)) in children.iter().enumerate() {
                let next = children.get(i + 1).map_or(hi, |c| c.0);
                if first < lo || first >= next || next > hi {
                    return Err(Error::corrupt(format!(
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
                    return Err(Error::corrupt(format!(
                        "VCI: internal node at block {addr} points to an empty child"
                    )));
                }
            }
            Ok(())
        }
        t => Err(Error::corrupt(format!(
            "VCI: tree node at block {addr} has type {t}"
        ))),
    }
}
