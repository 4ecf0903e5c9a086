//! Writing a dynamic VHDX: [`VhdxWriter`], the [`ImageWriter`] the clone
//! driver (src/clone.rs) feeds with pages. The layouts (headers, region
//! table, metadata, BAT states) are the reader's, in `header.rs`,
//! `metadata.rs` and `bat.rs`.
//!
//! The file as written:
//!
//! | from | what |
//! | --- | --- |
//! | 0 | file type identifier (`vhdxfile`, creator "cowdisk") |
//! | 64 KiB, 128 KiB | the two headers, sequence numbers 1 and 2, log GUID zero (clean: nothing to replay) |
//! | 192 KiB, 256 KiB | the region table and its copy: BAT and metadata, both required |
//! | 1 MiB | the log: 1 MiB of zeros (empty) |
//! | 2 MiB | the metadata region (1 MiB) |
//! | 3 MiB | the BAT region (whole MiBs) |
//! | after | payload blocks, in the order their data came |
//!
//! Block size: 1 MiB, the smallest the format allows and the clone's page,
//! so a block is stored exactly where a page held data and the file is as
//! small as the clone's own granularity makes it (Microsoft also recommends
//! 1 MiB blocks for Linux guests for this reason). Larger disks double it
//! until the BAT stays at most [`MAX_PAYLOAD_BLOCKS`] entries (32 MiB of
//! BAT, reached past 4 TiB), keeping the table, held in memory while
//! writing, bounded: 64 TiB, the format's largest disk, gets 16 MiB blocks.
//!
//! Blocks no page reached are in state PAYLOAD_BLOCK_ZERO: the one state
//! whose reads the specification defines as zeros in a dynamic image (a
//! not-present block "may return arbitrary data"). A block some page
//! reached is stored whole, zero-filled around the pages, FULLY_PRESENT.
//! Sector bitmap entries are all SB_BLOCK_NOT_PRESENT, as a dynamic image
//! requires. The logical sector is 512 bytes (the size every disk we read
//! reports) and the physical sector 4096, Hyper-V's own default for new
//! VHDX files; an odd byte size is rounded up to whole sectors, which read
//! as zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::bat::{PAYLOAD_FULLY_PRESENT, PAYLOAD_ZERO};
use super::header::{
    build_file_identifier, build_header, build_region_table, Header, Regions, HEADER_OFFSETS,
    REGION_TABLE_OFFSETS,
};
use super::metadata::{build_metadata, NewMetadata};
use super::MIB;
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::writer::{write_in_pieces, ImageWriter};

/// The log, empty, right after the header section.
const LOG_OFFSET: u64 = MIB;
const LOG_BYTES: u64 = MIB;
const METADATA_OFFSET: u64 = LOG_OFFSET + LOG_BYTES;
const METADATA_BYTES: u64 = MIB;
const BAT_OFFSET: u64 = METADATA_OFFSET + METADATA_BYTES;
/// The specification's largest virtual disk.
pub const MAX_VIRTUAL_BYTES: u64 = 64 << 40;
/// Blocks grow past 1 MiB only to keep the BAT at most this many payload
/// entries.
pub const MAX_PAYLOAD_BLOCKS: u64 = 1 << 22;
const MIN_BLOCK_BYTES: u64 = MIB;
const LOGICAL_SECTOR_BYTES: u64 = SECTOR_BYTES;
const PHYSICAL_SECTOR_BYTES: u32 = 4096;
/// Sectors one sector bitmap block describes (2^23), which sets the chunk
/// ratio: payload blocks per sector bitmap entry.
const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
const CREATOR: &str = concat!("cowdisk ", env!("CARGO_PKG_VERSION"));

/// The block size the writer picks for a disk of `virtual_bytes`.
pub fn block_bytes_for(virtual_bytes: u64) -> u64 {
    let mut block = MIN_BLOCK_BYTES;
    while virtual_bytes.div_ceil(block) > MAX_PAYLOAD_BLOCKS {
        block *= 2;
    }
    block
}

/// The layout of a dynamic VHDX being written.
#[derive(Debug, Clone)]
struct Layout {
    virtual_bytes: u64,
    block_bytes: u64,
    chunk_ratio: u64,
    /// Payload and sector bitmap entries, interleaved as on disk.
    bat: Vec<u64>,
    bat_region_bytes: u64,
    data_offset: u64,
    allocated: u64,
}

