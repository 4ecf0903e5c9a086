#![no_main]

use cowdisk_fuzz::{run, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run(Target::VmdkSparse, data);
});
