//! Extents: the flat, sparse and zero pieces a descriptor lists, their
//! files found (inside the descriptor's folder unless allowed otherwise)
//! and opened, and flat data read.

use std::path::{Component, Path, PathBuf};

use super::descriptor::ExtentLine;
use super::sparse::{read_sparse_header, SparseExtent, COWD_MAGIC};
use super::{file_length, name, read_prefix};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::{open_read_only, OpenOptions};

pub(super) struct FlatExtent {
    pub(super) file: crate::file_io::SourceFile,
    pub(super) path: PathBuf,
    pub(super) len: u64,
    /// Byte offset in the file of the extent's first sector.
    pub(super) base: u64,
}

pub(super) enum ExtentKind {
    Flat(FlatExtent),
    Sparse(Box<SparseExtent>),
    Zero,
}

pub(super) struct Extent {
    /// First virtual sector.
    pub(super) start: u64,
    pub(super) sectors: u64,
    pub(super) kind: ExtentKind,
}

/// Resolves an extent file name against the descriptor's folder, refusing
/// names that leave it unless the caller allows paths named inside images.
pub(super) fn resolve_extent_path(
    folder: &Path,
    named: &str,
    descriptor: &Path,
    options: &OpenOptions,
) -> Result<PathBuf> {
    let named_path = Path::new(named);
    if named.is_empty() {
        return Err(Error::corrupt(format!(
            "{}: extent line with an empty file name",
            descriptor.display()
        )));
    }
    let escapes = named_path.is_absolute()
        || named_path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        });
    if escapes && !options.follow_parent_paths {
        return Err(Error::open(format!(
            "{}: extent file '{named}' is outside the descriptor's folder; following paths \
             named inside an image is off (enable it with the follow-parent-paths open flag)",
            descriptor.display()
        )));
    }
    Ok(if named_path.is_absolute() {
        named_path.to_path_buf()
    } else {
        folder.join(named_path)
    })
}

pub(super) fn open_extent(
    line: &ExtentLine,
    folder: &Path,
    descriptor: &Path,
    options: &OpenOptions,
) -> Result<ExtentKind> {
    if line.access.eq_ignore_ascii_case("NOACCESS") {
        return Err(Error::unsupported(format!(
            "{}: NOACCESS extents cannot be read",
            descriptor.display()
        )));
    }
    let kind = line.kind.to_ascii_uppercase();
    if kind == "ZERO" {
        return Ok(ExtentKind::Zero);
    }
    let named = line.file.as_deref().ok_or_else(|| {
        Error::corrupt(format!(
            "{}: {kind} extent line without a file name",
            descriptor.display()
        ))
    })?;
    match kind.as_str() {
        "FLAT" | "VMFS" => {
            let path = resolve_extent_path(folder, named, descriptor, options)?;
            let file = open_read_only(&path)?;
            let len = file_length(&file, &path)?;
            let base = line.offset.checked_mul(SECTOR_BYTES);
            let end = base.and_then(|b| b.checked_add(line.sectors.checked_mul(SECTOR_BYTES)?));
            match (base, end) {
                (Some(base), Some(end)) if end <= len => Ok(ExtentKind::Flat(FlatExtent {
                    file: file.into(),
                    path,
                    len,
                    base,
                })),
                _ => Err(Error::corrupt(format!(
                    "{}: flat extent '{named}' ({} sectors from sector {}) does not fit in its {len}-byte file",
                    descriptor.display(),
                    line.sectors,
                    line.offset
                ))),
            }
        }
        "SPARSE" => {
            let path = resolve_extent_path(folder, named, descriptor, options)?;
            let file = open_read_only(&path)?;
            let len = file_length(&file, &path)?;
            let mut magic = [0u8; 4];
            let have =
                read_prefix(&file, &mut magic).map_err(|e| Error::read(&name(&path), 0, e))?;
            if have == 4 && magic == COWD_MAGIC {
                return Err(Error::unsupported(format!(
                    "{}: COWD (ESX/legacy) sparse extents are not supported",
                    path.display()
                )));
            }
            let header = read_sparse_header(&file, &path, len)?;
            if header.capacity < line.sectors {
                return Err(Error::corrupt(format!(
                    "{}: sparse extent '{named}' holds {} sectors but the descriptor lists {}",
                    descriptor.display(),
                    header.capacity,
                    line.sectors
                )));
            }
            Ok(ExtentKind::Sparse(Box::new(SparseExtent::new(
                file.into(),
                &path,
                len,
                header,
            )?)))
        }
        other => Err(Error::unsupported(format!(
            "{}: VMDK extent type {other} is not supported (only FLAT, VMFS, SPARSE and ZERO)",
            descriptor.display()
        ))),
    }
}

/// Reads file bytes for a data run; bytes past the end of the file read as
/// zeros, but a run that starts past the end is corruption.
pub(super) fn read_extent_bytes(
    file: &crate::file_io::SourceFile,
    path: &Path,
    len: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    if offset >= len {
        return Err(Error::corrupt(format!(
            "{}: data at byte offset {offset} lies past the end of the {len}-byte file",
            path.display()
        )));
    }
    let available = (len - offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(available);
    file.read_exact_at(head, offset)
        .map_err(|e| Error::read(&name(path), offset, e))?;
    tail.fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_extent_names_need_the_flag() {
        let folder = Path::new("/images");
        let desc = Path::new("/images/d.vmdk");
        let off = OpenOptions::default();
        let on = OpenOptions {
            follow_parent_paths: true,
        };
        assert!(resolve_extent_path(folder, "d-flat.vmdk", desc, &off).is_ok());
        assert!(resolve_extent_path(folder, "sub/d-flat.vmdk", desc, &off).is_ok());
        assert!(resolve_extent_path(folder, "../etc/passwd", desc, &off).is_err());
        assert!(resolve_extent_path(folder, "/dev/sda", desc, &off).is_err());
        assert_eq!(
            resolve_extent_path(folder, "/dev/sda", desc, &on).unwrap(),
            PathBuf::from("/dev/sda")
        );
    }
}
