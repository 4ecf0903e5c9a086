//! The journal writer: transactions of metadata pages through the log,
//! checkpoints, shadow-paged map chunks, and the counters that show the
//! tests reach the rare paths.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::extents::ExtentMap;
use super::format::*;
use super::space::{Storage, UnitMap};
use crate::error::{Error, Result};

/// Log entry flag: this entry ends a transaction.
pub(super) const ENTRY_COMMIT: u32 = 1;
/// Largest number of pages carried by one log entry.
pub(super) const MAX_ENTRY_PAGES: usize = 1024;
/// A map chunk with at least this many dirty pages is rewritten whole into
/// fresh units (shadow paging) instead of logging its pages one by one.
/// Tests lower it (`set_shadow_threshold`) to drive the shadow path on
/// small maps.
pub(super) static SHADOW_CHUNK_PAGES: AtomicUsize = AtomicUsize::new(96);

/// Sets the dirty-page count from which a map chunk is shadowed instead of
/// logged (default 96). For tests and benchmarks; affects every store in
/// the process.
#[cfg(feature = "test-utils")]
pub fn set_shadow_threshold(pages: usize) {
    SHADOW_CHUNK_PAGES.store(pages.max(1), Ordering::Relaxed);
}
/// If more node pages than this would still go to the log, every chunk
/// with dirty pages is shadowed, so a transaction stays small. Tests lower
/// or raise it (`set_log_limits`).
pub(super) static MAX_LOGGED_NODE_PAGES: AtomicUsize = AtomicUsize::new(1024);
/// Pages per log entry the writer uses (at most `MAX_ENTRY_PAGES`, the
/// format's limit). Tests lower it to make transactions of many entries on
/// small maps.
pub(super) static ENTRY_PAGES: AtomicUsize = AtomicUsize::new(MAX_ENTRY_PAGES);

#[cfg(feature = "test-utils")]
/// Test and benchmark knobs, process-wide: the pages the writer puts in one
/// log entry (clamped to 1..=1024) and the node pages it logs before it
/// shadows every dirty chunk instead (at least 1). Defaults: 1024, 1024.
pub fn set_log_limits(entry_pages: usize, logged_node_pages: usize) {
    ENTRY_PAGES.store(entry_pages.clamp(1, MAX_ENTRY_PAGES), Ordering::Relaxed);
    MAX_LOGGED_NODE_PAGES.store(logged_node_pages.max(1), Ordering::Relaxed);
}

#[cfg(feature = "test-utils")]
/// How often the journal took its rarer paths, process-wide since start
/// (the crash tests read them to prove they reached those paths).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalCounters {
    /// Transactions written.
    pub transactions: u64,
    /// Transactions of more than one log entry.
    pub multi_entry_transactions: u64,
    /// Checkpoints made before a transaction because the log had no room
    /// for all of it (the transaction was then encoded with the new GUID).
    pub room_checkpoints: u64,
    /// Of those, the ones that restarted the log at offset 0 because the
    /// transaction would not fit between the old tail and the log's end.
    pub room_checkpoints_from_start: u64,
    /// Entries placed at log offset 0 because they did not fit before the
    /// end (the log wrapped).
    pub wrapped_entries: u64,
    /// Flushes refused because one transaction would not fit even an empty
    /// log (nothing acknowledged, nothing freed).
    pub oversized_transactions: u64,
    /// Transactions that failed after their pages were collected (their
    /// pages were marked dirty again).
    pub failed_transactions: u64,
    /// Entries replay found at log offset 0 after the one before them
    /// (a wrap, read back).
    pub replayed_wrapped_entries: u64,
}

pub(super) static COUNTERS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
pub(super) const C_TRANSACTIONS: usize = 0;
pub(super) const C_MULTI: usize = 1;
pub(super) const C_ROOM: usize = 2;
pub(super) const C_ROOM_FROM_START: usize = 3;
pub(super) const C_WRAPPED: usize = 4;
pub(super) const C_OVERSIZED: usize = 5;
pub(super) const C_FAILED: usize = 6;
pub(super) const C_REPLAYED_WRAPPED: usize = 7;

