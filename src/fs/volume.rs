//! A partition as a byte-addressed volume: the one place the filesystem
//! readers touch the disk, so every read is checked against the
//! partition's bounds (an on-disk field pointing outside the partition is
//! an error, never a read of a neighbour).

use crate::disk::{Disk, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};

/// The most bytes one `read` may ask for: on-disk fields size reads, so
/// they are capped before any buffer is allocated.
pub const MAX_READ: u64 = 16 << 20;

/// The sectors `[start, start + sectors)` of a disk, read by byte offset.
pub struct Volume<'a> {
    disk: &'a mut dyn Disk,
    start: u64,
    sectors: u64,
    buf: Vec<u8>,
}

impl<'a> Volume<'a> {
    /// The volume of `sectors` sectors from `start`; the range must lie
    /// inside the disk.
    pub fn new(disk: &'a mut dyn Disk, start: u64, sectors: u64) -> Result<Volume<'a>> {
        let end = start.checked_add(sectors);
        if end.is_none_or(|end| end > disk.sector_count()) {
            return Err(Error::invalid_argument(format!(
                "the volume at sectors {start}..+{sectors} does not lie inside the disk of {} \
                 sectors",
                disk.sector_count()
            )));
        }
        Ok(Volume {
            disk,
            start,
            sectors,
            buf: Vec::new(),
        })
    }

    /// First sector on the disk.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR_BYTES
    }

    /// Reads `len` bytes at byte `offset` of the volume into a new buffer.
    /// `what` names the structure in errors.
    pub fn read(&mut self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        if len > MAX_READ {
            return Err(Error::unsupported(format!(
                "{what}: {len} bytes at offset {offset} is more than the {MAX_READ} bytes read \
                 at once"
            )));
        }
        let mut out = vec![0u8; len as usize];
        self.read_into(offset, &mut out, what)?;
        Ok(out)
    }

    /// Fills `out` from byte `offset` of the volume.
    pub fn read_into(&mut self, offset: u64, out: &mut [u8], what: &str) -> Result<()> {
        let len = out.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.bytes()) {
            return Err(Error::corrupt(format!(
                "{what}: {len} bytes at offset {offset} lie outside the partition of {} bytes",
                self.bytes()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let first = offset / SECTOR_BYTES;
        let last = (offset + len - 1) / SECTOR_BYTES;
        let count = last - first + 1;
        self.buf.resize(count as usize * SECTOR_SIZE, 0);
        self.disk.read_sectors(self.start + first, &mut self.buf)?;
        let skip = (offset - first * SECTOR_BYTES) as usize;
        out.copy_from_slice(&self.buf[skip..skip + out.len()]);
        Ok(())
    }
}

/// Little-endian field readers over a byte slice whose length the caller
/// has checked.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
