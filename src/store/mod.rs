//! The persistent, crash-safe overlay store: a file holding the extent map,
//! the free-space bitmap and the data units, with a write-ahead log.
//!
//! The on-disk format is specified in docs/FORMAT.md. In short: metadata
//! lives in 4 KiB pages, each with a CRC-32C and its own offset; changes to
//! them are written as *transactions* into a circular log (entries with a
//! signature, sequence number, log GUID, descriptors and CRC-32C) and only
//! later, at a checkpoint, to their home. Data units are written and made
//! durable before the log entry that maps them, and units a durable map
//! refers to are never overwritten: so after a crash the log's newest
//! committed transaction gives a state the overlay really had.

pub(crate) mod format;

use std::collections::{BTreeMap, VecDeque};

use crate::disk::{Disk, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::overlay::extents::ExtentMap;
use crate::overlay::space::{Storage, UnitMap, UNITS_PER_BITMAP_PAGE};
use format::*;

pub use format::SourceIdentity;

/// Log entry flag: this entry ends a transaction.
const ENTRY_COMMIT: u32 = 1;
/// Largest number of pages carried by one log entry.
const MAX_ENTRY_PAGES: usize = 1024;
/// A map chunk with at least this many dirty pages is rewritten whole into
/// fresh units (shadow paging) instead of logging its pages one by one.
/// Tests lower it (`set_shadow_threshold`) to drive the shadow path on
/// small maps.
static SHADOW_CHUNK_PAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(96);

/// Sets the dirty-page count from which a map chunk is shadowed instead of
/// logged (default 96). For tests and benchmarks; affects every store in
/// the process.
#[cfg(feature = "test-utils")]
pub fn set_shadow_threshold(pages: usize) {
    SHADOW_CHUNK_PAGES.store(pages.max(1), std::sync::atomic::Ordering::Relaxed);
}
/// If more node pages than this would still go to the log, every chunk
/// with dirty pages is shadowed, so a transaction stays small.
const MAX_LOGGED_NODE_PAGES: usize = 1024;

/// Identifies a source disk: size, UUID, and a CRC-32C of sixteen sample
/// sectors spread evenly over it.
pub fn identify(source: &mut dyn Disk) -> Result<SourceIdentity> {
    let sectors = source.sector_count();
    let mut crc = 0u32;
    let mut buf = vec![0u8; SECTOR_SIZE];
    if sectors > 0 {
        let mut last = u64::MAX;
        for i in 0..16u64 {
            let lba = i * (sectors - 1) / 15;
            if lba == last {
                continue;
            }
            last = lba;
            source.read_sectors(lba, &mut buf)?;
            crc = crc32c::crc32c_append(crc, &lba.to_le_bytes());
            crc = crc32c::crc32c_append(crc, &buf);
        }
    }
    Ok(SourceIdentity {
        sectors,
        uuid: source.uuid(),
        fingerprint: crc,
    })
}

/// Says how `found` differs from the identity a store recorded.
pub(crate) fn compare_identity(recorded: &SourceIdentity, found: &SourceIdentity) -> Result<()> {
    let why = if recorded.sectors != found.sectors {
        format!(
            "size: the store was made on a disk of {} sectors, this one has {}",
            recorded.sectors, found.sectors
        )
    } else if recorded.uuid.is_some() && recorded.uuid != found.uuid {
        format!(
            "UUID: the store was made on disk {}, this one is {}",
            hex(&recorded.uuid.unwrap_or_default()),
            found
                .uuid
                .map(|u| hex(&u))
                .unwrap_or_else(|| "without a UUID".into())
        )
    } else if recorded.fingerprint != found.fingerprint {
        format!(
            "fingerprint: sampled sectors differ (store {:#010x}, disk {:#010x})",
            recorded.fingerprint, found.fingerprint
        )
    } else {
        return Ok(());
    };
    Err(Error::SourceMismatch(why))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_guid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

/// A sealed metadata page and its home offset.
type HomedPage = (u64, Vec<u8>);

/// A log entry found in the log region.
struct LogEntry {
    offset: u64,
    size: u64,
    flags: u32,
    pages: Vec<(u64, Vec<u8>)>,
}

/// The journal of an open persistent store: its headers, metadata chunk
/// tables, and the log's state.
#[derive(Debug)]
pub struct Journal {
    header: Header,
    /// Slot (0 or 1) the current header lives in.
    header_slot: usize,
    source: SourceIdentity,
    granularity: u64,
    map_chunks: Vec<u64>,
    bitmap_chunks: Vec<u64>,
    tables_dirty: bool,
    /// The state page last logged (to skip it when unchanged).
    last_state: Option<State>,
    /// Offset within the log for the next entry.
    head: u64,
    next_sequence: u64,
    /// Entries written since the last checkpoint: (offset, size).
    live: VecDeque<(u64, u64)>,
    /// The logged version of every page changed since the last checkpoint.
    unchecked: BTreeMap<u64, Vec<u8>>,
    /// A transaction was written since the last durable flush.
    unsynced: bool,
}

/// A store read from disk, before it is joined to its source.
pub struct OpenedStore {
    pub map: ExtentMap,
    pub units: UnitMap,
    pub granularity: u64,
    pub source: SourceIdentity,
    /// `None` when opened read-only.
    pub journal: Option<Journal>,
    /// How many log transactions were replayed.
    pub replayed_transactions: usize,
}

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

impl Journal {
    /// Initialises a new store on empty `storage` holding `map` (a fresh
    /// overlay's map): writes the identity page, the metadata and then the
    /// headers, and makes it all durable.
    pub(crate) fn create(
        storage: &mut dyn Storage,
        source: SourceIdentity,
        map: &mut ExtentMap,
        units: &mut UnitMap,
    ) -> Result<Journal> {
        if !storage.is_empty()? {
            return Err(Error::InvalidArgument("the store file is not empty".into()));
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
                log_size: DEFAULT_LOG_SIZE,
                log_tail: 0,
                log_sequence: 1,
                modification_uuid: new_guid(),
            },
            header_slot: 0,
            source,
            granularity: units.granularity(),
            map_chunks: Vec::new(),
            bitmap_chunks: Vec::new(),
            tables_dirty: true,
            last_state: None,
            head: 0,
            next_sequence: 1,
            live: VecDeque::new(),
            unchecked: BTreeMap::new(),
            unsynced: false,
        };
        map.track_dirty_pages();
        map.mark_all_dirty();
        let (pages, _) = journal.collect_pages(map, units, None)?;
        storage.set_len(data_byte(units.end() * units.granularity()))?;
        for (home, page) in pages {
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
                return Err(Error::NoSpace(
                    "the store's metadata tables are full (too many extents or units)".into(),
                ));
            }
            let chunk = units.allocate(chunk_sectors)? / g;
            if self.map_chunks.len() < need_map {
                self.map_chunks.push(chunk);
            } else {
                self.bitmap_chunks.push(chunk);
            }
            self.tables_dirty = true;
        }
    }

    /// Every metadata page that changed since the last call, sealed, with
    /// its home offset. Chunks with many dirty node pages are first moved to
    /// fresh units and written there whole (`shadow`): then only the chunk
    /// table, not their pages, goes into the returned set. Returns the pages
    /// and whether any chunk was shadowed.
    fn collect_pages(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: Option<&mut dyn Storage>,
    ) -> Result<(Vec<HomedPage>, bool)> {
        self.ensure_chunks(map, units)?;
        let node_pages = map.node_pages();
        let dirty: Vec<u64> = map
            .take_dirty_pages()
            .into_iter()
            .filter(|&p| p < node_pages)
            .collect();
        let mut shadow = std::collections::BTreeSet::new();
        if let Some(storage) = storage {
            let mut per_chunk: BTreeMap<u64, usize> = BTreeMap::new();
            for p in &dirty {
                *per_chunk.entry(p / CHUNK_PAGES).or_default() += 1;
            }
            let threshold = SHADOW_CHUNK_PAGES.load(std::sync::atomic::Ordering::Relaxed);
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
            if logged > MAX_LOGGED_NODE_PAGES {
                shadow.extend(per_chunk.keys().copied());
            }
            let g = self.granularity;
            let chunk_sectors = chunk_units(g) * g;
            for &c in &shadow {
                let fresh = units.allocate(chunk_sectors)? / g;
                let old = std::mem::replace(&mut self.map_chunks[c as usize], fresh);
                // Reusable only once the switch is durable and checkpointed.
                units.release(old * g, chunk_sectors);
                self.tables_dirty = true;
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
        for page in dirty {
            if !shadow.contains(&(page / CHUNK_PAGES)) {
                let home = self.node_page_home(page);
                pages.push((home, seal(TYPE_NODES, home, &map.page_payload(page))));
            }
        }
        let bitmap_pages = units.bitmap_pages();
        for page in units.take_dirty_pages() {
            if page < bitmap_pages {
                let home = self.bitmap_page_home(page);
                pages.push((home, seal(TYPE_BITMAP, home, &units.bitmap_page(page))));
            }
        }
        if self.tables_dirty {
            for (table, range) in [
                (&self.map_chunks, MAP_TABLE_PAGES),
                (&self.bitmap_chunks, BITMAP_TABLE_PAGES),
            ] {
                for (i, page) in range.enumerate() {
                    let mut payload = vec![0u8; PAYLOAD];
                    let first = i * TABLE_ENTRIES_PER_PAGE as usize;
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
            }
            self.tables_dirty = false;
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
    fn write_transaction(
        &mut self,
        map: &mut ExtentMap,
        units: &mut UnitMap,
        storage: &mut dyn Storage,
    ) -> Result<bool> {
        // Grow the file first: shadowed chunks may be written past its end,
        // and a reader bounds the unit count by the file's length.
        let (pages, shadowed) = {
            let before = units.end();
            let result = self.collect_pages(map, units, Some(&mut *storage))?;
            debug_assert!(units.end() >= before);
            result
        };
        if pages.is_empty() {
            return Ok(shadowed);
        }
        let span = data_byte(units.end() * self.granularity);
        if storage.len()? < span {
            storage.set_len(span)?;
        }
        // Data (and shadowed chunks) before the map that refers to them.
        storage.flush()?;
        let groups: Vec<&[(u64, Vec<u8>)]> = pages.chunks(MAX_ENTRY_PAGES).collect();
        let entries: Vec<Vec<u8>> = groups
            .iter()
            .enumerate()
            .map(|(i, group)| {
                let flags = if i + 1 == groups.len() {
                    ENTRY_COMMIT
                } else {
                    0
                };
                self.encode_entry(self.next_sequence + i as u64, flags, group)
            })
            .collect();
        let total: u64 = entries.iter().map(|e| e.len() as u64).sum();
        if total > self.header.log_size / 2 {
            return Err(Error::NoSpace(format!(
                "one transaction of {} pages exceeds half the {} byte log",
                pages.len(),
                self.header.log_size
            )));
        }
        for entry in entries {
            let size = entry.len() as u64;
            let at = match self.place(size) {
                Some(at) => at,
                None => {
                    self.checkpoint(storage)?;
                    self.place(size).ok_or_else(|| {
                        Error::Internal("no room in an empty log for an entry".into())
                    })?
                }
            };
            storage.write_at(&entry, self.header.log_offset + at)?;
            self.live.push_back((at, size));
            self.head = at + size;
            self.next_sequence += 1;
        }
        for (home, page) in pages {
            self.unchecked.insert(home, page);
        }
        units.transaction_written();
        self.unsynced = true;
        Ok(shadowed)
    }

    /// Where an entry of `size` bytes can go without overwriting a live
    /// entry; `None` when the log must be checkpointed first.
    fn place(&self, size: u64) -> Option<u64> {
        let log = self.header.log_size;
        let at = if self.head + size > log { 0 } else { self.head };
        let overlaps = self.live.iter().any(|&(o, s)| at < o + s && o < at + size);
        (!overlaps).then_some(at)
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
        let shadowed = self.write_transaction(map, units, storage)?;
        storage.flush()?;
        self.unsynced = false;
        if shadowed {
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

    /// Writes every logged page to its home, then empties the log by
    /// writing a header with a new log GUID and tail.
    pub(crate) fn checkpoint(&mut self, storage: &mut dyn Storage) -> Result<()> {
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
        header.log_tail = if self.head + PAGE as u64 > header.log_size {
            0
        } else {
            self.head
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
        Ok(())
    }
}

/// Reads the log's committed transactions, starting at the header's tail.
fn read_log(storage: &dyn Storage, header: &Header) -> (Vec<LogEntry>, u64, u64) {
    let mut at = header.log_tail;
    let mut sequence = header.log_sequence;
    let mut entries: Vec<LogEntry> = Vec::new();
    let mut committed_len = 0;
    let (mut head, mut next) = (header.log_tail, header.log_sequence);
    for _ in 0..header.log_size / PAGE as u64 {
        let entry = read_entry(storage, header, at, sequence).or_else(|| {
            // An entry that did not fit before the log's end starts at 0.
            (at != 0)
                .then(|| read_entry(storage, header, 0, sequence))
                .flatten()
        });
        let Some(entry) = entry else { break };
        at = entry.offset + entry.size;
        sequence += 1;
        let commit = entry.flags & ENTRY_COMMIT != 0;
        entries.push(entry);
        if commit {
            committed_len = entries.len();
            head = at;
            next = sequence;
        }
    }
    entries.truncate(committed_len);
    (entries, head, next)
}

fn read_entry(storage: &dyn Storage, header: &Header, at: u64, sequence: u64) -> Option<LogEntry> {
    let log = header.log_size;
    if at + PAGE as u64 > log {
        return None;
    }
    let mut first = vec![0u8; PAGE];
    storage.read_at(&mut first, header.log_offset + at).ok()?;
    let f = Fields(&first);
    if f.u32(0) != TYPE_LOG || f.u64(8) != sequence || f.bytes16(16) != header.log_guid {
        return None;
    }
    let total = u64::from(f.u32(32));
    let count = f.u32(36) as usize;
    let header_pages = (64 + 8 * count as u64).div_ceil(PAGE as u64);
    if count > MAX_ENTRY_PAGES
        || total != header_pages + count as u64
        || at + total * PAGE as u64 > log
    {
        return None;
    }
    let mut entry = vec![0u8; (total as usize) * PAGE];
    storage.read_at(&mut entry, header.log_offset + at).ok()?;
    let stored = u32::from_le_bytes(entry[4..8].try_into().ok()?);
    entry[4..8].fill(0);
    if crc32c::crc32c(&entry) != stored {
        return None;
    }
    let f = Fields(&entry);
    let flags = f.u32(40);
    let pages = (0..count)
        .map(|i| {
            let home = f.u64(64 + 8 * i);
            let page = entry[(header_pages as usize + i) * PAGE..][..PAGE].to_vec();
            (home, page)
        })
        .collect();
    Some(LogEntry {
        offset: at,
        size: total * PAGE as u64,
        flags,
        pages,
    })
}

/// Everything `open_store` and `check_store` read, before any repair.
struct Loaded {
    header: Header,
    header_slot: usize,
    state: State,
    map_chunks: Vec<u64>,
    bitmap_chunks: Vec<u64>,
    replayed: BTreeMap<u64, Vec<u8>>,
    transactions: usize,
    live: Vec<(u64, u64)>,
    head: u64,
    next_sequence: u64,
}

impl Loaded {
    /// A metadata page as of the newest committed transaction: from the
    /// replayed log if it is there, else from its home.
    fn page(&self, storage: &dyn Storage, home: u64, kind: u32, what: &str) -> Result<Vec<u8>> {
        match self.replayed.get(&home) {
            Some(page) => open_page(page, kind, home, what),
            None => {
                let mut page = vec![0u8; PAGE];
                storage.read_at(&mut page, home)?;
                open_page(&page, kind, home, what)
            }
        }
    }

    fn chunk_home(&self, chunks: &[u64], page: u64) -> u64 {
        data_byte(chunks[(page / CHUNK_PAGES) as usize] * self.state.granularity)
            + (page % CHUNK_PAGES) * PAGE as u64
    }

    fn load_map(&self, storage: &dyn Storage) -> Result<ExtentMap> {
        let map = ExtentMap::from_pages(
            self.state.node_slots,
            self.state.root,
            self.state.rng,
            &mut |p| {
                let home = self.chunk_home(&self.map_chunks, p);
                self.page(storage, home, TYPE_NODES, "extent map page")
            },
            &|p| format!("extent map page {p}"),
        )?;
        if map.len() != self.state.virtual_sectors {
            return Err(Error::Corrupt(format!(
                "extent map totals {} sectors but the state page says {}",
                map.len(),
                self.state.virtual_sectors
            )));
        }
        Ok(map)
    }

    /// Every store sector range in use: extents and metadata chunks.
    fn references(&self, map: &ExtentMap) -> Vec<(u64, u64)> {
        let g = self.state.granularity;
        let chunk = chunk_units(g) * g;
        map.to_vec()
            .into_iter()
            .filter(|(_, e)| e.kind.in_store())
            .map(|(_, e)| (e.base, e.len))
            .chain(
                self.map_chunks
                    .iter()
                    .chain(&self.bitmap_chunks)
                    .map(|u| (u * g, chunk)),
            )
            .collect()
    }
}

fn load(storage: &dyn Storage) -> Result<Loaded> {
    let mut page = vec![0u8; PAGE];
    storage.read_at(&mut page, IDENTITY_OFFSET).map_err(|_| {
        Error::Corrupt("not a cowdisk overlay store: shorter than its identity page".into())
    })?;
    let identity = open_page(&page, TYPE_IDENTITY, IDENTITY_OFFSET, "identity page")
        .map_err(|e| Error::Corrupt(format!("not a cowdisk overlay store ({e})")))?;
    if &identity[..IDENTITY_TEXT.len()] != IDENTITY_TEXT {
        return Err(Error::Corrupt(
            "not a cowdisk overlay store (identity text)".into(),
        ));
    }
    let version = Fields(&identity).u32(IDENTITY_TEXT.len());
    if version != FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "overlay store format version {version}"
        )));
    }
    let mut headers = Vec::new();
    let mut header_errors = Vec::new();
    for (slot, &offset) in HEADER_OFFSETS.iter().enumerate() {
        let mut page = vec![0u8; PAGE];
        match storage
            .read_at(&mut page, offset)
            .and_then(|_| Header::decode(&page, slot))
        {
            Ok(h) => headers.push((h, slot)),
            Err(e) => header_errors.push(e.to_string()),
        }
    }
    let (header, header_slot) = headers
        .into_iter()
        .max_by_key(|(h, _)| h.sequence)
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "both store headers are damaged: {}",
                header_errors.join("; ")
            ))
        })?;
    let (entries, head, next_sequence) = read_log(storage, &header);
    let mut replayed = BTreeMap::new();
    let mut transactions = 0;
    for entry in &entries {
        if entry.flags & ENTRY_COMMIT != 0 {
            transactions += 1;
        }
        for (home, page) in &entry.pages {
            replayed.insert(*home, page.clone());
        }
    }
    let mut loaded = Loaded {
        header,
        header_slot,
        state: State {
            granularity: 8,
            data_offset: DATA_OFFSET,
            unit_end: 0,
            root: 0,
            node_slots: 0,
            rng: 0,
            virtual_sectors: 0,
            source: SourceIdentity {
                sectors: 0,
                uuid: None,
                fingerprint: 0,
            },
            map_chunks: 0,
            bitmap_chunks: 0,
            chunk_units: 0,
        },
        map_chunks: Vec::new(),
        bitmap_chunks: Vec::new(),
        replayed,
        transactions,
        live: entries.iter().map(|e| (e.offset, e.size)).collect(),
        head,
        next_sequence,
    };
    let state_page = loaded.page(storage, META_OFFSET, TYPE_META, "store state page")?;
    loaded.state = State::decode(&state_page)?;
    let g = loaded.state.granularity;
    let chunk = chunk_units(g);
    // Everything sized by the state is bounded by the file's real length.
    let file_units = storage.len()?.saturating_sub(DATA_OFFSET) / (g * 512);
    if loaded.state.unit_end > file_units {
        return Err(Error::Corrupt(format!(
            "store state page at offset {META_OFFSET}: {} units recorded but the file holds only {file_units}",
            loaded.state.unit_end
        )));
    }
    for (range, count, is_map) in [
        (MAP_TABLE_PAGES, loaded.state.map_chunks, true),
        (BITMAP_TABLE_PAGES, loaded.state.bitmap_chunks, false),
    ] {
        let mut table = Vec::new();
        for (i, p) in range.enumerate() {
            let first = i as u64 * TABLE_ENTRIES_PER_PAGE;
            if first >= count {
                break;
            }
            let home = META_OFFSET + p * PAGE as u64;
            let payload = loaded.page(storage, home, TYPE_META, "chunk table page")?;
            for j in 0..TABLE_ENTRIES_PER_PAGE.min(count - first) {
                let unit = Fields(&payload).u64(j as usize * 8);
                if unit
                    .checked_add(chunk)
                    .is_none_or(|e| e > loaded.state.unit_end)
                {
                    return Err(Error::Corrupt(format!(
                        "chunk table page at offset {home}: chunk at unit {unit} lies outside the store's {} units",
                        loaded.state.unit_end
                    )));
                }
                table.push(unit);
            }
        }
        if is_map {
            loaded.map_chunks = table;
        } else {
            loaded.bitmap_chunks = table;
        }
    }
    let mut all_chunks: Vec<u64> = loaded
        .map_chunks
        .iter()
        .chain(&loaded.bitmap_chunks)
        .copied()
        .collect();
    all_chunks.sort_unstable();
    if all_chunks.windows(2).any(|w| w[0] + chunk > w[1]) {
        return Err(Error::Corrupt(format!(
            "chunk tables at offset {}: two metadata chunks overlap",
            META_OFFSET + PAGE as u64
        )));
    }
    if loaded.state.unit_end.div_ceil(UNITS_PER_BITMAP_PAGE)
        > loaded.bitmap_chunks.len() as u64 * CHUNK_PAGES
    {
        return Err(Error::Corrupt(format!(
            "{} bitmap chunks cannot cover {} units",
            loaded.bitmap_chunks.len(),
            loaded.state.unit_end
        )));
    }
    Ok(loaded)
}

