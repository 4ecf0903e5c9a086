//! A store file on disk: opening it under its advisory lock, and naming it
//! in errors.

use std::path::Path;

use super::space::{FileStorage, Storage};
use super::{open_store_checked, OpenedStore, SourceIdentity};
use crate::error::{Error, ErrorCode, Result};

/// Opens the store file at `path` and takes its advisory lock: shared for
/// a reader (`read_only`), exclusive for a writer. A conflicting holder is
/// `Error::locked`.
pub(crate) fn open_locked(path: &Path, read_only: bool) -> Result<FileStorage> {
    let shown = path.display();
    let file = if read_only {
        std::fs::File::open(path)
    } else {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
    }
    .map_err(|e| Error::open(format!("overlay store {shown}: {e}")))?;
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    locked.map_err(|_| {
        Error::locked(format!(
            "overlay store {shown} is open for writing elsewhere{}",
            if read_only { "" } else { " (or being read)" }
        ))
    })?;
    Ok(FileStorage::new(file, format!("overlay store {shown}")))
}

/// Opens, locks and loads (replaying its log) the store file at `path`.
pub fn load_store_file(path: &Path, read_only: bool) -> Result<(Box<dyn Storage>, OpenedStore)> {
    load_store_file_checked(path, read_only, &mut |_| Ok(()))
}

/// `load_store_file`, asking `check` about the recorded source identity
/// before anything is written (see `open_store_checked`).
pub fn load_store_file_checked(
    path: &Path,
    read_only: bool,
    check: &mut dyn FnMut(&SourceIdentity) -> Result<()>,
) -> Result<(Box<dyn Storage>, OpenedStore)> {
    let mut storage: Box<dyn Storage> = Box::new(open_locked(path, read_only)?);
    let opened =
        open_store_checked(storage.as_mut(), read_only, check).map_err(|e| naming(e, path))?;
    Ok((storage, opened))
}

/// Names the store file in an error that does not already.
fn naming(error: Error, path: &Path) -> Error {
    let shown = path.display().to_string();
    if error.to_string().contains(&shown) {
        return error;
    }
    match error.kind() {
        ErrorCode::Corrupt | ErrorCode::Unsupported => error.with_path(path),
        _ => error,
    }
}
