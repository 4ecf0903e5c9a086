//! Writing a VMDK: [`VmdkWriter`], the [`ImageWriter`] the clone driver
//! (src/clone.rs) feeds with pages, for the two one-file variants. The
//! header layout, flags and markers are the reader's (`sparse.rs`), the
//! descriptor text is made next to its parser (`descriptor.rs`).
//!
//! Both variants: one hosted sparse extent of 64 KiB grains (128 sectors),
//! 512 entries per grain table (so one table covers 32 MiB), the descriptor
//! embedded at sector 1 (20 sectors reserved). Of each data page, only the
//! grains that hold a non-zero byte are stored; every other grain's table
//! entry is 0 (unallocated, which reads as zeros in a disk without a
//! parent). A last grain that passes the disk's end is stored whole,
//! zero-padded. An odd byte size is rounded up to whole sectors.
//!
//! **monolithicSparse** (version 1; flags: newline check, redundant grain
//! directory): header, descriptor, the redundant grain directory and all
//! its grain tables, the primary directory and all its tables, padding to
//! a grain boundary (the header's overhead), then the grains in the order
//! their data came. Every table is allocated, as VMware's hosted products
//! and QEMU expect to write into any of them, but only tables that map a
//! grain are written: the others are holes in the file, so a large empty
//! disk costs apparent size (4 KiB per 32 MiB) but no disk space.
//!
//! **streamOptimized** (version 3, which current ESXi requires; flags:
//! newline check, compressed grains, markers; deflate in zlib format): the
//! header with the grain directory offset all ones ("in the footer"), the
//! descriptor, padding to a grain boundary, then for each grain with data
//! a grain marker (its first sector u64, the compressed length u32) and the
//! zlib stream, padded to a sector; after the grains of each 32 MiB span a
//! grain-table marker and the table (tables without grains are not written
//! and their directory entry is 0), then a grain-directory marker and the
//! directory, a footer marker and the footer (the header with the real
//! directory offset) and the end-of-stream marker: the layout OVA packages
//! carry, readable in one pass.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian};
use flate2::write::ZlibEncoder;
use flate2::Compression;

use super::descriptor::{build_descriptor, NewDescriptor};
use super::sparse::{
    build_sparse_header, SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS,
    FLAG_NEWLINE_CHECK, FLAG_REDUNDANT_GD, GD_AT_END, MARKER_EOS, MARKER_FOOTER, MARKER_GD,
    MARKER_GT, MARKER_HEADER, MARKER_TYPE_AT,
};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::writer::{write_in_pieces, ImageWriter};

/// Grain size in sectors (64 KiB), VMware's own.
const GRAIN_SECTORS: u64 = 128;
const GRAIN_BYTES: usize = (GRAIN_SECTORS * SECTOR_BYTES) as usize;
/// Entries per grain table, fixed by the format.
const GTES_PER_GT: u64 = 512;
const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR_BYTES;
const DESCRIPTOR_SECTOR: u64 = 1;
const DESCRIPTOR_SECTORS: u64 = 20;
/// The largest disk written: VMware's own limit is 62 TB; this bounds the
/// grain directory held in memory.
pub const MAX_VIRTUAL_BYTES: u64 = 64 << 40;
/// Grain and table offsets are u32 sectors: the file ends before 2 TiB.
const MAX_FILE_SECTORS: u64 = 1 << 32;

/// The two one-file VMDK variants the writer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmdkVariant {
    /// `monolithicSparse`: uncompressed grains, redundant grain directory.
    MonolithicSparse,
    /// `streamOptimized`: deflated grains with markers, directory in the
    /// footer.
    StreamOptimized,
}

impl VmdkVariant {
    fn create_type(self) -> &'static str {
        match self {
            VmdkVariant::MonolithicSparse => "monolithicSparse",
            VmdkVariant::StreamOptimized => "streamOptimized",
        }
    }
}

/// Where the monolithicSparse metadata lies, in sectors.
#[derive(Debug, Clone, Copy)]
struct SparseLayout {
    rgd: u64,
    rgt: u64,
    gd: u64,
    gt: u64,
}

/// Writes a monolithicSparse or streamOptimized VMDK.
pub struct VmdkWriter {
    variant: VmdkVariant,
    what: String,
    file_name: String,
    capacity: u64,
    /// Grain directory entries (one per grain table).
    tables: u64,
    /// monolithicSparse only.
    sparse: Option<SparseLayout>,
    /// The grain tables that map at least one grain (monolithicSparse: all
    /// of them until the finish; streamOptimized: the current one only).
    grain_tables: BTreeMap<u64, Vec<u32>>,
    /// streamOptimized: sector of each written grain table (0 = none).
    directory: Vec<u32>,
    /// The first sector of grain data (the header's overhead).
    overhead: u64,
    /// The next free sector.
    next_sector: u64,
    buffer: Vec<u8>,
}

