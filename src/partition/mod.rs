//! Partition tables (MBR with logical partitions, and GPT): reading them
//! for a summary, and the headline edit of the legacy cloning tool —
//! enlarging a disk — done through an overlay so the source is never
//! written.
//!
//! Enlarging (see [`enlarge`]): the drive grows by `new - old` sectors, of
//! which `shift` (the growth rounded down to the alignment) is inserted
//! right after the chosen partition. Everything after that partition slides
//! up by `shift` with one `move_sectors` (no data is copied), the chosen
//! partition grows by `shift`, and every table sector is rewritten through
//! the overlay: the MBR and EBRs (starts, lengths, CHS fields), or both GPT
//! headers and entry arrays with their CRC32s, the backup moved to the new
//! end, and the protective MBR's length. The file system inside the grown
//! partition is not resized.

pub mod gpt;
pub mod mbr;

use crate::disk::{Disk, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::overlay::Overlay;

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    Mbr(mbr::Mbr),
    Gpt(gpt::Gpt),
}

/// One partition, as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux gives it (MBR: slot 1..4, logical 5..; GPT: entry
    /// index + 1).
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
    /// The type: MBR type byte as hex ("83"), or the GPT type GUID.
    pub kind: String,
    /// The GPT name (empty for MBR).
    pub name: String,
    /// True for an MBR extended partition (a container, not data).
    pub container: bool,
    /// True for a bootable MBR entry.
    pub bootable: bool,
}

impl Partition {
    /// One past the last sector.
    pub fn end(&self) -> u64 {
        self.start + self.sectors
    }
}

/// Reads the disk's partition table: `None` when sector 0 has no boot
/// signature (no table); an error when a table is there but damaged or
/// does not fit the disk. `what` names the image in errors.
pub fn read_table(disk: &mut dyn Disk, what: &str) -> Result<Option<Table>> {
    if disk.sector_count() == 0 {
        return Ok(None);
    }
    let mut sector = vec![0u8; SECTOR_SIZE];
    disk.read_sectors(0, &mut sector)?;
    if !mbr::has_signature(&sector) {
        return Ok(None);
    }
    let protective =
        (0..4).any(|slot| sector[mbr::ENTRIES_AT + 16 * slot + 4] == mbr::TYPE_PROTECTIVE);
    if protective {
        return Ok(Some(Table::Gpt(gpt::Gpt::read(disk, what)?)));
    }
    Ok(Some(Table::Mbr(mbr::Mbr::read(disk, what)?)))
}

impl Table {
    /// "mbr" or "gpt".
    pub fn kind(&self) -> &'static str {
        match self {
            Table::Mbr(_) => "mbr",
            Table::Gpt(_) => "gpt",
        }
    }

    /// Every partition, in number order.
    pub fn partitions(&self) -> Vec<Partition> {
        match self {
            Table::Mbr(m) => {
                let mut list: Vec<Partition> = m
                    .primary
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.is_empty())
                    .map(|(slot, e)| Partition {
                        number: slot as u32 + 1,
                        start: u64::from(e.start),
                        sectors: u64::from(e.sectors),
                        kind: format!("{:02x}", e.kind),
                        name: String::new(),
                        container: mbr::is_extended(e.kind),
                        bootable: e.boot == 0x80,
                    })
                    .collect();
                list.extend(
                    m.logical
                        .iter()
                        .filter(|l| !l.entry.is_empty())
                        .enumerate()
                        .map(|(i, l)| Partition {
                            number: 5 + i as u32,
                            start: l.start(),
                            sectors: u64::from(l.entry.sectors),
                            kind: format!("{:02x}", l.entry.kind),
                            name: String::new(),
                            container: false,
                            bootable: l.entry.boot == 0x80,
                        }),
                );
                list
            }
            Table::Gpt(g) => g
                .entries
                .iter()
                .map(|e| Partition {
                    number: e.index as u32 + 1,
                    start: e.first_lba,
                    sectors: e.sectors(),
                    kind: gpt::guid_text(&e.type_guid),
                    name: e.name.clone(),
                    container: false,
                    bootable: false,
                })
                .collect(),
        }
    }
}

/// Where the partitions after the grown one may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    /// 1 MiB (2048 sectors): the modern default.
    MiB,
    /// Whole cylinders of 255 heads x 63 sectors (16065 sectors), as the
    /// legacy tool aligned.
    Cylinder,
}

impl Alignment {
    /// The alignment in sectors.
    pub fn sectors(self) -> u64 {
        match self {
            Alignment::MiB => 2048,
            Alignment::Cylinder => mbr::HEADS * mbr::SECTORS_PER_TRACK,
        }
    }
}

