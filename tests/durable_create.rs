//! Files the library creates (overlay stores, clones, UML COW files, VCI
//! images) are created atomically and durably, judged at the level of real
//! system calls by `strace`:
//!
//! - the recorded calls show the file built under a temporary name, synced
//!   (`fsync`), renamed to its path, and then its folder synced (`fsync` of
//!   the directory: under POSIX a new name is durable only then);
//! - `strace` fault injection kills the creating process (SIGKILL) at every
//!   `pwrite64`, `ftruncate`, `fdatasync`, `fsync` and rename it makes in
//!   turn: afterwards the path holds nothing, or (killed after the rename)
//!   the whole file, which opens; and creating it again works.
//!
//! The creating process is this test binary itself, re-run on the ignored
//! test `create_one` with the kind and path in the environment.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use cowdisk::{Disk, MemDisk, Overlay, OverlayOptions, SectorStatus};

const KINDS: [&str; 4] = ["store", "clone", "umlcow", "vci"];

fn pattern_disk(sectors: usize) -> MemDisk {
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512 * 7 + i) as u8)
        .collect();
    MemDisk::new(data, vec![SectorStatus::Normal; sectors]).unwrap()
}

/// Creates one file of kind `kind` at `path` through the library (the
/// body of the child process). `backing` is the UML COW's backing file.
/// The image kinds are opened by their create: `child` exits the process
/// right after it, so the kill points are those of the creation (a store
/// is also written and closed: its later writes are crash-safe too).
fn create(kind: &str, path: &Path, backing: &Path, child: bool) -> cowdisk::Result<()> {
    match kind {
        "store" => {
            let mut overlay = Overlay::create_persistent(
                Box::new(pattern_disk(64)),
                path,
                OverlayOptions {
                    granularity: 8,
                    ..OverlayOptions::default()
                },
            )?;
            overlay.write(8, &[0x5a; 1024])?;
            overlay.close()
        }
        "clone" => {
            let mut disk = pattern_disk(4096);
            cowdisk::clone::clone_to_file(
                &mut disk,
                path,
                &cowdisk::clone::CloneOptions::default(),
                &mut cowdisk::clone::no_progress(),
            )
            .map(|_| ())
        }
        "umlcow" => {
            let cow = cowdisk::formats::umlcow::UmlCow::create(
                path,
                backing,
                &cowdisk::formats::umlcow::CreateOptions::default(),
            )?;
            if child {
                std::process::exit(0);
            }
            cowdisk::disk::ImageFile::close(Box::new(cow))
        }
        "vci" => {
            let params = cowdisk::formats::CreateParams {
                size: 1 << 20,
                ..Default::default()
            };
            let vci = cowdisk::formats::vci::Vci::create(path, &params)?;
            if child {
                std::process::exit(0);
            }
            cowdisk::disk::ImageFile::close(Box::new(vci))
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Opens what `create` made, to check it is whole.
fn opens(kind: &str, path: &Path) -> bool {
    match kind {
        "store" => cowdisk::store::check_store_file(path).is_ok_and(|r| r.is_consistent()),
        // Killed while open for writing (as create leaves it), a VCI image
        // is marked unclean: it opens with the repair flag.
        "vci" => cowdisk::formats::vci::Vci::open(
            path,
            &cowdisk::formats::vci::VciOptions {
                writable: false,
                repair: true,
            },
        )
        .is_ok_and(|d| d.sector_count() > 0),
        "umlcow" => cowdisk::formats::umlcow::UmlCow::open(
            path,
            &cowdisk::formats::umlcow::UmlCowOptions::default(),
        )
        .is_ok_and(|d| d.sector_count() > 0),
        _ => cowdisk::formats::open_path(path, &cowdisk::formats::OpenOptions::default())
            .is_ok_and(|d| d.sector_count() > 0),
    }
}

/// Why `opens` said no, for a failure message.
fn why_not(kind: &str, path: &Path) -> String {
    match kind {
        "store" => match cowdisk::store::check_store_file(path) {
            Ok(report) => format!("{report:?}"),
            Err(e) => e.to_string(),
        },
        _ => String::from("(see opens)"),
    }
}

/// In a child process (the tests below start one under strace, with the
/// environment set): creates what the environment says and exits at once.
/// Run directly: creates each kind in-process and checks that it opens
/// whole and that nothing but the file itself is left in the folder (no
/// temporary name).
/// Held by each test of this file for its whole run. The tests start
/// child processes, and a child forked while another test holds a store
/// open shares that store's lock (flock locks belong to the open file,
/// which a fork shares) until it execs; a store check racing that window
/// sees the store "open for writing elsewhere". Real callers that fork in
/// one thread while opening stores in another can see the same passing
/// refusal; these tests must not.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn create_one() {
    let _turn = one_at_a_time();
    if let (Ok(kind), Ok(path), Ok(backing)) = (
        std::env::var("COWDISK_CREATE_KIND"),
        std::env::var("COWDISK_CREATE_PATH"),
        std::env::var("COWDISK_CREATE_BACKING"),
    ) {
        create(&kind, Path::new(&path), Path::new(&backing), true).unwrap();
        return;
    }
    for kind in ["store", "clone", "umlcow", "vci"] {
        let s = setup();
        let path = s.folder.join(format!("made.{kind}"));
        create(kind, &path, &s.backing, false).unwrap();
        assert!(
            opens(kind, &path),
            "{kind}: the created file does not open whole"
        );
        let mut names: Vec<String> = std::fs::read_dir(&s.folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["backing.raw".to_string(), format!("made.{kind}")],
            "{kind}"
        );
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    folder: PathBuf,
    backing: PathBuf,
}

fn setup() -> Setup {
    let dir = support::temp_dir();
    let folder = dir.path().canonicalize().unwrap();
    let backing = folder.join("backing.raw");
    std::fs::write(&backing, vec![0x11u8; 256 * 1024]).unwrap();
    Setup {
        _dir: dir,
        folder,
        backing,
    }
}

/// Runs the child under `strace` with `strace_args`; returns whether the
/// child succeeded.
fn run_child(kind: &str, path: &Path, backing: &Path, strace_args: &[String]) -> bool {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("strace")
        .args(strace_args)
        .arg("--")
        .arg(exe)
        .args(["--exact", "create_one", "--test-threads=1", "-q"])
        .env("COWDISK_CREATE_KIND", kind)
        .env("COWDISK_CREATE_PATH", path)
        .env("COWDISK_CREATE_BACKING", backing)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("strace (apt-get install strace)");
    status.success()
}

const TRACED: &str =
    "trace=openat,pwrite64,ftruncate,fdatasync,fsync,rename,renameat,renameat2,link,linkat";

/// The recorded system calls of one whole creation, one per line.
fn trace(kind: &str, s: &Setup, name: &str) -> Vec<String> {
    let path = s.folder.join(name);
    let log = s.folder.join(format!("{name}.strace"));
    let args: Vec<String> = ["-f", "-qq", "-y", "-e", TRACED, "-o"]
        .iter()
        .map(|a| a.to_string())
        .chain([log.display().to_string()])
        .collect();
    assert!(
        run_child(kind, &path, &s.backing, &args),
        "{kind}: creation failed"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn creation_syncs_the_file_then_renames_it_then_syncs_the_folder() {
    let _turn = one_at_a_time();
    let s = setup();
    for kind in KINDS {
        let name = format!("new-{kind}");
        let path = s.folder.join(&name);
        let calls = trace(kind, &s, &name);
        let quoted = format!("\"{}\"", path.display());
        let rename = calls
            .iter()
            .position(|l| {
                (l.contains("rename") || l.contains("link(") || l.contains("linkat("))
                    && l.contains(&quoted)
                    && l.trim_end().ends_with("= 0")
            })
            .unwrap_or_else(|| panic!("{kind}: no rename to {quoted} in {calls:#?}"));
        // The temporary file the rename moved: synced before the rename.
        let temp_prefix = format!("{}/.{name}.", s.folder.display());
        assert!(
            calls[rename].contains(&temp_prefix),
            "{kind}: renamed from elsewhere: {}",
            calls[rename]
        );
        let synced_before = calls[..rename].iter().any(|l| {
            l.contains("fsync(") && l.contains(&temp_prefix) && l.trim_end().ends_with("= 0")
        });
        assert!(
            synced_before,
            "{kind}: the file was not fsynced before the rename"
        );
        // Nothing was written at the path itself before the rename.
        let at_path = format!("<{}>", path.display());
        assert!(
            !calls[..rename].iter().any(|l| l.contains(&at_path)),
            "{kind}: the path was written before the rename"
        );
        // The folder is synced after the rename.
        let folder = format!("<{}>", s.folder.display());
        let synced_after = calls[rename..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&folder) && l.trim_end().ends_with("= 0"));
        assert!(
            synced_after,
            "{kind}: the folder was not fsynced after the rename: {:#?}",
            &calls[rename..]
        );
        assert!(opens(kind, &path), "{kind}: the new file does not open");
        println!(
            "{kind}: {} calls; file fsynced, renamed (call {rename}), folder fsynced",
            calls.len()
        );
    }
}

#[test]
fn a_crash_during_creation_leaves_nothing_at_the_path() {
    let _turn = one_at_a_time();
    let s = setup();
    for kind in KINDS {
        let name = format!("counted-{kind}");
        let calls = trace(kind, &s, &name);
        let mut points = 0;
        let mut whole = 0;
        for syscall in ["pwrite64", "ftruncate", "fdatasync", "fsync", "rename"] {
            let n = calls
                .iter()
                .filter(|l| {
                    let call = l.split_whitespace().nth(1).unwrap_or("");
                    if syscall == "rename" {
                        call.starts_with("rename") || call.starts_with("link")
                    } else {
                        call.starts_with(&format!("{syscall}("))
                    }
                })
                .count();
            let names: &[&str] = if syscall == "rename" {
                &["rename", "renameat", "renameat2", "link", "linkat"]
            } else {
                &[syscall]
            };
            for when in 1..=n {
                let name = format!("{kind}-{syscall}-{when}");
                let path = s.folder.join(&name);
                let set = names.join(",");
                let args: Vec<String> = vec![
                    "-f".into(),
                    "-qq".into(),
                    "-o".into(),
                    "/dev/null".into(),
                    "-e".into(),
                    format!("trace={set}"),
                    "-e".into(),
                    format!("inject={set}:signal=SIGKILL:when={when}"),
                ];
                let ok = run_child(kind, &path, &s.backing, &args);
                assert!(!ok, "{kind}: killed at {syscall} #{when} but succeeded");
                points += 1;
                if path.symlink_metadata().is_ok() {
                    // Killed after the rename: the file is whole.
                    assert!(
                        opens(kind, &path),
                        "{kind}: killed at {syscall} #{when}: a half-made file at the path"
                    );
                    whole += 1;
                    continue;
                }
                // Nothing at the path: creating it again works.
                create(kind, &path, &s.backing, false).unwrap_or_else(|e| {
                    panic!("{kind}: killed at {syscall} #{when}: re-creating failed: {e}")
                });
                assert!(
                    opens(kind, &path),
                    "{kind}: the re-created file does not open: {}",
                    why_not(kind, &path)
                );
            }
        }
        assert!(points >= 4, "{kind}: only {points} kill points");
        println!("{kind}: {points} kill points, {whole} after the rename (whole file), the rest left nothing");
    }
}
