//! Hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse and
//! streamOptimized): the header (or its footer copy), the grain directory
//! and tables, and compressed grains.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};

use super::name;
use crate::disk::{SECTOR_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::formats::inflate::inflate_exact;
use crate::formats::table_cache::TableCache;

pub(super) const SPARSE_MAGIC: [u8; 4] = *b"KDMV";
// Header fields (byte offsets in the 512-byte header; all little-endian).
const VERSION_AT: usize = 4;
const FLAGS_AT: usize = 8;
const CAPACITY_AT: usize = 12;
const GRAIN_SECTORS_AT: usize = 20;
const DESCRIPTOR_SECTOR_AT: usize = 28;
const DESCRIPTOR_SECTORS_AT: usize = 36;
const GTES_PER_GT_AT: usize = 44;
const RGD_SECTOR_AT: usize = 48;
const GD_SECTOR_AT: usize = 56;
const OVERHEAD_SECTORS_AT: usize = 64;
/// The four line-ending check characters (`\n`, ` `, `\r`, `\n`) that
/// let a reader detect a file mangled by a text-mode transfer.
const NEWLINE_CHECK_AT: usize = 73;
const NEWLINE_CHECK: [u8; 4] = *b"\n \r\n";
const COMPRESSION_AT: usize = 77;
/// Flags: the newline check characters are valid; a redundant grain
/// directory is kept.
pub(super) const FLAG_NEWLINE_CHECK: u32 = 1;
pub(super) const FLAG_REDUNDANT_GD: u32 = 1 << 1;
pub(super) const COWD_MAGIC: [u8; 4] = *b"COWD";
pub(super) const FLAG_COMPRESSED: u32 = 1 << 16;
pub(super) const FLAG_MARKERS: u32 = 1 << 17;
pub(super) const COMPRESSION_DEFLATE: u16 = 1;
pub(super) const GD_AT_END: u64 = u64::MAX;
pub(super) const GRAIN_ZERO: u32 = 1;
pub(super) const MARKER_HEADER: u64 = 12;
/// Metadata markers of stream-optimized extents: a sector holding the
/// number of sectors that follow (u64), a zero size (u32) and the type
/// (u32 at 12).
pub(super) const MARKER_TYPE_AT: usize = 12;
pub(super) const MARKER_EOS: u32 = 0;
pub(super) const MARKER_GT: u32 = 1;
pub(super) const MARKER_GD: u32 = 2;
pub(super) const MARKER_FOOTER: u32 = 3;
/// Largest grain accepted: 16 MiB (VMware uses 64 KiB); bounds the
/// decompression buffer.
pub(super) const MAX_GRAIN_SECTORS: u64 = 1 << 15;
/// The specification fixes 512 entries per grain table; QEMU refuses more.
pub(super) const MAX_GTES_PER_GT: u32 = 512;
/// Grain tables cached per sparse extent (2 KiB each at 512 entries).
pub(super) const GT_CACHE_TABLES: usize = 1024;

/// What one grain (or run of grains) of a sparse extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Uncompressed, at this byte offset in the extent file.
    Data(u64),
    /// A compressed grain whose marker (or stream) starts at this sector.
    Compressed(u64),
    Zero,
    Absent,
}

/// The fields of a sparse extent header this reader uses.
#[derive(Debug, Clone)]
pub(super) struct SparseHeader {
    pub(super) version: u32,
    pub(super) flags: u32,
    pub(super) capacity: u64,
    pub(super) grain_sectors: u64,
    pub(super) descriptor_sector: u64,
    pub(super) descriptor_sectors: u64,
    pub(super) gtes_per_gt: u32,
    pub(super) rgd_sector: u64,
    pub(super) gd_sector: u64,
    pub(super) overhead_sectors: u64,
    pub(super) compression: u16,
}

pub(super) struct SparseExtent {
    pub(super) file: crate::file_io::SourceFile,
    pub(super) path: PathBuf,
    pub(super) file_len: u64,
    pub(super) capacity: u64,
    pub(super) grain_sectors: u64,
    pub(super) gtes_per_gt: u64,
    pub(super) compressed: bool,
    pub(super) markers: bool,
    /// Grain directory: sector offsets of the grain tables.
    pub(super) directory: Vec<u32>,
    pub(super) tables: TableCache<u32>,
}

