//! Parallels expandable images (`.hdd` data files).
//!
//! # Format facts relied on
//!
//! All numbers are little-endian.
//!
//! * A 64-byte header: a 16-byte magic, `WithoutFreeSpace` (the older
//!   variant) or `WithouFreSpacExt` (the newer one, written by current
//!   tools), the version (must be 2) at 16, heads at 20 and cylinders at 24
//!   (guest geometry, unused here), the cluster size in sectors ("tracks") at
//!   28, the number of BAT entries at 32, the disk size in sectors (u64) at
//!   36 — of which only the low 32 bits count in `WithoutFreeSpace` images —
//!   an "in use" marker at 44, the data area's offset in sectors at 48,
//!   flags at 52 and a format-extension offset at 56 (the extension holds
//!   only dirty bitmaps and similar metadata; it never changes what the disk
//!   reads, so it is ignored). The "in use" marker only says a writer did
//!   not close the image; it is ignored too, as the BAT is validated anyway.
//! * The block allocation table (BAT) follows the header at byte 64: one u32
//!   per cluster. Zero means the cluster is unallocated (reads as zeros);
//!   otherwise it is the cluster's position in the file, counted in sectors
//!   for `WithoutFreeSpace` images and in clusters for `WithouFreSpacExt`
//!   images. An allocated cluster lies at or after the data area and before
//!   the end of the file.
//! * When `data_off` is zero (allowed for `WithoutFreeSpace` images) the data
//!   area starts at the end of the BAT rounded up to a whole sector.
//! * A Parallels "bundle" is a folder holding `DiskDescriptor.xml` and the
//!   `.hdd` data file; this reader opens the data file itself.
//!
//! Parallels images have no UUID in the data file and no differencing form
//! here (snapshots live in separate bundle files described by the XML).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::mapped::{self, MappedImage, Mapping};
use super::{open_read_only, OpenOptions};
use crate::disk::{Disk, DriveType, SectorStatus, SECTOR_BYTES};
use crate::error::{Error, Result};

const MAGIC_SECTORS: &[u8; 16] = b"WithoutFreeSpace";
const MAGIC_CLUSTERS: &[u8; 16] = b"WithouFreSpacExt";
const VERSION: u32 = 2;
const HEADER_BYTES: usize = 64;
const VERSION_AT: usize = 16;
const CLUSTER_SECTORS_AT: usize = 28;
const BAT_ENTRIES_AT: usize = 32;
const DISK_SECTORS_AT: usize = 36;
const DATA_OFFSET_AT: usize = 48;

/// Clusters larger than this (in sectors: 1 GiB) are not something any
/// writer produces; a header claiming one is more likely damaged.
const MAX_CLUSTER_SECTORS: u32 = 1 << 21;
/// The largest BAT kept in memory (2^26 entries: 64 TiB of disk at the
/// default 1 MiB clusters). Bigger tables are refused, not allocated.
const MAX_BAT_ENTRIES: u64 = 1 << 26;

/// The fields of a Parallels header this reader uses, already checked
/// against each other (not yet against the file's length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelsHeader {
    /// True for `WithouFreSpacExt` (BAT entries count clusters), false for
    /// `WithoutFreeSpace` (BAT entries count sectors).
    pub bat_in_clusters: bool,
    /// Cluster size in sectors.
    pub cluster_sectors: u32,
    /// BAT entries the header declares (at least the clusters of the disk).
    pub bat_entries: u32,
    /// Virtual disk size in sectors.
    pub disk_sectors: u64,
    /// Byte offset of the data area.
    pub data_offset: u64,
}

impl ParallelsHeader {
    fn cluster_bytes(&self) -> u64 {
        u64::from(self.cluster_sectors) * SECTOR_BYTES
    }

    /// Clusters covering the virtual disk: the BAT entries that matter.
    fn clusters_in_disk(&self) -> u64 {
        self.disk_sectors.div_ceil(u64::from(self.cluster_sectors))
    }

