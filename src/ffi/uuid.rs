//! The C UUID type, `S_UUID`.
//!
//! Deliberately outside the files cbindgen reads: the legacy tool's own
//! `djtypes.h` defines `S_UUID` as an anonymous union, so the header must
//! name the type only by that typedef name (cbindgen would write `struct
//! S_UUID`, a different and incomplete type). The header defines the
//! union itself (the same members as the legacy one) unless `djtypes.h`
//! came first; see `cbindgen.toml`.

/// A UUID as VirtualBox's `RTUUID` (and so the legacy `S_UUID` union) holds
/// it: 16 bytes, its `Gen` view reading the first three fields in host
/// (little-endian) order. Size 16, alignment 8 (the union's `au64` member).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct S_UUID {
    pub au8: [u8; 16],
}

impl S_UUID {
    /// From a UUID in RFC 4122 byte order (the text form's byte order, as
    /// `Disk::uuid` returns it): the first three fields are swapped to
    /// little-endian, so `Gen.u32TimeLow` reads the first text group.
    pub fn from_rfc(rfc: [u8; 16]) -> S_UUID {
        let mut au8 = rfc;
        au8[0..4].reverse();
        au8[4..6].reverse();
        au8[6..8].reverse();
        S_UUID { au8 }
    }

    /// Back to RFC 4122 byte order.
    pub fn to_rfc(self) -> [u8; 16] {
        let mut rfc = self.au8;
        rfc[0..4].reverse();
        rfc[4..6].reverse();
        rfc[6..8].reverse();
        rfc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gen_view_reads_the_text_groups() {
        // 01234567-89ab-cdef-0011-223344556677 in RFC byte order.
        let rfc = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
            0x66, 0x77,
        ];
        let u = S_UUID::from_rfc(rfc);
        assert_eq!(
            u32::from_le_bytes(u.au8[0..4].try_into().unwrap()),
            0x0123_4567
        );
        assert_eq!(u16::from_le_bytes(u.au8[4..6].try_into().unwrap()), 0x89ab);
        assert_eq!(u16::from_le_bytes(u.au8[6..8].try_into().unwrap()), 0xcdef);
        assert_eq!(&u.au8[8..], &rfc[8..]);
        assert_eq!(u.to_rfc(), rfc);
        assert_eq!(std::mem::size_of::<S_UUID>(), 16);
        assert_eq!(std::mem::align_of::<S_UUID>(), 8);
    }
}
