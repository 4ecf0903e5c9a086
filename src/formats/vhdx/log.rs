//! The VHDX metadata log, replayed in memory.
//!
//! A writer updates VHDX metadata (BAT, metadata region, sector bitmaps) by
//! first writing the new 4 KiB pages to a circular log, then to their home.
//! A crash in between leaves the header's log GUID non-zero and the log's
//! active sequence still to be applied. QEMU refuses such files; we apply
//! the log to an in-memory overlay of the file (a [`FileView`]) and never
//! write the file.
//!
//! Log facts used (MS-VHDX, restated): the log is a circular buffer of
//! 4 KiB sectors at the header's log offset/length. An *entry* starts with a
//! 64-byte header — signature `loge`, CRC-32C of the whole entry (checksum
//! field taken as zero), entry length, tail (log offset of the first entry
//! of the sequence still needed), sequence number, descriptor count, log
//! GUID, flushed file offset, last file offset — followed by 32-byte
//! descriptors (in the header sector and as many following sectors as they
//! need) and then one 4 KiB data sector per data descriptor. A *data
//! descriptor* (`desc`) carries the first 8 and last 4 bytes of a page plus
//! its file offset; its data sector (`data`, sequence high, 4084 bytes,
//! sequence low) carries the middle. A *zero descriptor* (`zero`) zeroes a
//! run of whole 4 KiB pages. Every descriptor and data sector repeats the
//! entry's sequence number. Entries of a sequence follow each other in the
//! log with sequence numbers rising by one; the sequence is usable when the
//! tail of its newest entry points at one of its entries. Of all usable
//! sequences whose entries carry the header's log GUID, the one with the
//! highest sequence number is the active one, replayed from its tail entry
//! to its newest. Anything that fails a check (torn write, stale GUID, bad
//! CRC) is simply not part of any sequence and is never replayed.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;

use byteorder::{ByteOrder, LittleEndian};

use crate::error::{Error, Result};

pub(super) const PAGE: u64 = 4096;
const ENTRY_HEADER_BYTES: u64 = 64;
const DESCRIPTOR_BYTES: u64 = 32;
const MIB: u64 = 1 << 20;
/// The log is read into memory to be scanned; Hyper-V and QEMU make 1 MiB
/// logs, so anything past this is refused rather than allocated.
const MAX_LOG_BYTES: u64 = 256 * MIB;

/// A 4 KiB-granular patch over the file.
#[derive(Debug)]
enum Patch {
    Zeros,
    /// Exactly one page.
    Page(Box<[u8]>),
}

#[derive(Debug)]
struct Extent {
    len: u64,
    patch: Patch,
}

/// The image file as a reader sees it after log replay: the file's bytes,
/// zeros past its end (up to the length the log says it has), and the
/// replayed pages on top.
#[derive(Debug)]
pub(super) struct FileView {
    file: crate::file_io::SourceFile,
    name: String,
    file_len: u64,
    view_len: u64,
    /// Non-overlapping page-aligned extents keyed by their start offset.
    patches: BTreeMap<u64, Extent>,
}

impl FileView {
    pub(super) fn new(file: File, name: String, file_len: u64) -> FileView {
        FileView {
            file: file.into(),
            name,
            file_len,
            view_len: file_len,
            patches: BTreeMap::new(),
        }
    }

    /// The file's real length.
    pub(super) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The file's length after replay.
    pub(super) fn len(&self) -> u64 {
        self.view_len
    }

