//! Handles: the objects C holds, and the registry that validates them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::types::{COWOVL, HVDDR, VDDR};
use super::{api, legacy};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::overlay::Overlay;

/// What a handle holds.
pub(crate) enum Object {
    Disk(Box<dyn Disk>),
    Overlay(Box<Overlay>),
}

impl Object {
    pub(crate) fn disk(&mut self) -> &mut dyn Disk {
        match self {
            Object::Disk(d) => d.as_mut(),
            Object::Overlay(o) => o.as_mut(),
        }
    }

    pub(crate) fn overlay(&mut self) -> Result<&mut Overlay> {
        match self {
            Object::Overlay(o) => Ok(o.as_mut()),
            Object::Disk(_) => Err(Error::NotOverlay(
                "this handle is a disk, not an overlay (create one with COW_CreateCowOverlay)"
                    .into(),
            )),
        }
    }

    pub(crate) fn into_disk(self) -> Box<dyn Disk> {
        match self {
            Object::Disk(d) => d,
            Object::Overlay(o) => o,
        }
    }
}

/// The memory a handle points at: the method table first (the legacy
/// layout), so C can call `h->ReadPage(h, ...)`.
#[repr(C)]
struct HandleMemory {
    table: COWOVL,
}

/// The method table of every handle the library makes. Non-overlay disks
/// carry the edit methods too; they fail with COW_ERR_NOT_OVERLAY.
fn method_table() -> COWOVL {
    COWOVL {
        vddr: VDDR {
            GetDriveType: Some(api::COW_GetDriveType),
            GetDriveSize: Some(legacy::get_drive_size),
            GetDriveBlockCount: Some(api::COW_GetDriveBlockCount),
            BlockStatus: Some(legacy::block_status),
            GetDriveUUID: Some(legacy::get_drive_uuid),
            IsSnapshot: Some(legacy::is_snapshot),
            ReadPage: Some(api::COW_ReadPage),
            ReadSectors: Some(legacy::read_sectors),
            Close: Some(api::COW_Close),
        },
        InsertSectors: Some(legacy::insert_sectors),
        MoveSectors: Some(legacy::move_sectors),
        WriteSectors: Some(legacy::write_sectors),
        DeleteSectors: Some(legacy::delete_sectors),
        DiscardSectors: Some(legacy::discard_sectors),
    }
}

/// A live handle: its object, behind the lock that serialises calls. The
/// object is `None` once taken (closed, or adopted by an overlay).
pub(crate) struct Handle {
    object: Mutex<Option<Object>>,
}

type Registry = Mutex<HashMap<usize, Arc<Handle>>>;

fn registry() -> MutexGuard<'static, HashMap<usize, Arc<Handle>>> {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // The map itself is never left half-updated by a panic (inserts and
        // removes are single calls), so a poisoned lock is still usable.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes a handle for `object`.
pub(crate) fn register(object: Object) -> HVDDR {
    let memory = Box::into_raw(Box::new(HandleMemory {
        table: method_table(),
    }));
    let handle = Arc::new(Handle {
        object: Mutex::new(Some(object)),
    });
    registry().insert(memory as usize, handle);
    memory.cast::<VDDR>()
}

/// True when `h` is a live handle of this library.
pub(crate) fn is_ours(h: HVDDR) -> bool {
    registry().contains_key(&(h as usize))
}

fn lookup(h: HVDDR) -> Result<Arc<Handle>> {
    if h.is_null() {
        return Err(Error::InvalidHandle("the handle is NULL".into()));
    }
    registry().get(&(h as usize)).cloned().ok_or_else(|| {
        Error::InvalidHandle(format!(
            "{h:p} is not an open handle of this library (closed, or never opened)"
        ))
    })
}

fn lock(handle: &Handle) -> Result<MutexGuard<'_, Option<Object>>> {
    handle.object.lock().map_err(|_| {
        Error::Internal("the handle was damaged by an earlier internal error; close it".into())
    })
}

/// Runs `f` on the object of handle `h`, holding the handle's lock.
pub(crate) fn with_object<T>(h: HVDDR, f: impl FnOnce(&mut Object) -> Result<T>) -> Result<T> {
    let handle = lookup(h)?;
    let mut guard = lock(&handle)?;
    let object = guard
        .as_mut()
        .ok_or_else(|| Error::InvalidHandle(format!("{h:p} was closed")))?;
    f(object)
}

/// Takes the object of handle `h` to build something from it. If `build`
/// fails, the object is put back and the handle stays valid; if it
/// succeeds, the handle is retired (the object now belongs to the result).
pub(crate) fn adopt<T>(
    h: HVDDR,
    build: impl FnOnce(Object) -> std::result::Result<T, (Object, Error)>,
) -> Result<T> {
    let handle = lookup(h)?;
    let mut guard = lock(&handle)?;
    let object = guard
        .take()
        .ok_or_else(|| Error::InvalidHandle(format!("{h:p} was closed")))?;
    match build(object) {
        Ok(value) => {
            drop(guard);
            retire(h);
            Ok(value)
        }
        Err((object, error)) => {
            *guard = Some(object);
            Err(error)
        }
    }
}

/// Retires handle `h` and gives its object to the caller (to close).
pub(crate) fn take(h: HVDDR) -> Result<Object> {
    let handle = lookup(h)?;
    let object = lock(&handle)?
        .take()
        .ok_or_else(|| Error::InvalidHandle(format!("{h:p} was closed")));
    retire(h);
    object
}

/// How many retired handles keep their memory before it is freed. While a
/// retired handle's memory is held, no new handle can get its address, so a
/// stale handle is reliably refused (COW_ERR_INVHANDLE), and calls through
/// its method table still land in the library instead of freed memory.
const QUARANTINE: usize = 4096;

/// Removes `h` from the registry, once, and moves its memory to the
/// quarantine of retired handles.
fn retire(h: HVDDR) {
    if registry().remove(&(h as usize)).is_none() {
        return;
    }
    // SAFETY: registered addresses come from Box::into_raw in `register`,
    // and removal from the registry happens once.
    let memory = unsafe { Box::from_raw(h.cast::<HandleMemory>()) };
    static RETIRED: Mutex<VecDeque<Box<HandleMemory>>> = Mutex::new(VecDeque::new());
    let mut retired = RETIRED.lock().unwrap_or_else(|p| p.into_inner());
    retired.push_back(memory);
    if retired.len() > QUARANTINE {
        retired.pop_front();
    }
}
