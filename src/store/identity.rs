//! The identity of a store's source disk: size, UUID and a fingerprint.

use super::format::*;
use crate::disk::{Disk, SECTOR_SIZE};
use crate::error::{Error, Result};

/// Identifies a source disk: size, UUID, and a CRC-32C of sixteen sample
/// sectors spread evenly over it.
pub fn identify(source: &mut dyn Disk) -> Result<SourceIdentity> {
    let sectors = source.sector_count();
    let mut crc = 0u32;
    let mut buf = vec![0u8; SECTOR_SIZE];
    if sectors > 0 {
        let mut last = u64::MAX;
        for i in 0..16u64 {
            let lba = i * (sectors - 1) / 15;
            if lba == last {
                continue;
            }
            last = lba;
            source.read_sectors(lba, &mut buf)?;
            crc = crc32c::crc32c_append(crc, &lba.to_le_bytes());
            crc = crc32c::crc32c_append(crc, &buf);
        }
    }
    Ok(SourceIdentity {
        sectors,
        uuid: source.uuid(),
        fingerprint: crc,
    })
}

/// Says how `found` differs from the identity a store recorded.
pub(crate) fn compare_identity(recorded: &SourceIdentity, found: &SourceIdentity) -> Result<()> {
    let why = if recorded.sectors != found.sectors {
        format!(
            "size: the store was made on a disk of {} sectors, this one has {}",
            recorded.sectors, found.sectors
        )
    } else if recorded.uuid.is_some() && recorded.uuid != found.uuid {
        format!(
            "UUID: the store was made on disk {}, this one is {}",
            uuid::Uuid::from_bytes(recorded.uuid.unwrap_or_default()).hyphenated(),
            found
                .uuid
                .map(|u| uuid::Uuid::from_bytes(u).hyphenated().to_string())
                .unwrap_or_else(|| "without a UUID".into())
        )
    } else if recorded.fingerprint != found.fingerprint {
        format!(
            "fingerprint: sampled sectors differ (store {:#010x}, disk {:#010x})",
            recorded.fingerprint, found.fingerprint
        )
    } else {
        return Ok(());
    };
    Err(Error::source_mismatch(why))
}
