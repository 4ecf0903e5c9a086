//! The copy-on-write overlay: a virtual drive made of extents of the source,
//! of the overlay store, and of unallocated space, edited freely without
//! ever writing the source.
//!
//! Semantics (the legacy module's, extended; see docs/ARCHITECTURE.md):
//! - `insert` adds unallocated sectors (zeros, `NotAlloc`) before an LBA;
//! - `move_sectors` cuts a range and pastes it where sector `to` was before
//!   the cut, copying no data;
//! - `write` copies on write in *units* of the granularity, aligned in
//!   virtual sectors at the moment of the write: each run of sectors of the
//!   units a write touches that is not already in the store moves there if
//!   the write touches the run, so later writes nearby land in place. Allocation is sector-exact all the same:
//!   only the written sectors and sectors that held data (`Normal`) become
//!   data; the rest of the units is reserved store space that keeps its
//!   old status (`StoreHole`: `NotAlloc`, `StoreZero`: `Blank`) and is
//!   never copied or read;
//! - `delete` removes a range (the drive shrinks), `discard` turns it into
//!   unallocated space; both free the store space it used, which later
//!   writes reuse.
//!
//! An overlay's store is either anonymous (a temporary file, the legacy
//! behaviour) or persistent (`create_persistent`/`open_persistent`): a
//! journaled store file that survives close and crashes (see `crate::store`
//! and docs/FORMAT.md). In a persistent store, data a durable map refers to
//! is never overwritten in place: a write to it goes to fresh units.

// The extent map and the store's space live in `store/` (the store
// persists them; the overlay edits them); their public paths stay here.
pub use crate::store::{extents, space};

use crate::disk::{
    check_range, is_zero, sectors_in, Disk, DriveType, SectorStatus, SECTOR_BYTES, SECTOR_SIZE,
};
use crate::error::{Error, Result};
use extents::{Extent, ExtentKind, ExtentMap};
use space::{FileStorage, Storage, UnitMap};
use std::path::Path;

