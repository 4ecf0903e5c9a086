//! QEMU qcow2 images (versions 2 and 3), read-only.
//!
//! Format facts this reader relies on (from the published qcow2
//! specification, restated here in our own words):
//!
//! * All header fields are big-endian. The header starts with the magic
//!   `QFI\xfb`, then: version (u32, 2 or 3) at 4, backing file name offset
//!   (u64) at 8 and length (u32, at most 1023) at 16, `cluster_bits` (u32) at
//!   20, virtual size in bytes (u64) at 24, encryption method (u32, 0 = none)
//!   at 32, active L1 entry count (u32) at 36 and L1 offset (u64) at 40. The
//!   refcount and snapshot fields that follow are not needed to read.
//! * Version 3 adds incompatible (u64 at 72), compatible (80) and autoclear
//!   (88) feature bits, the refcount order (96), the header length (u32 at
//!   100) and, when the header is at least 105 bytes long, the compression
//!   type byte at 104 (0 = deflate, 1 = zstd). Incompatible bits: 0 dirty,
//!   1 corrupt, 2 external data file, 3 non-default compression type,
//!   4 extended L2 entries. A reader must refuse bits it does not know.
//! * A cluster is `1 << cluster_bits` bytes (9..=21 in practice). The L1
//!   table holds u64 entries whose bits 9..=55 give the offset of an L2 table
//!   (one cluster long; 0 = the whole L2 range is unallocated).
//! * A standard L2 entry is a u64: bit 62 marks a compressed cluster; for an
//!   uncompressed one bits 9..=55 give the host offset (0 = unallocated) and
//!   bit 0 (version 3 only) says the cluster reads as zeros, whatever the
//!   offset. Bit 63 is a refcount hint and is ignored.
//! * A compressed cluster's entry keeps, with `x = 62 - (cluster_bits - 8)`,
//!   the host byte offset in bits `0..x` and, in bits `x..62`, the number of
//!   512-byte sectors the compressed data spans after the first one. The
//!   data is a raw deflate stream (no zlib header) that inflates to one
//!   cluster; it may start and end in the middle of a sector.
//! * With extended L2 entries every entry is 128 bits: the standard entry,
//!   then a u64 bitmap of 32 subclusters whose bit `i` says subcluster `i` is
//!   allocated in the host cluster and bit `32 + i` says it reads as zeros.
//!   Neither bit means "not here" (backing file or zeros). The bitmap does
//!   not apply to compressed clusters, and bit 0 of the standard entry is not
//!   a zero flag in this mode.
//! * A zero flag wins over the backing file: zero clusters in a child read
//!   as zeros, not as the parent's data.
//! * The dirty bit only says refcounts may be stale and the corrupt bit
//!   asks writers to stop; neither affects what the tables map, so both are
//!   read (QEMU too opens such images read-only).
//! * Internal snapshots have their own L1 tables; only the active L1 (the one
//!   in the header) describes the current disk.
//! * Header extensions follow the header (at byte 72 in version 2, at the
//!   header length in version 3), inside the first cluster: each is a u32
//!   type, a u32 data length, then the data padded to a multiple of 8 bytes;
//!   type 0 ends the list. Type `0xE2792ACA` holds the backing file's format
//!   name (e.g. `raw`); with it the backing file is opened as that format
//!   rather than probed, so a raw backing file is never mistaken for an image
//!   because of what its data starts with. Other types are skipped.

mod compressed;
mod header;
mod layout;
mod table;
pub mod writer;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::mapped::{self, MappedImage, Mapping};
use super::table_cache::{LastDecoded, TableCache};
use super::{open_parent_as, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

use header::read_header;
use layout::MAGIC;
use table::{read_l1, Unit};

/// Memory budget for cached L2 tables.
const L2_CACHE_BYTES: usize = 32 << 20;

/// True when the file starts with the qcow2 magic and a version this reader
/// claims (2, 3, or a later one it will refuse clearly). Version 1 is the
/// older qcow format, left to other readers.
pub fn probe(file: &File) -> bool {
    let mut head = [0u8; 8];
    if file.read_exact_at(&mut head, 0).is_err() || head[..4] != MAGIC {
        return false;
    }
    BigEndian::read_u32(&head[4..]) >= 2
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, options: &OpenOptions, depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(Qcow2Disk::open_at_depth(path, options, depth)?))
}

/// A qcow2 image opened read-only.
pub struct Qcow2Disk {
    file: crate::file_io::SourceFile,
    path: PathBuf,
    file_len: u64,
    virtual_size: u64,
    cluster_bits: u32,
    /// Version 3 images have the L2 zero flag.
    has_zero_flag: bool,
    extended_l2: bool,
    /// The active L1 table, trimmed to the entries the virtual size needs.
    l1: Vec<u64>,
    l2_cache: TableCache<u64>,
    backing_name: Option<String>,
    /// The backing file's format from the header extension, if named.
    backing_format: Option<String>,
    parent: Option<Box<dyn Disk>>,
    /// The last decompressed cluster and its L2 descriptor: sequential
    /// reads of a compressed cluster inflate it once.
    last_inflated: LastDecoded,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_bits", &self.cluster_bits)
            .field("extended_l2", &self.extended_l2)
            .field("backing_name", &self.backing_name)
            .finish_non_exhaustive()
    }
}

