//! Every fuzz target of `fuzz/` (the same functions the libFuzzer targets
//! call) over a deterministic corpus, in a normal `cargo test`: seed images
//! made by qemu-img/qemu-io, then thousands of mutations of them
//! (truncations, bit flips, random runs, extreme field values, shifted
//! bytes, spliced chunks; for checksummed formats also with the checksums
//! recomputed so the damage reaches the parsers behind them). Errors are
//! fine; a panic, a case that takes seconds, or a modified input fails.
//! The loop per target is bounded by a case count and by wall-clock time.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cowdisk::fs::FsKind;
use support::fuzz::{fix_vhd, fix_vhdx, run, Target, DESCRIPTOR_EXTENT};

/// Cases per target, unless the time budget runs out first.
const MAX_CASES: usize = 1500;
/// Wall-clock budget per target.
const BUDGET: Duration = Duration::from_secs(5);
/// Fewest cases a target must get through (else the run proves little).
const MIN_CASES: usize = 150;
/// One case taking this long is a hang.
const SLOW_CASE: Duration = Duration::from_secs(3);

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A seed image and the byte windows where its metadata lives.
struct Seed {
    bytes: Vec<u8>,
    hot: Vec<(usize, usize)>,
}

fn create(dir: &Path, name: &str, format: &str, opts: &[&str], size: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(opts);
    let p = path.display().to_string();
    args.extend([p.as_str(), size]);
    support::qemu_img(&args);
    path
}

fn io(path: &Path, format: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    support::qemu_io(path, format, &cmds);
}

fn seed(path: &Path, hot: Vec<(usize, usize)>) -> Seed {
    Seed {
        bytes: std::fs::read(path).unwrap(),
        hot,
    }
}

fn head(len: usize) -> Vec<(usize, usize)> {
    vec![(0, len)]
}

/// Seed images for a target, made by qemu.
fn seeds(target: Target, dir: &Path) -> Vec<Seed> {
    let writes = ["write -P 0x5a 1000 300000", "write -P 0x5b 700000 5000"];
    match target {
        Target::Vdi => {
            let d = create(dir, "d.vdi", "vdi", &[], "2M");
            io(&d, "vdi", &writes);
            let f = create(dir, "f.vdi", "vdi", &["-o", "static=on"], "1M");
            vec![seed(&d, head(8 * KIB)), seed(&f, head(8 * KIB))]
        }
        Target::Parallels => {
            let p = create(dir, "p.hdd", "parallels", &["-o", "cluster_size=64k"], "2M");
            io(&p, "parallels", &writes);
            vec![seed(&p, head(4 * KIB))]
        }
        Target::Vhd => {
            let opts = ["-o", "subformat=dynamic,force_size=on"];
            let d = create(dir, "d.vhd", "vpc", &opts, "4M");
            io(&d, "vpc", &[writes[0], writes[1], "write -P 0x5c 3M 4k"]);
            let opts = ["-o", "subformat=fixed,force_size=on"];
            let f = create(dir, "f.vhd", "vpc", &opts, "1M");
            let d_len = std::fs::metadata(&d).unwrap().len() as usize;
            let f_len = std::fs::metadata(&f).unwrap().len() as usize;
            vec![
                seed(&d, vec![(0, 8 * KIB), (d_len - 512, 512)]),
                seed(&f, vec![(f_len - 512, 512)]),
            ]
        }
        Target::Vhdx => {
            let v = create(dir, "v.vhdx", "vhdx", &["-o", "block_size=1M"], "4M");
            io(&v, "vhdx", &writes);
            let hot = vec![
                (64 * KIB, 4 * KIB),
                (128 * KIB, 4 * KIB),
                (192 * KIB, 512),
                (256 * KIB, 512),
                (MIB, 8 * KIB),
                (2 * MIB, 64 * KIB + 512),
                (3 * MIB, 512),
            ];
            vec![seed(&v, hot)]
        }
        Target::Qcow2 => {
            let plain = create(dir, "p.qcow2", "qcow2", &["-o", "cluster_size=4096"], "1M");
            io(&plain, "qcow2", &[writes[0], "write -z 400000 20000"]);
            let v2 = create(
                dir,
                "v2.qcow2",
                "qcow2",
                &["-o", "compat=0.10,cluster_size=512"],
                "256k",
            );
            io(&v2, "qcow2", &["write -P 0x5c 1000 100000"]);
            let ext = create(
                dir,
                "e.qcow2",
                "qcow2",
                &["-o", "extended_l2=on,cluster_size=16k"],
                "1M",
            );
            io(&ext, "qcow2", &["write -P 0x5d 1000 30000"]);
            let raw = dir.join("c.raw");
            std::fs::write(&raw, support::pattern(256 * KIB, 9)).unwrap();
            let compressed = dir.join("c.qcow2");
            support::qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                &raw.display().to_string(),
                &compressed.display().to_string(),
            ]);
            [plain, v2, ext, compressed]
                .iter()
                .map(|p| seed(p, head(64 * KIB)))
                .collect()
        }
        Target::VmdkSparse => {
            let s = create(dir, "s.vmdk", "vmdk", &[], "1M");
            io(&s, "vmdk", &writes);
            let stream = dir.join("so.vmdk");
            support::qemu_img(&[
                "convert",
                "-q",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &s.display().to_string(),
                &stream.display().to_string(),
            ]);
            vec![seed(&s, head(64 * KIB)), seed(&stream, head(64 * KIB))]
        }
        Target::VmdkDescriptor => {
            // qemu names the extent of `extent.vmdk` `extent-flat.vmdk`, the
            // companion file the harness keeps next to its input.
            let sub = dir.join("descriptor");
            std::fs::create_dir(&sub).unwrap();
            let opts = ["-o", "subformat=monolithicFlat"];
            let d = create(&sub, "extent.vmdk", "vmdk", &opts, "1M");
            let text = std::fs::read_to_string(&d).unwrap();
            assert!(text.contains(DESCRIPTOR_EXTENT), "{text}");
            let len = text.len();
            vec![seed(&d, head(len))]
        }
    }
}

