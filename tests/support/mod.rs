//! Helpers shared by the integration tests: the qemu-img/qemu-io oracles and
//! the source-integrity check. Each test file includes this with
//! `mod support;` and uses what it needs.
#![allow(dead_code)]

pub mod model;
pub mod vdi;
pub mod vhd;
pub mod written;

/// The fuzz harness's driver (`fuzz/src/lib.rs`): the shared way to open and
/// read a possibly damaged image with a cap on work.
#[path = "../../fuzz/src/lib.rs"]
pub mod fuzz;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// Runs a command and returns its stdout; panics with the command's stderr
/// when it fails (a test set-up failure, not a result).
pub fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `qemu-img ARGS...`
pub fn qemu_img(args: &[&str]) -> Vec<u8> {
    run("qemu-img", args)
}

/// Runs `qemu-io -f FORMAT -c CMD ... IMAGE` with each command in `cmds`.
pub fn qemu_io(image: &Path, format: &str, cmds: &[String]) {
    let mut args: Vec<String> = vec!["-f".into(), format.into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &refs);
}

/// The bytes qemu-img says the image holds (`qemu-img convert -O raw`).
pub fn qemu_raw_bytes(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.expected.raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        &image.display().to_string(),
        &out.display().to_string(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub data: bool,
    pub zero: bool,
}

/// `qemu-img map --output=json IMAGE`, parsed without a JSON library (the
/// output is one flat object per line).
pub fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = qemu_img(&["map", "--output=json", &image.display().to_string()]);
    parse_map(out)
}

/// `qemu-img map` over `len` bytes from byte `start` only (for images too
/// big to map whole).
pub fn qemu_map_range(image: &Path, start: u64, len: u64) -> Vec<MapEntry> {
    let out = qemu_img(&[
        "map",
        "--output=json",
        &format!("--start-offset={start}"),
        &format!("--max-length={len}"),
        &image.display().to_string(),
    ]);
    let entries = parse_map(out);
    assert!(!entries.is_empty(), "no map entries from qemu-img");
    entries
}

fn parse_map(out: Vec<u8>) -> Vec<MapEntry> {
    let text = String::from_utf8(out).unwrap();
    let field = |obj: &str, name: &str| -> String {
        let key = format!("\"{name}\":");
        let at = obj
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in {obj}"))
            + key.len();
        obj[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect()
    };
    text.split('{')
        .skip(1)
        .map(|obj| MapEntry {
            start: field(obj, "start").parse().unwrap(),
            length: field(obj, "length").parse().unwrap(),
            data: field(obj, "data") == "true",
            zero: field(obj, "zero") == "true",
        })
        .collect()
}

/// What a source file looked like: its bytes' hash and its mtime. Taken
/// before a test opens a source and compared after, to prove the library
/// never wrote it.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint {
    hash: u64,
    len: u64,
    mtime: SystemTime,
}

/// FNV-1a over the file's bytes plus its length and mtime, read in 1 MiB
/// chunks (images may be large).
pub fn fingerprint(path: &Path) -> Fingerprint {
    let mut file = std::fs::File::open(path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut len = 0u64;
    loop {
        let n = file.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        for b in &chunk[..n] {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        len += n as u64;
    }
    Fingerprint {
        hash,
        len,
        mtime: std::fs::metadata(path).unwrap().modified().unwrap(),
    }
}

/// Asserts a source file is byte for byte and mtime unchanged.
pub fn assert_unchanged(path: &Path, before: &Fingerprint) {
    assert_eq!(
        &fingerprint(path),
        before,
        "source {} was modified",
        path.display()
    );
}

/// A deterministic byte pattern that differs in every sector: sector `s`
/// byte `i` is a mix of both, so a misplaced sector is always caught.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let sector = (i / 512) as u64;
            let x = sector
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seed.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                .wrapping_add((i % 512) as u64);
            (x ^ (x >> 29)) as u8 | 1
        })
        .collect()
}

/// A fresh temporary directory for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `dir/name` as a PathBuf.
pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Open options that follow parent paths named inside an image.
pub fn follow() -> cowdisk::formats::OpenOptions {
    cowdisk::formats::OpenOptions {
        follow_parent_paths: true,
    }
}

/// The error of an open that must fail (`Box<dyn Disk>` is not Debug).
pub fn open_error(path: &Path, options: &cowdisk::formats::OpenOptions) -> cowdisk::Error {
    match cowdisk::formats::open_path(path, options) {
        Ok(_) => panic!("{} opened but should not have", path.display()),
        Err(e) => e,
    }
}

