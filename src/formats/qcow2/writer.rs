//! Writing qcow2 version 3 images: [`Qcow2Writer`], the [`ImageWriter`]
//! the clone driver (src/clone.rs) feeds with pages, using the reader's
//! layout ([`super::layout`]).
//!
//! The file is written front to back in one pass, because pages arrive in
//! increasing order: the header cluster first (filled in last), then data
//! clusters, each L2 table right after the data it maps (written as soon
//! as the pages move past its range, so only one table is in memory), then
//! at the end the L1 table, the refcount blocks and the refcount table.
//! Every cluster of the file is used, so each has a refcount of at least
//! one: `qemu-img check` finds no leaks. Refcounts are 16 bits wide
//! (refcount order 4, QEMU's default).
//!
//! Format facts relied on beyond the reader's (from the qcow2
//! specification, in our own words):
//!
//! * The refcount table offset (u64 at 48) and its length in clusters (u32
//!   at 56) say where the refcount table is: u64 entries, each the offset
//!   of a refcount block (0: none), a block being one cluster of
//!   refcounts, `2^refcount_order` bits each, big-endian, for consecutive
//!   host clusters. Every cluster in use (header, tables, refcount
//!   structures, data) counts the references to it.
//! * Bit 63 of an L1 or L2 entry ("copied") must be set exactly when the
//!   cluster it points at has a refcount of one; compressed clusters never
//!   have it.
//! * A compressed cluster is a raw deflate stream (no zlib header). Its
//!   bytes may start anywhere and share host clusters with other
//!   compressed clusters; each host cluster it touches counts one
//!   reference for it. QEMU inflates with a 4 KiB window, so the stream
//!   must not refer further back than 4 KiB.
//! * A version 3 header is at least 104 bytes; the length (u32 at 100) is
//!   a multiple of 8. At 112 it includes the compression type byte (104,
//!   0 = deflate) and padding. Header extensions follow, each an u32 type,
//!   an u32 length and the data padded to 8 bytes, ended by type 0; the
//!   backing file name follows them, all in the first cluster.

use std::fs::File;
use std::os::unix::fs::FileExt;

use flate2::{Compress, Compression, FlushCompress, Status};

use super::layout::{
    compressed_offset_bits, BACKING_LEN_AT, BACKING_OFFSET_AT, CLUSTER_BITS_AT, COPIED,
    EXT_BACKING_FORMAT, EXT_END, HEADER_LEN_AT, L1_OFFSET_AT, L1_SIZE_AT, L2_COMPRESSED, L2_ZERO,
    MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, REFCOUNT_ORDER_AT,
    REFCOUNT_TABLE_CLUSTERS_AT, REFCOUNT_TABLE_OFFSET_AT, SIZE_AT, VERSION_AT,
};
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::writer::{write_in_pieces, BackingFile, ImageWriter};

/// QEMU's default cluster size.
pub const DEFAULT_CLUSTER_BYTES: u64 = 64 << 10;
/// The header we write: 104 bytes, the compression type byte, padding.
const HEADER_LEN: usize = 112;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNT_BYTES: u64 = 2;
/// QEMU compresses and inflates with a 4 KiB window (2^12).
const DEFLATE_WINDOW_BITS: u8 = 12;
/// QEMU refuses an L1 table larger than 32 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;

/// How to write a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Cluster size: a power of two from 512 bytes to 2 MiB.
    pub cluster_bytes: u64,
    /// Store clusters deflate-compressed (when that makes them smaller).
    pub compress: bool,
    /// Write a differencing image over this backing file: a range never
    /// passed to the writer reads from the backing file, and a cluster of
    /// zeros passed to it is stored as a zero cluster (which hides the
    /// backing file's data there).
    pub backing: Option<BackingFile>,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            cluster_bytes: DEFAULT_CLUSTER_BYTES,
            compress: false,
            backing: None,
        }
    }
}

/// What one cluster becomes.
enum Stored {
    /// Not stored (zeros without a backing file).
    Skip,
    /// A zero cluster (over a backing file).
    Zero,
    /// Stored as is: the cluster's bytes in the batch.
    Plain,
    /// Stored compressed: these bytes.
    Compressed(Vec<u8>),
}