    /// Number of patched extents (0 when no log was replayed).
    #[cfg(test)]
    fn patch_count(&self) -> usize {
        self.patches.len()
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Reads `buf.len()` bytes at `offset` of the replayed file.
    pub(super) fn read_exact(&self, what: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if !matches!(end, Some(end) if end <= self.view_len) {
            return Err(Error::corrupt(format!(
                "{}: {what} at byte offset {offset} (+{} bytes) lies past the end of the \
                 {}-byte file",
                self.name,
                buf.len(),
                self.view_len
            )));
        }
        let end = offset + buf.len() as u64;
        let in_file = self.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_file);
        if !head.is_empty() {
            self.file
                .read_exact_at(head, offset)
                .map_err(|e| Error::read(&format!("{}: {what}", self.name), offset, e))?;
        }
        tail.fill(0);
        if self.patches.is_empty() {
            return Ok(());
        }
        // The extent that may start before `offset`, then all that start
        // inside the range.
        let first_key = self
            .patches
            .range(..=offset)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(offset);
        for (&start, extent) in self.patches.range(first_key..end) {
            let ext_end = start + extent.len;
            if ext_end <= offset {
                continue;
            }
            let from = start.max(offset);
            let to = ext_end.min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match &extent.patch {
                Patch::Zeros => dst.fill(0),
                Patch::Page(page) => {
                    let at = (from - start) as usize;
                    dst.copy_from_slice(&page[at..at + dst.len()]);
                }
            }
        }
        Ok(())
    }

    /// Puts `patch` over `[start, start + len)`, trimming whatever it
    /// covers. All bounds are page multiples.
    fn apply(&mut self, start: u64, len: u64, patch: Patch) {
        let end = start + len;
        let overlapping: Vec<u64> = {
            let first_key = self
                .patches
                .range(..=start)
                .next_back()
                .map(|(k, _)| *k)
                .unwrap_or(start);
            self.patches
                .range(first_key..end)
                .filter(|(k, e)| **k + e.len > start)
                .map(|(k, _)| *k)
                .collect()
        };
        for key in overlapping {
            let old = self.patches.remove(&key).expect("key just listed");
            let old_end = key + old.len;
            // Pages are single-page extents, so only zero runs can stick out
            // of the new range.
            if let Patch::Zeros = old.patch {
                if key < start {
                    self.patches.insert(
                        key,
                        Extent {
                            len: start - key,
                            patch: Patch::Zeros,
                        },
                    );
                }
                if old_end > end {
                    self.patches.insert(
                        end,
                        Extent {
                            len: old_end - end,
                            patch: Patch::Zeros,
                        },
                    );
                }
            }
        }
        self.patches.insert(start, Extent { len, patch });
    }
}

/// One operation of a log entry.
enum Op {
    Zero { offset: u64, len: u64 },
    Page { offset: u64, page: Box<[u8]> },
}

/// The parts of a valid entry the sequence search needs.
#[derive(Debug, Clone, Copy)]
struct EntryInfo {
    position: u64,
    len: u64,
    tail: u64,
    seq: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// What replay did, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Entries applied (0: the log held no valid active sequence).
    pub entries: usize,
    /// Sequence number of the newest entry applied.
    pub head_sequence: u64,
}

/// Finds the active log sequence for `log_guid` and applies it to `view`.
pub(super) fn replay(
    view: &mut FileView,
    log_guid: &[u8; 16],
    log_offset: u64,
    log_len: u64,
) -> Result<ReplaySummary> {
    let name = view.name.clone();
    if log_len == 0
        || !log_len.is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
        || log_offset < MIB
        || !matches!(log_offset.checked_add(log_len), Some(end) if end <= view.file_len)
    {
        return Err(Error::corrupt(format!(
            "{name}: header's log ({log_len} bytes at byte offset {log_offset}) is not a \
             whole number of MiB inside the {}-byte file",
            view.file_len
        )));
    }
    if log_len > MAX_LOG_BYTES {
        return Err(Error::unsupported(format!(
            "{name}: a {log_len}-byte log needs replay; logs over {MAX_LOG_BYTES} bytes are \
             not replayed"
        )));
    }
    // Bounded by the file size and MAX_LOG_BYTES, checked above.
    let mut log = vec![0u8; log_len as usize];
    view.file
        .read_exact_at(&mut log, log_offset)
        .map_err(|e| Error::read(&format!("{name}: log"), log_offset, e))?;

    let valid: Vec<EntryInfo> = (0..log_len / PAGE)
        .filter_map(|page| parse_entry(&log, page * PAGE, log_guid).map(|(info, _)| info))
        .collect();
    let Some(active) = active_sequence(&valid, log_len) else {
        return Ok(ReplaySummary::default());
    };
    let head = active[active.len() - 1];
    if head.flushed_file_offset > view.file_len {
        return Err(Error::corrupt(format!(
            "{name}: log entry {} says the file was flushed at {} bytes but it has only {} \
             (truncated?)",
            head.seq, head.flushed_file_offset, view.file_len
        )));
    }
    view.view_len = view.file_len.max(head.last_file_offset);
    for entry in &active {
        let (_, ops) = parse_entry(&log, entry.position, log_guid)
            .ok_or_else(|| Error::internal("log entry changed between scans".into()))?;
        for op in ops {
            match op {
                Op::Zero { offset, len } => view.apply(offset, len, Patch::Zeros),
                Op::Page { offset, page } => view.apply(offset, PAGE, Patch::Page(page)),
            }
        }
        // A replayed write may reach past the old end of the file.
        let reach = view
            .patches
            .iter()
            .next_back()
            .map_or(0, |(k, e)| k + e.len);
        view.view_len = view.view_len.max(reach);
    }
    Ok(ReplaySummary {
        entries: active.len(),
        head_sequence: head.seq,
    })
}