pub(super) fn count(counter: usize) {
    COUNTERS[counter].fetch_add(1, Ordering::Relaxed);
}

#[cfg(feature = "test-utils")]
/// The journal's counters (see [`JournalCounters`]).
pub fn journal_counters() -> JournalCounters {
    let c = |i: usize| COUNTERS[i].load(Ordering::Relaxed);
    JournalCounters {
        transactions: c(C_TRANSACTIONS),
        multi_entry_transactions: c(C_MULTI),
        room_checkpoints: c(C_ROOM),
        room_checkpoints_from_start: c(C_ROOM_FROM_START),
        wrapped_entries: c(C_WRAPPED),
        oversized_transactions: c(C_OVERSIZED),
        failed_transactions: c(C_FAILED),
        replayed_wrapped_entries: c(C_REPLAYED_WRAPPED),
    }
}

/// Blocks (4 KiB) of a log entry carrying `pages` pages: its descriptor
/// blocks, then the pages.
pub(super) fn entry_blocks(pages: usize) -> u64 {
    ((64 + 8 * pages).div_ceil(PAGE) + pages) as u64
}

/// Where entries of `sizes` bytes would go, in order, in a log of
/// `log_size` bytes whose next entry goes at `head` and whose entries not
/// yet checkpointed are `live`: each at the head, or at offset 0 when it
/// does not fit before the end; `None` when one would overwrite a live
/// entry (or an earlier entry of the same set).
pub(super) fn plan_entries(
    sizes: &[u64],
    head: u64,
    live: &VecDeque<(u64, u64)>,
    log_size: u64,
) -> Option<Vec<u64>> {
    let mut taken: Vec<(u64, u64)> = live.iter().copied().collect();
    let mut head = head;
    let mut offsets = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let at = if head + size > log_size { 0 } else { head };
        if at + size > log_size || taken.iter().any(|&(o, s)| at < o + s && o < at + size) {
            return None;
        }
        taken.push((at, size));
        offsets.push(at);
        head = at + size;
    }
    Some(offsets)
}

pub(super) fn new_guid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

/// A sealed metadata page and its home offset.
pub(super) type HomedPage = (u64, Vec<u8>);

/// A log entry found in the log region.
pub(super) struct LogEntry {
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) flags: u32,
    pub(super) pages: Vec<(u64, Vec<u8>)>,
}

/// The journal of an open persistent store: its headers, metadata chunk
/// tables, and the log's state.
#[derive(Debug)]
pub struct Journal {
    pub(super) header: Header,
    /// Slot (0 or 1) the current header lives in.
    pub(super) header_slot: usize,
    pub(super) source: SourceIdentity,
    pub(super) granularity: u64,
    pub(super) map_chunks: Vec<u64>,
    pub(super) bitmap_chunks: Vec<u64>,
    /// Chunk table pages (meta page numbers) changed since the last
    /// transaction.
    pub(super) dirty_tables: BTreeSet<u64>,
    /// The state page last logged (to skip it when unchanged).
    pub(super) last_state: Option<State>,
    /// Offset within the log for the next entry.
    pub(super) head: u64,
    pub(super) next_sequence: u64,
    /// Entries written since the last checkpoint: (offset, size).
    pub(super) live: VecDeque<(u64, u64)>,
    /// The logged version of every page changed since the last checkpoint.
    pub(super) unchecked: BTreeMap<u64, Vec<u8>>,
    /// A transaction was written since the last durable flush.
    pub(super) unsynced: bool,
    /// A transaction failed part-way: the log may hold some of its entries,
    /// so the next transaction starts with a checkpoint (a new log GUID).
    pub(super) must_checkpoint: bool,
    /// Map chunks were moved since the last checkpoint: their old units are
    /// released (pending), and must not be reused before a checkpoint, since
    /// older log entries name pages in them. Kept when the transaction that
    /// moved them fails, so the next successful flush still checkpoints.
    pub(super) shadowed_since_checkpoint: bool,
}