/// Writes a qcow2 v3 image (see the module doc).
pub struct Qcow2Writer {
    what: String,
    virtual_bytes: u64,
    cluster_bits: u32,
    compress: bool,
    backing: Option<BackingFile>,
    /// Where the next allocation may start (bytes; compressed clusters are
    /// packed, so it may lie inside a cluster).
    next_free: u64,
    /// References per host cluster, for every cluster allocated so far.
    refcounts: Vec<u16>,
    /// L1 entries, one per L2 span of the virtual disk.
    l1: Vec<u64>,
    /// The L2 table being filled and its L1 index.
    l2: Vec<u64>,
    l2_index: Option<u64>,
    /// A cluster filled by writes that do not cover it whole: its index
    /// and bytes (clusters larger than a clone page, or an unaligned tail).
    pending: Option<(u64, Vec<u8>)>,
    /// Whole clusters waiting to be compressed together (compression
    /// only): the first one's index and their bytes, contiguous.
    queued: Option<(u64, Vec<u8>)>,
    /// Clusters stored compressed, and as is.
    compressed_clusters: u64,
    plain_clusters: u64,
}

/// Bytes of whole clusters compressed in one go. Each batch is one
/// hand-over to the compressing threads and back; at one 1 MiB page a
/// batch, on a loaded machine, the waits for the threads to be scheduled
/// cost more than the compression (measured: 3 s of CPU in 6 to 8 s), so
/// batches are larger.
const COMPRESS_BATCH_BYTES: usize = 8 << 20;

