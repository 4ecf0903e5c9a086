//! Bounded inflation of deflate streams (qcow2 compressed clusters, VMDK
//! stream-optimized grains).

use flate2::{Decompress, FlushDecompress, Status};

/// Inflates `input` into exactly `output.len()` bytes, never more: a stream
/// that would produce more simply stops there (a zip bomb ends at one
/// cluster); one that produces less is an error.
pub(crate) fn inflate_exact(
    input: &[u8],
    output: &mut [u8],
    zlib_header: bool,
) -> std::result::Result<(), String> {
    let mut inflater = Decompress::new(zlib_header);
    loop {
        let before_in = inflater.total_in();
        let before_out = inflater.total_out();
        let in_pos = before_in as usize;
        let out_pos = before_out as usize;
        let status = inflater
            .decompress(
                &input[in_pos..],
                &mut output[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate stream is invalid: {e}"))?;
        let produced = inflater.total_out() as usize;
        if produced == output.len() {
            return Ok(());
        }
        let stalled = inflater.total_in() == before_in && inflater.total_out() == before_out;
        if status == Status::StreamEnd || stalled {
            return Err(format!(
                "deflate stream ends after {produced} of {} bytes",
                output.len()
            ));
        }
    }
}
