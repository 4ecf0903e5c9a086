//! NTFS: the boot sector, MFT records (with their update-sequence fixups),
//! non-resident data runs, `$Volume`'s flags, `$LogFile`'s restart area
//! and the `$Bitmap`.
//!
//! # Format facts relied on (the Linux-NTFS project's documentation)
//!
//! * Boot sector: `NTFS    ` at byte 3; bytes per sector (0x0B, u16),
//!   sectors per cluster (0x0D, u8; above 0x80 it is 2^(256 - value)),
//!   total sectors (0x28, u64; the backup boot sector lies after them),
//!   the MFT's first cluster (0x30, u64), the size of an MFT record (0x40,
//!   i8: clusters when positive, 2^-value bytes when negative), `55 AA`.
//! * An MFT record starts `FILE`; the update sequence array's offset (0x04,
//!   u16) and count (0x06, u16: the sequence number plus one entry per
//!   512-byte stride); flags (0x16: 1 in use); bytes in use (0x18); the
//!   first attribute's offset (0x14). The last two bytes of every 512-byte
//!   stride hold the sequence number on disk; the array holds what belongs
//!   there.
//! * An attribute: type (0, u32; 0xFFFFFFFF ends the list), length (4),
//!   non-resident (8), name length (9), flags (0x0C: compressed 0x0001,
//!   encrypted 0x4000, sparse 0x8000); resident: value length (0x10, u32),
//!   value offset (0x14, u16); non-resident: first VCN (0x10), last VCN
//!   (0x18), data runs offset (0x20, u16), allocated, data and initialised
//!   sizes (0x28, 0x30, 0x38).
//! * Data runs: a header byte (low nibble: bytes of the length, high: bytes
//!   of the offset), the length (unsigned), the offset (signed, relative to
//!   the previous run's cluster; no offset bytes = a sparse run); a zero
//!   header ends the list.
//! * Records: 0 `$MFT`, 2 `$LogFile`, 3 `$Volume`, 6 `$Bitmap`. Attribute
//!   types: 0x20 `$ATTRIBUTE_LIST`, 0x70 `$VOLUME_INFORMATION` (flags at
//!   value byte 0x0A, u16: 0x0001 dirty), 0x80 `$DATA`.
//! * `$LogFile` starts with a restart page: `RSTR` (or `CHKD`), fixups like
//!   a record over the system page size (0x10, u32), the restart area at
//!   the offset at 0x18 (u16); in the restart area, the in-use client list
//!   (0x0C, u16; 0xFFFF none) and flags (0x0E; 0x0002 the volume is
//!   clean). A log that was emptied (all 0xFF, as ntfs-3g leaves it) has
//!   nothing to replay.
//! * `$Bitmap`'s data: bit `i` (LSB first) is cluster `i`, set = in use.

use super::volume::{le16, le32, Volume, MAX_READ};
use crate::error::{Error, Result};

const MFT_RECORD_MFT: u64 = 0;
const MFT_RECORD_LOGFILE: u64 = 2;
const MFT_RECORD_VOLUME: u64 = 3;
const MFT_RECORD_BITMAP: u64 = 6;
const ATTR_ATTRIBUTE_LIST: u32 = 0x20;
const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_END: u32 = 0xFFFF_FFFF;
const VOLUME_DIRTY: u16 = 0x0001;
const RESTART_VOLUME_IS_CLEAN: u16 = 0x0002;
const LOGFILE_NO_CLIENT: u16 = 0xFFFF;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The boot sector's fields, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSector {
    pub raw: Vec<u8>,
    pub bytes_per_sector: u64,
    pub cluster_bytes: u64,
    pub total_sectors: u64,
    pub mft_cluster: u64,
    pub record_bytes: u64,
}