/// One mutation of `seed`.
fn mutate(target: Target, seed: &Seed, rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.bytes.clone();
    let (start, len) = seed.hot[rng.below(seed.hot.len())];
    let len = len.min(b.len().saturating_sub(start)).max(1);
    let blen = b.len();
    let pick = move |rng: &mut Rng| (start + rng.below(len)).min(blen - 1);
    match rng.below(7) {
        0 => {
            // Truncation: mostly inside the metadata.
            let to = if rng.below(2) == 0 {
                pick(rng)
            } else {
                rng.below(b.len())
            };
            b.truncate(to);
        }
        1 => {
            for _ in 0..1 + rng.below(6) {
                let at = if rng.below(8) == 0 {
                    rng.below(b.len())
                } else {
                    pick(rng)
                };
                b[at] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let at = pick(rng);
            let n = (1 + rng.below(64)).min(b.len() - at);
            for x in &mut b[at..at + n] {
                *x = rng.next() as u8;
            }
        }
        3 => {
            // An aligned 2-, 4- or 8-byte field set to an extreme, in
            // either byte order.
            let width = [2usize, 4, 8][rng.below(3)];
            let at = pick(rng) & !(width - 1);
            let values = [
                0u64,
                1,
                u64::MAX,
                u64::MAX - 1,
                1 << 31,
                1 << 40,
                1 << 62,
                0x7FFF_FFFF,
                rng.next(),
            ];
            let v = values[rng.below(values.len())];
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let n = width.min(b.len() - at);
            if rng.below(2) == 0 {
                b[at..at + n].copy_from_slice(&bytes[..n]);
            } else {
                b[at..at + n].copy_from_slice(&bytes[8 - width..8 - width + n]);
            }
        }
        4 if target == Target::VmdkDescriptor => {
            // A number in the text replaced with an extreme one.
            let text = String::from_utf8_lossy(&b).into_owned();
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            if !digits.is_empty() {
                let at = digits[rng.below(digits.len())];
                let end = text[at..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(text.len(), |e| at + e);
                let numbers = [
                    "0",
                    "18446744073709551615",
                    "4294967296",
                    "-1",
                    "99999999999999999999999",
                    "1",
                ];
                let mut out = text[..at].to_string();
                out.push_str(numbers[rng.below(numbers.len())]);
                out.push_str(&text[end..]);
                b = out.into_bytes();
            }
        }
        4 => {
            // A chunk of the image copied over its metadata.
            let from = rng.below(b.len());
            let n = (1 + rng.below(512)).min(b.len() - from);
            let at = pick(rng);
            let n = n.min(b.len() - at);
            let chunk = b[from..from + n].to_vec();
            b[at..at + n].copy_from_slice(&chunk);
        }
        5 => {
            // Bytes inserted or removed: everything after shifts.
            let at = pick(rng);
            if rng.below(2) == 0 {
                let n = 1 + rng.below(16);
                b.splice(at..at, (0..n).map(|_| rng.next() as u8));
            } else {
                let n = (1 + rng.below(16)).min(b.len() - at);
                b.drain(at..at + n);
            }
        }
        _ => {
            // Several bytes of the metadata replaced.
            for _ in 0..2 + rng.below(3) {
                let at = pick(rng);
                b[at] = rng.next() as u8;
            }
        }
    }
    let fix = rng.below(4) != 0;
    match target {
        Target::Vhd if fix => fix_vhd(&mut b),
        Target::Vhdx if fix => fix_vhdx(&mut b),
        _ => {}
    }
    b
}

/// Saves a failing input where `cargo fuzz run TARGET FILE` can replay it.
fn save_failure(target: Target, case: usize, bytes: &[u8]) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{case}.bin", target.name()));
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn drive(target: Target, rng_seed: u64) {
    let dir = support::temp_dir();
    let seeds = seeds(target, dir.path());
    let originals: Vec<_> = seeds.iter().map(|s| s.bytes.clone()).collect();
    let mut rng = Rng(rng_seed);
    let started = Instant::now();
    let (mut cases, mut ours, mut refused) = (0usize, 0usize, 0usize);
    // The seeds themselves first: they must open as the target's format.
    for (i, s) in seeds.iter().enumerate() {
        let outcome = run(target, &s.bytes);
        assert_eq!(
            outcome.opened_as,
            Some(target.drive_type()),
            "{} seed {i}",
            target.name()
        );
        assert_eq!(outcome.failed_reads, 0, "{} seed {i}", target.name());
    }
    while cases < MAX_CASES && started.elapsed() < BUDGET {
        let s = &seeds[cases % seeds.len()];
        let input = mutate(target, s, &mut rng);
        let case_started = Instant::now();
        let result = std::panic::catch_unwind(|| run(target, &input));
        let took = case_started.elapsed();
        let outcome = match result {
            Ok(o) => o,
            Err(_) => {
                let saved = save_failure(target, cases, &input);
                panic!(
                    "{}: case {cases} panicked; input saved as {saved}",
                    target.name()
                );
            }
        };
        if took > SLOW_CASE {
            let saved = save_failure(target, cases, &input);
            panic!(
                "{}: case {cases} took {took:?}; input saved as {saved}",
                target.name()
            );
        }
        match outcome.opened_as {
            Some(t) if t == target.drive_type() => ours += 1,
            Some(_) => {}
            None => refused += 1,
        }
        cases += 1;
    }
    eprintln!(
        "{}: {cases} cases in {:?}: {ours} opened as the format, {refused} refused",
        target.name(),
        started.elapsed()
    );
    assert!(cases >= MIN_CASES, "{}: only {cases} cases", target.name());
    // The corpus reaches past the header checks into the read paths, and
    // also gets refused.
    assert!(
        ours * 10 >= cases,
        "{}: only {ours} of {cases} opened",
        target.name()
    );
    assert!(refused > 0, "{}: nothing was refused", target.name());
    for (s, original) in seeds.iter().zip(&originals) {
        assert!(&s.bytes == original);
    }
}

#[test]
fn vdi() {
    drive(Target::Vdi, 0x1111_2222_3333_4444);
}

#[test]
fn parallels() {
    drive(Target::Parallels, 0x5555_6666_7777_8888);
}

#[test]
fn vhd() {
    drive(Target::Vhd, 0x9999_AAAA_BBBB_CCCC);
}

#[test]
fn vhdx() {
    drive(Target::Vhdx, 0xDDDD_EEEE_FFFF_0001);
}

#[test]
fn qcow2() {
    drive(Target::Qcow2, 0x1234_5678_9ABC_DEF0);
}

#[test]
fn vmdk_sparse() {
    drive(Target::VmdkSparse, 0x0DDB_1A5E_5BAD_5EED);
}

#[test]
fn vmdk_descriptor() {
    drive(Target::VmdkDescriptor, 0xC0FF_EE00_D15C_0123);
}

/// Every target's name has a libFuzzer target file.
#[test]
fn every_target_has_a_fuzz_target_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for target in Target::ALL {
        let file = root
            .join("fuzz_targets")
            .join(format!("{}.rs", target.name()));
        let body = std::fs::read_to_string(&file).unwrap();
        assert!(body.contains("fuzz_target!"), "{}", file.display());
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name())),
            "{} not in fuzz/Cargo.toml",
            target.name()
        );
    }
}