/// `qemu-img create -q -f FORMAT OPTS... dir/name [SIZE]` (no size when
/// `size` is empty, e.g. with a backing file).
pub fn qemu_create(dir: &Path, name: &str, format: &str, opts: &[&str], size: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.display().to_string();
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(opts);
    args.push(&p);
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(&args);
    path
}

/// Reads the whole disk in 1 MiB and in 7-sector chunks and compares it
/// with `expected` (qemu's bytes); each read's status must equal
/// `block_status` of the same range.
pub fn compare_bytes(disk: &mut dyn cowdisk::Disk, expected: &[u8]) {
    let sectors = disk.sector_count();
    assert_eq!(sectors, (expected.len() as u64).div_ceil(512));
    for chunk_sectors in [2048u64, 7] {
        let mut lba = 0;
        while lba < sectors {
            let n = chunk_sectors.min(sectors - lba);
            let mut buf = vec![0xAAu8; n as usize * 512];
            let status = disk.read_sectors(lba, &mut buf).unwrap();
            let start = lba as usize * 512;
            let end = (start + buf.len()).min(expected.len());
            assert!(
                buf[..end - start] == expected[start..end],
                "bytes differ in sectors {lba}..+{n}"
            );
            assert_eq!(status, disk.block_status(lba, n).unwrap(), "at {lba}+{n}");
            lba += n;
        }
    }
}

/// Allocation against `qemu-img map`: qemu's data ranges must not be
/// NotAlloc for us; ranges qemu says hold no data must not be Normal.
pub fn compare_allocation(disk: &mut dyn cowdisk::Disk, image: &Path) {
    use cowdisk::SectorStatus;
    for entry in qemu_map(image) {
        let lba = entry.start / 512;
        let count = entry.length.div_ceil(512);
        let ours = disk.block_status(lba, count).unwrap();
        if entry.data {
            assert_ne!(ours, SectorStatus::NotAlloc, "qemu has data at {entry:?}");
        } else {
            assert_ne!(ours, SectorStatus::Normal, "qemu has no data at {entry:?}");
        }
    }
}

/// Runs a bash script (with mtools told not to check disk geometry, as the
/// filesystem tests' images are plain files) and returns its output.
pub fn sh(script: &str) -> std::process::Output {
    std::process::Command::new("bash")
        .args(["-c", script])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap()
}

/// [`sh`] for a script that must succeed; returns its stdout.
pub fn sh_ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes sectors `start..start + sectors` of `disk` to a new file at
/// `out`, sparse: 1 MiB pages that the disk says are unallocated or blank,
/// or that read as zeros, are left as holes. A terabyte-sized partition
/// of an overlay is extracted in seconds this way.
pub fn extract_sparse(disk: &dyn cowdisk::Disk, start: u64, sectors: u64, out: &Path) {
    use cowdisk::disk::SectorStatus;
    use std::io::{Seek, SeekFrom, Write};
    const PAGE: u64 = 2048;
    let mut file = std::fs::File::create(out).unwrap();
    let mut buf = Vec::new();
    let mut at = 0;
    while at < sectors {
        let n = PAGE.min(sectors - at);
        let status = disk.block_status(start + at, n).unwrap();
        if status == SectorStatus::Normal {
            buf.resize((n * 512) as usize, 0);
            disk.read_sectors(start + at, &mut buf).unwrap();
            if buf.iter().any(|&b| b != 0) {
                file.seek(SeekFrom::Start(at * 512)).unwrap();
                file.write_all(&buf).unwrap();
            }
        }
        at += n;
    }
    file.set_len(sectors * 512).unwrap();
}

/// Copies `image` into `disk` (a file) at sector `at`, leaving holes where
/// the image is zero (`dd conv=sparse`), so a gigabyte-sized sparse image
/// stays cheap.
pub fn place_sparse(disk: &Path, at: u64, image: &Path) {
    sh_ok(&format!(
        "dd if='{}' of='{}' bs=1M seek={} oflag=seek_bytes conv=sparse,notrunc status=none",
        image.display(),
        disk.display(),
        at * 512
    ));
}

/// Bytes `start..start + sectors` (in sectors) of the file at `path`.
pub fn read_sectors_of(path: &Path, start: u64, sectors: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(start * 512)).unwrap();
    let mut buf = vec![0u8; (sectors * 512) as usize];
    file.read_exact(&mut buf).unwrap();
    buf
}