impl BootSector {
    /// `None` when the sector is not an NTFS boot sector; an error when it
    /// says NTFS but its numbers do not add up.
    pub fn parse(raw: &[u8]) -> Result<Option<BootSector>> {
        if raw.len() < 512 || &raw[3..11] != b"NTFS    " || raw[510..512] != [0x55, 0xAA] {
            return Ok(None);
        }
        let bad = |what: String| Err(Error::corrupt(format!("NTFS boot sector: {what}")));
        let bytes_per_sector = u64::from(le16(raw, 0x0B));
        if ![512, 1024, 2048, 4096].contains(&bytes_per_sector) {
            return bad(format!("{bytes_per_sector} bytes per sector"));
        }
        let spc = raw[0x0D];
        let sectors_per_cluster = if spc > 0x80 {
            let shift = 256 - u32::from(spc);
            if shift > 12 {
                return bad(format!("sectors per cluster 2^{shift}"));
            }
            1u64 << shift
        } else if spc.is_power_of_two() {
            u64::from(spc)
        } else {
            return bad(format!("sectors per cluster {spc}"));
        };
        let cluster_bytes = sectors_per_cluster * bytes_per_sector;
        if cluster_bytes > 2 << 20 {
            return bad(format!("clusters of {cluster_bytes} bytes"));
        }
        let per_record = raw[0x40] as i8;
        let record_bytes = if per_record < 0 {
            let shift = u32::from(per_record.unsigned_abs());
            if !(9..=16).contains(&shift) {
                return bad(format!("MFT records of 2^{shift} bytes"));
            }
            1u64 << shift
        } else {
            u64::from(per_record as u8) * cluster_bytes
        };
        if !(512..=65536).contains(&record_bytes) || !record_bytes.is_power_of_two() {
            return bad(format!("MFT records of {record_bytes} bytes"));
        }
        Ok(Some(BootSector {
            raw: raw[..512].to_vec(),
            bytes_per_sector,
            cluster_bytes,
            total_sectors: le64(raw, 0x28),
            mft_cluster: le64(raw, 0x30),
            record_bytes,
        }))
    }

    /// Clusters in the volume.
    pub fn clusters(&self) -> u64 {
        self.total_sectors * self.bytes_per_sector / self.cluster_bytes
    }
}

/// True when the volume starts with an NTFS boot sector.
pub fn probe(vol: &mut Volume) -> Result<bool> {
    if vol.bytes() < 512 {
        return Ok(false);
    }
    let raw = vol.read(0, 512, "NTFS boot sector")?;
    Ok(&raw[3..11] == b"NTFS    ")
}

/// Applies the update-sequence fixups of a multi-sector-protected block
/// (an MFT record or a log restart page) in place.
pub fn apply_fixups(block: &mut [u8], what: &str) -> Result<()> {
    let bad = |why: String| Err(Error::corrupt(format!("{what}: {why}")));
    let usa_at = usize::from(le16(block, 4));
    let count = usize::from(le16(block, 6));
    let strides = block.len() / 512;
    if count != strides + 1 {
        return bad(format!(
            "{count} update sequence entries for {strides} sectors"
        ));
    }
    if usa_at < 8 || usa_at + 2 * count > 512 || !usa_at.is_multiple_of(2) {
        return bad(format!("update sequence array at {usa_at}"));
    }
    let usn = [block[usa_at], block[usa_at + 1]];
    for i in 0..strides {
        let end = (i + 1) * 512 - 2;
        if block[end..end + 2] != usn {
            return bad(format!(
                "sector {i} does not end with the update sequence number (a torn write)"
            ));
        }
        let fix = usa_at + 2 + 2 * i;
        block[end] = block[fix];
        block[end + 1] = block[fix + 1];
    }
    Ok(())
}

/// One attribute of a record, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub kind: u32,
    pub name_len: u8,
    pub flags: u16,
    pub non_resident: bool,
    /// Resident: the value. Non-resident: the data runs' bytes.
    pub body: Vec<u8>,
    /// Non-resident: first and last VCN, and the data size in bytes.
    pub first_vcn: u64,
    pub last_vcn: u64,
    pub data_size: u64,
}

