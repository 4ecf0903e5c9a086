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

use crate::disk::{Disk, Rejected, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};
use extents::{Extent, ExtentKind, ExtentMap};
use space::{FileStorage, Storage, UnitMap};
use std::path::Path;

use crate::store::{self, Journal, OpenedStore, SourceIdentity};

mod cow;
mod disk;
mod edit;
mod read;

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
            return Err(Error::invalid_argument(format!(
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

/// Where an overlay keeps what is written to it.
pub enum StoreChoice<'a> {
    /// A temporary file, removed when the overlay is dropped (the legacy
    /// behaviour).
    Anonymous,
    /// A new persistent store file at this path, which must not exist. The
    /// store records the source's identity and is locked against other
    /// writers while open.
    Create(&'a Path),
    /// The persistent store at `path`, reopened: its log is replayed (in
    /// memory only when `read_only`) and a source that is not the disk the
    /// store was made on is refused (`SourceMismatch`). A writer holds an
    /// exclusive lock, a reader a shared one (`Locked` when taken).
    Open { path: &'a Path, read_only: bool },
    /// A new persistent store on `storage` (empty) with a log of
    /// `log_size` bytes (a multiple of 4096, at least 64 KiB); tests put a
    /// fault-injecting layer and small logs here.
    CreateOn {
        storage: Box<dyn Storage>,
        log_size: u64,
    },
    /// The persistent store on `storage`, reopened as [`StoreChoice::Open`].
    OpenOn {
        storage: Box<dyn Storage>,
        read_only: bool,
    },
}

/// Everything of an overlay but its source: what [`StoreChoice`] yields.
struct StoreParts {
    map: ExtentMap,
    store: Box<dyn Storage>,
    units: UnitMap,
    data_offset: u64,
    options: OverlayOptions,
    journal: Option<Journal>,
    read_only: bool,
}

impl Overlay {
    /// The one way to make an overlay: over `source`, with its store where
    /// `store` says. Everything that can fail happens before the source is
    /// taken; on failure it comes back in the [`Rejected`]. A new overlay
    /// starts as one extent mapping the whole source; a reopened one has
    /// the granularity its store was made with.
    pub fn build(
        mut source: Box<dyn Disk>,
        store: StoreChoice<'_>,
        options: OverlayOptions,
    ) -> std::result::Result<Overlay, Rejected> {
        match StoreParts::make(source.as_mut(), store, options) {
            Ok(parts) => Ok(Overlay {
                source,
                map: parts.map,
                store: parts.store,
                units: parts.units,
                data_offset: parts.data_offset,
                store_file_len: 0,
                options: parts.options,
                journal: parts.journal,
                read_only: parts.read_only,
            }),
            Err(error) => Err(Rejected { error, source }),
        }
    }

    /// An overlay over `source` with an anonymous store that vanishes when
    /// the overlay is dropped (the legacy behaviour).
    pub fn new(source: Box<dyn Disk>, options: OverlayOptions) -> Result<Overlay> {
        Ok(Overlay::build(source, StoreChoice::Anonymous, options)?)
    }

    /// An overlay over `source` with a new persistent store at `path`
    /// ([`StoreChoice::Create`]).
    pub fn create_persistent(
        source: Box<dyn Disk>,
        path: &Path,
        options: OverlayOptions,
    ) -> Result<Overlay> {
        Ok(Overlay::build(source, StoreChoice::Create(path), options)?)
    }

    /// Reopens the persistent store at `path` over `source`
    /// ([`StoreChoice::Open`]).
    pub fn open_persistent(path: &Path, source: Box<dyn Disk>, read_only: bool) -> Result<Overlay> {
        let store = StoreChoice::Open { path, read_only };
        Ok(Overlay::build(source, store, OverlayOptions::default())?)
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
            return Err(Error::read_only(
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
            Error::invalid_argument(format!("source of {sectors} sectors exceeds 2^64 bytes"))
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

    /// The source disk, for reading it directly (a delta clone compares the
    /// ranges the overlay copied with it). Never written through.
    pub fn source_mut(&mut self) -> &mut dyn Disk {
        self.source.as_mut()
    }

    /// Store units in use (data and, for a persistent store, metadata).
    pub fn store_units_used(&self) -> u64 {
        self.units.units_in_use()
    }
}

impl StoreParts {
    fn make(
        source: &mut dyn Disk,
        choice: StoreChoice<'_>,
        options: OverlayOptions,
    ) -> Result<StoreParts> {
        match choice {
            StoreChoice::Anonymous => {
                Overlay::check_source(source, &options)?;
                let store = Box::new(FileStorage::anonymous()?);
                Ok(StoreParts::anonymous(source.sector_count(), store, options))
            }
            StoreChoice::Create(path) => StoreParts::create_file(source, path, options),
            StoreChoice::CreateOn { storage, log_size } => {
                Overlay::check_source(source, &options)?;
                let identity = store::identify(source)?;
                StoreParts::create(storage, source.sector_count(), identity, options, log_size)
            }
            // The source is compared with the identity the store recorded
            // before anything is written to the store (opening for writing
            // checkpoints it): a store refused for its source is left
            // unchanged.
            StoreChoice::Open { path, read_only } => {
                let found = store::identify(source)?;
                let (storage, opened) =
                    store::load_store_file_checked(path, read_only, &mut |recorded| {
                        store::compare_identity(recorded, &found)
                    })?;
                Ok(StoreParts::reopened(storage, opened, options, read_only))
            }
            StoreChoice::OpenOn {
                mut storage,
                read_only,
            } => {
                let found = store::identify(source)?;
                let opened =
                    store::open_store_checked(storage.as_mut(), read_only, &mut |recorded| {
                        store::compare_identity(recorded, &found)
                    })?;
                Ok(StoreParts::reopened(storage, opened, options, read_only))
            }
        }
    }

    /// An anonymous store: one extent mapping the whole source, nothing
    /// stored yet, no journal.
    fn anonymous(sectors: u64, store: Box<dyn Storage>, options: OverlayOptions) -> StoreParts {
        StoreParts {
            map: ExtentMap::with_extent(Extent {
                len: sectors,
                kind: ExtentKind::Source,
                base: 0,
            }),
            store,
            units: UnitMap::new(options.granularity, false),
            data_offset: 0,
            options,
            journal: None,
            read_only: false,
        }
    }

    /// A new store file at `path`, created atomically (`crate::newfile`):
    /// built and synced under a temporary name in the same folder, renamed
    /// into place, then the folder synced. A crash before this returns
    /// leaves nothing at `path`; once it returns, the store survives a
    /// crash.
    fn create_file(
        source: &mut dyn Disk,
        path: &Path,
        options: OverlayOptions,
    ) -> Result<StoreParts> {
        Overlay::check_source(source, &options)?;
        let identity = store::identify(source)?;
        let sectors = source.sector_count();
        let what = format!("overlay store {}", path.display());
        let (_file, parts) = crate::newfile::create_atomically(path, &what, |file| {
            // Locked before it has its name: no one sees it unlocked.
            file.try_lock()
                .map_err(|_| Error::locked(format!("{what}: cannot lock the new store")))?;
            let file = file
                .try_clone()
                .map_err(|e| Error::open(format!("{what}: {e}")))?;
            StoreParts::create(
                Box::new(FileStorage::new(file, what.clone())),
                sectors,
                identity,
                options,
                store::format::DEFAULT_LOG_SIZE,
            )
        })?;
        Ok(parts)
    }

    /// Initialises a persistent store for a source of `sectors` sectors on
    /// empty `store` (its callers have checked source and options with
    /// `Overlay::check_source`).
    fn create(
        mut store: Box<dyn Storage>,
        sectors: u64,
        identity: SourceIdentity,
        options: OverlayOptions,
        log_size: u64,
    ) -> Result<StoreParts> {
        let mut map = ExtentMap::with_extent(Extent {
            len: sectors,
            kind: ExtentKind::Source,
            base: 0,
        });
        let mut units = UnitMap::new(options.granularity, true);
        let journal = Journal::create(store.as_mut(), identity, &mut map, &mut units, log_size)?;
        Ok(StoreParts {
            map,
            store,
            units,
            data_offset: store::format::DATA_OFFSET,
            options,
            journal: Some(journal),
            read_only: false,
        })
    }

    /// A loaded store whose source was checked.
    fn reopened(
        store: Box<dyn Storage>,
        opened: OpenedStore,
        options: OverlayOptions,
        read_only: bool,
    ) -> StoreParts {
        StoreParts {
            map: opened.map,
            store,
            units: opened.units,
            data_offset: store::format::DATA_OFFSET,
            options: OverlayOptions {
                granularity: opened.granularity,
                ..options
            },
            journal: opened.journal,
            read_only,
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
