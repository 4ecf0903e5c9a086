//! Writes: copy-on-write into store units, with reserved store space
//! (holes) keeping its old status.

use super::extents::{Extent, ExtentKind};
use super::{byte_index, push_joined, Overlay, COPY_CHUNK_SECTORS};
use crate::disk::{check_range, sectors_in, SectorStatus, SECTOR_BYTES, SECTOR_SIZE};
use crate::error::Result;

impl Overlay {
    pub(super) fn store_byte(&self, sector: u64) -> u64 {
        self.data_offset + sector * SECTOR_BYTES
    }

    /// Writes whole sectors at `lba`, copying on write (see the module doc).
    /// The source is never written.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<()> {
        let count = sectors_in(data.len())?;
        let size = self.map.len();
        check_range(lba, count, size)?;
        if count == 0 {
            return Ok(());
        }
        self.check_writable()?;
        let g = self.options.granularity;
        let end = lba + count;
        let unit_start = lba / g * g;
        let unit_end = end.div_ceil(g).saturating_mul(g).min(size);
        let pieces = self.map.range(unit_start, unit_end);
        let mut i = 0;
        while i < pieces.len() {
            let (start, extent) = pieces[i];
            if self.in_place(&extent) {
                let from = start.max(lba);
                let to = (start + extent.len).min(end);
                if from < to {
                    let bytes = &data[byte_index(from - lba)..byte_index(to - lba)];
                    let store_sector = extent.base + (from - start);
                    self.store.write_at(bytes, self.store_byte(store_sector))?;
                    if extent.kind != ExtentKind::Store {
                        // Reserved space now holds data: exactly the
                        // written sectors become `Store`, on the same store
                        // sectors, so the unit references do not change.
                        self.map.replace(
                            from,
                            to - from,
                            Extent {
                                len: to - from,
                                kind: ExtentKind::Store,
                                base: store_sector,
                            },
                        )?;
                    }
                }
                i += 1;
                continue;
            }
            // A maximal run of pieces that cannot be written in place moves
            // to fresh store units, if the write touches it. One it does not
            // touch (beside store space in the same unit) stays where it is:
            // with exact status, moving it would only copy data and take a
            // unit that no write needs yet.
            let mut run_end = start + extent.len;
            let mut j = i + 1;
            while j < pieces.len() && !self.in_place(&pieces[j].1) {
                run_end = pieces[j].0 + pieces[j].1.len;
                j += 1;
            }
            if start < end && lba < run_end {
                self.copy_run_to_store(start, run_end, lba, data)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Store space that can take a write in place: in the store (data or
    /// reserved), and not referred to by a durable map (always true for an
    /// anonymous store).
    pub(super) fn in_place(&self, extent: &Extent) -> bool {
        extent.kind.in_store() && self.units.writable_in_place(extent.base, extent.len)
    }

    /// Moves the virtual run `[run_start, run_end)` into fresh store units:
    /// the part inside the write `[lba, lba + data)` is written from `data`
    /// and becomes `Store`; of the rest, only sectors that held data are
    /// copied (and stay data), while unallocated and blank sectors keep
    /// their status as reserved store space (`StoreHole`, `StoreZero`).
    pub(super) fn copy_run_to_store(
        &mut self,
        run_start: u64,
        run_end: u64,
        lba: u64,
        data: &[u8],
    ) -> Result<()> {
        let len = run_end - run_start;
        let write_end = lba + (data.len() / SECTOR_SIZE) as u64;
        let data_from = lba.clamp(run_start, run_end);
        let data_to = write_end.clamp(data_from, run_end);
        let base = self.units.allocate(len)?;
        let filled = (|| {
            let mut extents = Vec::new();
            self.move_old_to_store(run_start, data_from, base, &mut extents)?;
            if data_from < data_to {
                let bytes = &data[byte_index(data_from - lba)..byte_index(data_to - lba)];
                let store_sector = base + (data_from - run_start);
                self.store.write_at(bytes, self.store_byte(store_sector))?;
                push_joined(
                    &mut extents,
                    Extent {
                        len: data_to - data_from,
                        kind: ExtentKind::Store,
                        base: store_sector,
                    },
                );
            }
            self.move_old_to_store(data_to, run_end, base + (data_to - run_start), &mut extents)?;
            Ok(extents)
        })();
        let extents = match filled {
            Ok(extents) => extents,
            Err(e) => {
                self.units.release(base, len);
                return Err(e);
            }
        };
        self.store_file_len = self.store_file_len.max(self.store_byte(base + len));
        let replaced = self.map.splice(run_start, len, &extents)?;
        self.release(&replaced)
    }

    /// Maps what the virtual sectors `[from, to)` show now onto store
    /// sectors from `store_sector`, appending the extents to `extents`:
    /// runs of data are copied and become `Store`; unallocated and blank
    /// runs become `StoreHole` and `StoreZero` without touching the store.
    pub(super) fn move_old_to_store(
        &mut self,
        from: u64,
        to: u64,
        store_sector: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<()> {
        let mut pos = from;
        while pos < to {
            let (status, n) = self.status_run_unfiltered(pos, to - pos)?;
            let at = store_sector + (pos - from);
            let kind = match status {
                SectorStatus::Normal => {
                    self.copy_old_to_store(pos, pos + n, at)?;
                    ExtentKind::Store
                }
                SectorStatus::Blank => ExtentKind::StoreZero,
                SectorStatus::NotAlloc => ExtentKind::StoreHole,
            };
            push_joined(
                extents,
                Extent {
                    len: n,
                    kind,
                    base: at,
                },
            );
            pos += n;
        }
        Ok(())
    }

    pub(super) fn copy_old_to_store(
        &mut self,
        from: u64,
        to: u64,
        store_sector: u64,
    ) -> Result<()> {
        let mut buf = Vec::new();
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(COPY_CHUNK_SECTORS);
            buf.resize(byte_index(n), 0);
            self.read_unfiltered(pos, &mut buf)?;
            let at = self.store_byte(store_sector + (pos - from));
            self.store.write_at(&buf, at)?;
            pos += n;
        }
        Ok(())
    }
}
