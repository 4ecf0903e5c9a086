//! VCI: a model-based property test of writes, reads and discards with
//! reopens (the tree grows internal nodes: its depth is checked), a tree of
//! depth 3, and a crash test that kills a writer process and checks the
//! unclean flag is seen and repair gives a state the writer acknowledged.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use cowdisk::disk::{DiscardDisk, ImageFile, ImageMetadata, WritableDisk};
use cowdisk::error::code;
use cowdisk::formats::vci::{Vci, VciOptions, LEAF_ENTRIES};
use cowdisk::formats::CreateParams;
use cowdisk::{Disk, SectorStatus};
use proptest::prelude::*;
use support::{pattern, temp_dir};

const SECTORS: u64 = 2048;

fn rw() -> VciOptions {
    VciOptions {
        writable: true,
        repair: false,
    }
}

/// The naive model: bytes of the whole disk and whether each sector is held.
struct Model {
    data: Vec<u8>,
    held: Vec<bool>,
}

impl Model {
    fn new(sectors: u64) -> Model {
        Model {
            data: vec![0; sectors as usize * 512],
            held: vec![false; sectors as usize],
        }
    }
    fn write(&mut self, lba: u64, data: &[u8]) {
        let s = lba as usize;
        self.data[s * 512..s * 512 + data.len()].copy_from_slice(data);
        for h in &mut self.held[s..s + data.len() / 512] {
            *h = true;
        }
    }
    fn discard(&mut self, lba: u64, n: u64) {
        let (s, e) = (lba as usize, (lba + n) as usize);
        self.data[s * 512..e * 512].fill(0);
        for h in &mut self.held[s..e] {
            *h = false;
        }
    }
}

