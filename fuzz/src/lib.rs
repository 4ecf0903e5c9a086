//! The fuzz harness of cowdisk's format parsers: one entry point per
//! target, shared by the libFuzzer targets in `fuzz_targets/` (run with
//! `cargo +nightly fuzz`) and by the main crate's `tests/fuzz_corpus.rs`,
//! which includes this file and drives every target over a deterministic
//! corpus in a normal `cargo test`. So it uses nothing but `cowdisk`,
//! `tempfile` and `std`.
//!
//! A target writes its input to a file in a per-thread scratch folder, opens
//! it through `cowdisk::formats::open_path` (content probing, parent paths
//! not followed) and reads sectors and block statuses with a cap on work.
//! Any `Ok` or `Err` is fine; a panic, a hang, or a change to the input file
//! is a bug.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Disk, DriveType};

/// Most sectors read from the start of a disk (8 MiB): a damaged header may
/// claim an exabyte.
pub const MAX_HEAD_SECTORS: u64 = 16 * 1024;
/// Sectors per read and per block-status query.
pub const CHUNK_SECTORS: u64 = 256;
/// Most sectors one whole-disk block-status query spans.
pub const MAX_STATUS_SECTORS: u64 = 1 << 24;

/// The companion extent a fuzzed VMDK descriptor may name: a 1 MiB flat
/// file next to it (the name qemu-img gives the extent of `extent.vmdk`).
pub const DESCRIPTOR_EXTENT: &str = "extent-flat.vmdk";
/// Its size in bytes.
pub const DESCRIPTOR_EXTENT_BYTES: usize = 1 << 20;

/// One fuzz target per parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Vdi,
    Parallels,
    Vhd,
    Vhdx,
    Qcow2,
    /// A VMDK sparse extent (monolithicSparse, streamOptimized).
    VmdkSparse,
    /// A VMDK text descriptor, next to a flat extent it may name.
    VmdkDescriptor,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Vdi,
        Target::Parallels,
        Target::Vhd,
        Target::Vhdx,
        Target::Qcow2,
        Target::VmdkSparse,
        Target::VmdkDescriptor,
    ];

    /// The target's name (as in `cargo fuzz run NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Vdi => "vdi",
            Target::Parallels => "parallels",
            Target::Vhd => "vhd",
            Target::Vhdx => "vhdx",
            Target::Qcow2 => "qcow2",
            Target::VmdkSparse => "vmdk_sparse",
            Target::VmdkDescriptor => "vmdk_descriptor",
        }
    }

    /// The drive type an input opens as when it reaches this parser.
    pub fn drive_type(self) -> DriveType {
        match self {
            Target::Vdi => DriveType::Vdi,
            Target::Parallels => DriveType::Parallels,
            Target::Vhd => DriveType::Vhd,
            Target::Vhdx => DriveType::Vhdx,
            Target::Qcow2 => DriveType::Qcow2,
            Target::VmdkSparse | Target::VmdkDescriptor => DriveType::Vmdk,
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Target::Vdi => "input.vdi",
            Target::Parallels => "input.hdd",
            Target::Vhd => "input.vhd",
            Target::Vhdx => "input.vhdx",
            Target::Qcow2 => "input.qcow2",
            Target::VmdkSparse | Target::VmdkDescriptor => "input.vmdk",
        }
    }
}

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The drive type it opened as, or `None` when it was refused.
    pub opened_as: Option<DriveType>,
    /// Reads and status queries that returned an error.
    pub failed_reads: u64,
}

struct Scratch {
    dir: tempfile::TempDir,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// The pattern of the descriptor's companion extent.
fn extent_bytes() -> Vec<u8> {
    (0..DESCRIPTOR_EXTENT_BYTES)
        .map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(3) | 1)
        .collect()
}

fn with_scratch<T>(f: impl FnOnce(&Path) -> T) -> T {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        let scratch = slot.get_or_insert_with(|| {
            let dir = tempfile::tempdir().expect("scratch folder");
            std::fs::write(dir.path().join(DESCRIPTOR_EXTENT), extent_bytes())
                .expect("descriptor extent");
            Scratch { dir }
        });
        f(scratch.dir.path())
    })
}