/// Picks the usable sequence with the highest head sequence number.
fn active_sequence(valid: &[EntryInfo], log_len: u64) -> Option<Vec<EntryInfo>> {
    let by_position: BTreeMap<u64, EntryInfo> = valid.iter().map(|e| (e.position, *e)).collect();
    // An entry that directly follows another valid entry of the previous
    // sequence number is not the start of a chain.
    let continued: HashSet<(u64, u64)> = valid
        .iter()
        .map(|e| ((e.position + e.len) % log_len, e.seq.wrapping_add(1)))
        .collect();
    let mut best: Option<Vec<EntryInfo>> = None;
    for start in valid {
        if continued.contains(&(start.position, start.seq)) {
            continue;
        }
        let mut chain = vec![*start];
        let mut covered = start.len;
        loop {
            let last = chain[chain.len() - 1];
            let next_at = (last.position + last.len) % log_len;
            match by_position.get(&next_at) {
                Some(next)
                    if Some(next.seq) == last.seq.checked_add(1)
                        && covered + next.len <= log_len =>
                {
                    covered += next.len;
                    chain.push(*next);
                }
                _ => break,
            }
        }
        // The longest prefix whose newest entry's tail lies inside it.
        for head_index in (0..chain.len()).rev() {
            let tail = chain[head_index].tail;
            if let Some(tail_index) = chain[..=head_index].iter().position(|e| e.position == tail) {
                let candidate = chain[tail_index..=head_index].to_vec();
                let better = match &best {
                    Some(b) => b[b.len() - 1].seq < candidate[candidate.len() - 1].seq,
                    None => true,
                };
                if better {
                    best = Some(candidate);
                }
                break;
            }
        }
    }
    best
}

/// `len` bytes of the circular log from `at`.
fn circular(log: &[u8], at: u64, len: u64) -> Vec<u8> {
    let at = at as usize;
    let len = len as usize;
    let first = len.min(log.len() - at);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&log[at..at + first]);
    out.extend_from_slice(&log[..len - first]);
    out
}