/// Every input kept under `fuzz/regressions/TARGET/` (findings of the
/// coverage-guided campaign, `scripts/fuzz-campaign.sh`) replays without a
/// panic, a hang or a change to the input.
#[test]
fn regression_inputs_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    let Ok(targets) = std::fs::read_dir(&root) else {
        return;
    };
    for target in targets {
        let target = target.unwrap();
        let name = target.file_name().to_string_lossy().into_owned();
        for input in std::fs::read_dir(target.path()).unwrap() {
            let path = input.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let started = Instant::now();
            match name.as_str() {
                "store" => {
                    support::fuzz::run_store(&bytes);
                }
                "store_fixed" => {
                    support::fuzz::run_store_fixed(&bytes);
                }
                "vhd_fixed" => {
                    support::fuzz::run_vhd_fixed(&bytes);
                }
                "vhdx_fixed" => {
                    support::fuzz::run_vhdx_fixed(&bytes);
                }
                "capi" => support::fuzz::run_capi(&bytes),
                "umlcow" => {
                    cowdisk::formats::umlcow::fuzz_one(&bytes);
                }
                "vci" => {
                    cowdisk::formats::vci::fuzz_one(&bytes);
                }
                other => {
                    let target = Target::ALL
                        .into_iter()
                        .find(|t| t.name() == other)
                        .unwrap_or_else(|| panic!("unknown fuzz target folder {other}"));
                    run(target, &bytes);
                }
            }
            assert!(
                started.elapsed() < SLOW_CASE,
                "{}: took {:?}",
                path.display(),
                started.elapsed()
            );
            replayed += 1;
        }
    }
    eprintln!("{replayed} regression inputs replayed");
}

