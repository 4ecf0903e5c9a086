#![no_main]

use libfuzzer_sys::fuzz_target;

// The VHD parser with the footer and dynamic header checksums recomputed
// after mutation.
fuzz_target!(|data: &[u8]| {
    let _ = cowdisk_fuzz::run_vhd_fixed(data);
});
