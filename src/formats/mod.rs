//! Source-disk readers, one module per format, and the probe that picks one
//! by content. Every reader opens its files read-only.

use std::fs::File;
use std::path::Path;

use crate::disk::Disk;
use crate::error::{Error, Result};

pub mod raw;

/// How a source image may be opened.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Follow parent/backing paths named inside an image. Off by default:
    /// a path inside a file is untrusted input.
    pub follow_parent_paths: bool,
}

/// A format reader: how to recognise an image and open it.
pub struct FormatProbe {
    /// Short lowercase name ("raw", "vdi", ...).
    pub name: &'static str,
    /// True when the file's content looks like this format. Must not fail
    /// loudly: a probe that cannot read the header says "no".
    pub probe: fn(&File) -> bool,
    /// Opens the image read-only.
    pub open: fn(&Path, &OpenOptions) -> Result<Box<dyn Disk>>,
}

/// The built-in formats in probe order. `raw` comes last: it accepts any
/// file.
pub fn builtin_formats() -> &'static [FormatProbe] {
    &[FormatProbe {
        name: "raw",
        probe: raw::probe,
        open: raw::open_boxed,
    }]
}

/// Opens an image read-only, choosing the format by its content.
pub fn open_path(path: &Path, options: &OpenOptions) -> Result<Box<dyn Disk>> {
    let file = open_read_only(path)?;
    for format in builtin_formats() {
        if (format.probe)(&file) {
            return (format.open)(path, options);
        }
    }
    Err(Error::Unsupported(format!(
        "{}: not an image format this library reads",
        path.display()
    )))
}

/// Opens a file for reading only, with an error naming the path.
pub fn open_read_only(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::Open(format!("{}: {e}", path.display())))
}
