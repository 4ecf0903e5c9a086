//! The copy-on-write overlay: a virtual drive made of extents of the source,
//! of the overlay store, and of unallocated space, edited freely without
//! ever writing the source.
//!
//! Semantics (the legacy module's, extended; see docs/ARCHITECTURE.md):
//! - `insert` adds unallocated sectors (zeros, `NotAlloc`) before an LBA;
//! - `move_sectors` cuts a range and pastes it where sector `to` was before
//!   the cut, copying no data;
//! - `write` copies on write in *units* of the granularity, aligned in
//!   virtual sectors at the moment of the write: every sector of the units a
//!   write touches that is not already in the store is copied there (with
//!   what the drive showed before) and so becomes allocated data;
//! - `delete` removes a range (the drive shrinks), `discard` turns it into
//!   unallocated space; both free the store space it used, which later
//!   writes reuse.

pub mod extents;
pub mod space;

use crate::disk::{
    check_range, sectors_in, Disk, DriveType, SectorStatus, SECTOR_BYTES, SECTOR_SIZE,
};
use crate::error::{Error, Result};
use extents::{Extent, ExtentKind, ExtentMap};
use space::{FileStorage, SpaceMap, Storage};

/// The legacy module's COW granularity: 2048 sectors (1 MiB).
pub const DEFAULT_GRANULARITY: u64 = 2048;
/// Smallest accepted granularity, in sectors.
pub const MIN_GRANULARITY: u64 = 8;
/// Largest accepted granularity, in sectors (32 MiB).
pub const MAX_GRANULARITY: u64 = 65536;

/// Sectors moved per step when the overlay copies data internally, so no
/// internal buffer exceeds 1 MiB.
const COPY_CHUNK_SECTORS: u64 = 2048;

/// How an overlay behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayOptions {
    /// COW unit in sectors: a power of two from 8 to 65536.
    pub granularity: u64,
    /// Report data that reads as all zeros as `Blank` (costs a read of the
    /// data in `block_status`).
    pub detect_zeros: bool,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            granularity: DEFAULT_GRANULARITY,
            detect_zeros: false,
        }
    }
}

impl OverlayOptions {
    /// Checks the options, with a message naming the bad value.
    pub fn validate(&self) -> Result<()> {
        let g = self.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(Error::InvalidArgument(format!(
                "COW granularity {g} sectors: must be a power of two from \
                 {MIN_GRANULARITY} to {MAX_GRANULARITY}"
            )));
        }
        Ok(())
    }
}

/// A copy-on-write overlay over a source disk.
pub struct Overlay {
    source: Box<dyn Disk>,
    map: ExtentMap,
    store: Box<dyn Storage>,
    space: SpaceMap,
    /// Bytes the store file is known to span (to trim it when space frees).
    store_file_len: u64,
    options: OverlayOptions,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("sectors", &self.map.len())
            .field("extents", &self.map.extent_count())
            .field("options", &self.options)
            .finish()
    }
}

impl Overlay {
    /// An overlay over `source` with an anonymous store that vanishes when
    /// the overlay is dropped (the legacy behaviour). It starts as one
    /// extent mapping the whole source.
    pub fn new(source: Box<dyn Disk>, options: OverlayOptions) -> Result<Overlay> {
        Overlay::with_storage(source, Box::new(FileStorage::anonymous()?), options)
    }

    /// An overlay whose store lives in `store` (empty).
    pub fn with_storage(
        source: Box<dyn Disk>,
        store: Box<dyn Storage>,
        options: OverlayOptions,
    ) -> Result<Overlay> {
        Overlay::check_source(source.as_ref(), &options)?;
        Ok(Overlay::assemble(source, store, options))
    }

    /// Builds an overlay whose source and options `check_source` accepted.
    pub(crate) fn assemble(
        source: Box<dyn Disk>,
        store: Box<dyn Storage>,
        options: OverlayOptions,
    ) -> Overlay {
        let sectors = source.sector_count();
        Overlay {
            source,
            map: ExtentMap::with_extent(Extent {
                len: sectors,
                kind: ExtentKind::Source,
                base: 0,
            }),
            store,
            space: SpaceMap::new(),
            store_file_len: 0,
            options,
        }
    }