impl Qcow2Writer {
    /// A writer for a disk of `virtual_bytes` (a whole number of sectors);
    /// `what` names the file. Refuses a cluster size outside 512 bytes to
    /// 2 MiB, a disk whose L1 table would pass QEMU's 32 MiB cap, and a
    /// backing name or format that does not fit in the header cluster.
    pub fn new(virtual_bytes: u64, options: &Qcow2Options, what: &str) -> Result<Qcow2Writer> {
        let cluster_bytes = options.cluster_bytes;
        let bits = cluster_bytes.trailing_zeros();
        if !cluster_bytes.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits)
        {
            return Err(Error::invalid_argument(format!(
                "{what}: qcow2 cluster size {cluster_bytes} is not a power of two from 512 bytes \
                 to 2 MiB"
            )));
        }
        if !virtual_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(Error::internal(format!(
                "{what}: qcow2 size {virtual_bytes} is not a whole number of sectors"
            )));
        }
        let l2_span = (cluster_bytes / 8) * cluster_bytes;
        let l1_entries = virtual_bytes.div_ceil(l2_span);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "{what}: a qcow2 image of {virtual_bytes} bytes with {cluster_bytes}-byte \
                 clusters needs an L1 table larger than QEMU's 32 MiB; use larger clusters"
            )));
        }
        let writer = Qcow2Writer {
            what: what.to_string(),
            virtual_bytes,
            cluster_bits: bits,
            compress: options.compress,
            backing: options.backing.clone(),
            next_free: cluster_bytes,
            refcounts: vec![1],
            l1: vec![0; l1_entries as usize],
            l2: Vec::new(),
            l2_index: None,
            pending: None,
            queued: None,
            compressed_clusters: 0,
            plain_clusters: 0,
        };
        // Builds the header once now so a name that does not fit fails
        // before any data is written.
        writer.header(0, 0, 0)?;
        Ok(writer)
    }

    fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters stored compressed and as is so far.
    pub fn stored_clusters(&self) -> (u64, u64) {
        (self.compressed_clusters, self.plain_clusters)
    }

    /// The header cluster's bytes for the final table positions.
    fn header(
        &self,
        l1_offset: u64,
        refcount_offset: u64,
        refcount_clusters: u32,
    ) -> Result<Vec<u8>> {
        let cluster_bytes = self.cluster_bytes() as usize;
        let mut header = vec![0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        put32(&mut header, VERSION_AT, 3);
        put32(&mut header, CLUSTER_BITS_AT, self.cluster_bits);
        put64(&mut header, SIZE_AT, self.virtual_bytes);
        put32(&mut header, L1_SIZE_AT, self.l1.len() as u32);
        put64(&mut header, L1_OFFSET_AT, l1_offset);
        put64(&mut header, REFCOUNT_TABLE_OFFSET_AT, refcount_offset);
        put32(&mut header, REFCOUNT_TABLE_CLUSTERS_AT, refcount_clusters);
        put32(&mut header, REFCOUNT_ORDER_AT, REFCOUNT_ORDER);
        put32(&mut header, HEADER_LEN_AT, HEADER_LEN as u32);
        // Feature bits, snapshots, encryption, compression type (deflate):
        // all zero.
        if let Some(backing) = &self.backing {
            if let Some(format) = &backing.format {
                let name = format.as_bytes();
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
                if !valid {
                    return Err(Error::invalid_argument(format!(
                        "{}: backing format {format:?} is not a format name",
                        self.what
                    )));
                }
                put_extension(&mut header, EXT_BACKING_FORMAT, name);
            }
        }
        put_extension(&mut header, EXT_END, &[]);
        if let Some(backing) = &self.backing {
            let name = backing.name.as_bytes();
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::invalid_argument(format!(
                    "{}: a backing file name must be 1 to {MAX_BACKING_NAME} bytes long",
                    self.what
                )));
            }
            let name_at = header.len() as u64;
            put64(&mut header, BACKING_OFFSET_AT, name_at);
            put32(&mut header, BACKING_LEN_AT, name.len() as u32);
            header.extend_from_slice(name);
        }
        if header.len() > cluster_bytes {
            return Err(Error::invalid_argument(format!(
                "{}: the qcow2 header with its backing file name ({} bytes) does not fit in \
                 one {cluster_bytes}-byte cluster; use larger clusters",
                self.what,
                header.len()
            )));
        }
        Ok(header)
    }

    /// One more reference to host cluster `index`.
    fn reference(&mut self, index: u64) -> Result<()> {
        let index = index as usize;
        if index >= self.refcounts.len() {
            self.refcounts.resize(index + 1, 0);
        }
        self.refcounts[index] = self.refcounts[index].checked_add(1).ok_or_else(|| {
            Error::internal(format!(
                "{}: host cluster {index} would have more than 65535 references",
                self.what
            ))
        })?;
        Ok(())
    }

    /// Allocates `clusters` whole clusters (at the next cluster boundary)
    /// and returns the offset of the first.
    fn allocate_clusters(&mut self, clusters: u64) -> Result<u64> {
        let cluster_bytes = self.cluster_bytes();
        let at = self.next_free.next_multiple_of(cluster_bytes);
        for index in at / cluster_bytes..at / cluster_bytes + clusters {
            self.reference(index)?;
        }
        self.next_free = at + clusters * cluster_bytes;
        Ok(at)
    }

    /// Allocates `len` bytes for a compressed cluster right after the
    /// last allocation, counting a reference on each host cluster they
    /// touch.
    fn allocate_bytes(&mut self, len: u64) -> Result<u64> {
        let cluster_bytes = self.cluster_bytes();
        let at = self.next_free;
        for index in at / cluster_bytes..=(at + len - 1) / cluster_bytes {
            self.reference(index)?;
        }
        self.next_free = at + len;
        Ok(at)
    }

    /// Writes the L2 table being filled, if any, and points its L1 entry
    /// at it.
    fn flush_l2(&mut self, file: &File) -> Result<()> {
        let Some(index) = self.l2_index.take() else {
            return Ok(());
        };
        let at = self.allocate_clusters(1)?;
        let bytes: Vec<u8> = self.l2.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&bytes, at)
            .map_err(|e| Error::write(&self.what, at, e))?;
        self.l1[index as usize] = at | COPIED;
        Ok(())
    }

    /// Sets the L2 entry of virtual cluster `cluster`, first switching to
    /// (and writing out the previous) L2 table when it lies in another
    /// table's range. Must be called before allocating the cluster's data
    /// so a table switch never splits a run of data.
    fn select_l2(&mut self, file: &File, cluster: u64) -> Result<usize> {
        let per_table = self.cluster_bytes() / 8;
        let index = cluster / per_table;
        if self.l2_index != Some(index) {
            self.flush_l2(file)?;
            self.l2_index = Some(index);
            self.l2.clear();
            self.l2.resize(per_table as usize, 0);
        }
        Ok((cluster % per_table) as usize)
    }

    /// What each cluster of `batch` (whole clusters, the last possibly
    /// short at the end of the disk) becomes, compressing on every core
    /// when asked.
    fn classify(&self, batch: &[u8]) -> Vec<Stored> {
        let cluster_bytes = self.cluster_bytes() as usize;
        let one = |chunk: &[u8]| -> Stored {
            if crate::disk::is_zero(chunk) {
                return if self.backing.is_some() {
                    Stored::Zero
                } else {
                    Stored::Skip
                };
            }
            if self.compress {
                if let Some(bytes) = deflate_cluster(chunk, cluster_bytes) {
                    return Stored::Compressed(bytes);
                }
            }
            Stored::Plain
        };
        let chunks: Vec<&[u8]> = batch.chunks(cluster_bytes).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !self.compress || threads < 2 || chunks.len() < 2 {
            return chunks.into_iter().map(one).collect();
        }
        // Each thread takes the next cluster not yet taken, so a thread
        // the scheduler holds back does not hold up a fixed share.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut done: Vec<(usize, Stored)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads.min(chunks.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(chunk) = chunks.get(i) else {
                                return mine;
                            };
                            mine.push((i, one(chunk)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        done.sort_unstable_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, stored)| stored).collect()
    }

    /// Queues whole clusters from virtual cluster `first` on for
    /// compression, storing the queue when it is full or `first` does not
    /// follow it.
    fn queue_clusters(&mut self, file: &File, first: u64, batch: &[u8]) -> Result<()> {
        let cluster_bytes = self.cluster_bytes() as usize;
        if let Some((at, bytes)) = &self.queued {
            if *at + (bytes.len() / cluster_bytes) as u64 != first
                || bytes.len() % cluster_bytes != 0
            {
                self.flush_queue(file)?;
            }
        }
        let (_, bytes) = self
            .queued
            .get_or_insert_with(|| (first, Vec::with_capacity(COMPRESS_BATCH_BYTES)));
        bytes.extend_from_slice(batch);
        if bytes.len() >= COMPRESS_BATCH_BYTES {
            self.flush_queue(file)?;
        }
        Ok(())
    }

    /// Stores the queued clusters, if any.
    fn flush_queue(&mut self, file: &File) -> Result<()> {
        if let Some((first, bytes)) = self.queued.take() {
            self.store_clusters(file, first, &bytes)?;
        }
        Ok(())
    }

    /// Stores whole clusters from virtual cluster `first` on.
    fn store_clusters(&mut self, file: &File, first: u64, batch: &[u8]) -> Result<()> {
        let cluster_bytes = self.cluster_bytes();
        let stored = self.classify(batch);
        // Runs of plain clusters contiguous in the file, written at once:
        // (host offset, start in batch, end in batch).
        let mut run: Option<(u64, usize, usize)> = None;
        for (i, what) in stored.into_iter().enumerate() {
            let cluster = first + i as u64;
            let from = i * cluster_bytes as usize;
            let to = (from + cluster_bytes as usize).min(batch.len());
            match what {
                Stored::Skip => {}
                Stored::Zero => {
                    let slot = self.select_l2(file, cluster)?;
                    self.l2[slot] = L2_ZERO;
                }
                Stored::Plain => {
                    let slot = self.select_l2(file, cluster)?;
                    let host = self.allocate_clusters(1)?;
                    run = match run {
                        Some((at, a, b)) if b == from && at + (b - a) as u64 == host => {
                            Some((at, a, to))
                        }
                        other => {
                            if let Some((at, a, b)) = other {
                                write_in_pieces(file, &batch[a..b], at, &self.what)?;
                            }
                            Some((host, from, to))
                        }
                    };
                    self.plain_clusters += 1;
                    self.l2[slot] = host | COPIED;
                }
                Stored::Compressed(bytes) => {
                    let slot = self.select_l2(file, cluster)?;
                    let host = self.allocate_bytes(bytes.len() as u64)?;
                    file.write_all_at(&bytes, host)
                        .map_err(|e| Error::write(&self.what, host, e))?;
                    self.compressed_clusters += 1;
                    let extra_sectors =
                        (host + bytes.len() as u64 - 1) / SECTOR_BYTES - host / SECTOR_BYTES;
                    self.l2[slot] = L2_COMPRESSED
                        | extra_sectors << compressed_offset_bits(self.cluster_bits)
                        | host;
                }
            }
        }
        if let Some((at, a, b)) = run {
            write_in_pieces(file, &batch[a..b], at, &self.what)?;
        }
        Ok(())
    }

    /// Stores the partly filled cluster, if any.
    fn flush_pending(&mut self, file: &File) -> Result<()> {
        // Queued clusters come before it.
        self.flush_queue(file)?;
        if let Some((index, bytes)) = self.pending.take() {
            self.store_clusters(file, index, &bytes)?;
        }
        Ok(())
    }

    /// Writes the L1 table, the refcount structures and the header; returns
    /// the file's final length.
    fn write_tables(&mut self, file: &File) -> Result<u64> {
        let cluster_bytes = self.cluster_bytes();
        let l1_bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        // An empty disk has an empty L1 table at offset 0 (any cluster
        // given to it would leak).
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(cluster_bytes);
        let l1_at = if l1_clusters == 0 {
            0
        } else {
            self.allocate_clusters(l1_clusters)?
        };
        if !l1_bytes.is_empty() {
            file.write_all_at(&l1_bytes, l1_at)
                .map_err(|e| Error::write(&self.what, l1_at, e))?;
        }

        // The refcount blocks and table count themselves too: grow them
        // until they cover every cluster including their own.
        let used = self.next_free.div_ceil(cluster_bytes);
        let per_block = cluster_bytes / REFCOUNT_BYTES;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster_bytes);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        let blocks_at = self.allocate_clusters(blocks)?;
        let table_at = self.allocate_clusters(table_clusters)?;
        let end = self.next_free;
        let refcount_clusters = u32::try_from(table_clusters).map_err(|_| {
            Error::unsupported(format!("{}: the refcount table is too large", self.what))
        })?;

        let mut table = vec![0u8; (table_clusters * cluster_bytes) as usize];
        let mut block = vec![0u8; cluster_bytes as usize];
        for b in 0..blocks {
            block.fill(0);
            let first = (b * per_block) as usize;
            let counts = self.refcounts.iter().skip(first).take(per_block as usize);
            for (slot, count) in block.chunks_exact_mut(2).zip(counts) {
                slot.copy_from_slice(&count.to_be_bytes());
            }
            let at = blocks_at + b * cluster_bytes;
            write_in_pieces(file, &block, at, &self.what)?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
        }
        write_in_pieces(file, &table, table_at, &self.what)?;
        let header = self.header(l1_at, table_at, refcount_clusters)?;
        file.write_all_at(&header, 0)
            .map_err(|e| Error::write(&self.what, 0, e))?;
        Ok(end)
    }
}