use crate::store::{self, Journal, OpenedStore, SourceIdentity};

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
    units: UnitMap,
    /// Byte offset of the store's data area (unit 0).
    data_offset: u64,
    /// Bytes the store file is known to span (to trim it when space frees).
    store_file_len: u64,
    options: OverlayOptions,
    /// The journal of a persistent store (`None`: anonymous, or read-only).
    journal: Option<Journal>,
    read_only: bool,
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
    pub(crate) fn with_storage(
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
            units: UnitMap::new(options.granularity, false),
            data_offset: 0,
            store_file_len: 0,
            options,
            journal: None,
            read_only: false,
        }
    }

    /// An overlay over `source` with a new persistent store at `path` (which
    /// must not exist). The store records the source's identity; it is
    /// locked against other writers while open.
    pub fn create_persistent(
        mut source: Box<dyn Disk>,
        path: &Path,
        options: OverlayOptions,
    ) -> Result<Overlay> {
        let prepared = Overlay::prepare_persistent(path, source.as_mut(), options)?;
        Ok(prepared.attach(source))
    }

    /// The fallible half of `create_persistent`: creates and initialises the
    /// store file for `source` without taking the source.
    ///
    /// The store is created atomically (`crate::newfile`): built and synced
    /// under a temporary name in the same folder, renamed into place, then
    /// the folder synced. A crash before this returns leaves nothing at
    /// `path`; once it returns, the store survives a crash.
    pub(crate) fn prepare_persistent(
        path: &Path,
        source: &mut dyn Disk,
        options: OverlayOptions,
    ) -> Result<PreparedStore> {
        Overlay::check_source(source, &options)?;
        let identity = store::identify(source)?;
        let sectors = source.sector_count();
        let what = format!("overlay store {}", path.display());
        let (_file, prepared) = crate::newfile::create_atomically(path, &what, |file| {
            // Locked before it has its name: no one sees it unlocked.
            file.try_lock()
                .map_err(|_| Error::Locked(format!("{what}: cannot lock the new store")))?;
            let file = file
                .try_clone()
                .map_err(|e| Error::Open(format!("{what}: {e}")))?;
            PreparedStore::create(
                Box::new(FileStorage::new(file, what.clone())),
                sectors,
                identity,
                options,
            )
        })?;
        Ok(prepared)
    }

    /// `create_persistent` on any empty storage (tests put a fault-injecting
    /// layer here). `identity` is the source's (`store::identify`).
    pub fn create_on(
        store: Box<dyn Storage>,
        source: Box<dyn Disk>,
        identity: SourceIdentity,
        options: OverlayOptions,
    ) -> Result<Overlay> {
        Overlay::check_source(source.as_ref(), &options)?;
        Overlay::create_on_with_log(
            store,
            source,
            identity,
            options,
            store::format::DEFAULT_LOG_SIZE,
        )
    }

    /// `create_on` with a log of `log_size` bytes instead of the default
    /// 16 MiB (a multiple of 4096, at least 64 KiB): the format allows small
    /// logs, and the crash tests use them to reach log wraps and full logs.
    pub fn create_on_with_log(
        store: Box<dyn Storage>,
        source: Box<dyn Disk>,
        identity: SourceIdentity,
        options: OverlayOptions,
        log_size: u64,
    ) -> Result<Overlay> {
        Overlay::check_source(source.as_ref(), &options)?;
        let prepared = PreparedStore::create_with_log(
            store,
            source.sector_count(),
            identity,
            options,
            log_size,
        )?;
        Ok(prepared.attach(source))
    }

    /// Reopens the persistent store at `path` over `source`: replays its log
    /// (in memory only when `read_only`), and refuses a source that is not
    /// the disk the store was made on (`SourceMismatch`). A writer holds an
    /// exclusive lock; a reader a shared one (`Locked` when taken).
    pub fn open_persistent(path: &Path, source: Box<dyn Disk>, read_only: bool) -> Result<Overlay> {
        let (storage, opened) = Overlay::load_persistent(path, read_only)?;
        let mut source = source;
        Overlay::check_store_source(&opened, source.as_mut())?;
        Ok(Overlay::from_opened(storage, opened, source, read_only))
    }

    /// First half of `open_persistent`: opens, locks and loads the store.
    pub fn load_persistent(
        path: &Path,
        read_only: bool,
    ) -> Result<(Box<dyn Storage>, OpenedStore)> {
        store::load_store_file(path, read_only)
    }

    /// Checks that `source` is the disk the loaded store was made on.
    pub fn check_store_source(opened: &OpenedStore, source: &mut dyn Disk) -> Result<()> {
        let found = store::identify(source)?;
        store::compare_identity(&opened.source, &found)
    }

    /// Second half of `open_persistent`: joins a loaded store to its
    /// (checked) source.
    pub fn from_opened(
        store: Box<dyn Storage>,
        opened: OpenedStore,
        source: Box<dyn Disk>,
        read_only: bool,
    ) -> Overlay {
        let options = OverlayOptions {
            granularity: opened.granularity,
            detect_zeros: false,
        };
        Overlay {
            source,
            map: opened.map,
            store,
            units: opened.units,
            data_offset: store::format::DATA_OFFSET,
            store_file_len: 0,
            options,
            journal: opened.journal,
            read_only,
        }
    }

    /// Sets zero detection (reads and status report all-zero data as
    /// `Blank`). A test hook: the C API and `OverlayOptions` set it at
    /// creation.
    #[cfg(feature = "test-utils")]
    pub fn set_detect_zeros(&mut self, on: bool) {
        self.options.detect_zeros = on;
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The durability point: every edit and write acknowledged before it
    /// survives a crash. A no-op for an anonymous store.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(journal) = self.journal.as_mut() {
            journal.flush(&mut self.map, &mut self.units, self.store.as_mut())?;
        }
        Ok(())
    }

    /// Flushes, checkpoints the log (so the next open has nothing to
    /// replay) and closes. Dropping an overlay does the same but cannot
    /// report errors.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(journal) = self.journal.as_mut() {
            journal.flush(&mut self.map, &mut self.units, self.store.as_mut())?;
            journal.checkpoint(self.store.as_mut())?;
        }
        self.journal = None;
        Ok(())
    }

    /// The persistent store's UUID and the current modification UUID.
    pub fn store_uuids(&self) -> Option<([u8; 16], [u8; 16])> {
        self.journal
            .as_ref()
            .map(|j| (j.store_uuid(), j.modification_uuid()))
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(
                "the overlay store was opened read-only".into(),
            ));
        }
        Ok(())
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

    /// Store units in use (data and, for a persistent store, metadata).
    pub fn store_units_used(&self) -> u64 {
        self.units.units_in_use()
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
        self.check_writable()?;
        self.map.insert(lba, &[Extent::none(count)])?;
        Ok(())
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
        self.check_writable()?;
        let cut = self.map.remove(from, count)?;
        let destination = if to < from { to } else { to - count };
        self.map.insert(destination, &cut)?;
        Ok(())
    }

    /// Removes `[lba, lba + count)`; the drive shrinks by `count` and the
    /// store space the range used is freed.
    pub fn delete(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let removed = self.map.remove(lba, count)?;
        self.release(&removed)?;
        Ok(())
    }

    /// Makes `[lba, lba + count)` unallocated (zeros, `NotAlloc`) and frees
    /// the store space it used.
    pub fn discard(&mut self, lba: u64, count: u64) -> Result<()> {
        check_range(lba, count, self.map.len())?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let replaced = self.map.replace(lba, count, Extent::none(count))?;
        self.release(&replaced)?;
        Ok(())
    }

    fn release(&mut self, extents: &[Extent]) -> Result<()> {
        for e in extents.iter().filter(|e| e.kind.in_store()) {
            self.units.release(e.base, e.len);
        }
        if self.journal.is_none() {
            // The anonymous store shrinks when its tail frees.
            let needed =
                self.data_offset + self.units.end() * self.units.granularity() * SECTOR_BYTES;
            if needed < self.store_file_len {
                self.store.set_len(needed)?;
                self.store_file_len = needed;
            }
        }
        Ok(())
    }

    fn store_byte(&self, sector: u64) -> u64 {
        self.data_offset + sector * SECTOR_BYTES
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
        self.check_writable()?;
        let g = self.options.granularity;
        let end = lba + count;
        let unit_start = lba / g * g;
        let unit_end = end.div_ceil(g).saturating_mul(g).min(size);
        let pieces = self.map.range(unit_start, unit_end);
        let mut i = 0;
        while i < pieces.len() {
            let (start, extent) = pieces[i];
            if self.in_place(&extent) {
                let from = start.max(lba);
                let to = (start + extent.len).min(end);
                if from < to {
                    let bytes = &data[byte_index(from - lba)..byte_index(to - lba)];
                    let store_sector = extent.base + (from - start);
                    self.store.write_at(bytes, self.store_byte(store_sector))?;
                    if extent.kind != ExtentKind::Store {
                        // Reserved space now holds data: exactly the
                        // written sectors become `Store`, on the same store
                        // sectors, so the unit references do not change.
                        self.map.replace(
                            from,
                            to - from,
                            Extent {
                                len: to - from,
                                kind: ExtentKind::Store,
                                base: store_sector,
                            },
                        )?;
                    }
                }
                i += 1;
                continue;
            }
            // A maximal run of pieces that cannot be written in place moves
            // to fresh store units, if the write touches it. One it does not
            // touch (beside store space in the same unit) stays where it is:
            // with exact status, moving it would only copy data and take a
            // unit that no write needs yet.
            let mut run_end = start + extent.len;
            let mut j = i + 1;
            while j < pieces.len() && !self.in_place(&pieces[j].1) {
                run_end = pieces[j].0 + pieces[j].1.len;
                j += 1;
            }
            if start < end && lba < run_end {
                self.copy_run_to_store(start, run_end, lba, data)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Store space that can take a write in place: in the store (data or
    /// reserved), and not referred to by a durable map (always true for an
    /// anonymous store).
    fn in_place(&self, extent: &Extent) -> bool {
        extent.kind.in_store() && self.units.writable_in_place(extent.base, extent.len)
    }

    /// Moves the virtual run `[run_start, run_end)` into fresh store units:
    /// the part inside the write `[lba, lba + data)` is written from `data`
    /// and becomes `Store`; of the rest, only sectors that held data are
    /// copied (and stay data), while unallocated and blank sectors keep
    /// their status as reserved store space (`StoreHole`, `StoreZero`).
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
        let base = self.units.allocate(len)?;
        let filled = (|| {
            let mut extents = Vec::new();
            self.move_old_to_store(run_start, data_from, base, &mut extents)?;
            if data_from < data_to {
                let bytes = &data[byte_index(data_from - lba)..byte_index(data_to - lba)];
                let store_sector = base + (data_from - run_start);
                self.store.write_at(bytes, self.store_byte(store_sector))?;
                push_joined(
                    &mut extents,
                    Extent {
                        len: data_to - data_from,
                        kind: ExtentKind::Store,
                        base: store_sector,
                    },
                );
            }
            self.move_old_to_store(data_to, run_end, base + (data_to - run_start), &mut extents)?;
            Ok(extents)
        })();
        let extents = match filled {
            Ok(extents) => extents,
            Err(e) => {
                self.units.release(base, len);
                return Err(e);
            }
        };
        self.store_file_len = self.store_file_len.max(self.store_byte(base + len));
        let replaced = self.map.splice(run_start, len, &extents)?;
        self.release(&replaced)
    }

    /// Maps what the virtual sectors `[from, to)` show now onto store
    /// sectors from `store_sector`, appending the extents to `extents`:
    /// runs of data are copied and become `Store`; unallocated and blank
    /// runs become `StoreHole` and `StoreZero` without touching the store.
    fn move_old_to_store(
        &mut self,
        from: u64,
        to: u64,
        store_sector: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<()> {
        let mut pos = from;
        while pos < to {
            let (status, n) = self.status_run_unfiltered(pos, to - pos)?;
            let at = store_sector + (pos - from);
            let kind = match status {
                SectorStatus::Normal => {
                    self.copy_old_to_store(pos, pos + n, at)?;
                    ExtentKind::Store
                }
                SectorStatus::Blank => ExtentKind::StoreZero,
                SectorStatus::NotAlloc => ExtentKind::StoreHole,
            };
            push_joined(
                extents,
                Extent {
                    len: n,
                    kind,
                    base: at,
                },
            );
            pos += n;
        }
        Ok(())
    }

    fn copy_old_to_store(&mut self, from: u64, to: u64, store_sector: u64) -> Result<()> {
        let mut buf = Vec::new();
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(n), 0);
            self.read_unfiltered(pos, &mut buf)?;
            let at = self.store_byte(store_sector + (pos - from));
            self.store.write_at(&buf, at)?;
            pos += n;
        }
        Ok(())
    }

    /// The status of sector `lba` from the extent map and the source's
    /// metadata, without zero detection, and how many of the `count`
    /// sectors from `lba` share it (`count > 0`, inside the drive). Stops
    /// at the first sector whose status differs.
    fn status_run_unfiltered(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        let end = lba + count;
        let mut first: Option<SectorStatus> = None;
        let mut pos = lba;
        while pos < end {
            let (start, extent) = self.map.find(pos).ok_or_else(|| {
                Error::Internal(format!("extent map has no extent for sector {pos}"))
            })?;
            let piece = (start + extent.len).min(end) - pos;
            let (status, n) = match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole => (SectorStatus::NotAlloc, piece),
                ExtentKind::StoreZero => (SectorStatus::Blank, piece),
                ExtentKind::Store => (SectorStatus::Normal, piece),
                ExtentKind::Source => {
                    let from = extent.base + (pos - start);
                    let (status, n) = self.source.status_run(from, piece)?;
                    if n == 0 || n > piece {
                        return Err(Error::Internal(format!(
                            "source reported a status run of {n} sectors at sector \
                             {from} when {piece} were asked"
                        )));
                    }
                    (status, n)
                }
            };
            match first {
                None => first = Some(status),
                Some(s) if s != status => break,
                Some(_) => {}
            }
            pos += n;
        }
        let status = first.ok_or_else(|| {
            Error::InvalidArgument("the status run of zero sectors was asked".into())
        })?;
        Ok((status, pos - lba))
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
                    self.store.read_at(part, self.store_byte(extent.base))?;
                    SectorStatus::Normal
                }
                // Reserved store space was never written for these sectors:
                // the store's bytes there are stale and never read.
                ExtentKind::StoreHole => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::StoreZero => {
                    part.fill(0);
                    SectorStatus::Blank
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
                ExtentKind::None | ExtentKind::StoreHole => SectorStatus::NotAlloc,
                ExtentKind::StoreZero => SectorStatus::Blank,
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

    /// Whether `[lba, lba + count)` reads as zeros, from the extent map:
    /// inserted (unallocated) extents and reserved-but-unwritten store
    /// space (holes, known zeros) are zeros by definition and are not read, source extents are asked of the source (an overlay below
    /// answers from its own map), store extents are read. Found by fuzzing
    /// the C API: a block status with zero detection over a huge inserted
    /// range, or over an overlay stacked on one, read terabytes of zeros.
    fn zeros_in(&mut self, lba: u64, count: u64) -> Result<bool> {
        let mut buf = Vec::new();
        for (start, extent) in self.map.range(lba, lba + count) {
            match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole | ExtentKind::StoreZero => continue,
                ExtentKind::Source => {
                    if !self.source.reads_as_zeros(extent.base, extent.len)? {
                        return Ok(false);
                    }
                }
                ExtentKind::Store => {
                    let end = start + extent.len;
                    let mut pos = start;
                    while pos < end {
                        let n = (end - pos).min(COPY_CHUNK_SECTORS);
                        buf.resize(byte_index(n), 0);
                        self.read_unfiltered(pos, &mut buf)?;
                        if !is_zero(&buf) {
                            return Ok(false);
                        }
                        pos += n;
                    }
                }
            }
        }
        Ok(true)
    }
}

