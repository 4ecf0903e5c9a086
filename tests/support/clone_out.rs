//! Shared by the writer tests (write_vhdx.rs, write_vmdk.rs): a sparse
//! source disk built from pieces of data, its twin as a sparse raw file
//! (the reference qemu-img compares against), and the checks every written
//! image must pass. Included with `#[path]` next to `mod support;`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cowdisk::clone::{clone_to_file, first_difference, no_progress, CloneFormat, CloneOptions};
use cowdisk::disk::{Disk, DriveType, SectorStatus};
use cowdisk::formats::{open_path, OpenOptions};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// A disk of `bytes` holding `pieces` (byte offset, bytes; sorted, not
/// overlapping) and nothing else: sectors a piece touches are data, the
/// rest is unallocated. Needs no memory for its holes, so it can be
/// terabytes long.
pub struct PieceDisk {
    pub bytes: u64,
    pub pieces: Vec<(u64, Vec<u8>)>,
}

impl PieceDisk {
    pub fn new(bytes: u64, mut pieces: Vec<(u64, Vec<u8>)>) -> PieceDisk {
        pieces.sort_by_key(|p| p.0);
        for pair in pieces.windows(2) {
            assert!(
                pair[0].0 + pair[0].1.len() as u64 <= pair[1].0,
                "pieces overlap"
            );
        }
        if let Some((at, data)) = pieces.last() {
            assert!(at + data.len() as u64 <= bytes, "piece past the end");
        }
        PieceDisk { bytes, pieces }
    }

    fn touches(&self, from: u64, to: u64) -> bool {
        self.pieces
            .iter()
            .any(|(at, data)| *at < to && at + data.len() as u64 > from)
    }

    /// The sparse raw file with the same bytes (and the same byte size).
    pub fn write_raw(&self, path: &Path) {
        let file = std::fs::File::create(path).unwrap();
        file.set_len(self.bytes).unwrap();
        for (at, data) in &self.pieces {
            file.write_all_at(data, *at).unwrap();
        }
    }

    /// Indexes of the `unit`-byte units holding a non-zero byte.
    pub fn nonzero_units(&self, unit: u64) -> BTreeSet<u64> {
        let mut units = BTreeSet::new();
        for (at, data) in &self.pieces {
            for (i, b) in data.iter().enumerate() {
                if *b != 0 {
                    units.insert((at + i as u64) / unit);
                }
            }
        }
        units
    }
}

impl Disk for PieceDisk {
    fn drive_type(&self) -> DriveType {
        DriveType::Raw
    }
    fn sector_count(&self) -> u64 {
        self.bytes.div_ceil(512)
    }
    fn byte_size(&self) -> u64 {
        self.bytes
    }
    fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> cowdisk::Result<SectorStatus> {
        buf.fill(0);
        let from = lba * 512;
        let to = from + buf.len() as u64;
        for (at, data) in &self.pieces {
            let end = at + data.len() as u64;
            if *at < to && end > from {
                let lo = (*at).max(from);
                let hi = end.min(to);
                buf[(lo - from) as usize..(hi - from) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        self.block_status(lba, buf.len() as u64 / 512)
    }
    fn block_status(&self, lba: u64, count: u64) -> cowdisk::Result<SectorStatus> {
        Ok(if self.touches(lba * 512, (lba + count) * 512) {
            SectorStatus::Normal
        } else {
            SectorStatus::NotAlloc
        })
    }
}

/// Clones `disk` to `path` in `format`.
pub fn clone(disk: &mut dyn Disk, path: &Path, format: CloneFormat) {
    let options = CloneOptions {
        format,
        ..CloneOptions::default()
    };
    clone_to_file(disk, path, &options, &mut no_progress()).unwrap();
}

fn qemu(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check` finds no errors.
pub fn assert_qemu_check(image: &Path, format: &str) {
    let (ok, text) = qemu(&["check", "-f", format, image.to_str().unwrap()]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

/// `qemu-img compare` calls the raw reference and the image identical.
pub fn assert_qemu_identical(raw: &Path, image: &Path, format: &str) {
    let (ok, text) = qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        format,
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert!(
        ok && text.contains("Images are identical"),
        "qemu-img compare {} {}: {text}",
        raw.display(),
        image.display()
    );
}

/// `qemu-io -c 'read -P BYTE OFFSET LEN'` for each (byte, offset, len):
/// qemu reads exactly that constant there.
pub fn assert_qemu_reads(image: &Path, format: &str, expected: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), format.to_string()];
    for (byte, at, len) in expected {
        args.push("-c".into());
        args.push(format!("read -P {byte} {at} {len}"));
    }
    args.push(image.display().to_string());
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our own reader opens the image by content and reads the same bytes as
/// the source (pages both call unallocated or zero are skipped, so a
/// terabyte-sized sparse disk is quick).
pub fn assert_reads_back(image: &Path, source: &mut dyn Disk) {
    let mut back = open_path(image, &OpenOptions::default()).unwrap();
    assert_eq!(back.sector_count(), source.sector_count());
    assert_eq!(
        first_difference(back.as_mut(), source, &mut no_progress()).unwrap(),
        None,
        "{} reads back differently",
        image.display()
    );
}

/// Merges sorted unit indexes into byte ranges (start, end), clipped to
/// `limit`.
pub fn unit_ranges(units: &BTreeSet<u64>, unit: u64, limit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &u in units {
        let (start, end) = (u * unit, ((u + 1) * unit).min(limit));
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// A clone cancelled at 50% and a clone of a 0-byte disk (which `format`
/// refuses with a clear error) leave nothing in the destination's folder.
pub fn assert_failed_clones_leave_nothing(format: CloneFormat, extension: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("out.{extension}"));
    let options = CloneOptions {
        format,
        ..CloneOptions::default()
    };
    let pages: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i * 2 * MIB, vec![0x5A; 4096])).collect();
    let mut disk = PieceDisk::new(16 * MIB, pages);
    let err = clone_to_file(&mut disk, &image, &options, &mut |p: u32| p < 50).unwrap_err();
    assert_eq!(err.kind(), cowdisk::numbers::ErrorCode::Cancelled, "{err}");
    let mut empty = PieceDisk::new(0, vec![]);
    let err = clone_to_file(&mut empty, &image, &options, &mut no_progress()).unwrap_err();
    assert!(err.to_string().contains("0 bytes"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
