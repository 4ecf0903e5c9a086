//! Linux swap: everything after the header page is free (swap contents do
//! not survive a reboot).
//!
//! # Format facts relied on
//!
//! * The first page holds the header; the page ends with the ten bytes
//!   `SWAPSPACE2` (4096-byte pages on x86; larger pages on some other
//!   architectures). A hibernation image replaces the signature
//!   (`S1SUSPEND`, ...), and is not free: only `SWAPSPACE2` is read.

use super::volume::Volume;
use crate::error::{Error, Result};

/// Page sizes Linux uses, smallest first.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];
const SIGNATURE: &[u8; 10] = b"SWAPSPACE2";

/// The swap page size, if the volume is swap space.
fn page_size(vol: &mut Volume) -> Result<Option<u64>> {
    for page in PAGE_SIZES {
        if vol.bytes() < 2 * page {
            break;
        }
        if &vol.read(page - 10, 10, "swap signature")?[..] == SIGNATURE {
            return Ok(Some(page));
        }
    }
    Ok(None)
}

/// True when the volume is Linux swap space.
pub fn probe(vol: &mut Volume) -> Result<bool> {
    Ok(page_size(vol)?.is_some())
}

/// Everything after the header page.
pub fn free_space(vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
    let page = page_size(vol)?
        .ok_or_else(|| Error::corrupt("swap: the SWAPSPACE2 signature went away".into()))?;
    Ok(vec![(page, vol.bytes() - page)])
}