/// What `collect_pages` took from the dirty sets (given back if the
/// transaction fails).
pub(super) struct Taken {
    pub(super) nodes: Vec<u64>,
    pub(super) bitmap: Vec<u64>,
    pub(super) tables: BTreeSet<u64>,
}

/// The pages of one transaction.
pub(super) struct Collected {
    pub(super) pages: Vec<HomedPage>,
    /// Map chunks were moved to fresh units (shadow paging).
    pub(super) shadowed: bool,
    pub(super) taken: Taken,
}

/// Every chunk table page (meta pages 1..=15).
pub(super) fn all_table_pages() -> BTreeSet<u64> {
    MAP_TABLE_PAGES.chain(BITMAP_TABLE_PAGES).collect()
}

impl Journal {
    /// Initialises a new store on empty `storage` holding `map` (a fresh
    /// overlay's map), with a log of `log_size` bytes (`DEFAULT_LOG_SIZE`;
    /// smaller logs, down to 64 KiB, are for tests): writes the identity
    /// page, the metadata and then the headers, and makes it all durable.
    pub(crate) fn create(
        storage: &mut dyn Storage,
        source: SourceIdentity,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        log_size: u64,
    ) -> Result<Journal> {
        if !storage.is_empty()? {
            return Err(Error::invalid_argument(
                "the store file is not empty".into(),
            ));
        }
        if !(MIN_LOG_SIZE..=DEFAULT_LOG_SIZE).contains(&log_size)
            || !log_size.is_multiple_of(PAGE as u64)
        {
            return Err(Error::invalid_argument(format!(
                "log size {log_size}: a multiple of 4096 from {MIN_LOG_SIZE} to {DEFAULT_LOG_SIZE} bytes"
            )));
        }
        let mut identity = vec![0u8; PAYLOAD];
        identity[..IDENTITY_TEXT.len()].copy_from_slice(IDENTITY_TEXT);
        FieldsMut(&mut identity).u32(IDENTITY_TEXT.len(), FORMAT_VERSION);
        storage.set_len(DATA_OFFSET)?;
        storage.write_at(
            &seal(TYPE_IDENTITY, IDENTITY_OFFSET, &identity),
            IDENTITY_OFFSET,
        )?;
        let mut journal = Journal {
            header: Header {
                sequence: 1,
                store_uuid: new_guid(),
                log_guid: new_guid(),
                log_offset: LOG_OFFSET,
                log_size,
                log_tail: 0,
                log_sequence: 1,
                modification_uuid: new_guid(),
            },
            header_slot: 0,
            source,
            granularity: units.granularity(),
            map_chunks: Vec::new(),
            bitmap_chunks: Vec::new(),
            dirty_tables: all_table_pages(),
            last_state: None,
            head: 0,
            next_sequence: 1,
            live: VecDeque::new(),
            unchecked: BTreeMap::new(),
            unsynced: false,
            must_checkpoint: false,
            shadowed_since_checkpoint: false,
        };
        map.track_dirty_pages();
        map.mark_all_dirty();
        let collected = journal.collect_pages(map, units, None)?;
        storage.set_len(data_byte(units.end() * units.granularity()))?;
        for (home, page) in collected.pages {
            storage.write_at(&page, home)?;
        }
        units.transaction_written();
        storage.flush()?;
        storage.write_at(&journal.header.encode(0), HEADER_OFFSETS[0])?;
        let mut older = journal.header.clone();
        older.sequence = 0;
        storage.write_at(&older.encode(1), HEADER_OFFSETS[1])?;
        storage.flush()?;
        Ok(journal)
    }

    /// The store's UUID.
    pub(crate) fn store_uuid(&self) -> [u8; 16] {
        self.header.store_uuid
    }

    /// The UUID of the current modification session.
    pub(crate) fn modification_uuid(&self) -> [u8; 16] {
        self.header.modification_uuid
    }

