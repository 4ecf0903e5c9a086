//! The real `cowdisk` binary, every subcommand, including bad input: a
//! missing file, a truncated image, an impossible size, a partition that
//! does not exist, an existing destination. Each failure must be one clear
//! line naming the file and the cause, a non-zero exit, no file left
//! behind, and the source unchanged. Results are judged by sfdisk and
//! qemu-img, not by cowdisk itself.

// The library's test helpers (qemu-img oracles, source fingerprints), shared
// rather than copied.
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::str::contains;
use serde_json::Value;
use support::{assert_unchanged, fingerprint, qemu_img, qemu_map};

fn cowdisk() -> Command {
    Command::cargo_bin("cowdisk").unwrap()
}

/// A 64 MiB MBR sample made by `cowdisk sample`, checked by sfdisk.
fn sample(dir: &Path, name: &str, table: &str) -> PathBuf {
    let path = dir.join(name);
    cowdisk()
        .args(["sample", path.to_str().unwrap(), "--table", table])
        .assert()
        .success();
    path
}

/// Runs a command that must fail; returns its one-line stderr.
fn fails(args: &[&str]) -> String {
    let out = cowdisk().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(out.stdout.is_empty() || !args.contains(&"--json"));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("cowdisk: error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn sample_images_are_valid_to_sfdisk_and_sgdisk() {
    let dir = support::temp_dir();
    let mbr = sample(dir.path(), "mbr.img", "mbr");
    let out = support::run("sfdisk", &["--verify", mbr.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out).contains("No errors detected"));
    let gpt = sample(dir.path(), "gpt.img", "gpt");
    let out = support::run("sgdisk", &["-v", gpt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out).contains("No problems found"));
    // It never overwrites.
    let print = fingerprint(&mbr);
    let err = fails(&["sample", mbr.to_str().unwrap()]);
    assert!(err.contains("mbr.img") && err.contains("exists"), "{err}");
    assert_unchanged(&mbr, &print);
}

#[test]
fn info_json_matches_sfdisk_and_qemu_img() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "mbr.img", "mbr");
    let vdi = dir.path().join("mbr.vdi");
    qemu_img(&[
        "convert",
        "-O",
        "vdi",
        img.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let print = fingerprint(&vdi);
    let out = cowdisk()
        .args(["info", "--json", vdi.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let qemu: Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json", vdi.to_str().unwrap()]))
            .unwrap();
    assert_eq!(info["format"], "vdi");
    assert_eq!(info["virtual_size"], qemu["virtual-size"]);
    assert_eq!(info["partition_table"], "mbr");
    let sfdisk: Value =
        serde_json::from_slice(&support::run("sfdisk", &["--json", img.to_str().unwrap()]))
            .unwrap();
    let theirs: Vec<(u64, u64)> = sfdisk["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
        .collect();
    let ours: Vec<(u64, u64)> = info["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap(), p["sectors"].as_u64().unwrap()))
        .collect();
    assert_eq!(ours, theirs);
    // Allocated bytes: what qemu-img map calls data.
    let data: u64 = qemu_map(&vdi)
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum();
    assert_eq!(info["allocated_bytes"].as_u64(), Some(data));
    // The text form names the same things.
    cowdisk()
        .args(["info", vdi.to_str().unwrap()])
        .assert()
        .success()
        .stdout(contains("partition table: MBR (2 partitions)"));
    assert_unchanged(&vdi, &print);
}

#[test]
fn map_json_matches_qemu_img_map() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "gpt.img", "gpt");
    let vdi = dir.path().join("gpt.vdi");
    qemu_img(&[
        "convert",
        "-O",
        "vdi",
        img.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let out = cowdisk()
        .args(["map", "--json", vdi.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ours: Vec<(u64, u64, bool)> = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["data"].as_bool().unwrap(),
            )
        })
        .collect();
    // qemu's map, with neighbouring runs of the same kind merged.
    let mut theirs: Vec<(u64, u64, bool)> = Vec::new();
    for e in qemu_map(&vdi) {
        match theirs.last_mut() {
            Some(last) if last.2 == e.data => last.1 += e.length,
            _ => theirs.push((e.start, e.length, e.data)),
        }
    }
    assert_eq!(ours, theirs);
    cowdisk()
        .args(["map", vdi.to_str().unwrap()])
        .assert()
        .success()
        .stdout(contains("data"));
}

#[test]
fn clone_writes_vdi_and_raw_that_qemu_img_accepts() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "mbr.img", "mbr");
    let print = fingerprint(&img);
    let vdi = dir.path().join("copy.vdi");
    cowdisk()
        .args(["clone", img.to_str().unwrap(), vdi.to_str().unwrap()])
        .assert()
        .success()
        .stdout(contains("verified"));
    let check = String::from_utf8(qemu_img(&["check", vdi.to_str().unwrap()])).unwrap();
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vdi",
        img.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let raw = dir.path().join("copy.img");
    cowdisk()
        .args([
            "clone",
            vdi.to_str().unwrap(),
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ])
        .assert()
        .success();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_unchanged(&img, &print);

    // An existing destination is refused and kept, unless --force.
    let before = fingerprint(&raw);
    let err = fails(&["clone", img.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(
        err.contains("copy.img") && err.contains("already exists"),
        "{err}"
    );
    assert_unchanged(&raw, &before);
    cowdisk()
        .args([
            "clone",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
            "--force",
        ])
        .assert()
        .success();
    // The source as its own destination: refused, even with --force.
    let err = fails(&[
        "clone",
        img.to_str().unwrap(),
        img.to_str().unwrap(),
        "--force",
    ]);
    assert!(err.contains("source itself"), "{err}");
    assert_unchanged(&img, &print);
    assert_eq!(entries(dir.path()), ["copy.img", "copy.vdi", "mbr.img"]);
}

#[test]
fn enlarge_then_info_shows_the_new_layout() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "mbr.img", "mbr");
    let print = fingerprint(&img);
    let big = dir.path().join("big.img");
    cowdisk()
        .args([
            "enlarge",
            img.to_str().unwrap(),
            big.to_str().unwrap(),
            "--size",
            "1G",
        ])
        .assert()
        .success()
        .stdout(contains("verified"));
    assert_unchanged(&img, &print);
    let out = cowdisk()
        .args(["info", "--json", big.to_str().unwrap()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual_size"].as_u64(), Some(1 << 30));
    let out = support::run("sfdisk", &["--verify", big.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out).contains("No errors detected"));
}

#[test]
fn bad_input_gives_one_clear_line_and_leaves_nothing() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "mbr.img", "mbr");
    let print = fingerprint(&img);
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let src = img.to_str().unwrap().to_string();

    // A missing file, for every subcommand that reads one.
    let missing = d("missing.img");
    for args in [
        vec!["info", missing.as_str()],
        vec!["map", missing.as_str()],
        vec!["clone", missing.as_str(), "x.img"],
        vec!["enlarge", missing.as_str(), "x.img", "--size", "1G"],
    ] {
        let err = fails(&args);
        assert!(
            err.contains("missing.img") && err.contains("No such file"),
            "{args:?}: {err}"
        );
    }

    // A truncated VDI: its header is cut short.
    let vdi = d("trunc.vdi");
    qemu_img(&["convert", "-O", "vdi", &src, &vdi]);
    let file = std::fs::OpenOptions::new().write(true).open(&vdi).unwrap();
    file.set_len(300).unwrap();
    let err = fails(&["info", &vdi]);
    assert!(
        err.contains("trunc.vdi") && err.contains("shorter"),
        "{err}"
    );
    let err = fails(&["clone", &vdi, &d("out.raw")]);
    assert!(err.contains("trunc.vdi"), "{err}");

    // A truncated raw image: its partitions run past its end.
    let cut = d("cut.img");
    std::fs::copy(&img, &cut).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(30 << 20)
        .unwrap();
    let err = fails(&["enlarge", &cut, &d("out.img"), "--size", "1G"]);
    assert!(
        err.contains("cut.img") && err.contains("truncated"),
        "{err}"
    );
    let err = fails(&["info", &cut]);
    assert!(
        err.contains("cut.img") && err.contains("truncated"),
        "{err}"
    );

    // Impossible sizes.
    let err = fails(&["enlarge", &src, &d("out.img"), "--size", "32M"]);
    assert!(err.contains("mbr.img") && err.contains("larger"), "{err}");
    let err = fails(&["enlarge", &src, &d("out.img"), "--size", "64M"]);
    assert!(err.contains("larger"), "{err}");
    let err = fails(&["enlarge", &src, &d("out.img"), "--size", "lots"]);
    assert!(err.contains("--size") && err.contains("'lots'"), "{err}");
    let err = fails(&["enlarge", &src, &d("out.img"), "--size", "67109000"]);
    assert!(err.contains("512-byte sectors"), "{err}");
    let err = fails(&[
        "enlarge",
        &src,
        &d("out.img"),
        "--size",
        "65M",
        "--align",
        "cylinder",
    ]);
    assert!(err.contains("alignment"), "{err}");
    let err = fails(&["enlarge", &src, &d("out.img"), "--size", "3T"]);
    assert!(err.contains("2 TiB"), "{err}");

    // A partition that does not exist.
    let err = fails(&[
        "enlarge",
        &src,
        &d("out.img"),
        "--size",
        "1G",
        "--partition",
        "7",
    ]);
    assert!(
        err.contains("mbr.img") && err.contains("no partition 7") && err.contains("1, 2"),
        "{err}"
    );

    // A disk without a partition table.
    let blank = d("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let err = fails(&["enlarge", &blank, &d("out.img"), "--size", "16M"]);
    assert!(
        err.contains("blank.img") && err.contains("no partition table"),
        "{err}"
    );

    // An existing destination.
    std::fs::write(d("taken.img"), b"mine").unwrap();
    let err = fails(&["enlarge", &src, &d("taken.img"), "--size", "1G"]);
    assert!(err.contains("taken.img") && err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(d("taken.img")).unwrap(), b"mine");

    // Nothing was written anywhere, and the source is as it was.
    assert_eq!(
        entries(dir.path()),
        ["blank.img", "cut.img", "mbr.img", "taken.img", "trunc.vdi"]
    );
    assert_unchanged(&img, &print);

    // Usage errors (clap): non-zero too.
    cowdisk().args(["enlarge", &src]).assert().failure();
    // (A format no writer has: vmdk, used here before, is one now, and
    // the clone then wrote ./x.)
    cowdisk()
        .args(["clone", &src, &d("x"), "--format", "qed"])
        .assert()
        .failure();
    assert!(!dir.path().join("x").exists());
}

#[test]
fn bench_runs_and_prints_every_comparison() {
    let dir = support::temp_dir();
    let out = cowdisk()
        .args(["bench", "--tiny", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "plain pread",
        "qemu-img bench",
        "qemu-io (qcow2)",
        "qemu-img convert",
        "to raw:",
        "to vdi:",
        "bytes/extent",
        "qemu-img convert -O FMT",
        "10% data:",
        "90% data:",
    ] {
        assert!(text.contains(needle), "no '{needle}' in:\n{text}");
    }
    // One row per writable format and variant, each with its ratio.
    for row in [
        "raw",
        "vdi",
        "qcow2",
        "qcow2 -c",
        "vhd",
        "vhd-fixed",
        "vhdx",
        "vmdk",
        "vmdk-stream",
    ] {
        let rows = text
            .lines()
            .filter(|l| {
                // The label, then the column padding (at least two spaces).
                l.trim_start()
                    .strip_prefix(row)
                    .is_some_and(|rest| rest.starts_with("  "))
                    && l.contains("x   (target")
            })
            .count();
        assert_eq!(rows, 2, "no '{row}' row for both images in:\n{text}");
    }
    // It cleans up after itself.
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn bench_only_runs_one_part_and_refuses_an_unknown_one() {
    let dir = support::temp_dir();
    let d = dir.path().to_str().unwrap();
    let out = cowdisk()
        .args(["bench", "--tiny", "--dir", d, "--only", "clone-formats"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("vmdk-stream"), "{text}");
    assert!(!text.contains("plain pread"), "{text}");
    // The random-read rows alone: every extent count, no other part.
    let out = cowdisk()
        .args(["bench", "--tiny", "--dir", d, "--only", "extents"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for extents in ["10", "1000", "10000", "100000", "1000000"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{extents} extents"))),
            "no {extents}-extent row in:\n{text}"
        );
    }
    assert!(!text.contains("plain pread"), "{text}");
    assert!(!text.contains("vmdk-stream"), "{text}");
    let out = cowdisk()
        .args(["bench", "--tiny", "--dir", d, "--only", "nothing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("clone-formats"));
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn overlay_store_step_by_step_then_commit() {
    let dir = support::temp_dir();
    let img = sample(dir.path(), "mbr.img", "mbr");
    let other = sample(dir.path(), "other.img", "gpt");
    let print = fingerprint(&img);
    let store = dir.path().join("work.cow");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    cowdisk()
        .args([
            "overlay",
            "create",
            &s(&img),
            &s(&store),
            "--granularity",
            "128",
        ])
        .assert()
        .success();
    let data = support::pattern(1024, 9);
    let file = dir.path().join("two-sectors.bin");
    std::fs::write(&file, &data).unwrap();
    // Order matters: the insert happens first, then the move sees it.
    let write_arg = format!("7:{}", s(&file));
    cowdisk()
        .args([
            "overlay",
            "edit",
            &s(&img),
            &s(&store),
            "--insert",
            "131072:2048",
            "--move",
            "83968:133120:40960",
            "--write",
            &write_arg,
            "--discard",
            "100:3",
        ])
        .assert()
        .success();
    // A second session, after a reopen.
    cowdisk()
        .args([
            "overlay",
            "edit",
            &s(&img),
            &s(&store),
            "--delete",
            "0:0",
            "--insert",
            "0:0",
        ])
        .assert()
        .success();
    let out = cowdisk()
        .args(["overlay", "info", "--json", &s(&img), &s(&store)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual_size"].as_u64(), Some(133120 * 512));
    assert_eq!(info["consistent"], true);

    // The expected drive, built from the source's bytes by hand.
    let src = std::fs::read(&img).unwrap();
    let sec = |a: u64, b: u64| &src[(a * 512) as usize..(b * 512) as usize];
    let mut expect = Vec::new();
    expect.extend_from_slice(sec(0, 83968));
    expect.extend_from_slice(sec(124928, 131072));
    expect.extend(std::iter::repeat_n(0u8, 2048 * 512));
    expect.extend_from_slice(sec(83968, 124928));
    expect[7 * 512..9 * 512].copy_from_slice(&data);
    expect[100 * 512..103 * 512].fill(0);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &expect).unwrap();

    let vdi = dir.path().join("result.vdi");
    cowdisk()
        .args(["overlay", "commit", &s(&img), &s(&store), &s(&vdi)])
        .assert()
        .success()
        .stdout(contains("verified"));
    let check = String::from_utf8(qemu_img(&["check", &s(&vdi)])).unwrap();
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(&["compare", "-f", "raw", "-F", "vdi", &s(&expected), &s(&vdi)]);

    // Bad input: another source, an edit outside the drive, a bad edit.
    let err = fails(&["overlay", "info", &s(&other), &s(&store)]);
    assert!(err.contains("work.cow"), "{err}");
    let err = fails(&[
        "overlay",
        "edit",
        &s(&img),
        &s(&store),
        "--delete",
        "999999999:5",
    ]);
    assert!(
        err.contains("work.cow") && err.contains("999999999"),
        "{err}"
    );
    let err = fails(&["overlay", "edit", &s(&img), &s(&store), "--move", "1:2"]);
    assert!(err.contains("FROM:TO:N"), "{err}");
    let err = fails(&["overlay", "create", &s(&img), &s(&store)]);
    assert!(err.contains("exists"), "{err}");
    assert_unchanged(&img, &print);
}
