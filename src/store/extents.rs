//! The extent map: the virtual drive as an ordered sequence of extents.
//!
//! Stored as an implicit treap (a randomized balanced binary tree keyed by
//! position, each node carrying the total length and extent count of its
//! subtree) in an arena of nodes. Lookup, split at any sector, and splicing
//! a sequence of extents elsewhere are all O(log n) expected; nothing walks
//! the extents linearly except iteration over a requested range.

use std::collections::BTreeSet;

use super::extent_index::{FlatIndex, ReadIndex};
use super::format::PAYLOAD;
use crate::error::{Error, Result};

/// What backs an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Inserted or discarded space: unallocated, reads as zeros.
    None = 0,
    /// A range of the source disk, starting at `base`.
    Source = 1,
    /// A range of the overlay store, starting at sector `base`: data
    /// written through the overlay (or copied there), reads as `Normal`.
    Store = 2,
    /// Store space reserved with its unit but never written: reads as zeros
    /// and reports `NotAlloc` (the store's bytes there are never read, so a
    /// reused unit's stale data cannot show). Starts at store sector `base`.
    StoreHole = 3,
    /// Like `StoreHole`, but the sectors were `Blank` (known zeros) before
    /// they moved into the store, so they report `Blank`.
    StoreZero = 4,
}

impl ExtentKind {
    /// True for kinds whose `base` is a store sector and that hold their
    /// store units (referenced, released on discard and delete), whether or
    /// not data was written there.
    pub fn in_store(self) -> bool {
        matches!(
            self,
            ExtentKind::Store | ExtentKind::StoreHole | ExtentKind::StoreZero
        )
    }
}

/// A run of `len` sectors backed by `kind` from `base` onwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub len: u64,
    pub kind: ExtentKind,
    /// First sector in the source or store (0 for `None`).
    pub base: u64,
}

impl Extent {
    /// Unallocated space of `len` sectors.
    pub fn none(len: u64) -> Extent {
        Extent {
            len,
            kind: ExtentKind::None,
            base: 0,
        }
    }

    /// The two halves of this extent cut `at` sectors in.
    fn cut(self, at: u64) -> (Extent, Extent) {
        debug_assert!(at > 0 && at < self.len);
        let second_base = match self.kind {
            ExtentKind::None => 0,
            _ => self.base + at,
        };
        (
            Extent { len: at, ..self },
            Extent {
                len: self.len - at,
                kind: self.kind,
                base: second_base,
            },
        )
    }

    /// `other` continues this extent seamlessly: both can be one extent.
    pub fn continued_by(&self, other: &Extent) -> bool {
        self.kind == other.kind
            && (self.kind == ExtentKind::None
                || self.base.checked_add(self.len) == Some(other.base))
    }

    /// The part of this extent from `offset` sectors in, `len` long.
    pub fn slice(&self, offset: u64, len: u64) -> Extent {
        Extent {
            len,
            kind: self.kind,
            base: match self.kind {
                ExtentKind::None => 0,
                _ => self.base + offset,
            },
        }
    }
}

/// The "no node" index (also on disk).
pub(crate) const NIL: u32 = u32::MAX;
/// Bytes of one node record on disk.
pub(crate) const NODE_RECORD_BYTES: usize = 48;
/// Node records per 4 KiB map page (after the 16-byte page header).
pub(crate) const NODES_PER_PAGE: u64 = (PAYLOAD / NODE_RECORD_BYTES) as u64;
/// A tree deeper than this (possible only if priorities on disk were not
/// random) is rebuilt on load, so recursion stays shallow.
const MAX_LOADED_DEPTH: usize = 160;

#[derive(Debug, Clone)]
struct Node {
    extent: Extent,
    /// Total sectors in this subtree.
    sectors: u64,
    /// Extents in this subtree.
    count: u32,
    priority: u32,
    left: u32,
    right: u32,
}

/// A subtree handle: the index of its root node, or `NIL`.
type Tree = u32;

/// The ordered extent map of a virtual drive.
#[derive(Debug, Clone)]
pub struct ExtentMap {
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    root: Tree,
    rng: u64,
    /// Record which pages of the node arena change (for the journal).
    track_dirty: bool,
    dirty_pages: BTreeSet<u64>,
    /// A flat copy of the order for lookups while the map does not change.
    index: ReadIndex,
}

impl Default for ExtentMap {
    fn default() -> Self {
        ExtentMap::new()
    }
}

impl ExtentMap {
    /// An empty map (a drive of zero sectors).
    pub fn new() -> ExtentMap {
        ExtentMap {
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            root: NIL,
            rng: 0x2545_F491_4F6C_DD1D,
            track_dirty: false,
            dirty_pages: BTreeSet::new(),
            index: ReadIndex::default(),
        }
    }

