//! A real C function-pointer table (backend.c, compiled by cc) registered
//! with the library and driven through it: VDDR_Open probes it and reads
//! through it, absent sectors come back NOTALLOC, an overlay on it edits
//! without touching the file, and closing calls the C pfnClose once. The
//! expected bytes and statuses are the file's, written here.

use std::ffi::CString;
use std::os::raw::c_void;

use cowdisk::ffi::api::{
    COW_Close, COW_CreateCowOverlay, COW_GetDriveType, COW_GetLastError, COW_InsertSectors,
    COW_ReadSectors, COW_WriteSectors, VDDR_Open,
};
use cowdisk::ffi::backend::{COW_RegisterBackend, COW_UnregisterBackend};
use cowdisk::numbers::{DriveType, ErrorCode, SectorStatus};
use cowdisk_c_backend_test::{cmem_backend, cmem_close_calls, MAGIC};

const SECTORS: usize = 40;

fn present(s: usize) -> bool {
    s % 7 != 3 && !(20..26).contains(&s)
}

fn sector_byte(s: usize, i: usize) -> u8 {
    (s * 13 + i * 7 + 1) as u8 | 1
}

#[test]
fn a_c_table_serves_reads_and_an_overlay_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.cmem");
    let mut file = vec![0u8; 512 + SECTORS * 512];
    file[..8].copy_from_slice(MAGIC);
    for s in 0..SECTORS {
        file[16 + s] = u8::from(present(s));
        for i in 0..512 {
            file[512 + s * 512 + i] = sector_byte(s, i);
        }
    }
    std::fs::write(&path, &file).unwrap();
    let c_path = CString::new(path.to_str().unwrap()).unwrap();

    // SAFETY: the table and the calls follow the C API's contract.
    unsafe {
        let table = cmem_backend();
        assert!(!table.is_null());
        assert_eq!(COW_RegisterBackend(table), 0);
        let disk = VDDR_Open(c_path.as_ptr(), 0);
        assert!(!disk.is_null(), "VDDR_Open: {}", COW_GetLastError());
        assert_eq!(COW_GetDriveType(disk), DriveType::Custom as u32);

        // Every sector: the file's bytes where present, zeros and NOTALLOC
        // where absent.
        let mut buf = vec![0u8; 512];
        for s in 0..SECTORS {
            let rc = COW_ReadSectors(disk, buf.as_mut_ptr().cast::<c_void>(), s as u64, 1);
            if present(s) {
                assert_eq!(rc as u32, SectorStatus::Normal as u32, "sector {s}");
                assert_eq!(buf, file[512 + s * 512..512 + (s + 1) * 512], "sector {s}");
            } else {
                assert_eq!(rc as u32, SectorStatus::NotAlloc as u32, "sector {s}");
                assert!(buf.iter().all(|&b| b == 0), "sector {s}");
            }
        }

        // An overlay on it: insert 2 sectors at 0, write one inside the
        // absent run; the file is never written.
        let ov = COW_CreateCowOverlay(disk);
        assert!(!ov.is_null());
        let cow = ov.cast();
        assert_eq!(COW_InsertSectors(cow, 0, 2), 0);
        let patch = vec![0xEEu8; 512];
        assert_eq!(
            COW_WriteSectors(cow, patch.as_ptr().cast_mut().cast::<c_void>(), 2 + 22, 1),
            SectorStatus::Normal as i32
        );
        let rc = COW_ReadSectors(ov, buf.as_mut_ptr().cast::<c_void>(), 2 + 22, 1);
        assert_eq!(rc as u32, SectorStatus::Normal as u32);
        assert_eq!(buf, patch);
        // Its neighbours in the absent run stay NOTALLOC (sector-exact).
        let rc = COW_ReadSectors(ov, buf.as_mut_ptr().cast::<c_void>(), 2 + 21, 1);
        assert_eq!(rc as u32, SectorStatus::NotAlloc as u32);
        let mut two = vec![0xAAu8; 1024];
        let rc = COW_ReadSectors(ov, two.as_mut_ptr().cast::<c_void>(), 0, 2);
        assert_eq!(rc as u32, SectorStatus::NotAlloc as u32);
        assert!(two.iter().all(|&b| b == 0));

        let closes = cmem_close_calls();
        assert!(COW_Close(ov).is_null());
        assert_eq!(COW_GetLastError(), ErrorCode::None as u32);
        assert_eq!(cmem_close_calls(), closes + 1, "pfnClose ran once");
        assert_eq!(COW_UnregisterBackend(table), 0);
    }
    assert_eq!(std::fs::read(&path).unwrap(), file, "the file was written");
}
