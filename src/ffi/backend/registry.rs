//! The registry of caller tables (COW_RegisterBackend), in registration
//! order.

use std::sync::{Mutex, MutexGuard};

use super::table::COW_BACKEND;

pub(super) struct Registered(pub(super) Vec<usize>);

pub(super) fn registry() -> MutexGuard<'static, Registered> {
    static REG: Mutex<Registered> = Mutex::new(Registered(Vec::new()));
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// The registered caller tables, in registration order (a snapshot: no
/// lock is held while C code runs).
pub(super) fn registered() -> Vec<*const COW_BACKEND> {
    registry()
        .0
        .iter()
        .map(|&p| p as *const COW_BACKEND)
        .collect()
}
