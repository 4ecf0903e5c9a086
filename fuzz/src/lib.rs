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