    /// Checks that an overlay with `options` can be built over `source`;
    /// `with_storage` fails exactly when this does, so a caller can check
    /// before giving the source away.
    pub fn check_source(source: &dyn Disk, options: &OverlayOptions) -> Result<()> {
        options.validate()?;
        let sectors = source.sector_count();
        sectors.checked_mul(SECTOR_BYTES).ok_or_else(|| {
            Error::InvalidArgument(format!("source of {sectors} sectors exceeds 2^64 bytes"))
        })?;
        Ok(())
    }

    /// The options the overlay was made with.
    pub fn options(&self) -> OverlayOptions {
        self.options
    }

    /// The extent map (for inspection).
    pub fn extents(&self) -> &ExtentMap {
        &self.map
    }

    /// The source disk.
    pub fn source(&self) -> &dyn Disk {
        self.source.as_ref()
    }

    /// Gives the source back, dropping the overlay and its store.
    pub fn into_source(self) -> Box<dyn Disk> {
        self.source
    }

    /// Sectors of store space in use.
    pub fn store_sectors_used(&self) -> u64 {
        self.space.end() - self.space.free_sectors()
    }

    /// Inserts `count` unallocated sectors before `lba` (`lba == size`
    /// appends). They read as zeros and report `NotAlloc`.
    pub fn insert(&mut self, lba: u64, count: u64) -> Result<()> {
        let size = self.map.len();
        if lba > size {
            return Err(Error::InvalidBlock(format!(
                "insert at sector {lba}: past the end of a drive of {size} sectors"
            )));
        }
        size.checked_add(count)
            .and_then(|s| s.checked_mul(SECTOR_BYTES))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "inserting {count} sectors would make the drive exceed 2^64 bytes"
                ))
            })?;
        if count == 0 {
            return Ok(());
        }
        self.map.insert(lba, &[Extent::none(count)])
    }

    /// Cuts `[from, from + count)` and pastes it so that it starts at what
    /// was sector `to` before the cut (`to == size` moves it to the end).
    /// Fails with `InvalidMove` when `from <= to <= from + count`.
    pub fn move_sectors(&mut self, from: u64, to: u64, count: u64) -> Result<()> {
        let size = self.map.len();
        check_range(from, count, size)?;
        if to > size {
            return Err(Error::InvalidBlock(format!(
                "move to sector {to}: past the end of a drive of {size} sectors"
            )));
        }
        if from <= to && to <= from + count {
            return Err(Error::InvalidMove(format!(
                "destination {to} lies within the moved range {from}..={}",
                from + count
            )));
        }
        if count == 0 {
            return Ok(());
        }
        let cut = self.map.remove(from, count)?;
        let destination = if to < from { to } else { to - count };
        self.map.insert(destination, &cut)
    }

    /// Removes `[lba, lba + count)`; the drive shrinks by `count` and the
    /// store space the range used is freed.
    pub fn delete(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        let removed = self.map.remove(lba, count)?;
        self.release(&removed)
    }

    /// Makes `[lba, lba + count)` unallocated (zeros, `NotAlloc`) and frees
    /// the store space it used.
    pub fn discard(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        let replaced = self.map.replace(lba, count, Extent::none(count))?;
        self.release(&replaced)
    }

    fn release(&mut self, extents: &[Extent]) -> Result<()> {
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Store) {
            self.space.free(e.base, e.len);
        }
        let needed = self.space.end() * SECTOR_BYTES;
        if needed < self.store_file_len {
            self.store.set_len(needed)?;
            self.store_file_len = needed;
        }
        Ok(())
    }

    /// Writes whole sectors at `lba`, copying on write (see the module doc).
    /// The source is never written.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        let count = sectors_in(data.len())?;
        let size = self.map.len();
        check_range(lba, count, size)?;
        if count == 0 {
            return Ok(());
        }
        let g = self.options.granularity;
        let end = lba + count;
        let unit_start = lba / g * g;
        let unit_end = end.div_ceil(g).saturating_mul(g).min(size);
        let pieces = self.map.range(unit_start, unit_end);
        let mut i = 0;
        while i < pieces.len() {
            let (start, extent) = pieces[i];
            if extent.kind == ExtentKind::Store {
                let from = start.max(lba);
                let to = (start + extent.len).min(end);
                if from < to {
                    let bytes = &data[byte_index(from - lba)..byte_index(to - lba)];
                    self.store
                        .write_at(bytes, (extent.base + (from - start)) * SECTOR_BYTES)?;
                }
                i += 1;
                continue;
            }
            // A maximal run of pieces not yet in the store moves there.
            let mut run_end = start + extent.len;
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].1.kind != ExtentKind::Store {
                run_end = pieces[j].0 + pieces[j].1.len;
                j += 1;
            }
            self.copy_run_to_store(start, run_end, lba, data)?;
            i = j;
        }
        Ok(())
    }

    /// Moves the virtual run `[run_start, run_end)` into fresh store space:
    /// the part inside the write `[lba, lba + data)` from `data`, the rest
    /// from what the drive showed before. Then maps the run to the store.
    fn copy_run_to_store(
        &mut self,
        run_start: u64,
        run_end: u64,
        lba: u64,
        data: &[u8],
    ) -> Result<()> {
        let len = run_end - run_start;
        let write_end = lba + (data.len() / SECTOR_SIZE) as u64;
        let data_from = lba.clamp(run_start, run_end);
        let data_to = write_end.clamp(data_from, run_end);
        let base = self.space.allocate(len)?;
        let filled = (|| {
            self.copy_old_to_store(run_start, data_from, base)?;
            if data_from < data_to {
                let bytes = &data[byte_index(data_from - lba)..byte_index(data_to - lba)];
                self.store
                    .write_at(bytes, (base + (data_from - run_start)) * SECTOR_BYTES)?;
            }
            self.copy_old_to_store(data_to, run_end, base + (data_to - run_start))
        })();
        if let Err(e) = filled {
            self.space.free(base, len);
            return Err(e);
        }
        self.store_file_len = self.store_file_len.max((base + len) * SECTOR_BYTES);
        self.map.replace(
            run_start,
            len,
            Extent {
                len,
                kind: ExtentKind::Store,
                base,
            },
        )?;
        Ok(())
    }

    fn copy_old_to_store(&mut self, from: u64, to: u64, store_sector: u64) -> Result<()> {
        let mut buf = Vec::new();
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(n), 0);
            self.read_unfiltered(pos, &mut buf)?;
            self.store
                .write_at(&buf, (store_sector + (pos - from)) * SECTOR_BYTES)?;
            pos += n;
        }
        Ok(())
    }

    /// Reads through the extent map without zero detection.
    fn read_unfiltered(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.map.len())?;
        let mut status = SectorStatus::NotAlloc;
        for (start, extent) in self.map.range(lba, lba + count) {
            let part = &mut buf[byte_index(start - lba)..byte_index(start - lba + extent.len)];
            let part_status = match extent.kind {
                ExtentKind::None => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::Source => self.source.read_sectors(extent.base, part)?,
                ExtentKind::Store => {
                    self.store.read_at(part, extent.base * SECTOR_BYTES)?;
                    SectorStatus::Normal
                }
            };
            status = status.combine(part_status);
        }
        Ok(status)
    }

    /// Block status from the extent map and the source's metadata.
    fn status_unfiltered(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        let mut status = SectorStatus::NotAlloc;
        for (_, extent) in self.map.range(lba, lba + count) {
            let part_status = match extent.kind {
                ExtentKind::None => SectorStatus::NotAlloc,
                ExtentKind::Source => self.source.block_status(extent.base, extent.len)?,
                ExtentKind::Store => SectorStatus::Normal,
            };
            status = status.combine(part_status);
            if status == SectorStatus::Normal {
                break;
            }
        }
        Ok(status)
    }

    /// True when every sector of the range reads as zeros.
    fn reads_as_zeros(&mut self, lba: u64, count: u64) -> Result<bool> {
        let mut buf = Vec::new();
        let mut pos = lba;
        while pos < lba + count {
            let n = (lba + count - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(n), 0);
            self.read_unfiltered(pos, &mut buf)?;
            if buf.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }
}

fn byte_index(sectors: u64) -> usize {
    sectors as usize * SECTOR_SIZE
}

impl Disk for Overlay {
    fn drive_type(&self) -> DriveType {
        DriveType::Cow
    }
    fn sector_count(&self) -> u64 {
        self.map.len()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.source.uuid()
    }
    fn is_snapshot(&self) -> bool {
        self.source.is_snapshot()
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let status = self.read_unfiltered(lba, buf)?;
        if self.options.detect_zeros
            && status == SectorStatus::Normal
            && buf.iter().all(|&b| b == 0)
        {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.map.len())?;
        let status = self.status_unfiltered(lba, count)?;
        if self.options.detect_zeros
            && status == SectorStatus::Normal
            && self.reads_as_zeros(lba, count)?
        {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
}
