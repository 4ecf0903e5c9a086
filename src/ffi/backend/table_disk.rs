//! A caller's C table as a [`Disk`] (`TableDisk`), and the open policy of
//! VDDR_Open: caller tables probed first, then the built-in formats.
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::CString;
use std::os::raw::c_void;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::registry::registered;
use super::table::{error_from_code, table_name, COW_BACKEND};
use crate::disk::{check_range, sectors_in, Disk, DriveType, SectorStatus, SECTOR_SIZE};
use crate::error::{code, Error, Result};
use crate::ffi::types::{COW_IMAGE_DIFF, COW_OPEN_FOLLOW_PARENTS, COW_OPEN_REPAIR, S_UUID};
use crate::formats::{self, registry, ImageOpenOptions, OpenOptions};

// ---------------------------------------------------------------------------
// A caller's backend as a Disk

/// An image opened through a caller's table. The table is copied at open,
/// so the caller's table need not outlive the disk.
pub(crate) struct TableDisk {
    table: COW_BACKEND,
    name: String,
    data: *mut c_void,
    bytes: u64,
    /// Held across every call into the backend once it is open: a backend
    /// was never promised concurrent calls, so reads of an overlay over it
    /// from several threads reach it one at a time.
    one_call: Mutex<()>,
}

// SAFETY: the backend data is used from whichever thread uses the disk
// (the header documents that a backend must allow that), one call at a
// time (`one_call`).
unsafe impl Send for TableDisk {}
// SAFETY: shared use only reaches the backend under `one_call`.
unsafe impl Sync for TableDisk {}

impl TableDisk {
    pub(super) unsafe fn open(table: COW_BACKEND, path: &Path, flags: u32) -> Result<TableDisk> {
        // SAFETY: validated table.
        let name = unsafe { table_name(&table) };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::invalid_argument("path contains a NUL byte".into()))?;
        let open = table
            .pfnOpen
            .ok_or_else(|| Error::internal("validated table lacks pfnOpen".into()))?;
        let mut data: *mut c_void = std::ptr::null_mut();
        // SAFETY: the caller's backend, called as the table documents.
        let rc = unsafe { open(c.as_ptr(), flags, &mut data) };
        if rc != 0 {
            return Err(error_from_code(
                rc,
                format!("backend '{name}' could not open {}", path.display()),
            ));
        }
        let mut disk = TableDisk {
            table,
            name,
            data,
            bytes: 0,
            one_call: Mutex::new(()),
        };
        if let Some(size) = table.pfnGetSize {
            // SAFETY: as above.
            disk.bytes = unsafe { size(data) };
        }
        Ok(disk)
    }

    /// Reads `buf` from byte `offset` (inside the disk's bytes), returning
    /// the combined status.
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let read = self
            .table
            .pfnRead
            .ok_or_else(|| Error::internal("validated table lacks pfnRead".into()))?;
        let _one = self.one_call();
        let mut status = SectorStatus::NotAlloc;
        let mut done = 0usize;
        while done < buf.len() {
            let want = buf.len() - done;
            let mut got = 0usize;
            let at = offset + done as u64;
            // SAFETY: the caller's backend; the buffer holds `want` bytes.
            let rc = unsafe {
                read(
                    self.data,
                    at,
                    want,
                    buf[done..].as_mut_ptr().cast(),
                    &mut got,
                )
            };
            let rc_code = rc as u32;
            let part = match rc_code {
                code::NONE => SectorStatus::Normal,
                code::BLOCK_FREE => SectorStatus::NotAlloc,
                _ => {
                    return Err(error_from_code(
                        rc,
                        format!("backend '{}' pfnRead at byte {at} (+{want})", self.name),
                    ))
                }
            };
            if got == 0 || got > want {
                return Err(Error::read_failed(format!(
                    "backend '{}' pfnRead at byte {at} reported {got} bytes of {want}",
                    self.name
                )));
            }
            if part == SectorStatus::NotAlloc {
                buf[done..done + got].fill(0);
            }
            status = status.combine(part);
            done += got;
        }
        Ok(status)
    }
}