impl VmdkWriter {
    /// A writer for a disk of `virtual_bytes` (1 byte to 64 TiB); `what`
    /// names the file, whose file name the descriptor's extent line uses.
    pub fn new(virtual_bytes: u64, variant: VmdkVariant, what: &str) -> Result<VmdkWriter> {
        if virtual_bytes == 0 || virtual_bytes > MAX_VIRTUAL_BYTES {
            return Err(Error::unsupported(format!(
                "{what}: this VMDK writer holds a disk of 1 byte to 64 TiB, not {virtual_bytes} \
                 bytes"
            )));
        }
        let capacity = virtual_bytes.div_ceil(SECTOR_BYTES);
        let tables = capacity.div_ceil(GRAIN_SECTORS * GTES_PER_GT);
        let directory_sectors = (tables * 4).div_ceil(SECTOR_BYTES);
        let after_descriptor = DESCRIPTOR_SECTOR + DESCRIPTOR_SECTORS;
        let (sparse, metadata_end) = match variant {
            VmdkVariant::MonolithicSparse => {
                let rgd = after_descriptor;
                let rgt = rgd + directory_sectors;
                let gd = rgt + tables * GT_SECTORS;
                let gt = gd + directory_sectors;
                (
                    Some(SparseLayout { rgd, rgt, gd, gt }),
                    gt + tables * GT_SECTORS,
                )
            }
            VmdkVariant::StreamOptimized => (None, after_descriptor),
        };
        let overhead = metadata_end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        let file_name = Path::new(what)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| what.to_string());
        Ok(VmdkWriter {
            variant,
            what: what.to_string(),
            file_name,
            capacity,
            tables,
            sparse,
            grain_tables: BTreeMap::new(),
            directory: match variant {
                // At most 2^21 entries (64 TiB / 32 MiB).
                VmdkVariant::StreamOptimized => vec![0; tables as usize],
                VmdkVariant::MonolithicSparse => Vec::new(),
            },
            overhead,
            next_sector: overhead,
            buffer: Vec::new(),
        })
    }

    /// The header (at sector 0) or, with the directory's sector, the
    /// stream-optimized footer.
    fn header(&self, gd_sector: u64) -> SparseHeader {
        let (version, flags, rgd_sector, compression) = match (self.variant, self.sparse) {
            (VmdkVariant::MonolithicSparse, Some(layout)) => {
                (1, FLAG_NEWLINE_CHECK | FLAG_REDUNDANT_GD, layout.rgd, 0)
            }
            _ => (
                3,
                FLAG_NEWLINE_CHECK | FLAG_COMPRESSED | FLAG_MARKERS,
                0,
                COMPRESSION_DEFLATE,
            ),
        };
        SparseHeader {
            version,
            flags,
            capacity: self.capacity,
            grain_sectors: GRAIN_SECTORS,
            descriptor_sector: DESCRIPTOR_SECTOR,
            descriptor_sectors: DESCRIPTOR_SECTORS,
            gtes_per_gt: GTES_PER_GT as u32,
            rgd_sector,
            gd_sector,
            overhead_sectors: self.overhead,
            compression,
        }
    }

    /// Reserves `sectors` at the end of the file; refuses to pass the
    /// largest offset a table entry can hold.
    fn take_sectors(&mut self, sectors: u64) -> Result<u64> {
        let at = self.next_sector;
        if at + sectors > MAX_FILE_SECTORS {
            return Err(Error::unsupported(format!(
                "{}: the VMDK would grow past 2 TiB, the largest offset its grain tables \
                 can hold",
                self.what
            )));
        }
        self.next_sector += sectors;
        Ok(at)
    }

    /// Writes the pending stream-optimized grain table behind its marker.
    fn flush_stream_table(&mut self, file: &File) -> Result<()> {
        let Some((table, entries)) = self.grain_tables.pop_first() else {
            return Ok(());
        };
        let at = self.take_sectors(1 + GT_SECTORS)?;
        let mut bytes = metadata_marker(GT_SECTORS, MARKER_GT);
        bytes.extend(entries.iter().flat_map(|e| e.to_le_bytes()));
        self.write_at(file, &bytes, at * SECTOR_BYTES)?;
        // Checked by take_sectors: below 2^32.
        self.directory[table as usize] = (at + 1) as u32;
        Ok(())
    }

    fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> Result<()> {
        file.write_all_at(bytes, offset)
            .map_err(|e| Error::write(&self.what, offset, e))
    }

    fn write_descriptor(&self, file: &File) -> Result<()> {
        let text = build_descriptor(&NewDescriptor {
            create_type: self.variant.create_type(),
            sectors: self.capacity,
            file_name: &self.file_name,
            cid: rand_u32(),
            uuid: *uuid::Uuid::new_v4().as_bytes(),
        });
        let room = (DESCRIPTOR_SECTORS * SECTOR_BYTES) as usize;
        if text.len() >= room {
            return Err(Error::invalid_argument(format!(
                "{}: the VMDK descriptor for file name '{}' needs {} bytes, more than the \
                 {room} reserved",
                self.what,
                self.file_name,
                text.len()
            )));
        }
        self.write_at(file, text.as_bytes(), DESCRIPTOR_SECTOR * SECTOR_BYTES)
    }

    fn finish_sparse(&mut self, file: &File, layout: SparseLayout) -> Result<()> {
        for (table, entries) in &self.grain_tables {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            for first in [layout.rgt, layout.gt] {
                let at = (first + table * GT_SECTORS) * SECTOR_BYTES;
                self.write_at(file, &bytes, at)?;
            }
        }
        for (directory, tables) in [(layout.rgd, layout.rgt), (layout.gd, layout.gt)] {
            // Every table is allocated: entry i names table i's sector
            // (below 2^32: the 64 TiB limit keeps the metadata within 2^25 sectors).
            let bytes: Vec<u8> = (0..self.tables)
                .flat_map(|i| ((tables + i * GT_SECTORS) as u32).to_le_bytes())
                .collect();
            write_in_pieces(file, &bytes, directory * SECTOR_BYTES, &self.what)?;
        }
        self.write_at(file, &build_sparse_header(&self.header(layout.gd)), 0)
    }

    fn finish_stream(&mut self, file: &File) -> Result<()> {
        self.flush_stream_table(file)?;
        let directory_sectors = (self.tables * 4).div_ceil(SECTOR_BYTES);
        let gd_marker = self.take_sectors(1 + directory_sectors)?;
        let mut bytes = metadata_marker(directory_sectors, MARKER_GD);
        bytes.extend(self.directory.iter().flat_map(|e| e.to_le_bytes()));
        bytes.resize(((1 + directory_sectors) * SECTOR_BYTES) as usize, 0);
        let footer_marker = self.take_sectors(3)?;
        bytes.extend(metadata_marker(1, MARKER_FOOTER));
        bytes.extend(build_sparse_header(&self.header(gd_marker + 1)));
        bytes.extend(metadata_marker(0, MARKER_EOS));
        debug_assert_eq!(
            gd_marker + bytes.len() as u64 / SECTOR_BYTES,
            footer_marker + 3
        );
        write_in_pieces(file, &bytes, gd_marker * SECTOR_BYTES, &self.what)?;
        self.write_at(file, &build_sparse_header(&self.header(GD_AT_END)), 0)
    }
}

