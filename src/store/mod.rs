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

mod extent_index;
pub mod extents;
mod file;
pub(crate) mod format;
pub mod space;

mod check;
mod identity;
mod journal;
mod load;

pub use check::{check_store, check_store_file, CheckReport};
pub use file::{load_store_file, load_store_file_checked};
pub(crate) use identity::compare_identity;
pub use identity::identify;
pub use journal::Journal;
#[cfg(feature = "test-utils")]
pub use journal::{journal_counters, set_log_limits, set_shadow_threshold, JournalCounters};
pub use load::{open_store, open_store_checked, OpenedStore};

pub use format::SourceIdentity;
