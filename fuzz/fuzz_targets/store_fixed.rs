#![no_main]

use libfuzzer_sys::fuzz_target;

// The overlay store parser on a sparse-encoded store whose page and log
// entry CRC-32Cs are recomputed after mutation.
fuzz_target!(|data: &[u8]| {
    let _ = cowdisk_fuzz::run_store_fixed(data);
});
