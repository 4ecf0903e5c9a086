//! Every C-visible number (src/numbers.rs) against the committed header,
//! over all values and both ways: each table entry is `#define`d in
//! include/cowdisk.h with the same value (codes and masks in hex), and the
//! header defines no number of those families that the table lacks. Plus
//! the enums' own invariants and the C error strings for every code.

use std::collections::HashMap;
use std::ffi::CStr;

use cowdisk::numbers::{DriveType, ErrorCode, SectorStatus, ALL_C_DEFINES};

const FAMILIES: &[&str] = &[
    "COW_ERR_",
    "VDD_TYPE_",
    "VDDR_RSLT_",
    "COW_OPEN_",
    "COW_CAP_",
    "COW_IMAGE_",
    "COW_OPT_",
    "COW_CLONE_",
    "COW_EXTENT_",
    "COW_LAST_ERROR",
    "COW_BACKEND_VERSION",
    "COW_DEFAULT_GRANULARITY",
];

/// The header's numeric `#define`s: name -> (value, written in hex).
fn header_defines() -> HashMap<String, (u64, bool)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/cowdisk.h");
    let text = std::fs::read_to_string(path).expect("read include/cowdisk.h");
    let mut found = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok().map(|v| (v, true)),
            None => value.parse::<u64>().ok().map(|v| (v, false)),
        };
        if let Some(parsed) = parsed {
            found.insert(name.to_string(), parsed);
        }
    }
    found
}

#[test]
fn every_table_entry_is_defined_in_the_header_with_its_value() {
    let header = header_defines();
    let mut count = 0;
    for group in ALL_C_DEFINES {
        for define in group.iter() {
            let (value, hex) = header
                .get(define.name)
                .unwrap_or_else(|| panic!("{} is not #defined in the header", define.name));
            assert_eq!(*value, define.value, "{}", define.name);
            assert_eq!(
                *hex,
                define.hex && define.value != 0,
                "{} radix",
                define.name
            );
            count += 1;
        }
    }
    assert!(count >= 59, "only {count} numbers in the table");
}

#[test]
fn the_header_defines_no_number_the_table_lacks() {
    let known: Vec<&str> = ALL_C_DEFINES
        .iter()
        .flat_map(|g| g.iter().map(|d| d.name))
        .collect();
    for name in header_defines().keys() {
        if FAMILIES.iter().any(|f| name.starts_with(f)) {
            assert!(
                known.contains(&name.as_str()),
                "{name} is in the header only"
            );
        }
    }
}

#[test]
fn each_enum_value_is_unique_and_round_trips() {
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(ErrorCode::from_u32(*code as u32), Some(*code));
        assert!(!code.describe().is_empty());
        for other in &ErrorCode::ALL[i + 1..] {
            assert_ne!(*code as u32, *other as u32);
            assert_ne!(code.describe(), other.describe());
        }
        assert!(code.c_name().starts_with("COW_ERR_"));
    }
    for (i, t) in DriveType::ALL.iter().enumerate() {
        assert_eq!(DriveType::from_u32(*t as u32), Some(*t));
        assert_eq!(*t as usize, i, "drive types are numbered in order");
    }
    for s in SectorStatus::ALL {
        assert_eq!(SectorStatus::from_u32(*s as u32), Some(*s));
    }
    assert_eq!(ErrorCode::from_u32(0x60014), None);
    // The legacy values, fixed by the legacy cow.h.
    assert_eq!(ErrorCode::Invhandle as u32, 0x60001);
    assert_eq!(ErrorCode::Invalidmove as u32, 0x60006);
}

#[test]
fn every_code_has_its_fixed_text_in_c() {
    for code in ErrorCode::ALL {
        let text = cowdisk::ffi::api::COW_GetErrorString(*code as u32);
        // SAFETY: the library returns a NUL-terminated static string.
        let text = unsafe { CStr::from_ptr(text.cast_const()) }
            .to_str()
            .unwrap();
        assert_eq!(text, code.describe());
    }
    let text = cowdisk::ffi::api::COW_GetErrorString(0x12345);
    // SAFETY: as above.
    assert_eq!(
        unsafe { CStr::from_ptr(text.cast_const()) }
            .to_str()
            .unwrap(),
        "unknown error code"
    );
}
