//! Growing NTFS to fill an enlarged partition.

use super::GrowReport;
use crate::error::{Error, Result};
use crate::overlay::Overlay;

pub fn grow(_overlay: &mut Overlay, _part_start: u64, _new_sectors: u64) -> Result<GrowReport> {
    Err(Error::Unsupported(
        "growing NTFS is not supported yet".into(),
    ))
}