pub(super) fn parse_sparse_header(raw: &[u8; SECTOR_SIZE]) -> SparseHeader {
    SparseHeader {
        version: LittleEndian::read_u32(&raw[VERSION_AT..]),
        flags: LittleEndian::read_u32(&raw[FLAGS_AT..]),
        capacity: LittleEndian::read_u64(&raw[CAPACITY_AT..]),
        grain_sectors: LittleEndian::read_u64(&raw[GRAIN_SECTORS_AT..]),
        descriptor_sector: LittleEndian::read_u64(&raw[DESCRIPTOR_SECTOR_AT..]),
        descriptor_sectors: LittleEndian::read_u64(&raw[DESCRIPTOR_SECTORS_AT..]),
        gtes_per_gt: LittleEndian::read_u32(&raw[GTES_PER_GT_AT..]),
        rgd_sector: LittleEndian::read_u64(&raw[RGD_SECTOR_AT..]),
        gd_sector: LittleEndian::read_u64(&raw[GD_SECTOR_AT..]),
        overhead_sectors: LittleEndian::read_u64(&raw[OVERHEAD_SECTORS_AT..]),
        compression: LittleEndian::read_u16(&raw[COMPRESSION_AT..]),
    }
}

/// The 512-byte header (or stream-optimized footer) holding `header`'s
/// fields, with the newline check characters and a clean-shutdown mark.
pub(super) fn build_sparse_header(header: &SparseHeader) -> [u8; SECTOR_SIZE] {
    let mut raw = [0u8; SECTOR_SIZE];
    raw[..4].copy_from_slice(&SPARSE_MAGIC);
    LittleEndian::write_u32(&mut raw[VERSION_AT..], header.version);
    LittleEndian::write_u32(&mut raw[FLAGS_AT..], header.flags);
    LittleEndian::write_u64(&mut raw[CAPACITY_AT..], header.capacity);
    LittleEndian::write_u64(&mut raw[GRAIN_SECTORS_AT..], header.grain_sectors);
    LittleEndian::write_u64(&mut raw[DESCRIPTOR_SECTOR_AT..], header.descriptor_sector);
    LittleEndian::write_u64(&mut raw[DESCRIPTOR_SECTORS_AT..], header.descriptor_sectors);
    LittleEndian::write_u32(&mut raw[GTES_PER_GT_AT..], header.gtes_per_gt);
    LittleEndian::write_u64(&mut raw[RGD_SECTOR_AT..], header.rgd_sector);
    LittleEndian::write_u64(&mut raw[GD_SECTOR_AT..], header.gd_sector);
    LittleEndian::write_u64(&mut raw[OVERHEAD_SECTORS_AT..], header.overhead_sectors);
    raw[NEWLINE_CHECK_AT..NEWLINE_CHECK_AT + 4].copy_from_slice(&NEWLINE_CHECK);
    LittleEndian::write_u16(&mut raw[COMPRESSION_AT..], header.compression);
    raw
}

/// Reads a sparse extent header, taking the footer copy when the header
/// defers the grain directory to the end of a stream-optimized file.
pub(super) fn read_sparse_header(file: &File, path: &Path, file_len: u64) -> Result<SparseHeader> {
    let corrupt = |what: String| {
        Error::corrupt(format!(
            "{}: VMDK sparse extent header: {what}",
            path.display()
        ))
    };
    let mut raw = [0u8; SECTOR_SIZE];
    if file_len < SECTOR_BYTES {
        return Err(corrupt(format!("file is only {file_len} bytes long")));
    }
    file.read_exact_at(&mut raw, 0)
        .map_err(|e| Error::read(&format!("{} header", name(path)), 0, e))?;
    if raw[..4] != SPARSE_MAGIC {
        return Err(corrupt("bad magic at byte offset 0".into()));
    }
    let version = LittleEndian::read_u32(&raw[VERSION_AT..]);
    if !(1..=3).contains(&version) {
        return Err(Error::unsupported(format!(
            "{}: VMDK sparse extent version {version} (only 1 to 3 are read)",
            path.display()
        )));
    }
    let mut header = parse_sparse_header(&raw);
    if header.gd_sector == GD_AT_END {
        // Stream-optimized layout: footer, footer marker payload... the
        // footer header sits 1024 bytes before the end of the file.
        let footer_at = file_len
            .checked_sub(2 * SECTOR_BYTES)
            .filter(|at| *at >= SECTOR_BYTES)
            .ok_or_else(|| {
                corrupt("grain directory is at the end but there is no footer".into())
            })?;
        let mut footer = [0u8; SECTOR_SIZE];
        file.read_exact_at(&mut footer, footer_at)
            .map_err(|e| Error::read(&format!("{} footer", name(path)), footer_at, e))?;
        if footer[..4] != SPARSE_MAGIC {
            return Err(corrupt(format!(
                "footer at byte offset {footer_at} has a bad magic"
            )));
        }
        header = parse_sparse_header(&footer);
        if header.gd_sector == GD_AT_END {
            return Err(corrupt(format!(
                "footer at byte offset {footer_at} does not locate the grain directory"
            )));
        }
    }
    validate_sparse_header(&header, file_len).map_err(corrupt)?;
    if header.flags & FLAG_COMPRESSED != 0 && header.compression != COMPRESSION_DEFLATE {
        return Err(Error::unsupported(format!(
            "{}: VMDK grain compression algorithm {} (only deflate, 1)",
            path.display(),
            header.compression
        )));
    }
    Ok(header)
}

