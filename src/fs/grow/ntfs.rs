//! Growing NTFS to fill an enlarged partition.
//!
//! # Format facts relied on
//!
//! The field layout is the Linux-NTFS project's documentation (see
//! `fs/ntfs.rs`). What a grown volume must look like was checked against
//! the reference tools on volumes made by `mkntfs` and grown by
//! `ntfsresize` (ntfs-3g 2022.10.3):
//!
//! * The volume's clusters are the partition's sectors but the last, in
//!   whole clusters: `(sectors - 1) * 512 / cluster bytes`; the boot
//!   sector's total sectors (0x28) is that many clusters in sectors. The
//!   backup boot sector is the last sector of the partition.
//! * `$Bitmap` (record 6) holds `clusters / 8` bytes rounded up to a
//!   multiple of 8 (data and initialised size alike); the bits past the
//!   last cluster inside that size are set, the bytes past the data size
//!   in its last cluster are zero. The allocated size is whole clusters.
//! * `$BadClus` (record 8) has a named `$Bad` data stream as long as the
//!   volume: one sparse run of every cluster (no bad clusters), last VCN
//!   `clusters - 1`, allocated and data size `clusters * cluster bytes`,
//!   initialised size 0.
//! * A non-resident attribute: last VCN at 0x18, mapping pairs offset at
//!   0x20, allocated / data / initialised size at 0x28 / 0x30 / 0x38. A
//!   record's bytes in use at 0x18 and bytes allocated at 0x1C; an
//!   attribute's length is a multiple of 8. Before a record is written
//!   back, the last two bytes of every 512-byte stride move into the
//!   update sequence array and the update sequence number takes their
//!   place.
//!
//! The bitmap grows in place: its existing clusters keep their data and,
//! when it needs more, clusters are taken at the start of the added space
//! (free by construction) and appended to its runs.

use super::GrowReport;
use crate::disk::{Disk, SECTOR_BYTES};
use crate::error::{Error, Result};
use crate::fs::ntfs::{apply_fixups, BootSector, Ntfs};
use crate::fs::volume::{le16, le32, Volume, MAX_READ};
use crate::fs::FsKind;
use crate::overlay::Overlay;

const RECORD_BITMAP: u64 = 6;
const RECORD_BADCLUS: u64 = 8;
const ATTR_DATA: u32 = 0x80;
const ATTR_ATTRIBUTE_LIST: u32 = 0x20;
const ATTR_END: u32 = 0xFFFF_FFFF;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A run of a non-resident attribute: `None` as the cluster is sparse.
type Run = (Option<u64>, u64);

/// Decodes mapping pairs, sparse runs included.
fn decode_runs(runs: &[u8], clusters: u64, what: &str) -> Result<Vec<Run>> {
    let bad = |why: String| Error::corrupt(format!("{what}: data runs: {why}"));
    let mut out = Vec::new();
    let mut at = 0;
    let mut lcn: i64 = 0;
    loop {
        let &header = runs.get(at).ok_or_else(|| bad("no end marker".into()))?;
        if header == 0 {
            return Ok(out);
        }
        let len_bytes = usize::from(header & 0x0F);
        let off_bytes = usize::from(header >> 4);
        if len_bytes == 0 || len_bytes > 8 || off_bytes > 8 {
            return Err(bad(format!("run header {header:#04x}")));
        }
        if at + 1 + len_bytes + off_bytes > runs.len() {
            return Err(bad("a run past the attribute".into()));
        }
        let field = |from: usize, n: usize| -> u64 {
            (0..n).fold(0u64, |acc, i| acc | (u64::from(runs[from + i]) << (8 * i)))
        };
        let length = field(at + 1, len_bytes);
        if length == 0 || length > clusters {
            return Err(bad(format!("a run of {length} clusters")));
        }
        if off_bytes == 0 {
            out.push((None, length));
        } else {
            let raw = field(at + 1 + len_bytes, off_bytes);
            let shift = 64 - 8 * off_bytes as u32;
            let delta = ((raw << shift) as i64) >> shift;
            lcn = lcn
                .checked_add(delta)
                .filter(|&l| l >= 0)
                .ok_or_else(|| bad("a run before cluster 0".into()))?;
            let start = lcn as u64;
            if start.checked_add(length).is_none_or(|end| end > clusters) {
                return Err(bad(format!(
                    "clusters {start}..+{length} outside the volume of {clusters}"
                )));
            }
            out.push((Some(start), length));
        }
        at += 1 + len_bytes + off_bytes;
    }
}