/// The attributes of an MFT record (fixups applied).
pub fn attributes(record: &[u8], what: &str) -> Result<Vec<Attribute>> {
    let bad = |why: String| Err(Error::corrupt(format!("{what}: {why}")));
    if &record[..4] != b"FILE" {
        return bad("no FILE signature".into());
    }
    if le16(record, 0x16) & 1 == 0 {
        return bad("the record is not in use".into());
    }
    let used = le32(record, 0x18) as usize;
    if used > record.len() || used < 0x30 {
        return bad(format!(
            "{used} bytes in use in a record of {}",
            record.len()
        ));
    }
    let mut at = usize::from(le16(record, 0x14));
    let mut out = Vec::new();
    loop {
        if at + 8 > used {
            return bad("the attribute list runs past the record".into());
        }
        let kind = le32(record, at);
        if kind == ATTR_END {
            return Ok(out);
        }
        let len = le32(record, at + 4) as usize;
        if len < 0x18 || at + len > used || !len.is_multiple_of(8) {
            return bad(format!("attribute {kind:#x} of {len} bytes at {at}"));
        }
        let a = &record[at..at + len];
        let non_resident = a[8] != 0;
        let attribute = if non_resident {
            if len < 0x40 {
                return bad(format!("non-resident attribute {kind:#x} of {len} bytes"));
            }
            let runs_at = usize::from(le16(a, 0x20));
            if runs_at > len {
                return bad(format!("attribute {kind:#x}'s runs at {runs_at}"));
            }
            Attribute {
                kind,
                name_len: a[9],
                flags: le16(a, 0x0C),
                non_resident,
                body: a[runs_at..].to_vec(),
                first_vcn: le64(a, 0x10),
                last_vcn: le64(a, 0x18),
                data_size: le64(a, 0x30),
            }
        } else {
            let value_len = le32(a, 0x10) as usize;
            let value_at = usize::from(le16(a, 0x14));
            if value_at.checked_add(value_len).is_none_or(|end| end > len) {
                return bad(format!("attribute {kind:#x}'s value runs past it"));
            }
            Attribute {
                kind,
                name_len: a[9],
                flags: le16(a, 0x0C),
                non_resident,
                body: a[value_at..value_at + value_len].to_vec(),
                first_vcn: 0,
                last_vcn: 0,
                data_size: value_len as u64,
            }
        };
        out.push(attribute);
        at += len;
    }
}

/// Decodes data runs into `(first cluster, clusters)`; a sparse run is
/// refused (the system files read here are never sparse).
pub fn data_runs(runs: &[u8], clusters: u64, what: &str) -> Result<Vec<(u64, u64)>> {
    let bad = |why: String| Err(Error::corrupt(format!("{what}: data runs: {why}")));
    let mut out = Vec::new();
    let mut at = 0;
    let mut lcn: i64 = 0;
    loop {
        let Some(&header) = runs.get(at) else {
            return bad("no end marker".into());
        };
        if header == 0 {
            return Ok(out);
        }
        let len_bytes = usize::from(header & 0x0F);
        let off_bytes = usize::from(header >> 4);
        if len_bytes == 0 || len_bytes > 8 || off_bytes > 8 {
            return bad(format!("run header {header:#04x}"));
        }
        if at + 1 + len_bytes + off_bytes > runs.len() {
            return bad("a run past the attribute".into());
        }
        let field = |from: usize, n: usize| -> u64 {
            (0..n).fold(0u64, |acc, i| acc | (u64::from(runs[from + i]) << (8 * i)))
        };
        let length = field(at + 1, len_bytes);
        if off_bytes == 0 {
            return Err(Error::unsupported(format!(
                "{what}: a sparse run in a system file"
            )));
        }
        let raw = field(at + 1 + len_bytes, off_bytes);
        // Sign-extend the offset from its stored width.
        let shift = 64 - 8 * off_bytes as u32;
        let delta = ((raw << shift) as i64) >> shift;
        lcn = lcn
            .checked_add(delta)
            .filter(|&l| l >= 0)
            .ok_or_else(|| Error::corrupt(format!("{what}: a run before cluster 0")))?;
        let start = lcn as u64;
        if length == 0 || start.checked_add(length).is_none_or(|end| end > clusters) {
            return bad(format!(
                "clusters {start}..+{length} outside the volume of {clusters}"
            ));
        }
        out.push((start, length));
        at += 1 + len_bytes + off_bytes;
    }
}

/// An NTFS volume: its boot sector and where the MFT lies.
#[derive(Debug, Clone)]
pub struct Ntfs {
    pub boot: BootSector,
    /// The MFT's clusters, in order.
    pub mft_runs: Vec<(u64, u64)>,
}