impl ImageWriter for Qcow2Writer {
    /// Takes data at any sector-aligned `offset` in increasing order; a
    /// cluster not covered whole is completed with zeros (the driver
    /// leaves out only ranges that read as zeros, and the delta writer
    /// passes whole clusters).
    fn write_data(&mut self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let cluster_bytes = self.cluster_bytes();
        let end = offset + data.len() as u64;
        if end > self.virtual_bytes {
            return Err(Error::internal(format!(
                "{}: data for bytes {offset}..{end} past the {}-byte disk",
                self.what, self.virtual_bytes
            )));
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let cluster = pos / cluster_bytes;
            let within = pos % cluster_bytes;
            if self.pending.as_ref().is_some_and(|(i, _)| *i != cluster) {
                self.flush_pending(file)?;
            }
            let whole = if within == 0 && self.pending.is_none() {
                // Whole clusters, plus the disk's short last one.
                let mut take = rest.len() as u64 / cluster_bytes * cluster_bytes;
                if pos + rest.len() as u64 == self.virtual_bytes {
                    take = rest.len() as u64;
                }
                take as usize
            } else {
                0
            };
            if whole > 0 {
                if self.compress {
                    self.queue_clusters(file, cluster, &rest[..whole])?;
                } else {
                    self.store_clusters(file, cluster, &rest[..whole])?;
                }
                pos += whole as u64;
                rest = &rest[whole..];
                continue;
            }
            let (_, bytes) = self
                .pending
                .get_or_insert_with(|| (cluster, vec![0u8; cluster_bytes as usize]));
            let n = ((cluster_bytes - within) as usize).min(rest.len());
            bytes[within as usize..within as usize + n].copy_from_slice(&rest[..n]);
            pos += n as u64;
            rest = &rest[n..];
            if pos.is_multiple_of(cluster_bytes) || pos == self.virtual_bytes {
                self.flush_pending(file)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, file: &File) -> Result<()> {
        self.flush_pending(file)?;
        self.flush_l2(file)?;
        let end = self.write_tables(file)?;
        file.set_len(end)
            .map_err(|e| Error::write(&self.what, end, e))
    }
}

/// Deflates one cluster (zero-padded to `cluster_bytes`) with QEMU's 4 KiB
/// window; `None` when the result would not be smaller than the cluster.
fn deflate_cluster(data: &[u8], cluster_bytes: usize) -> Option<Vec<u8>> {
    let mut padded;
    let input = if data.len() < cluster_bytes {
        padded = data.to_vec();
        padded.resize(cluster_bytes, 0);
        &padded[..]
    } else {
        data
    };
    let mut compressor =
        Compress::new_with_window_bits(Compression::default(), false, DEFLATE_WINDOW_BITS);
    let mut out = Vec::with_capacity(cluster_bytes - 1);
    match compressor.compress_vec(input, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) if out.len() < cluster_bytes => Some(out),
        _ => None,
    }
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// Appends a header extension: type, length, data padded to 8 bytes.
fn put_extension(header: &mut Vec<u8>, kind: u32, data: &[u8]) {
    header.extend_from_slice(&kind.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(data);
    header.resize(header.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use crate::formats::qcow2::Qcow2Disk;
    use crate::formats::OpenOptions;

    fn write(
        size: u64,
        options: &Qcow2Options,
        pages: &[(u64, Vec<u8>)],
    ) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut writer = Qcow2Writer::new(size, options, "test").unwrap();
        for (offset, data) in pages {
            writer.write_data(file.as_file(), *offset, data).unwrap();
        }
        writer.finish(file.as_file()).unwrap();
        file
    }

    #[test]
    fn the_reader_reads_back_plain_and_compressed_clusters() {
        for compress in [false, true] {
            let options = Qcow2Options {
                cluster_bytes: 4096,
                compress,
                backing: None,
            };
            let mut page: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
            page[4096..8192].fill(0);
            let file = write(1 << 20, &options, &[(8192, page.clone())]);
            let disk = Qcow2Disk::open(file.path(), &OpenOptions::default()).unwrap();
            let mut back = vec![0u8; 1 << 20];
            disk.read_sectors(0, &mut back).unwrap();
            assert_eq!(&back[8192..8192 + page.len()], &page[..]);
            assert!(back[..8192].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn a_cluster_size_out_of_range_is_refused() {
        for cluster_bytes in [256, 3000, 4 << 20] {
            let options = Qcow2Options {
                cluster_bytes,
                ..Qcow2Options::default()
            };
            assert!(Qcow2Writer::new(1 << 20, &options, "t").is_err());
        }
    }
}
