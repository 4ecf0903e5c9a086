//! A source image file: read-only, with reads at memory speed into any
//! buffer when the bytes are in the page cache.
//!
//! A read into a buffer the kernel copies slowly (see `file_io`: a `malloc`
//! block 16 bytes past a page boundary) costs the kernel's copy into a
//! bounce buffer plus ours out of it: about half the speed of a read into
//! an aligned buffer. When the bytes are already in memory, copying them
//! from a read-only map of the file costs one copy, at `memcpy` speed,
//! whatever the buffer's placement (the benchmark shows both).
//!
//! A map turns an I/O error while faulting a page in into SIGBUS, which
//! would end the caller's process where `pread` returns EIO: a real risk
//! for an imaging tool reading failing media. So the map is only read when
//! `mincore` says every page of the range is resident, i.e. no page needs
//! I/O; anything else, and every read into a well-placed buffer, goes
//! through `pread` (via `file_io`). What remains is a race: a source file
//! truncated by another process during the microseconds of the copy ends
//! the process with SIGBUS (as it would in git or ripgrep, which map files
//! the same way). Sources are opened read-only and are not expected to
//! change while read; `COWDISK_NO_MMAP=1` in the environment turns the map
//! off (reads into slowly placed buffers then run at the bounce buffer's
//! speed).
//!
//! The only `unsafe` outside the C layer lives here: mapping the file and
//! asking `mincore` about the map.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::sync::OnceLock;

use memmap2::Mmap;

use super as file_io;

const PAGE: usize = 4096;

/// A source image's file (read-only); derefs to the `File`.
#[derive(Debug)]
pub struct SourceFile {
    file: File,
    /// The map, made at the first read that can use it (`None` when the
    /// file cannot be mapped or maps are turned off).
    map: OnceLock<Option<Mmap>>,
}

impl Deref for SourceFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl std::os::fd::AsFd for SourceFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<File> for SourceFile {
    fn from(file: File) -> SourceFile {
        SourceFile::new(file)
    }
}

fn maps_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var_os("COWDISK_NO_MMAP").is_none_or(|v| v == "0"))
}

impl SourceFile {
    pub fn new(file: File) -> SourceFile {
        SourceFile {
            file,
            map: OnceLock::new(),
        }
    }

    /// `FileExt::read_exact_at`, fast for any placement of `buf`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if file_io::needs_bounce(buf.as_ptr() as usize, offset, buf.len())
            && self.copy_resident(buf, offset)
        {
            return Ok(());
        }
        file_io::read_exact_at(&self.file, buf, offset)
    }

    fn mapped(&self) -> Option<&Mmap> {
        self.map
            .get_or_init(|| {
                if !maps_allowed() {
                    return None;
                }
                // SAFETY: a read-only, shared map of a file this library
                // opened read-only and never writes; its bytes are only
                // copied out, after `mincore` found them resident (see the
                // module documentation for the truncation race).
                let map = unsafe { Mmap::map(&self.file) }.ok()?;
                Some(map)
            })
            .as_ref()
    }

    /// Copies `[offset, offset + buf.len())` from the map when it lies
    /// inside it and every page is resident; false (nothing copied) when
    /// not.
    fn copy_resident(&self, buf: &mut [u8], offset: u64) -> bool {
        let Some(map) = self.mapped() else {
            return false;
        };
        let Ok(start) = usize::try_from(offset) else {
            return false;
        };
        let Some(end) = start.checked_add(buf.len()).filter(|&e| e <= map.len()) else {
            return false;
        };
        if !resident(map, start, end) {
            return false;
        }
        buf.copy_from_slice(&map[start..end]);
        true
    }
}

/// Whether every page of `map[start..end]` is in the page cache.
fn resident(map: &Mmap, start: usize, end: usize) -> bool {
    let first = start - start % PAGE;
    let pages = (end - first).div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `first` is page-aligned inside the map (the map starts on a
    // page), the range lies inside the map, and `vec` holds one byte per
    // page of it.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(first) as *mut libc::c_void,
            end - first,
            vec.as_mut_ptr(),
        )
    };
    rc == 0 && vec.iter().all(|v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_equal_the_files_bytes_resident_or_not_at_every_placement() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        file.write_all(&data).unwrap();
        let source = SourceFile::new(file);
        let mut backing = vec![0u8; 1 << 21];
        let mut from_map = 0;
        for past in [0usize, 1, 16, 31, 32, 512] {
            for (offset, len) in [
                (0u64, 1 << 20),
                (4096, 65_536),
                (77, 300_001),
                (2_900_000, 100_000),
            ] {
                let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE + past;
                let buf = &mut backing[start..start + len];
                buf.fill(0xEE);
                if file_io::needs_bounce(buf.as_ptr() as usize, offset, len)
                    && source.copy_resident(buf, offset)
                {
                    from_map += 1;
                }
                buf.fill(0xEE);
                source.read_exact_at(buf, offset).unwrap();
                assert!(
                    buf == &data[offset as usize..offset as usize + len],
                    "{past} {offset} {len}"
                );
            }
        }
        // The file was just written: its pages are resident, and the
        // slowly placed reads came from the map.
        assert!(from_map >= 4, "the map served {from_map} reads");
        // Past the end: the plain read's error.
        let mut buf = vec![0u8; 1 << 20];
        let err = source.read_exact_at(&mut buf[1..], 2_500_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
