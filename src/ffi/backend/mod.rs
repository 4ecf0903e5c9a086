//! The format backend table (`COW_BACKEND`) and its exported functions.
//! By job: `table.rs` (the C table type and the checks of a caller's
//! table), `builtin_tables.rs` (the built-in formats as tables, and the
//! pinning of their data), `registry.rs` (registered caller tables),
//! `table_disk.rs` (a caller's table as a [`Disk`], and the open policy of
//! VDDR_Open); this file holds the exports only.
#![allow(non_snake_case, non_camel_case_types)]

mod builtin_tables;
mod registry;
mod table;
mod table_disk;

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use crate::disk::{Disk, ImageFile};
use crate::error::Error;
use crate::ffi::handle::{self, Object};
use crate::ffi::types::{COW_OPEN_FOLLOW_PARENTS, HVDDR};
use crate::ffi::{guard, guard_code, non_null};
use crate::formats::{umlcow, OpenOptions};

// COW_BACKEND_VERSION, COW_OPEN_*: src/numbers.rs.
use crate::ffi::types::{COW_BACKEND_VERSION, COW_OPEN_REPAIR};

use builtin_tables::{builtin_index, builtins};
use registry::{registered, registry};
pub use table::COW_BACKEND;
use table::{c_path, table_name, validate};
pub(crate) use table_disk::open_probing;
use table_disk::{repairing_read_only, TableDisk};

// ---------------------------------------------------------------------------
// Exported functions

/// Fills `backend` for a caller's own table: all members zero/NULL, both
/// version markers set to COW_BACKEND_VERSION. Returns COW_ERR_NONE (0),
/// or COW_ERR_INVALID_ARG for NULL.
#[no_mangle]
pub unsafe extern "C" fn COW_InitBackend(backend: *mut COW_BACKEND) -> c_int {
    guard_code(|| {
        non_null(backend, "backend")?;
        // SAFETY: non-NULL, points to a COW_BACKEND; all-zero is a valid
        // value for every member (NULL pointers, None functions).
        unsafe {
            std::ptr::write_bytes(backend, 0, 1);
            (*backend).u32Version = COW_BACKEND_VERSION;
            (*backend).u32VersionEnd = COW_BACKEND_VERSION;
        }
        Ok(())
    })
}

/// Registers a caller's backend table, so VDDR_Open probes it (before the
/// built-in formats, in registration order). The library keeps the
/// pointer: the table (and the strings it points to) must stay valid and
/// unchanged until COW_UnregisterBackend. Fails with COW_ERR_UNSUPPORTED
/// when a version marker is not COW_BACKEND_VERSION (or the two differ),
/// with COW_ERR_INVALID_ARG when a member its caps require is NULL, the
/// name is missing, unknown caps are set, or the table or its name is
/// already registered (built-in names included). Returns a COW_ERR_*
/// code, 0 on success. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn COW_RegisterBackend(backend: *const COW_BACKEND) -> c_int {
    guard_code(|| {
        // SAFETY: forwarded contract.
        let t = unsafe { validate(backend) }?;
        if builtin_index(backend).is_some() {
            return Err(Error::invalid_argument(
                "this is a built-in backend table; it is always available".into(),
            ));
        }
        // SAFETY: validated.
        let name = unsafe { table_name(&t) };
        if builtins().infos.iter().any(|b| b.name() == name) {
            return Err(Error::invalid_argument(format!(
                "a built-in backend is already called '{name}'"
            )));
        }
        let mut reg = registry();
        let key = backend as usize;
        for &p in &reg.0 {
            if p == key {
                return Err(Error::invalid_argument(format!(
                    "backend '{name}' is already registered"
                )));
            }
            // SAFETY: registered tables are alive until unregistered.
            if unsafe { table_name(&*(p as *const COW_BACKEND)) } == name {
                return Err(Error::invalid_argument(format!(
                    "another backend called '{name}' is registered"
                )));
            }
        }
        reg.0.push(backend as usize);
        Ok(())
    })
}

