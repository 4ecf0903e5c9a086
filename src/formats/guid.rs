//! GUIDs as the image formats store them.
//!
//! VDI, VHDX and VirtualBox's own reading of a VHD keep a GUID "mixed
//! endian": the first three fields little-endian, the rest as in the text.
//! The library keeps UUIDs in RFC 4122 byte order (the order of the text);
//! this is the one conversion between the two, and the one text form.

/// Swaps the first three fields of a 16-byte GUID between the mixed-endian
/// on-disk form and RFC 4122 order (the swap is its own inverse).
pub(crate) fn swap_guid_fields(guid: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&guid[..16]);
    out[0..4].reverse();
    out[4..6].reverse();
    out[6..8].reverse();
    out
}

/// A UUID in RFC 4122 byte order as the usual hyphenated text.
pub(crate) fn uuid_text(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).hyphenated().to_string()
}

/// Bytes as lowercase hex (for identities that need not be UUIDs).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swap_turns_the_stored_form_into_the_text_order_and_back() {
        // {00112233-4455-6677-8899-aabbccddeeff} as a VDI stores it.
        let stored = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        let rfc = swap_guid_fields(&stored);
        assert_eq!(uuid_text(&rfc), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(swap_guid_fields(&rfc), stored);
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
