//! Creating files so that a crash never leaves a half-made one at the path,
//! and making the new name itself durable.
//!
//! A file is built under a temporary name in the destination's folder
//! (`.NAME.XXXXXX.partial`), made durable (`fsync`), renamed into place
//! without replacing anything that appeared there meanwhile, and then the
//! folder is made durable too: under POSIX a new directory entry survives a
//! crash only once its directory has been synced. A crash before the rename
//! leaves nothing at the path (at worst a `.partial` file beside it); a
//! crash after it leaves the whole file.

use std::fs::{File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The folder a path's file lives in (`.` for a bare name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a folder's entries durable (`fsync` of the directory).
pub fn sync_folder(folder: &Path) -> Result<()> {
    File::open(folder)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::write_failed(format!("{} (sync of the folder): {e}", folder.display())))
}

/// Creates the file at `path`, which must not exist, atomically: `build`
/// writes its whole content into a temporary file in the same folder (its
/// error removes that file), which is then synced, renamed to `path`
/// (refusing to replace a file that appeared meanwhile) and the folder
/// synced. Returns the open file (read-write) and `build`'s value. The file
/// gets mode 0666 less the umask, like `open(O_CREAT)`. `what` names the
/// file in errors.
pub fn create_atomically<T>(
    path: &Path,
    what: &str,
    build: impl FnOnce(&File) -> Result<T>,
) -> Result<(File, T)> {
    let exists = || {
        Error::open(format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(libc::EEXIST)
        ))
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{what}: not a file name")))?;
    let folder = folder_of(path);
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(&folder)
        .map_err(|e| Error::open(format!("{what}: cannot create a file in its folder: {e}")))?;
    let value = build(temp.as_file())?;
    temp.as_file()
        .sync_all()
        .map_err(|e| Error::write(&format!("{what} (sync)"), 0, e))?;
    // On failure the PersistError owns the temporary file and removes it.
    let file = temp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            exists()
        } else {
            Error::write_failed(format!(
                "{what}: cannot rename the new file into place: {}",
                e.error
            ))
        }
    })?;
    sync_folder(&folder)?;
    Ok((file, value))
}
