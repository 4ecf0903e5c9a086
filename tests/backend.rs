//! The built-in backends on the Rust side: probe order, caps, and the
//! generic "held" answer of read-only formats, checked against a raw file
//! whose bytes are known.

mod support;

use cowdisk::error::code;
use cowdisk::ffi::builtin::{builtin_backends, caps, find_builtin, open_flags};
use support::{assert_unchanged, fingerprint, pattern, temp_dir};

#[test]
fn probe_order_puts_raw_last_and_our_formats_before_it() {
    let names: Vec<&str> = builtin_backends().iter().map(|b| b.name()).collect();
    assert_eq!(names.last(), Some(&"raw"));
    let raw_at = names.len() - 1;
    for n in ["cow", "vci", "vdi", "parallels"] {
        let at = names.iter().position(|x| *x == n).unwrap();
        assert!(at < raw_at, "{n} must be probed before raw");
    }
    let vci = find_builtin("vci").unwrap();
    assert_eq!(
        vci.caps() & (caps::CREATE_FIXED | caps::CREATE_DYNAMIC | caps::DISCARD | caps::WRITE),
        caps::CREATE_FIXED | caps::CREATE_DYNAMIC | caps::DISCARD | caps::WRITE
    );
    assert_eq!(find_builtin("cow").unwrap().extensions(), &["cow"]);
    assert!(find_builtin("nope").is_none());
}

#[test]
fn raw_through_the_backend_is_read_only_and_fully_held() {
    let dir = temp_dir();
    let path = dir.path().join("r.img");
    let bytes = pattern(40 * 512, 3);
    std::fs::write(&path, &bytes).unwrap();
    let print = fingerprint(&path);
    let raw = find_builtin("raw").unwrap();
    assert!(raw.probe(&path));
    assert_eq!(
        raw.open(&path, open_flags::READ_WRITE)
            .err()
            .unwrap()
            .code(),
        code::READ_ONLY
    );
    assert_eq!(
        raw.open(&path, 0x100).err().unwrap().code(),
        code::INVALID_ARG
    );
    let mut img = raw.open(&path, 0).unwrap();
    assert_eq!(img.held_run(5, 35).unwrap(), (true, 35));
    let mut buf = vec![0u8; 40 * 512];
    img.read_sectors(0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
    assert_eq!(
        img.write_sectors(0, &[0u8; 512]).unwrap_err().code(),
        code::READ_ONLY
    );
    img.close().unwrap();
    assert!(!find_builtin("vci").unwrap().probe(&path));
    assert!(!find_builtin("cow").unwrap().probe(&path));
    assert_unchanged(&path, &print);
}
