//! The growers on damaged real volumes (mkfs.fat FAT16/FAT32 and mkntfs,
//! bytes of their metadata changed at random with fixed seeds): every call
//! returns (no panic, no hang); a refusal leaves the overlay exactly as it
//! was (extent map, store use, bytes); a success leaves a volume whose boot
//! sector says the new size.

use std::process::Command;

use cowdisk::fs::grow_filesystem;
use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions, SectorStatus};

const MIB: usize = 1 << 20;

fn make(script: &str, mib: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len((mib * MIB) as u64)
        .unwrap();
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("{script} '{}' >/dev/null 2>&1", image.display()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}");
    std::fs::read(&image).unwrap()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs the grower on `volume` (placed whole as the start of a disk twice
/// its size, as a partition grown to the whole disk) with a few bytes of
/// `hot` ranges changed, for `rounds` seeds.
fn fuzz(volume: &[u8], hot: &[(usize, usize)], rounds: u64) -> (u32, u32) {
    let (mut ok, mut refused) = (0, 0);
    for seed in 1..=rounds {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut bytes = volume.to_vec();
        for _ in 0..1 + rng.below(4) {
            let (start, len) = hot[rng.below(hot.len() as u64) as usize];
            let at = start + rng.below(len as u64) as usize;
            bytes[at] = match rng.below(3) {
                0 => rng.next() as u8,
                1 => bytes[at] ^ (1 << rng.below(8)),
                _ => 0xFF,
            };
        }
        bytes.resize(volume.len() * 2, 0);
        let sectors = bytes.len() / 512;
        let disk = MemDisk::new(bytes, vec![SectorStatus::Normal; sectors]).unwrap();
        let mut overlay = Overlay::new(Box::new(disk), OverlayOptions::default()).unwrap();
        let map = format!("{:?}", overlay.extents());
        let units = overlay.store_units_used();
        match grow_filesystem(&mut overlay, 0, sectors as u64) {
            Ok(report) => {
                ok += 1;
                assert!(
                    report.new_sectors <= sectors as u64,
                    "seed {seed}: {report:?}"
                );
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
                assert_eq!(format!("{:?}", overlay.extents()), map, "seed {seed}: {e}");
                assert_eq!(overlay.store_units_used(), units, "seed {seed}: {e}");
                let mut first = vec![0u8; 512];
                overlay.read_sectors(0, &mut first).unwrap();
            }
        }
    }
    (ok, refused)
}

#[test]
fn damaged_fat16_and_fat32_never_panic_and_refusals_write_nothing() {
    // FAT32 needs 65525 clusters, so a larger volume: fewer rounds.
    for (script, mib, rounds) in [("mkfs.fat -F 16", 16, 60), ("mkfs.fat -F 32 -s 1", 40, 20)] {
        let volume = make(script, mib);
        let reserved = u16::from_le_bytes([volume[14], volume[15]]) as usize;
        // The boot sector, FSInfo/backup area, and the first FAT sectors.
        let hot = [
            (0, 512),
            (512, reserved * 512 - 512),
            (reserved * 512, 2048),
        ];
        let (ok, refused) = fuzz(&volume, &hot, rounds);
        eprintln!("{script}: {ok} grown, {refused} refused");
        assert!(refused > 0, "{script}: no damage was noticed");
    }
}

#[test]
fn damaged_ntfs_never_panics_and_refusals_write_nothing() {
    let volume = make("mkntfs -q -F -Q -c 4096", 16);
    let cluster = 4096;
    let mft = u64::from_le_bytes(volume[0x30..0x38].try_into().unwrap()) as usize * cluster;
    // The boot sector and MFT records 0..=8 (1 KiB each).
    let hot = [(0, 512), (mft, 9 * 1024)];
    let (ok, refused) = fuzz(&volume, &hot, 200);
    eprintln!("ntfs: {ok} grown, {refused} refused");
    assert!(refused > 0);
}
