//! Compiles backend.c against the library's generated header.
fn main() {
    println!("cargo:rerun-if-changed=backend.c");
    println!("cargo:rerun-if-changed=../../include/cowdisk.h");
    cc::Build::new()
        .file("backend.c")
        .include("../../include")
        .flag("-std=c99")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("cmem_backend");
}