/// Runs one target on one input: the body of each libFuzzer target.
///
/// Panics (the fuzzer's "crash") if the library panics, or if opening and
/// reading changed the input file or the descriptor's extent.
pub fn run(target: Target, data: &[u8]) -> Outcome {
    with_scratch(|dir| {
        let path: PathBuf = dir.join(target.file_name());
        std::fs::write(&path, data).expect("write the input");
        let outcome = open_and_exercise(&path);
        let after = std::fs::read(&path).expect("read the input back");
        assert!(after == data, "opening {} changed the file", target.name());
        if target == Target::VmdkDescriptor {
            let extent = dir.join(DESCRIPTOR_EXTENT);
            let len = std::fs::metadata(&extent).map(|m| m.len()).unwrap_or(0);
            assert_eq!(len, DESCRIPTOR_EXTENT_BYTES as u64, "extent changed");
        }
        std::fs::remove_file(&path).expect("remove the input");
        outcome
    })
}

/// Opens an image through the probe (parent paths not followed) and, when
/// it opens, exercises it with [`exercise`].
pub fn open_and_exercise(path: &Path) -> Outcome {
    match open_path(path, &OpenOptions::default()) {
        Ok(mut disk) => Outcome {
            opened_as: Some(disk.drive_type()),
            failed_reads: exercise(disk.as_mut()),
        },
        Err(_) => Outcome {
            opened_as: None,
            failed_reads: 0,
        },
    }
}

/// Reads the disk and asks its block status, with a cap on work: every
/// sector of the first [`MAX_HEAD_SECTORS`] in chunks, the last chunk, odd
/// single sectors, and one status query over (at most
/// [`MAX_STATUS_SECTORS`] of) the whole disk. Returns how many calls
/// failed; results are not checked (the input is garbage), only that
/// nothing panics.
pub fn exercise(disk: &mut dyn Disk) -> u64 {
    let mut failed = 0;
    let mut tally = |ok: bool| {
        if !ok {
            failed += 1;
        }
    };
    let sectors = disk.sector_count();
    let _ = disk.byte_size();
    let _ = disk.uuid();
    let _ = disk.is_snapshot();
    let mut buf = vec![0u8; CHUNK_SECTORS as usize * 512];
    let head = sectors.min(MAX_HEAD_SECTORS);
    let mut lba = 0;
    while lba < head {
        let n = CHUNK_SECTORS.min(head - lba);
        tally(disk.read_sectors(lba, &mut buf[..n as usize * 512]).is_ok());
        tally(disk.block_status(lba, n).is_ok());
        lba += n;
    }
    if sectors > head {
        let n = CHUNK_SECTORS.min(sectors - head);
        let lba = sectors - n;
        tally(disk.read_sectors(lba, &mut buf[..n as usize * 512]).is_ok());
        tally(disk.block_status(lba, n).is_ok());
        // A few single sectors spread over the disk.
        for i in 1..8u64 {
            let lba = sectors / 8 * i;
            tally(disk.read_sectors(lba, &mut buf[..512]).is_ok());
        }
    }
    if sectors > 0 {
        tally(
            disk.block_status(0, sectors.min(MAX_STATUS_SECTORS))
                .is_ok(),
        );
    }
    failed
}

/// The overlay store's parser: opens `data` as a store read-only (the log
/// replayed in memory), walks its extent map, and runs the consistency
/// check. Panics only if the library does, or if the file changed.
pub fn run_store(data: &[u8]) -> bool {
    with_scratch(|dir| {
        let path = dir.join("input.cow");
        std::fs::write(&path, data).expect("write the input");
        let opened = {
            let file = std::fs::File::open(&path).expect("open the input");
            let mut storage = cowdisk::overlay::space::FileStorage::new(file, "fuzz input".into());
            let report = cowdisk::store::check_store(&storage);
            let _ = report.is_consistent();
            match cowdisk::store::open_store(&mut storage, true) {
                Ok(store) => {
                    let _ = store.map.to_vec();
                    true
                }
                Err(_) => false,
            }
        };
        let after = std::fs::read(&path).expect("read the input back");
        assert!(after == data, "opening a store read-only changed the file");
        std::fs::remove_file(&path).expect("remove the input");
        opened
    })
}

