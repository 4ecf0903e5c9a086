//! FilesystemView against a naive per-sector model: a sector in a free
//! run reads as zeros with status NotAlloc, every other sector as the disk
//! below; block_status, status_run and reads_as_zeros agree with that.

use cowdisk::fs::{Analysis, FilesystemView, FreeMap, Report};
use cowdisk::{Disk, MemDisk, SectorStatus};

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The model's (bytes, status) of sector `s`.
fn model_sector(
    data: &[u8],
    status: &[SectorStatus],
    free: &[bool],
    s: usize,
) -> (Vec<u8>, SectorStatus) {
    if free[s] {
        (vec![0; 512], SectorStatus::NotAlloc)
    } else {
        (data[s * 512..(s + 1) * 512].to_vec(), status[s])
    }
}

fn combine(a: SectorStatus, b: SectorStatus) -> SectorStatus {
    use SectorStatus::*;
    if a == Normal || b == Normal {
        Normal
    } else if a == Blank || b == Blank {
        Blank
    } else {
        NotAlloc
    }
}

#[test]
fn view_reads_match_a_per_sector_model() {
    for seed in 1..=40u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let sectors = 64 + (next(&mut rng) % 400) as usize;
        let mut data = vec![0u8; sectors * 512];
        let mut status = vec![SectorStatus::Normal; sectors];
        for s in 0..sectors {
            status[s] = match next(&mut rng) % 4 {
                0 => SectorStatus::NotAlloc,
                1 => SectorStatus::Blank,
                _ => SectorStatus::Normal,
            };
            if status[s] == SectorStatus::Normal {
                for b in &mut data[s * 512..(s + 1) * 512] {
                    *b = next(&mut rng) as u8 | 1;
                }
            }
        }
        let mut runs = Vec::new();
        let mut free = vec![false; sectors];
        for _ in 0..(next(&mut rng) % 12) {
            let start = (next(&mut rng) % sectors as u64) as usize;
            let len = 1 + (next(&mut rng) % 40) as usize;
            let len = len.min(sectors - start);
            runs.push((start as u64, len as u64));
            free[start..start + len].iter_mut().for_each(|f| *f = true);
        }
        let disk = MemDisk::new(data.clone(), status.clone()).unwrap();
        let analysis = Analysis {
            report: Report::default(),
            free: FreeMap::from_runs(runs),
        };
        let (view, _) = FilesystemView::from_analysis(Box::new(disk), analysis);
        assert_eq!(view.sector_count(), sectors as u64);
        for _ in 0..60 {
            let lba = (next(&mut rng) % sectors as u64) as usize;
            let n = 1 + (next(&mut rng) % (sectors - lba) as u64) as usize;
            let mut expect = Vec::new();
            let mut expect_status = None;
            for s in lba..lba + n {
                let (bytes, st) = model_sector(&data, &status, &free, s);
                expect.extend(bytes);
                expect_status = Some(expect_status.map_or(st, |e| combine(e, st)));
            }
            let mut buf = vec![0xAAu8; n * 512];
            let got = view.read_sectors(lba as u64, &mut buf).unwrap();
            assert_eq!(got, expect_status.unwrap(), "seed {seed} read {lba}+{n}");
            assert!(buf == expect, "seed {seed} bytes {lba}+{n}");
            assert_eq!(
                view.block_status(lba as u64, n as u64).unwrap(),
                expect_status.unwrap(),
                "seed {seed} block_status {lba}+{n}"
            );
            assert_eq!(
                view.reads_as_zeros(lba as u64, n as u64).unwrap(),
                expect.iter().all(|&b| b == 0),
                "seed {seed} zeros {lba}+{n}"
            );
            let (st, run) = view.status_run(lba as u64, n as u64).unwrap();
            assert!(run >= 1 && run as usize <= n);
            for s in lba..lba + run as usize {
                assert_eq!(
                    model_sector(&data, &status, &free, s).1,
                    st,
                    "seed {seed} run at {s}"
                );
            }
        }
        assert!(view.read_sectors(sectors as u64, &mut [0u8; 512]).is_err());
    }
}