    /// Bytes per unit of a BAT entry.
    fn bat_unit_bytes(&self) -> u64 {
        if self.bat_in_clusters {
            self.cluster_bytes()
        } else {
            SECTOR_BYTES
        }
    }

    /// The byte just past the BAT.
    fn bat_end(&self) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.bat_entries) * 4
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from(le_u32(bytes, at)) | (u64::from(le_u32(bytes, at + 4)) << 32)
}

/// Parses and cross-checks a 64-byte header. `what` names the file.
pub fn parse_header(bytes: &[u8], what: &str) -> Result<ParallelsHeader> {
    if bytes.len() < HEADER_BYTES {
        return Err(Error::corrupt(format!(
            "{what}: {} bytes is too short for a Parallels header ({HEADER_BYTES} bytes)",
            bytes.len()
        )));
    }
    let bat_in_clusters = match &bytes[..16] {
        m if m == MAGIC_CLUSTERS => true,
        m if m == MAGIC_SECTORS => false,
        _ => {
            return Err(Error::corrupt(format!(
                "{what}: no Parallels magic at byte offset 0"
            )))
        }
    };
    let version = le_u32(bytes, VERSION_AT);
    if version != VERSION {
        return Err(Error::unsupported(format!(
            "{what}: Parallels version {version} at byte offset {VERSION_AT}; only version \
             {VERSION} is read"
        )));
    }
    let cluster_sectors = le_u32(bytes, CLUSTER_SECTORS_AT);
    if cluster_sectors == 0 || cluster_sectors > MAX_CLUSTER_SECTORS {
        return Err(Error::corrupt(format!(
            "{what}: Parallels cluster size at byte offset {CLUSTER_SECTORS_AT} is \
             {cluster_sectors} sectors, not 1..={MAX_CLUSTER_SECTORS}"
        )));
    }
    let declared_sectors = le_u64(bytes, DISK_SECTORS_AT);
    // The older variant defines only the low half of the size field.
    let disk_sectors = if bat_in_clusters {
        declared_sectors
    } else {
        declared_sectors & 0xFFFF_FFFF
    };
    let bat_entries = le_u32(bytes, BAT_ENTRIES_AT);
    let mut header = ParallelsHeader {
        bat_in_clusters,
        cluster_sectors,
        bat_entries,
        disk_sectors,
        data_offset: 0,
    };
    let needed = header.clusters_in_disk();
    if needed > u64::from(bat_entries) {
        return Err(Error::corrupt(format!(
            "{what}: Parallels disk of {disk_sectors} sectors needs {needed} clusters of \
             {cluster_sectors} sectors, but the BAT size at byte offset {BAT_ENTRIES_AT} \
             is {bat_entries}"
        )));
    }
    if needed > MAX_BAT_ENTRIES {
        return Err(Error::unsupported(format!(
            "{what}: Parallels BAT of {needed} entries is larger than the \
             {MAX_BAT_ENTRIES} this reader holds in memory"
        )));
    }
    let data_off_sectors = le_u32(bytes, DATA_OFFSET_AT);
    header.data_offset = if data_off_sectors == 0 {
        header.bat_end().next_multiple_of(SECTOR_BYTES)
    } else {
        u64::from(data_off_sectors) * SECTOR_BYTES
    };
    if header.data_offset < header.bat_end() {
        return Err(Error::corrupt(format!(
            "{what}: Parallels data area at sector {data_off_sectors} (byte offset \
             {DATA_OFFSET_AT}) overlaps the {bat_entries}-entry BAT"
        )));
    }
    Ok(header)
}

/// True when the file starts with either Parallels magic.
pub fn probe(file: &File) -> bool {
    let mut magic = [0u8; 16];
    file.read_exact_at(&mut magic, 0).is_ok()
        && (&magic == MAGIC_CLUSTERS || &magic == MAGIC_SECTORS)
}

