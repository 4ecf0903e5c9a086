//! Reading file bytes into whatever buffer the caller passes, at the speed
//! of the best-placed one.
//!
//! The kernel copies a read from the page cache with `rep movsb`, which on
//! this project's machines (AMD EPYC; the benchmark shows it) runs two to
//! four times slower when the destination sits a few bytes past the source
//! within a page: when `(destination address - file offset) mod 4096` is
//! between 1 and 31. That is exactly where a legacy caller's buffer lands:
//! glibc's `malloc` of a 1 MiB page buffer returns an address 16 bytes past
//! a page boundary, and data blocks start on page boundaries in the file.
//!
//! Such reads go through a per-thread bounce buffer placed half a page away
//! from the file offset's place in its page, so neither the kernel's copy
//! into it nor the copy out of it has the slow placement; the chunks are
//! small enough to stay in the cache between the two copies. Every other
//! read goes straight into the caller's buffer. Source images do better
//! still when their bytes are in the page cache: [`SourceFile`] copies
//! those from a read-only map of the file (`source.rs`).

mod source;

pub use source::SourceFile;

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PAGE: usize = 4096;
/// Placements `(address - offset) mod PAGE` below this (and above 0) are
/// the slow ones.
const SLOW_BELOW: usize = 32;
/// Shorter reads go straight in: the second copy would cost more than the
/// slow placement saves.
const BOUNCE_MIN: usize = 16 * 1024;
/// Bytes per trip through the bounce buffer (fits the L2 cache).
const BOUNCE_CHUNK: usize = 128 * 1024;

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether a read of `len` bytes at file `offset` into memory at `address`
/// is better made through the bounce buffer.
pub fn needs_bounce(address: usize, offset: u64, len: usize) -> bool {
    let placement = address.wrapping_sub(offset as usize) % PAGE;
    len >= BOUNCE_MIN && (1..SLOW_BELOW).contains(&placement)
}

/// A `len`-byte slice of `space` (grown as needed) placed half a page from
/// file `offset`'s place in its page: where the kernel's copy of a read at
/// `offset` into it is fast, and a copy out of it to a slowly placed
/// buffer too.
pub fn well_placed(space: &mut Vec<u8>, offset: u64, len: usize) -> &mut [u8] {
    if space.len() < len + PAGE {
        space.resize(len + PAGE, 0);
    }
    let wanted = (offset as usize).wrapping_add(PAGE / 2) % PAGE;
    let skip = (wanted + PAGE - space.as_ptr() as usize % PAGE) % PAGE;
    &mut space[skip..skip + len]
}

/// `FileExt::read_exact_at`, fast for any placement of `buf`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if !needs_bounce(buf.as_ptr() as usize, offset, buf.len()) {
        return file.read_exact_at(buf, offset);
    }
    BOUNCE.with(|cell| {
        // Only a read made from inside a read on the same thread finds the
        // buffer taken; it goes straight in.
        let Ok(mut bounce) = cell.try_borrow_mut() else {
            return file.read_exact_at(buf, offset);
        };
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = (buf.len() - done).min(BOUNCE_CHUNK);
            let part = well_placed(&mut bounce, at, n);
            file.read_exact_at(part, at)?;
            buf[done..done + n].copy_from_slice(part);
            done += n;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placement_and_length_reads_the_file_bytes() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..600_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::io::Write::write_all(&mut file, &data).unwrap();
        let mut backing = vec![0u8; 300_000];
        let mut bounced = 0;
        for misplace in [0usize, 1, 15, 16, 31, 32, 512, 4095] {
            for (offset, len) in [
                (0u64, 200_000usize),
                (4096, 16 * 1024),
                (77, 131_073),
                (512, 1000),
            ] {
                let start = (PAGE - backing.as_ptr() as usize % PAGE) % PAGE + misplace;
                let buf = &mut backing[start..start + len];
                buf.fill(0xEE);
                if needs_bounce(buf.as_ptr() as usize, offset, len) {
                    bounced += 1;
                }
                read_exact_at(&file, buf, offset).unwrap();
                assert!(
                    buf == &data[offset as usize..offset as usize + len],
                    "{misplace} {offset} {len}"
                );
            }
        }
        assert!(bounced >= 6, "the bounce path ran {bounced} times");
        // Past the end: the same error as a plain read.
        let mut buf = vec![0u8; 64 * 1024 + 1];
        let start = 1;
        let err = read_exact_at(&file, &mut buf[start..], 590_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