/// Unregisters a table registered with COW_RegisterBackend (the caller may
/// free it afterwards). Disks already opened through it stay usable: they
/// keep a copy of the table (its functions and their code must stay
/// loaded). Returns a COW_ERR_* code, 0 on success: COW_ERR_INVALID_ARG
/// if it is not registered.
#[no_mangle]
pub unsafe extern "C" fn COW_UnregisterBackend(backend: *const COW_BACKEND) -> c_int {
    guard_code(|| {
        non_null(backend, "backend")?;
        let mut reg = registry();
        let key = backend as usize;
        match reg.0.iter().position(|&p| p == key) {
            Some(i) => {
                reg.0.remove(i);
                Ok(())
            }
            None => Err(Error::invalid_argument(
                "this backend table is not registered".into(),
            )),
        }
    })
}

/// Returns the number of backends: the registered ones, then the built-in
/// ones (raw, vdi, parallels, cow, vci, ...).
#[no_mangle]
pub extern "C" fn COW_GetBackendCount() -> u32 {
    guard(|| Ok((registry().0.len() + builtins().tables.len()) as u32))
}

/// Returns backend number `index` in probe order: registered tables first
/// (registration order), then the built-in ones (raw last). Built-in
/// tables are static (valid for the program's life). NULL with
/// COW_ERR_INVALID_ARG when index >= COW_GetBackendCount().
#[no_mangle]
pub extern "C" fn COW_GetBackend(index: u32) -> *const COW_BACKEND {
    guard(|| {
        let reg = registered();
        let b = builtins();
        let i = index as usize;
        let found = if i < reg.len() {
            reg[i]
        } else if i - reg.len() < b.tables.len() {
            &b.tables[i - reg.len()] as *const COW_BACKEND
        } else {
            return Err(Error::invalid_argument(format!(
                "backend index {index} of {}",
                reg.len() + b.tables.len()
            )));
        };
        Ok(found.cast_mut())
    })
    .cast_const()
}

/// Returns the backend called `name` (registered or built-in, e.g. "raw",
/// "cow", "vci"), or NULL with COW_ERR_INVALID_ARG if there is none.
#[no_mangle]
pub unsafe extern "C" fn COW_FindBackend(name: *const c_char) -> *const COW_BACKEND {
    guard(|| {
        non_null(name, "name")?;
        // SAFETY: NUL-terminated per the contract.
        let wanted = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        for t in registered() {
            // SAFETY: registered tables are alive.
            if unsafe { table_name(&*t) } == wanted {
                return Ok(t.cast_mut());
            }
        }
        let b = builtins();
        match b.infos.iter().position(|i| i.name() == wanted) {
            Some(i) => Ok((&b.tables[i] as *const COW_BACKEND).cast_mut()),
            None => Err(Error::invalid_argument(format!(
                "no backend is called '{wanted}'"
            ))),
        }
    })
    .cast_const()
}

