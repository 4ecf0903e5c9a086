//! Handles: the objects C holds, and the registry that validates them.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::registry::Registry;
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

    /// The object as a disk, for reading: shared, so several threads can
    /// read one handle at once.
    pub(crate) fn disk_ref(&self) -> &dyn Disk {
        match self {
            Object::Disk(d) => d.as_ref(),
            Object::Overlay(o) => o.as_ref(),
        }
    }

    /// The object as an overlay, for reading its map.
    pub(crate) fn overlay_ref(&self) -> Result<&Overlay> {
        match self {
            Object::Overlay(o) => Ok(o.as_ref()),
            Object::Disk(_) => Err(not_an_overlay()),
        }
    }

    pub(crate) fn overlay(&mut self) -> Result<&mut Overlay> {
        match self {
            Object::Overlay(o) => Ok(o.as_mut()),
            Object::Disk(_) => Err(not_an_overlay()),
        }
    }

    pub(crate) fn into_disk(self) -> Box<dyn Disk> {
        match self {
            Object::Disk(d) => d,
            Object::Overlay(o) => o,
        }
    }

    /// The inverse of [`Object::into_disk`]: an overlay comes back as an
    /// overlay, so a handle given back after a failed adoption keeps its
    /// overlay methods.
    pub(crate) fn from_disk(disk: Box<dyn Disk>) -> Object {
        let concrete: &dyn std::any::Any = disk.as_ref();
        if !concrete.is::<Overlay>() {
            return Object::Disk(disk);
        }
        let any: Box<dyn std::any::Any> = disk;
        match any.downcast::<Overlay>() {
            Ok(overlay) => Object::Overlay(overlay),
            Err(_) => unreachable!("checked to be an Overlay just above"),
        }
    }
}

fn not_an_overlay() -> Error {
    Error::not_overlay(
        "this handle is a disk, not an overlay (create one with COW_CreateCowOverlay)".into(),
    )
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

/// A live handle: its object, behind a readers-writer lock: reads and
/// block status share it (any number of threads at once), everything that
/// changes the object (writes, edits, flush, close, a clone) holds it
/// alone. The object is `None` once taken (closed, or adopted by an
/// overlay).
pub(crate) struct Handle {
    object: RwLock<Option<Object>>,
}

/// The live handles, keyed by the address of their memory (validate-then-
/// pin; retired handles keep their memory in a quarantine for a while, so
/// no new handle gets the address of a stale one, which is reliably
/// refused with COW_ERR_INVHANDLE, and calls through its method table
/// still land in the library instead of freed memory).
static HANDLES: Registry<HandleMemory, Handle> = Registry::new();

/// Makes a handle for `object`.
pub(crate) fn register(object: Object) -> HVDDR {
    let memory = Box::new(HandleMemory {
        table: method_table(),
    });
    let handle = Handle {
        object: RwLock::new(Some(object)),
    };
    HANDLES.insert(memory, handle).cast::<VDDR>()
}

/// True when `h` is a live handle of this library.
pub(crate) fn is_ours(h: HVDDR) -> bool {
    HANDLES.contains(h as usize)
}

fn lookup(h: HVDDR) -> Result<Arc<Handle>> {
    if h.is_null() {
        return Err(Error::invalid_handle("the handle is NULL".into()));
    }
    HANDLES.get(h as usize).ok_or_else(|| {
        Error::invalid_handle(format!(
            "{h:p} is not an open handle of this library (closed, or never opened)"
        ))
    })
}

fn damaged() -> Error {
    Error::internal("the handle was damaged by an earlier internal error; close it".into())
}

fn lock(handle: &Handle) -> Result<RwLockWriteGuard<'_, Option<Object>>> {
    handle.object.write().map_err(|_| damaged())
}

fn lock_shared(handle: &Handle) -> Result<RwLockReadGuard<'_, Option<Object>>> {
    handle.object.read().map_err(|_| damaged())
}

/// Runs `f` on the object of handle `h`, holding the handle's lock alone:
/// for calls that change the object.
pub(crate) fn with_object<T>(h: HVDDR, f: impl FnOnce(&mut Object) -> Result<T>) -> Result<T> {
    let handle = lookup(h)?;
    let mut guard = lock(&handle)?;
    let object = guard
        .as_mut()
        .ok_or_else(|| Error::invalid_handle(format!("{h:p} was closed")))?;
    f(object)
}

/// Runs `f` on the object of handle `h`, sharing the handle's lock with
/// other readers: for reads, block status and the disk's properties.
pub(crate) fn read_object<T>(h: HVDDR, f: impl FnOnce(&Object) -> Result<T>) -> Result<T> {
    let handle = lookup(h)?;
    let guard = lock_shared(&handle)?;
    let object = guard
        .as_ref()
        .ok_or_else(|| Error::invalid_handle(format!("{h:p} was closed")))?;
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
        .ok_or_else(|| Error::invalid_handle(format!("{h:p} was closed")))?;
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
        .ok_or_else(|| Error::invalid_handle(format!("{h:p} was closed")));
    retire(h);
    object
}

/// Removes `h` from the registry, once, and moves its memory to the
/// quarantine of retired handles.
fn retire(h: HVDDR) {
    HANDLES.retire(h as usize);
}