// ---------------------------------------------------------------------------
// Checksum-recomputing variants: the fuzzer mutates, then the checksums are
// made right again, so the mutation reaches the parser behind them.

/// Recomputes the checksums of a VHD's footer copy at 0, its dynamic header
/// at 512 and its footer at the end (one's complement of the byte sum).
pub fn fix_vhd(bytes: &mut [u8]) {
    fn seal(b: &mut [u8], at: usize, len: usize, field: usize) {
        b[at + field..at + field + 4].fill(0);
        let sum = b[at..at + len]
            .iter()
            .fold(0u32, |s, x| s.wrapping_add(u32::from(*x)));
        b[at + field..at + field + 4].copy_from_slice(&(!sum).to_be_bytes());
    }
    let n = bytes.len();
    if n >= 512 && &bytes[..8] == b"conectix" {
        seal(bytes, 0, 512, 64);
    }
    if n >= 1536 && &bytes[512..520] == b"cxsparse" {
        seal(bytes, 512, 1024, 36);
    }
    if n >= 1024 && &bytes[n - 512..n - 504] == b"conectix" {
        seal(bytes, n - 512, 512, 64);
    }
}

fn seal_crc32c(bytes: &mut [u8], at: usize, len: usize) {
    bytes[at + 4..at + 8].fill(0);
    let crc = crc32c::crc32c(&bytes[at..at + len]);
    bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the CRC-32C of a VHDX's log entries (found in the log region
/// each header names, at 4 KiB steps, by their `loge` signature and entry
/// length), its two headers and its two region tables.
pub fn fix_vhdx(bytes: &mut [u8]) {
    const KIB: usize = 1024;
    for header in [64 * KIB, 128 * KIB] {
        if bytes.len() < header + 4 * KIB || &bytes[header..header + 4] != b"head" {
            continue;
        }
        let f =
            |o: usize| u64::from_le_bytes(bytes[header + o..header + o + 8].try_into().unwrap());
        let log_len = u64::from(u32::from_le_bytes(
            bytes[header + 68..header + 72].try_into().unwrap(),
        ));
        let log_at = f(72);
        let (Ok(log_at), Ok(log_len)) = (usize::try_from(log_at), usize::try_from(log_len)) else {
            continue;
        };
        let end = log_at.saturating_add(log_len).min(bytes.len());
        let mut at = log_at;
        while at + 4 * KIB <= end {
            if &bytes[at..at + 4] == b"loge" {
                let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
                if len >= 4 * KIB && len.is_multiple_of(4 * KIB) && at + len <= end {
                    seal_crc32c(bytes, at, len);
                    at += len;
                    continue;
                }
            }
            at += 4 * KIB;
        }
    }
    for (at, len) in [
        (64 * KIB, 4 * KIB),
        (128 * KIB, 4 * KIB),
        (192 * KIB, 64 * KIB),
        (256 * KIB, 64 * KIB),
    ] {
        if bytes.len() >= at + len {
            seal_crc32c(bytes, at, len);
        }
    }
}

/// `run(Vhd)` after recomputing the checksums.
pub fn run_vhd_fixed(data: &[u8]) -> Outcome {
    let mut b = data.to_vec();
    fix_vhd(&mut b);
    run(Target::Vhd, &b)
}

/// `run(Vhdx)` after recomputing the checksums.
pub fn run_vhdx_fixed(data: &[u8]) -> Outcome {
    let mut b = data.to_vec();
    fix_vhdx(&mut b);
    run(Target::Vhdx, &b)
}

/// Store page tags whose pages carry a CRC-32C at offset 4 (docs/FORMAT.md).
const STORE_PAGE_TAGS: [&[u8; 4]; 5] = [b"CDID", b"CDHD", b"CDMT", b"CDND", b"CDBM"];

/// Recomputes every CRC-32C of a store image: first every 4 KiB page with
/// a page tag (wherever it is, also the pages carried inside log entries),
/// then every log entry (`CDLG`, CRC over its whole length).
pub fn fix_store(bytes: &mut [u8]) {
    const PAGE: usize = 4096;
    let pages = bytes.len() / PAGE;
    for p in 0..pages {
        let at = p * PAGE;
        if STORE_PAGE_TAGS.iter().any(|t| &bytes[at..at + 4] == *t) {
            seal_crc32c(bytes, at, PAGE);
        }
    }
    let mut p = 0;
    while p < pages {
        let at = p * PAGE;
        if &bytes[at..at + 4] == b"CDLG" {
            let blocks = u32::from_le_bytes(bytes[at + 32..at + 36].try_into().unwrap()) as usize;
            if blocks >= 1 && p + blocks <= pages {
                seal_crc32c(bytes, at, blocks * PAGE);
                p += blocks;
                continue;
            }
        }
        p += 1;
    }
}

/// The sparse store encoding the `store_fixed` target mutates (a store is
/// at least 17 MiB, mostly holes): a sequence of records, each a u32
/// little-endian page number then the 4096 bytes of that page. The file is
/// as long as its last page (page numbers are taken modulo 2^20, so at
/// most 4 GiB, sparse). A trailing partial record is ignored.
pub fn decode_sparse_store(data: &[u8]) -> (Vec<(u64, Vec<u8>)>, u64) {
    const PAGE: usize = 4096;
    let mut pages = Vec::new();
    let mut len = 0u64;
    for record in data.chunks_exact(4 + PAGE) {
        let page = u64::from(u32::from_le_bytes(record[..4].try_into().unwrap()) % (1 << 20));
        len = len.max((page + 1) * PAGE as u64);
        pages.push((page, record[4..].to_vec()));
    }
    (pages, len)
}

/// The inverse of [`decode_sparse_store`]: every page of `file` that is not
/// all zeros (for seeding the corpus from real stores).
pub fn encode_sparse_store(file: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, page) in file.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) || (i + 1) * 4096 >= file.len() {
            out.extend_from_slice(&(i as u32).to_le_bytes());
            let mut full = page.to_vec();
            full.resize(4096, 0);
            out.extend_from_slice(&full);
        }
    }
    out
}