/// The fewest little-endian bytes that hold `v` as a signed number.
fn signed_bytes(v: i64) -> Vec<u8> {
    let all = v.to_le_bytes();
    let mut n = 8;
    while n > 1 {
        let top = all[n - 1];
        let next_sign = all[n - 2] & 0x80;
        if (top == 0 && next_sign == 0) || (top == 0xFF && next_sign != 0) {
            n -= 1;
        } else {
            break;
        }
    }
    all[..n].to_vec()
}

/// Encodes runs as mapping pairs with the end marker. Lengths are written
/// as non-negative signed numbers, which every reader accepts.
fn encode_runs(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev: i64 = 0;
    for &(lcn, len) in runs {
        let len_bytes = signed_bytes(len as i64);
        let off_bytes = match lcn {
            Some(l) => {
                let b = signed_bytes(l as i64 - prev);
                prev = l as i64;
                b
            }
            None => Vec::new(),
        };
        out.push(((off_bytes.len() as u8) << 4) | len_bytes.len() as u8);
        out.extend_from_slice(&len_bytes);
        out.extend_from_slice(&off_bytes);
    }
    out.push(0);
    out
}

/// A record's attribute found by type and name, as its offset in the
/// record; attribute lists are refused.
fn find_attribute(record: &[u8], kind: u32, name: &str, what: &str) -> Result<usize> {
    let bad = |why: String| Error::corrupt(format!("{what}: {why}"));
    let used = le32(record, 0x18) as usize;
    let mut at = usize::from(le16(record, 0x14));
    let wanted: Vec<u16> = name.encode_utf16().collect();
    let mut found = None;
    loop {
        if at + 8 > used || used > record.len() {
            return Err(bad("the attributes run past the record".into()));
        }
        let t = le32(record, at);
        if t == ATTR_END {
            break;
        }
        let len = le32(record, at + 4) as usize;
        if len < 0x18 || at + len > used {
            return Err(bad(format!("attribute {t:#x} of {len} bytes at {at}")));
        }
        if t == ATTR_ATTRIBUTE_LIST {
            return Err(Error::unsupported(format!(
                "{what} has an attribute list (too fragmented to grow)"
            )));
        }
        if t == kind {
            let name_len = usize::from(record[at + 9]);
            let name_at = at + usize::from(le16(record, at + 10));
            if name_at + 2 * name_len > at + len {
                return Err(bad(format!("attribute {t:#x}'s name runs past it")));
            }
            let here: Vec<u16> = (0..name_len)
                .map(|i| le16(record, name_at + 2 * i))
                .collect();
            if here == wanted {
                found = Some(at);
            }
        }
        at += len;
    }
    let at = found.ok_or_else(|| bad(format!("no attribute {kind:#x} named {name:?}")))?;
    if record[at + 8] == 0 || le32(record, at + 4) < 0x40 {
        return Err(Error::unsupported(format!(
            "{what}: attribute {kind:#x} {name:?} is resident"
        )));
    }
    let runs_at = usize::from(le16(record, at + 0x20));
    if runs_at < 0x40 || runs_at >= le32(record, at + 4) as usize {
        return Err(bad(format!(
            "attribute {kind:#x} {name:?}: mapping pairs at {runs_at}"
        )));
    }
    if le64(record, at + 0x10) != 0 || le16(record, at + 0x0C) & 0xC001 != 0 {
        return Err(Error::unsupported(format!(
            "{what}: attribute {kind:#x} {name:?} is split, compressed, encrypted or sparse"
        )));
    }
    Ok(at)
}