impl TableDisk {
    fn one_call(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data: a panic elsewhere leaves nothing torn.
        self.one_call.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Disk for TableDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Custom
    }
    fn sector_count(&self) -> u64 {
        self.bytes.div_ceil(SECTOR_SIZE as u64)
    }
    fn byte_size(&self) -> u64 {
        self.bytes
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        let get = self.table.pfnGetUuid?;
        let mut u = S_UUID::default();
        let _one = self.one_call();
        // SAFETY: the caller's backend with a valid out pointer.
        (unsafe { get(self.data, &mut u) } == 0).then_some(u.to_rfc())
    }
    fn is_snapshot(&self) -> bool {
        match self.table.pfnGetImageFlags {
            Some(f) => {
                let _one = self.one_call();
                // SAFETY: the caller's backend.
                (unsafe { f(self.data) } & COW_IMAGE_DIFF) != 0
            }
            None => false,
        }
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<SectorStatus> {
        let count = sectors_in(buf.len())?;
        check_range(lba, count, self.sector_count())?;
        let offset = lba * SECTOR_SIZE as u64;
        // The tail past an odd-sized disk's last byte is zero padding.
        let inside = self.bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(SectorStatus::NotAlloc);
        }
        self.read_bytes(offset, head)
    }
    fn block_status(&self, lba: u64, count: u64) -> Result<SectorStatus> {
        // The table has no status call: read (1 MiB at a time) and look at
        // what pfnRead says, stopping at the first data.
        check_range(lba, count, self.sector_count())?;
        let mut status = SectorStatus::NotAlloc;
        let mut scratch = vec![0u8; 2048 * SECTOR_SIZE];
        let mut done = 0;
        while done < count && status != SectorStatus::Normal {
            let n = (count - done).min(2048);
            let part = &mut scratch[..n as usize * SECTOR_SIZE];
            status = status.combine(self.read_sectors(lba + done, part)?);
            done += n;
        }
        Ok(status)
    }
}

impl Drop for TableDisk {
    fn drop(&mut self) {
        if let Some(close) = self.table.pfnClose {
            // SAFETY: we own the backend data; pfnClose is its destructor.
            unsafe { close(self.data, 0) };
        }
    }
}

/// Opens `path` read-only as a disk: the registered caller backends are
/// probed first (in registration order), then the built-in formats (raw
/// last). Used by VDDR_Open/VDDR_OpenEx.
pub(crate) fn open_probing(path: &Path, flags: u32) -> Result<Box<dyn Disk>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid_argument("path contains a NUL byte".into()))?;
    for table in registered() {
        // SAFETY: registered tables are kept alive by the caller until
        // unregistered (documented), and were validated at registration.
        let t = unsafe { *table };
        if let Some(probe) = t.pfnProbe {
            // SAFETY: the caller's backend.
            if unsafe { probe(c.as_ptr()) } == 0 {
                // SAFETY: validated table.
                return Ok(Box::new(unsafe { TableDisk::open(t, path, flags) }?));
            }
        }
    }
    let options = OpenOptions {
        follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
    };
    if flags & COW_OPEN_REPAIR != 0 {
        let info = registry::detect(path)?.info();
        if let (true, Some(open_image)) = (info.repairs, info.open_image) {
            return Ok(open_image(path, &repairing_read_only(true))?);
        }
    }
    formats::open_path(path, &options)
}

/// Image-open options for a read-only disk handle of a format that can
/// repair: repairing only when the caller asked (COW_OPEN_REPAIR).
pub(super) fn repairing_read_only(repair: bool) -> ImageOpenOptions {
    ImageOpenOptions {
        writable: false,
        follow_backing: false,
        repair,
    }
}
