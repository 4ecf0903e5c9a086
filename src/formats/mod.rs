//! Source-disk readers, one module per format, the table of them
//! ([`registry`]) and the probe that picks one by content. Every reader
//! opens its files read-only; UML COW and VCI images can also be opened
//! for writing (through the backend table of the C ABI).

use std::fs::File;
use std::path::Path;

use crate::disk::Disk;
use crate::error::{Error, Result};

pub(crate) mod guid;
mod inflate;
pub mod mapped;
pub mod media_registry;
pub mod parallels;
pub mod qcow2;
pub mod raw;
pub mod registry;
mod table_cache;
pub mod umlcow;
pub mod vci;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod writer;

pub use registry::{builtin_formats, CreateParams, FormatId, FormatInfo, ImageOpenOptions, Opened};

/// How a source image may be opened.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Follow parent/backing paths named inside an image. Off by default:
    /// a path inside a file is untrusted input.
    pub follow_parent_paths: bool,
}

/// Opens an image read-only, choosing the format by its content
/// ([`registry::open`] also says which format it chose).
pub fn open_path(path: &Path, options: &OpenOptions) -> Result<Box<dyn Disk>> {
    open_path_at_depth(path, options, 0)
}

/// Opens a file for reading only, with an error naming the path.
pub fn open_read_only(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::open(e.to_string()).with_path(path))
}

/// The deepest parent/backing chain any format follows: a loop or an
/// absurd chain ends in a clear error, not a stack overflow.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Opens the parent (backing) image that `child` names as `named`, applying
/// the caller's rules: refused unless `options.follow_parent_paths`, a
/// relative name is taken relative to the child's folder, and the chain
/// depth is capped at [`MAX_CHAIN_DEPTH`]. `depth` is the child's depth
/// (0 for the image the caller opened).
pub fn open_parent(
    child: &Path,
    named: &str,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    open_parent_as(child, named, None, options, depth)
}

/// [`open_parent`] with the parent's format as the child names it, when it
/// does (qcow2's backing-format header extension). With a hint the parent is
/// opened as that format instead of being probed, so a raw parent whose data
/// happens to start with another format's magic is still read as raw. The
/// hint uses QEMU's format names (`vpc` is VHD); an unknown one is an error.
pub fn open_parent_as(
    child: &Path,
    named: &str,
    format: Option<&str>,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    if !options.follow_parent_paths {
        return Err(Error::open(format!(
            "{}: needs its parent image '{named}'; following parent paths named \
             inside an image is off (enable it with the follow-parent-paths open \
             flag, or supply the parent yourself)",
            child.display()
        )));
    }
    let named_path = Path::new(named);
    let path = if named_path.is_absolute() {
        named_path.to_path_buf()
    } else {
        child
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(named_path)
    };
    open_resolved_parent(child, named, &path, format, options, depth)
}

/// Opens the parent of `child` at a path found some other way than the name
/// inside the child (a loaded [`media_registry`]), under the same rules as
/// [`open_parent`]: only with `options.follow_parent_paths`, within
/// [`MAX_CHAIN_DEPTH`], probing the parent's format.
pub fn open_parent_at_path(
    child: &Path,
    path: &Path,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    let named = path.display().to_string();
    if !options.follow_parent_paths {
        return Err(Error::open(format!(
            "{}: needs its parent image '{named}'; following parent paths named \
             inside an image is off (enable it with the follow-parent-paths open \
             flag, or supply the parent yourself)",
            child.display()
        )));
    }
    open_resolved_parent(child, &named, path, None, options, depth)
}

/// The depth cap, the existence check and the open of a parent at `path`
/// (`named` is how the child named it, for messages).
fn open_resolved_parent(
    child: &Path,
    named: &str,
    path: &Path,
    format: Option<&str>,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    if depth + 1 >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(format!(
            "{}: parent chain deeper than {MAX_CHAIN_DEPTH} images (a loop?)",
            child.display()
        )));
    }
    if !path.exists() {
        return Err(Error::open(format!(
            "{}: parent image '{}' not found",
            child.display(),
            path.display()
        )));
    }
    match format {
        None => open_path_at_depth(path, options, depth + 1),
        Some(hint) => {
            let format = FormatId::from_qemu_name(hint).ok_or_else(|| {
                Error::unsupported(format!(
                    "{}: parent image '{named}' has format '{hint}', which this \
                     library does not read",
                    child.display()
                ))
            })?;
            (format.info().open_at_depth)(path, options, depth + 1)
        }
    }
}

/// `open_path` for an image that is `depth` links down a parent chain.
pub fn open_path_at_depth(
    path: &Path,
    options: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn Disk>> {
    registry::open_at_depth(path, options, depth).map(|opened| opened.disk)
}