impl ImageWriter for VmdkWriter {
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        if !offset.is_multiple_of(GRAIN_BYTES as u64)
            || offset + data.len() as u64 > self.capacity * SECTOR_BYTES
        {
            return Err(Error::internal(format!(
                "{}: {} bytes at virtual offset {offset} are not grain-aligned data inside \
                 the disk",
                self.what,
                data.len()
            )));
        }
        // The page's stored grains go to consecutive sectors: collected in
        // `buffer` from sector `first`, written in one go.
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut first = None;
        for (i, grain_data) in data.chunks(GRAIN_BYTES).enumerate() {
            if all_zero(grain_data) {
                continue;
            }
            let grain = offset / GRAIN_BYTES as u64 + i as u64;
            let table = grain / GTES_PER_GT;
            if self.variant == VmdkVariant::StreamOptimized
                && self.grain_tables.keys().next().is_some_and(|t| *t != table)
            {
                // The table behind is complete: it follows its grains.
                if let Some(at) = first.take() {
                    write_in_pieces(file, &buffer, at * SECTOR_BYTES, &self.what)?;
                    buffer.clear();
                }
                self.flush_stream_table(file)?;
            }
            let start = buffer.len();
            match self.variant {
                VmdkVariant::MonolithicSparse => {
                    buffer.extend_from_slice(grain_data);
                    buffer.resize(start + GRAIN_BYTES, 0);
                }
                VmdkVariant::StreamOptimized => {
                    append_grain_marker(&mut buffer, grain * GRAIN_SECTORS, grain_data)
                        .map_err(|e| Error::write(&self.what, offset, e))?;
                }
            }
            let at = self.take_sectors((buffer.len() - start) as u64 / SECTOR_BYTES)?;
            first.get_or_insert(at);
            let entries = self
                .grain_tables
                .entry(table)
                .or_insert_with(|| vec![0; GTES_PER_GT as usize]);
            // Below 2^32: checked by take_sectors.
            entries[(grain % GTES_PER_GT) as usize] = at as u32;
        }
        if let Some(at) = first {
            write_in_pieces(file, &buffer, at * SECTOR_BYTES, &self.what)?;
        }
        self.buffer = buffer;
        Ok(())
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        self.write_descriptor(file)?;
        match self.sparse {
            Some(layout) => self.finish_sparse(file, layout)?,
            None => self.finish_stream(file)?,
        }
        let end = self.next_sector * SECTOR_BYTES;
        file.set_len(end)
            .map_err(|e| Error::write(&self.what, end, e))
    }
}