    fn node_page_home(&self, page: u64) -> u64 {
        let chunk = self.map_chunks[(page / CHUNK_PAGES) as usize];
        data_byte(chunk * self.granularity) + (page % CHUNK_PAGES) * PAGE as u64
    }

    fn bitmap_page_home(&self, page: u64) -> u64 {
        let chunk = self.bitmap_chunks[(page / CHUNK_PAGES) as usize];
        data_byte(chunk * self.granularity) + (page % CHUNK_PAGES) * PAGE as u64
    }

    /// Makes sure the metadata chunks can hold every node and bitmap page.
    fn ensure_chunks(&mut self, map: &ExtentMap, units: &mut UnitMap) -> Result<()> {
        let g = self.granularity;
        let chunk_sectors = chunk_units(g) * g;
        loop {
            let need_map = map.node_pages().div_ceil(CHUNK_PAGES) as usize;
            let need_bitmap = units.bitmap_pages().div_ceil(CHUNK_PAGES) as usize;
            if self.map_chunks.len() >= need_map && self.bitmap_chunks.len() >= need_bitmap {
                return Ok(());
            }
            let map_capacity = (TABLE_ENTRIES_PER_PAGE * MAP_TABLE_PAGES.count() as u64) as usize;
            let bitmap_capacity =
                (TABLE_ENTRIES_PER_PAGE * BITMAP_TABLE_PAGES.count() as u64) as usize;
            if need_map > map_capacity || need_bitmap > bitmap_capacity {
                return Err(Error::no_space(
                    "the store's metadata tables are full (too many extents or units)".into(),
                ));
            }
            let chunk = units.allocate(chunk_sectors)? / g;
            let (table, first_page) = if self.map_chunks.len() < need_map {
                (&mut self.map_chunks, *MAP_TABLE_PAGES.start())
            } else {
                (&mut self.bitmap_chunks, *BITMAP_TABLE_PAGES.start())
            };
            self.dirty_tables
                .insert(first_page + table.len() as u64 / TABLE_ENTRIES_PER_PAGE);
            table.push(chunk);
        }
    }

    /// Every metadata page that changed since the last call, sealed, with
    /// its home offset. Chunks with many dirty node pages are first moved to
    /// fresh units and written there whole (`shadow`): then only the chunk
    /// table, not their pages, goes into the returned set. If this fails,
    /// the pages it took are marked dirty again.
    fn collect_pages(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: Option<&mut dyn Storage>,
    ) -> Result<Collected> {
        self.ensure_chunks(map, units)?;
        let node_pages = map.node_pages();
        let mut taken = Taken {
            nodes: map
                .take_dirty_pages()
                .into_iter()
                .filter(|&p| p < node_pages)
                .collect(),
            bitmap: units.take_dirty_pages(),
            tables: std::mem::take(&mut self.dirty_tables),
        };
        match self.seal_pages(map, units, storage, &mut taken) {
            Ok((pages, shadowed)) => Ok(Collected {
                pages,
                shadowed,
                taken,
            }),
            Err(e) => {
                self.give_back(map, units, taken);
                Err(e)
            }
        }
    }

    /// Marks the pages a failed transaction took as dirty again, so the
    /// next transaction carries them.
    fn give_back(&mut self, map: &mut ExtentMap, units: &mut UnitMap, taken: Taken) {
        map.mark_pages_dirty(&taken.nodes);
        units.mark_pages_dirty(&taken.bitmap);
        self.dirty_tables.extend(taken.tables);
        self.last_state = None;
    }

