//! The extent map: the virtual drive as an ordered sequence of extents.
//!
//! Stored as an implicit treap (a randomized balanced binary tree keyed by
//! position, each node carrying the total length and extent count of its
//! subtree) in an arena of nodes. Lookup, split at any sector, and splicing
//! a sequence of extents elsewhere are all O(log n) expected; nothing walks
//! the extents linearly except iteration over a requested range.

use crate::error::{Error, Result};

/// What backs an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Inserted or discarded space: unallocated, reads as zeros.
    None = 0,
    /// A range of the source disk, starting at `base`.
    Source = 1,
    /// A range of the overlay store, starting at sector `base`.
    Store = 2,
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
    fn continued_by(&self, other: &Extent) -> bool {
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

const NIL: u32 = u32::MAX;

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
            return Ok(index);
        }
        if self.nodes.len() >= NIL as usize {
            return Err(Error::OutOfMemory(
                "the extent map holds 2^32 - 1 extents".into(),
            ));
        }
        self.nodes
            .try_reserve(1)
            .map_err(|e| Error::OutOfMemory(format!("extent map: {e}")))?;
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as u32)
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
        let mut out = Vec::new();
        if start < end {
            self.collect(self.root, 0, start, end, &mut out);
        }
        out
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
        self.coalesce_at(at)?;
        self.coalesce_at(at + total)?;
        Ok(())
    }

    /// Replaces `[start, start + len)` with `extent` (of the same length)
    /// and returns the extents it replaced.
    pub fn replace(&mut self, start: u64, len: u64, extent: Extent) -> Result<Vec<Extent>> {
        debug_assert_eq!(extent.len, len);
        let (left, rest) = self.split(self.root, start)?;
        let (middle, right) = self.split(rest, len)?;
        let mut replaced = Vec::new();
        self.dissolve(middle, &mut replaced);
        let node = if extent.len > 0 {
            self.new_node(extent)?
        } else {
            NIL
        };
        let joined = self.merge(left, node);
        self.root = self.merge(joined, right);
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
        Ok(())
    }

    /// All extents in order with their first virtual sector.
    pub fn to_vec(&self) -> Vec<(u64, Extent)> {
        self.range(0, self.len())
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
}
