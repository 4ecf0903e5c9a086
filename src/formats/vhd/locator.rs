//! Parent locators: the platform codes, the header's parent name, and
//! turning Windows paths and file URLs into candidate parent paths.

use byteorder::{BigEndian, ByteOrder, LittleEndian};

use super::VhdDisk;
use crate::error::{Error, Result};

/// A Windows path is at most 32767 UTF-16 units; anything longer is not a
/// path.
const MAX_LOCATOR_BYTES: u64 = 64 * 1024;
const LOCATOR_ENTRIES_AT: usize = 576;
const LOCATOR_ENTRY_BYTES: usize = 24;
const LOCATOR_COUNT: usize = 8;

const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
const PLATFORM_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
const PLATFORM_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

impl VhdDisk {
    /// Decodes the parent locators and the header's parent name into
    /// candidate paths, best first.
    pub(super) fn parent_names(&self, header: &[u8], header_at: u64) -> Result<Vec<String>> {
        let mut relative = Vec::new();
        let mut absolute = Vec::new();
        let mut others = Vec::new();
        for index in 0..LOCATOR_COUNT {
            let entry_at = LOCATOR_ENTRIES_AT + index * LOCATOR_ENTRY_BYTES;
            let entry = &header[entry_at..entry_at + LOCATOR_ENTRY_BYTES];
            let code = BigEndian::read_u32(&entry[0..]);
            let length = u64::from(BigEndian::read_u32(&entry[8..]));
            let offset = BigEndian::read_u64(&entry[16..]);
            if code == 0 || length == 0 {
                continue;
            }
            let decodable = matches!(
                code,
                PLATFORM_W2RU | PLATFORM_W2KU | PLATFORM_WI2R | PLATFORM_WI2K | PLATFORM_MACX
            );
            if !decodable {
                continue; // e.g. a Mac OS alias record: nothing we can resolve
            }
            let end = offset.checked_add(length);
            if length > MAX_LOCATOR_BYTES || !matches!(end, Some(end) if end <= self.file_len) {
                return Err(Error::corrupt(format!(
                    "{}: parent locator {index} (dynamic header byte offset {}) points at \
                     {length} bytes at byte offset {offset}, outside the file or too long",
                    self.name(),
                    header_at + entry_at as u64
                )));
            }
            let mut data = vec![0u8; length as usize];
            self.read_exact("parent locator", offset, &mut data)?;
            let decoded = match code {
                PLATFORM_W2RU | PLATFORM_W2KU => utf16_le(&data),
                PLATFORM_MACX => file_url_path(&String::from_utf8_lossy(&data)),
                _ => data.iter().map(|&b| char::from(b)).collect(),
            };
            let decoded = decoded.trim_end_matches('\0').to_string();
            if decoded.is_empty() {
                continue;
            }
            match code {
                PLATFORM_W2RU | PLATFORM_WI2R => relative.push(windows_to_unix(&decoded)),
                PLATFORM_W2KU | PLATFORM_WI2K => absolute.push(decoded),
                _ => others.push(decoded),
            }
        }
        let header_name = utf16_be(&header[64..576]);
        let header_name = header_name.trim_end_matches('\0');

        let mut names: Vec<String> = Vec::new();
        names.extend(relative.iter().cloned());
        // A Windows drive-letter path means nothing here; only a path that is
        // absolute on this system is tried as it stands.
        names.extend(absolute.iter().filter(|p| p.starts_with('/')).cloned());
        names.extend(others.iter().cloned());
        // Last resort: the parent's file name next to the child (an image
        // folder copied elsewhere). The unique id check guards against
        // picking up the wrong file.
        let mut base_names: Vec<String> = relative
            .iter()
            .chain(
                absolute
                    .iter()
                    .map(|p| windows_to_unix(p))
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .chain(others.iter())
            .filter_map(|p| p.rsplit('/').next().map(str::to_string))
            .collect();
        if !header_name.is_empty() {
            base_names.push(windows_to_unix(header_name));
        }
        names.extend(base_names);
        let mut unique = Vec::new();
        for name in names {
            if !name.is_empty() && !unique.contains(&name) {
                unique.push(name);
            }
        }
        if unique.is_empty() {
            return Err(Error::corrupt(format!(
                "{}: differencing VHD (dynamic header at byte offset {header_at}) names no \
                 parent file this reader can decode",
                self.name()
            )));
        }
        Ok(unique)
    }
}

fn utf16_le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(LittleEndian::read_u16).collect();
    String::from_utf16_lossy(&units)
}

fn utf16_be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(BigEndian::read_u16).collect();
    String::from_utf16_lossy(&units)
}

/// `.\dir\file.vhd` → `./dir/file.vhd`.
fn windows_to_unix(path: &str) -> String {
    path.replace('\\', "/")
}

/// The path of a `file://host/path` URL, percent-decoded; other strings are
/// returned as they are.
fn file_url_path(url: &str) -> String {
    let url = url.trim_end_matches('\0');
    let Some(rest) = url.strip_prefix("file://") else {
        return url.to_string();
    };
    let path = match rest.find('/') {
        Some(at) => &rest[at..],
        None => rest,
    };
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'%' {
            bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        } else {
            None
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_decode_to_paths() {
        assert_eq!(
            file_url_path("file://localhost/Users/me/My%20Disk.vhd"),
            "/Users/me/My Disk.vhd"
        );
        assert_eq!(file_url_path("file:///tmp/a.vhd\0\0"), "/tmp/a.vhd");
        assert_eq!(file_url_path("file:///bad%zz"), "/bad%zz");
        assert_eq!(file_url_path("file:///end%4"), "/end%4");
    }

    #[test]
    fn windows_paths_become_unix_paths() {
        assert_eq!(windows_to_unix(r".\sub\p.vhd"), "./sub/p.vhd");
    }
}