/// The store parser on a sparse-encoded store whose checksums are made
/// right after mutation: every page is written at its place (later records
/// win), the CRC-32Cs recomputed in place, then [`run_store`]'s checks run
/// on the file (read-only open with replay, map walk, consistency check).
pub fn run_store_fixed(data: &[u8]) -> bool {
    let (pages, len) = decode_sparse_store(data);
    let mut image = std::collections::BTreeMap::new();
    for (p, bytes) in pages {
        image.insert(p, bytes);
    }
    // Log entries span consecutive pages: fix them over contiguous runs.
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (p, bytes) in image {
        match runs.last_mut() {
            Some((start, run)) if *start + (run.len() / 4096) as u64 == p => {
                run.extend_from_slice(&bytes)
            }
            _ => runs.push((p, bytes)),
        }
    }
    for (_, run) in runs.iter_mut() {
        fix_store(run);
    }
    with_scratch(|dir| {
        let path = dir.join("sparse.cow");
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::create(&path).expect("create the input");
            file.set_len(len).expect("size the input");
            for (start, run) in &runs {
                file.write_all_at(run, start * 4096)
                    .expect("write the input");
            }
        }
        let opened = store_checks(&path);
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&path).expect("reopen the input");
            for (start, run) in &runs {
                let mut back = vec![0u8; run.len()];
                file.read_exact_at(&mut back, start * 4096)
                    .expect("read back");
                assert!(&back == run, "opening a store read-only changed it");
            }
        }
        std::fs::remove_file(&path).expect("remove the input");
        opened
    })
}

