#![no_main]

use libfuzzer_sys::fuzz_target;

// The VHDX parser with the CRC-32C of headers, region tables and log
// entries recomputed after mutation.
fuzz_target!(|data: &[u8]| {
    let _ = cowdisk_fuzz::run_vhdx_fixed(data);
});
