//! Bad input for the VCI parser: random bytes, and valid images (with a
//! tree of several levels) with bytes flipped, set or cut off in the header,
//! bitmap and tree. Every outcome must be an `Error` or a successful open —
//! never a panic, hang or huge allocation.

mod support;

use cowdisk::disk::{ImageFile, WritableDisk};
use cowdisk::formats::vci::{self, Vci, LEAF_ENTRIES};
use cowdisk::formats::CreateParams;
use proptest::prelude::*;
use std::sync::OnceLock;

/// A valid image with 2 levels (more extents than a leaf), closed cleanly,
/// and where its root node starts.
fn seed() -> &'static (Vec<u8>, usize) {
    static SEED: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    SEED.get_or_init(|| {
        let dir = support::temp_dir();
        let path = dir.path().join("seed.vci");
        let params = CreateParams {
            size: 1024 * 512,
            ..Default::default()
        };
        let mut img = Vci::create(&path, &params).unwrap();
        for i in 0..(LEAF_ENTRIES as u64 + 20) {
            img.write_sectors(i * 3, &[0x42u8; 512]).unwrap();
        }
        img.flush().unwrap();
        assert_eq!(img.tree_depth(), 2);
        let root = img.header().root as usize * 512;
        Box::new(img).close().unwrap();
        (std::fs::read(&path).unwrap(), root)
    })
}

#[test]
fn the_seed_is_valid() {
    assert!(vci::fuzz_one(&seed().0));
}

#[test]
fn unclean_seed_opens_only_with_repair() {
    let mut f = seed().0.clone();
    f[16] = 1;
    let dir = support::temp_dir();
    let path = dir.path().join("u.vci");
    std::fs::write(&path, &f).unwrap();
    assert!(Vci::open(&path, &vci::VciOptions::default()).is_err());
    let repair = vci::VciOptions {
        writable: false,
        repair: true,
    };
    assert!(Vci::open(&path, &repair).is_ok());
}

#[test]
fn a_tree_loop_is_refused() {
    // Point the root's first child at the root itself.
    let (mut f, root) = seed().clone();
    let root_block = (root / 512) as u64;
    f[root + 1 + 12..root + 1 + 20].copy_from_slice(&root_block.to_le_bytes());
    let dir = support::temp_dir();
    let path = dir.path().join("loop.vci");
    std::fs::write(&path, &f).unwrap();
    let e = Vci::open(&path, &vci::VciOptions::default()).err().unwrap();
    assert_eq!(e.code(), cowdisk::error::code::CORRUPT);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
}

fn mutate(mut f: Vec<u8>, root: usize, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        // Offsets below 2048 hit header/bitmap; others land in the tree.
        let pos = |a: usize, n: usize| {
            if a.is_multiple_of(2) {
                (a / 2) % 2048
            } else {
                (root + a / 2) % n
            }
        };
        match *m {
            Mutation::Flip(a, b) => {
                let n = f.len();
                if n > 0 {
                    let p = pos(a, n) % n;
                    f[p] ^= b;
                }
            }
            Mutation::Set(a, b) => {
                let n = f.len();
                if n > 0 {
                    let p = pos(a, n) % n;
                    f[p] = b;
                }
            }
            Mutation::Truncate(n) => {
                let keep = n % (f.len() + 1);
                f.truncate(keep);
            }
        }
    }
    f
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0..40000usize, 1..=255u8).prop_map(|(a, b)| Mutation::Flip(a, b)),
        4 => (0..40000usize, any::<u8>()).prop_map(|(a, b)| Mutation::Set(a, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(ms in proptest::collection::vec(mutation(), 1..5)) {
        let (f, root) = seed();
        vci::fuzz_one(&mutate(f.clone(), *root, &ms));
    }

    #[test]
    fn random_headers_never_panic(rest in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let mut f = vec![0x56, 0x43, 0x49, 0, 1, 0, 0, 0];
        f.extend_from_slice(&rest);
        vci::fuzz_one(&f);
        let _ = vci::parse_header(&f, f.len() as u64);
    }
}