fn store_checks(path: &Path) -> bool {
    let before = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let file = std::fs::File::open(path).expect("open the input");
    let mut storage = cowdisk::overlay::space::FileStorage::new(file, "fuzz input".into());
    let report = cowdisk::store::check_store(&storage);
    let _ = report.is_consistent();
    let opened = match cowdisk::store::open_store(&mut storage, true) {
        Ok(store) => {
            let _ = store.map.to_vec();
            true
        }
        Err(_) => false,
    };
    let after = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        before, after,
        "opening a store read-only changed its length"
    );
    opened
}

// ---------------------------------------------------------------------------
// The C API itself: random sequences of calls with random (valid and
// invalid) arguments and handles.

/// Reads the fuzzer's bytes as call arguments; zeros once they run out.
struct Args<'a>(&'a [u8]);

impl Args<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    /// A sector count or position: mostly small, sometimes anything.
    fn lba(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => u64::from(self.u32()),
            _ => u64::from(self.u8()) * 7 + u64::from(self.u8()),
        }
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sectors of the raw source the C API target opens.
pub const CAPI_SOURCE_SECTORS: usize = 256;

/// The body of the `capi` target: interprets `data` as up to 96 calls of
/// the C API (`cowdisk::ffi`) on handles it opened, closed or made up
/// (NULL, closed handles, a disk where an overlay is expected, pointers the
/// library never gave out), with random counts, positions, flags, options
/// and NULL or valid buffers. Built-in backend tables are driven the same
/// way. Everything still open is closed at the end. Only the caller's side
/// of the contract is kept (buffers as large as the counts say, pointers
/// passed as a source are NULL or handles the library gave out); anything
/// else must be an error code, never a crash (the fuzzer runs this under
/// AddressSanitizer).
pub fn run_capi(data: &[u8]) {
    use cowdisk::ffi::api::*;
    use cowdisk::ffi::backend::{COW_GetBackend, COW_GetBackendCount, COW_BACKEND};
    use cowdisk::ffi::types::*;
    use std::ffi::{c_void, CString};
    use std::os::unix::ffi::OsStrExt;

    with_scratch(|dir| {
        let source = dir.join("capi-source.raw");
        if !source.exists() {
            let bytes: Vec<u8> = (0..CAPI_SOURCE_SECTORS * 512)
                .map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(7))
                .collect();
            std::fs::write(&source, bytes).expect("the C API target's source");
        }
        // Files an input may create: removed before and after it, so each
        // input starts from the same state (and a finding replays alone).
        let stores: Vec<std::path::PathBuf> = (0..3)
            .map(|i| dir.join(format!("capi-{i}.cow")))
            .chain([dir.join("no-such-file")])
            .collect();
        for s in &stores {
            let _ = std::fs::remove_file(s);
        }
        let cpath = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path");
        let source_c = cpath(&source);
        let store_c: Vec<CString> = stores[..3].iter().map(|p| cpath(p)).collect();
        let missing_c = cpath(&dir.join("no-such-file"));
        // Memory the library never handed out, passed as a handle.
        let mut foreign = [0u64; 16];
        let foreign_ptr = foreign.as_mut_ptr().cast::<VDDR>();

        let mut args = Args(data);
        let mut handles: Vec<HVDDR> = Vec::new();
        let mut backend_data: Vec<(COW_BACKEND, *mut c_void)> = Vec::new();
        let pick = |args: &mut Args, handles: &[HVDDR], foreign_ok: bool| -> HVDDR {
            let k = args.u8() as usize;
            match k % 16 {
                0 => std::ptr::null_mut(),
                1 if foreign_ok => foreign_ptr,
                _ if handles.is_empty() => std::ptr::null_mut(),
                _ => handles[k % handles.len()],
            }
        };
        let path_arg = |args: &mut Args| -> *const std::ffi::c_char {
            match args.u8() % 8 {
                0 => std::ptr::null(),
                1 => missing_c.as_ptr(),
                2 => source_c.as_ptr(),
                k => store_c[k as usize % store_c.len()].as_ptr(),
            }
        };
        let mut sectors = vec![0u8; 64 * 512];
        for _ in 0..96 {
            if args.done() {
                break;
            }
            // SAFETY (all calls below): every pointer is NULL, a handle the
            // library gave out (open or closed), memory the library never
            // gave out where only handle lookups happen, or a buffer as
            // large as the count passed with it.
            unsafe {
                match args.u8() % 22 {
                    0 => {
                        let path = if args.u8() % 4 == 0 {
                            path_arg(&mut args)
                        } else {
                            source_c.as_ptr()
                        };
                        let h = VDDR_OpenEx(path, args.u32() % 16);
                        if !h.is_null() {
                            handles.push(h);
                        }
                    }
                    1 => {
                        let src = pick(&mut args, &handles, false);
                        let mut options = std::mem::zeroed::<COW_OPTIONS>();
                        let with_options = args.u8() % 3;
                        if with_options != 0 {
                            COW_InitOptions(&mut options);
                            options.granularity = match args.u8() % 4 {
                                0 => args.u32(),
                                k => 8 << (k * 2),
                            };
                            options.flags = args.u64() % 3;
                            if args.u8() % 2 == 0 {
                                options.store_path = path_arg(&mut args);
                            }
                            if args.u8() % 8 == 0 {
                                options.struct_size = args.u32() % 64;
                            }
                        }
                        let o = if with_options == 0 {
                            std::ptr::null()
                        } else {
                            &options as *const COW_OPTIONS
                        };
                        let h = COW_CreateCowOverlayEx(src, o);
                        if !h.is_null() {
                            handles.push(h);
                        }
                    }
                    2 => {
                        let path = path_arg(&mut args);
                        let src = pick(&mut args, &handles, false);
                        let h = COW_OpenCowOverlay(path, src, args.u32() % 16);
                        if !h.is_null() {
                            handles.push(h);
                        }
                    }
                    3 => {
                        let h = pick(&mut args, &handles, true);
                        let n = args.u32() % 65;
                        let buf = if args.u8() % 8 == 0 {
                            std::ptr::null_mut()
                        } else {
                            sectors.as_mut_ptr().cast::<c_void>()
                        };
                        let n = if n == 64 { args.u32() } else { n };
                        if !buf.is_null() && n > 64 {
                            continue;
                        }
                        COW_ReadSectors(h, buf, args.lba(), n);
                    }
                    4 => {
                        let h = pick(&mut args, &handles, true);
                        let shift = match args.u8() % 8 {
                            7 => 25 + args.u32() % 64,
                            k => u32::from(k) % 7,
                        };
                        let buf = if args.u8() % 8 == 0 {
                            std::ptr::null_mut()
                        } else {
                            sectors.as_mut_ptr().cast::<c_void>()
                        };
                        COW_ReadPage(h, buf, args.u32() % 1024, shift);
                    }
                    5 => {
                        let h = pick(&mut args, &handles, true);
                        COW_BlockStatus(h, args.lba(), args.lba());
                    }
                    6 => {
                        let h = pick(&mut args, &handles, true);
                        COW_InsertSectorsEx(h.cast(), args.lba(), args.lba());
                    }
                    7 => {
                        let h = pick(&mut args, &handles, true);
                        COW_MoveSectorsEx(h.cast(), args.lba(), args.lba(), args.lba());
                    }
                    8 => {
                        let h = pick(&mut args, &handles, true);
                        let n = args.u32() % 65;
                        for (i, b) in sectors.iter_mut().enumerate() {
                            *b = (i as u8).wrapping_add(n as u8);
                        }
                        let buf = if args.u8() % 8 == 0 {
                            std::ptr::null_mut()
                        } else {
                            sectors.as_mut_ptr().cast::<c_void>()
                        };
                        COW_WriteSectors(h.cast(), buf, args.lba(), n);
                    }
                    9 => {
                        let h = pick(&mut args, &handles, true);
                        COW_DeleteSectors(h.cast(), args.lba(), args.lba());
                    }
                    10 => {
                        let h = pick(&mut args, &handles, true);
                        COW_DiscardSectors(h.cast(), args.lba(), args.lba());
                    }
                    11 => {
                        let h = pick(&mut args, &handles, true);
                        let mut n = 0u64;
                        let out = if args.u8() % 4 == 0 {
                            std::ptr::null_mut()
                        } else {
                            &mut n as *mut u64
                        };
                        COW_GetExtentCount(h.cast(), out);
                    }
                    12 | 13 => {
                        let at = args.u8();
                        let h = pick(&mut args, &handles, true);
                        let mut e = std::mem::zeroed::<COW_EXTENT>();
                        let out = if args.u8() % 4 == 0 {
                            std::ptr::null_mut()
                        } else {
                            &mut e as *mut COW_EXTENT
                        };
                        if at % 2 == 0 {
                            COW_GetExtent(h.cast(), args.lba(), out);
                        } else {
                            COW_GetExtentAt(h.cast(), args.lba(), out);
                        }
                    }
                    14 => {
                        let h = pick(&mut args, &handles, true);
                        COW_Flush(h.cast());
                    }
                    15 => {
                        // Closed handles stay in the list: later calls on
                        // them must be refused.
                        let h = pick(&mut args, &handles, true);
                        COW_Close(h);
                    }
                    16 => {
                        let h = pick(&mut args, &handles, true);
                        let mut size = 0u64;
                        let mut uuid = S_UUID::default();
                        let null = args.u8() % 4 == 0;
                        let size_out = if null {
                            std::ptr::null_mut()
                        } else {
                            &mut size as *mut u64
                        };
                        let uuid_out = if null {
                            std::ptr::null_mut()
                        } else {
                            &mut uuid as *mut S_UUID
                        };
                        match args.u8() % 6 {
                            0 => {
                                COW_GetDriveType(h);
                            }
                            1 => {
                                COW_GetDriveSize(h, size_out);
                            }
                            2 => {
                                COW_GetDriveBlockCount(h, args.u32() % 40);
                            }
                            3 => {
                                COW_GetDriveBlockCount64(h, args.u32() % 40, size_out);
                            }
                            4 => {
                                COW_GetDriveUUID(h, uuid_out);
                            }
                            _ => {
                                COW_IsSnapshot(h);
                            }
                        }
                    }
                    17 => {
                        let path = path_arg(&mut args);
                        let mut report = std::mem::zeroed::<COW_CHECK_REPORT>();
                        report.struct_size = match args.u8() % 4 {
                            0 => args.u32() % 256,
                            _ => std::mem::size_of::<COW_CHECK_REPORT>() as u32,
                        };
                        let out = if args.u8() % 8 == 0 {
                            std::ptr::null_mut()
                        } else {
                            &mut report as *mut COW_CHECK_REPORT
                        };
                        COW_CheckOverlayStore(path, out);
                    }
                    18 => {
                        let code = match args.u8() % 3 {
                            0 => COW_LAST_ERROR,
                            1 => u32::from(args.u8()),
                            _ => args.u32(),
                        };
                        let text = COW_GetErrorString(code);
                        if !text.is_null() {
                            let _ = std::ffi::CStr::from_ptr(text).to_bytes().len();
                        }
                        COW_GetLastError();
                    }
                    19 => {
                        let count = COW_GetBackendCount();
                        let table = COW_GetBackend(args.u32() % (count + 2));
                        if table.is_null() {
                            continue;
                        }
                        let table = *table;
                        let Some(open) = table.pfnOpen else { continue };
                        let mut data = std::ptr::null_mut();
                        let path = if args.u8() % 4 == 0 {
                            path_arg(&mut args)
                        } else {
                            source_c.as_ptr()
                        };
                        // Read-only opens: the source stays as it is.
                        if open(path, args.u32() % 2 * 8, &mut data) == 0 && !data.is_null() {
                            backend_data.push((table, data));
                        }
                    }
                    20 | 21 => {
                        if backend_data.is_empty() {
                            continue;
                        }
                        let k = args.u8() as usize;
                        let (table, data) = backend_data[k % backend_data.len()];
                        // The data of an open (maybe since closed) image,
                        // NULL, or memory the library never gave out.
                        let data = match args.u8() % 8 {
                            0 => std::ptr::null_mut(),
                            1 => foreign_ptr.cast::<c_void>(),
                            _ => data,
                        };
                        let mut done = 0usize;
                        let mut comment = [0 as std::ffi::c_char; 64];
                        let mut uuid = S_UUID::default();
                        match args.u8() % 8 {
                            0 => {
                                if let Some(read) = table.pfnRead {
                                    let n = args.u32() as usize % (sectors.len() + 1);
                                    read(
                                        data,
                                        args.lba(),
                                        n,
                                        sectors.as_mut_ptr().cast(),
                                        &mut done,
                                    );
                                }
                            }
                            1 => {
                                if let Some(f) = table.pfnGetSize {
                                    f(data);
                                }
                            }
                            2 => {
                                if let Some(f) = table.pfnGetComment {
                                    f(data, comment.as_mut_ptr(), args.u32() as usize % 65);
                                }
                            }
                            3 => {
                                if let Some(f) = table.pfnGetUuid {
                                    f(data, &mut uuid);
                                }
                            }
                            4 => {
                                if let Some(f) = table.pfnGetFileSize {
                                    f(data);
                                }
                            }
                            5 => {
                                if let Some(f) = table.pfnFlush {
                                    f(data);
                                }
                            }
                            _ => {
                                if let Some(close) = table.pfnClose {
                                    close(data, 0);
                                }
                            }
                        }
                    }
                    _ => unreachable!(),
                }
            }
        }
        // SAFETY: handles the library gave out (closing a closed one is an
        // error, not a crash), and backend data from its own tables.
        unsafe {
            for h in handles {
                COW_Close(h);
            }
            for (table, data) in backend_data {
                if let Some(close) = table.pfnClose {
                    close(data, 0);
                }
            }
        }
        for s in &stores {
            let _ = std::fs::remove_file(s);
        }
    })
}

