//! The qcow2 writer, judged by qemu-img: every image passes `qemu-img
//! check` (no errors, no leaks), `qemu-img compare` finds it identical to
//! the raw source, `qemu-img map` shows no data where the source has none,
//! and our own reader reads it back identically; for every cluster size,
//! with and without compression, for odd, empty, fully written and
//! over-2-TiB disks, and as a delta over its source.

mod support;

use std::path::Path;

use cowdisk::clone::{
    clone_overlay_to_file, clone_to_file, no_progress, CloneFormat, CloneOptions,
};
use cowdisk::formats::writer::BackingFile;
use cowdisk::formats::{open_path, OpenOptions};
use cowdisk::{Overlay, OverlayOptions};
use support::pattern;
use support::written::{
    assert_faithful, json_number, qemu_check, qemu_compare, reads_back, sparse_raw,
};

const MIB: u64 = 1 << 20;

fn qcow2_options(cluster_bytes: Option<u64>, compress: bool) -> CloneOptions {
    CloneOptions {
        format: CloneFormat::Qcow2,
        cluster_bytes,
        compress,
        ..CloneOptions::default()
    }
}

fn clone(raw: &Path, out: &Path, options: &CloneOptions) {
    let mut disk = open_path(raw, &OpenOptions::default()).unwrap();
    clone_to_file(disk.as_mut(), out, options, &mut no_progress()).unwrap();
}

/// Bytes that do not deflate (xorshift noise).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Text that deflates well.
fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn every_cluster_size_with_and_without_compression_reads_as_the_source() {
    let dir = support::temp_dir();
    let raw = dir.path().join("src.raw");
    // An odd size (not a multiple of any cluster, nor of a sector), data
    // straddling clusters and pages, a page of zeros between data, text
    // and incompressible bytes, data in the short last sector.
    let size = 37 * MIB + 4096 + 700;
    sparse_raw(
        &raw,
        size,
        &[
            (0, pattern(4096, 1)),
            (MIB - 512, text(3 * 512)),
            (3 * MIB + 12345, pattern(200_000, 2)),
            (9 * MIB, vec![0; MIB as usize]),
            (20 * MIB, text(5 * MIB as usize)),
            (size - 300, pattern(300, 3)),
        ],
    );
    for cluster in [512, 4096, 64 << 10, 2 << 20] {
        for compress in [false, true] {
            let out = dir.path().join(format!("c{cluster}-{compress}.qcow2"));
            clone(&raw, &out, &qcow2_options(Some(cluster), compress));
            let granularity = cluster.max(MIB);
            assert_faithful(&raw, &out, "qcow2", granularity);
            let info =
                String::from_utf8(support::qemu_img(&["info", out.to_str().unwrap()])).unwrap();
            assert!(info.contains(&format!("cluster_size: {cluster}")), "{info}");
        }
    }
}

#[test]
fn empty_and_all_zero_disks_store_no_cluster() {
    let dir = support::temp_dir();
    for (name, size, pieces) in [
        ("empty", 0, vec![]),
        (
            "zeros",
            10 * MIB + 512,
            vec![(MIB, vec![0u8; 3 * MIB as usize])],
        ),
    ] {
        let raw = dir.path().join(format!("{name}.raw"));
        sparse_raw(&raw, size, &pieces);
        let out = dir.path().join(format!("{name}.qcow2"));
        clone(&raw, &out, &qcow2_options(None, false));
        let check = qemu_check(&out, "qcow2");
        // qemu-img leaves the count out when no cluster is allocated.
        assert!(!check.contains("allocated-clusters"), "{check}");
        qemu_compare(&raw, &out, "qcow2");
        reads_back(&raw, &out);
    }
}

#[test]
fn a_fully_written_disk_stores_every_cluster() {
    let dir = support::temp_dir();
    let raw = dir.path().join("full.raw");
    sparse_raw(&raw, 6 * MIB, &[(0, pattern(6 * MIB as usize, 9))]);
    let out = dir.path().join("full.qcow2");
    clone(&raw, &out, &qcow2_options(None, false));
    assert_faithful(&raw, &out, "qcow2", 64 << 10);
    let check = qemu_check(&out, "qcow2");
    assert_eq!(json_number(&check, "allocated-clusters"), 6 * 16, "{check}");
}