/// Opens `path` read-only with the given backend (a built-in table from
/// COW_FindBackend/COW_GetBackend, or any caller table, registered or not,
/// which is validated as COW_RegisterBackend does and copied). `flags`:
/// COW_OPEN_FOLLOW_PARENTS, COW_OPEN_REPAIR; COW_OPEN_READ_WRITE is refused
/// (COW_ERR_INVALID_ARG: an HVDDR disk is read-only; write through the
/// table's pfnWrite instead). Sectors the backend reports as
/// COW_ERR_BLOCK_FREE read as zeros with VDDR_RSLT_NOTALLOC. A caller
/// backend's functions are called from whichever thread uses the handle,
/// one call at a time; BlockStatus on such a disk reads through pfnRead.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenWithBackend(
    backend: *const COW_BACKEND,
    path: *const c_char,
    flags: u32,
) -> HVDDR {
    guard(|| {
        non_null(backend, "backend")?;
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        if flags & !(COW_OPEN_FOLLOW_PARENTS | COW_OPEN_REPAIR) != 0 {
            return Err(Error::invalid_argument(format!(
                "flags {flags:#x}: only COW_OPEN_FOLLOW_PARENTS and COW_OPEN_REPAIR apply to a \
                 read-only HVDDR"
            )));
        }
        let disk: Box<dyn Disk> = match builtin_index(backend) {
            Some(i) => {
                let info = builtins().infos[i].format().info();
                match (info.repairs, info.open_image) {
                    // A format that can repair is opened by its image open,
                    // which honours COW_OPEN_REPAIR and checks the format.
                    (true, Some(open_image)) => {
                        open_image(&path, &repairing_read_only(flags & COW_OPEN_REPAIR != 0))?
                    }
                    _ => {
                        let options = OpenOptions {
                            follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
                        };
                        if !info.probe_path(&path) {
                            return Err(Error::unsupported(format!(
                                "{}: not a {} image",
                                path.display(),
                                info.name
                            )));
                        }
                        (info.open_at_depth)(&path, &options, 0)?
                    }
                }
            }
            None => {
                // SAFETY: forwarded contract.
                let t = unsafe { validate(backend) }?;
                // SAFETY: validated.
                Box::new(unsafe { TableDisk::open(t, &path, flags) }?)
            }
        };
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Opens a UML COW file read-only over a backing file the caller names
/// (`backing`, checked for size and mtime against the COW header as Linux
/// does: COW_ERR_SOURCE_MISMATCH when they differ). With `backing` NULL,
/// the path stored in the COW file is used only if `flags` has
/// COW_OPEN_FOLLOW_PARENTS (else COW_ERR_OPEN). Unchanged sectors read from
/// the backing file.
#[no_mangle]
pub unsafe extern "C" fn VDDR_OpenUmlCow(
    path: *const c_char,
    backing: *const c_char,
    flags: u32,
) -> HVDDR {
    guard(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        if flags & !COW_OPEN_FOLLOW_PARENTS != 0 {
            return Err(Error::invalid_argument(format!("flags {flags:#x}")));
        }
        let disk: Box<dyn Disk> = if backing.is_null() {
            let options = OpenOptions {
                follow_parent_paths: flags & COW_OPEN_FOLLOW_PARENTS != 0,
            };
            umlcow::open_boxed(&path, &options, 0)?
        } else {
            // SAFETY: forwarded contract.
            let b = unsafe { c_path(backing, "backing") }?;
            Box::new(umlcow::UmlCow::open(
                &path,
                &umlcow::UmlCowOptions {
                    writable: false,
                    backing: umlcow::Backing::Path(b),
                },
            )?)
        };
        Ok(handle::register(Object::Disk(disk)))
    })
}

/// Creates a UML COW file at `path` (which must not exist) over the
/// existing file `backing`, as `uml_mkcow` does: the backing file's
/// absolute path, size and mtime go into the header. `version` 3 (Linux's
/// current layout, 512-byte sectors, 4096 alignment; 0 means 3) or 2
/// (Linux's v2 layout). Open it afterwards with the "cow" backend's pfnOpen
/// (COW_OPEN_READ_WRITE to write) or VDDR_OpenUmlCow. Returns a COW_ERR_*
/// code, 0 on success (COW_ERR_OPEN, COW_ERR_INVALID_ARG, COW_ERR_WRITE,
/// ...).
#[no_mangle]
pub unsafe extern "C" fn COW_UmlCowCreate(
    path: *const c_char,
    backing: *const c_char,
    version: u32,
) -> c_int {
    guard_code(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { c_path(path, "path") }?;
        // SAFETY: forwarded contract.
        let backing = unsafe { c_path(backing, "backing") }?;
        let options = umlcow::CreateOptions {
            version: if version == 0 { 3 } else { version },
            ..Default::default()
        };
        let cow = umlcow::UmlCow::create(&path, &backing, &options)?;
        Box::new(cow).close()?;
        Ok(())
    })
}