/// `open` for the format table.
pub fn open_boxed(path: &Path, _options: &OpenOptions, _depth: usize) -> Result<Box<dyn Disk>> {
    Ok(Box::new(ParallelsDisk::open(path)?))
}

/// A Parallels image opened read-only, with its BAT cached as byte offsets.
#[derive(Debug)]
pub struct ParallelsDisk {
    file: crate::file_io::SourceFile,
    path: PathBuf,
    header: ParallelsHeader,
    /// Byte offset of each cluster of the virtual disk, 0 when unallocated
    /// (0 is never a valid data offset: the header is there).
    cluster_offsets: Vec<u64>,
}

impl ParallelsDisk {
    /// Opens a Parallels `.hdd` data file read-only.
    pub fn open(path: &Path) -> Result<ParallelsDisk> {
        let what = path.display().to_string();
        let file = open_read_only(path)?;
        let file_bytes = file
            .metadata()
            .map_err(|e| Error::open(format!("{what}: {e}")))?
            .len();
        let mut header_bytes = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header_bytes, 0)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::corrupt(format!(
                    "{what}: file is shorter than a Parallels header ({HEADER_BYTES} bytes)"
                )),
                _ => Error::read(&format!("{what}: Parallels header"), 0, e),
            })?;
        let header = parse_header(&header_bytes, &what)?;
        let cluster_offsets = read_bat(&file, &what, &header, file_bytes)?;
        Ok(ParallelsDisk {
            file: file.into(),
            path: path.to_path_buf(),
            header,
            cluster_offsets,
        })
    }

    /// The image's parsed header.
    pub fn header(&self) -> &ParallelsHeader {
        &self.header
    }
}

/// Reads the BAT entries covering the disk and turns them into byte
/// offsets, checking each lies in the data area and inside the file. The
/// table's size was capped by `parse_header` and is checked against the
/// file's length before it is allocated.
fn read_bat(
    file: &File,
    what: &str,
    header: &ParallelsHeader,
    file_bytes: u64,
) -> Result<Vec<u64>> {
    if header.bat_end() > file_bytes {
        return Err(Error::corrupt(format!(
            "{what}: Parallels BAT of {} entries at byte offset {HEADER_BYTES} runs past the \
             end of the {file_bytes}-byte file",
            header.bat_entries
        )));
    }
    let entries = header.clusters_in_disk();
    let mut raw = vec![0u8; (entries * 4) as usize];
    file.read_exact_at(&mut raw, HEADER_BYTES as u64)
        .map_err(|e| Error::read(&format!("{what}: Parallels BAT"), HEADER_BYTES as u64, e))?;
    let cluster_bytes = header.cluster_bytes();
    let disk_bytes = header.disk_sectors * SECTOR_BYTES; // < 2^26 * 2^30 bytes
    raw.chunks_exact(4)
        .enumerate()
        .map(|(index, c)| {
            let entry = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if entry == 0 {
                return Ok(0);
            }
            let entry_at = HEADER_BYTES + index * 4;
            // entry < 2^32, unit <= 2^30: the product fits in u64.
            let offset = u64::from(entry) * header.bat_unit_bytes();
            // Only the part of the last cluster inside the disk must exist.
            let used = (disk_bytes - index as u64 * cluster_bytes).min(cluster_bytes);
            if offset < header.data_offset || offset + used > file_bytes {
                return Err(Error::corrupt(format!(
                    "{what}: Parallels BAT entry {index} (byte offset {entry_at}) points at \
                     bytes {offset}..{}, outside the data area {}..{file_bytes}",
                    offset + used,
                    header.data_offset
                )));
            }
            Ok(offset)
        })
        .collect()
}

impl MappedImage for ParallelsDisk {
    fn sectors(&self) -> u64 {
        self.header.disk_sectors
    }