/// What to enlarge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnlargeOptions {
    /// The new size of the drive in sectors.
    pub new_sectors: u64,
    /// The partition to grow (its Linux number); `None` picks the largest
    /// data partition.
    pub partition: Option<u32>,
    pub alignment: Alignment,
}

/// What an enlargement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnlargeReport {
    pub table: &'static str,
    /// The number of the partition that grew.
    pub partition: u32,
    /// Sectors inserted after it (the growth of the partition, and how far
    /// the following partitions moved).
    pub shift: u64,
    pub old_sectors: u64,
    pub new_sectors: u64,
    pub before: Vec<Partition>,
    pub after: Vec<Partition>,
}

/// Enlarges the overlay's drive to `options.new_sectors` as the module doc
/// describes. `what` names the image in errors. On error the overlay may
/// be partly edited; the source never is.
pub fn enlarge(
    overlay: &mut Overlay,
    options: &EnlargeOptions,
    what: &str,
) -> Result<EnlargeReport> {
    let old = overlay.sector_count();
    let new = options.new_sectors;
    if new <= old {
        return Err(Error::invalid_argument(format!(
            "{what}: the new size ({new} sectors) must be larger than the current size \
             ({old} sectors)"
        )));
    }
    let table = read_table(overlay, what)?.ok_or_else(|| {
        Error::unsupported(format!(
            "{what}: no partition table (no MBR boot signature in sector 0)"
        ))
    })?;
    let before = table.partitions();
    let data: Vec<&Partition> = before.iter().filter(|p| !p.container).collect();
    let chosen = match options.partition {
        Some(n) => *data.iter().find(|p| p.number == n).ok_or_else(|| {
            let numbers: Vec<String> = data.iter().map(|p| p.number.to_string()).collect();
            Error::invalid_argument(format!(
                "{what}: no partition {n} to grow (the {} table has {})",
                table.kind().to_uppercase(),
                if numbers.is_empty() {
                    "no data partitions".to_string()
                } else {
                    format!("partition(s) {}", numbers.join(", "))
                }
            ))
        })?,
        None => *data
            .iter()
            .max_by_key(|p| (p.sectors, std::cmp::Reverse(p.number)))
            .ok_or_else(|| {
                Error::unsupported(format!("{what}: the partition table has no partitions"))
            })?,
    };
    let end = chosen.end();
    for p in &before {
        let contains_chosen = p.start <= chosen.start && p.end() >= end;
        if p.number != chosen.number && !contains_chosen && p.start < end && p.end() > end {
            return Err(Error::corrupt(format!(
                "{what}: partition {} overlaps partition {}",
                p.number, chosen.number
            )));
        }
    }
    let align = options.alignment.sectors();
    let growth = new - old;
    let shift = growth / align * align;
    if shift == 0 {
        return Err(Error::invalid_argument(format!(
            "{what}: growing by {growth} sectors is less than one alignment step of {align} \
             sectors; choose a larger size"
        )));
    }
    // The region that slides: from the chosen partition's end to the end of
    // the usable space (for GPT, the backup header and array stay behind
    // and are rewritten at the new end).
    let region_end = match &table {
        Table::Mbr(_) => old,
        Table::Gpt(g) => g.header.last_usable + 1,
    };
    if let Table::Mbr(_) = table {
        let limit = u64::from(u32::MAX);
        for p in &before {
            let (s, e) = (map(p.start, end, shift), map(p.end(), end, shift));
            if s > limit || e - s > limit {
                return Err(Error::unsupported(format!(
                    "{what}: an MBR cannot describe partition {} at sectors {s}..{e}: it \
                     addresses at most 2^32 sectors (2 TiB); use GPT",
                    p.number
                )));
            }
        }
    }
    let kind = table.kind();
    overlay.insert(old, growth)?;
    let len = region_end.saturating_sub(end);
    if len > 0 {
        overlay.move_sectors(end, end + shift + len, len)?;
    }
    // Whatever the cut left in the new gap (the old GPT backup) goes.
    overlay.discard(end, shift)?;
    match table {
        Table::Mbr(m) => rewrite_mbr(overlay, &m, end, shift)?,
        Table::Gpt(g) => rewrite_gpt(overlay, g, end, shift, new)?,
    }
    let after = read_table(overlay, what)?
        .ok_or_else(|| Error::internal(format!("{what}: the rewritten table does not read back")))?
        .partitions();
    Ok(EnlargeReport {
        table: kind,
        partition: chosen.number,
        shift,
        old_sectors: old,
        new_sectors: new,
        before,
        after,
    })
}

