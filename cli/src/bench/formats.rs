//! `cowdisk bench`, part 6: sequential read speed of each source reader
//! against qemu-img.
//!
//! For each format: makes an image with qemu-img (mostly allocated,
//! patterned by qemu-io, every eighth 16 MiB left unwritten), reads it
//! front to back through our reader in 1 MiB reads, then times
//! `qemu-img convert -O raw IMAGE /dev/shm/...raw` of the same image, and
//! prints both rates and their ratio (ours / qemu's; at least 1.0x is the
//! target). Both read the image from the page cache (it was just written).
//! A few MiB of our reads are compared with qemu's output, so a fast wrong
//! reader does not pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cowdisk::formats::{open_path, OpenOptions};

const MIB: u64 = 1 << 20;

/// A byte offset and the MiB read there.
type Sample = (u64, Vec<u8>);
const CHUNK: u64 = 16 * MIB;

/// Our name, qemu's format name, qemu-img create options, file name.
const FORMATS: &[(&str, &str, &str, &str)] = &[
    ("raw", "raw", "", "bench.raw"),
    ("vdi", "vdi", "", "bench.vdi"),
    ("parallels", "parallels", "", "bench.hdd"),
    ("vhd", "vpc", "subformat=dynamic,force_size=on", "bench.vhd"),
    ("vhdx", "vhdx", "", "bench.vhdx"),
    ("qcow2", "qcow2", "", "bench.qcow2"),
    ("vmdk", "vmdk", "subformat=monolithicSparse", "bench.vmdk"),
];

fn run(program: &str, args: &[String]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("bench: cannot run {program}: {e} (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "bench: {program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn make_image(
    dir: &Path,
    format: &str,
    opts: &str,
    file: &str,
    size: u64,
) -> Result<PathBuf, String> {
    let path = dir.join(file);
    let p = path.display().to_string();
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), format.into()];
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    args.extend([p.clone(), size.to_string()]);
    run("qemu-img", &args)?;
    let mut io: Vec<String> = vec!["-f".into(), format.into()];
    for i in 0..size / CHUNK {
        if i % 8 == 7 {
            continue; // left unwritten
        }
        io.push("-c".into());
        io.push(format!(
            "write -P {:#x} {} {CHUNK}",
            0x40 + i % 64,
            i * CHUNK
        ));
    }
    io.push(p);
    run("qemu-io", &io)?;
    Ok(path)
}

/// Reads the whole image through our reader in 1 MiB reads; returns the
/// rate in MiB/s and a few sampled MiB (offset, bytes) to check.
fn ours(path: &Path) -> Result<(f64, Vec<Sample>), String> {
    let disk = open_path(path, &OpenOptions::default()).map_err(|e| format!("bench: {e}"))?;
    let sectors = disk.sector_count();
    let per_read = MIB / 512;
    let mut buf = vec![0u8; MIB as usize];
    let mut samples = Vec::new();
    let mut checksum = 0u64;
    let started = Instant::now();
    let mut lba = 0;
    let mut n_read = 0u64;
    while lba < sectors {
        let n = per_read.min(sectors - lba);
        let part = &mut buf[..(n * 512) as usize];
        disk.read_sectors(lba, part)
            .map_err(|e| format!("bench: {e}"))?;
        checksum = checksum.wrapping_add(u64::from(part[0]) ^ u64::from(part[part.len() - 1]));
        if n_read % 97 == 5 {
            samples.push((lba * 512, part.to_vec()));
        }
        n_read += 1;
        lba += n;
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    Ok(((sectors * 512) as f64 / MIB as f64 / secs, samples))
}

/// Times `qemu-img convert -O raw` of the image into /dev/shm; returns the
/// rate in MiB/s and the output's path.
fn qemu(path: &Path, size: u64) -> Result<(f64, PathBuf), String> {
    let out = PathBuf::from(format!("/dev/shm/cowdisk-bench-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let started = Instant::now();
    run(
        "qemu-img",
        &[
            "convert".into(),
            "-O".into(),
            "raw".into(),
            path.display().to_string(),
            out.display().to_string(),
        ],
    )?;
    let secs = started.elapsed().as_secs_f64();
    Ok((size as f64 / MIB as f64 / secs, out))
}

fn check_samples(format: &str, raw: &Path, samples: &[Sample]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(raw).map_err(|e| format!("bench: {e}"))?;
    for (offset, bytes) in samples {
        let mut theirs = vec![0u8; bytes.len()];
        file.read_exact_at(&mut theirs, *offset)
            .map_err(|e| format!("bench: {e}"))?;
        if &theirs != bytes {
            return Err(format!(
                "bench: {format}: our bytes at {offset} differ from qemu-img convert"
            ));
        }
    }
    Ok(())
}

/// Runs the format benchmark on images of `size_mib` MiB made in `dir`.
pub fn run_formats(size_mib: u64, dir: &Path) -> Result<(), String> {
    let size = size_mib * MIB;
    println!(
        "sequential read of a {size_mib} MiB image of each format (7/8 written), 1 MiB reads; \
         ratio = ours / qemu-img convert -O raw to /dev/shm"
    );
    let mut slowest: Option<(&str, f64)> = None;
    for &(name, format, opts, file) in FORMATS {
        let image = make_image(dir, format, opts, file, size)?;
        let (our_rate, samples) = ours(&image)?;
        let (qemu_rate, raw) = qemu(&image, size)?;
        let checked = check_samples(name, &raw, &samples);
        let _ = std::fs::remove_file(&raw);
        let _ = std::fs::remove_file(&image);
        checked?;
        let ratio = our_rate / qemu_rate;
        println!(
            "  {name:<10} ours {our_rate:>6.0} MiB/s   qemu-img convert {qemu_rate:>6.0} MiB/s   ratio {ratio:.2}x"
        );
        if slowest.is_none_or(|(_, r)| ratio < r) {
            slowest = Some((name, ratio));
        }
    }
    if let Some((name, ratio)) = slowest {
        println!("  lowest ratio: {name} {ratio:.2}x (target: at least 1.00x)");
    }
    Ok(())
}
