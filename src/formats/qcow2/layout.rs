//! The qcow2 on-disk layout shared by the reader and the writer: header
//! field offsets, feature bits, header extension types and the bits of L1
//! and L2 entries (see the module doc of [`super`] for the facts).

/// `QFI\xfb` at byte 0.
pub(super) const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Header field offsets (all big-endian).
pub(super) const VERSION_AT: usize = 4;
pub(super) const BACKING_OFFSET_AT: usize = 8;
pub(super) const BACKING_LEN_AT: usize = 16;
pub(super) const CLUSTER_BITS_AT: usize = 20;
pub(super) const SIZE_AT: usize = 24;
pub(super) const CRYPT_METHOD_AT: usize = 32;
pub(super) const L1_SIZE_AT: usize = 36;
pub(super) const L1_OFFSET_AT: usize = 40;
pub(super) const REFCOUNT_TABLE_OFFSET_AT: usize = 48;
pub(super) const REFCOUNT_TABLE_CLUSTERS_AT: usize = 56;
/// Version 3 fields.
pub(super) const INCOMPATIBLE_AT: usize = 72;
pub(super) const REFCOUNT_ORDER_AT: usize = 96;
pub(super) const HEADER_LEN_AT: usize = 100;
pub(super) const COMPRESSION_TYPE_AT: usize = 104;

/// A version 2 header is 72 bytes; a version 3 one at least 104.
pub(super) const V2_HEADER_LEN: u64 = 72;
pub(super) const V3_MIN_HEADER_LEN: u64 = 104;

/// Header extension types: end of the list, backing file format.
pub(super) const EXT_END: u32 = 0;
pub(super) const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

/// Smallest and largest cluster sizes (the specification's floor and
/// QEMU's own ceiling of 2 MiB).
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// The specification's cap on the backing file name.
pub(super) const MAX_BACKING_NAME: u32 = 1023;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Bits 9..=55: a cluster-aligned host offset in L1 and L2 entries (and
/// refcount table entries).
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: the cluster's refcount is exactly one (it may be written
/// in place).
pub(super) const COPIED: u64 = 1 << 63;
/// L2 bit 62: a compressed cluster.
pub(super) const L2_COMPRESSED: u64 = 1 << 62;
/// L2 bit 0 (version 3): the cluster reads as zeros.
pub(super) const L2_ZERO: u64 = 1;

/// For a compressed cluster's descriptor: the bit where the count of
/// additional 512-byte sectors starts (below it, the host byte offset).
pub(super) fn compressed_offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}