/// Where a boundary (a first sector, or one past a last sector) lands:
/// everything at or after the grown partition's end moves up by `shift`.
fn map(x: u64, end: u64, shift: u64) -> u64 {
    if x >= end {
        x + shift
    } else {
        x
    }
}

fn to_u32(x: u64) -> Result<u32> {
    u32::try_from(x).map_err(|_| {
        Error::unsupported(format!("{x} does not fit a 32-bit MBR field (2 TiB limit)"))
    })
}

fn rewrite_mbr(overlay: &mut Overlay, m: &mbr::Mbr, end: u64, shift: u64) -> Result<()> {
    let mut sector = vec![0u8; SECTOR_SIZE];
    overlay.read_sectors(0, &mut sector)?;
    for (slot, e) in m.primary.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let start = map(u64::from(e.start), end, shift);
        let stop = map(u64::from(e.start) + u64::from(e.sectors), end, shift);
        let new = mbr::Entry {
            start: to_u32(start)?,
            sectors: to_u32(stop - start)?,
            ..*e
        };
        if new != *e {
            mbr::write_entry(&mut sector, slot, &new, start);
        }
    }
    overlay.write(0, &sector)?;
    let Some(ext_slot) = m.extended else {
        return Ok(());
    };
    let ext_start = u64::from(m.primary[ext_slot].start);
    let new_ext_start = map(ext_start, end, shift);
    for (i, l) in m.logical.iter().enumerate() {
        let ebr = map(l.ebr, end, shift);
        overlay.read_sectors(ebr, &mut sector)?;
        if !l.entry.is_empty() {
            let start = map(l.start(), end, shift);
            let stop = map(l.start() + u64::from(l.entry.sectors), end, shift);
            let new = mbr::Entry {
                start: to_u32(start - ebr)?,
                sectors: to_u32(stop - start)?,
                ..l.entry
            };
            if new != l.entry {
                mbr::write_entry(&mut sector, 0, &new, start);
            }
        }
        if !l.link.is_empty() {
            let next_ebr = ext_start + u64::from(l.link.start);
            let link_end = next_ebr + u64::from(l.link.sectors);
            let start = map(next_ebr, end, shift);
            let stop = map(link_end, end, shift);
            let new = mbr::Entry {
                start: to_u32(start - new_ext_start)?,
                sectors: to_u32(stop - start)?,
                ..l.link
            };
            if new != l.link {
                mbr::write_entry(&mut sector, 1, &new, start);
            }
            debug_assert_eq!(m.logical.get(i + 1).map(|n| n.ebr), Some(next_ebr));
        }
        overlay.write(ebr, &sector)?;
    }
    Ok(())
}

fn rewrite_gpt(
    overlay: &mut Overlay,
    mut g: gpt::Gpt,
    end: u64,
    shift: u64,
    new: u64,
) -> Result<()> {
    let moved: Vec<(usize, u64, u64)> = g
        .entries
        .iter()
        .map(|e| {
            let first = map(e.first_lba, end, shift);
            let last = map(e.last_lba + 1, end, shift) - 1;
            (e.index, first, last)
        })
        .collect();
    for (index, first, last) in moved {
        g.set_range(index, first, last);
    }
    let array_sectors = g.header.array_sectors();
    let backup_header = new - 1;
    let backup_array = backup_header - array_sectors;
    let last_usable = backup_array - 1;
    let crc = g.array_crc();
    let array = g.array_sectors_bytes();
    overlay.write(g.header.entries_lba, &array)?;
    overlay.write(backup_array, &array)?;
    let primary = g
        .header
        .to_sector(1, backup_header, last_usable, g.header.entries_lba, crc);
    overlay.write(1, &primary)?;
    let backup = g
        .header
        .to_sector(backup_header, 1, last_usable, backup_array, crc);
    overlay.write(backup_header, &backup)?;
    // The protective MBR covers the whole (new) disk.
    let mut sector = vec![0u8; SECTOR_SIZE];
    overlay.read_sectors(0, &mut sector)?;
    for slot in 0..4 {
        let at = mbr::ENTRIES_AT + 16 * slot;
        if sector[at + 4] == mbr::TYPE_PROTECTIVE {
            let entry = mbr::Entry {
                boot: sector[at],
                kind: mbr::TYPE_PROTECTIVE,
                start: 1,
                sectors: u32::try_from(new - 1).unwrap_or(u32::MAX),
            };
            mbr::write_entry(&mut sector, slot, &entry, 1);
        }
    }
    overlay.write(0, &sector)?;
    Ok(())
}
