//! A caller's own legacy disk object (any struct starting with a VDDR
//! table) used as an overlay source.

use std::os::raw::{c_longlong, c_void};
use std::sync::{Mutex, MutexGuard};

use super::types::{HVDDR, S_UUID};
use crate::disk::{check_range, sectors_in, Disk, DriveType, SectorStatus, SECTOR_SIZE};
use crate::error::{Error, Result};

/// Sectors per call into the caller's ReadSectors (its count is 32-bit).
const SECTORS_PER_CALL: u64 = 1 << 16;

/// A caller's VDDR object. Owned once the overlay adopts it: dropping it
/// calls the object's own Close.
pub(crate) struct CallerDisk {
    object: HVDDR,
    sectors: u64,
    bytes: u64,
    /// Held across every call into the object: a caller's object was never
    /// promised concurrent calls, so reads of an overlay over it from
    /// several threads reach it one at a time.
    one_call: Mutex<()>,
}

// SAFETY: the object is called from whichever thread uses the overlay
// (documented in the header: a caller's source must tolerate calls from
// any thread that uses the overlay), one call at a time (`one_call`).
unsafe impl Send for CallerDisk {}
// SAFETY: shared use only reaches the object under `one_call`.
unsafe impl Sync for CallerDisk {}

impl CallerDisk {
    /// Wraps a caller's object, asking its size. Fails (leaving the object
    /// to the caller) when the table lacks GetDriveSize or ReadSectors or
    /// the size cannot be read.
    ///
    /// # Safety
    /// `object` must point to a live struct starting with a VDDR table.
    pub(crate) unsafe fn new(object: HVDDR) -> Result<CallerDisk> {
        // SAFETY: the caller promises a live object with a VDDR table.
        let table = unsafe { &*object };
        let (Some(get_size), Some(_)) = (table.GetDriveSize, table.ReadSectors) else {
            return Err(Error::invalid_handle(
                "the source object's method table lacks GetDriveSize or ReadSectors".into(),
            ));
        };
        let mut bytes: c_longlong = 0;
        before_call();
        // SAFETY: a method of the caller's own object, called as documented.
        if unsafe { get_size(object, &mut bytes) } == 0 {
            return Err(Error::read_failed(format!(
                "the source object's GetDriveSize failed{}",
                its_error()
            )));
        }
        let bytes = u64::try_from(bytes).map_err(|_| {
            Error::read_failed(format!(
                "the source object's GetDriveSize gave a negative size ({bytes})"
            ))
        })?;
        Ok(CallerDisk {
            object,
            sectors: bytes.div_ceil(SECTOR_SIZE as u64),
            bytes,
            one_call: Mutex::new(()),
        })
    }

    fn table(&self) -> &super::types::VDDR {
        // SAFETY: `object` is live for as long as we own it.
        unsafe { &*self.object }
    }

    /// Stops owning the object without closing it.
    pub(crate) fn release(self) -> HVDDR {
        let object = self.object;
        std::mem::forget(self);
        object
    }
}

/// Clears the thread's last error before calling a legacy method, so a
/// code the method sets (`VDDR_LastError = code;`) can be told apart.
fn before_call() {
    // SAFETY: the calling thread's own error cell.
    unsafe { super::last_error_location().write(0) };
}

/// The code a failed legacy method set in `VDDR_LastError`, for messages.
fn its_error() -> String {
    match super::last_error_code() {
        0 => String::new(),
        code => format!(" (its error code {code:#x})"),
    }
}

fn status_from(code: u32, what: &str) -> Result<SectorStatus> {
    match SectorStatus::from_legacy_code(code) {
        Some(status) => Ok(status),
        None if code == 0 => Err(Error::read_failed(format!(
            "the source object's {what} failed{}",
            its_error()
        ))),
        None => Err(Error::read_failed(format!(
            "the source object's {what} returned an unknown result {code}"
        ))),
    }
}

impl CallerDisk {
    fn one_call(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data: a panic elsewhere leaves nothing torn.
        self.one_call.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A sector number as a legacy `HUGE`. Our sectors come from the object's
/// own `HUGE` size, so they fit; checked anyway.
fn huge(sector: u64) -> Result<c_longlong> {
    c_longlong::try_from(sector)
        .map_err(|_| Error::invalid_block(format!("sector {sector} does not fit a HUGE")))
}

impl Disk for CallerDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Custom
    }
    fn sector_count(&self) -> u64 {
        self.sectors
    }
    fn byte_size(&self) -> u64 {
        self.bytes
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        let get = self.table().GetDriveUUID?;
        let _one = self.one_call();
        let mut uuid = S_UUID::default();
        // SAFETY: a method of the caller's object with a valid out pointer.
        (unsafe { get(self.object, &mut uuid) } != 0).then_some(uuid.to_rfc())
    }
    fn is_snapshot(&self) -> bool {
        match self.table().IsSnapshot {
            Some(f) => {
                let _one = self.one_call();
                // SAFETY: a method of the caller's object.
                unsafe { f(self.object) != 0 }
            }
            None => false,
        }
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.sectors)?;
        let read = self
            .table()
            .ReadSectors
            .ok_or_else(|| Error::invalid_handle("the source object has no ReadSectors".into()))?;
        let _one = self.one_call();
        let mut status = SectorStatus::NotAlloc;
        for (i, chunk) in buf
            .chunks_mut(SECTORS_PER_CALL as usize * SECTOR_SIZE)
            .enumerate()
        {
            let at = lba + i as u64 * SECTORS_PER_CALL;
            let n = (chunk.len() / SECTOR_SIZE) as u32;
            let at_huge = huge(at)?;
            before_call();
            // SAFETY: `chunk` holds exactly `n` sectors.
            let code =
                unsafe { read(self.object, chunk.as_mut_ptr().cast::<c_void>(), at_huge, n) };
            let chunk_status = status_from(code as u32, "ReadSectors")
                .map_err(|e| Error::read_failed(format!("{e} at sector {at} (+{n})")))?;
            if chunk_status != SectorStatus::Normal {
                chunk.fill(0);
            }
            status = status.combine(chunk_status);
        }
        Ok(status)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        check_range(lba, count, self.sectors)?;
        if count == 0 {
            return Ok(SectorStatus::NotAlloc);
        }
        match self.table().BlockStatus {
            // SAFETY: a method of the caller's object; the range is inclusive.
            Some(f) => {
                let (first, last) = (huge(lba)?, huge(lba + count - 1)?);
                let _one = self.one_call();
                before_call();
                status_from(unsafe { f(self.object, first, last) }, "BlockStatus")
            }
            // Without metadata, every sector may hold data.
            None => Ok(SectorStatus::Normal),
        }
    }
}

impl Drop for CallerDisk {
    fn drop(&mut self) {
        if let Some(close) = self.table().Close {
            // SAFETY: we own the object; Close is its destructor.
            unsafe { close(self.object) };
        }
    }
}
