//! Checking a store without changing it.

use super::format::*;
use super::load::*;
use super::space::{Storage, UNITS_PER_BITMAP_PAGE};
use super::*;
use crate::error::Result;

/// What `check_store` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// The number of extents in the map (0 if it could not be read).
    pub extents: u64,
    pub units_total: u64,
    pub units_in_use: u64,
    /// Units the persisted bitmap marks used that nothing references.
    pub leaked_units: u64,
    /// Units referenced by the map that the bitmap marks free.
    pub unmarked_units: u64,
    /// Sectors referenced by more than one extent or chunk.
    pub doubly_used_sectors: u64,
    /// Log transactions that an open would replay.
    pub pending_transactions: u64,
    /// Every problem found, one line each; empty when consistent.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a store's consistency without changing it: structures and CRCs,
/// the extent map, sectors used twice, and the persisted free-space bitmap
/// against what the map references.
pub fn check_store(storage: &dyn Storage) -> CheckReport {
    let mut report = CheckReport::default();
    let loaded = match load(storage) {
        Ok(l) => l,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.pending_transactions = loaded.transactions as u64;
    report.units_total = loaded.state.unit_end;
    let map = match loaded.load_map(storage) {
        Ok(m) => m,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.extents = map.extent_count();
    let g = loaded.state.granularity;
    let mut refs = loaded.references(&map);
    refs.sort_unstable();
    let mut used = vec![false; loaded.state.unit_end as usize];
    let mut last_end = 0u64;
    for &(start, len) in &refs {
        let end = start.saturating_add(len);
        if start < last_end {
            report.doubly_used_sectors += last_end.min(end) - start;
        }
        last_end = last_end.max(end);
        if end > loaded.state.unit_end * g {
            report.problems.push(format!(
                "store sectors {start}..{end} lie outside the store's {} units",
                loaded.state.unit_end
            ));
            continue;
        }
        for u in start / g..end.div_ceil(g) {
            used[u as usize] = true;
        }
    }
    if report.doubly_used_sectors > 0 {
        report.problems.push(format!(
            "{} store sectors are used by more than one extent",
            report.doubly_used_sectors
        ));
    }
    report.units_in_use = used.iter().filter(|&&u| u).count() as u64;
    for page in 0..loaded.state.unit_end.div_ceil(UNITS_PER_BITMAP_PAGE) {
        let home = loaded.chunk_home(&loaded.bitmap_chunks, page);
        let bits = match loaded.page(storage, home, TYPE_BITMAP, "free-space bitmap page") {
            Ok(b) => b,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        for i in 0..UNITS_PER_BITMAP_PAGE {
            let u = page * UNITS_PER_BITMAP_PAGE + i;
            if u >= loaded.state.unit_end {
                break;
            }
            let marked = bits[(i / 8) as usize] & (1 << (i % 8)) != 0;
            match (marked, used[u as usize]) {
                (true, false) => report.leaked_units += 1,
                (false, true) => report.unmarked_units += 1,
                _ => {}
            }
        }
    }
    if report.leaked_units > 0 {
        report.problems.push(format!(
            "{} units are marked used in the free-space bitmap but nothing references them (leaked)",
            report.leaked_units
        ));
    }
    if report.unmarked_units > 0 {
        report.problems.push(format!(
            "{} units are referenced by the map but marked free in the bitmap",
            report.unmarked_units
        ));
    }
    report
}

/// `check_store` on a store file, opened read-only under a shared lock
/// (`Locked` while a writer has it open).
pub fn check_store_file(path: &std::path::Path) -> Result<CheckReport> {
    let storage = file::open_locked(path, true)?;
    Ok(check_store(&storage))
}