impl Ntfs {
    /// Reads the boot sector and the `$MFT` record's data runs.
    pub fn open(vol: &mut Volume) -> Result<Ntfs> {
        let raw = vol.read(0, 512, "NTFS boot sector")?;
        let boot = BootSector::parse(&raw)?
            .ok_or_else(|| Error::corrupt("not an NTFS boot sector".into()))?;
        if boot
            .total_sectors
            .checked_mul(boot.bytes_per_sector)
            .is_none_or(|b| b > vol.bytes())
        {
            return Err(Error::corrupt(format!(
                "NTFS: {} sectors do not fit the partition of {} bytes",
                boot.total_sectors,
                vol.bytes()
            )));
        }
        if boot.mft_cluster >= boot.clusters() {
            return Err(Error::corrupt(format!(
                "NTFS: the MFT at cluster {} lies outside the volume",
                boot.mft_cluster
            )));
        }
        let first = Ntfs {
            mft_runs: vec![(
                boot.mft_cluster,
                1u64.max(boot.record_bytes / boot.cluster_bytes),
            )],
            boot,
        };
        let record = first.record(vol, MFT_RECORD_MFT)?;
        let data = unnamed_data(&record, "NTFS $MFT")?;
        let mft_runs = data_runs(&data.body, first.boot.clusters(), "NTFS $MFT")?;
        Ok(Ntfs {
            boot: first.boot,
            mft_runs,
        })
    }

    /// Reads MFT record `n` (fixups applied).
    pub fn record(&self, vol: &mut Volume, n: u64) -> Result<Vec<u8>> {
        let what = format!("NTFS MFT record {n}");
        let offset = self.mft_offset(n * self.boot.record_bytes, &what)?;
        let mut record = vol.read(offset, self.boot.record_bytes, &what)?;
        apply_fixups(&mut record, &what)?;
        Ok(record)
    }

    /// The volume offset of byte `at` of the MFT (records never straddle
    /// clusters that are not contiguous here: a record is either within
    /// one run or refused).
    fn mft_offset(&self, at: u64, what: &str) -> Result<u64> {
        let cb = self.boot.cluster_bytes;
        let mut vcn_start = 0;
        for &(lcn, n) in &self.mft_runs {
            let bytes = n * cb;
            if at < vcn_start + bytes {
                if at - vcn_start + self.boot.record_bytes > bytes {
                    return Err(Error::unsupported(format!("{what} straddles two MFT runs")));
                }
                return Ok(lcn * cb + (at - vcn_start));
            }
            vcn_start += bytes;
        }
        Err(Error::corrupt(format!("{what} lies past the MFT's runs")))
    }

