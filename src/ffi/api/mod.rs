//! The exported functions. Each body runs inside `guard`, which catches
//! panics and sets the calling thread's last error (0 on success).
#![allow(non_snake_case)]

use std::os::raw::c_int;

use super::types::*;
use crate::disk::SectorStatus;
use crate::error::{Error, Result};

mod disk;
mod edit;
mod errors;
mod extents;
mod fs;
mod grow;
mod open;
mod store;

pub use disk::*;
pub use edit::*;
pub use errors::*;
pub use extents::*;
pub use fs::*;
pub use grow::*;
pub use open::*;
pub use store::*;

/// Largest SPBshift accepted by ReadPage and GetDriveBlockCount: pages of
/// up to 2^24 sectors (8 GiB). The legacy tool uses 11 (1 MiB pages).
const MAX_PAGE_SHIFT: u32 = 24;

const TRUE: c_int = 1;

fn status_code(status: SectorStatus) -> c_int {
    status.legacy_code() as c_int
}

fn page_sectors(shift: u32) -> Result<u64> {
    if shift > MAX_PAGE_SHIFT {
        return Err(Error::invalid_argument(format!(
            "SPBshift {shift}: pages of more than 2^{MAX_PAGE_SHIFT} sectors are not supported"
        )));
    }
    Ok(1u64 << shift)
}

fn hcow(h: HCOW) -> HVDDR {
    h.cast::<VDDR>()
}