#[test]
fn a_disk_over_2_tib_is_sparse() {
    // The source is a qcow2 image qemu-img makes and qemu-io writes (a
    // raw source would be read whole: its holes are not known).
    let dir = support::temp_dir();
    let size = (5u64 << 40) / 2 + 3 * 512; // 2.5 TiB and 3 sectors
    let src = support::qemu_create(dir.path(), "big-src.qcow2", "qcow2", &[], &size.to_string());
    support::qemu_io(
        &src,
        "qcow2",
        &[
            format!("write -P 0x5a {} 4096", 7 * MIB),
            format!("write -P 0xa5 {} {}", 2u64 << 40, MIB),
            format!("write -P 0x33 {} 1024", size - 1024),
        ],
    );
    let mut disk = open_path(&src, &OpenOptions::default()).unwrap();
    let out = dir.path().join("big.qcow2");
    clone_to_file(
        disk.as_mut(),
        &out,
        &qcow2_options(None, false),
        &mut no_progress(),
    )
    .unwrap();
    qemu_check(&out, "qcow2");
    support::qemu_img(&["compare", src.to_str().unwrap(), out.to_str().unwrap()]);
    let data = |image: &Path| -> Vec<(u64, u64)> {
        support::qemu_map(image)
            .into_iter()
            .filter(|e| e.data)
            .map(|e| (e.start, e.length))
            .collect()
    };
    assert_eq!(data(&out), data(&src));
    let mut back = open_path(&out, &OpenOptions::default()).unwrap();
    assert_eq!(back.byte_size(), size);
    let diff = cowdisk::clone::first_difference(disk.as_mut(), back.as_mut(), &mut no_progress());
    assert_eq!(diff.unwrap(), None);
    let len = std::fs::metadata(&out).unwrap().len();
    assert!(
        len < 8 * MIB,
        "a 2.5 TiB clone of 1 MiB of data is {len} bytes"
    );
}

#[test]
fn compression_makes_compressible_data_smaller_and_reads_the_same() {
    let dir = support::temp_dir();
    let raw = dir.path().join("text.raw");
    sparse_raw(
        &raw,
        16 * MIB,
        &[
            (0, text(8 * MIB as usize)),
            (10 * MIB, noise(MIB as usize, 7)),
        ],
    );
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("packed.qcow2");
    clone(&raw, &plain, &qcow2_options(None, false));
    clone(&raw, &packed, &qcow2_options(None, true));
    assert_faithful(&raw, &packed, "qcow2", 64 << 10);
    let check = qemu_check(&packed, "qcow2");
    // The text clusters compress; the patterned ones do not.
    assert_eq!(
        json_number(&check, "compressed-clusters"),
        8 * 16,
        "{check}"
    );
    let (plain_len, packed_len) = (
        std::fs::metadata(&plain).unwrap().len(),
        std::fs::metadata(&packed).unwrap().len(),
    );
    assert!(
        packed_len * 4 < plain_len,
        "compressed {packed_len} bytes vs {plain_len} uncompressed"
    );
    // qemu-img's own compressed image of the same data reads the same.
    let theirs = dir.path().join("theirs.qcow2");
    support::qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    support::qemu_img(&[
        "compare",
        theirs.to_str().unwrap(),
        packed.to_str().unwrap(),
    ]);
}

#[test]
fn a_delta_over_the_source_holds_only_the_changed_clusters() {
    let dir = support::temp_dir();
    let raw = dir.path().join("base.raw");
    sparse_raw(
        &raw,
        64 * MIB,
        &[
            (0, pattern(4 * MIB as usize, 1)),
            (40 * MIB, pattern(2 * MIB as usize, 2)),
        ],
    );
    let source = open_path(&raw, &OpenOptions::default()).unwrap();
    let mut overlay = Overlay::new(source, OverlayOptions::default()).unwrap();
    // Changed 64 KiB clusters: one sector in cluster 1; 3 sectors across
    // the boundary of clusters 31/32; zeros over the source's data in
    // cluster 48 (must hide the backing data); data in the empty middle
    // (cluster 320 = 20 MiB).
    overlay.write(130, &pattern(512, 11)).unwrap();
    overlay.write(32 * 128 - 1, &pattern(3 * 512, 12)).unwrap();
    overlay.write(48 * 128, &vec![0u8; 64 << 10]).unwrap();
    overlay.write(20 * 2048, &pattern(4096, 13)).unwrap();

    let flat = dir.path().join("flat.raw");
    clone_to_file(
        &mut overlay,
        &flat,
        &CloneOptions::default(),
        &mut no_progress(),
    )
    .unwrap();
    let delta = dir.path().join("delta.qcow2");
    let options = CloneOptions {
        backing: Some(BackingFile {
            name: "base.raw".into(),
            format: Some("raw".into()),
        }),
        ..qcow2_options(None, false)
    };
    clone_overlay_to_file(&mut overlay, &delta, &options, &mut no_progress()).unwrap();

    let check = qemu_check(&delta, "qcow2");
    // Clusters 1, 31, 32 and 320 hold data; cluster 48 is a zero cluster.
    assert_eq!(json_number(&check, "allocated-clusters"), 4, "{check}");
    qemu_compare(&flat, &delta, "qcow2");
    let info = String::from_utf8(support::qemu_img(&["info", delta.to_str().unwrap()])).unwrap();
    assert!(info.contains("backing file: base.raw"), "{info}");
    assert!(info.contains("backing file format: raw"), "{info}");
    // Our reader, following the backing file, reads the overlay.
    let mut back = open_path(&delta, &support::follow()).unwrap();
    let mut want = open_path(&flat, &OpenOptions::default()).unwrap();
    let diff = cowdisk::clone::first_difference(want.as_mut(), back.as_mut(), &mut no_progress());
    assert_eq!(diff.unwrap(), None);
}

