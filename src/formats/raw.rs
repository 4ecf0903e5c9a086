//! Raw (flat) images: the file is the disk, byte for byte.
//!
//! The holes of a sparse regular file (found with `lseek` `SEEK_DATA` /
//! `SEEK_HOLE`, as `qemu-img map` does) are reported `NotAlloc`, so a clone
//! or a compare skips them without reading their zeros; a block device, or
//! a file system without hole reporting, is all data.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{open_read_only, OpenOptions};
use crate::disk::{check_range, sectors_in, Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

/// A raw image file opened read-only.
#[derive(Debug)]
pub struct RawDisk {
    file: crate::file_io::SourceFile,
    path: PathBuf,
    bytes: u64,
    /// Whether holes are looked up (regular files only).
    sparse: bool,
    /// The last run found: [start, end) in bytes and whether it is data.
    /// Runs are asked for in increasing order by a clone, so most queries
    /// are answered from it without a system call. Behind a lock so reads
    /// can share the disk between threads.
    last_run: Mutex<Option<(u64, u64, bool)>>,
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
            file: file.into(),
            path: path.to_path_buf(),
            bytes,
            sparse: meta.is_file(),
            last_run: Mutex::new(None),
        })
    }

    /// The run of data or hole containing byte `offset` (< the file's
    /// size): its end (at most the file's size) and whether it is data.
    fn run_at(&self, offset: u64) -> Result<(u64, bool)> {
        let last = *self.last_run.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, end, data)) = last {
            if (start..end).contains(&offset) {
                return Ok((end, data));
            }
        }
        let (start, end, data) = self.find_run(offset)?;
        *self.last_run.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, end, data));
        Ok((end, data))
    }

    fn find_run(&self, offset: u64) -> Result<(u64, u64, bool)> {
        if !self.sparse {
            return Ok((0, self.bytes, true));
        }
        let next_data = match self.seek(offset, false)? {
            // No data from `offset` to the end of the file.
            None => return Ok((offset, self.bytes, false)),
            Some(at) => at.min(self.bytes),
        };
        if next_data > offset {
            return Ok((offset, next_data, false));
        }
        // There is always a hole at the end of the file.
        let next_hole = self
            .seek(offset, true)?
            .unwrap_or(self.bytes)
            .min(self.bytes);
        Ok((offset, next_hole.max(offset + 1), true))
    }

    /// `lseek` to the next data (`hole` false) or hole (`hole` true) from
    /// `offset`: the offset found, or `None` when there is no more data
    /// (`ENXIO`). A file system that cannot report holes (`EINVAL`) is
    /// treated as all data.
    fn seek(&self, offset: u64, hole: bool) -> Result<Option<u64>> {
        use rustix::fs::SeekFrom;
        let whence = if hole {
            SeekFrom::Hole(offset)
        } else {
            SeekFrom::Data(offset)
        };
        match rustix::fs::seek(&self.file, whence) {
            Ok(found) => Ok(Some(found)),
            Err(rustix::io::Errno::NXIO) if !hole => Ok(None),
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NXIO) => {
                Ok(Some(if hole { self.bytes } else { offset }))
            }
            Err(e) => Err(Error::seek(std::io::Error::from(e).to_string())
                .with_path(&self.path)
                .at_offset(offset)),
        }
    }

    /// The status of the sectors from `lba` and how many of the `count`
    /// share it: sectors wholly inside a hole are `NotAlloc`, any sector
    /// holding a byte of data is `Normal`.
    fn sector_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        let start = lba * SECTOR_BYTES;
        let (end, data) = self.run_at(start)?;
        // A data run's partial last sector is data; a hole's is not a hole,
        // unless the hole reaches the end of the file (the rest of the
        // last sector is zero padding).
        let end_sector = if data || end >= self.bytes {
            end.div_ceil(SECTOR_BYTES)
        } else {
            end / SECTOR_BYTES
        };
        if end_sector <= lba {
            // A hole shorter than the rest of its sector: data.
            return Ok((SectorStatus::Normal, 1));
        }
        let status = if data {
            SectorStatus::Normal
        } else {
            SectorStatus::NotAlloc
        };
        Ok((status, (end_sector - lba).min(count)))
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
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
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
        self.block_status(lba, n)
    }
    /// `Normal` when any of the sectors holds a byte of data, `NotAlloc`
    /// when all lie in holes.
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sector_count())?;
        let mut at = lba;
        while at < lba + count {
            let (status, run) = self.sector_run(at, lba + count - at)?;
            if status == SectorStatus::Normal {
                return Ok(status);
            }
            at += run;
        }
        Ok(SectorStatus::NotAlloc)
    }
    fn status_run(&self, lba: u64, count: u64) -> Result<(SectorStatus, u64)> {
        check_range(lba, count, self.sector_count())?;
        if count == 0 {
            return Err(Error::invalid_argument(
                "the status run of zero sectors was asked".into(),
            ));
        }
        // Neighbouring runs of the same kind (a data run cut short by a
        // hole under one sector) are joined.
        let (status, mut run) = self.sector_run(lba, count)?;
        while run < count {
            let (next, more) = self.sector_run(lba + run, count - run)?;
            if next != status {
                break;
            }
            run += more;
        }
        Ok((status, run))
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