/// A new persistent store, initialised, waiting for its source.
pub(crate) struct PreparedStore {
    store: Box<dyn Storage>,
    map: ExtentMap,
    units: UnitMap,
    journal: Journal,
    options: OverlayOptions,
}

impl PreparedStore {
    /// Initialises a store for a source of `sectors` sectors on empty
    /// `store`.
    pub(crate) fn create(
        store: Box<dyn Storage>,
        sectors: u64,
        identity: SourceIdentity,
        options: OverlayOptions,
    ) -> Result<PreparedStore> {
        PreparedStore::create_with_log(
            store,
            sectors,
            identity,
            options,
            store::format::DEFAULT_LOG_SIZE,
        )
    }

    /// `create` with a log of `log_size` bytes.
    pub(crate) fn create_with_log(
        mut store: Box<dyn Storage>,
        sectors: u64,
        identity: SourceIdentity,
        options: OverlayOptions,
        log_size: u64,
    ) -> Result<PreparedStore> {
        options.validate()?;
        let mut map = ExtentMap::with_extent(Extent {
            len: sectors,
            kind: ExtentKind::Source,
            base: 0,
        });
        let mut units = UnitMap::new(options.granularity, true);
        let journal = Journal::create(store.as_mut(), identity, &mut map, &mut units, log_size)?;
        Ok(PreparedStore {
            store,
            map,
            units,
            journal,
            options,
        })
    }