/// Replaces the mapping pairs of the non-resident attribute at `at`,
/// growing or shrinking the attribute (and moving the ones after it) as
/// the record's allocated size allows.
fn set_runs(record: &mut [u8], at: usize, pairs: &[u8], what: &str) -> Result<()> {
    let len = le32(record, at + 4) as usize;
    let runs_at = usize::from(le16(record, at + 0x20));
    if runs_at > len {
        return Err(Error::corrupt(format!(
            "{what}: mapping pairs at {runs_at}"
        )));
    }
    let new_len = (runs_at + pairs.len()).div_ceil(8) * 8;
    let used = le32(record, 0x18) as usize;
    let allocated = (le32(record, 0x1C) as usize).min(record.len());
    let new_used = used - len + new_len;
    if new_used > allocated {
        return Err(Error::unsupported(format!(
            "{what}: the grown data runs do not fit the MFT record"
        )));
    }
    let tail: Vec<u8> = record[at + len..used].to_vec();
    record[at + runs_at..at + new_len].fill(0);
    record[at + runs_at..at + runs_at + pairs.len()].copy_from_slice(pairs);
    record[at + new_len..at + new_len + tail.len()].copy_from_slice(&tail);
    if new_used < used {
        record[new_used..used].fill(0);
    }
    record[at + 4..at + 8].copy_from_slice(&(new_len as u32).to_le_bytes());
    record[0x18..0x1C].copy_from_slice(&(new_used as u32).to_le_bytes());
    Ok(())
}

/// Puts the update sequence number back at the end of every stride (the
/// inverse of `apply_fixups`).
fn protect(record: &mut [u8]) {
    let usa_at = usize::from(le16(record, 4));
    let usn = [record[usa_at], record[usa_at + 1]];
    for i in 0..record.len() / 512 {
        let end = (i + 1) * 512 - 2;
        let fix = usa_at + 2 + 2 * i;
        record[fix] = record[end];
        record[fix + 1] = record[end + 1];
        record[end..end + 2].copy_from_slice(&usn);
    }
}

/// The volume byte offset of MFT record `n` (within one run, as
/// `Ntfs::record` requires to read it).
fn record_offset(ntfs: &Ntfs, n: u64) -> Result<u64> {
    let cb = ntfs.boot.cluster_bytes;
    let at = n * ntfs.boot.record_bytes;
    let mut vcn_start = 0;
    for &(lcn, count) in &ntfs.mft_runs {
        if at < vcn_start + count * cb {
            return Ok(lcn * cb + (at - vcn_start));
        }
        vcn_start += count * cb;
    }
    Err(Error::corrupt(format!(
        "NTFS MFT record {n} lies past the MFT"
    )))
}

/// One sector-aligned write to make, relative to the volume.
struct Write {
    offset: u64,
    bytes: Vec<u8>,
}