impl Qcow2Disk {
    /// Opens `path`; a backing file is opened through
    /// [`open_parent`] under `options` (refused unless parent following is on).
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Qcow2Disk> {
        Self::open_at_depth(path, options, 0)
    }

    /// `open` for an image `depth` links down a backing chain.
    pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<Qcow2Disk> {
        let mut disk = Self::open_without_parent(path)?;
        if let Some(name) = disk.backing_name.clone() {
            let format = disk.backing_format.clone();
            disk.parent = Some(open_parent_as(
                path,
                &name,
                format.as_deref(),
                options,
                depth,
            )?);
        }
        Ok(disk)
    }

    /// Opens a differencing image whose backing disk the caller supplies
    /// (instead of following the name stored in the image).
    pub fn open_with_parent(path: &Path, parent: Box<dyn Disk>) -> Result<Qcow2Disk> {
        let mut disk = Self::open_without_parent(path)?;
        if disk.backing_name.is_none() {
            return Err(Error::invalid_argument(format!(
                "{}: a parent was supplied but the image has no backing file",
                path.display()
            )));
        }
        disk.parent = Some(parent);
        Ok(disk)
    }

    /// The backing file name stored in the image, if any.
    pub fn backing_file_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's format as the image names it (QEMU's names:
    /// `raw`, `qcow2`, `vpc`, ...), if it has the header extension.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    fn open_without_parent(path: &Path) -> Result<Qcow2Disk> {
        let file = open_read_only(path)?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::open(e.to_string()).with_path(path))?
            .len();
        let header = read_header(&file, file_len, path)?;
        let cluster_size = 1u64 << header.cluster_bits;
        let l1 = read_l1(
            &file,
            path,
            header.l1_offset,
            header.l1_entries_needed,
            cluster_size,
            file_len,
        )?;
        let table_bytes = cluster_size as usize;
        Ok(Qcow2Disk {
            file: file.into(),
            path: path.to_path_buf(),
            file_len,
            virtual_size: header.virtual_size,
            cluster_bits: header.cluster_bits,
            has_zero_flag: header.version >= 3,
            extended_l2: header.extended_l2,
            l1,
            l2_cache: TableCache::new(L2_CACHE_BYTES / table_bytes),
            backing_name: header.backing_name,
            backing_format: header.backing_format,
            parent: None,
            last_inflated: LastDecoded::default(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// Reads host bytes for a data run; bytes past the end of the file read
    /// as zeros (QEMU may leave the tail of the last cluster unwritten), but
    /// a run that starts past the end is corruption.
    fn read_host(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset >= self.file_len {
            return Err(Error::corrupt(format!(
                "{}: data cluster at host byte offset {offset} lies past the end of the {}-byte file",
                self.describe(),
                self.file_len
            )));
        }
        let available = (self.file_len - offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(available);
        self.file
            .read_exact_at(head, offset)
            .map_err(|e| Error::read(&self.describe(), offset, e))?;
        tail.fill(0);
        Ok(())
    }
}

impl MappedImage for Qcow2Disk {
    fn sectors(&self) -> u64 {
        self.virtual_size.div_ceil(SECTOR_BYTES)
    }

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        let start = lba * SECTOR_BYTES;
        let want_end = (lba + count) * SECTOR_BYTES;
        let (first, mut end) = self.lookup(start, want_end)?;
        // Extend the run while the next region continues it: the same kind
        // of absent/zero region, or data that is contiguous in the file.
        while end < want_end && !matches!(first, Unit::Compressed(_)) {
            let (next, next_end) = self.lookup(end, want_end)?;
            let continues = match (first, next) {
                (Unit::Data(host), Unit::Data(next_host)) => next_host == host + (end - start),
                (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            end = next_end;
        }
        let run = (end.min(want_end) - start) / SECTOR_BYTES;
        let mapping = match first {
            Unit::Data(host) => Mapping::Data {
                file: 0,
                offset: host,
            },
            Unit::Compressed(descriptor) => Mapping::Encoded { token: descriptor },
            Unit::Zero => Mapping::Zero,
            Unit::Absent if self.backing_name.is_some() => Mapping::Parent,
            Unit::Absent => Mapping::Unallocated,
        };
        Ok((mapping, run.max(1)))
    }

    fn read_mapped(&self, mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.read_host(offset, buf),
            Mapping::Encoded { token } => {
                let within = (lba * SECTOR_BYTES) & (self.cluster_size() - 1);
                let cluster = self.inflate_cluster(token)?;
                let from = within as usize;
                let slice = cluster.get(from..from + buf.len()).ok_or_else(|| {
                    Error::internal("compressed run crosses a cluster boundary".into())
                })?;
                buf.copy_from_slice(slice);
                Ok(())
            }
            _ => Err(Error::internal(format!(
                "read_mapped called for {mapping:?}"
            ))),
        }
    }

    fn parent(&self) -> Option<&(dyn Disk + 'static)> {
        self.parent.as_deref()
    }
}

impl Disk for Qcow2Disk {
    fn drive_type(&self) -> DriveType {
        DriveType::Qcow2
    }
    fn sector_count(&self) -> u64 {
        MappedImage::sectors(self)
    }
    fn byte_size(&self) -> u64 {
        self.virtual_size
    }
    fn is_snapshot(&self) -> bool {
        self.backing_name.is_some()
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        mapped::read_sectors(self, lba, buf)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        mapped::block_status(self, lba, count)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        mapped::status_run(self, lba, count)
    }
}