/// Opens a persistent store: reads and checks its headers, replays the log
/// (in memory only when `read_only`; written through to the file and
/// checkpointed otherwise), loads and validates the extent map, and
/// rebuilds the allocation state from it.
pub fn open_store(storage: &mut dyn Storage, read_only: bool) -> Result<OpenedStore> {
    let loaded = load(storage)?;
    let map = loaded.load_map(storage)?;
    let g = loaded.state.granularity;
    let units = UnitMap::rebuild(
        g,
        loaded.state.unit_end,
        !read_only,
        &mut loaded.references(&map).into_iter(),
    )?;
    let mut opened = OpenedStore {
        map,
        units,
        granularity: g,
        source: loaded.state.source.clone(),
        journal: None,
        replayed_transactions: loaded.transactions,
    };
    if read_only {
        return Ok(opened);
    }
    let mut journal = Journal {
        header: loaded.header.clone(),
        header_slot: loaded.header_slot,
        source: loaded.state.source.clone(),
        granularity: g,
        map_chunks: loaded.map_chunks.clone(),
        bitmap_chunks: loaded.bitmap_chunks.clone(),
        tables_dirty: false,
        last_state: Some(loaded.state.clone()),
        head: loaded.head,
        next_sequence: loaded.next_sequence,
        live: loaded.live.iter().copied().collect(),
        unchecked: loaded.replayed,
        unsynced: true,
    };
    journal.header.modification_uuid = new_guid();
    // Replayed pages go home; the header gets a new log GUID (so entries
    // left in the log from before are never replayed again) and the new
    // modification UUID.
    journal.checkpoint(storage)?;
    opened.map.track_dirty_pages();
    opened.journal = Some(journal);
    Ok(opened)
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
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Open(format!("overlay store {shown}: {e}")))?;
    file.try_lock_shared().map_err(|_| {
        Error::Locked(format!(
            "overlay store {shown} is open for writing elsewhere"
        ))
    })?;
    let storage = crate::overlay::space::FileStorage::new(file, format!("overlay store {shown}"));
    Ok(check_store(&storage))
}