    /// A map holding one extent (none if `extent.len == 0`).
    pub fn with_extent(extent: Extent) -> ExtentMap {
        let mut map = ExtentMap::new();
        if extent.len > 0 {
            map.root = map.new_node(extent).unwrap_or(NIL);
        }
        map
    }

    /// Total sectors of the virtual drive.
    pub fn len(&self) -> u64 {
        self.sectors(self.root)
    }

    /// True for a drive of zero sectors.
    pub fn is_empty(&self) -> bool {
        self.root == NIL
    }

    /// Number of extents.
    pub fn extent_count(&self) -> u64 {
        u64::from(self.count(self.root))
    }

    /// Approximate heap bytes used by the map.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free_nodes.capacity() * std::mem::size_of::<u32>()
            + self.index.heap_bytes()
    }

    /// Whether the flat read index exists now (for tests that must reach
    /// it).
    #[cfg(test)]
    pub(crate) fn has_flat_index(&self) -> bool {
        self.index.heap_bytes() > 0
    }

    fn sectors(&self, t: Tree) -> u64 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].sectors
        }
    }

    fn count(&self, t: Tree) -> u32 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].count
        }
    }

    fn next_priority(&mut self) -> u32 {
        // xorshift64*: cheap, deterministic, good enough for treap balance.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    fn new_node(&mut self, extent: Extent) -> Result<Tree> {
        let priority = self.next_priority();
        let node = Node {
            extent,
            sectors: extent.len,
            count: 1,
            priority,
            left: NIL,
            right: NIL,
        };
        if let Some(index) = self.free_nodes.pop() {
            self.nodes[index as usize] = node;
            self.mark(index);
            return Ok(index);
        }
        if self.nodes.len() >= NIL as usize {
            return Err(Error::out_of_memory(
                "the extent map holds 2^32 - 1 extents".into(),
            ));
        }
        self.nodes
            .try_reserve(1)
            .map_err(|e| Error::out_of_memory(format!("extent map: {e}")))?;
        self.nodes.push(node);
        let index = (self.nodes.len() - 1) as u32;
        self.mark(index);
        Ok(index)
    }

    fn mark(&mut self, t: Tree) {
        self.index.reset();
        if self.track_dirty {
            self.dirty_pages.insert(u64::from(t) / NODES_PER_PAGE);
        }
    }

    fn update(&mut self, t: Tree) {
        let (left, right) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right)
        };
        let sectors = self.sectors(left) + self.sectors(right) + self.nodes[t as usize].extent.len;
        let count = self.count(left) + self.count(right) + 1;
        let n = &mut self.nodes[t as usize];
        n.sectors = sectors;
        n.count = count;
        self.mark(t);
    }

    fn merge(&mut self, a: Tree, b: Tree) -> Tree {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].priority > self.nodes[b as usize].priority {
            let right = self.nodes[a as usize].right;
            self.nodes[a as usize].right = self.merge(right, b);
            self.update(a);
            a
        } else {
            let left = self.nodes[b as usize].left;
            self.nodes[b as usize].left = self.merge(a, left);
            self.update(b);
            b
        }
    }

    /// Splits `t` into the first `pos` sectors and the rest, cutting an
    /// extent in two where `pos` falls inside it.
    fn split(&mut self, t: Tree, pos: u64) -> Result<(Tree, Tree)> {
        if t == NIL {
            return Ok((NIL, NIL));
        }
        let (left, right, extent) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right, n.extent)
        };
        let left_len = self.sectors(left);
        if pos <= left_len {
            let (a, b) = self.split(left, pos)?;
            self.nodes[t as usize].left = b;
            self.update(t);
            Ok((a, t))
        } else if pos >= left_len + extent.len {
            let (a, b) = self.split(right, pos - left_len - extent.len)?;
            self.nodes[t as usize].right = a;
            self.update(t);
            Ok((t, b))
        } else {
            let (first, second) = extent.cut(pos - left_len);
            let second_node = self.new_node(second)?;
            self.nodes[t as usize].extent = first;
            self.nodes[t as usize].right = NIL;
            self.update(t);
            let b = self.merge(second_node, right);
            Ok((t, b))
        }
    }

    /// Frees every node of `t` and returns its extents in order.
    fn dissolve(&mut self, t: Tree, out: &mut Vec<Extent>) {
        if t == NIL {
            return;
        }
        let (left, right, extent) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right, n.extent)
        };
        self.dissolve(left, out);
        out.push(extent);
        self.free_nodes.push(t);
        self.dissolve(right, out);
    }

    /// The extent containing sector `pos`: (its first virtual sector, the
    /// extent). `None` when `pos` is past the end.
    pub fn find(&self, pos: u64) -> Option<(u64, Extent)> {
        if pos >= self.len() {
            return None;
        }
        if let Some(index) = self.read_index() {
            return index.entry(index.position_of(pos));
        }
        let mut t = self.root;
        let mut start = 0u64;
        let mut pos = pos;
        while t != NIL {
            let n = &self.nodes[t as usize];
            let left_len = self.sectors(n.left);
            if pos < left_len {
                t = n.left;
            } else if pos < left_len + n.extent.len {
                return Some((start + left_len, n.extent));
            } else {
                pos -= left_len + n.extent.len;
                start += left_len + n.extent.len;
                t = n.right;
            }
        }
        None
    }

    /// The extent with index `index` in order: (its first sector, it).
    pub fn nth(&self, index: u64) -> Option<(u64, Extent)> {
        let mut t = self.root;
        let mut start = 0u64;
        let mut index = index;
        while t != NIL {
            let n = &self.nodes[t as usize];
            let left_count = u64::from(self.count(n.left));
            if index < left_count {
                t = n.left;
            } else if index == left_count {
                return Some((start + self.sectors(n.left), n.extent));
            } else {
                index -= left_count + 1;
                start += self.sectors(n.left) + n.extent.len;
                t = n.right;
            }
        }
        None
    }

    /// The extents overlapping `[start, end)`, clipped to it, each with its
    /// first virtual sector. O(log n + k).
    pub fn range(&self, start: u64, end: u64) -> Vec<(u64, Extent)> {
        match self.index_for(start, end) {
            Some(index) => index.pieces(start, end).collect(),
            None => {
                let mut out = Vec::new();
                if start < end {
                    self.collect(self.root, 0, start, end, &mut out);
                }
                out
            }
        }
    }

    /// Calls `f` with what [`range`](Self::range) returns, without
    /// allocating when the flat index answers and the range has at most
    /// `PIECES_ON_STACK` pieces (a read's usual case, made many times a
    /// second).
    pub fn with_range<R>(&self, start: u64, end: u64, f: impl FnOnce(&[(u64, Extent)]) -> R) -> R {
        const PIECES_ON_STACK: usize = 8;
        let Some(index) = self.index_for(start, end) else {
            return f(&self.range(start, end));
        };
        let mut pieces = [(0u64, Extent::none(0)); PIECES_ON_STACK];
        let mut count = 0;
        for piece in index.pieces(start, end) {
            if count == PIECES_ON_STACK {
                return f(&index.pieces(start, end).collect::<Vec<_>>());
            }
            pieces[count] = piece;
            count += 1;
        }
        f(&pieces[..count])
    }

    /// The flat index for a range lookup, when the range is not empty and
    /// starts inside the map (see `read_index`).
    fn index_for(&self, start: u64, end: u64) -> Option<&FlatIndex> {
        if start < end && start < self.len() {
            self.read_index()
        } else {
            None
        }
    }

    /// The flat index when it exists or a lookup now makes it worth
    /// building (see `extent_index`).
    fn read_index(&self) -> Option<&FlatIndex> {
        self.index.lookup(self.extent_count(), || self.flatten())
    }

    /// Every extent's first sector and node, in order (iteratively: the
    /// tree may be deep).
    fn flatten(&self) -> FlatIndex {
        let mut index = FlatIndex::with_capacity(self.count(self.root) as usize);
        let mut stack = Vec::new();
        let mut t = self.root;
        let mut start = 0u64;
        loop {
            while t != NIL {
                stack.push(t);
                t = self.nodes[t as usize].left;
            }
            let Some(top) = stack.pop() else { break };
            let n = &self.nodes[top as usize];
            index.push(start, n.extent);
            start += n.extent.len;
            t = n.right;
        }
        index.finish()
    }

    fn collect(&self, t: Tree, base: u64, start: u64, end: u64, out: &mut Vec<(u64, Extent)>) {
        if t == NIL {
            return;
        }
        let n = &self.nodes[t as usize];
        let node_start = base + self.sectors(n.left);
        let node_end = node_start + n.extent.len;
        if start < node_start {
            self.collect(n.left, base, start, end, out);
        }
        if start < node_end && end > node_start {
            let from = start.max(node_start);
            let to = end.min(node_end);
            out.push((from, n.extent.slice(from - node_start, to - from)));
        }
        if end > node_end {
            self.collect(n.right, node_end, start, end, out);
        }
    }

    /// Cuts `[start, start + len)` out of the map and returns its extents
    /// in order; the drive shrinks by `len`.
    pub fn remove(&mut self, start: u64, len: u64) -> Result<Vec<Extent>> {
        let (left, rest) = self.split(self.root, start)?;
        let (middle, right) = self.split(rest, len)?;
        let mut removed = Vec::new();
        self.dissolve(middle, &mut removed);
        self.root = self.merge(left, right);
        self.index.reset();
        self.coalesce_at(start)?;
        Ok(removed)
    }

    /// Inserts `extents` so the first starts at sector `at`; the drive grows
    /// by their total length.
    pub fn insert(&mut self, at: u64, extents: &[Extent]) -> Result<()> {
        let mut middle = NIL;
        let mut total = 0u64;
        for extent in extents.iter().filter(|e| e.len > 0) {
            let node = self.new_node(*extent)?;
            middle = self.merge(middle, node);
            total += extent.len;
        }
        let (left, right) = self.split(self.root, at)?;
        let joined = self.merge(left, middle);
        self.root = self.merge(joined, right);
        self.index.reset();
        self.coalesce_at(at)?;
        self.coalesce_at(at + total)?;
        Ok(())
    }

    /// Replaces `[start, start + len)` with `extent` (of the same length)
    /// and returns the extents it replaced.
    pub fn replace(&mut self, start: u64, len: u64, extent: Extent) -> Result<Vec<Extent>> {
        self.splice(start, len, &[extent])
    }

    /// Replaces `[start, start + len)` with `extents` (of the same total
    /// length, in order) and returns the extents it replaced. The caller
    /// joins neighbours among `extents` that continue each other; the map
    /// joins them with the extents around the range.
    pub fn splice(&mut self, start: u64, len: u64, extents: &[Extent]) -> Result<Vec<Extent>> {
        debug_assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), len);
        let (left, rest) = self.split(self.root, start)?;
        let (middle, right) = self.split(rest, len)?;
        let mut replaced = Vec::new();
        self.dissolve(middle, &mut replaced);
        let mut new = NIL;
        for extent in extents.iter().filter(|e| e.len > 0) {
            let node = self.new_node(*extent)?;
            new = self.merge(new, node);
        }
        let joined = self.merge(left, new);
        self.root = self.merge(joined, right);
        self.index.reset();
        self.coalesce_at(start)?;
        self.coalesce_at(start + len)?;
        Ok(replaced)
    }

    /// Joins the extents ending and starting at `pos` when one continues the
    /// other, so edits that undo each other leave no fragments behind.
    fn coalesce_at(&mut self, pos: u64) -> Result<()> {
        if pos == 0 || pos >= self.len() {
            return Ok(());
        }
        let Some((before_start, before)) = self.find(pos - 1) else {
            return Ok(());
        };
        let Some((after_start, after)) = self.find(pos) else {
            return Ok(());
        };
        if after_start != pos || !before.continued_by(&after) {
            return Ok(());
        }
        let (left, rest) = self.split(self.root, before_start)?;
        let (pair, right) = self.split(rest, before.len + after.len)?;
        let mut old = Vec::new();
        self.dissolve(pair, &mut old);
        let joined = self.new_node(Extent {
            len: before.len + after.len,
            ..before
        })?;
        let head = self.merge(left, joined);
        self.root = self.merge(head, right);
        self.index.reset();
        Ok(())
    }

    /// All extents in order with their first virtual sector.
    pub fn to_vec(&self) -> Vec<(u64, Extent)> {
        self.range(0, self.len())
    }
}