/// Grows the NTFS volume at `part_start` to fill `new_sectors` sectors as
/// the module doc describes.
pub fn grow(
    overlay: &mut Overlay,
    part_start: u64,
    new_sectors: u64,
    dry_run: bool,
) -> Result<GrowReport> {
    let mut vol = Volume::new(overlay as &mut dyn Disk, part_start, new_sectors)?;
    let ntfs = Ntfs::open(&mut vol)?;
    let boot: BootSector = ntfs.boot.clone();
    if boot.bytes_per_sector != SECTOR_BYTES {
        return Err(Error::unsupported(format!(
            "NTFS: growing a volume of {}-byte sectors is not supported",
            boot.bytes_per_sector
        )));
    }
    ntfs.check_clean(&mut vol)?;
    let free_runs = ntfs.free_cluster_runs(&mut vol)?;
    let cb = boot.cluster_bytes;
    let spc = cb / SECTOR_BYTES;
    let old_clusters = boot.clusters();
    let new_clusters = (new_sectors - 1) / spc;
    if new_clusters <= old_clusters {
        return Err(Error::invalid_argument(format!(
            "NTFS: the partition of {new_sectors} sectors holds {new_clusters} clusters, no \
             more than the volume's {old_clusters}"
        )));
    }
    if new_clusters > (1 << 32) - 1 {
        return Err(Error::unsupported(format!(
            "NTFS: {new_clusters} clusters are more than the 2^32 - 1 Windows addresses"
        )));
    }
    let old_free: u64 = free_runs.iter().map(|&(_, n)| n).sum();

    // $Bitmap: where it lies and how large it must become.
    let mut bitmap_rec = ntfs.record(&mut vol, RECORD_BITMAP)?;
    let at = find_attribute(&bitmap_rec, ATTR_DATA, "", "NTFS $Bitmap")?;
    let old_size = le64(&bitmap_rec, at + 0x30);
    if le64(&bitmap_rec, at + 0x38) != old_size {
        return Err(Error::unsupported(
            "NTFS $Bitmap's initialised size differs from its size".into(),
        ));
    }
    let runs_at = usize::from(le16(&bitmap_rec, at + 0x20));
    let attr_len = le32(&bitmap_rec, at + 4) as usize;
    let mut runs = decode_runs(
        &bitmap_rec[at + runs_at..at + attr_len],
        old_clusters,
        "NTFS $Bitmap",
    )?;
    if runs.iter().any(|r| r.0.is_none()) {
        return Err(Error::unsupported("NTFS $Bitmap has a sparse run".into()));
    }
    // Each run lies inside the volume, but a damaged list could repeat
    // them: the sums saturate rather than overflow.
    let old_alloc_clusters: u64 = runs.iter().fold(0u64, |a, r| a.saturating_add(r.1));
    if old_alloc_clusters > old_clusters {
        return Err(Error::corrupt(format!(
            "NTFS $Bitmap: {old_alloc_clusters} clusters in a volume of {old_clusters}"
        )));
    }
    if old_alloc_clusters * cb < old_size || old_size < old_clusters.div_ceil(8) {
        return Err(Error::corrupt(format!(
            "NTFS $Bitmap: {old_size} bytes in {old_alloc_clusters} clusters for \
             {old_clusters} clusters"
        )));
    }
    let new_size = new_clusters.div_ceil(8).div_ceil(8) * 8;
    let new_alloc_clusters = new_size.div_ceil(cb).max(old_alloc_clusters);
    let extra = new_alloc_clusters - old_alloc_clusters;
    if extra > 0 {
        if old_clusters + extra > new_clusters {
            return Err(Error::unsupported(
                "NTFS: the added space cannot hold the grown $Bitmap".into(),
            ));
        }
        runs.push((Some(old_clusters), extra));
    }
    let pairs = encode_runs(&runs);
    set_runs(&mut bitmap_rec, at, &pairs, "NTFS $Bitmap")?;
    put64(&mut bitmap_rec, at + 0x18, new_alloc_clusters - 1);
    put64(&mut bitmap_rec, at + 0x28, new_alloc_clusters * cb);
    put64(&mut bitmap_rec, at + 0x30, new_size);
    put64(&mut bitmap_rec, at + 0x38, new_size);

    // $BadClus:$Bad, one sparse run as long as the volume.
    let mut bad_rec = ntfs.record(&mut vol, RECORD_BADCLUS)?;
    let bat = find_attribute(&bad_rec, ATTR_DATA, "$Bad", "NTFS $BadClus")?;
    let bruns_at = usize::from(le16(&bad_rec, bat + 0x20));
    let blen = le32(&bad_rec, bat + 4) as usize;
    let bad_runs = decode_runs(
        &bad_rec[bat + bruns_at..bat + blen],
        old_clusters,
        "NTFS $BadClus",
    )?;
    if bad_runs != [(None, old_clusters)] {
        return Err(Error::unsupported(
            "NTFS $BadClus records bad clusters (or is not as long as the volume); \
             not grown"
                .into(),
        ));
    }
    set_runs(
        &mut bad_rec,
        bat,
        &encode_runs(&[(None, new_clusters)]),
        "NTFS $BadClus",
    )?;
    put64(&mut bad_rec, bat + 0x18, new_clusters - 1);
    put64(&mut bad_rec, bat + 0x28, new_clusters * cb);
    put64(&mut bad_rec, bat + 0x30, new_clusters * cb);

    // The bitmap's bytes from the first one holding a bit at or past the
    // old end, to the end of its allocation.
    let mut writes = Vec::new();
    let first_cluster = old_clusters / 8 / cb;
    let chunk_clusters = (MAX_READ / cb).clamp(1, 256);
    let mut vcn = first_cluster;
    while vcn < new_alloc_clusters {
        let (lcn, run_left) = locate(&runs, vcn)?;
        let n = run_left.min(chunk_clusters).min(new_alloc_clusters - vcn);
        let mut bytes = if vcn < old_alloc_clusters {
            let n_old = n.min(old_alloc_clusters - vcn);
            let mut b = vol.read(lcn * cb, n_old * cb, "NTFS $Bitmap")?;
            b.resize((n * cb) as usize, 0);
            b
        } else {
            vec![0u8; (n * cb) as usize]
        };
        for (i, byte) in bytes.iter_mut().enumerate() {
            let byte_index = vcn * cb + i as u64;
            let low_bit = byte_index * 8;
            // Whole bytes first: the usual case by far.
            if byte_index >= new_size
                || (low_bit >= old_clusters + extra && low_bit + 8 <= new_clusters)
            {
                *byte = 0;
                continue;
            }
            if low_bit + 8 <= old_clusters {
                continue;
            }
            for b in 0..8 {
                let bit = low_bit + b;
                let on = if byte_index >= new_size {
                    false
                } else if bit >= new_clusters {
                    true
                } else if bit >= old_clusters {
                    bit < old_clusters + extra
                } else {
                    *byte & (1 << b) != 0
                };
                if on {
                    *byte |= 1 << b;
                } else {
                    *byte &= !(1 << b);
                }
            }
        }
        writes.push(Write {
            offset: lcn * cb,
            bytes,
        });
        vcn += n;
    }
    let bitmap_offset = record_offset(&ntfs, RECORD_BITMAP)?;
    let badclus_offset = record_offset(&ntfs, RECORD_BADCLUS)?;
    // Check the records still read as records after the edit.
    for (rec, what) in [(&bitmap_rec, "$Bitmap"), (&bad_rec, "$BadClus")] {
        crate::fs::ntfs::attributes(rec, what)?;
    }
    protect(&mut bitmap_rec);
    protect(&mut bad_rec);
    let mut check = bitmap_rec.clone();
    apply_fixups(&mut check, "NTFS $Bitmap record")?;
    writes.push(Write {
        offset: bitmap_offset,
        bytes: bitmap_rec,
    });
    writes.push(Write {
        offset: badclus_offset,
        bytes: bad_rec,
    });
    let mut new_boot = boot.raw.clone();
    put64(&mut new_boot, 0x28, new_clusters * spc);
    writes.push(Write {
        offset: 0,
        bytes: new_boot.clone(),
    });
    writes.push(Write {
        offset: (new_sectors - 1) * SECTOR_BYTES,
        bytes: new_boot,
    });
    let new_free = old_free + (new_clusters - old_clusters) - extra;
    let report = GrowReport {
        filesystem: FsKind::Ntfs,
        old_sectors: boot.total_sectors,
        new_sectors: new_clusters * spc,
        cluster_bytes: cb,
        old_clusters,
        new_clusters,
        inserted_sectors: 0,
        old_free_bytes: old_free * cb,
        new_free_bytes: new_free * cb,
    };
    drop(vol);
    if dry_run {
        return Ok(report);
    }

    // Writes from here on.
    for w in writes {
        overlay.write(part_start + w.offset / SECTOR_BYTES, &w.bytes)?;
    }
    Ok(report)
}

/// The cluster holding VCN `vcn` of a run list without sparse runs, and
/// how many clusters of its run are left from there.
fn locate(runs: &[Run], vcn: u64) -> Result<(u64, u64)> {
    let mut start = 0;
    for &(lcn, n) in runs {
        if vcn < start + n {
            let lcn = lcn.ok_or_else(|| Error::internal("a sparse bitmap run".into()))?;
            return Ok((lcn + (vcn - start), n - (vcn - start)));
        }
        start += n;
    }
    Err(Error::internal(format!("VCN {vcn} past the runs")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_through_the_encoder() {
        let runs = vec![
            (Some(0x5634), 0x18),
            (Some(0x5534), 0x80),
            (None, 0x3FFF),
            (Some(0x10_0000), 1),
        ];
        let bytes = encode_runs(&runs);
        assert_eq!(decode_runs(&bytes, 1 << 40, "t").unwrap(), runs);
        // 0x80 as a length takes two bytes, so a signed reader sees it
        // positive; -0x100 as an offset takes two bytes (00 FF).
        assert_eq!(&bytes[..4], &[0x21, 0x18, 0x34, 0x56]);
        assert_eq!(&bytes[4..9], &[0x22, 0x80, 0x00, 0x00, 0xFF]);
    }
}
