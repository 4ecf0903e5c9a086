//! Reads: sector data and status runs from the extent map and the
//! source, and zero detection.

use super::extents::{Extent, ExtentKind};
use super::{byte_index, Overlay, COPY_CHUNK_SECTORS};
use crate::disk::{check_range, is_zero, sectors_in, Disk, SectorStatus, SECTOR_SIZE};

thread_local! {
    /// The scratch buffer of grouped source reads.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
use crate::error::{Error, Result};

impl Overlay {
    /// The status of sector `lba` from the extent map and the source's
    /// metadata, without zero detection, and how many of the `count`
    /// sectors from `lba` share it (`count > 0`, inside the drive). Stops
    /// at the first sector whose status differs.
    pub(super) fn status_run_unfiltered(
        &self,
        lba: u64,
        count: u64,
    ) -> Result<(SectorStatus, u64)> {
        let end = lba + count;
        let mut first: Option<SectorStatus> = None;
        let mut pos = lba;
        while pos < end {
            let (start, extent) = self.map.find(pos).ok_or_else(|| {
                Error::internal(format!("extent map has no extent for sector {pos}"))
            })?;
            let piece = (start + extent.len).min(end) - pos;
            let (status, n) = match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole => (SectorStatus::NotAlloc, piece),
                ExtentKind::StoreZero => (SectorStatus::Blank, piece),
                ExtentKind::Store => (SectorStatus::Normal, piece),
                ExtentKind::Source => {
                    let from = extent.base + (pos - start);
                    let (status, n) = self.source.status_run(from, piece)?;
                    if n == 0 || n > piece {
                        return Err(Error::internal(format!(
                            "source reported a status run of {n} sectors at sector \
                             {from} when {piece} were asked"
                        )));
                    }
                    (status, n)
                }
            };
            match first {
                None => first = Some(status),
                Some(s) if s != status => break,
                Some(_) => {}
            }
            pos += n;
        }
        let status = first.ok_or_else(|| {
            Error::invalid_argument("the status run of zero sectors was asked".into())
        })?;
        Ok((status, pos - lba))
    }

    /// Reads through the extent map without zero detection.
    ///
    /// Source pieces that continue each other in the source, with only
    /// zero-reading pieces (inserted space, store holes) between them, are
    /// read from the source in one call and spread out: an overlay with
    /// space inserted every few sectors would otherwise cost one source
    /// read per piece.
    pub(super) fn read_unfiltered(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.map.len())?;
        self.map.with_range(lba, lba + count, |pieces| {
            self.read_pieces(lba, pieces, buf)
        })
    }

    /// Reads `pieces` (the map's pieces of a read from `lba`) into `buf`.
    fn read_pieces(
        &self,
        lba: u64,
        pieces: &[(u64, Extent)],
        buf: &mut [u8],
    ) -> Result<SectorStatus> {
        let mut status = SectorStatus::NotAlloc;
        let mut i = 0;
        while i < pieces.len() {
            let (start, extent) = pieces[i];
            if extent.kind == ExtentKind::Source {
                let group = source_group(&pieces[i..]);
                if group > 1 {
                    status =
                        status.combine(self.read_source_group(lba, &pieces[i..i + group], buf)?);
                    i += group;
                    continue;
                }
            }
            let part = &mut buf[byte_index(start - lba)..byte_index(start - lba + extent.len)];
            let part_status = match extent.kind {
                ExtentKind::None => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::Source => self.source.read_sectors(extent.base, part)?,
                ExtentKind::Store => {
                    self.store.read_at(part, self.store_byte(extent.base))?;
                    SectorStatus::Normal
                }
                // Reserved store space was never written for these sectors:
                // the store's bytes there are stale and never read.
                ExtentKind::StoreHole => {
                    part.fill(0);
                    SectorStatus::NotAlloc
                }
                ExtentKind::StoreZero => {
                    part.fill(0);
                    SectorStatus::Blank
                }
            };
            status = status.combine(part_status);
            i += 1;
        }
        Ok(status)
    }

    /// Reads a group found by [`source_group`] (first and last pieces from
    /// the source) with one source read into a scratch buffer.
    fn read_source_group(
        &self,
        lba: u64,
        group: &[(u64, Extent)],
        buf: &mut [u8],
    ) -> Result<SectorStatus> {
        let sources = || group.iter().filter(|(_, e)| e.kind == ExtentKind::Source);
        let from = group[0].1.base;
        let sectors: u64 = sources().map(|(_, e)| e.len).sum();
        // At most the caller's buffer: the pieces are part of it. Placed
        // half a page from the source offset's place in a page, where the
        // kernel copies fastest (see `file_io`); kept per thread, since an
        // overlay with space inserted every few sectors does this on
        // nearly every read.
        let len = byte_index(sectors);
        SCRATCH.with(|cell| {
            let mut own = Vec::new();
            let mut kept = cell.try_borrow_mut();
            let space = match kept.as_deref_mut() {
                Ok(space) => space,
                Err(_) => &mut own,
            };
            let scratch = crate::file_io::well_placed(space, from * SECTOR_SIZE as u64, len);
            let mut status = self.source.read_sectors(from, scratch)?;
            for (start, extent) in group {
                let part = &mut buf[byte_index(start - lba)..byte_index(start - lba + extent.len)];
                match extent.kind {
                    ExtentKind::Source => {
                        let at = byte_index(extent.base - from);
                        part.copy_from_slice(&scratch[at..at + part.len()]);
                    }
                    ExtentKind::StoreZero => {
                        part.fill(0);
                        status = status.combine(SectorStatus::Blank);
                    }
                    _ => part.fill(0),
                }
            }
            Ok(status)
        })
    }

    /// Block status from the extent map and the source's metadata.
    pub(super) fn status_unfiltered(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        let mut status = SectorStatus::NotAlloc;
        for (_, extent) in self.map.range(lba, lba + count) {
            let part_status = match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole => SectorStatus::NotAlloc,
                ExtentKind::StoreZero => SectorStatus::Blank,
                ExtentKind::Source => self.source.block_status(extent.base, extent.len)?,
                ExtentKind::Store => SectorStatus::Normal,
            };
            status = status.combine(part_status);
            if status == SectorStatus::Normal {
                break;
            }
        }
        Ok(status)
    }

    /// Whether `[lba, lba + count)` reads as zeros, from the extent map:
    /// inserted (unallocated) extents and reserved-but-unwritten store
    /// space (holes, known zeros) are zeros by definition and are not read, source extents are asked of the source (an overlay below
    /// answers from its own map), store extents are read. Found by fuzzing
    /// the C API: a block status with zero detection over a huge inserted
    /// range, or over an overlay stacked on one, read terabytes of zeros.
    pub(super) fn zeros_in(&self, lba: u64, count: u64) -> Result<bool> {
        let mut buf = Vec::new();
        for (start, extent) in self.map.range(lba, lba + count) {
            match extent.kind {
                ExtentKind::None | ExtentKind::StoreHole | ExtentKind::StoreZero => continue,
                ExtentKind::Source => {
                    if !self.source.reads_as_zeros(extent.base, extent.len)? {
                        return Ok(false);
                    }
                }
                ExtentKind::Store => {
                    let end = start + extent.len;
                    let mut pos = start;
                    while pos < end {
                        let n = (end - pos).min(COPY_CHUNK_SECTORS);
                        buf.resize(byte_index(n), 0);
                        self.read_unfiltered(pos, &mut buf)?;
                        if !is_zero(&buf) {
                            return Ok(false);
                        }
                        pos += n;
                    }
                }
            }
        }
        Ok(true)
    }
}