#[test]
fn a_delta_needs_an_overlay_and_qcow2() {
    let dir = support::temp_dir();
    let raw = dir.path().join("base.raw");
    sparse_raw(&raw, MIB, &[]);
    let backing = Some(BackingFile {
        name: "base.raw".into(),
        format: None,
    });
    let mut disk = open_path(&raw, &OpenOptions::default()).unwrap();
    let out = dir.path().join("d.qcow2");
    let options = CloneOptions {
        backing: backing.clone(),
        ..qcow2_options(None, false)
    };
    let err = clone_to_file(disk.as_mut(), &out, &options, &mut no_progress()).unwrap_err();
    assert!(err.to_string().contains("overlay"), "{err}");
    let mut overlay = Overlay::new(disk, OverlayOptions::default()).unwrap();
    let options = CloneOptions {
        format: CloneFormat::Vdi,
        backing,
        ..CloneOptions::default()
    };
    let err = clone_overlay_to_file(&mut overlay, &out, &options, &mut no_progress()).unwrap_err();
    assert!(err.to_string().contains("qcow2"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_cancelled_clone_leaves_nothing() {
    let dir = support::temp_dir();
    let raw = dir.path().join("src.raw");
    sparse_raw(&raw, 8 * MIB, &[(0, pattern(8 * MIB as usize, 5))]);
    let out = dir.path().join("out.qcow2");
    for compress in [false, true] {
        let mut disk = open_path(&raw, &OpenOptions::default()).unwrap();
        let err = clone_to_file(
            disk.as_mut(),
            &out,
            &qcow2_options(None, compress),
            &mut |p: u32| p < 50,
        )
        .unwrap_err();
        assert_eq!(err.kind(), cowdisk::error::ErrorCode::Cancelled, "{err}");
        let source = open_path(&raw, &OpenOptions::default()).unwrap();
        let mut overlay = Overlay::new(source, OverlayOptions::default()).unwrap();
        let options = CloneOptions {
            backing: Some(BackingFile {
                name: "src.raw".into(),
                format: None,
            }),
            ..qcow2_options(None, compress)
        };
        overlay.write(0, &[1u8; 512]).unwrap();
        overlay.write(8 * MIB / 512 - 1, &[1u8; 512]).unwrap();
        let err =
            clone_overlay_to_file(&mut overlay, &out, &options, &mut |p: u32| p < 50).unwrap_err();
        assert_eq!(err.kind(), cowdisk::error::ErrorCode::Cancelled, "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn compressed_clusters_are_batched_across_pages_and_holes_without_losing_any() {
    // Compression works on batches of several pages: a run longer than two
    // batches, a hole inside a batch, a zero page, and an odd-sized tail.
    let dir = support::temp_dir();
    let raw = dir.path().join("runs.raw");
    let size = 27 * MIB + 1536;
    sparse_raw(
        &raw,
        size,
        &[
            (0, text(19 * MIB as usize)),
            (20 * MIB, noise(MIB as usize, 3)),
            (21 * MIB, vec![0u8; MIB as usize]),
            (23 * MIB + 4096, text(2 * MIB as usize)),
            (27 * MIB, text(1536)),
        ],
    );
    for cluster in [4096u64, 64 << 10] {
        let out = dir.path().join(format!("runs-{cluster}.qcow2"));
        clone(&raw, &out, &qcow2_options(Some(cluster), true));
        assert_faithful(&raw, &out, "qcow2", cluster);
        let check = qemu_check(&out, "qcow2");
        assert!(json_number(&check, "compressed-clusters") > 0, "{check}");
    }
}
