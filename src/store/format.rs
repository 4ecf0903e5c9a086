//! The store file's fixed layout and page encoding (docs/FORMAT.md).

use crate::error::{Error, Result};

/// Size of every metadata page and of log entry blocks.
pub const PAGE: usize = 4096;
/// Bytes of the page header (type, CRC, home offset).
pub const PAGE_HEADER: usize = 16;
/// Payload bytes of a page.
pub const PAYLOAD: usize = PAGE - PAGE_HEADER;

/// File offsets of the fixed structures.
pub const IDENTITY_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [4096, 8192];
pub const META_OFFSET: u64 = 65536;
/// Meta pages (16): 0 = state, 1..=11 map chunk table, 12..=15 bitmap chunk
/// table.
pub const MAP_TABLE_PAGES: std::ops::RangeInclusive<u64> = 1..=11;
pub const BITMAP_TABLE_PAGES: std::ops::RangeInclusive<u64> = 12..=15;
/// Chunk table entries per page (u64 unit numbers).
pub const TABLE_ENTRIES_PER_PAGE: u64 = (PAYLOAD / 8) as u64;
pub const LOG_OFFSET: u64 = 1 << 20;
pub const DEFAULT_LOG_SIZE: u64 = 16 << 20;
/// The smallest log a store may have (docs/FORMAT.md).
pub const MIN_LOG_SIZE: u64 = 64 << 10;
/// The data area (units) starts here.
pub const DATA_OFFSET: u64 = LOG_OFFSET + DEFAULT_LOG_SIZE;
/// Pages per metadata chunk (node or bitmap pages): 1 MiB.
pub const CHUNK_PAGES: u64 = 256;

/// Page type tags (little-endian u32 of four ASCII bytes).
pub const TYPE_IDENTITY: u32 = u32::from_le_bytes(*b"CDID");
pub const TYPE_HEADER: u32 = u32::from_le_bytes(*b"CDHD");
pub const TYPE_META: u32 = u32::from_le_bytes(*b"CDMT");
pub const TYPE_NODES: u32 = u32::from_le_bytes(*b"CDND");
pub const TYPE_BITMAP: u32 = u32::from_le_bytes(*b"CDBM");
pub const TYPE_LOG: u32 = u32::from_le_bytes(*b"CDLG");

/// The identity page's text, then the format version.
pub const IDENTITY_TEXT: &[u8; 24] = b"cowdisk overlay store\n\0\0";
pub const FORMAT_VERSION: u32 = 1;

/// Wraps a payload in a page: type, CRC-32C (of the whole page with the CRC
/// field zero), and the page's home offset (so a page read from the wrong
/// place is caught).
pub fn seal(kind: u32, home: u64, payload: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    page[0..4].copy_from_slice(&kind.to_le_bytes());
    page[8..16].copy_from_slice(&home.to_le_bytes());
    page[PAGE_HEADER..PAGE_HEADER + payload.len().min(PAYLOAD)]
        .copy_from_slice(&payload[..payload.len().min(PAYLOAD)]);
    let crc = crc32c::crc32c(&page);
    page[4..8].copy_from_slice(&crc.to_le_bytes());
    page
}

/// Checks a page read from `home` and returns its payload; `what` names the
/// structure in errors.
pub fn open_page(page: &[u8], kind: u32, home: u64, what: &str) -> Result<Vec<u8>> {
    if page.len() != PAGE {
        return Err(Error::corrupt(format!(
            "{what} at offset {home}: short page"
        )));
    }
    let found = u32::from_le_bytes(page[0..4].try_into().unwrap_or_default());
    if found != kind {
        return Err(Error::corrupt(format!(
            "{what} at offset {home}: wrong page type {found:#x} (expected {kind:#x})"
        )));
    }
    let stored = u32::from_le_bytes(page[4..8].try_into().unwrap_or_default());
    let mut copy = page.to_vec();
    copy[4..8].fill(0);
    if crc32c::crc32c(&copy) != stored {
        return Err(Error::corrupt(format!(
            "{what} at offset {home}: CRC-32C mismatch"
        )));
    }
    let at = u64::from_le_bytes(page[8..16].try_into().unwrap_or_default());
    if at != home {
        return Err(Error::corrupt(format!(
            "{what} at offset {home}: the page belongs at offset {at}"
        )));
    }
    Ok(page[PAGE_HEADER..].to_vec())
}