/// How many of `pieces` (the first from the source) form a group one
/// source read can serve: source pieces that each continue the previous
/// one in the source, with only zero-reading pieces between them; the group
/// ends with a source piece. 1 when no later piece joins.
fn source_group(pieces: &[(u64, Extent)]) -> usize {
    let mut next_base = pieces[0].1.base + pieces[0].1.len;
    let mut group = 1;
    for (i, (_, extent)) in pieces.iter().enumerate().skip(1) {
        match extent.kind {
            ExtentKind::Source if extent.base == next_base => {
                next_base += extent.len;
                group = i + 1;
            }
            ExtentKind::None | ExtentKind::StoreHole | ExtentKind::StoreZero => {}
            _ => break,
        }
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{MemDisk, SECTOR_SIZE};
    use crate::overlay::OverlayOptions;

    /// Every sector tagged with its source sector; statuses cycle so the
    /// combined status of a read is not always `Normal`.
    fn source(sectors: u64) -> (MemDisk, Vec<SectorStatus>) {
        let statuses: Vec<SectorStatus> = (0..sectors)
            .map(|s| match s % 7 {
                3 => SectorStatus::NotAlloc,
                5 => SectorStatus::Blank,
                _ => SectorStatus::Normal,
            })
            .collect();
        let mut data = vec![0u8; sectors as usize * SECTOR_SIZE];
        for (s, sector) in data.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            if statuses[s] == SectorStatus::Normal {
                sector.fill(s as u8 | 1);
                sector[..8].copy_from_slice(&(s as u64).to_le_bytes());
            }
        }
        (MemDisk::new(data, statuses.clone()).unwrap(), statuses)
    }

    #[test]
    fn reads_across_inserted_sectors_equal_a_per_sector_model() {
        // 1200 inserted sectors: 2400 extents, enough for the flat index
        // (1024), which the reads below build and then read through.
        let sectors = 6000u64;
        let (disk, statuses) = source(sectors);
        let expected_source = disk.data().to_vec();
        let options = OverlayOptions {
            granularity: 64,
            ..OverlayOptions::default()
        };
        let mut ov = Overlay::new(Box::new(disk), options).unwrap();
        // The model: per virtual sector, its bytes and status.
        let mut model: Vec<(Vec<u8>, SectorStatus)> = (0..sectors as usize)
            .map(|s| {
                let bytes = expected_source[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE].to_vec();
                (bytes, statuses[s])
            })
            .collect();
        // One inserted sector every 5 (from the end, so positions hold),
        // and two written sectors (a write copies its whole unit, here 64
        // sectors, into the store: the first unit's pieces are store
        // pieces, which end a group).
        for at in (1..sectors).rev().filter(|s| s % 5 == 0) {
            ov.insert(at, 1).unwrap();
            model.insert(at as usize, (vec![0; SECTOR_SIZE], SectorStatus::NotAlloc));
        }
        for at in [7u64, 30] {
            let data = vec![0xEE; SECTOR_SIZE];
            ov.write(at, &data).unwrap();
            model[at as usize] = (data, SectorStatus::Normal);
        }
        assert!(!ov.map.has_flat_index());
        let mut grouped = 0;
        for lba in 0..model.len() as u64 {
            for count in 1..=(model.len() as u64 - lba).min(24) {
                let pieces = ov.map.range(lba, lba + count);
                if pieces
                    .first()
                    .is_some_and(|(_, e)| e.kind == ExtentKind::Source)
                    && source_group(&pieces) > 1
                {
                    grouped += 1;
                }
                let mut buf = vec![0x55; count as usize * SECTOR_SIZE];
                let status = ov.read_unfiltered(lba, &mut buf).unwrap();
                let mut want_status = SectorStatus::NotAlloc;
                for k in 0..count as usize {
                    let (bytes, st) = &model[lba as usize + k];
                    let got = &buf[k * SECTOR_SIZE..(k + 1) * SECTOR_SIZE];
                    assert_eq!(got, &bytes[..], "sector {} of read ({lba}, {count})", k);
                    want_status = want_status.combine(*st);
                }
                assert_eq!(status, want_status, "status of read ({lba}, {count})");
            }
        }
        assert!(grouped > 1000, "only {grouped} reads took the grouped path");
        assert!(ov.map.has_flat_index(), "the reads never built the index");
    }
}
