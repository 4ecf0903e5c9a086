//! `cowdisk`: the command-line tool. Inspect a disk image, clone it
//! compactly, or enlarge it — grow the drive, slide the partitions, rewrite
//! the partition table — through a copy-on-write overlay, so the source is
//! never written. See docs/CLI.md.

mod bench;
mod fs;
mod grow;
mod overlay;
mod sample;
mod serve;
mod size;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use cowdisk::clone::{self, CloneFormat, CloneOptions};
use cowdisk::disk::SECTOR_BYTES;
use cowdisk::formats::{self, OpenOptions};
use cowdisk::partition::{self, Alignment, EnlargeOptions, Partition, Table};
use cowdisk::{Disk, Overlay, OverlayOptions, SectorStatus};

use size::{human, parse_size};

#[derive(Parser)]
#[command(
    name = "cowdisk",
    version,
    about = "Inspect, clone and enlarge disk images through a copy-on-write overlay \
             (the source is never written)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Format, size, UUID, chain, allocation and partition table of an image.
    Info {
        image: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The allocation map: runs of data, zero and unallocated space.
    Map {
        image: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
        /// Resolution of the map in 512-byte sectors (a power of two).
        #[arg(long, default_value_t = 2048)]
        granularity: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Map the drive of this persistent overlay store over IMAGE
        /// (opened read-only) instead of IMAGE itself.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Write a compact copy of an image (unallocated and zero space is not
    /// stored), then verify it against the source.
    Clone {
        source: PathBuf,
        dest: PathBuf,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        open: OpenArgs,
        #[command(flatten)]
        compact: fs::CompactArgs,
    },
    /// Grow a disk: insert new space after a partition, slide the
    /// following partitions, rewrite the partition table (MBR or GPT), and
    /// write the result as a compact clone. The source is untouched.
    Enlarge {
        source: PathBuf,
        dest: PathBuf,
        /// The new size of the drive (20G, 512M, 1.5T, 4096s, bytes).
        #[arg(long)]
        size: String,
        /// The partition to grow (its number as sfdisk/sgdisk show it);
        /// default: the largest.
        #[arg(long)]
        partition: Option<u32>,
        /// Where the moved partitions start: 1 MiB boundaries, or whole
        /// cylinders (255 heads x 63 sectors) as the legacy tool did.
        #[arg(long, value_enum, default_value_t = AlignArg::Mib)]
        align: AlignArg,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        open: OpenArgs,
        #[command(flatten)]
        compact: fs::CompactArgs,
        #[command(flatten)]
        grow: grow::GrowArgs,
    },
    /// Convert an image to another format, as `qemu-img convert` does (no
    /// edits): the format from -O or DEST's extension; then verify it.
    Convert {
        source: PathBuf,
        dest: PathBuf,
        /// Output format (default: from DEST's extension, else raw).
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<FormatArg>,
        /// Compress qcow2 clusters (as `qemu-img convert -c`).
        #[arg(short = 'c', long)]
        compress: bool,
        /// qcow2 cluster size (512 to 2M, a power of two; default 64K).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Replace DEST if it exists.
        #[arg(long)]
        force: bool,
        /// Skip the verification pass.
        #[arg(long)]
        no_verify: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Work with a persistent overlay store step by step: create, edit,
    /// info, commit (clone it out).
    #[command(subcommand)]
    Overlay(overlay::OverlayCommand),
    /// Write a 64 MiB sample disk with recognisable data: two partitions
    /// (MBR or GPT) whose sectors read "PARTITION-<n> sector <lba>".
    Sample {
        dest: PathBuf,
        /// The partition table.
        #[arg(long, value_enum, default_value_t = TableArg::Mbr)]
        table: TableArg,
    },
    /// Serve IMAGE through an overlay over NBD: starts nbdkit with the
    /// cowdisk plugin and prints the NBD URI (see docs/NBD.md).
    Serve(serve::ServeArgs),
    /// The benchmark: every figure side by side with pread, qemu-img and
    /// qemu-io, on data it generates (prints figures; never fails on speed).
    Bench {
        /// A short run.
        #[arg(long)]
        quick: bool,
        /// A smoke run with tiny sizes (for tests; the figures mean nothing).
        #[arg(long, hide = true)]
        tiny: bool,
        /// Folder for the generated data (default: a temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run one part only (clone-formats: a clone into every format vs
        /// qemu-img convert; clone-pipeline: a clone reading ahead of its
        /// writer vs one thread vs qemu-img convert -O raw; extents: random
        /// reads through overlays with up to 1,000,000 extents; reads:
        /// reads through the C ABI into buffers placed five ways, and
        /// parallel readers).
        #[arg(long, value_name = "PART")]
        only: Option<String>,
    },
}

#[derive(clap::Args)]
pub(crate) struct OpenArgs {
    /// Follow parent (backing) image paths named inside an image.
    #[arg(long)]
    pub(crate) follow_parents: bool,
}

#[derive(clap::Args)]
pub(crate) struct WriteArgs {
    /// Format of the new image (default: from DEST's extension: .vdi,
    /// .qcow2, .vhd (dynamic), .vhdx, .vmdk (monolithicSparse), else raw).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Compress qcow2 clusters (as `qemu-img convert -c`).
    #[arg(long)]
    compress: bool,
    /// qcow2 cluster size (512 to 2M, a power of two; default 64K).
    #[arg(long)]
    cluster_size: Option<String>,
    /// Replace DEST if it exists.
    #[arg(long)]
    force: bool,
    /// Skip the verification pass.
    #[arg(long)]
    no_verify: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Raw,
    Vdi,
    Qcow2,
    /// Dynamic VHD.
    Vhd,
    /// Fixed VHD (what Azure takes).
    VhdFixed,
    Vhdx,
    /// monolithicSparse VMDK.
    Vmdk,
    /// streamOptimized VMDK (OVA packages).
    VmdkStream,
}

impl FormatArg {
    fn clone_format(self) -> CloneFormat {
        match self {
            FormatArg::Raw => CloneFormat::Raw,
            FormatArg::Vdi => CloneFormat::Vdi,
            FormatArg::Qcow2 => CloneFormat::Qcow2,
            FormatArg::Vhd => CloneFormat::VhdDynamic,
            FormatArg::VhdFixed => CloneFormat::VhdFixed,
            FormatArg::Vhdx => CloneFormat::Vhdx,
            FormatArg::Vmdk => CloneFormat::VmdkSparse,
            FormatArg::VmdkStream => CloneFormat::VmdkStream,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TableArg {
    Mbr,
    Gpt,
}

#[derive(Clone, Copy, ValueEnum)]
enum AlignArg {
    Mib,
    Cylinder,
}

/// A failure: one line for the user.
pub(crate) type Fallible<T> = Result<T, String>;

fn main() -> ExitCode {
    restore_sigpipe();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Info { image, open, json } => info(&image, &open, json),
        Command::Map {
            image,
            open,
            granularity,
            json,
            store,
        } => map(&image, &open, granularity, json, store.as_deref()),
        Command::Clone {
            source,
            dest,
            write,
            open,
            compact,
        } => clone_command(&source, &dest, &write, &open, &compact),
        Command::Convert {
            source,
            dest,
            output_format,
            compress,
            cluster_size,
            force,
            no_verify,
            open,
        } => {
            let write = WriteArgs {
                format: output_format,
                compress,
                cluster_size,
                force,
                no_verify,
            };
            // A plain conversion: no filesystem-aware compaction.
            clone_command(
                &source,
                &dest,
                &write,
                &open,
                &fs::CompactArgs { compact: false },
            )
        }
        Command::Enlarge {
            source,
            dest,
            size,
            partition,
            align,
            write,
            open,
            compact,
            grow,
        } => enlarge(
            &source, &dest, &size, partition, align, &write, &open, &compact, &grow,
        ),
        Command::Overlay(command) => {
            let edit = matches
                .subcommand_matches("overlay")
                .and_then(|m| m.subcommand_matches("edit"));
            overlay::run(command, edit)
        }
        Command::Sample { dest, table } => {
            sample::write_sample(&dest, matches!(table, TableArg::Gpt))
                .map(|()| println!("wrote {}", dest.display()))
        }
        Command::Serve(args) => serve::run(&args),
        Command::Bench {
            quick,
            tiny,
            dir,
            only,
        } => {
            let scale = match (tiny, quick) {
                (true, _) => bench::Scale::Tiny,
                (false, true) => bench::Scale::Quick,
                (false, false) => bench::Scale::Full,
            };
            bench::run(scale, dir.as_deref(), only.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cowdisk: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Dies quietly on a closed pipe (`cowdisk info x | head`) like other
/// command-line tools, instead of panicking on the failed print.
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default at start-up,
    // before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// An error's text, starting with the file's name unless it names it.
pub(crate) fn about(path: &Path, error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let name = path.display().to_string();
    if text.contains(&name) {
        text
    } else {
        format!("{name}: {text}")
    }
}

pub(crate) fn open_image(path: &Path, open: &OpenArgs) -> Fallible<Box<dyn Disk>> {
    open_image_as_format(path, open).map(|opened| opened.disk)
}

/// Opens the image and says which format's reader opened it.
fn open_image_as_format(path: &Path, open: &OpenArgs) -> Fallible<formats::Opened> {
    let options = OpenOptions {
        follow_parent_paths: open.follow_parents,
    };
    formats::registry::open(path, &options).map_err(|e| about(path, e))
}

fn uuid_text(uuid: [u8; 16]) -> String {
    uuid::Uuid::from_bytes(uuid).hyphenated().to_string()
}

/// Runs of equal status at `granularity` sectors: (start, sectors, status).
fn allocation_runs(
    disk: &mut dyn Disk,
    granularity: u64,
) -> cowdisk::Result<Vec<(u64, u64, SectorStatus)>> {
    let total = disk.sector_count();
    let mut runs: Vec<(u64, u64, SectorStatus)> = Vec::new();
    let mut start = 0;
    while start < total {
        let len = granularity.min(total - start);
        let status = disk.block_status(start, len)?;
        match runs.last_mut() {
            Some(last) if last.2 == status => last.1 += len,
            _ => runs.push((start, len, status)),
        }
        start += len;
    }
    Ok(runs)
}

fn status_name(status: SectorStatus) -> &'static str {
    match status {
        SectorStatus::Normal => "data",
        SectorStatus::Blank => "zero",
        SectorStatus::NotAlloc => "unallocated",
    }
}

fn partition_json(p: &Partition) -> serde_json::Value {
    json!({
        "number": p.number,
        "start": p.start,
        "sectors": p.sectors,
        "end": p.end(),
        "bytes": p.sectors * SECTOR_BYTES,
        "type": p.kind,
        "name": p.name,
        "extended": p.container,
        "bootable": p.bootable,
    })
}

fn print_partitions(indent: &str, partitions: &[Partition]) {
    println!(
        "{indent}{:>3} {:>12} {:>12} {:>12} {:>10}  type",
        "#", "start", "end", "sectors", "size"
    );
    for p in partitions {
        let kind = if p.container {
            format!("{} (extended)", p.kind)
        } else if p.name.is_empty() {
            p.kind.clone()
        } else {
            format!("{} \"{}\"", p.kind, p.name)
        };
        println!(
            "{indent}{:>3} {:>12} {:>12} {:>12} {:>10}  {kind}",
            p.number,
            p.start,
            p.end() - 1,
            p.sectors,
            human(p.sectors * SECTOR_BYTES)
        );
    }
}

fn info(path: &Path, open: &OpenArgs, as_json: bool) -> Fallible<()> {
    let formats::Opened { format, mut disk } = open_image_as_format(path, open)?;
    let format = format.name();
    let what = path.display().to_string();
    let sectors = disk.sector_count();
    let runs = allocation_runs(disk.as_mut(), clone::PAGE_SECTORS).map_err(|e| about(path, e))?;
    let count = |s: SectorStatus| -> u64 {
        runs.iter().filter(|r| r.2 == s).map(|r| r.1).sum::<u64>() * SECTOR_BYTES
    };
    let (data, zero) = (count(SectorStatus::Normal), count(SectorStatus::Blank));
    let on_disk = clone::allocated_bytes(path).map_err(|e| about(path, e))?;
    let file_len = std::fs::metadata(path).map_err(|e| about(path, e))?.len();
    let parent = disk.parent_uuid().map(uuid_text);
    let table = partition::read_table(disk.as_mut(), &what).map_err(|e| about(path, e))?;
    let partitions = table.as_ref().map(Table::partitions).unwrap_or_default();
    if as_json {
        let value = json!({
            "image": what,
            "format": format,
            "virtual_size": disk.byte_size(),
            "sectors": sectors,
            "uuid": disk.uuid().map(uuid_text),
            "differencing": disk.is_snapshot(),
            "parent_uuid": parent,
            "chain": [what],
            "allocated_bytes": data,
            "zero_bytes": zero,
            "file_size": file_len,
            "disk_usage": on_disk,
            "partition_table": table.as_ref().map(Table::kind),
            "partitions": partitions.iter().map(partition_json).collect::<Vec<_>>(),
            "filesystems": fs::info_json(disk.as_mut(), path)?,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("image:           {what}");
    println!("format:          {format}");
    println!(
        "virtual size:    {} ({} bytes, {sectors} sectors)",
        human(disk.byte_size()),
        disk.byte_size()
    );
    println!(
        "uuid:            {}",
        disk.uuid().map(uuid_text).unwrap_or_else(|| "-".into())
    );
    match &parent {
        Some(p) => println!("chain:           {what} -> parent image {p}"),
        None if disk.is_snapshot() => println!("chain:           {what} -> (a parent)"),
        None => println!("chain:           {what} (no parent)"),
    }
    println!(
        "allocated:       {} of data, {} known zero (at 1 MiB resolution)",
        human(data),
        human(zero)
    );
    println!(
        "file:            {} ({} on disk)",
        human(file_len),
        human(on_disk)
    );
    match &table {
        None => println!("partition table: none"),
        Some(t) => {
            println!(
                "partition table: {} ({} partitions)",
                t.kind().to_uppercase(),
                partitions.len()
            );
            print_partitions("  ", &partitions);
        }
    }
    fs::print_info(disk.as_mut(), path)
}

fn map(
    path: &Path,
    open: &OpenArgs,
    granularity: u64,
    as_json: bool,
    store: Option<&Path>,
) -> Fallible<()> {
    if !granularity.is_power_of_two() {
        return Err(format!(
            "--granularity {granularity}: must be a power of two (sectors)"
        ));
    }
    let mut disk = open_image(path, open)?;
    if let Some(store) = store {
        let overlay = Overlay::open_persistent(store, disk, true).map_err(|e| about(store, e))?;
        disk = Box::new(overlay);
    }
    let runs = allocation_runs(disk.as_mut(), granularity).map_err(|e| about(path, e))?;
    if as_json {
        let value: Vec<_> = runs
            .iter()
            .map(|&(start, len, status)| {
                json!({
                    "start": start * SECTOR_BYTES,
                    "length": len * SECTOR_BYTES,
                    "data": status == SectorStatus::Normal,
                    "zero": status != SectorStatus::Normal,
                    "allocated": status != SectorStatus::NotAlloc,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:>14} {:>14} {:>10}  what   ({}, resolution {} sectors)",
        "start sector",
        "sectors",
        "size",
        path.display(),
        granularity
    );
    for (start, len, status) in runs {
        println!(
            "{start:>14} {len:>14} {:>10}  {}",
            human(len * SECTOR_BYTES),
            status_name(status)
        );
    }
    Ok(())
}

fn progress_bar(message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(100), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn destination_format(dest: &Path, write: &WriteArgs) -> CloneFormat {
    match write.format {
        Some(format) => format.clone_format(),
        None => CloneFormat::from_path(dest),
    }
}

/// Refuses a destination that is the source itself.
fn check_distinct(source: &Path, dest: &Path) -> Fallible<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(source), std::fs::metadata(dest)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(format!(
                "{}: is the source itself; the source is never written",
                dest.display()
            ));
        }
    }
    Ok(())
}

/// Clones `disk` to `dest` with a progress bar, then (unless told not to)
/// reads `dest` back and compares it with `reference` (which is `disk`
/// itself, or the disk it was made from).
pub(crate) fn write_and_verify(
    disk: &mut dyn Disk,
    dest: &Path,
    write: &WriteArgs,
) -> Fallible<()> {
    // Checked here to name the option that replaces it; the library checks
    // again when it renames the finished clone into place.
    if !write.force && dest.symlink_metadata().is_ok() {
        return Err(format!(
            "{}: already exists (use --force to replace it)",
            dest.display()
        ));
    }
    let format = destination_format(dest, write);
    let cluster_bytes = match &write.cluster_size {
        Some(text) => Some(parse_size(text).map_err(|e| format!("--cluster-size: {e}"))?),
        None => None,
    };
    let options = CloneOptions {
        format,
        replace: write.force,
        cluster_bytes,
        compress: write.compress,
        ..CloneOptions::default()
    };
    let bar = progress_bar("clone");
    let stats = clone::clone_to_file(disk, dest, &options, &mut |p: u32| {
        bar.set_position(u64::from(p));
        true
    })
    .map_err(|e| about(dest, e));
    bar.finish_and_clear();
    let stats = stats?;
    println!(
        "wrote {} ({} image): {} virtual, {} pages of data written, {} pages left out",
        dest.display(),
        format.name(),
        human(stats.virtual_bytes),
        stats.pages_written,
        stats.pages_skipped
    );
    if write.no_verify {
        return Ok(());
    }
    let mut written =
        formats::open_path(dest, &OpenOptions::default()).map_err(|e| about(dest, e))?;
    let bar = progress_bar("verify");
    let difference = clone::first_difference(disk, written.as_mut(), &mut |p: u32| {
        bar.set_position(u64::from(p));
        true
    });
    bar.finish_and_clear();
    match difference.map_err(|e| about(dest, e))? {
        None => {
            println!("verified: {} reads back identical", dest.display());
            Ok(())
        }
        Some(sector) => Err(format!(
            "{}: verification failed: differs from the source at sector {sector}",
            dest.display()
        )),
    }
}

fn clone_command(
    source: &Path,
    dest: &Path,
    write: &WriteArgs,
    open: &OpenArgs,
    compact: &fs::CompactArgs,
) -> Fallible<()> {
    check_distinct(source, dest)?;
    let disk = open_image(source, open)?;
    let mut disk = fs::maybe_compact(disk, compact, source)?;
    write_and_verify(disk.as_mut(), dest, write)
}

// One argument per command-line option group; a struct would only repeat
// the clap variant.
#[allow(clippy::too_many_arguments)]
fn enlarge(
    source: &Path,
    dest: &Path,
    size_text: &str,
    partition: Option<u32>,
    align: AlignArg,
    write: &WriteArgs,
    open: &OpenArgs,
    compact: &fs::CompactArgs,
    grow: &grow::GrowArgs,
) -> Fallible<()> {
    check_distinct(source, dest)?;
    let bytes = parse_size(size_text).map_err(|e| format!("--size: {e}"))?;
    if bytes % SECTOR_BYTES != 0 {
        return Err(format!(
            "--size {size_text}: {bytes} bytes is not a whole number of 512-byte sectors"
        ));
    }
    if !write.force && dest.symlink_metadata().is_ok() {
        return Err(format!(
            "{}: already exists (use --force to replace it)",
            dest.display()
        ));
    }
    let disk = open_image(source, open)?;
    let old = disk.byte_size();
    if bytes <= old {
        return Err(format!(
            "{}: --size {size_text} ({}) is not larger than the disk's current {}",
            source.display(),
            human(bytes),
            human(old)
        ));
    }
    let mut overlay =
        Overlay::new(disk, OverlayOptions::default()).map_err(|e| about(source, e))?;
    let options = EnlargeOptions {
        new_sectors: bytes / SECTOR_BYTES,
        partition,
        alignment: match align {
            AlignArg::Mib => Alignment::MiB,
            AlignArg::Cylinder => Alignment::Cylinder,
        },
    };
    let what = source.display().to_string();
    let report = partition::enlarge(&mut overlay, &options, &what).map_err(|e| about(source, e))?;
    println!(
        "{}: {} table, {} -> {}; partition {} grows by {}, the partitions after it move up",
        source.display(),
        report.table.to_uppercase(),
        human(report.old_sectors * SECTOR_BYTES),
        human(report.new_sectors * SECTOR_BYTES),
        report.partition,
        human(report.shift * SECTOR_BYTES)
    );
    println!("before:");
    print_partitions("  ", &report.before);
    println!("after:");
    print_partitions("  ", &report.after);
    grow::after_enlarge(&mut overlay, &report, grow);
    let mut disk = fs::maybe_compact(Box::new(overlay), compact, source)?;
    write_and_verify(disk.as_mut(), dest, write)
}
