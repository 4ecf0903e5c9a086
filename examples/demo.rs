//! The main job, demonstrated: generate a sample disk (an MBR with two
//! partitions holding recognisable data), enlarge it through a copy-on-write
//! overlay the way the legacy cloning tool does (append space, slide the
//! second partition to the new end with a move, grow the first partition,
//! patch the MBR), then write a compact (sparse) clone by reading the
//! overlay page by page and skipping unallocated pages. The source file is
//! never written: its hash is checked at the end.
//!
//! Run: `cargo run --release --example demo [OUTPUT_DIR]`

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use cowdisk::disk::SECTOR_BYTES;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::overlay::extents::ExtentKind;
use cowdisk::{Disk, Overlay, OverlayOptions, SectorStatus};

const MIB: u64 = 2048; // sectors
const P1: (u64, u64) = (MIB, 40 * MIB); // start, length in sectors
const P2: (u64, u64) = (41 * MIB, 20 * MIB);
const DISK_SECTORS: u64 = 64 * MIB;
const GROWTH: u64 = 32 * MIB;

type Demo<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Demo<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "demo-output".into());
    let out = Path::new(&out);
    fs::create_dir_all(out)?;
    let source_path = out.join("sample.img");
    let clone_path = out.join("enlarged.img");

    println!(
        "1. generating {} (64 MiB, MBR, two partitions)",
        source_path.display()
    );
    write_sample(&source_path)?;
    let source_hash = hash_file(&source_path)?;
    print_table("   source", &mbr_of(&fs::read(&source_path)?[..512]));

    let source = open_path(&source_path, &OpenOptions::default())?;
    let mut overlay = Overlay::new(source, OverlayOptions::default())?;

    println!("2. enlarging by 32 MiB through the overlay:");
    let size = overlay.sector_count();
    overlay.insert(size, GROWTH)?;
    println!("   InsertSectors({size}, {GROWTH})          append free space");
    let new_size = overlay.sector_count();
    overlay.move_sectors(P2.0, new_size, P2.1)?;
    println!(
        "   MoveSectors({}, {new_size}, {})   slide partition 2 to the end",
        P2.0, P2.1
    );
    let new_p2 = new_size - P2.1;
    let mut mbr = vec![0u8; 512];
    overlay.read_sectors(0, &mut mbr)?;
    set_entry(&mut mbr, 0, P1.0, new_p2 - P1.0);
    set_entry(&mut mbr, 1, new_p2, P2.1);
    overlay.write(0, &mbr)?;
    println!("   WriteSectors(0, 1)                  patch the MBR: partition 1 grows");
    print_table("   result", &mbr_of(&mbr));

    println!("3. extent map:");
    for (start, e) in overlay.extents().to_vec() {
        let what = match e.kind {
            ExtentKind::None => "inserted (unallocated)".to_string(),
            ExtentKind::Source => format!("source sectors {}..{}", e.base, e.base + e.len),
            ExtentKind::Store => format!("store sectors {}..{}", e.base, e.base + e.len),
        };
        println!("   {:>9} +{:<9} {what}", start, e.len);
    }

    println!(
        "4. cloning to {} (sparse: unallocated pages skipped)",
        clone_path.display()
    );
    let (written, skipped) = clone_sparse(&mut overlay, &clone_path)?;
    let meta = fs::metadata(&clone_path)?;
    println!(
        "   {written} pages written, {skipped} skipped; size {} MiB, allocated {} MiB",
        meta.len() >> 20,
        (meta.blocks() * 512) >> 20
    );

    println!("5. checks:");
    let clone = fs::read(&clone_path)?;
    let source_bytes = fs::read(&source_path)?;
    let sector = |buf: &[u8], s: u64| buf[(s * SECTOR_BYTES) as usize..][..512].to_vec();
    let p1_same = (P1.0..P1.0 + P1.1).all(|s| sector(&clone, s) == sector(&source_bytes, s));
    let p2_same = (0..P2.1).all(|i| sector(&clone, new_p2 + i) == sector(&source_bytes, P2.0 + i));
    println!("   partition 1 bytes equal the source's: {p1_same}");
    println!("   partition 2 bytes equal the source's (at its new place): {p2_same}");
    let untouched = hash_file(&source_path)? == source_hash;
    println!("   source file unchanged: {untouched}");
    if !(p1_same && p2_same && untouched) {
        return Err("demo checks failed".into());
    }
    println!("done.");
    Ok(())
}

fn write_sample(path: &Path) -> Demo<()> {
    let mut file = File::create(path)?;
    let mut mbr = vec![0u8; 512];
    set_entry(&mut mbr, 0, P1.0, P1.1);
    set_entry(&mut mbr, 1, P2.0, P2.1);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    file.write_all(&mbr)?;
    let mut chunk = Vec::with_capacity((MIB * SECTOR_BYTES) as usize);
    for start in (1..DISK_SECTORS).step_by(MIB as usize) {
        chunk.clear();
        for s in start..(start + MIB).min(DISK_SECTORS) {
            let label = if (P1.0..P1.0 + P1.1).contains(&s) {
                "PARTITION-1"
            } else if (P2.0..P2.0 + P2.1).contains(&s) {
                "PARTITION-2"
            } else {
                ""
            };
            let mut sector = [0u8; 512];
            if !label.is_empty() {
                let text = format!("{label} sector {s:>10} ");
                for (i, b) in sector.iter_mut().enumerate() {
                    *b = text.as_bytes()[i % text.len()];
                }
            }
            chunk.extend_from_slice(&sector);
        }
        file.write_all(&chunk)?;
    }
    Ok(())
}

fn set_entry(mbr: &mut [u8], index: usize, start: u64, len: u64) {
    let e = &mut mbr[446 + 16 * index..446 + 16 * (index + 1)];
    e.fill(0);
    e[4] = 0x83;
    e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(len as u32).to_le_bytes());
}

fn mbr_of(mbr: &[u8]) -> Vec<(u64, u64)> {
    (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            let word =
                |o: usize| u64::from(u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]));
            (word(8), word(12))
        })
        .filter(|&(_, len)| len > 0)
        .collect()
}

fn print_table(label: &str, entries: &[(u64, u64)]) {
    for (i, (start, len)) in entries.iter().enumerate() {
        println!(
            "{label} partition {}: sectors {start}..{} ({} MiB)",
            i + 1,
            start + len,
            len / MIB
        );
    }
}

/// Writes every page that is not `NotAlloc`; skipped pages stay holes.
fn clone_sparse(disk: &mut dyn Disk, path: &Path) -> Demo<(u64, u64)> {
    let file = File::create(path)?;
    let size = disk.sector_count();
    let mut buf = vec![0u8; (MIB * SECTOR_BYTES) as usize];
    let (mut written, mut skipped) = (0, 0);
    for start in (0..size).step_by(MIB as usize) {
        let n = MIB.min(size - start);
        if disk.block_status(start, n)? == SectorStatus::NotAlloc {
            skipped += 1;
            continue;
        }
        let part = &mut buf[..(n * SECTOR_BYTES) as usize];
        disk.read_sectors(start, part)?;
        file.write_all_at(part, start * SECTOR_BYTES)?;
        written += 1;
    }
    file.set_len(size * SECTOR_BYTES)?;
    Ok((written, skipped))
}

fn hash_file(path: &Path) -> Demo<u64> {
    let bytes = fs::read(path)?;
    Ok(bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    }))
}