    /// Refuses a volume marked dirty, or whose log has something to replay
    /// (not cleanly unmounted, or hibernated / "fast startup").
    pub fn check_clean(&self, vol: &mut Volume) -> Result<()> {
        let record = self.record(vol, MFT_RECORD_VOLUME)?;
        let info = attributes(&record, "NTFS $Volume")?
            .into_iter()
            .find(|a| a.kind == ATTR_VOLUME_INFORMATION && !a.non_resident)
            .ok_or_else(|| Error::corrupt("NTFS $Volume has no $VOLUME_INFORMATION".into()))?;
        if info.body.len() < 0x0C {
            return Err(Error::corrupt("NTFS $VOLUME_INFORMATION too short".into()));
        }
        if le16(&info.body, 0x0A) & VOLUME_DIRTY != 0 {
            return Err(Error::unsupported(
                "the volume is marked dirty (run chkdsk or ntfsfix)".into(),
            ));
        }
        let record = self.record(vol, MFT_RECORD_LOGFILE)?;
        let log = unnamed_data(&record, "NTFS $LogFile")?;
        let runs = data_runs(&log.body, self.boot.clusters(), "NTFS $LogFile")?;
        let &(lcn, _) = runs
            .first()
            .ok_or_else(|| Error::corrupt("NTFS $LogFile has no clusters".into()))?;
        let offset = lcn * self.boot.cluster_bytes;
        let head = vol.read(offset, 512, "NTFS $LogFile")?;
        if head[..4] == [0xFF; 4] {
            return Ok(()); // an emptied log: nothing to replay
        }
        if &head[..4] != b"RSTR" && &head[..4] != b"CHKD" {
            return Err(Error::unsupported(
                "the log's restart page is damaged (run chkdsk)".into(),
            ));
        }
        let page = u64::from(le32(&head, 0x10));
        if !(512..=65536).contains(&page) || !page.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "NTFS $LogFile: restart page of {page} bytes"
            )));
        }
        let mut restart = vol.read(offset, page, "NTFS $LogFile")?;
        apply_fixups(&mut restart, "NTFS $LogFile restart page")?;
        let area = usize::from(le16(&restart, 0x18));
        if area + 0x10 > restart.len() {
            return Err(Error::corrupt(format!(
                "NTFS $LogFile: restart area at {area}"
            )));
        }
        let in_use = le16(&restart, area + 0x0C);
        let flags = le16(&restart, area + 0x0E);
        if in_use != LOGFILE_NO_CLIENT && flags & RESTART_VOLUME_IS_CLEAN == 0 {
            return Err(Error::unsupported(
                "the log has changes to replay: Windows was not shut down cleanly, or is \
                 hibernated (fast startup); boot it and shut it down fully"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The free clusters as sorted runs `(first cluster, count)`, from
    /// `$Bitmap`.
    pub fn free_cluster_runs(&self, vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
        let clusters = self.boot.clusters();
        let record = self.record(vol, MFT_RECORD_BITMAP)?;
        let data = unnamed_data(&record, "NTFS $Bitmap")?;
        let runs = data_runs(&data.body, clusters, "NTFS $Bitmap")?;
        let needed = clusters.div_ceil(8);
        if data.data_size < needed {
            return Err(Error::corrupt(format!(
                "NTFS $Bitmap holds {} bytes, {clusters} clusters need {needed}",
                data.data_size
            )));
        }
        let cb = self.boot.cluster_bytes;
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut bit = 0u64; // the cluster the next bitmap bit describes
        'runs: for (lcn, n) in runs {
            let mut done = 0;
            while done < n * cb {
                if bit >= clusters {
                    break 'runs;
                }
                let len = (n * cb - done)
                    .min(MAX_READ)
                    .min((clusters - bit).div_ceil(8));
                let bytes = vol.read(lcn * cb + done, len, "NTFS $Bitmap")?;
                for byte in bytes {
                    for b in 0..8 {
                        if bit >= clusters {
                            break;
                        }
                        if byte & (1 << b) == 0 {
                            match free.last_mut() {
                                Some((s, l)) if *s + *l == bit => *l += 1,
                                _ => free.push((bit, 1)),
                            }
                        }
                        bit += 1;
                    }
                }
                done += len;
            }
        }
        if bit < clusters {
            return Err(Error::corrupt(format!(
                "NTFS $Bitmap's runs cover {bit} of {clusters} clusters"
            )));
        }
        Ok(free)
    }
}

/// The unnamed `$DATA` attribute of a record, which must be non-resident,
/// whole (not split by an attribute list), uncompressed and not sparse.
fn unnamed_data(record: &[u8], what: &str) -> Result<Attribute> {
    let attrs = attributes(record, what)?;
    if attrs.iter().any(|a| a.kind == ATTR_ATTRIBUTE_LIST) {
        return Err(Error::unsupported(format!(
            "{what} has an attribute list (too fragmented for this reader)"
        )));
    }
    let data = attrs
        .into_iter()
        .find(|a| a.kind == ATTR_DATA && a.name_len == 0)
        .ok_or_else(|| Error::corrupt(format!("{what} has no $DATA")))?;
    if !data.non_resident || data.first_vcn != 0 || data.flags & 0xC001 != 0 {
        return Err(Error::unsupported(format!(
            "{what}'s $DATA is resident, compressed, encrypted, sparse or split"
        )));
    }
    Ok(data)
}

/// The free byte runs of the NTFS volume on `vol`, or why it is kept
/// whole.
pub fn free_space(vol: &mut Volume) -> Result<Vec<(u64, u64)>> {
    let ntfs = Ntfs::open(vol)?;
    ntfs.check_clean(vol)?;
    let cb = ntfs.boot.cluster_bytes;
    Ok(ntfs
        .free_cluster_runs(vol)?
        .into_iter()
        .map(|(c, n)| (c * cb, n * cb))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_runs_decode_signed_relative_offsets() {
        // 0x21: 1 length byte, 2 offset bytes. Run 1: 0x18 clusters at
        // 0x5634; run 2: 0x10 clusters at 0x5634 - 0x0100 (offset 0xFF00).
        let runs = [0x21, 0x18, 0x34, 0x56, 0x21, 0x10, 0x00, 0xFF, 0x00];
        assert_eq!(
            data_runs(&runs, 1 << 20, "t").unwrap(),
            vec![(0x5634, 0x18), (0x5534, 0x10)]
        );
        assert!(data_runs(&[0x21, 0x18, 0x34], 1 << 20, "t").is_err());
        assert!(data_runs(&[0x01, 0x18, 0x00], 1 << 20, "t").is_err());
        assert!(data_runs(&[0x21, 0x18, 0x34, 0x56, 0x00], 0x5000, "t").is_err());
    }
}