/// The persisted form of the map: the node arena, page by page.
impl ExtentMap {
    /// Starts recording which node pages change.
    pub(crate) fn track_dirty_pages(&mut self) {
        self.track_dirty = true;
    }

    /// Node pages changed since the last call.
    pub(crate) fn take_dirty_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty_pages).into_iter().collect()
    }

    /// Marks node pages changed again (a transaction that took them failed).
    pub(crate) fn mark_pages_dirty(&mut self, pages: &[u64]) {
        self.dirty_pages.extend(pages.iter().copied());
    }

    /// Marks every node page changed (after a rebuild).
    pub(crate) fn mark_all_dirty(&mut self) {
        for page in 0..self.node_pages() {
            self.dirty_pages.insert(page);
        }
    }

    /// Length of the node arena (slots, used or free).
    pub(crate) fn node_slots(&self) -> u32 {
        self.nodes.len() as u32
    }

    /// Pages the node arena spans.
    pub(crate) fn node_pages(&self) -> u64 {
        (self.nodes.len() as u64).div_ceil(NODES_PER_PAGE)
    }

    /// The root node's index (`NIL` for an empty map).
    pub(crate) fn root_index(&self) -> u32 {
        self.root
    }

    /// The priority generator's state.
    pub(crate) fn rng_state(&self) -> u64 {
        self.rng
    }

    /// The payload of node page `page`: `NODES_PER_PAGE` records of
    /// `NODE_RECORD_BYTES` (slots past the arena's end are zero).
    pub(crate) fn page_payload(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAYLOAD];
        let first = page * NODES_PER_PAGE;
        for i in 0..NODES_PER_PAGE {
            let Some(n) = self.nodes.get((first + i) as usize) else {
                break;
            };
            let r = &mut out[i as usize * NODE_RECORD_BYTES..][..NODE_RECORD_BYTES];
            r[0..8].copy_from_slice(&n.extent.len.to_le_bytes());
            r[8..16].copy_from_slice(&n.extent.base.to_le_bytes());
            r[16..24].copy_from_slice(&n.sectors.to_le_bytes());
            r[24] = n.extent.kind as u8;
            r[28..32].copy_from_slice(&n.priority.to_le_bytes());
            r[32..36].copy_from_slice(&n.left.to_le_bytes());
            r[36..40].copy_from_slice(&n.right.to_le_bytes());
            r[40..44].copy_from_slice(&n.count.to_le_bytes());
        }
        out
    }

    /// Rebuilds a map from its persisted node pages, validating everything:
    /// record fields, child indices, that the tree is a tree (no node
    /// reachable twice), and every subtree total. `page(i)` returns the
    /// payload of node page `i`; `what(i)` names it in errors. Slots not
    /// reachable from the root become free slots.
    pub(crate) fn from_pages(
        slots: u32,
        root: u32,
        rng: u64,
        page: &mut dyn FnMut(u64) -> Result<Vec<u8>>,
        what: &dyn Fn(u64) -> String,
    ) -> Result<ExtentMap> {
        if slots == NIL {
            return Err(Error::corrupt("node slot count is the NIL marker".into()));
        }
        if root != NIL && root >= slots {
            return Err(Error::corrupt(format!(
                "root node {root} outside {slots} node slots"
            )));
        }
        let mut nodes = Vec::new();
        nodes
            .try_reserve_exact(slots as usize)
            .map_err(|e| Error::out_of_memory(format!("{slots} extent map nodes: {e}")))?;
        let pages = u64::from(slots).div_ceil(NODES_PER_PAGE);
        for p in 0..pages {
            let payload = page(p)?;
            for i in 0..NODES_PER_PAGE {
                let index = p * NODES_PER_PAGE + i;
                if index >= u64::from(slots) {
                    break;
                }
                let r = &payload[i as usize * NODE_RECORD_BYTES..][..NODE_RECORD_BYTES];
                let u64_at =
                    |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap_or([0; 8]));
                let u32_at =
                    |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap_or([0; 4]));
                let kind = match r[24] {
                    0 => ExtentKind::None,
                    1 => ExtentKind::Source,
                    2 => ExtentKind::Store,
                    3 => ExtentKind::StoreHole,
                    4 => ExtentKind::StoreZero,
                    k => {
                        return Err(Error::corrupt(format!(
                            "{}: node {index} has unknown kind {k}",
                            what(p)
                        )))
                    }
                };
                nodes.push(Node {
                    extent: Extent {
                        len: u64_at(0),
                        kind,
                        base: u64_at(8),
                    },
                    sectors: u64_at(16),
                    priority: u32_at(28),
                    left: u32_at(32),
                    right: u32_at(36),
                    count: u32_at(40),
                });
            }
        }
        let mut map = ExtentMap {
            nodes,
            free_nodes: Vec::new(),
            root,
            rng: rng | 1,
            track_dirty: false,
            dirty_pages: BTreeSet::new(),
            index: ReadIndex::default(),
        };
        let depth = map.validate(&what)?;
        if depth > MAX_LOADED_DEPTH {
            map.rebuild_balanced()?;
            // Every node moved: the next transaction must carry every page,
            // or it would persist the new root over the old pages.
            map.mark_all_dirty();
        }
        Ok(map)
    }

    /// Checks the loaded arena is a well-formed tree with correct totals;
    /// collects unreachable slots as free. Returns the tree's depth.
    fn validate(&mut self, what: &dyn Fn(u64) -> String) -> Result<usize> {
        let slots = self.nodes.len();
        let page_of = |t: u32| what(u64::from(t) / NODES_PER_PAGE);
        let mut seen = vec![false; slots];
        // Iterative post-order: (node, depth, children done).
        let mut stack: Vec<(u32, usize, bool)> = Vec::new();
        let mut max_depth = 0;
        if self.root != NIL {
            stack.push((self.root, 1, false));
        }
        while let Some((t, depth, done)) = stack.pop() {
            let n = &self.nodes[t as usize];
            if !done {
                if seen[t as usize] {
                    return Err(Error::corrupt(format!(
                        "{}: node {t} is reachable twice (the map is not a tree)",
                        page_of(t)
                    )));
                }
                seen[t as usize] = true;
                max_depth = max_depth.max(depth);
                if n.extent.len == 0 {
                    return Err(Error::corrupt(format!(
                        "{}: node {t} has length 0",
                        page_of(t)
                    )));
                }
                for child in [n.left, n.right] {
                    if child != NIL && child as usize >= slots {
                        return Err(Error::corrupt(format!(
                            "{}: node {t} points to node {child} outside {slots} slots",
                            page_of(t)
                        )));
                    }
                }
                let (left, right) = (n.left, n.right);
                stack.push((t, depth, true));
                for child in [left, right] {
                    if child != NIL {
                        stack.push((child, depth + 1, false));
                    }
                }
            } else {
                let child_total = |c: u32, nodes: &[Node]| {
                    if c == NIL {
                        (0u64, 0u32)
                    } else {
                        (nodes[c as usize].sectors, nodes[c as usize].count)
                    }
                };
                let (ls, lc) = child_total(n.left, &self.nodes);
                let (rs, rc) = child_total(n.right, &self.nodes);
                let sectors = ls
                    .checked_add(rs)
                    .and_then(|x| x.checked_add(n.extent.len))
                    .filter(|x| x.checked_mul(512).is_some());
                let count = lc.checked_add(rc).and_then(|x| x.checked_add(1));
                if sectors != Some(n.sectors) || count != Some(n.count) {
                    return Err(Error::corrupt(format!(
                        "{}: node {t} subtree totals ({} sectors, {} extents) do not add up",
                        page_of(t),
                        n.sectors,
                        n.count
                    )));
                }
            }
        }
        self.free_nodes = (0..slots as u32)
            .rev()
            .filter(|&t| !seen[t as usize])
            .collect();
        Ok(max_depth)
    }

    /// Rebuilds the tree from its extents in order with fresh priorities.
    fn rebuild_balanced(&mut self) -> Result<()> {
        let extents: Vec<Extent> = self.to_vec().into_iter().map(|(_, e)| e).collect();
        let track = self.track_dirty;
        let rng = self.rng;
        *self = ExtentMap::new();
        self.rng = rng;
        self.track_dirty = track;
        let mut root = NIL;
        for e in extents {
            let node = self.new_node(e)?;
            root = self.merge(root, node);
        }
        self.root = root;
        self.index.reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(len: u64, base: u64) -> Extent {
        Extent {
            len,
            kind: ExtentKind::Source,
            base,
        }
    }

    #[test]
    fn split_and_rejoin_leaves_one_extent() {
        let mut map = ExtentMap::with_extent(src(100, 0));
        let cut = map.remove(10, 20).unwrap();
        assert_eq!(cut, vec![src(20, 10)]);
        assert_eq!(map.len(), 80);
        assert_eq!(map.extent_count(), 2);
        map.insert(10, &cut).unwrap();
        assert_eq!(map.to_vec(), vec![(0, src(100, 0))]);
    }

    #[test]
    fn find_and_nth_agree_with_a_linear_walk() {
        let mut map = ExtentMap::with_extent(src(1000, 0));
        // Interleave inserted space to make 201 extents.
        for i in (1..=100u64).rev() {
            map.insert(i * 10, &[Extent::none(1)]).unwrap();
        }
        let all = map.to_vec();
        assert_eq!(all.len() as u64, map.extent_count());
        let mut expected_start = 0;
        for (i, (start, extent)) in all.iter().enumerate() {
            assert_eq!(*start, expected_start);
            assert_eq!(map.nth(i as u64), Some((*start, *extent)));
            for pos in *start..*start + extent.len {
                assert_eq!(map.find(pos).unwrap().0, *start);
            }
            expected_start += extent.len;
        }
        assert_eq!(map.find(expected_start), None);
    }

    fn check_against(map: &ExtentMap, model: &[(ExtentKind, u64)], probes: u64) {
        assert_eq!(map.len(), model.len() as u64);
        let mut rng = 0x5EED_u64;
        for _ in 0..probes {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pos = rng % map.len();
            let (start, e) = map.find(pos).unwrap();
            let got = if e.kind == ExtentKind::None {
                0
            } else {
                e.base + (pos - start)
            };
            assert_eq!((e.kind, got), model[pos as usize], "find({pos})");
            // Up to 200 sectors: past the pieces `with_range` keeps on
            // the stack.
            let end = (pos + 1 + rng % 200).min(map.len());
            let mut at = pos;
            let pieces = map.range(pos, end);
            assert_eq!(
                map.with_range(pos, end, <[_]>::to_vec),
                pieces,
                "with_range({pos}, {end})"
            );
            for (from, piece) in pieces {
                assert_eq!(from, at, "range({pos}, {end}) is not contiguous");
                for k in 0..piece.len {
                    let base = if piece.kind == ExtentKind::None {
                        0
                    } else {
                        piece.base + k
                    };
                    assert_eq!((piece.kind, base), model[(from + k) as usize]);
                }
                at += piece.len;
            }
            assert_eq!(at, end, "range({pos}, {end}) stops short");
        }
        assert_eq!(map.find(map.len()), None);
        assert!(map.range(map.len(), map.len() + 5).is_empty());
    }

    #[test]
    fn the_flat_index_answers_like_the_tree_and_is_dropped_by_every_change() {
        // 4000 extents: single inserted sectors through a source extent.
        let mut map = ExtentMap::with_extent(src(40_000, 0));
        let mut model: Vec<(ExtentKind, u64)> =
            (0..40_000).map(|s| (ExtentKind::Source, s)).collect();
        for i in (1..=2000u64).rev() {
            map.insert(i * 20, &[Extent::none(1)]).unwrap();
            model.insert((i * 20) as usize, (ExtentKind::None, 0));
        }
        assert_eq!(map.extent_count(), 4000);
        assert_eq!(map.index.heap_bytes(), 0, "built before any lookup");
        // Enough lookups to build it, then answers from it.
        check_against(&map, &model, 3000);
        assert!(map.index.heap_bytes() > 0, "the index was never built");
        // Each kind of change drops it; answers stay right before and after
        // it is rebuilt.
        map.remove(100, 7).unwrap();
        model.drain(100..107);
        assert_eq!(map.index.heap_bytes(), 0, "remove kept a stale index");
        check_against(&map, &model, 3000);
        assert!(map.index.heap_bytes() > 0);
        map.replace(
            5000,
            3,
            Extent {
                len: 3,
                kind: ExtentKind::Store,
                base: 77,
            },
        )
        .unwrap();
        for k in 0..3 {
            model[5000 + k] = (ExtentKind::Store, 77 + k as u64);
        }
        assert_eq!(map.index.heap_bytes(), 0, "replace kept a stale index");
        check_against(&map, &model, 3000);
        map.insert(0, &[Extent::none(9)]).unwrap();
        for _ in 0..9 {
            model.insert(0, (ExtentKind::None, 0));
        }
        assert_eq!(map.index.heap_bytes(), 0, "insert kept a stale index");
        check_against(&map, &model, 3000);
        // Removing everything: the emptied map must not answer from an
        // index of the old one.
        let len = map.len();
        map.remove(0, len).unwrap();
        assert_eq!(map.find(0), None);
        assert!(map.range(0, 10).is_empty());
    }

    #[test]
    fn adjacent_inserted_space_coalesces() {
        let mut map = ExtentMap::with_extent(src(10, 0));
        map.insert(5, &[Extent::none(3)]).unwrap();
        map.insert(5, &[Extent::none(2)]).unwrap();
        assert_eq!(
            map.to_vec(),
            vec![(0, src(5, 0)), (5, Extent::none(5)), (10, src(5, 5))]
        );
    }

    #[test]
    fn pages_round_trip_and_damage_is_detected() {
        let mut map = ExtentMap::with_extent(src(10_000, 0));
        for i in 0..300u64 {
            map.replace(i * 20, 3, Extent::none(3)).unwrap();
        }
        map.remove(50, 10).unwrap(); // leaves free slots
        let pages: Vec<Vec<u8>> = (0..map.node_pages()).map(|p| map.page_payload(p)).collect();
        let name = |p: u64| format!("page {p}");
        let loaded = ExtentMap::from_pages(
            map.node_slots(),
            map.root_index(),
            map.rng_state(),
            &mut |p| Ok(pages[p as usize].clone()),
            &name,
        )
        .unwrap();
        assert_eq!(loaded.to_vec(), map.to_vec());
        // A flipped length breaks the subtree totals.
        let mut bad = pages.clone();
        bad[0][0] ^= 0x40;
        let err = ExtentMap::from_pages(
            map.node_slots(),
            map.root_index(),
            map.rng_state(),
            &mut |p| Ok(bad[p as usize].clone()),
            &name,
        )
        .unwrap_err();
        assert!(err.to_string().contains("page 0"), "{err}");
    }

    #[test]
    fn reserved_store_kinds_round_trip_and_unknown_kinds_are_refused() {
        let store = |kind, len, base| Extent { len, kind, base };
        let mut map = ExtentMap::with_extent(src(100, 0));
        map.splice(
            10,
            30,
            &[
                store(ExtentKind::StoreHole, 5, 64),
                store(ExtentKind::Store, 10, 69),
                store(ExtentKind::StoreZero, 15, 79),
            ],
        )
        .unwrap();
        let expected = vec![
            (0, src(10, 0)),
            (10, store(ExtentKind::StoreHole, 5, 64)),
            (15, store(ExtentKind::Store, 10, 69)),
            (25, store(ExtentKind::StoreZero, 15, 79)),
            (40, src(60, 40)),
        ];
        assert_eq!(map.to_vec(), expected);
        let pages: Vec<Vec<u8>> = (0..map.node_pages()).map(|p| map.page_payload(p)).collect();
        let kinds: Vec<u8> = (0..map.node_slots() as usize)
            .map(|i| pages[0][i * NODE_RECORD_BYTES + 24])
            .collect();
        for k in [3u8, 4] {
            assert!(kinds.contains(&k), "kind byte {k} written: {kinds:?}");
        }
        let name = |p: u64| format!("page {p}");
        let load = |pages: &Vec<Vec<u8>>| {
            ExtentMap::from_pages(
                map.node_slots(),
                map.root_index(),
                map.rng_state(),
                &mut |p| Ok(pages[p as usize].clone()),
                &name,
            )
        };
        assert_eq!(load(&pages).unwrap().to_vec(), expected);
        let slot = kinds.iter().position(|&k| k == 4).unwrap();
        let mut bad = pages.clone();
        bad[0][slot * NODE_RECORD_BYTES + 24] = 5;
        let err = load(&bad).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("node {slot} has unknown kind 5")),
            "{err}"
        );
    }

    #[test]
    fn a_million_extents_stay_shallow_enough_to_recurse() {
        let mut map = ExtentMap::with_extent(src(2_000_000, 0));
        for i in 0..500_000u64 {
            // Every other sector becomes its own extent.
            map.replace(i * 4, 1, Extent::none(1)).unwrap();
        }
        assert!(map.extent_count() >= 1_000_000);
        assert_eq!(map.find(4).unwrap(), (4, Extent::none(1)));
        assert_eq!(map.find(5).unwrap(), (5, src(3, 5)));
    }

    /// A persisted map deeper than the load bound (a chain, as a crafted
    /// store could hold) is rebuilt balanced on load, and every node page is
    /// then dirty: the next transaction must carry them all, or it would
    /// persist the new root and slot count over the old pages.
    #[test]
    fn a_map_rebuilt_on_load_has_every_page_dirty() {
        let n = MAX_LOADED_DEPTH as u32 + 40;
        let pages = u64::from(n).div_ceil(NODES_PER_PAGE);
        let mut load = |p: u64| -> Result<Vec<u8>> {
            let mut payload = vec![0u8; PAYLOAD];
            for i in 0..NODES_PER_PAGE {
                let t = (p * NODES_PER_PAGE + i) as u32;
                if t >= n {
                    break;
                }
                let r = &mut payload[i as usize * NODE_RECORD_BYTES..][..NODE_RECORD_BYTES];
                let below = u64::from(n - t);
                r[0..8].copy_from_slice(&1u64.to_le_bytes());
                r[8..16].copy_from_slice(&u64::from(t).to_le_bytes());
                r[16..24].copy_from_slice(&below.to_le_bytes());
                r[24] = ExtentKind::Source as u8;
                r[28..32].copy_from_slice(&(n - t).to_le_bytes());
                r[32..36].copy_from_slice(&NIL.to_le_bytes());
                let right = if t + 1 < n { t + 1 } else { NIL };
                r[36..40].copy_from_slice(&right.to_le_bytes());
                r[40..44].copy_from_slice(&(n - t).to_le_bytes());
            }
            Ok(payload)
        };
        let mut map = ExtentMap::from_pages(n, 0, 1, &mut load, &|p| format!("page {p}")).unwrap();
        assert_eq!(map.len(), u64::from(n));
        assert_eq!(map.find(7).unwrap(), (7, src(1, 7)));
        assert!(map.node_pages() >= 1 && pages >= 1);
        let dirty = map.take_dirty_pages();
        assert_eq!(dirty, (0..map.node_pages()).collect::<Vec<_>>());
    }
}