    /// The overlay over `source` (the disk the store was prepared for).
    pub(crate) fn attach(self, source: Box<dyn Disk>) -> Overlay {
        Overlay {
            source,
            map: self.map,
            store: self.store,
            units: self.units,
            data_offset: store::format::DATA_OFFSET,
            store_file_len: 0,
            options: self.options,
            journal: Some(self.journal),
            read_only: false,
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // Best effort: `close` reports errors; a drop cannot.
        let _ = self.finish();
    }
}

/// Appends `extent` to `extents`, joining it to the last one when it
/// continues it (the map joins only at the edges of a splice).
fn push_joined(extents: &mut Vec<Extent>, extent: Extent) {
    match extents.last_mut() {
        Some(last) if last.continued_by(&extent) => last.len += extent.len,
        _ => extents.push(extent),
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
        if self.options.detect_zeros && status == SectorStatus::Normal && is_zero(buf) {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
    /// Exact through the map and the source's own `status_run`, so an
    /// overlay over an overlay stays sector-exact. With zero detection, a
    /// run of data stops where its sectors change between all-zero
    /// (`Blank`) and not.
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.map.len())?;
        let (status, n) = self.status_run_unfiltered(lba, count)?;
        if !(self.options.detect_zeros && status == SectorStatus::Normal) {
            return Ok((status, n));
        }
        let mut buf = Vec::new();
        let mut first_zero = None;
        let mut pos = lba;
        'scan: while pos < lba + n {
            let chunk = (lba + n - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(chunk), 0);
            self.read_unfiltered(pos, &mut buf)?;
            for sector in buf.chunks_exact(SECTOR_SIZE) {
                let zero = sector.iter().all(|&b| b == 0);
                if *first_zero.get_or_insert(zero) != zero {
                    break 'scan;
                }
                pos += 1;
            }
        }
        let status = if first_zero == Some(true) {
            SectorStatus::Blank
        } else {
            SectorStatus::Normal
        };
        Ok((status, pos - lba))
    }

    fn reads_as_zeros(&mut self, lba: u64, count: u64) -> Result<bool> {
        check_range(lba, count, self.map.len())?;
        self.zeros_in(lba, count)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.map.len())?;
        let status = self.status_unfiltered(lba, count)?;
        if self.options.detect_zeros
            && status == SectorStatus::Normal
            && self.zeros_in(lba, count)?
        {
            return Ok(SectorStatus::Blank);
        }
        Ok(status)
    }
}