/// Largest disk the `fs` target builds from its input (64 MiB).
pub const FS_MAX_BYTES: u64 = 64 << 20;

/// The filesystem layer (`cowdisk::fs`: partition tables, ext2/3/4
/// superblocks, group descriptors and bitmaps, FAT tables, NTFS boot
/// sector, MFT records, fixups and data runs, swap headers) on a disk built
/// from `data` in the sparse encoding of [`decode_sparse_store`] (4 KiB
/// pages at page numbers; pages past [`FS_MAX_BYTES`] dropped). See
/// [`run_fs_image`].
pub fn run_fs(data: &[u8]) -> Option<cowdisk::fs::Report> {
    const PAGE: u64 = 4096;
    let (pages, len) = decode_sparse_store(data);
    let len = len.min(FS_MAX_BYTES);
    let mut image = vec![0u8; len as usize];
    for (page, bytes) in pages {
        let at = page * PAGE;
        if at + PAGE <= len {
            image[at as usize..(at + PAGE) as usize].copy_from_slice(&bytes);
        }
    }
    run_fs_image(image)
}

/// `image` (whole sectors) analysed by the filesystem layer, then read and
/// queried through its free-space view. Any verdict is fine; a panic or a
/// hang is a bug. Returns the report when the analysis ran.
pub fn run_fs_image(image: Vec<u8>) -> Option<cowdisk::fs::Report> {
    let sectors = image.len() / 512;
    let mut image = image;
    image.truncate(sectors * 512);
    let statuses = vec![cowdisk::SectorStatus::Normal; sectors];
    let mut disk = cowdisk::MemDisk::new(image, statuses).ok()?;
    let analysis = cowdisk::fs::analyze(&mut disk, &cowdisk::fs::AnalyzeOptions::default()).ok()?;
    let (mut view, report) = cowdisk::fs::FilesystemView::from_analysis(Box::new(disk), analysis);
    exercise(&mut view);
    Some(report)
}