impl Layout {
    fn new(virtual_bytes: u64, what: &str) -> Result<Layout> {
        if virtual_bytes == 0 || virtual_bytes > MAX_VIRTUAL_BYTES {
            return Err(Error::unsupported(format!(
                "{what}: a VHDX holds a disk of 1 byte to 64 TiB, not {virtual_bytes} bytes"
            )));
        }
        let virtual_bytes = virtual_bytes.div_ceil(LOGICAL_SECTOR_BYTES) * LOGICAL_SECTOR_BYTES;
        let block_bytes = block_bytes_for(virtual_bytes);
        let chunk_ratio = SECTORS_PER_BITMAP_BLOCK * LOGICAL_SECTOR_BYTES / block_bytes;
        let payload = virtual_bytes.div_ceil(block_bytes);
        // Room for the sector bitmap entry after every full chunk and after
        // the last, partial one: a reader may ask for either formula.
        let entries = payload + payload.div_ceil(chunk_ratio);
        let mut bat = vec![0u64; entries as usize];
        for block in 0..payload {
            bat[(block + block / chunk_ratio) as usize] = PAYLOAD_ZERO;
        }
        let bat_region_bytes = (entries * 8).div_ceil(MIB) * MIB;
        Ok(Layout {
            virtual_bytes,
            block_bytes,
            chunk_ratio,
            bat,
            bat_region_bytes,
            data_offset: BAT_OFFSET + bat_region_bytes,
            allocated: 0,
        })
    }

    /// Stores payload block `block` at the next free place; returns that
    /// file offset.
    fn allocate(&mut self, block: u64) -> u64 {
        let offset = self.data_offset + self.allocated * self.block_bytes;
        self.allocated += 1;
        // Offsets are whole MiBs: the data area starts on one and blocks
        // are whole MiBs long.
        self.bat[(block + block / self.chunk_ratio) as usize] =
            (offset / MIB) << 20 | PAYLOAD_FULLY_PRESENT;
        offset
    }

    fn file_len(&self) -> u64 {
        self.data_offset + self.allocated * self.block_bytes
    }

    fn bat_bytes(&self) -> Vec<u8> {
        self.bat.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    fn regions(&self) -> Regions {
        Regions {
            bat: (BAT_OFFSET, self.bat_region_bytes),
            metadata: (METADATA_OFFSET, METADATA_BYTES),
        }
    }

    fn metadata(&self, page83: [u8; 16]) -> NewMetadata {
        NewMetadata {
            // At most 256 MiB by construction (64 TiB / 2^22 = 16 MiB).
            block_bytes: self.block_bytes as u32,
            virtual_bytes: self.virtual_bytes,
            logical_sector_bytes: LOGICAL_SECTOR_BYTES as u32,
            physical_sector_bytes: PHYSICAL_SECTOR_BYTES,
            page83,
        }
    }

    /// Both headers: the same fields, the second with the higher sequence
    /// number (so it is current; either alone is valid).
    fn headers(&self, file_write_guid: [u8; 16], data_write_guid: [u8; 16]) -> [Vec<u8>; 2] {
        let header = |sequence| Header {
            sequence,
            file_write_guid,
            data_write_guid,
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: LOG_BYTES as u32,
            log_offset: LOG_OFFSET,
        };
        [build_header(&header(1)), build_header(&header(2))]
    }
}

/// Writes a dynamic VHDX: each data page fills (part of) one block, which
/// is stored whole once the pages move past it.
pub struct VhdxWriter {
    layout: Layout,
    block: Vec<u8>,
    block_index: Option<u64>,
    what: String,
}

impl VhdxWriter {
    /// A writer for a disk of `virtual_bytes` (1 byte to 64 TiB); `what`
    /// names the file.
    pub fn new(virtual_bytes: u64, what: &str) -> Result<VhdxWriter> {
        Ok(VhdxWriter {
            layout: Layout::new(virtual_bytes, what)?,
            block: Vec::new(),
            block_index: None,
            what: what.to_string(),
        })
    }