fn check_against(img: &mut Vci, model: &Model) {
    let mut all = vec![0u8; model.data.len()];
    img.read_sectors(0, &mut all).unwrap();
    assert!(all == model.data, "contents differ from the model");
    // Held runs walk the whole disk exactly as the model says.
    let mut lba = 0;
    while lba < SECTORS {
        let (held, run) = img.held_run(lba, SECTORS - lba).unwrap();
        assert!(run > 0);
        for s in lba..lba + run {
            assert_eq!(model.held[s as usize], held, "sector {s}");
        }
        if lba + run < SECTORS {
            assert_ne!(model.held[(lba + run) as usize], held);
        }
        let want = if held {
            SectorStatus::Normal
        } else {
            SectorStatus::NotAlloc
        };
        assert_eq!(img.block_status(lba, run).unwrap(), want);
        lba += run;
    }
    // Status runs never claim a sector whose status differs.
    let mut lba = 0;
    while lba < SECTORS {
        let (status, run) = img.status_run(lba, SECTORS - lba).unwrap();
        assert!(run > 0 && lba + run <= SECTORS);
        for s in lba..lba + run {
            let want = if model.held[s as usize] {
                SectorStatus::Normal
            } else {
                SectorStatus::NotAlloc
            };
            assert_eq!(status, want, "status run at {lba}, sector {s}");
        }
        lba += run;
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u64),
    Discard(u64, u64),
    Read(u64, u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SECTORS, 1..24u64, any::<u64>()).prop_map(|(l, n, s)| Op::Write(l, n, s)),
        3 => (0..SECTORS, 1..200u64).prop_map(|(l, n)| Op::Discard(l, n)),
        2 => (0..SECTORS, 1..64u64).prop_map(|(l, n)| Op::Read(l, n)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Fragments the disk: one sector written in every second one of the
/// first `n * 2` sectors, so the map has `n` extents.
fn fragment(img: &mut Vci, model: &mut Model, n: u64) {
    for i in 0..n {
        let data = pattern(512, 1000 + i);
        img.write_sectors(i * 2, &data).unwrap();
        model.write(i * 2, &data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn vci_matches_the_model(fixed in any::<bool>(), ops in proptest::collection::vec(op(), 1..120)) {
        let dir = temp_dir();
        let path = dir.path().join("c.vci");
        let params = CreateParams {
            size: SECTORS * 512,
            fixed,
            ..Default::default()
        };
        let mut img = Vci::create(&path, &params).unwrap();
        let mut model = Model::new(SECTORS);
        // More extents than a leaf holds: the tree needs internal nodes.
        fragment(&mut img, &mut model, LEAF_ENTRIES as u64 * 3);
        img.flush().unwrap();
        prop_assert!(img.tree_depth() >= 2, "depth {}", img.tree_depth());
        for op in ops {
            match op {
                Op::Write(l, n, seed) => {
                    let n = n.min(SECTORS - l);
                    let data = pattern(n as usize * 512, seed);
                    img.write_sectors(l, &data).unwrap();
                    model.write(l, &data);
                }
                Op::Discard(l, n) => {
                    let n = n.min(SECTORS - l);
                    img.discard_sectors(l, n).unwrap();
                    model.discard(l, n);
                }
                Op::Read(l, n) => {
                    let n = n.min(SECTORS - l);
                    let mut buf = vec![0xEEu8; n as usize * 512];
                    img.read_sectors(l, &mut buf).unwrap();
                    let s = l as usize * 512;
                    prop_assert!(buf[..] == model.data[s..s + buf.len()]);
                }
                Op::Flush => img.flush().unwrap(),
                Op::Reopen => {
                    Box::new(img).close().unwrap();
                    img = Vci::open(&path, &rw()).unwrap();
                }
            }
        }
        check_against(&mut img, &model);
        Box::new(img).close().unwrap();
        // A clean read-only open validates bitmap against tree, and agrees.
        let mut again = Vci::open(&path, &VciOptions::default()).unwrap();
        prop_assert!(!again.header().unclean);
        check_against(&mut again, &model);
    }
}

#[test]
fn tree_of_depth_three_survives_reopen() {
    let dir = temp_dir();
    let path = dir.path().join("deep.vci");
    // 107 * 204 extents fill two levels; one more needs a third.
    let extents = (LEAF_ENTRIES * cowdisk::formats::vci::INTERNAL_ENTRIES) as u64 + 1;
    let sectors = extents * 2;
    let params = CreateParams {
        size: sectors * 512,
        ..Default::default()
    };
    let mut img = Vci::create(&path, &params).unwrap();
    let one = vec![0x5Au8; 512];
    for i in 0..extents {
        img.write_sectors(i * 2, &one).unwrap();
    }
    img.flush().unwrap();
    assert_eq!(img.tree_depth(), 3);
    assert_eq!(img.extent_count() as u64, extents);
    Box::new(img).close().unwrap();
    let mut again = Vci::open(&path, &VciOptions::default()).unwrap();
    assert_eq!(again.tree_depth(), 3);
    assert_eq!(again.extent_count() as u64, extents);
    let mut buf = vec![0u8; 4 * 512];
    let last = (extents - 1) * 2;
    again.read_sectors(last - 2, &mut buf).unwrap();
    assert_eq!(&buf[..512], &one[..]);
    assert!(buf[512..1024].iter().all(|&b| b == 0));
    assert_eq!(&buf[1024..1536], &one[..]);
    assert_eq!(again.held_run(last + 1, 1).unwrap(), (false, 1));
}

#[test]
fn created_image_has_the_documented_layout() {
    let dir = temp_dir();
    let path = dir.path().join("new.vci");
    let uuid = [7u8; 16];
    let params = CreateParams {
        size: 1024 * 1024,
        uuid: Some(uuid),
        ..Default::default()
    };
    Box::new(Vci::create(&path, &params).unwrap())
        .close()
        .unwrap();
    let b = std::fs::read(&path).unwrap();
    // Worked out by hand from the module docs: signature, version, clean,
    // dynamic, bitmap at block 2, root right after the bitmap.
    assert_eq!(&b[0..8], &[0x56, 0x43, 0x49, 0, 1, 0, 0, 0]);
    assert_eq!(b[16], 0, "clean after close");
    assert_eq!(&b[17..21], &[1, 0, 0, 0]);
    let blocks = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let cblkmap = u32::from_le_bytes(b[37..41].try_into().unwrap()) as u64;
    assert_eq!(cblkmap, 1 + blocks.div_ceil(8).div_ceil(512));
    assert_eq!(u64::from_le_bytes(b[29..37].try_into().unwrap()), 2);
    let root = u64::from_le_bytes(b[21..29].try_into().unwrap());
    assert_eq!(root, 2 + cblkmap);
    assert_eq!(b[root as usize * 512], 2, "an empty leaf");
    assert_eq!(&b[41..57], &uuid);
    assert_eq!(u64::from_le_bytes(b[73..81].try_into().unwrap()), 1 << 20);
    // Bitmap magic and counts.
    let bm = 2 * 512;
    assert_eq!(&b[bm..bm + 4], &[0x56, 0x42, 0x4C, 0x4B]);
    let meta = u64::from_le_bytes(b[bm + 24..bm + 32].try_into().unwrap());
    assert_eq!(meta, root + 8);
    let d = Vci::open(&path, &VciOptions::default()).unwrap();
    assert_eq!(d.uuid(), Some(uuid));
    assert_eq!(d.byte_size(), 1 << 20);
}

#[test]
fn fixed_image_is_full_length_and_dynamic_grows() {
    let dir = temp_dir();
    let params = |fixed| CreateParams {
        size: 4 * 1024 * 1024,
        fixed,
        ..Default::default()
    };
    let fixed = dir.path().join("f.vci");
    let img = Vci::create(&fixed, &params(true)).unwrap();
    assert!(img.is_fixed() && !img.is_snapshot());
    assert_eq!(img.file_size(), img.header().blocks * 512);
    let dynamic = dir.path().join("d.vci");
    let mut img = Vci::create(&dynamic, &params(false)).unwrap();
    let small = img.file_size();
    assert!(small < img.header().blocks * 512 / 4);
    img.write_sectors(8000, &pattern(64 * 512, 3)).unwrap();
    img.flush().unwrap();
    assert!(img.file_size() > small);
}

#[test]
fn discarded_space_is_reused_after_a_flush() {
    let dir = temp_dir();
    let path = dir.path().join("r.vci");
    let params = CreateParams {
        size: SECTORS * 512,
        ..Default::default()
    };
    let mut img = Vci::create(&path, &params).unwrap();
    for round in 0..20u64 {
        img.write_sectors(0, &pattern(SECTORS as usize * 512, round))
            .unwrap();
        img.flush().unwrap();
        img.discard_sectors(0, SECTORS).unwrap();
        img.flush().unwrap();
    }
    // Twenty full rewrites fit a cache sized for one disk: space is reused.
    img.write_sectors(0, &pattern(SECTORS as usize * 512, 99))
        .unwrap();
    Box::new(img).close().unwrap();
    let d = Vci::open(&path, &VciOptions::default()).unwrap();
    let mut buf = vec![0u8; SECTORS as usize * 512];
    d.read_sectors(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(SECTORS as usize * 512, 99));
}

// ---------------------------------------------------------------------------
// Crash test: a writer process killed at a random moment.

const CRASH_OPS_PER_FLUSH: u64 = 16;

/// The writer's deterministic operations.
fn crash_op(seed: u64, i: u64) -> (bool, u64, u64, u64) {
    let mut x = seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let discard = next() % 5 == 0;
    let n = 1 + next() % 32;
    let lba = next() % (SECTORS - n);
    (discard, lba, n, next())
}

fn run_writer(path: &Path, seed: u64, limit: Option<u64>, mut acknowledged: impl FnMut(u64)) {
    let mut img = Vci::open(path, &rw()).unwrap();
    let mut i = 0;
    while limit.is_none_or(|l| i < l) {
        let (discard, lba, n, s) = crash_op(seed, i);
        if discard {
            img.discard_sectors(lba, n).unwrap();
        } else {
            img.write_sectors(lba, &pattern(n as usize * 512, s))
                .unwrap();
        }
        i += 1;
        if i % CRASH_OPS_PER_FLUSH == 0 {
            img.flush().unwrap();
            acknowledged(i);
        }
    }
    Box::new(img).close().unwrap();
}

/// In a normal run: the writer's work, checked against the model. Run as
/// the child of `killed_writer_*` (VCI_CRASH_CHILD set): writes forever,
/// printing each acknowledged flush, until killed.
#[test]
fn crash_writer() {
    match std::env::var("VCI_CRASH_CHILD") {
        Ok(spec) => {
            let (path, seed) = spec.split_once(',').unwrap();
            let seed: u64 = seed.parse().unwrap();
            use std::io::Write;
            run_writer(Path::new(path), seed, None, |i| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "flushed {i}").unwrap();
                out.flush().unwrap();
            });
        }
        Err(_) => {
            let dir = temp_dir();
            let path = dir.path().join("w.vci");
            let params = CreateParams {
                size: SECTORS * 512,
                ..Default::default()
            };
            drop(Vci::create(&path, &params).unwrap());
            run_writer(&path, 5, Some(100), |_| {});
            let model = model_after(5, 100);
            let mut img = Vci::open(&path, &VciOptions::default()).unwrap();
            check_against(&mut img, &model);
        }
    }
}

fn model_after(seed: u64, ops: u64) -> Model {
    let mut m = Model::new(SECTORS);
    for i in 0..ops {
        let (discard, lba, n, s) = crash_op(seed, i);
        if discard {
            m.discard(lba, n);
        } else {
            m.write(lba, &pattern(n as usize * 512, s));
        }
    }
    m
}

#[test]
fn killed_writer_leaves_an_unclean_image_that_repairs_to_an_acknowledged_state() {
    let exe = std::env::current_exe().unwrap();
    for (round, wait_flushes) in [(0u64, 1u64), (1, 3), (2, 6), (3, 10)] {
        let dir = temp_dir();
        let path = dir.path().join("crash.vci");
        let params = CreateParams {
            size: SECTORS * 512,
            ..Default::default()
        };
        drop(Vci::create(&path, &params).unwrap());
        let seed = 1000 + round;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_writer", "--nocapture", "--test-threads=1"])
            .env("VCI_CRASH_CHILD", format!("{},{seed}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acknowledged = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("flushed ") {
                acknowledged = n.trim().parse().unwrap();
                if acknowledged >= wait_flushes * CRASH_OPS_PER_FLUSH {
                    break;
                }
            }
        }
        assert!(acknowledged > 0, "the writer never flushed");
        // Let it run into the next batch (sometimes into a commit), then kill.
        std::thread::sleep(std::time::Duration::from_millis(round * 3));
        child.kill().unwrap();
        child.wait().unwrap();
        // Flushes it printed after we stopped reading also count.
        for line in lines.map_while(|l| l.ok()) {
            if let Some(n) = line.strip_prefix("flushed ") {
                acknowledged = n.trim().parse().unwrap();
            }
        }

        // The flag is seen: refused without repair.
        let err = Vci::open(&path, &VciOptions::default())
            .err()
            .expect("an unclean image must be refused");
        assert_eq!(err.code(), code::CORRUPT);
        assert!(err.to_string().contains("not closed cleanly"), "{err}");

        // Repair: the state at the last acknowledged flush, where each
        // sector may also show a write (or discard) issued after it.
        let repair = VciOptions {
            writable: false,
            repair: true,
        };
        let img = Vci::open(&path, &repair).unwrap();
        let base = model_after(seed, acknowledged);
        let mut allowed: Vec<Vec<Vec<u8>>> = (0..SECTORS as usize)
            .map(|s| vec![base.data[s * 512..(s + 1) * 512].to_vec()])
            .collect();
        for i in acknowledged..acknowledged + CRASH_OPS_PER_FLUSH {
            let (discard, lba, n, s) = crash_op(seed, i);
            let data = pattern(n as usize * 512, s);
            for k in 0..n as usize {
                let v = if discard {
                    vec![0u8; 512]
                } else {
                    data[k * 512..(k + 1) * 512].to_vec()
                };
                allowed[lba as usize + k].push(v);
            }
        }
        let mut all = vec![0u8; SECTORS as usize * 512];
        img.read_sectors(0, &mut all).unwrap();
        for s in 0..SECTORS as usize {
            let got = &all[s * 512..(s + 1) * 512];
            assert!(
                allowed[s].iter().any(|v| v == got),
                "round {round}: sector {s} holds neither its state at flush {acknowledged} \
                 nor a later write"
            );
        }
        drop(img);
        // Repaired for writing: the bitmap is rebuilt, and a clean close
        // leaves an image that opens normally with the same contents.
        let writable_repair = VciOptions {
            writable: true,
            repair: true,
        };
        Box::new(Vci::open(&path, &writable_repair).unwrap())
            .close()
            .unwrap();
        let clean = Vci::open(&path, &VciOptions::default()).unwrap();
        let mut again = vec![0u8; SECTORS as usize * 512];
        clean.read_sectors(0, &mut again).unwrap();
        assert!(again == all, "round {round}: repair changed the contents");
    }
}

#[test]
fn in_process_crash_after_flush_repairs_to_the_flushed_state() {
    let dir = temp_dir();
    let path = dir.path().join("p.vci");
    let params = CreateParams {
        size: SECTORS * 512,
        ..Default::default()
    };
    let mut img = Vci::create(&path, &params).unwrap();
    let first = pattern(100 * 512, 1);
    img.write_sectors(10, &first).unwrap();
    img.flush().unwrap();
    // Unflushed: new blocks and a discard; the committed tree knows neither.
    img.write_sectors(500, &pattern(50 * 512, 2)).unwrap();
    img.discard_sectors(10, 20).unwrap();
    img.simulate_crash();
    let mut d = Vci::open(
        &path,
        &VciOptions {
            writable: false,
            repair: true,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 100 * 512];
    d.read_sectors(10, &mut buf).unwrap();
    assert_eq!(buf, first);
    assert_eq!(d.held_run(500, 50).unwrap(), (false, 50));
}