    /// The fallible half of `collect_pages`.
    fn seal_pages(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: Option<&mut dyn Storage>,
        taken: &mut Taken,
    ) -> Result<(Vec<HomedPage>, bool)> {
        let node_pages = map.node_pages();
        let dirty = taken.nodes.clone();
        let mut shadow = BTreeSet::new();
        if let Some(storage) = storage {
            let mut per_chunk: BTreeMap<u64, usize> = BTreeMap::new();
            for p in &dirty {
                *per_chunk.entry(p / CHUNK_PAGES).or_default() += 1;
            }
            let threshold = SHADOW_CHUNK_PAGES.load(Ordering::Relaxed);
            shadow.extend(
                per_chunk
                    .iter()
                    .filter(|(_, &n)| n >= threshold)
                    .map(|(&c, _)| c),
            );
            let logged: usize = per_chunk
                .iter()
                .filter(|(c, _)| !shadow.contains(*c))
                .map(|(_, n)| n)
                .sum();
            if logged > MAX_LOGGED_NODE_PAGES.load(Ordering::Relaxed) {
                shadow.extend(per_chunk.keys().copied());
            }
            let g = self.granularity;
            let chunk_sectors = chunk_units(g) * g;
            if !shadow.is_empty() {
                self.shadowed_since_checkpoint = true;
            }
            for &c in &shadow {
                let fresh = units.allocate(chunk_sectors)? / g;
                let old = std::mem::replace(&mut self.map_chunks[c as usize], fresh);
                // Reusable only once the switch is durable and checkpointed.
                units.release(old * g, chunk_sectors);
                self.dirty_tables
                    .insert(*MAP_TABLE_PAGES.start() + c / TABLE_ENTRIES_PER_PAGE);
            }
            self.ensure_chunks(map, units)?;
            for &c in &shadow {
                let first = c * CHUNK_PAGES;
                let mut chunk = Vec::with_capacity(CHUNK_PAGES as usize * PAGE);
                for p in first..(first + CHUNK_PAGES).min(node_pages) {
                    chunk.extend_from_slice(&seal(
                        TYPE_NODES,
                        self.node_page_home(p),
                        &map.page_payload(p),
                    ));
                }
                storage.write_at(&chunk, self.node_page_home(first))?;
            }
        }
        let mut pages = Vec::new();
        for &page in &dirty {
            if !shadow.contains(&(page / CHUNK_PAGES)) {
                let home = self.node_page_home(page);
                pages.push((home, seal(TYPE_NODES, home, &map.page_payload(page))));
            }
        }
        let bitmap_pages = units.bitmap_pages();
        // Pages the chunk allocations above dirtied join this transaction.
        taken.bitmap.extend(units.take_dirty_pages());
        let bitmap: BTreeSet<u64> = taken.bitmap.iter().copied().collect();
        for page in bitmap {
            if page < bitmap_pages {
                let home = self.bitmap_page_home(page);
                pages.push((home, seal(TYPE_BITMAP, home, &units.bitmap_page(page))));
            }
        }
        taken.tables.append(&mut self.dirty_tables);
        for &page in &taken.tables {
            let (table, first_page) = if MAP_TABLE_PAGES.contains(&page) {
                (&self.map_chunks, *MAP_TABLE_PAGES.start())
            } else {
                (&self.bitmap_chunks, *BITMAP_TABLE_PAGES.start())
            };
            let mut payload = vec![0u8; PAYLOAD];
            let first = ((page - first_page) * TABLE_ENTRIES_PER_PAGE) as usize;
            for (j, unit) in table
                .iter()
                .skip(first)
                .take(TABLE_ENTRIES_PER_PAGE as usize)
                .enumerate()
            {
                FieldsMut(&mut payload).u64(j * 8, *unit);
            }
            let home = META_OFFSET + page * PAGE as u64;
            pages.push((home, seal(TYPE_META, home, &payload)));
        }
        let state = State {
            granularity: self.granularity,
            data_offset: DATA_OFFSET,
            unit_end: units.end(),
            root: map.root_index(),
            node_slots: map.node_slots(),
            rng: map.rng_state(),
            virtual_sectors: map.len(),
            source: self.source.clone(),
            map_chunks: self.map_chunks.len() as u64,
            bitmap_chunks: self.bitmap_chunks.len() as u64,
            chunk_units: chunk_units(self.granularity),
        };
        if self.last_state.as_ref() != Some(&state) || !pages.is_empty() {
            pages.push((META_OFFSET, state.encode()));
            self.last_state = Some(state);
        }
        Ok((pages, !shadow.is_empty()))
    }

