//! The layout of a dynamic VDI image as the clone writer makes it: the
//! header (with the reader's field offsets, so there is one description of
//! the format), the block map and where data blocks go; and [`VdiWriter`],
//! the [`ImageWriter`] the clone driver (src/clone.rs) feeds with pages.

use super::{
    guid_to_rfc_bytes, BLOCKS_ALLOCATED_AT, BLOCK_COUNT_AT, BLOCK_FREE, BLOCK_MAP_OFFSET_AT,
    BLOCK_SIZE_AT, DATA_OFFSET_AT, DISK_SIZE_AT, HEADER_SIZE_AT, IMAGE_TYPE_AT, IMAGE_UUID_AT,
    MAX_BLOCK_MAP_ENTRIES, MODIFICATION_UUID_AT, SECTOR_SIZE_AT, SIGNATURE, SIGNATURE_AT,
    TYPE_DYNAMIC, VERSION_AT,
};
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::writer::{write_in_pieces, ImageWriter};

/// The text at the start of the file (informational; readers ignore it).
const TEXT: &[u8] = b"<<< cowdisk Virtual Disk Image >>>\n";
/// Version 1.1.
const VERSION: u32 = 0x0001_0001;
/// The size of a version 1.1 header after the pre-header.
const HEADER_SIZE: u32 = 0x190;
/// Where the block map starts: the first sector after the header.
const MAP_OFFSET: u64 = 0x200;
/// The data area starts on this boundary.
const DATA_ALIGN: u64 = 4096;

/// A dynamic VDI being written: `blocks` blocks of `block_bytes`.
#[derive(Debug, Clone)]
pub struct DynamicVdi {
    virtual_bytes: u64,
    block_bytes: u64,
    map: Vec<u32>,
    data_offset: u64,
    allocated: u32,
}

impl DynamicVdi {
    /// The layout for a disk of `virtual_bytes` in blocks of `block_bytes`
    /// (a multiple of 512). Refuses a block map larger than the reader
    /// accepts.
    pub fn new(virtual_bytes: u64, block_bytes: u64, what: &str) -> Result<DynamicVdi> {
        let blocks = virtual_bytes.div_ceil(block_bytes);
        if blocks > MAX_BLOCK_MAP_ENTRIES {
            return Err(Error::unsupported(format!(
                "{what}: a VDI image of {blocks} blocks of {block_bytes} bytes is larger than \
                 this writer makes ({MAX_BLOCK_MAP_ENTRIES} blocks)"
            )));
        }
        let map_bytes = blocks * 4;
        Ok(DynamicVdi {
            virtual_bytes,
            block_bytes,
            map: vec![BLOCK_FREE; blocks as usize],
            data_offset: (MAP_OFFSET + map_bytes).div_ceil(DATA_ALIGN) * DATA_ALIGN,
            allocated: 0,
        })
    }

    /// Allocates the next data block for virtual block `index` and returns
    /// the file offset its bytes go to.
    pub fn allocate(&mut self, index: usize) -> u64 {
        let offset = self.data_offset + u64::from(self.allocated) * self.block_bytes;
        self.map[index] = self.allocated;
        self.allocated += 1;
        offset
    }

    /// Where the block map goes, and its bytes.
    pub fn block_map(&self) -> (u64, Vec<u8>) {
        (
            MAP_OFFSET,
            self.map.iter().flat_map(|e| e.to_le_bytes()).collect(),
        )
    }

