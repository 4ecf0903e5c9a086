//! Bad input for the UML COW parser: random bytes, and valid headers of
//! every layout with bytes flipped, set or cut off. Every outcome must be
//! an `Error` or a successful open — never a panic, hang or huge
//! allocation (a header claiming a huge disk must not allocate its bitmap).

mod support;

use cowdisk::formats::umlcow::{self, MAGIC};
use proptest::prelude::*;

/// A small valid v3 file (the layout `uml_mkcow` writes): 64 KiB disk,
/// 512-byte sectors, 512-byte alignment, a few bits set.
fn v3() -> Vec<u8> {
    let size: u64 = 64 * 1024;
    let mut h = vec![0u8; 4608 + 512 + size as usize];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[12..20].copy_from_slice(&size.to_be_bytes());
    h[20..24].copy_from_slice(&512u32.to_be_bytes());
    h[24..28].copy_from_slice(&512u32.to_be_bytes());
    h[32..40].copy_from_slice(b"/nowhere");
    h[4608] = 0b1011_0001;
    h
}

/// A small valid v2 file in QEMU's layout.
fn v2_qemu() -> Vec<u8> {
    let size: u64 = 32 * 1024;
    let mut h = vec![0u8; 1536 + size as usize];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    h[8..12].copy_from_slice(b"base");
    h[1040..1048].copy_from_slice(&size.to_be_bytes());
    h[1048..1052].copy_from_slice(&512u32.to_be_bytes());
    h[1056] = 0xFF;
    h
}

#[test]
fn the_seeds_are_valid() {
    assert!(umlcow::fuzz_one(&v3()));
    assert!(umlcow::fuzz_one(&v2_qemu()));
}

#[test]
fn huge_claimed_size_is_refused_without_allocating() {
    let mut f = v3();
    f[12..20].copy_from_slice(&(1u64 << 62).to_be_bytes());
    let e = umlcow::parse_header(&f, f.len() as u64).unwrap_err();
    assert!(matches!(
        e.code(),
        cowdisk::error::code::UNSUPPORTED | cowdisk::error::code::CORRUPT
    ));
    assert!(!umlcow::fuzz_one(&f));
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Offsets mostly in the header (where the parser looks), some anywhere.
    let at = prop_oneof![3 => 0..4200usize, 1 => any::<usize>()];
    prop_oneof![
        4 => (at.clone(), 1..=255u8).prop_map(|(a, b)| Mutation::Flip(a, b)),
        4 => (at, any::<u8>()).prop_map(|(a, b)| Mutation::Set(a, b)),
        1 => (0..6000usize).prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut f: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        match *m {
            Mutation::Flip(a, b) => {
                let n = f.len();
                if n > 0 {
                    f[a % n] ^= b;
                }
            }
            Mutation::Set(a, b) => {
                let n = f.len();
                if n > 0 {
                    f[a % n] = b;
                }
            }
            Mutation::Truncate(n) => f.truncate(n),
        }
    }
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn mutated_v3_never_panics(ms in proptest::collection::vec(mutation(), 1..6)) {
        umlcow::fuzz_one(&mutate(v3(), &ms));
    }

    #[test]
    fn mutated_v2_qemu_never_panics(ms in proptest::collection::vec(mutation(), 1..6)) {
        umlcow::fuzz_one(&mutate(v2_qemu(), &ms));
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic(
        version in 0u32..5,
        rest in proptest::collection::vec(any::<u8>(), 0..5000),
    ) {
        let mut f = MAGIC.to_be_bytes().to_vec();
        f.extend_from_slice(&version.to_be_bytes());
        f.extend_from_slice(&rest);
        umlcow::fuzz_one(&f);
        let _ = umlcow::parse_header(&f, f.len() as u64);
    }
}
