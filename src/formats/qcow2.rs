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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::inflate::inflate_exact;
use super::mapped::{self, MappedImage, Mapping};
use super::table_cache::TableCache;
use super::{open_parent_as, open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
/// Header extension types: end of the list, backing file format.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// The longest backing format name we accept (names are short words).
const MAX_FORMAT_NAME: u32 = 64;
/// Smallest and largest cluster sizes we accept (the specification's floor
/// and QEMU's own ceiling of 2 MiB).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB (32 subclusters of
/// at least one sector each).
const MIN_EXTENDED_CLUSTER_BITS: u32 = 14;
/// QEMU's cap on the L1 table (32 MiB); a bigger one is not a real image.
const MAX_L1_BYTES: u64 = 32 << 20;
/// The specification's cap on the backing file name.
const MAX_BACKING_NAME: u32 = 1023;
/// Memory budget for cached L2 tables.
const L2_CACHE_BYTES: usize = 32 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// Bits 9..=55: a cluster-aligned host offset in L1 and L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

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

/// What one allocation unit (cluster, or subcluster with extended L2
/// entries) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Stored at this host offset (for the unit's first byte).
    Data(u64),
    /// A compressed cluster with this L2 descriptor.
    Compressed(u64),
    Zero,
    /// Not in this image: the backing file's, or zeros.
    Absent,
}

/// How to decode the units of an L2 table.
#[derive(Debug, Clone, Copy)]
struct UnitLayout {
    cluster_bits: u32,
    extended_l2: bool,
    has_zero_flag: bool,
}