    fn map(&self, lba: u64, count: u64) -> Result<(Mapping, u64)> {
        crate::disk::check_range(lba, count, self.header.disk_sectors)?;
        let per_cluster = u64::from(self.header.cluster_sectors);
        let cluster_bytes = self.header.cluster_bytes();
        let first = lba / per_cluster;
        let within = lba % per_cluster;
        let first_offset = self.cluster_offsets[first as usize];
        let clusters = self.cluster_offsets.len() as u64;
        // Extend the run over following clusters that are also unallocated,
        // or allocated right after the previous one in the file.
        let mut run = per_cluster - within;
        let mut next = first + 1;
        while run < count && next < clusters {
            let offset = self.cluster_offsets[next as usize];
            let continues = if first_offset == 0 {
                offset == 0
            } else {
                offset == first_offset + (next - first) * cluster_bytes
            };
            if !continues {
                break;
            }
            run += per_cluster;
            next += 1;
        }
        let mapping = if first_offset == 0 {
            Mapping::Unallocated
        } else {
            Mapping::Data {
                file: 0,
                offset: first_offset + within * SECTOR_BYTES,
            }
        };
        Ok((mapping, run.min(count)))
    }

    fn read_mapped(&self, mapping: Mapping, _lba: u64, buf: &mut [u8]) -> Result<()> {
        match mapping {
            Mapping::Data { offset, .. } => self.file.read_exact_at(buf, offset).map_err(|e| {
                Error::read(
                    &format!("{}: Parallels cluster", self.path.display()),
                    offset,
                    e,
                )
            }),
            other => Err(Error::internal(format!(
                "Parallels reader asked to read a {other:?} run"
            ))),
        }
    }
}

impl Disk for ParallelsDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Parallels
    }
    fn sector_count(&self) -> u64 {
        self.header.disk_sectors
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(magic: &[u8; 16], cluster_sectors: u32, bat: u32, sectors: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES];
        b[..16].copy_from_slice(magic);
        b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&VERSION.to_le_bytes());
        b[CLUSTER_SECTORS_AT..CLUSTER_SECTORS_AT + 4]
            .copy_from_slice(&cluster_sectors.to_le_bytes());
        b[BAT_ENTRIES_AT..BAT_ENTRIES_AT + 4].copy_from_slice(&bat.to_le_bytes());
        b[DISK_SECTORS_AT..DISK_SECTORS_AT + 8].copy_from_slice(&sectors.to_le_bytes());
        b
    }

    #[test]
    fn old_variant_uses_low_half_of_size_and_computes_data_offset() {
        let h = parse_header(&header_bytes(MAGIC_SECTORS, 63, 3, (7 << 32) | 150), "t").unwrap();
        assert_eq!(h.disk_sectors, 150);
        assert!(!h.bat_in_clusters);
        assert_eq!(h.data_offset, 512); // 64 + 12 bytes of BAT, rounded up
    }

    #[test]
    fn rejects_inconsistent_headers() {
        assert!(parse_header(&header_bytes(MAGIC_CLUSTERS, 0, 3, 10), "t").is_err());
        assert!(parse_header(&header_bytes(MAGIC_CLUSTERS, 8, 1, 10), "t").is_err());
        assert!(parse_header(&header_bytes(b"WithoutFreeSpacX", 8, 2, 10), "t").is_err());
        assert!(matches!(
            parse_header(&header_bytes(MAGIC_CLUSTERS, 1, u32::MAX, u64::MAX), "t"),
            Err(ref e) if matches!(e.kind(), crate::error::ErrorCode::Corrupt | crate::error::ErrorCode::Unsupported)
        ));
        let mut b = header_bytes(MAGIC_CLUSTERS, 8, 2, 10);
        b[DATA_OFFSET_AT] = 0; // explicit zero is fine: computed
        assert!(parse_header(&b, "t").is_ok());
        b[VERSION_AT] = 3;
        assert!(
            matches!(parse_header(&b, "t"), Err(ref e) if e.kind() == crate::error::ErrorCode::Unsupported)
        );
    }
}