    /// The header sector (pre-header and header), with fresh image and
    /// modification UUIDs (`uuids` in RFC 4122 order).
    pub fn header(&self, image_uuid: [u8; 16], modification_uuid: [u8; 16]) -> Vec<u8> {
        let mut header = vec![0u8; MAP_OFFSET as usize];
        let mut put32 = |at: usize, v: u32| header[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(SIGNATURE_AT, SIGNATURE);
        put32(VERSION_AT, VERSION);
        put32(HEADER_SIZE_AT, HEADER_SIZE);
        put32(IMAGE_TYPE_AT, TYPE_DYNAMIC);
        put32(BLOCK_MAP_OFFSET_AT, MAP_OFFSET as u32);
        put32(DATA_OFFSET_AT, self.data_offset as u32);
        put32(SECTOR_SIZE_AT, SECTOR_BYTES as u32);
        put32(BLOCK_SIZE_AT, self.block_bytes as u32);
        put32(BLOCK_COUNT_AT, self.map.len() as u32);
        put32(BLOCKS_ALLOCATED_AT, self.allocated);
        header[..TEXT.len()].copy_from_slice(TEXT);
        header[DISK_SIZE_AT..DISK_SIZE_AT + 8].copy_from_slice(&self.virtual_bytes.to_le_bytes());
        // VDI stores GUIDs with the first three fields little-endian; the
        // swap is its own inverse.
        header[IMAGE_UUID_AT..IMAGE_UUID_AT + 16].copy_from_slice(&guid_to_rfc_bytes(&image_uuid));
        header[MODIFICATION_UUID_AT..MODIFICATION_UUID_AT + 16]
            .copy_from_slice(&guid_to_rfc_bytes(&modification_uuid));
        header
    }

    /// The file's length: through the data area's start even with no block.
    pub fn file_len(&self) -> u64 {
        self.data_offset + u64::from(self.allocated) * self.block_bytes
    }

    /// Data blocks allocated so far.
    pub fn allocated(&self) -> u32 {
        self.allocated
    }
}

/// Writes a dynamic VDI whose blocks are `block_bytes` long: each data
/// page fills (part of) one block, stored whole and zero-padded.
pub struct VdiWriter {
    layout: DynamicVdi,
    block: Vec<u8>,
    block_index: Option<u64>,
    what: String,
}

impl VdiWriter {
    /// A writer for a disk of `virtual_bytes` with blocks of `block_bytes`
    /// (a multiple of the clone page); `what` names the file.
    pub fn new(virtual_bytes: u64, block_bytes: u64, what: &str) -> Result<VdiWriter> {
        Ok(VdiWriter {
            layout: DynamicVdi::new(virtual_bytes, block_bytes, what)?,
            block: Vec::new(),
            block_index: None,
            what: what.to_string(),
        })
    }

    /// Stores the block collected so far, if any.
    fn store_block(&mut self, file: &File) -> Result<()> {
        if let Some(index) = self.block_index.take() {
            let offset = self.layout.allocate(index as usize);
            self.block.resize(self.layout.block_bytes as usize, 0);
            write_in_pieces(file, &self.block, offset, &self.what)?;
            self.block.clear();
        }
        Ok(())
    }
}

impl ImageWriter for VdiWriter {
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let block_bytes = self.layout.block_bytes;
        let index = offset / block_bytes;
        if self.block_index != Some(index) {
            self.store_block(file)?;
            self.block_index = Some(index);
            self.block.clear();
            self.block.resize(block_bytes as usize, 0);
        }
        let within = (offset % block_bytes) as usize;
        self.block[within..within + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        self.store_block(file)?;
        let (map_at, map) = self.layout.block_map();
        file.write_all_at(&map, map_at)
            .map_err(|e| Error::write(&self.what, map_at, e))?;
        let header = self.layout.header(
            *uuid::Uuid::new_v4().as_bytes(),
            *uuid::Uuid::new_v4().as_bytes(),
        );
        file.write_all_at(&header, 0)
            .map_err(|e| Error::write(&self.what, 0, e))?;
        let end = self.layout.file_len();
        file.set_len(end)
            .map_err(|e| Error::write(&self.what, end, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::vdi::parse_header;

    #[test]
    fn the_header_written_reads_back_with_the_reader() {
        let mut vdi = DynamicVdi::new(5 << 20, 1 << 20, "test").unwrap();
        vdi.allocate(2);
        let header = vdi.header([1; 16], [2; 16]);
        let parsed = parse_header(&header, "test").unwrap();
        assert_eq!(parsed.image_type, TYPE_DYNAMIC);
        assert_eq!(parsed.disk_bytes, 5 << 20);
        assert_eq!(parsed.block_bytes, 1 << 20);
        assert_eq!(parsed.block_count, 5);
        assert_eq!(parsed.block_map_offset, MAP_OFFSET);
        assert_eq!(parsed.data_offset, 4096);
        assert_eq!(parsed.image_uuid, [1; 16]);
        assert_eq!(vdi.file_len(), 4096 + (1 << 20));
        let (at, map) = vdi.block_map();
        assert_eq!(at, MAP_OFFSET);
        assert_eq!(map.len(), 5 * 4);
        assert_eq!(&map[8..12], &0u32.to_le_bytes());
        assert_eq!(&map[0..4], &BLOCK_FREE.to_le_bytes());
    }
}
