//! Opening a store: reading the headers, finding and replaying the log's
//! committed transactions, loading the map and the bitmap.

use std::collections::{BTreeMap, BTreeSet};

use super::extents::ExtentMap;
use super::format::*;
use super::journal::*;
use super::space::{Storage, UnitMap, UNITS_PER_BITMAP_PAGE};
use crate::error::{Error, Result};

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

/// Reads the log's committed transactions, starting at the header's tail.
pub(super) fn read_log(storage: &dyn Storage, header: &Header) -> (Vec<LogEntry>, u64, u64) {
    let mut at = header.log_tail;
    let mut sequence = header.log_sequence;
    let mut entries: Vec<LogEntry> = Vec::new();
    let mut committed_len = 0;
    let (mut head, mut next) = (header.log_tail, header.log_sequence);
    for _ in 0..header.log_size / PAGE as u64 {
        let entry = read_entry(storage, header, at, sequence).or_else(|| {
            // An entry that did not fit before the log's end starts at 0.
            let wrapped = (at != 0)
                .then(|| read_entry(storage, header, 0, sequence))
                .flatten();
            if wrapped.is_some() {
                count(C_REPLAYED_WRAPPED);
            }
            wrapped
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

pub(super) fn read_entry(
    storage: &dyn Storage,
    header: &Header,
    at: u64,
    sequence: u64,
) -> Option<LogEntry> {
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
pub(super) struct Loaded {
    pub(super) header: Header,
    pub(super) header_slot: usize,
    pub(super) state: State,
    pub(super) map_chunks: Vec<u64>,
    pub(super) bitmap_chunks: Vec<u64>,
    pub(super) replayed: BTreeMap<u64, Vec<u8>>,
    pub(super) transactions: usize,
    pub(super) live: Vec<(u64, u64)>,
    pub(super) head: u64,
    pub(super) next_sequence: u64,
}

impl Loaded {
    /// A metadata page as of the newest committed transaction: from the
    /// replayed log if it is there, else from its home.
    pub(super) fn page(
        &self,
        storage: &dyn Storage,
        home: u64,
        kind: u32,
        what: &str,
    ) -> Result<Vec<u8>> {
        match self.replayed.get(&home) {
            Some(page) => open_page(page, kind, home, what),
            None => {
                let mut page = vec![0u8; PAGE];
                storage.read_at(&mut page, home)?;
                open_page(&page, kind, home, what)
            }
        }
    }

    pub(super) fn chunk_home(&self, chunks: &[u64], page: u64) -> u64 {
        data_byte(chunks[(page / CHUNK_PAGES) as usize] * self.state.granularity)
            + (page % CHUNK_PAGES) * PAGE as u64
    }

    pub(super) fn load_map(&self, storage: &dyn Storage) -> Result<ExtentMap> {
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
            return Err(Error::corrupt(format!(
                "extent map totals {} sectors but the state page says {}",
                map.len(),
                self.state.virtual_sectors
            )));
        }
        Ok(map)
    }

    /// Every store sector range in use: extents and metadata chunks.
    pub(super) fn references(&self, map: &ExtentMap) -> Vec<(u64, u64)> {
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

pub(super) fn load(storage: &dyn Storage) -> Result<Loaded> {
    let mut page = vec![0u8; PAGE];
    storage.read_at(&mut page, IDENTITY_OFFSET).map_err(|_| {
        Error::corrupt("not a cowdisk overlay store: shorter than its identity page".into())
    })?;
    let identity = open_page(&page, TYPE_IDENTITY, IDENTITY_OFFSET, "identity page")
        .map_err(|e| Error::corrupt(format!("not a cowdisk overlay store ({e})")))?;
    if &identity[..IDENTITY_TEXT.len()] != IDENTITY_TEXT {
        return Err(Error::corrupt(
            "not a cowdisk overlay store (identity text)".into(),
        ));
    }
    let version = Fields(&identity).u32(IDENTITY_TEXT.len());
    if version != FORMAT_VERSION {
        return Err(Error::unsupported(format!(
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
            Error::corrupt(format!(
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
        return Err(Error::corrupt(format!(
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
                    return Err(Error::corrupt(format!(
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
        return Err(Error::corrupt(format!(
            "chunk tables at offset {}: two metadata chunks overlap",
            META_OFFSET + PAGE as u64
        )));
    }
    if loaded.state.unit_end.div_ceil(UNITS_PER_BITMAP_PAGE)
        > loaded.bitmap_chunks.len() as u64 * CHUNK_PAGES
    {
        return Err(Error::corrupt(format!(
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
    open_store_checked(storage, read_only, &mut |_| Ok(()))
}

/// `open_store`, asking `check` about the source identity the store
/// recorded before anything is written to the store: a store refused by
/// `check` (over the wrong source) is left exactly as it was.
pub fn open_store_checked(
    storage: &mut dyn Storage,
    read_only: bool,
    check: &mut dyn FnMut(&SourceIdentity) -> Result<()>,
) -> Result<OpenedStore> {
    let loaded = load(storage)?;
    check(&loaded.state.source)?;
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
        dirty_tables: BTreeSet::new(),
        last_state: Some(loaded.state.clone()),
        head: loaded.head,
        next_sequence: loaded.next_sequence,
        live: loaded.live.iter().copied().collect(),
        unchecked: loaded.replayed,
        unsynced: true,
        must_checkpoint: false,
        shadowed_since_checkpoint: false,
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