/// The C API target over random call sequences (the real fuzzer runs it
/// coverage-guided under AddressSanitizer; this keeps it working in CI).
#[test]
fn capi_random_call_sequences() {
    let mut rng = Rng(0xCA11_5EC0_0000_0001);
    let started = Instant::now();
    let mut cases = 0;
    while cases < 400 && started.elapsed() < BUDGET {
        let len = 1 + rng.below(600);
        let program: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        support::fuzz::run_capi(&program);
        cases += 1;
    }
    assert!(cases >= 50, "only {cases} C API call sequences");
    eprintln!("capi: {cases} call sequences in {:?}", started.elapsed());
}

/// The sparse store encoding round-trips and the checksum-fixing store
/// target opens a real store encoded that way (so its mutations start
/// from stores that open).
#[test]
fn store_fixed_opens_an_encoded_store() {
    let dir = support::temp_dir();
    let path = dir.path().join("s.cow");
    let data: Vec<u8> = (0..64 * 512).map(|i| (i * 7 / 512) as u8).collect();
    let src = cowdisk::MemDisk::new(data, vec![cowdisk::SectorStatus::Normal; 64]).unwrap();
    let mut overlay = cowdisk::Overlay::create_persistent(
        Box::new(src),
        &path,
        cowdisk::OverlayOptions {
            granularity: 8,
            ..Default::default()
        },
    )
    .unwrap();
    overlay.write(3, &[9u8; 1024]).unwrap();
    overlay.close().unwrap();
    let file = std::fs::read(&path).unwrap();
    let encoded = support::fuzz::encode_sparse_store(&file);
    let (pages, len) = support::fuzz::decode_sparse_store(&encoded);
    assert_eq!(len, file.len() as u64);
    for (p, page) in &pages {
        assert_eq!(&file[*p as usize * 4096..][..4096], &page[..]);
    }
    assert!(support::fuzz::run_store_fixed(&encoded));
    // A byte flipped in an unused part of the identity page: the CRC
    // fix-up makes the page valid again, so the store still opens.
    let mut damaged = encoded.clone();
    damaged[4 + 100] ^= 1;
    assert!(support::fuzz::run_store_fixed(&damaged));
}

