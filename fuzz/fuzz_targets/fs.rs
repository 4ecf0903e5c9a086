#![no_main]

use libfuzzer_sys::fuzz_target;

// The filesystem layer (partition tables, ext2/3/4, FAT, NTFS, swap) on a
// sparse-encoded disk; seeds are disks partitioned by sfdisk with
// filesystems made by mkfs.fat, mke2fs, mkntfs and mkswap.
fuzz_target!(|data: &[u8]| {
    let _ = cowdisk_fuzz::run_fs(data);
});