pub(super) fn validate_sparse_header(
    h: &SparseHeader,
    file_len: u64,
) -> std::result::Result<(), String> {
    if h.grain_sectors == 0
        || !h.grain_sectors.is_power_of_two()
        || h.grain_sectors > MAX_GRAIN_SECTORS
    {
        return Err(format!(
            "grain size of {} sectors (byte offset 20) is not a power of two up to {MAX_GRAIN_SECTORS}",
            h.grain_sectors
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(format!(
            "{} grain table entries per table (byte offset 44); expected 1..={MAX_GTES_PER_GT}",
            h.gtes_per_gt
        ));
    }
    if h.capacity.checked_mul(SECTOR_BYTES).is_none() {
        return Err(format!("capacity of {} sectors is absurd", h.capacity));
    }
    let table_span = h.grain_sectors * u64::from(h.gtes_per_gt);
    let directory_bytes = h.capacity.div_ceil(table_span) * 4;
    let fits = h
        .gd_sector
        .checked_mul(SECTOR_BYTES)
        .and_then(|start| start.checked_add(directory_bytes))
        .is_some_and(|end| end <= file_len);
    if h.gd_sector == 0 || !fits {
        return Err(format!(
            "grain directory at sector {} ({directory_bytes} bytes) is not inside the {file_len}-byte file",
            h.gd_sector
        ));
    }
    Ok(())
}

impl SparseExtent {
    pub(super) fn new(
        file: crate::file_io::SourceFile,
        path: &Path,
        file_len: u64,
        header: SparseHeader,
    ) -> Result<SparseExtent> {
        let gtes_per_gt = u64::from(header.gtes_per_gt);
        let entries = header.capacity.div_ceil(header.grain_sectors * gtes_per_gt);
        // Bounded by the file size (checked in validate_sparse_header).
        let mut raw = vec![0u8; (entries * 4) as usize];
        let at = header.gd_sector * SECTOR_BYTES;
        file.read_exact_at(&mut raw, at)
            .map_err(|e| Error::read(&format!("{} grain directory", name(path)), at, e))?;
        let directory: Vec<u32> = raw.chunks_exact(4).map(LittleEndian::read_u32).collect();
        // Every grain table the directory names must lie inside the file, so
        // a damaged directory fails at open rather than mid-read.
        let table_bytes = gtes_per_gt * 4;
        for (index, table) in directory.iter().enumerate() {
            let table_at = u64::from(*table) * SECTOR_BYTES;
            if *table != 0 && table_at + table_bytes > file_len {
                return Err(Error::corrupt(format!(
                    "{}: grain directory entry {index} (directory at byte offset {at}) points at a \
                     grain table at byte offset {table_at}, past the end of the {file_len}-byte file",
                    path.display()
                )));
            }
        }
        Ok(SparseExtent {
            file,
            path: path.to_path_buf(),
            file_len,
            capacity: header.capacity,
            grain_sectors: header.grain_sectors,
            gtes_per_gt,
            compressed: header.flags & FLAG_COMPRESSED != 0,
            markers: header.flags & FLAG_MARKERS != 0,
            directory,
            tables: TableCache::new(GT_CACHE_TABLES),
        })
    }

    pub(super) fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// What holds local sector `sector`, and the end (exclusive, in
    /// sectors) of the region from it that is uniformly so: a whole table's
    /// span when the directory has no table, else the following grains of
    /// the same table that continue it, looking no further than `want_end`.
    pub(super) fn lookup(&self, sector: u64, want_end: u64) -> Result<(Unit, u64)> {
        let grain = sector / self.grain_sectors;
        let table_index = grain / self.gtes_per_gt;
        let table_span = self.grain_sectors * self.gtes_per_gt;
        let table_sector = *self.directory.get(table_index as usize).ok_or_else(|| {
            Error::internal(format!(
                "{}: sector {sector} past the grain directory",
                self.describe()
            ))
        })?;
        if table_sector == 0 {
            return Ok((Unit::Absent, (table_index + 1) * table_span));
        }
        let compressed = self.compressed;
        let grain_sectors = self.grain_sectors;
        let grain_bytes = grain_sectors * SECTOR_BYTES;
        let table_first_grain = table_index * self.gtes_per_gt;
        let classify = |entry: u32| match entry {
            0 => Unit::Absent,
            GRAIN_ZERO => Unit::Zero,
            at if compressed => Unit::Compressed(u64::from(at)),
            at => Unit::Data(u64::from(at) * SECTOR_BYTES),
        };
        let table = self.grain_table(table_index, table_sector)?;
        let within = (grain - table_first_grain) as usize;
        let first = classify(table[within]);
        let mut next = within + 1;
        if !matches!(first, Unit::Compressed(_)) {
            while next < table.len() && (table_first_grain + next as u64) * grain_sectors < want_end
            {
                let distance = (next - within) as u64 * grain_bytes;
                let continues = match (first, classify(table[next])) {
                    (Unit::Data(at), Unit::Data(next_at)) => next_at == at + distance,
                    (Unit::Zero, Unit::Zero) | (Unit::Absent, Unit::Absent) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                next += 1;
            }
        }
        let unit = match first {
            Unit::Data(at) => Unit::Data(at + (sector % grain_sectors) * SECTOR_BYTES),
            other => other,
        };
        Ok((unit, (table_first_grain + next as u64) * grain_sectors))
    }

    pub(super) fn grain_table(&self, table_index: u64, table_sector: u32) -> Result<Arc<[u32]>> {
        if let Some(table) = self.tables.get(table_index) {
            return Ok(table);
        }
        {
            let at = u64::from(table_sector) * SECTOR_BYTES;
            let bytes = self.gtes_per_gt * 4;
            if at + bytes > self.file_len {
                return Err(Error::corrupt(format!(
                    "{}: grain directory entry {table_index} points at a grain table at byte offset {at}, \
                     past the end of the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            let mut raw = vec![0u8; bytes as usize];
            self.file
                .read_exact_at(&mut raw, at)
                .map_err(|e| Error::read(&format!("{} grain table", self.describe()), at, e))?;
            Ok(self.tables.insert(
                table_index,
                raw.chunks_exact(4).map(LittleEndian::read_u32).collect(),
            ))
        }
    }

    /// Inflates the compressed grain that starts at local sector
    /// `grain_start` and whose data (or marker) is at sector `at`.
    pub(super) fn inflate_grain(&self, at: u64, grain_start: u64) -> Result<Vec<u8>> {
        let grain_bytes = self.grain_sectors * SECTOR_BYTES;
        let offset = at * SECTOR_BYTES;
        let bad = |what: String| {
            Error::corrupt(format!(
                "{}: compressed grain at byte offset {offset}: {what}",
                self.describe()
            ))
        };
        if offset >= self.file_len {
            return Err(bad(format!(
                "past the end of the {}-byte file",
                self.file_len
            )));
        }
        // A compressed grain never needs much more room than the grain
        // itself; anything longer is not a real stream.
        let max_stored = grain_bytes * 2 + SECTOR_BYTES;
        let (data_at, stored) = if self.markers {
            let mut marker = [0u8; MARKER_HEADER as usize];
            if offset + MARKER_HEADER > self.file_len {
                return Err(bad("grain marker is cut off by the end of the file".into()));
            }
            self.file.read_exact_at(&mut marker, offset).map_err(|e| {
                Error::read(&format!("{} grain marker", self.describe()), offset, e)
            })?;
            let lba = LittleEndian::read_u64(&marker[0..]);
            let size = u64::from(LittleEndian::read_u32(&marker[8..]));
            if lba != grain_start {
                return Err(bad(format!(
                    "marker names sector {lba}, but the grain table maps sector {grain_start} here"
                )));
            }
            if size == 0 || size > max_stored || offset + MARKER_HEADER + size > self.file_len {
                return Err(bad(format!(
                    "marker declares an invalid size of {size} bytes"
                )));
            }
            (offset + MARKER_HEADER, size)
        } else {
            (offset, max_stored.min(self.file_len - offset))
        };
        let mut input = vec![0u8; stored as usize];
        self.file.read_exact_at(&mut input, data_at).map_err(|e| {
            Error::read(&format!("{} compressed grain", self.describe()), data_at, e)
        })?;
        // Only the part of the grain inside the extent has to be present.
        let needed = (self.capacity - grain_start).min(self.grain_sectors) * SECTOR_BYTES;
        let mut output = vec![0u8; grain_bytes as usize];
        inflate_exact(&input, &mut output[..needed as usize], true).map_err(bad)?;
        Ok(output)
    }
}
