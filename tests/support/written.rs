//! Checks shared by the image writer tests, each against qemu-img or the
//! source's own bytes: the image is consistent (`qemu-img check`), reads
//! as the source (`qemu-img compare`, and our own reader), and stores no
//! data where the source has none (`qemu-img map`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cowdisk::clone::{first_difference, no_progress};
use cowdisk::formats::{open_path, OpenOptions};

/// A sparse raw file of `size` bytes holding `pieces` (offset, bytes).
pub fn sparse_raw(path: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for (at, bytes) in pieces {
        file.write_all_at(bytes, *at).unwrap();
    }
}

/// `qemu-img check --output=json` succeeds (no corruption, no leak) and
/// returns its JSON text.
pub fn qemu_check(image: &Path, format: &str) -> String {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", format])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("\"leaks\""), "leaks: {text}");
    assert!(!text.contains("\"corruptions\""), "corruptions: {text}");
    text
}

/// A number field of `qemu-img check --output=json`.
pub fn json_number(json: &str, field: &str) -> u64 {
    let key = format!("\"{field}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {field} in {json}"))
        + key.len();
    json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// `qemu-img compare` of the raw source and the image says identical
/// (a size difference is allowed only where the longer reads as zeros).
pub fn qemu_compare(raw: &Path, image: &Path, format: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(raw)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        raw.display(),
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every range `qemu-img map` reports as data holds, in each
/// `granularity`-aligned piece, a non-zero byte of the source: nothing is
/// stored where the source has only zeros or holes.
pub fn no_data_where_source_has_none(raw: &Path, image: &Path, granularity: u64) {
    let source = std::fs::File::open(raw).unwrap();
    let source_len = source.metadata().unwrap().len();
    let mut buf = vec![0u8; granularity as usize];
    for entry in super::qemu_map(image).into_iter().filter(|e| e.data) {
        let mut at = entry.start / granularity * granularity;
        while at < entry.start + entry.length {
            let n = granularity.min(source_len.saturating_sub(at)) as usize;
            source.read_exact_at(&mut buf[..n], at).unwrap();
            assert!(
                buf[..n].iter().any(|&b| b != 0),
                "{}: qemu-img map shows data at {at}..+{granularity} where the source has none",
                image.display()
            );
            at += granularity;
        }
    }
}

/// Our own reader reads the image as the raw source, sector for sector.
pub fn reads_back(raw: &Path, image: &Path) {
    let mut a = open_path(raw, &OpenOptions::default()).unwrap();
    let mut b = open_path(image, &OpenOptions::default()).unwrap();
    assert_eq!(a.sector_count(), b.sector_count(), "{}", image.display());
    let diff = first_difference(a.as_mut(), b.as_mut(), &mut no_progress()).unwrap();
    assert_eq!(diff, None, "{} differs from the source", image.display());
}

/// All four checks above.
pub fn assert_faithful(raw: &Path, image: &Path, format: &str, granularity: u64) {
    qemu_check(image, format);
    qemu_compare(raw, image, format);
    no_data_where_source_has_none(raw, image, granularity);
    reads_back(raw, image);
}