/// A disk image made by the real tools for the `fs` target: `sfdisk` makes
/// an MBR with one partition per filesystem, each made by its mkfs.
fn fs_seed(dir: &Path) -> Vec<u8> {
    const DISK_MIB: usize = 40;
    let disk = dir.join("fs.img");
    std::fs::write(&disk, vec![0u8; DISK_MIB * MIB]).unwrap();
    let layout = "label: dos\nstart=2048, size=14336, type=c\nstart=16384, size=16384, type=83\nstart=32768, size=24576, type=7\nstart=57344, size=4096, type=82\n";
    let mut sfdisk = std::process::Command::new("sfdisk")
        .args(["-q", &disk.display().to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package)");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(layout.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    // Each filesystem made in its own file, then copied into its partition.
    let parts: [(&str, u64, u64, &[&str]); 4] = [
        ("mkfs.fat", 2048, 14336, &["-F", "16", "-s", "1"]),
        ("mke2fs", 16384, 16384, &["-q", "-t", "ext4", "-F"]),
        ("mkntfs", 32768, 24576, &["-q", "-F", "-f", "-s", "512"]),
        ("mkswap", 57344, 4096, &[]),
    ];
    let mut image = std::fs::read(&disk).unwrap();
    for (tool, start, sectors, args) in parts {
        let part = dir.join(format!("{tool}.part"));
        std::fs::write(&part, vec![0u8; sectors as usize * 512]).unwrap();
        let status = std::process::Command::new(tool)
            .args(args)
            .arg(&part)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(status.success(), "{tool} failed");
        let bytes = std::fs::read(&part).unwrap();
        let at = start as usize * 512;
        image[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    image
}

/// The `fs` fuzz target's harness on a disk made by the real tools, in its
/// sparse encoding: all four filesystems are found (so the coverage-guided
/// campaign starts from inputs that reach the parsers), and mutated
/// encodings - damaged pages, pages moved elsewhere - never panic. (The
/// filesystem layer's own damage test is tests/fs_fuzz.rs.)
#[test]
fn fs_target_reaches_every_filesystem_of_an_encoded_disk() {
    let dir = support::temp_dir();
    let image = fs_seed(dir.path());
    let encoded = support::fuzz::encode_sparse_store(&image);
    let report = support::fuzz::run_fs(&encoded).expect("the seed disk is analysed");
    let kinds: Vec<_> = report.regions.iter().map(|r| r.filesystem).collect();
    for kind in [FsKind::Fat16, FsKind::Ext4, FsKind::Ntfs, FsKind::Swap] {
        assert!(kinds.contains(&kind), "{kind:?} not found: {report:?}");
    }
    assert!(
        report
            .regions
            .iter()
            .all(|r| r.reason.is_none() || r.number == 0),
        "a seed partition was refused: {report:?}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let body = std::fs::read_to_string(root.join("fuzz_targets/fs.rs")).unwrap();
    assert!(body.contains("run_fs"));
    let records = encoded.len() / 4100;
    let mut rng = Rng(0xF5F5_0000_1234_5678);
    let started = Instant::now();
    let mut cases = 0usize;
    while cases < 300 && started.elapsed() < BUDGET {
        let mut input = encoded.clone();
        for _ in 0..1 + rng.below(6) {
            let record = rng.below(records) * 4100;
            if rng.below(4) == 0 {
                // The page moved to another place on the disk.
                let page = (rng.next() % 16384) as u32;
                input[record..record + 4].copy_from_slice(&page.to_le_bytes());
            } else {
                let at = record + 4 + rng.below(4096);
                input[at] = rng.next() as u8;
            }
        }
        let case_started = Instant::now();
        if std::panic::catch_unwind(|| support::fuzz::run_fs(&input)).is_err() {
            let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fs-{cases}.bin"));
            std::fs::write(&saved, &input).unwrap();
            panic!(
                "fs: case {cases} panicked; input saved as {}",
                saved.display()
            );
        }
        assert!(
            case_started.elapsed() < SLOW_CASE,
            "fs: case {cases} was slow"
        );
        cases += 1;
    }
    assert!(cases >= 30, "fs: only {cases} cases");
    eprintln!("fs: {cases} cases in {:?}", started.elapsed());
}
