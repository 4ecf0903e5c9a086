//! L1 and L2 tables: reading and checking them, decoding L2 entries
//! (standard and extended) and mapping virtual bytes to units.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use super::Qcow2Disk;
use crate::error::{Error, Result};

use super::layout::{L2_COMPRESSED, L2_ZERO, OFFSET_MASK};
const SUBCLUSTERS: u64 = 32;

/// What one allocation unit (cluster, or subcluster with extended L2
/// entries) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Stored at this host offset (for the unit's first byte).
    Data(u64),
    /// A compressed cluster with this L2 descriptor.
    Compressed(u64),
    Zero,
    /// Not in this image: the backing file's, or zeros.
    Absent,
}

/// How to decode the units of an L2 table.
#[derive(Debug, Clone, Copy)]
pub(super) struct UnitLayout {
    pub(super) cluster_bits: u32,
    pub(super) extended_l2: bool,
    pub(super) has_zero_flag: bool,
}

impl UnitLayout {
    /// What unit number `index` of an L2 table holds (host offsets are for
    /// the unit's first byte).
    pub(super) fn unit(&self, table: &[u64], index: u64) -> std::result::Result<Unit, String> {
        let cluster_size = 1u64 << self.cluster_bits;
        let (cluster, sub) = if self.extended_l2 {
            (index / SUBCLUSTERS, index % SUBCLUSTERS)
        } else {
            (index, 0)
        };
        let (entry, bitmap) = if self.extended_l2 {
            let at = cluster as usize * 2;
            (table[at], table[at + 1])
        } else {
            (table[cluster as usize], 0)
        };
        if entry & L2_COMPRESSED != 0 {
            return Ok(Unit::Compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        if host & (cluster_size - 1) != 0 {
            return Err(format!(
                "entry {cluster} maps to unaligned host offset {host}"
            ));
        }
        if !self.extended_l2 {
            return Ok(if self.has_zero_flag && entry & L2_ZERO != 0 {
                Unit::Zero
            } else if host == 0 {
                Unit::Absent
            } else {
                Unit::Data(host)
            });
        }
        let allocated = bitmap >> sub & 1 != 0;
        let zero = bitmap >> (sub + SUBCLUSTERS) & 1 != 0;
        match (allocated, zero) {
            (true, true) => Err(format!(
                "entry {cluster} marks subcluster {sub} both allocated and zero"
            )),
            (true, false) if host == 0 => Err(format!(
                "entry {cluster} has allocated subclusters but no host cluster"
            )),
            (true, false) => Ok(Unit::Data(host + sub * (cluster_size / SUBCLUSTERS))),
            (false, true) => Ok(Unit::Zero),
            (false, false) => Ok(Unit::Absent),
        }
    }
}

impl Qcow2Disk {
    /// Bytes of virtual disk one L2 table maps.
    pub(super) fn l2_span(&self) -> u64 {
        let entry_bytes = if self.extended_l2 { 16 } else { 8 };
        (self.cluster_size() / entry_bytes) * self.cluster_size()
    }

    pub(super) fn unit_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// What holds the virtual byte `pos`, and the end of the region from
    /// `pos` that is uniformly so (a whole L2 span when its L1 entry is
    /// empty; otherwise following units of the same L2 table that continue
    /// it, looking no further than `want_end`).
    pub(super) fn lookup(&self, pos: u64, want_end: u64) -> Result<(Unit, u64)> {
        let span = self.l2_span();
        let l1_index = pos / span;
        let l1_entry = *self.l1.get(l1_index as usize).ok_or_else(|| {
            Error::internal(format!(
                "{}: virtual byte {pos} past the L1 table",
                self.describe()
            ))
        })?;
        let l2_offset = l1_entry & OFFSET_MASK;
        let table_start = l1_index * span;
        if l2_offset == 0 {
            return Ok((Unit::Absent, table_start + span));
        }
        let layout = UnitLayout {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2,
            has_zero_flag: self.has_zero_flag,
        };
        let unit_size = self.unit_size();
        let units_in_table = span / unit_size;
        let first_index = (pos - table_start) / unit_size;
        let name = self.describe();
        let table = self.l2_table(l1_index, l2_offset)?;
        let first = layout.unit(&table, first_index).map_err(|why| {
            Error::corrupt(format!(
                "{name}: L2 table at byte offset {l2_offset}: {why}"
            ))
        })?;
        let mut next_index = first_index + 1;
        if !matches!(first, Unit::Compressed(_)) {
            while next_index < units_in_table && table_start + next_index * unit_size < want_end {
                // A damaged entry further on ends the run; it is reported
                // when (if) that unit is read.
                let Ok(next) = layout.unit(&table, next_index) else {
                    break;
                };
                let distance = (next_index - first_index) * unit_size;
                let continues = match (first, next) {
                    (Unit::Data(host), Unit::Data(next_host)) => next_host == host + distance,
                    (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                next_index += 1;
            }
        }
        let end = match first {
            // A compressed cluster is one unit however it is subdivided.
            Unit::Compressed(_) => (pos | (self.cluster_size() - 1)) + 1,
            _ => table_start + next_index * unit_size,
        };
        let unit = match first {
            Unit::Data(host) => Unit::Data(host + (pos % unit_size)),
            other => other,
        };
        Ok((unit, end))
    }

    /// The L2 table that L1 entry `l1_index` points at, from the cache or
    /// read and validated.
    pub(super) fn l2_table(&self, l1_index: u64, l2_offset: u64) -> Result<Arc<[u64]>> {
        if let Some(table) = self.l2_cache.get(l2_offset) {
            return Ok(table);
        }
        {
            let cluster_size = self.cluster_size();
            let in_file = l2_offset
                .checked_add(cluster_size)
                .is_some_and(|end| end <= self.file_len);
            if l2_offset & (cluster_size - 1) != 0 || !in_file {
                return Err(Error::corrupt(format!(
                    "{}: L1 entry {l1_index} points at an L2 table at byte offset {l2_offset}, \
                     which is unaligned or not inside the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            let mut raw = vec![0u8; cluster_size as usize];
            self.file
                .read_exact_at(&mut raw, l2_offset)
                .map_err(|e| Error::read(&format!("{} L2 table", self.describe()), l2_offset, e))?;
            let entries = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
            Ok(self.l2_cache.insert(l2_offset, entries))
        }
    }
}

/// Reads the active L1 table and checks every L2 table it names is
/// cluster-aligned and inside the file, so a damaged table fails at open.
pub(super) fn read_l1(
    file: &File,
    path: &Path,
    offset: u64,
    entries: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    file.read_exact_at(&mut raw, offset)
        .map_err(|e| Error::read(&format!("{} L1 table", path.display()), offset, e))?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    for (index, entry) in l1.iter().enumerate() {
        let l2 = entry & OFFSET_MASK;
        let inside = l2
            .checked_add(cluster_size)
            .is_some_and(|end| end <= file_len);
        if l2 != 0 && (l2 & (cluster_size - 1) != 0 || !inside) {
            return Err(Error::corrupt(format!(
                "{}: L1 entry {index} (table at byte offset {offset}) points at an L2 table at \
                 byte offset {l2}, which is unaligned or not inside the {file_len}-byte file",
                path.display()
            )));
        }
    }
    Ok(l1)
}

#[cfg(test)]
mod tests {
    use crate::formats::table_cache::TableCache;

    #[test]
    fn l2_cache_evicts_least_recently_used() {
        let cache = TableCache::new(2);
        cache.insert(1, vec![1]);
        cache.insert(2, vec![2]);
        assert!(cache.get(1).is_some());
        cache.insert(3, vec![3]);
        assert!(cache.contains(1));
        assert!(!cache.contains(2));
        assert!(cache.contains(3));
    }
}
