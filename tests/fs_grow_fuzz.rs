//! The growers on damaged real volumes (mkfs.fat FAT16/FAT32, mkntfs and
//! mke2fs ext2/ext4, bytes of their metadata changed at random with fixed
//! seeds): every call
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

/// The hot ranges of an ext volume of 1 KiB blocks: the superblock, the
/// descriptor block, the first reserved descriptor block, group 0's
/// block bitmap and the inode table block holding the resize inode (7),
/// found by the documented layout (descriptor table at block 2; block
/// bitmap at 0x00 and inode table at 0x08 of a descriptor; inode size at
/// 0x58 of the superblock) and the last group's block bitmap.
fn ext_hot(volume: &[u8]) -> Vec<(usize, usize)> {
    let le32 = |at: usize| u32::from_le_bytes(volume[at..at + 4].try_into().unwrap()) as usize;
    let le16 = |at: usize| u16::from_le_bytes([volume[at], volume[at + 1]]) as usize;
    let desc = 2048;
    let desc_size = if le32(1024 + 0x60) & 0x80 != 0 {
        le16(1024 + 0xFE)
    } else {
        32
    };
    let groups = (le32(1024 + 4) - 1).div_ceil(le32(1024 + 0x20));
    let bitmap = le32(desc) * 1024;
    let last_bitmap = le32(desc + (groups - 1) * desc_size) * 1024;
    let inode7 = le32(desc + 8) * 1024 + 6 * le16(1024 + 0x58);
    vec![
        (1024, 1024),
        (desc, 1024),
        (3072, 1024),
        (bitmap, 1024),
        (last_bitmap, 1024),
        (inode7 / 1024 * 1024, 1024),
    ]
}

#[test]
fn damaged_ext_never_panics_and_refusals_write_nothing() {
    // ext4 (metadata_csum: most damage fails a checksum), ext4 with
    // uninit_bg (CRC16 descriptors, no inode checksum), ext2 (no
    // checksums: the damage reaches the layout checks) and ext4 with
    // meta_bg.
    for (script, rounds) in [
        ("mke2fs -q -F -t ext4 -b 1024", 30),
        (
            "mke2fs -q -F -t ext4 -b 1024 -O ^metadata_csum,uninit_bg,^64bit",
            40,
        ),
        ("mke2fs -q -F -t ext2 -b 1024", 80),
        ("mke2fs -q -F -t ext4 -b 1024 -O meta_bg,^resize_inode", 30),
    ] {
        // Two groups of 8 MiB and a partial third.
        let volume = make(script, 20);
        let hot = ext_hot(&volume);
        let (ok, refused) = fuzz(&volume, &hot, rounds);
        eprintln!("{script}: {ok} grown, {refused} refused");
        assert!(refused > 0, "{script}: no damage was noticed");
    }
}
