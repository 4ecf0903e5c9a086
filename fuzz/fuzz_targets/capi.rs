#![no_main]

use libfuzzer_sys::fuzz_target;

// Random sequences of C API calls with valid and invalid arguments and
// handles (run under AddressSanitizer by cargo fuzz).
fuzz_target!(|data: &[u8]| {
    cowdisk_fuzz::run_capi(data);
});
