//! `cowdisk overlay ...`: work with a persistent overlay store step by
//! step. The store does not record where its source is, so every command
//! names both; the store checks the source is the disk it was made on.

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Subcommand};
use serde_json::json;

use cowdisk::disk::SECTOR_BYTES;
use cowdisk::overlay::extents::ExtentKind;
use cowdisk::{Disk, Overlay, OverlayOptions};

use crate::size::human;
use crate::{about, open_image, write_and_verify, Fallible, OpenArgs, WriteArgs};

#[derive(Subcommand)]
pub enum OverlayCommand {
    /// Create a new persistent overlay store STORE over SRC.
    Create {
        source: PathBuf,
        store: PathBuf,
        /// Copy-on-write unit in sectors (a power of two, 8..65536).
        #[arg(long, default_value_t = 2048)]
        granularity: u64,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Apply edits, in the order given, and make them durable.
    Edit {
        source: PathBuf,
        store: PathBuf,
        /// Insert N unallocated sectors before LBA.
        #[arg(long, value_name = "LBA:N")]
        insert: Vec<String>,
        /// Move N sectors from FROM to what was sector TO before the cut.
        #[arg(long = "move", value_name = "FROM:TO:N")]
        move_: Vec<String>,
        /// Remove N sectors at LBA (the drive shrinks).
        #[arg(long, value_name = "LBA:N")]
        delete: Vec<String>,
        /// Make N sectors at LBA unallocated (zeros).
        #[arg(long, value_name = "LBA:N")]
        discard: Vec<String>,
        /// Write FILE's bytes at LBA (a whole number of sectors).
        #[arg(long, value_name = "LBA:FILE")]
        write: Vec<String>,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// The store's size, extent map and consistency check.
    Info {
        source: PathBuf,
        store: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Clone the overlay's drive out to DEST (compact), then verify it.
    Commit {
        source: PathBuf,
        store: PathBuf,
        dest: PathBuf,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        open: OpenArgs,
    },
}

fn open_overlay(
    source: &Path,
    store: &Path,
    open: &OpenArgs,
    read_only: bool,
) -> Fallible<Overlay> {
    let disk = open_image(source, open)?;
    Overlay::open_persistent(store, disk, read_only).map_err(|e| about(store, e))
}

/// Runs an overlay subcommand; `matches` are the `edit` subcommand's (for
/// the order of the edits).
pub fn run(command: OverlayCommand, matches: Option<&ArgMatches>) -> Fallible<()> {
    match command {
        OverlayCommand::Create {
            source,
            store,
            granularity,
            open,
        } => {
            if store.symlink_metadata().is_ok() {
                return Err(format!("{}: already exists", store.display()));
            }
            let disk = open_image(&source, &open)?;
            let options = OverlayOptions {
                granularity,
                detect_zeros: false,
            };
            let overlay =
                Overlay::create_persistent(disk, &store, options).map_err(|e| about(&store, e))?;
            overlay.close().map_err(|e| about(&store, e))?;
            println!(
                "created {} over {} (granularity {granularity} sectors)",
                store.display(),
                source.display()
            );
            Ok(())
        }
        OverlayCommand::Edit {
            source,
            store,
            insert,
            move_,
            delete,
            discard,
            write,
            open,
        } => {
            let mut edits: Vec<(usize, &str, &String)> = Vec::new();
            for (name, id, values) in [
                ("insert", "insert", &insert),
                ("move", "move_", &move_),
                ("delete", "delete", &delete),
                ("discard", "discard", &discard),
                ("write", "write", &write),
            ] {
                let indices: Vec<usize> = matches
                    .and_then(|m| m.indices_of(id))
                    .map(|i| i.collect())
                    .unwrap_or_else(|| (0..values.len()).collect());
                edits.extend(indices.into_iter().zip(values).map(|(i, v)| (i, name, v)));
            }
            edits.sort_by_key(|e| e.0);
            if edits.is_empty() {
                return Err(
                    "overlay edit: no edit given (--insert, --move, --delete, --discard, --write)"
                        .into(),
                );
            }
            // Parse everything before touching the store.
            let parsed: Vec<Edit> = edits
                .iter()
                .map(|(_, name, value)| parse_edit(name, value))
                .collect::<Fallible<_>>()?;
            let mut overlay = open_overlay(&source, &store, &open, false)?;
            for (edit, (_, name, value)) in parsed.iter().zip(&edits) {
                let result = match edit {
                    Edit::Insert(lba, n) => overlay.insert(*lba, *n),
                    Edit::Move(from, to, n) => overlay.move_sectors(*from, *to, *n),
                    Edit::Delete(lba, n) => overlay.delete(*lba, *n),
                    Edit::Discard(lba, n) => overlay.discard(*lba, *n),
                    Edit::Write(lba, data) => overlay.write(*lba, data),
                };
                // Edits before a failing one stay (they are durable after
                // the flush below); the failing one changed nothing.
                if let Err(e) = result {
                    let flushed = overlay.close();
                    let mut text = format!("{}: --{name} {value}: {e}", store.display());
                    if let Err(f) = flushed {
                        text.push_str(&format!(" (and saving the edits before it failed: {f})"));
                    }
                    return Err(text);
                }
                println!("--{name} {value}: done");
            }
            let size = overlay.sector_count();
            overlay.close().map_err(|e| about(&store, e))?;
            println!(
                "{}: saved; the drive is now {} ({size} sectors)",
                store.display(),
                human(size * SECTOR_BYTES)
            );
            Ok(())
        }
        OverlayCommand::Info {
            source,
            store,
            json,
            open,
        } => {
            let report = cowdisk::store::check_store_file(&store).map_err(|e| about(&store, e))?;
            let overlay = open_overlay(&source, &store, &open, true)?;
            let extents = overlay.extents().to_vec();
            let kind = |k: ExtentKind| match k {
                ExtentKind::None => "none",
                ExtentKind::Source => "source",
                ExtentKind::Store => "store",
                ExtentKind::StoreHole => "store-hole",
                ExtentKind::StoreZero => "store-zero",
            };
            let uuid = overlay
                .store_uuids()
                .map(|(u, _)| uuid::Uuid::from_bytes(u).hyphenated().to_string());
            if json {
                let value = json!({
                    "store": store.display().to_string(),
                    "source": source.display().to_string(),
                    "virtual_size": overlay.sector_count() * SECTOR_BYTES,
                    "source_size": overlay.source().sector_count() * SECTOR_BYTES,
                    "granularity": overlay.options().granularity,
                    "store_uuid": uuid,
                    "units_in_use": report.units_in_use,
                    "consistent": report.problems.is_empty(),
                    "problems": report.problems,
                    "extents": extents.iter().map(|(start, e)| json!({
                        "start": start, "length": e.len, "kind": kind(e.kind), "position": e.base,
                    })).collect::<Vec<_>>(),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            println!("store:        {}", store.display());
            println!(
                "source:       {} ({})",
                source.display(),
                human(overlay.source().sector_count() * SECTOR_BYTES)
            );
            println!(
                "drive:        {} ({} sectors)",
                human(overlay.sector_count() * SECTOR_BYTES),
                overlay.sector_count()
            );
            println!("granularity:  {} sectors", overlay.options().granularity);
            println!("store uuid:   {}", uuid.unwrap_or_else(|| "-".into()));
            println!("units in use: {}", report.units_in_use);
            if report.problems.is_empty() {
                println!("check:        consistent");
            } else {
                println!("check:        {} problem(s)", report.problems.len());
                for p in &report.problems {
                    println!("  {p}");
                }
            }
            println!("extents ({}):", extents.len());
            println!("  {:>14} {:>14}  what", "start", "sectors");
            for (start, e) in &extents {
                let what = match e.kind {
                    ExtentKind::None => "unallocated".to_string(),
                    ExtentKind::Source => format!("source sectors {}..{}", e.base, e.base + e.len),
                    ExtentKind::Store => format!("store sectors {}..{}", e.base, e.base + e.len),
                    ExtentKind::StoreHole => format!(
                        "unallocated, reserved store sectors {}..{}",
                        e.base,
                        e.base + e.len
                    ),
                    ExtentKind::StoreZero => format!(
                        "zeros, reserved store sectors {}..{}",
                        e.base,
                        e.base + e.len
                    ),
                };
                println!("  {start:>14} {:>14}  {what}", e.len);
            }
            Ok(())
        }
        OverlayCommand::Commit {
            source,
            store,
            dest,
            write,
            open,
        } => {
            let mut overlay = open_overlay(&source, &store, &open, true)?;
            write_and_verify(&mut overlay, &dest, &write)
        }
    }
}

enum Edit {
    Insert(u64, u64),
    Move(u64, u64, u64),
    Delete(u64, u64),
    Discard(u64, u64),
    Write(u64, Vec<u8>),
}

fn numbers(name: &str, value: &str, count: usize, shape: &str) -> Fallible<Vec<u64>> {
    let parts: Vec<&str> = value.split(':').collect();
    let parsed: Option<Vec<u64>> = parts.iter().map(|p| p.trim().parse().ok()).collect();
    match parsed {
        Some(n) if n.len() == count => Ok(n),
        _ => Err(format!(
            "--{name} {value}: expected {shape} (numbers of sectors)"
        )),
    }
}

fn parse_edit(name: &str, value: &str) -> Fallible<Edit> {
    Ok(match name {
        "insert" => {
            let n = numbers(name, value, 2, "LBA:N")?;
            Edit::Insert(n[0], n[1])
        }
        "move" => {
            let n = numbers(name, value, 3, "FROM:TO:N")?;
            Edit::Move(n[0], n[1], n[2])
        }
        "delete" => {
            let n = numbers(name, value, 2, "LBA:N")?;
            Edit::Delete(n[0], n[1])
        }
        "discard" => {
            let n = numbers(name, value, 2, "LBA:N")?;
            Edit::Discard(n[0], n[1])
        }
        _ => {
            let (lba, file) = value
                .split_once(':')
                .ok_or_else(|| format!("--write {value}: expected LBA:FILE"))?;
            let lba: u64 = lba
                .trim()
                .parse()
                .map_err(|_| format!("--write {value}: '{lba}' is not a sector number"))?;
            let path = Path::new(file);
            let data = std::fs::read(path).map_err(|e| format!("{file}: {e}"))?;
            if data.is_empty() || data.len() % SECTOR_BYTES as usize != 0 {
                return Err(format!(
                    "{file}: {} bytes is not a whole number of 512-byte sectors",
                    data.len()
                ));
            }
            Edit::Write(lba, data)
        }
    })
}