    /// The block size this writer uses.
    pub fn block_bytes(&self) -> u64 {
        self.layout.block_bytes
    }

    fn store_block(&mut self, file: &File) -> Result<()> {
        if let Some(index) = self.block_index.take() {
            let offset = self.layout.allocate(index);
            write_in_pieces(file, &self.block, offset, &self.what)?;
        }
        Ok(())
    }

    fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> Result<()> {
        file.write_all_at(bytes, offset)
            .map_err(|e| Error::write(&self.what, offset, e))
    }
}

impl ImageWriter for VhdxWriter {
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let block_bytes = self.layout.block_bytes;
        let index = offset / block_bytes;
        let within = (offset % block_bytes) as usize;
        let end = offset + data.len() as u64;
        if end > self.layout.virtual_bytes || within + data.len() > block_bytes as usize {
            return Err(Error::internal(format!(
                "{}: {} bytes at virtual offset {offset} do not fit one block of the \
                 {}-byte disk",
                self.what,
                data.len(),
                self.layout.virtual_bytes
            )));
        }
        if self.block_index != Some(index) {
            self.store_block(file)?;
            self.block_index = Some(index);
            self.block.clear();
            self.block.resize(block_bytes as usize, 0);
        }
        self.block[within..within + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        self.store_block(file)?;
        let layout = &self.layout;
        let page83 = *uuid::Uuid::new_v4().as_bytes();
        self.write_at(
            file,
            &build_metadata(&layout.metadata(page83)),
            METADATA_OFFSET,
        )?;
        write_in_pieces(file, &layout.bat_bytes(), BAT_OFFSET, &self.what)?;
        let table = build_region_table(&layout.regions());
        for at in REGION_TABLE_OFFSETS {
            self.write_at(file, &table, at)?;
        }
        let headers = layout.headers(
            *uuid::Uuid::new_v4().as_bytes(),
            *uuid::Uuid::new_v4().as_bytes(),
        );
        for (header, at) in headers.iter().zip(HEADER_OFFSETS) {
            self.write_at(file, header, at)?;
        }
        self.write_at(file, &build_file_identifier(CREATOR), 0)?;
        // The log and the unused parts of the regions stay holes: zeros.
        let end = layout.file_len();
        file.set_len(end)
            .map_err(|e| Error::write(&self.what, end, e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::{read_header, read_region_table};
    use super::super::log::FileView;
    use super::super::metadata::read_metadata;
    use super::*;

    #[test]
    fn block_size_stays_1_mib_up_to_4_tib() {
        assert_eq!(block_bytes_for(1), MIB);
        assert_eq!(block_bytes_for(4 << 40), MIB);
        assert_eq!(block_bytes_for((4 << 40) + 1), 2 * MIB);
        assert_eq!(block_bytes_for(MAX_VIRTUAL_BYTES), 16 * MIB);
    }

    #[test]
    fn headers_region_table_and_metadata_parse_with_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.vhdx");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut writer = VhdxWriter::new(5 * MIB + 512, "x").unwrap();
        writer.write_data(&file, 2 * MIB, &[7u8; 4096]).unwrap();
        writer.finish(&file).unwrap();

        let header = read_header(&file, "x").unwrap();
        assert_eq!(header.sequence, 2);
        assert_eq!(header.version, 1);
        assert_eq!(header.log_guid, [0; 16]);
        assert_eq!((header.log_offset, header.log_length), (MIB, MIB as u32));
        let len = file.metadata().unwrap().len();
        let view = FileView::new(file, "x".into(), len);
        let regions = read_region_table(&view).unwrap();
        assert_eq!(regions.bat, (BAT_OFFSET, MIB));
        assert_eq!(regions.metadata, (METADATA_OFFSET, MIB));
        let metadata = read_metadata(&view, regions.metadata).unwrap();
        assert_eq!(metadata.block_bytes, MIB);
        assert_eq!(metadata.virtual_bytes, 5 * MIB + 512);
        assert_eq!(metadata.logical_sector_bytes, 512);
        assert!(metadata.page83.is_some());
        // One 1 MiB block stored after the 1 MiB BAT region.
        assert_eq!(len, BAT_OFFSET + MIB + MIB);
    }
}