/// A one-sector metadata marker: `sectors` that follow, size 0, `kind`.
fn metadata_marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut marker = vec![0u8; SECTOR_BYTES as usize];
    LittleEndian::write_u64(&mut marker[0..], sectors);
    LittleEndian::write_u32(&mut marker[MARKER_TYPE_AT..], kind);
    marker
}

/// Appends a grain marker for the grain starting at virtual `sector` and
/// its zlib stream (the grain zero-padded to full size), padded to a
/// sector.
fn append_grain_marker(out: &mut Vec<u8>, sector: u64, data: &[u8]) -> std::io::Result<()> {
    let start = out.len();
    out.resize(start + MARKER_HEADER as usize, 0);
    let mut encoder = ZlibEncoder::new(std::mem::take(out), Compression::default());
    encoder.write_all(data)?;
    if data.len() < GRAIN_BYTES {
        encoder.write_all(&vec![0u8; GRAIN_BYTES - data.len()])?;
    }
    *out = encoder.finish()?;
    let compressed = out.len() - start - MARKER_HEADER as usize;
    LittleEndian::write_u64(&mut out[start..], sector);
    // A deflated 64 KiB grain is far below 4 GiB.
    LittleEndian::write_u32(&mut out[start + 8..], compressed as u32);
    let padded = out.len().div_ceil(SECTOR_BYTES as usize) * SECTOR_BYTES as usize;
    out.resize(padded, 0);
    Ok(())
}

fn all_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// A random content ID for the descriptor.
fn rand_u32() -> u32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    LittleEndian::read_u32(&bytes)
}

#[cfg(test)]
mod tests {
    use super::super::descriptor::parse_descriptor;
    use super::super::sparse::{parse_sparse_header, validate_sparse_header};
    use super::*;

    #[test]
    fn headers_and_descriptor_parse_with_the_reader() {
        let bytes = 3 * (1 << 30) + 100;
        for variant in [VmdkVariant::MonolithicSparse, VmdkVariant::StreamOptimized] {
            let writer = VmdkWriter::new(bytes, variant, "/images/my disk.vmdk").unwrap();
            let gd = writer.sparse.map_or(1000, |layout| layout.gd);
            let parsed = parse_sparse_header(&build_sparse_header(&writer.header(gd)));
            assert_eq!(parsed.capacity, bytes / 512 + 1);
            assert_eq!(parsed.grain_sectors, 128);
            assert_eq!(parsed.gtes_per_gt, 512);
            assert_eq!(parsed.gd_sector, gd);
            assert_eq!(parsed.descriptor_sector, 1);
            assert_eq!(parsed.overhead_sectors % 128, 0);
            validate_sparse_header(&parsed, 1 << 40).unwrap();
            let stream = variant == VmdkVariant::StreamOptimized;
            assert_eq!(parsed.flags & FLAG_COMPRESSED != 0, stream);
            assert_eq!(parsed.flags & FLAG_MARKERS != 0, stream);
            assert_eq!(parsed.version, if stream { 3 } else { 1 });
            if !stream {
                // 97 tables of 4 sectors, directories of 1 sector each.
                assert_eq!(parsed.rgd_sector, 21);
                assert_eq!(parsed.gd_sector, 21 + 1 + 97 * 4);
                assert_eq!(parsed.overhead_sectors, 896);
            }
            let text = build_descriptor(&NewDescriptor {
                create_type: variant.create_type(),
                sectors: parsed.capacity,
                file_name: &writer.file_name,
                cid: 7,
                uuid: [9; 16],
            });
            let descriptor = parse_descriptor(text.as_bytes(), Path::new("x")).unwrap();
            assert_eq!(
                descriptor.create_type.as_deref(),
                Some(variant.create_type())
            );
            assert_eq!(descriptor.uuid, Some([9; 16]));
            assert_eq!(descriptor.extents.len(), 1);
            assert_eq!(descriptor.extents[0].sectors, parsed.capacity);
            assert_eq!(descriptor.extents[0].kind, "SPARSE");
            assert_eq!(descriptor.extents[0].file.as_deref(), Some("my disk.vmdk"));
        }
    }
}