    /// Writes the metadata changed since the last transaction to the log as
    /// one committed transaction (data, and shadowed chunks, are made
    /// durable first). Does not wait for the log write to be durable:
    /// `flush` does. Returns whether chunks were shadowed (then the caller
    /// must checkpoint before the old chunks' units can be reused).
    ///
    /// Room for the whole transaction is made before any of it is encoded:
    /// if its entries do not all fit in the log's free space, the log is
    /// checkpointed first (restarting at offset 0 when the transaction would
    /// not fit between the tail and the end), so every entry carries the
    /// log GUID of the header replay will start from, and no checkpoint
    /// ever falls between the entries of one transaction. A transaction
    /// larger than the whole log fails with `NoSpace` before anything is
    /// written: nothing is acknowledged, nothing freed, and its pages stay
    /// dirty for the next flush.
    fn write_transaction(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: &mut dyn Storage,
    ) -> Result<bool> {
        if self.must_checkpoint {
            // An earlier transaction failed part-way: its entries may be in
            // the log. A new GUID retires them before anything follows.
            self.checkpoint_with(storage, false)?;
        }
        let collected = self.collect_pages(map, units, Some(&mut *storage))?;
        if collected.pages.is_empty() {
            return Ok(collected.shadowed);
        }
        match self.log_transaction(&collected.pages, units, storage) {
            Ok(()) => Ok(collected.shadowed),
            Err(e) => {
                count(C_FAILED);
                self.give_back(map, units, collected.taken);
                Err(e)
            }
        }
    }

    fn log_transaction(
        &mut self,
        pages: &[HomedPage],
        units: &mut UnitMap,
        storage: &mut dyn Storage,
    ) -> Result<()> {
        let per_entry = ENTRY_PAGES
            .load(Ordering::Relaxed)
            .clamp(1, MAX_ENTRY_PAGES);
        let groups: Vec<&[HomedPage]> = pages.chunks(per_entry).collect();
        let sizes: Vec<u64> = groups
            .iter()
            .map(|g| entry_blocks(g.len()) * PAGE as u64)
            .collect();
        let log = self.header.log_size;
        if plan_entries(&sizes, 0, &VecDeque::new(), log).is_none() {
            count(C_OVERSIZED);
            return Err(Error::no_space(format!(
                "one transaction of {} metadata pages needs {} bytes of log entries but the store's log holds {log} bytes; the flush was not done (the overlay stays usable)",
                pages.len(),
                sizes.iter().sum::<u64>()
            )));
        }
        // Grow the file first: shadowed chunks may be written past its end,
        // and a reader bounds the unit count by the file's length.
        let span = data_byte(units.end() * self.granularity);
        if storage.len()? < span {
            storage.set_len(span)?;
        }
        // Data (and shadowed chunks) before the map that refers to them.
        storage.flush()?;
        let offsets = match plan_entries(&sizes, self.head, &self.live, log) {
            Some(offsets) => offsets,
            None => {
                let from_start =
                    plan_entries(&sizes, self.tail_after_checkpoint(), &VecDeque::new(), log)
                        .is_none();
                count(C_ROOM);
                if from_start {
                    count(C_ROOM_FROM_START);
                }
                self.checkpoint_with(storage, from_start)?;
                plan_entries(&sizes, self.head, &self.live, log).ok_or_else(|| {
                    Error::internal("no room in an empty log for a transaction that fits it".into())
                })?
            }
        };
        // From here entries may reach the disk: no unit they map may be
        // written in place again, and until the last one is written the
        // log holds an unfinished transaction.
        units.transaction_written();
        self.must_checkpoint = true;
        for (i, (group, at)) in groups.iter().zip(offsets).enumerate() {
            let flags = if i + 1 == groups.len() {
                ENTRY_COMMIT
            } else {
                0
            };
            let entry = self.encode_entry(self.next_sequence, flags, group);
            let size = entry.len() as u64;
            if at != self.head {
                count(C_WRAPPED);
            }
            storage.write_at(&entry, self.header.log_offset + at)?;
            self.live.push_back((at, size));
            self.head = at + size;
            self.next_sequence += 1;
        }
        self.must_checkpoint = false;
        count(C_TRANSACTIONS);
        if groups.len() > 1 {
            count(C_MULTI);
        }
        for (home, page) in pages {
            self.unchecked.insert(*home, page.clone());
        }
        self.unsynced = true;
        Ok(())
    }

