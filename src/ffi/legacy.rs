//! The method tables' entries where the legacy member types differ from
//! the COW_* functions': `BOOL` and `UINT` are `unsigned int`, `HUGE` is
//! `long long`. Each entry converts its arguments (a negative `HUGE`
//! position is outside every drive) and calls the COW_* function, so the
//! two ways of calling behave the same.

use std::os::raw::{c_int, c_longlong, c_uint, c_void};

use super::types::{HCOW, HVDDR, S_UUID};
use super::{api, handle};
use super::{guard, guard_code, non_null};
use crate::error::{Error, Result};

/// A legacy `HUGE` sector number as ours: negative ones are outside every
/// drive.
fn sector(value: c_longlong, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::invalid_block(format!("{what} {value} is negative")))
}

pub(super) unsafe extern "C" fn get_drive_size(h: HVDDR, bytes: *mut c_longlong) -> c_uint {
    guard(|| {
        let size = handle::read_object(h, |o| Ok(o.disk_ref().byte_size()))?;
        non_null(bytes, "drive_size")?;
        let size = c_longlong::try_from(size)
            .map_err(|_| Error::invalid_argument(format!("a drive of {size} bytes")))?;
        // SAFETY: non-NULL out pointer.
        unsafe { bytes.write(size) };
        Ok(1)
    })
}

pub(super) unsafe extern "C" fn block_status(
    h: HVDDR,
    first: c_longlong,
    last: c_longlong,
) -> c_uint {
    // Sectors below 0 are out of range and count as NOTALLOC, like those
    // past the end; a range wholly below 0 is passed on as an empty one,
    // which is NOTALLOC once the handle is checked.
    let (first, last) = match u64::try_from(last) {
        Ok(last) => (u64::try_from(first).unwrap_or(0), last),
        Err(_) => (1, 0),
    };
    // SAFETY: forwarded contract.
    unsafe { api::COW_BlockStatus(h, first, last) }
}

pub(super) unsafe extern "C" fn get_drive_uuid(h: HVDDR, uuid: *mut S_UUID) -> c_uint {
    // SAFETY: forwarded contract.
    let ok = unsafe { api::COW_GetDriveUUID(h, uuid) };
    c_uint::from(ok != 0)
}

pub(super) unsafe extern "C" fn is_snapshot(h: HVDDR) -> c_uint {
    // SAFETY: forwarded contract.
    let yes = unsafe { api::COW_IsSnapshot(h) };
    c_uint::from(yes != 0)
}

pub(super) unsafe extern "C" fn read_sectors(
    h: HVDDR,
    buf: *mut c_void,
    lba: c_longlong,
    count: c_uint,
) -> c_int {
    match (sector(lba, "LBA"), count) {
        // A zero-sector read is NORMAL wherever it points (legacy).
        (_, 0) => unsafe { api::COW_ReadSectors(h, buf, 0, 0) },
        // SAFETY: forwarded contract.
        (Ok(lba), _) => unsafe { api::COW_ReadSectors(h, buf, lba, count) },
        (Err(e), _) => guard(|| -> Result<c_int> { Err(e) }),
    }
}

pub(super) unsafe extern "C" fn insert_sectors(h: HCOW, lba: c_longlong, count: c_uint) -> c_int {
    match sector(lba, "LBA") {
        // SAFETY: forwarded contract.
        Ok(lba) => unsafe { api::COW_InsertSectors(h, lba, count) },
        Err(e) => guard_code(|| Err(e)),
    }
}

pub(super) unsafe extern "C" fn move_sectors(
    h: HCOW,
    from: c_longlong,
    to: c_longlong,
    count: c_uint,
) -> c_int {
    match (sector(from, "LBA_from"), sector(to, "LBA_to")) {
        // SAFETY: forwarded contract.
        (Ok(from), Ok(to)) => unsafe { api::COW_MoveSectors(h, from, to, count) },
        (Err(e), _) | (_, Err(e)) => guard_code(|| Err(e)),
    }
}

pub(super) unsafe extern "C" fn write_sectors(
    h: HCOW,
    buf: *mut c_void,
    lba: c_longlong,
    count: c_uint,
) -> c_int {
    match sector(lba, "LBA") {
        // SAFETY: forwarded contract.
        Ok(lba) => unsafe { api::COW_WriteSectors(h, buf, lba, count) },
        Err(e) => guard(|| -> Result<c_int> { Err(e) }),
    }
}

pub(super) unsafe extern "C" fn delete_sectors(
    h: HCOW,
    lba: c_longlong,
    count: c_longlong,
) -> c_int {
    match (sector(lba, "LBA"), sector(count, "sector count")) {
        // SAFETY: forwarded contract.
        (Ok(lba), Ok(count)) => unsafe { api::COW_DeleteSectors(h, lba, count) },
        (Err(e), _) | (_, Err(e)) => guard_code(|| Err(e)),
    }
}

pub(super) unsafe extern "C" fn discard_sectors(
    h: HCOW,
    lba: c_longlong,
    count: c_longlong,
) -> c_int {
    match (sector(lba, "LBA"), sector(count, "sector count")) {
        // SAFETY: forwarded contract.
        (Ok(lba), Ok(count)) => unsafe { api::COW_DiscardSectors(h, lba, count) },
        (Err(e), _) | (_, Err(e)) => guard_code(|| Err(e)),
    }
}
