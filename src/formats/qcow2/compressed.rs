//! Compressed clusters: finding a compressed cluster's stored bytes and
//! inflating it, one cluster cached.

use std::sync::Arc;

use super::layout::{compressed_offset_bits, COPIED, L2_COMPRESSED};
use super::Qcow2Disk;
use crate::disk::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::formats::inflate::inflate_exact;

impl Qcow2Disk {
    /// Inflates the compressed cluster with L2 descriptor `descriptor`.
    pub(super) fn inflate_cluster(&self, descriptor: u64) -> Result<Arc<[u8]>> {
        if let Some(cluster) = self.last_inflated.get(descriptor) {
            return Ok(cluster);
        }
        {
            let cluster_size = self.cluster_size();
            let offset_bits = compressed_offset_bits(self.cluster_bits);
            let host = descriptor & ((1u64 << offset_bits) - 1);
            let extra_sectors = (descriptor & !L2_COMPRESSED & !COPIED) >> offset_bits;
            // The stored length runs from `host` to the end of the last
            // sector it names; it is at most two clusters, so bounded.
            let stored = (extra_sectors + 1) * SECTOR_BYTES - (host % SECTOR_BYTES);
            if host >= self.file_len {
                return Err(Error::corrupt(format!(
                    "{}: compressed cluster at host byte offset {host} lies past the end of the {}-byte file",
                    self.describe(),
                    self.file_len
                )));
            }
            // The last compressed cluster may claim sectors past the end of
            // the file; those were never written and the stream ends before.
            let readable = stored.min(self.file_len - host) as usize;
            let mut input = vec![0u8; readable];
            self.file.read_exact_at(&mut input, host).map_err(|e| {
                Error::read(&format!("{} compressed cluster", self.describe()), host, e)
            })?;
            let mut output = vec![0u8; cluster_size as usize];
            inflate_exact(&input, &mut output, false).map_err(|why| {
                Error::corrupt(format!(
                    "{}: compressed cluster at host byte offset {host}: {why}",
                    self.describe()
                ))
            })?;
            Ok(self.last_inflated.put(descriptor, output))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::DeflateEncoder;
    use flate2::Compression;
    use std::io::Write;

    #[test]
    fn inflate_stops_at_the_output_size() {
        // A stream that inflates to 1 MiB must not produce more than asked.
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::best());
        enc.write_all(&vec![7u8; 1 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        inflate_exact(&bomb, &mut out, false).unwrap();
        assert!(out.iter().all(|b| *b == 7));
    }

    #[test]
    fn inflate_rejects_short_and_garbage_streams() {
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&[1u8; 100]).unwrap();
        let short = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        assert!(inflate_exact(&short, &mut out, false).is_err());
        assert!(inflate_exact(&[0xff; 64], &mut out, false).is_err());
        assert!(inflate_exact(&[], &mut out, false).is_err());
    }
}
