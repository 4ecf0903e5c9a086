//! Raw (flat) images: the file is the disk, byte for byte.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{open_read_only, OpenOptions};
use crate::disk::{check_range, sectors_in, Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

/// A raw image file opened read-only.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl RawDisk {
    /// Opens `path` read-only as a raw disk.
    pub fn open(path: &Path) -> Result<RawDisk> {
        let file = open_read_only(path)?;
        let meta = file
            .metadata()
            .map_err(|e| Error::open(e.to_string()).with_path(path))?;
        if !meta.is_file() && !is_block_device(&meta) {
            return Err(Error::open(format!(
                "{}: not a regular file or block device",
                path.display()
            )));
        }
        let bytes = if meta.is_file() {
            meta.len()
        } else {
            device_size(&file, path)?
        };
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            bytes,
        })
    }
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

fn device_size(file: &File, path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::seek(e.to_string()).with_path(path))
}

/// Any file can be read as raw.
pub fn probe(_file: &File) -> bool {
    true
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, _options: &OpenOptions, _depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(RawDisk::open(path)?))
}

impl Disk for RawDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Raw
    }
    fn sector_count(&self) -> u64 {
        self.bytes.div_ceil(SECTOR_BYTES)
    }
    fn byte_size(&self) -> u64 {
        self.bytes
    }
    fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let n = sectors_in(buf.len())?;
        check_range(lba, n, self.sector_count())?;
        let offset = lba * SECTOR_BYTES;
        // The last sector of an odd-sized file is zero-padded.
        let available = self.bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, tail) = buf.split_at_mut(available);
        self.file
            .read_exact_at(data, offset)
            .map_err(|e| Error::read(&self.path.display().to_string(), offset, e))?;
        tail.fill(0);
        Ok(if n == 0 {
            SectorStatus::NotAlloc
        } else {
            SectorStatus::Normal
        })
    }
    fn block_status(&mut self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        Ok(if count == 0 {
            SectorStatus::NotAlloc
        } else {
            SectorStatus::Normal
        })
    }
    /// Every sector of a raw image is data.
    fn status_run(&mut self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Err(Error::invalid_argument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        Ok((SectorStatus::Normal, count))
    }
}

/// Writes a flat image: data at its own offset, holes where no page came,
/// and the file cut to the virtual size (which also drops the zero padding
/// of an odd-sized last sector).
pub struct RawWriter {
    virtual_bytes: u64,
    what: String,
}

impl RawWriter {
    /// A writer for a disk of `virtual_bytes`; `what` names the file.
    pub fn new(virtual_bytes: u64, what: &str) -> RawWriter {
        RawWriter {
            virtual_bytes,
            what: what.to_string(),
        }
    }
}

impl super::writer::ImageWriter for RawWriter {
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        super::writer::write_in_pieces(file, data, offset, &self.what)
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        file.set_len(self.virtual_bytes)
            .map_err(|e| Error::write(&self.what, self.virtual_bytes, e))
    }
}
