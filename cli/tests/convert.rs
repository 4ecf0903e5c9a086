//! `cowdisk convert` (shaped like `qemu-img convert`) and `cowdisk clone
//! --format/--compress/--cluster-size` into qcow2 and VHD, each output
//! judged by qemu-img (compare against the source, check, info); bad
//! options fail with one clear line and leave nothing behind.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;

use assert_cmd::Command;
use support::qemu_img;

fn cowdisk() -> Command {
    Command::cargo_bin("cowdisk").unwrap()
}

fn sample(dir: &Path) -> String {
    let path = dir.join("sample.img");
    cowdisk()
        .args(["sample", path.to_str().unwrap()])
        .assert()
        .success();
    path.to_str().unwrap().to_string()
}

fn compare(source: &str, image: &Path, format: &str) {
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        format,
        source,
        image.to_str().unwrap(),
    ]);
}

fn info(image: &Path, format: &str) -> String {
    String::from_utf8(qemu_img(&["info", "-f", format, image.to_str().unwrap()])).unwrap()
}

#[test]
fn convert_writes_the_format_minus_o_names_and_compresses_with_minus_c() {
    let dir = support::temp_dir();
    let src = sample(dir.path());
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("packed.img");
    cowdisk()
        .args(["convert", &src, plain.to_str().unwrap()])
        .assert()
        .success();
    cowdisk()
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            &src,
            packed.to_str().unwrap(),
        ])
        .assert()
        .success();
    for image in [&plain, &packed] {
        qemu_img(&["check", "-f", "qcow2", image.to_str().unwrap()]);
        compare(&src, image, "qcow2");
    }
    let (a, b) = (
        std::fs::metadata(&plain).unwrap().len(),
        std::fs::metadata(&packed).unwrap().len(),
    );
    assert!(b < a, "compressed {b} bytes, plain {a}");
}

#[test]
fn clone_format_names_every_variant() {
    let dir = support::temp_dir();
    let src = sample(dir.path());
    for (name, qemu_format, subformat) in [
        ("qcow2", "qcow2", ""),
        ("vhd", "vpc", "dynamic"),
        ("vhd-fixed", "vpc", "fixed"),
        ("raw", "raw", ""),
        ("vdi", "vdi", ""),
    ] {
        // A neutral extension: the format comes from --format alone.
        let out = dir.path().join(format!("{name}.out"));
        cowdisk()
            .args(["clone", &src, out.to_str().unwrap(), "--format", name])
            .assert()
            .success();
        compare(&src, &out, qemu_format);
        if name == "vhd" || name == "vhd-fixed" {
            // The footer's disk type (u32 at 60 of the last 512 bytes):
            // 3 dynamic, 2 fixed.
            let bytes = std::fs::read(&out).unwrap();
            let footer = &bytes[bytes.len() - 512..];
            let kind = u32::from_be_bytes(footer[60..64].try_into().unwrap());
            assert_eq!(kind, if subformat == "fixed" { 2 } else { 3 }, "{name}");
        }
    }
    // The extension picks the format otherwise: .vhd is a dynamic VHD.
    let vhd = dir.path().join("by-extension.vhd");
    cowdisk()
        .args(["clone", &src, vhd.to_str().unwrap()])
        .assert()
        .success();
    assert!(info(&vhd, "vpc").contains("file format: vpc"));
    compare(&src, &vhd, "vpc");
}

#[test]
fn cluster_size_sets_the_qcow2_cluster() {
    let dir = support::temp_dir();
    let src = sample(dir.path());
    let out = dir.path().join("small.qcow2");
    cowdisk()
        .args(["clone", &src, out.to_str().unwrap(), "--cluster-size", "4K"])
        .assert()
        .success();
    assert!(info(&out, "qcow2").contains("cluster_size: 4096"));
    compare(&src, &out, "qcow2");
}

#[test]
fn options_a_format_does_not_take_fail_and_leave_nothing() {
    let dir = support::temp_dir();
    let src = sample(dir.path());
    let out = dir.path().join("out.img");
    for args in [
        vec!["clone", &src, out.to_str().unwrap(), "--compress"],
        vec!["clone", &src, out.to_str().unwrap(), "--cluster-size", "4K"],
        vec![
            "convert",
            "-O",
            "qcow2",
            "--cluster-size",
            "3000",
            &src,
            out.to_str().unwrap(),
        ],
        vec!["convert", "-O", "nonesuch", &src, out.to_str().unwrap()],
    ] {
        let output = cowdisk().args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(!output.stderr.is_empty());
        assert!(!out.exists(), "{args:?} left a file");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
