//! Making a new COW file over an existing backing file.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{
    build_header, parse_header, valid_sector_size, MAX_ALIGNMENT, MAX_SECTOR_SIZE,
};
use super::{absolute_path, mtime_secs, Backing, UmlCow, UmlCowOptions};
use crate::error::{Error, Result};

/// Options of [`UmlCow::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// 3 (as Linux writes today) or 2.
    pub version: u32,
    /// COW granularity (512 as Linux uses).
    pub sector_size: u32,
    /// v3 alignment of bitmap and data (4096 as `uml_mkcow` uses).
    pub alignment: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            version: 3,
            sector_size: 512,
            alignment: 4096,
        }
    }
}

impl UmlCow {
    /// Creates a COW file over `backing` (which must exist; its absolute
    /// path, size and mtime go into the header) and opens it for writing
    /// with that backing file. Fails if `path` exists.
    pub fn create(path: &Path, backing: &Path, options: &CreateOptions) -> Result<UmlCow> {
        if options.version != 2 && options.version != 3 {
            return Err(Error::invalid_argument(format!(
                "UML COW version {} cannot be written (2 or 3)",
                options.version
            )));
        }
        if !valid_sector_size(options.sector_size) {
            return Err(Error::invalid_argument(format!(
                "sector size {} is not a power of two in 512..={MAX_SECTOR_SIZE}",
                options.sector_size
            )));
        }
        if options.version == 3 && (options.alignment == 0 || options.alignment > MAX_ALIGNMENT) {
            return Err(Error::invalid_argument(format!(
                "alignment {} is not in 1..={MAX_ALIGNMENT}",
                options.alignment
            )));
        }
        let absolute = absolute_path(backing)?;
        use std::os::unix::ffi::OsStrExt;
        let name = absolute.as_os_str().as_bytes().to_vec();
        if name.len() > 4095 || name.contains(&0) {
            return Err(Error::invalid_argument(format!(
                "backing path '{}' does not fit the header's 4095 bytes",
                absolute.display()
            )));
        }
        let meta = std::fs::metadata(&absolute)
            .map_err(|e| Error::open(e.to_string()).with_path(&absolute))?;
        let size = meta.len();
        if size == 0 {
            return Err(Error::invalid_argument(format!(
                "backing file '{}' is empty",
                absolute.display()
            )));
        }
        let header = build_header(
            options.version,
            &name,
            mtime_secs(&meta) as u32,
            size,
            options.sector_size,
            options.alignment,
        );
        let parsed = parse_header(&header, u64::MAX)?;
        // Built under a temporary name, synced, renamed into place and the
        // folder synced: a crash never leaves a half-made file at `path`.
        let what = path.display().to_string();
        let (file, ()) = crate::newfile::create_atomically(path, &what, |file| {
            file.write_all_at(&header, 0)
                .map_err(|e| Error::write("UML COW header", 0, e))?;
            // Like Linux: the file covers the whole data area (sparse).
            file.set_len(parsed.data_offset + size)
                .map_err(|e| Error::write("UML COW file length", parsed.data_offset + size, e))
        })?;
        drop(file);
        UmlCow::open(
            path,
            &UmlCowOptions {
                writable: true,
                backing: Backing::Path(absolute),
            },
        )
    }
}