/// Parses and fully checks the entry at log offset `position`; `None` when
/// anything about it is wrong.
fn parse_entry(log: &[u8], position: u64, log_guid: &[u8; 16]) -> Option<(EntryInfo, Vec<Op>)> {
    let log_len = log.len() as u64;
    let first = &log[position as usize..(position + PAGE) as usize];
    if &first[0..4] != b"loge" {
        return None;
    }
    let checksum = LittleEndian::read_u32(&first[4..]);
    let len = u64::from(LittleEndian::read_u32(&first[8..]));
    let tail = u64::from(LittleEndian::read_u32(&first[12..]));
    let seq = LittleEndian::read_u64(&first[16..]);
    let descriptor_count = u64::from(LittleEndian::read_u32(&first[24..]));
    if &first[32..48] != log_guid
        || seq == 0
        || len == 0
        || len % PAGE != 0
        || len > log_len
        || tail % PAGE != 0
        || tail >= log_len
    {
        return None;
    }
    let sectors = len / PAGE;
    let descriptor_sectors =
        (ENTRY_HEADER_BYTES + descriptor_count * DESCRIPTOR_BYTES).div_ceil(PAGE);
    if descriptor_sectors > sectors {
        return None;
    }
    let entry = circular(log, position, len);
    let mut zeroed = entry.clone();
    zeroed[4..8].fill(0);
    if crc32c::crc32c(&zeroed) != checksum {
        return None;
    }
    let flushed_file_offset = LittleEndian::read_u64(&entry[48..]);
    let last_file_offset = LittleEndian::read_u64(&entry[56..]);

    let mut ops = Vec::new();
    let mut data_sector = descriptor_sectors;
    for index in 0..descriptor_count {
        let at = (ENTRY_HEADER_BYTES + index * DESCRIPTOR_BYTES) as usize;
        let d = &entry[at..at + DESCRIPTOR_BYTES as usize];
        let file_offset = LittleEndian::read_u64(&d[16..]);
        if LittleEndian::read_u64(&d[24..]) != seq || file_offset % PAGE != 0 {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let zero_len = LittleEndian::read_u64(&d[8..]);
                if zero_len == 0
                    || zero_len % PAGE != 0
                    || file_offset.checked_add(zero_len).is_none()
                {
                    return None;
                }
                ops.push(Op::Zero {
                    offset: file_offset,
                    len: zero_len,
                });
            }
            b"desc" => {
                if data_sector >= sectors || file_offset.checked_add(PAGE).is_none() {
                    return None;
                }
                let at = (data_sector * PAGE) as usize;
                let s = &entry[at..at + PAGE as usize];
                let seq_high = u64::from(LittleEndian::read_u32(&s[4..]));
                let seq_low = u64::from(LittleEndian::read_u32(&s[4092..]));
                if &s[0..4] != b"data" || (seq_high << 32 | seq_low) != seq {
                    return None;
                }
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                page[0..8].copy_from_slice(&d[8..16]); // leading bytes
                page[8..4092].copy_from_slice(&s[8..4092]);
                page[4092..4096].copy_from_slice(&d[4..8]); // trailing bytes
                ops.push(Op::Page {
                    offset: file_offset,
                    page,
                });
                data_sector += 1;
            }
            _ => return None,
        }
    }
    Some((
        EntryInfo {
            position,
            len,
            tail,
            seq,
            flushed_file_offset,
            last_file_offset,
        },
        ops,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_over(bytes: &[u8]) -> (tempfile::NamedTempFile, FileView) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let file = File::open(tmp.path()).unwrap();
        let view = FileView::new(file, "t".into(), bytes.len() as u64);
        (tmp, view)
    }

    #[test]
    fn patches_stack_in_order_and_trim_each_other() {
        let (_tmp, mut view) = view_over(&[7u8; 5 * 4096]);
        view.apply(0, 4 * PAGE, Patch::Zeros);
        view.apply(PAGE, PAGE, Patch::Page(vec![9u8; 4096].into_boxed_slice()));
        view.apply(2 * PAGE, PAGE, Patch::Zeros);
        let mut buf = vec![0u8; 5 * 4096];
        view.read_exact("all", 0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 9));
        assert!(buf[8192..4 * 4096].iter().all(|&b| b == 0));
        assert!(buf[4 * 4096..].iter().all(|&b| b == 7));
        // An unaligned read across extents.
        let mut part = vec![0u8; 10];
        view.read_exact("part", 8190, &mut part).unwrap();
        assert_eq!(part, [9, 9, 0, 0, 0, 0, 0, 0, 0, 0]);
        view.apply(0, 5 * PAGE, Patch::Zeros);
        assert_eq!(view.patch_count(), 1);
    }

    #[test]
    fn reads_past_the_view_are_errors() {
        let (_tmp, view) = view_over(&[1u8; 4096]);
        let mut buf = [0u8; 2];
        assert!(view.read_exact("x", 4095, &mut buf).is_err());
        assert!(view.read_exact("x", u64::MAX, &mut buf).is_err());
    }
}