/// Little-endian field access on a payload.
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap_or_default())
    }
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap_or_default())
    }
    pub fn bytes16(&self, at: usize) -> [u8; 16] {
        self.0[at..at + 16].try_into().unwrap_or_default()
    }
}

/// Writes little-endian fields into a payload.
pub struct FieldsMut<'a>(pub &'a mut [u8]);

impl FieldsMut<'_> {
    pub fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, at: usize, v: &[u8]) {
        self.0[at..at + v.len()].copy_from_slice(v);
    }
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Higher wins; each header write increments it.
    pub sequence: u64,
    pub store_uuid: [u8; 16],
    /// Tags the log entries written since the last checkpoint; changed at
    /// every checkpoint so stale entries are never replayed.
    pub log_guid: [u8; 16],
    pub log_offset: u64,
    pub log_size: u64,
    /// Offset (within the log) of the first entry not yet checkpointed.
    pub log_tail: u64,
    /// Sequence number the entry at `log_tail` must carry.
    pub log_sequence: u64,
    /// Bumped each time the store is opened for writing.
    pub modification_uuid: [u8; 16],
}

impl Header {
    pub fn encode(&self, slot: usize) -> Vec<u8> {
        let mut payload = vec![0u8; PAYLOAD];
        let mut f = FieldsMut(&mut payload);
        f.u64(0, self.sequence);
        f.bytes(8, &self.store_uuid);
        f.bytes(24, &self.log_guid);
        f.u64(40, self.log_offset);
        f.u64(48, self.log_size);
        f.u64(56, self.log_tail);
        f.u64(64, self.log_sequence);
        f.bytes(72, &self.modification_uuid);
        seal(TYPE_HEADER, HEADER_OFFSETS[slot], &payload)
    }

    pub fn decode(page: &[u8], slot: usize) -> Result<Header> {
        let payload = open_page(page, TYPE_HEADER, HEADER_OFFSETS[slot], "store header")?;
        let f = Fields(&payload);
        let header = Header {
            sequence: f.u64(0),
            store_uuid: f.bytes16(8),
            log_guid: f.bytes16(24),
            log_offset: f.u64(40),
            log_size: f.u64(48),
            log_tail: f.u64(56),
            log_sequence: f.u64(64),
            modification_uuid: f.bytes16(72),
        };
        let at = HEADER_OFFSETS[slot];
        if header.log_offset != LOG_OFFSET
            || header.log_size < MIN_LOG_SIZE
            || header.log_size > DATA_OFFSET - LOG_OFFSET
            || !header.log_size.is_multiple_of(PAGE as u64)
            || header.log_tail >= header.log_size
            || !header.log_tail.is_multiple_of(PAGE as u64)
        {
            return Err(Error::corrupt(format!(
                "store header at offset {at}: log region {}+{} (tail {}) is out of bounds",
                header.log_offset, header.log_size, header.log_tail
            )));
        }
        Ok(header)
    }
}

/// Meta page 0: the store's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub granularity: u64,
    pub data_offset: u64,
    /// Units the data area spans.
    pub unit_end: u64,
    pub root: u32,
    pub node_slots: u32,
    pub rng: u64,
    pub virtual_sectors: u64,
    pub source: SourceIdentity,
    pub map_chunks: u64,
    pub bitmap_chunks: u64,
    /// Units per metadata chunk.
    pub chunk_units: u64,
}

