//! `cowdisk serve`: a thin launcher for nbdkit with the cowdisk plugin
//! (nbdkit/cowdisk-plugin.c), so VMs and the qemu tools use an overlay
//! live over NBD. It finds the plugin, starts `nbdkit -f`, waits until the
//! server is ready (nbdkit writes its pid file then), prints the NBD URI on
//! stdout, and waits for nbdkit to exit; SIGINT and SIGTERM are passed on
//! to it, so the store is closed cleanly. See docs/NBD.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::{Fallible, OpenArgs};

/// The plugin's file name, as the CMake harness builds and installs it.
const PLUGIN_FILE: &str = "nbdkit-cowdisk-plugin.so";
/// Environment variable naming the plugin file (beats the search).
const PLUGIN_ENV: &str = "COWDISK_NBDKIT_PLUGIN";
/// How long nbdkit may take to open the overlay and start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// The source image (never written).
    source: PathBuf,
    /// A persistent overlay store: reopened if it exists, created if not.
    /// Without it the overlay is anonymous and vanishes when the server stops.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Listen on this Unix socket (default: one in a temporary folder).
    #[arg(long, conflicts_with = "port")]
    socket: Option<PathBuf>,
    /// Listen on this TCP port of 127.0.0.1 instead of a Unix socket.
    #[arg(long)]
    port: Option<u16>,
    /// Serve read-only (the store, if given, must exist and is not changed).
    #[arg(long)]
    readonly: bool,
    /// The plugin file (default: $COWDISK_NBDKIT_PLUGIN, then beside the
    /// installed library, then nbdkit's own plugin folder).
    #[arg(long)]
    plugin: Option<PathBuf>,
    #[command(flatten)]
    open: OpenArgs,
}

/// The running nbdkit's pid, for the signal handler.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn pass_signal_on(signal: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; the pid is our child's.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

pub(crate) fn run(args: &ServeArgs) -> Fallible<()> {
    let config = nbdkit_config()?;
    let plugin = find_plugin(args.plugin.as_deref(), &config)?;
    let scratch = tempfile::Builder::new()
        .prefix("cowdisk-serve-")
        .tempdir()
        .map_err(|e| format!("temporary folder: {e}"))?;
    let pidfile = scratch.path().join("nbdkit.pid");
    let (listen, uri) = match (&args.socket, args.port) {
        (_, Some(port)) => (
            vec![
                "-i".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            format!("nbd://127.0.0.1:{port}"),
        ),
        (socket, None) => {
            let socket = match socket {
                Some(s) => absolute(s)?,
                None => scratch.path().join("nbd.sock"),
            };
            let text = socket.display().to_string();
            (
                vec!["-U".into(), text.clone()],
                format!("nbd+unix:///?socket={text}"),
            )
        }
    };

    let mut command = Command::new("nbdkit");
    command
        .arg("-f")
        .arg("--exit-with-parent")
        .arg("-P")
        .arg(&pidfile)
        .args(&listen)
        .arg(&plugin)
        .arg(format!("file={}", absolute(&args.source)?.display()));
    if let Some(store) = &args.store {
        command.arg(format!("store={}", absolute(store)?.display()));
    }
    if args.readonly {
        command.arg("readonly=true");
    }
    if args.open.follow_parents {
        command.arg("follow-parents=true");
    }
    command.stdin(Stdio::null());

    let mut child = command
        .spawn()
        .map_err(|e| format!("starting nbdkit: {e}"))?;
    CHILD_PID.store(child.id() as i32, Ordering::SeqCst);
    let handler = pass_signal_on as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installing a handler that only calls kill(2).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }

    if let Err(message) = wait_until_ready(&mut child, &pidfile) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(message);
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{uri}");
    let _ = out.flush();
    eprintln!(
        "serving {}{} over NBD{} (nbdkit pid {}); stop with Ctrl-C",
        args.source.display(),
        args.store
            .as_ref()
            .map(|s| format!(" through the store {}", s.display()))
            .unwrap_or_else(|| " through an anonymous overlay".into()),
        if args.readonly { ", read-only" } else { "" },
        child.id()
    );
    let status = child
        .wait()
        .map_err(|e| format!("waiting for nbdkit: {e}"))?;
    CHILD_PID.store(0, Ordering::SeqCst);
    finished(status)
}

/// Waits for nbdkit's pid file (written once it accepts connections), or
/// reports that nbdkit exited (its own message, with the library's, is
/// already on stderr).
fn wait_until_ready(child: &mut Child, pidfile: &Path) -> Fallible<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("nbdkit: {e}"))? {
            return Err(format!(
                "nbdkit did not start ({status}); its message is above"
            ));
        }
        if std::fs::metadata(pidfile).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "nbdkit was not ready after {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finished(status: ExitStatus) -> Fallible<()> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        // Stopped by the signal we passed on: a normal stop.
        (_, Some(libc::SIGINT | libc::SIGTERM)) => Ok(()),
        _ => Err(format!("nbdkit exited: {status}")),
    }
}

fn absolute(path: &Path) -> Fallible<PathBuf> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The plugin: --plugin, $COWDISK_NBDKIT_PLUGIN, the install layout beside
/// this program (PREFIX/bin/cowdisk -> PREFIX/lib*/nbdkit/plugins), the
/// CMake harness's build folders in this repository (target/release/cowdisk
/// -> target/ctest, or build/ as the README builds it), then nbdkit's own
/// plugin folder.
fn find_plugin(given: Option<&Path>, nbdkit_config: &str) -> Fallible<PathBuf> {
    if let Some(path) = given {
        return existing(path, "--plugin");
    }
    if let Some(path) = std::env::var_os(PLUGIN_ENV) {
        return existing(Path::new(&path), PLUGIN_ENV);
    }
    let mut tried = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| {
        e.canonicalize()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
    }) {
        let prefix = dir.join("..");
        for lib in [
            "lib",
            "lib64",
            "lib/x86_64-linux-gnu",
            "lib/aarch64-linux-gnu",
        ] {
            tried.push(prefix.join(lib).join("nbdkit/plugins").join(PLUGIN_FILE));
        }
        tried.push(prefix.join("ctest").join(PLUGIN_FILE));
        // The README's build folder: REPO/build beside REPO/target/release.
        tried.push(prefix.join("../build").join(PLUGIN_FILE));
    }
    if let Some(dir) = nbdkit_config
        .lines()
        .find_map(|line| line.strip_prefix("plugindir="))
    {
        tried.push(Path::new(dir).join(PLUGIN_FILE));
    }
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "the nbdkit plugin {PLUGIN_FILE} was not found (build it with the CMake harness, \
         docs/NBD.md; name it with --plugin or {PLUGIN_ENV}); looked in: {}",
        list.join(", ")
    ))
}

fn existing(path: &Path, what: &str) -> Fallible<PathBuf> {
    if path.is_file() {
        absolute(path)
    } else {
        Err(format!("{}: no such plugin file ({what})", path.display()))
    }
}

/// `nbdkit --dump-config` (its folders and version), which also tells
/// whether nbdkit is installed at all.
fn nbdkit_config() -> Fallible<String> {
    match Command::new("nbdkit")
        .arg("--dump-config")
        .stderr(Stdio::null())
        .output()
    {
        Ok(output) => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "nbdkit not found on PATH: install nbdkit (Debian/Ubuntu: apt-get install nbdkit) \
             to serve over NBD"
                .into(),
        ),
        Err(e) => Err(format!("running nbdkit: {e}")),
    }
}
