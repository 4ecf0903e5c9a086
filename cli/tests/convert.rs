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

/// Every format and variant `--format` takes, with the extra arguments of
/// its variants (compressed qcow2).
const EVERY_FORMAT: &[(&str, &[&str])] = &[
    ("raw", &[]),
    ("vdi", &[]),
    ("qcow2", &[]),
    ("qcow2", &["--compress"]),
    ("vhd", &[]),
    ("vhd-fixed", &[]),
    ("vhdx", &[]),
    ("vmdk", &[]),
    ("vmdk-stream", &[]),
];

/// The entries of `dir` but `keep`, sorted.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

#[test]
fn a_clone_killed_mid_way_leaves_nothing_at_the_destination_in_every_format() {
    use std::os::unix::process::ExitStatusExt;
    let dir = support::temp_dir();
    // 512 MiB of data: far longer to clone than the moment the kill takes.
    let src = dir.path().join("big.img");
    let file = std::fs::File::create(&src).unwrap();
    let piece: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for mib in 0..512u64 {
        std::os::unix::fs::FileExt::write_all_at(&file, &piece, mib << 20).unwrap();
    }
    drop(file);
    let cowdisk_bin = assert_cmd::cargo::cargo_bin("cowdisk");
    for &(format, extra) in EVERY_FORMAT {
        let out = dir.path().join(format!("out.{format}"));
        let mut child = std::process::Command::new(&cowdisk_bin)
            .args(["clone", src.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--format", format])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it as soon as its temporary file is there: mid-way.
        let started = std::time::Instant::now();
        while others(dir.path(), &["big.img"]).is_empty() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{format}: no temporary file appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "{format} {extra:?}: finished before the kill ({status})"
        );
        assert!(
            !out.exists(),
            "{format} {extra:?}: a file at the destination"
        );
        // What a kill may leave is the documented `.NAME.XXXXXX.partial`
        // beside it (docs/FORMAT.md), which nothing opens.
        for left in others(dir.path(), &["big.img"]) {
            assert!(
                left.starts_with(&format!(".out.{format}.")) && left.ends_with(".partial"),
                "{format} {extra:?}: left {left}"
            );
            std::fs::remove_file(dir.path().join(left)).unwrap();
        }
    }
}

#[test]
fn bad_destinations_and_format_names_fail_clearly_and_create_nothing_in_every_format() {
    let dir = support::temp_dir();
    let src = sample(dir.path());
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(d("taken.img"), b"mine").unwrap();
    std::fs::write(d("a-file"), b"not a folder").unwrap();
    let fails = |args: &[&str]| -> String {
        let output = cowdisk().args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(output.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        err
    };
    for &(format, extra) in EVERY_FORMAT {
        for command in ["clone", "convert"] {
            let with = |dest: &str| -> Vec<String> {
                let flag = if command == "clone" { "--format" } else { "-O" };
                let mut args = vec![command, &src, dest, flag, format];
                if command == "convert" && extra == ["--compress"] {
                    args.push("-c");
                } else {
                    args.extend_from_slice(extra);
                }
                args.into_iter().map(String::from).collect()
            };
            let run = |dest: &str| {
                let args = with(dest);
                fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
            };
            // An existing destination without --force: kept as it was.
            let err = run(&d("taken.img"));
            assert!(
                err.contains("taken.img") && err.contains("exists") && err.contains("--force"),
                "{command} {format}: {err}"
            );
            assert_eq!(std::fs::read(d("taken.img")).unwrap(), b"mine");
            // Destinations that cannot be written: in a missing folder, in
            // a "folder" that is a file, where not even root may create a
            // file (sysfs).
            let err = run(&d("missing/out.img"));
            assert!(err.contains("missing/out.img"), "{command} {format}: {err}");
            let err = run(&d("a-file/out.img"));
            assert!(err.contains("a-file/out.img"), "{command} {format}: {err}");
            let err = run("/sys/cowdisk-test-out.img");
            assert!(
                err.contains("/sys/cowdisk-test-out.img") && err.contains("ermission denied"),
                "{command} {format}: {err}"
            );
            assert!(!Path::new("/sys/cowdisk-test-out.img").exists());
        }
    }
    // A format name no writer has, by either spelling: refused by the
    // argument parser (status 2) naming the formats it takes.
    for args in [
        vec!["clone", &src, &d("out.img"), "--format", "qed"],
        vec!["convert", "-O", "vpc", &src, &d("out.img")],
    ] {
        let output = cowdisk().args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            err.contains("vhd-fixed") && err.contains("vmdk-stream"),
            "{args:?}: {err}"
        );
    }
    // Nothing was created anywhere.
    assert_eq!(
        others(dir.path(), &[]),
        ["a-file", "sample.img", "taken.img"]
    );
}