impl UnitLayout {
    /// What unit number `index` of an L2 table holds (host offsets are for
    /// the unit's first byte).
    fn unit(&self, table: &[u64], index: u64) -> std::result::Result<Unit, String> {
        let cluster_size = 1u64 << self.cluster_bits;
        let (cluster, sub) = if self.extended_l2 {
            (index / SUBCLUSTERS, index % SUBCLUSTERS)
        } else {
            (index, 0)
        };
        let (entry, bitmap) = if self.extended_l2 {
            let at = cluster as usize * 2;
            (table[at], table[at + 1])
        } else {
            (table[cluster as usize], 0)
        };
        if entry & L2_COMPRESSED != 0 {
            return Ok(Unit::Compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        if host & (cluster_size - 1) != 0 {
            return Err(format!(
                "entry {cluster} maps to unaligned host offset {host}"
            ));
        }
        if !self.extended_l2 {
            return Ok(if self.has_zero_flag && entry & L2_ZERO != 0 {
                Unit::Zero
            } else if host == 0 {
                Unit::Absent
            } else {
                Unit::Data(host)
            });
        }
        let allocated = bitmap >> sub & 1 != 0;
        let zero = bitmap >> (sub + SUBCLUSTERS) & 1 != 0;
        match (allocated, zero) {
            (true, true) => Err(format!(
                "entry {cluster} marks subcluster {sub} both allocated and zero"
            )),
            (true, false) if host == 0 => Err(format!(
                "entry {cluster} has allocated subclusters but no host cluster"
            )),
            (true, false) => Ok(Unit::Data(host + sub * (cluster_size / SUBCLUSTERS))),
            (false, true) => Ok(Unit::Zero),
            (false, false) => Ok(Unit::Absent),
        }
    }
}

/// A qcow2 image opened read-only.
pub struct Qcow2Disk {
    file: File,
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
    last_inflated: Option<(u64, Vec<u8>)>,
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

/// The header fields the reader uses, validated.
struct Header {
    version: u32,
    cluster_bits: u32,
    virtual_size: u64,
    l1_entries_needed: u64,
    l1_offset: u64,
    extended_l2: bool,
    backing_name: Option<String>,
    backing_format: Option<String>,
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
            return Err(Error::InvalidArgument(format!(
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
            .map_err(|e| Error::Open(format!("{}: {e}", path.display())))?
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
            file,
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
            last_inflated: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Bytes of virtual disk one L2 table maps.
    fn l2_span(&self) -> u64 {
        let entry_bytes = if self.extended_l2 { 16 } else { 8 };
        (self.cluster_size() / entry_bytes) * self.cluster_size()
    }

    fn unit_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// What holds the virtual byte `pos`, and the end of the region from
    /// `pos` that is uniformly so (a whole L2 span when its L1 entry is
    /// empty; otherwise following units of the same L2 table that continue
    /// it, looking no further than `want_end`).
    fn lookup(&mut self, pos: u64, want_end: u64) -> Result<(Unit, u64)> {
        let span = self.l2_span();
        let l1_index = pos / span;
        let l1_entry = *self.l1.get(l1_index as usize).ok_or_else(|| {
            Error::Internal(format!(
                "{}: virtual byte {pos} past the L1 table",
                self.describe()
            ))
        })?;
        let l2_offset = l1_entry & OFFSET_MASK;
        let table_start = l1_index * span;
        if l2_offset == 0 {
            return Ok((Unit::Absent, table_start + span));
        }
        let layout = UnitLayout {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2,
            has_zero_flag: self.has_zero_flag,
        };
        let unit_size = self.unit_size();
        let units_in_table = span / unit_size;
        let first_index = (pos - table_start) / unit_size;
        let name = self.describe();
        let table = self.l2_table(l1_index, l2_offset)?;
        let first = layout.unit(table, first_index).map_err(|why| {
            Error::Corrupt(format!(
                "{name}: L2 table at byte offset {l2_offset}: {why}"
            ))
        })?;
        let mut next_index = first_index + 1;
        if !matches!(first, Unit::Compressed(_)) {
            while next_index < units_in_table && table_start + next_index * unit_size < want_end {
                // A damaged entry further on ends the run; it is reported
                // when (if) that unit is read.
                let Ok(next) = layout.unit(table, next_index) else {
                    break;
                };
                let distance = (next_index - first_index) * unit_size;
                let continues = match (first, next) {
                    (Unit::Data(host), Unit::Data(next_host)) => next_host == host + distance,
                    (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                next_index += 1;
            }
        }
        let end = match first {
            // A compressed cluster is one unit however it is subdivided.
            Unit::Compressed(_) => (pos | (self.cluster_size() - 1)) + 1,
            _ => table_start + next_index * unit_size,
        };
        let unit = match first {
            Unit::Data(host) => Unit::Data(host + (pos % unit_size)),
            other => other,
        };
        Ok((unit, end))
    }

    /// The L2 table that L1 entry `l1_index` points at, from the cache or
    /// read and validated.
    fn l2_table(&mut self, l1_index: u64, l2_offset: u64) -> Result<&[u64]> {
        if !self.l2_cache.contains(l2_offset) {
            let cluster_size = self.cluster_size();
            let in_file = l2_offset
                .checked_add(cluster_size)
                .is_some_and(|end| end <= self.file_len);
            if l2_offset & (cluster_size - 1) != 0 || !in_file {
                return Err(Error::Corrupt(format!(
                    "{}: L1 entry {l1_index} points at an L2 table at byte offset {l2_offset}, \
                     which is unaligned or not inside the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            let mut raw = vec![0u8; cluster_size as usize];
            self.file
                .read_exact_at(&mut raw, l2_offset)
                .map_err(|e| Error::read(&format!("{} L2 table", self.describe()), l2_offset, e))?;
            let entries = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
            self.l2_cache.insert(l2_offset, entries);
        }
        self.l2_cache
            .get(l2_offset)
            .ok_or_else(|| Error::Internal("L2 cache lost a table it just stored".into()))
    }

    /// Reads host bytes for a data run; bytes past the end of the file read
    /// as zeros (QEMU may leave the tail of the last cluster unwritten), but
    /// a run that starts past the end is corruption.
    fn read_host(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset >= self.file_len {
            return Err(Error::Corrupt(format!(
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

    /// Inflates the compressed cluster with L2 descriptor `descriptor`.
    fn inflate_cluster(&mut self, descriptor: u64) -> Result<&[u8]> {
        let cached = matches!(&self.last_inflated, Some((d, _)) if *d == descriptor);
        if !cached {
            let cluster_size = self.cluster_size();
            let offset_bits = 62 - (self.cluster_bits - 8);
            let host = descriptor & ((1u64 << offset_bits) - 1);
            let extra_sectors = (descriptor & !L2_COMPRESSED & !(1 << 63)) >> offset_bits;
            // The stored length runs from `host` to the end of the last
            // sector it names; it is at most two clusters, so bounded.
            let stored = (extra_sectors + 1) * SECTOR_BYTES - (host % SECTOR_BYTES);
            if host >= self.file_len {
                return Err(Error::Corrupt(format!(
                    "{}: compressed cluster at host byte offset {host} lies past the end of the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            // The last compressed cluster may claim sectors past the end of
            // the file; those were never written and the stream ends before.
            let readable = stored.min(self.file_len - host) as usize;
            let mut input = vec![0u8; readable];
            self.file.read_exact_at(&mut input, host).map_err(|e| {
                Error::read(&format!("{} compressed cluster", self.describe()), host, e)
            })?;
            let mut output = vec![0u8; cluster_size as usize];
            inflate_exact(&input, &mut output, false).map_err(|why| {
                Error::Corrupt(format!(
                    "{}: compressed cluster at host byte offset {host}: {why}",
                    self.describe()
                ))
            })?;
            self.last_inflated = Some((descriptor, output));
        }
        match &self.last_inflated {
            Some((_, data)) => Ok(data),
            None => Err(Error::Internal("inflated cluster cache is empty".into())),
        }
    }
}

/// Reads and validates the header, before anything sized by it is
/// allocated.
fn read_header(file: &File, file_len: u64, path: &Path) -> Result<Header> {
    let name = path.display();
    let corrupt = |what: String| Error::Corrupt(format!("{name}: qcow2 header: {what}"));
    let mut raw = [0u8; V3_MIN_HEADER_LEN as usize + 8];
    let have = (file_len.min(raw.len() as u64)) as usize;
    if (have as u64) < V2_HEADER_LEN {
        return Err(corrupt(format!("file is only {file_len} bytes long")));
    }
    file.read_exact_at(&mut raw[..have], 0)
        .map_err(|e| Error::read(&format!("{name} header"), 0, e))?;
    if raw[..4] != MAGIC {
        return Err(corrupt("bad magic at byte offset 0".into()));
    }
    let version = BigEndian::read_u32(&raw[4..]);
    if version != 2 && version != 3 {
        return Err(Error::Unsupported(format!(
            "{name}: qcow2 version {version} (only 2 and 3 are read)"
        )));
    }
    let backing_offset = BigEndian::read_u64(&raw[8..]);
    let backing_len = BigEndian::read_u32(&raw[16..]);
    let cluster_bits = BigEndian::read_u32(&raw[20..]);
    let virtual_size = BigEndian::read_u64(&raw[24..]);
    let crypt_method = BigEndian::read_u32(&raw[32..]);
    let l1_size = BigEndian::read_u32(&raw[36..]);
    let l1_offset = BigEndian::read_u64(&raw[40..]);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster_bits {cluster_bits} at byte offset 20 is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if crypt_method != 0 {
        let method = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown",
        };
        return Err(Error::Unsupported(format!(
            "{name}: encrypted qcow2 image ({method} encryption, method {crypt_method}) is not supported"
        )));
    }

    let mut extended_l2 = false;
    let mut header_len = V2_HEADER_LEN;
    if version >= 3 {
        if (have as u64) < V3_MIN_HEADER_LEN {
            return Err(corrupt(format!(
                "version 3 header needs {V3_MIN_HEADER_LEN} bytes, file has {file_len}"
            )));
        }
        let incompatible = BigEndian::read_u64(&raw[72..]);
        header_len = u64::from(BigEndian::read_u32(&raw[100..]));
        if header_len < V3_MIN_HEADER_LEN || header_len > cluster_size.min(file_len) {
            return Err(corrupt(format!(
                "header length {header_len} at byte offset 100 is invalid"
            )));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "{name}: qcow2 incompatible feature bits {unknown:#x} are unknown to this reader"
            )));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported(format!(
                "{name}: qcow2 image with an external data file (data_file) is not supported"
            )));
        }
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            let kind = if header_len > V3_MIN_HEADER_LEN {
                raw[104]
            } else {
                u8::MAX
            };
            if kind != 0 {
                let label = if kind == 1 { "zstd" } else { "unknown" };
                return Err(Error::Unsupported(format!(
                    "{name}: qcow2 compression type {kind} ({label}) is not supported; only deflate"
                )));
            }
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            if cluster_bits < MIN_EXTENDED_CLUSTER_BITS {
                return Err(corrupt(format!(
                    "extended L2 entries with {cluster_size}-byte clusters (needs at least 16 KiB)"
                )));
            }
            extended_l2 = true;
        }
    }

    let entry_bytes: u64 = if extended_l2 { 16 } else { 8 };
    let l2_span = (cluster_size / entry_bytes) * cluster_size;
    let l1_entries_needed = virtual_size.div_ceil(l2_span);
    if u64::from(l1_size) < l1_entries_needed {
        return Err(corrupt(format!(
            "L1 table of {l1_size} entries (byte offset 36) cannot map a {virtual_size}-byte disk"
        )));
    }
    let l1_bytes = l1_entries_needed * 8;
    let l1_fits = l1_offset
        .checked_add(l1_bytes)
        .is_some_and(|end| end <= file_len);
    if l1_bytes > MAX_L1_BYTES || l1_offset & (cluster_size - 1) != 0 || !l1_fits {
        return Err(corrupt(format!(
            "L1 table at byte offset {l1_offset} ({l1_bytes} bytes) is unaligned, too large, \
             or not inside the {file_len}-byte file"
        )));
    }
    if virtual_size.checked_add(SECTOR_BYTES).is_none() {
        return Err(corrupt(format!("virtual size {virtual_size} is absurd")));
    }

    let backing_name = if backing_offset == 0 {
        None
    } else {
        let fits = backing_offset
            .checked_add(u64::from(backing_len))
            .is_some_and(|end| end <= file_len);
        if backing_len == 0 || backing_len > MAX_BACKING_NAME || !fits {
            return Err(corrupt(format!(
                "backing file name at byte offset {backing_offset}, {backing_len} bytes, is invalid"
            )));
        }
        let mut bytes = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut bytes, backing_offset)
            .map_err(|e| Error::read(&format!("{name} backing file name"), backing_offset, e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            corrupt(format!(
                "backing file name at byte offset {backing_offset} is not UTF-8"
            ))
        })?;
        Some(text)
    };

    let backing_format = if backing_name.is_some() {
        read_backing_format(file, header_len, cluster_size.min(file_len), &corrupt)?
    } else {
        None
    };

    Ok(Header {
        version,
        cluster_bits,
        virtual_size,
        l1_entries_needed,
        l1_offset,
        extended_l2,
        backing_name,
        backing_format,
    })
}

/// Walks the header extensions between `start` and `end` (the end of the
/// first cluster, or of a shorter file) and returns the backing format
/// name, if one is there.
fn read_backing_format(
    file: &File,
    start: u64,
    end: u64,
    corrupt: &dyn Fn(String) -> Error,
) -> Result<Option<String>> {
    if start >= end {
        return Ok(None);
    }
    let mut area = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut area, start)
        .map_err(|e| Error::read("qcow2 header extensions", start, e))?;
    let mut at = 0usize;
    let mut found = None;
    // Each extension takes at least 8 bytes, so the walk ends.
    while at + 8 <= area.len() {
        let kind = BigEndian::read_u32(&area[at..]);
        let len = BigEndian::read_u32(&area[at + 4..]);
        if kind == EXT_END {
            break;
        }
        let data = at + 8;
        let padded = (u64::from(len) + 7) & !7;
        if padded > (area.len() - data) as u64 {
            return Err(corrupt(format!(
                "header extension {kind:#x} at byte offset {} ({len} bytes) runs past the \
                 first cluster",
                start + at as u64
            )));
        }
        if kind == EXT_BACKING_FORMAT {
            let bytes = &area[data..data + len as usize];
            let text = std::str::from_utf8(bytes).ok().filter(|t| {
                !t.is_empty()
                    && len <= MAX_FORMAT_NAME
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
            match text {
                Some(t) => found = Some(t.to_owned()),
                None => {
                    return Err(corrupt(format!(
                        "backing format extension at byte offset {} is not a format name",
                        start + at as u64
                    )))
                }
            }
        }
        at = data + padded as usize;
    }
    Ok(found)
}

/// Reads the active L1 table and checks every L2 table it names is
/// cluster-aligned and inside the file, so a damaged table fails at open.
fn read_l1(
    file: &File,
    path: &Path,
    offset: u64,
    entries: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    file.read_exact_at(&mut raw, offset)
        .map_err(|e| Error::read(&format!("{} L1 table", path.display()), offset, e))?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    for (index, entry) in l1.iter().enumerate() {
        let l2 = entry & OFFSET_MASK;
        let inside = l2
            .checked_add(cluster_size)
            .is_some_and(|end| end <= file_len);
        if l2 != 0 && (l2 & (cluster_size - 1) != 0 || !inside) {
            return Err(Error::Corrupt(format!(
                "{}: L1 entry {index} (table at byte offset {offset}) points at an L2 table at \
                 byte offset {l2}, which is unaligned or not inside the {file_len}-byte file",
                path.display()
            )));
        }
    }
    Ok(l1)
}

impl MappedImage for Qcow2Disk {
    fn sectors(&self) -> u64 {
        self.virtual_size.div_ceil(SECTOR_BYTES)
    }

    fn map(&mut self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
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

    fn read_mapped(&mut self, mapping: Mapping, lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.read_host(offset, buf),
            Mapping::Encoded { token } => {
                let within = (lba * SECTOR_BYTES) & (self.cluster_size() - 1);
                let cluster = self.inflate_cluster(token)?;
                let from = within as usize;
                let slice = cluster.get(from..from + buf.len()).ok_or_else(|| {
                    Error::Internal("compressed run crosses a cluster boundary".into())
                })?;
                buf.copy_from_slice(slice);
                Ok(())
            }
            _ => Err(Error::Internal(format!(
                "read_mapped called for {mapping:?}"
            ))),
        }
    }

    fn parent(&mut self) -> Option<&mut (dyn Disk + 'static)> {
        self.parent.as_deref_mut()
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
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        mapped::read_sectors(self, lba, buf)
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        mapped::block_status(self, lba, count)
    }
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        mapped::status_run(self, lba, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::DeflateEncoder;
    use flate2::Compression;
    use std::io::Write;

    #[test]
    fn inflate_stops_at_the_output_size() {
        // A stream that inflates to 1 MiB must not produce more than asked.
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::best());
        enc.write_all(&vec![7u8; 1 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        inflate_exact(&bomb, &mut out, false).unwrap();
        assert!(out.iter().all(|b| *b == 7));
    }

    #[test]
    fn inflate_rejects_short_and_garbage_streams() {
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&[1u8; 100]).unwrap();
        let short = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        assert!(inflate_exact(&short, &mut out, false).is_err());
        assert!(inflate_exact(&[0xff; 64], &mut out, false).is_err());
        assert!(inflate_exact(&[], &mut out, false).is_err());
    }

    #[test]
    fn l2_cache_evicts_least_recently_used() {
        let mut cache = TableCache::new(2);
        cache.insert(1, vec![1]);
        cache.insert(2, vec![2]);
        assert!(cache.get(1).is_some());
        cache.insert(3, vec![3]);
        assert!(cache.contains(1));
        assert!(!cache.contains(2));
        assert!(cache.contains(3));
    }
}