    fn encode_entry(&self, sequence: u64, flags: u32, pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let header_pages = (64 + 8 * pages.len()).div_ceil(PAGE);
        let total = header_pages + pages.len();
        let mut entry = vec![0u8; total * PAGE];
        {
            let mut f = FieldsMut(&mut entry);
            f.u32(0, TYPE_LOG);
            f.u64(8, sequence);
            f.bytes(16, &self.header.log_guid);
            f.u32(32, total as u32);
            f.u32(36, pages.len() as u32);
            f.u32(40, flags);
            for (i, (home, _)) in pages.iter().enumerate() {
                f.u64(64 + 8 * i, *home);
            }
        }
        for (i, (_, page)) in pages.iter().enumerate() {
            entry[(header_pages + i) * PAGE..][..PAGE].copy_from_slice(page);
        }
        let crc = crc32c::crc32c(&entry);
        entry[4..8].copy_from_slice(&crc.to_le_bytes());
        entry
    }

    /// The durability point: logs what changed, waits for it to be on disk,
    /// and lets units freed before it be reused.
    pub(crate) fn flush(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: &mut dyn Storage,
    ) -> Result<()> {
        self.write_transaction(map, units, storage)?;
        storage.flush()?;
        self.unsynced = false;
        if self.shadowed_since_checkpoint {
            // Old log entries name pages in the replaced chunks: empty the
            // log before those units can be reused.
            self.checkpoint(storage)?;
        }
        units.commit_done();
        let used: u64 = self.live.iter().map(|e| e.1).sum();
        if used > self.header.log_size / 2 {
            self.checkpoint(storage)?;
        }
        Ok(())
    }

    /// Where the log's tail goes at a checkpoint that does not restart it:
    /// the head, or 0 when less than a block remains after it.
    fn tail_after_checkpoint(&self) -> u64 {
        if self.head + PAGE as u64 > self.header.log_size {
            0
        } else {
            self.head
        }
    }

    /// Writes every logged page to its home, then empties the log by
    /// writing a header with a new log GUID and tail.
    pub(crate) fn checkpoint(&mut self, storage: &mut dyn Storage) -> Result<()> {
        self.checkpoint_with(storage, false)
    }

    /// `checkpoint`, with the new tail at log offset 0 when `from_start`.
    fn checkpoint_with(&mut self, storage: &mut dyn Storage, from_start: bool) -> Result<()> {
        if self.unsynced {
            storage.flush()?;
            self.unsynced = false;
        }
        for (home, page) in &self.unchecked {
            storage.write_at(page, *home)?;
        }
        storage.flush()?;
        let mut header = self.header.clone();
        header.sequence += 1;
        header.log_guid = new_guid();
        header.log_tail = if from_start {
            0
        } else {
            self.tail_after_checkpoint()
        };
        header.log_sequence = self.next_sequence;
        let slot = 1 - self.header_slot;
        storage.write_at(&header.encode(slot), HEADER_OFFSETS[slot])?;
        storage.flush()?;
        self.header = header;
        self.header_slot = slot;
        self.head = self.header.log_tail;
        self.live.clear();
        self.unchecked.clear();
        self.must_checkpoint = false;
        self.shadowed_since_checkpoint = false;
        Ok(())
    }
}