/// What identifies the source disk a store belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    pub sectors: u64,
    pub uuid: Option<[u8; 16]>,
    /// CRC-32C of sixteen sample sectors spread over the disk.
    pub fingerprint: u32,
}

impl State {
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = vec![0u8; PAYLOAD];
        let mut f = FieldsMut(&mut payload);
        f.u64(0, self.granularity);
        f.u64(8, self.data_offset);
        f.u64(16, self.unit_end);
        f.u32(24, self.root);
        f.u32(28, self.node_slots);
        f.u64(32, self.rng);
        f.u64(40, self.virtual_sectors);
        f.u64(48, self.source.sectors);
        f.u32(56, u32::from(self.source.uuid.is_some()));
        f.bytes(60, &self.source.uuid.unwrap_or_default());
        f.u32(76, self.source.fingerprint);
        f.u64(80, self.map_chunks);
        f.u64(88, self.bitmap_chunks);
        f.u64(96, self.chunk_units);
        seal(TYPE_META, META_OFFSET, &payload)
    }

    pub fn decode(payload: &[u8]) -> Result<State> {
        let f = Fields(payload);
        let state = State {
            granularity: f.u64(0),
            data_offset: f.u64(8),
            unit_end: f.u64(16),
            root: f.u32(24),
            node_slots: f.u32(28),
            rng: f.u64(32),
            virtual_sectors: f.u64(40),
            source: SourceIdentity {
                sectors: f.u64(48),
                uuid: (f.u32(56) != 0).then(|| f.bytes16(60)),
                fingerprint: f.u32(76),
            },
            map_chunks: f.u64(80),
            bitmap_chunks: f.u64(88),
            chunk_units: f.u64(96),
        };
        let g = state.granularity;
        let bad = |what: String| {
            Err(Error::corrupt(format!(
                "store state page at offset {META_OFFSET}: {what}"
            )))
        };
        if !g.is_power_of_two() || !(8..=65536).contains(&g) {
            return bad(format!(
                "granularity {g} sectors is not a power of two in 8..65536"
            ));
        }
        if state.data_offset != DATA_OFFSET {
            return bad(format!(
                "data area offset {} is not {DATA_OFFSET}",
                state.data_offset
            ));
        }
        if state
            .unit_end
            .checked_mul(g * 512)
            .and_then(|b| b.checked_add(DATA_OFFSET))
            .is_none()
        {
            return bad(format!("{} units overflow the file size", state.unit_end));
        }
        if state.chunk_units != chunk_units(g) {
            return bad(format!(
                "chunk size {} units (expected {})",
                state.chunk_units,
                chunk_units(g)
            ));
        }
        let map_capacity = TABLE_ENTRIES_PER_PAGE * MAP_TABLE_PAGES.count() as u64;
        let bitmap_capacity = TABLE_ENTRIES_PER_PAGE * BITMAP_TABLE_PAGES.count() as u64;
        if state.map_chunks > map_capacity || state.bitmap_chunks > bitmap_capacity {
            return bad(format!(
                "{} map chunks / {} bitmap chunks exceed the tables",
                state.map_chunks, state.bitmap_chunks
            ));
        }
        if u64::from(state.node_slots)
            > state.map_chunks * CHUNK_PAGES * super::extents::NODES_PER_PAGE
        {
            return bad(format!(
                "{} node slots exceed {} map chunks",
                state.node_slots, state.map_chunks
            ));
        }
        if state.virtual_sectors.checked_mul(512).is_none() {
            return bad(format!(
                "virtual size {} sectors overflows",
                state.virtual_sectors
            ));
        }
        Ok(state)
    }
}

/// Units per metadata chunk at granularity `g`: at least one unit, at
/// least `CHUNK_PAGES` pages.
pub fn chunk_units(g: u64) -> u64 {
    (CHUNK_PAGES * PAGE as u64).div_ceil(g * 512)
}

/// Byte offset of sector `sector` of the data area.
pub fn data_byte(sector: u64) -> u64 {
    DATA_OFFSET + sector * 512
}
