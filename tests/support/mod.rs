//! Helpers shared by the integration tests: the qemu-img/qemu-io oracles and
//! the source-integrity check. Each test file includes this with
//! `mod support;` and uses what it needs.
#![allow(dead_code)]

pub mod model;

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

/// FNV-1a over the file's bytes plus its length and mtime.
pub fn fingerprint(path: &Path) -> Fingerprint {
    let bytes = std::fs::read(path).unwrap();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Fingerprint {
        hash,
        len: bytes.len() as u64,
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
