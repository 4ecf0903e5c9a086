//! VirtualBox media registries: which file holds the disk with a given
//! UUID, so a differencing image whose parent lives in another folder can
//! still be opened, and a disk can be opened by UUID alone (the legacy
//! `VDDR_OpenMediaRegistry` / `VDDR_OpenByUUID` / `VDDR_QuickGetUUID`).
//!
//! # Facts relied on
//!
//! * VirtualBox records every disk it knows in XML: the machine's `.vbox`
//!   file (`<VirtualBox><Machine><MediaRegistry><HardDisks>`) and the global
//!   `VirtualBox.xml` (`<VirtualBox><Global><MediaRegistry><HardDisks>`).
//!   Each disk is a `<HardDisk uuid="{...}" location="..." format="...">`;
//!   a differencing disk's element is nested inside its parent's.
//! * `location` is an absolute path or one relative to the folder of the
//!   XML file. Snapshot differencing images usually sit in the machine
//!   folder's `Snapshots/` subfolder.
//! * UUIDs are written `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`, in any case.
//! * The global file lives in `$VBOX_USER_HOME` when that is set, else in
//!   `$HOME/.config/VirtualBox/` (current releases on Linux) or
//!   `$HOME/.VirtualBox/` (older ones).
//! * The legacy CloneVDI tool also read `CloneVDI_Media.xml` in the image's
//!   folder. Its layout is not documented; it is read with the same rules
//!   (any root element; every `MediaRegistry/HardDisks` in it counts).
//!
//! # UUIDs
//!
//! Registry UUIDs are kept as the 16 bytes of their text, in order (RFC 4122
//! byte order): the convention of [`Disk::uuid`]. For
//! every format but one that is also what VirtualBox writes in the registry.
//! The exception is VHD: VirtualBox takes the 16 footer bytes as its own
//! in-memory UUID, whose first three fields are little-endian, so the text
//! it writes for a VHD is the footer bytes with those fields swapped.
//! [`registry_key`] converts a [`Disk::uuid`] to the
//! registry's form.
//!
//! # Which file wins
//!
//! [`load_for_image`] reads, highest priority first: `CloneVDI_Media.xml` in
//! the image's folder (the user's own list), the `*.vbox` files in the
//! image's folder, the `*.vbox` files in its parent folder (for an image in
//! `Snapshots/`), then the global `VirtualBox.xml`. Several `.vbox` files in
//! one folder are taken in name order. When two files describe the same
//! UUID, the higher-priority file's entry is kept whole (location and parent
//! alike). Loads accumulate in one process-wide registry; a later load's
//! entries replace earlier ones with the same UUID (the most recent load is
//! about the image being opened now). [`clear`] empties it.
//!
//! # Limits
//!
//! A registry file larger than [`MAX_REGISTRY_BYTES`], with more than
//! [`MAX_XML_NODES`] XML nodes, more than [`MAX_ATTRIBUTES`] attributes on
//! an element, more than [`MAX_NAMESPACE_DECLARATIONS`] namespace
//! declarations (the last two make the parser's work grow with their
//! square), or with `HardDisk` elements nested more than [`MAX_NESTING`]
//! deep is refused with an error; so is one that is not
//! well-formed XML, has a DTD, names a UUID twice or has a `HardDisk` without
//! a valid `uuid` or a `location`. A file that exists but cannot be read
//! fails the whole load (nothing from that load is kept).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use super::{
    open_path_at_depth, open_read_only, registry, vci, vdi, vhd, vhdx, vmdk, FormatId, OpenOptions,
    MAX_CHAIN_DEPTH,
};
use crate::disk::{Disk, DriveType};
use crate::error::{Error, Result};

/// The largest registry file read (VirtualBox's own are kilobytes).
pub const MAX_REGISTRY_BYTES: u64 = 64 << 20;
/// The most XML nodes (elements, text, comments...) a registry may have.
pub const MAX_XML_NODES: u32 = 1 << 20;
/// The deepest nesting of `HardDisk` elements accepted (a snapshot chain
/// that long could not be opened anyway: see [`MAX_CHAIN_DEPTH`]).
pub const MAX_NESTING: usize = 256;
/// The most attributes one XML element may have.
pub const MAX_ATTRIBUTES: usize = 256;
/// The most `xmlns` namespace declarations a registry file may have.
pub const MAX_NAMESPACE_DECLARATIONS: usize = 64;
/// The legacy tool's own registry file, looked for in the image's folder.
pub const LEGACY_MEDIA_FILE: &str = "CloneVDI_Media.xml";
/// The global registry's file name.
pub const GLOBAL_FILE: &str = "VirtualBox.xml";

/// One `HardDisk` of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaEntry {
    /// The disk's UUID, the bytes of its text in order.
    pub uuid: [u8; 16],
    /// Where the disk's file is (relative locations already joined to the
    /// registry file's folder).
    pub location: PathBuf,
    /// The `format` attribute (`VDI`, `VHD`, `VMDK`, ...), if present.
    pub format: Option<String>,
    /// The UUID of the `HardDisk` this one is nested in: its parent.
    pub parent: Option<[u8; 16]>,
    /// The registry file that described it.
    pub registry: PathBuf,
    /// The line of its element in that file.
    pub line: u32,
}

/// A set of registry entries keyed by UUID.
#[derive(Debug, Clone, Default)]
pub struct MediaRegistry {
    entries: HashMap<[u8; 16], MediaEntry>,
}

impl MediaRegistry {
    /// An empty registry.
    pub fn new() -> MediaRegistry {
        MediaRegistry::default()
    }

    /// The registry [`load_for_image`] would load for `image`, with the
    /// global `VirtualBox.xml` looked for in `global_dirs` (in order), merged
    /// by the priority in the module documentation. An error when no
    /// registry file exists at all, or when one that exists is bad.
    pub fn for_image(image: &Path, global_dirs: &[PathBuf]) -> Result<MediaRegistry> {
        let files = registry_files_for_image(image, global_dirs)?;
        let present: Vec<&PathBuf> = files.iter().filter(|f| f.is_file()).collect();
        if present.is_empty() {
            let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            return Err(Error::open(format!(
                "{}: no media registry found (looked for {}, *.vbox in the image's folder \
                 and its parent, and {GLOBAL_FILE}: {})",
                image.display(),
                LEGACY_MEDIA_FILE,
                looked.join(", ")
            )));
        }
        let mut registry = MediaRegistry::new();
        for file in present {
            for entry in read_registry_file(file)? {
                registry.entries.entry(entry.uuid).or_insert(entry);
            }
        }
        Ok(registry)
    }

    /// Reads one registry file and adds its entries, replacing entries with
    /// the same UUIDs. Returns how many it read.
    pub fn load_file(&mut self, xml: &Path) -> Result<usize> {
        let entries = read_registry_file(xml)?;
        let count = entries.len();
        for entry in entries {
            self.entries.insert(entry.uuid, entry);
        }
        Ok(count)
    }

    /// Adds every entry of `other`, replacing entries with the same UUIDs.
    pub fn merge(&mut self, other: MediaRegistry) {
        self.entries.extend(other.entries);
    }

    /// The entry for `uuid` (registry form: see [`registry_key`]).
    pub fn get(&self, uuid: &[u8; 16]) -> Option<&MediaEntry> {
        self.entries.get(uuid)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &MediaEntry> {
        self.entries.values()
    }

    /// The entry whose location is the file `path` (the same file, however
    /// it is spelled), if any.
    pub fn entry_for_file(&self, path: &Path) -> Option<&MediaEntry> {
        let wanted = file_identity(path)?;
        let mut found: Vec<&MediaEntry> = self
            .entries
            .values()
            .filter(|e| file_identity(&e.location) == Some(wanted))
            .collect();
        // Deterministic when (oddly) two UUIDs name one file.
        found.sort_by_key(|e| e.uuid);
        found.into_iter().next()
    }
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The registry files looked at for `image`, highest priority first (they
/// need not exist): `CloneVDI_Media.xml` beside it, `*.vbox` beside it and
/// in its parent folder, then `VirtualBox.xml` in each of `global_dirs`.
/// An error when `image` does not exist.
pub fn registry_files_for_image(image: &Path, global_dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let image =
        std::fs::canonicalize(image).map_err(|e| Error::open(e.to_string()).with_path(image))?;
    let mut files = Vec::new();
    if let Some(folder) = image.parent() {
        files.push(folder.join(LEGACY_MEDIA_FILE));
        files.extend(vbox_files_in(folder));
        if let Some(machine) = folder.parent() {
            files.extend(vbox_files_in(machine));
        }
    }
    files.extend(global_dirs.iter().map(|d| d.join(GLOBAL_FILE)));
    Ok(files)
}

/// The `*.vbox` files in `folder`, by name.
fn vbox_files_in(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("vbox"))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// Where the global `VirtualBox.xml` is looked for: `$VBOX_USER_HOME` when
/// set, else `$HOME/.config/VirtualBox` then `$HOME/.VirtualBox`.
pub fn default_global_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("VBOX_USER_HOME").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => {
            let home = PathBuf::from(home);
            vec![home.join(".config/VirtualBox"), home.join(".VirtualBox")]
        }
        None => Vec::new(),
    }
}

/// Reads and parses one registry file, within [`MAX_REGISTRY_BYTES`].
pub fn read_registry_file(xml: &Path) -> Result<Vec<MediaEntry>> {
    let name = xml.display();
    let file = open_read_only(xml)?;
    let mut bytes = Vec::new();
    file.take(MAX_REGISTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::read(&format!("{name}: media registry"), 0, e))?;
    if bytes.len() as u64 > MAX_REGISTRY_BYTES {
        return Err(Error::unsupported(format!(
            "{name}: media registry larger than {MAX_REGISTRY_BYTES} bytes"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::corrupt(format!(
            "{name}: media registry is not UTF-8 text (byte offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse_registry(&text, xml)
}

/// Parses registry XML that was read from `xml` (relative locations are
/// joined to its folder).
pub fn parse_registry(text: &str, xml: &Path) -> Result<Vec<MediaEntry>> {
    let name = xml.display();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_markup_limits(text).map_err(|(at, what)| {
        let line = text.as_bytes()[..at]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        Error::unsupported(format!("{name}: line {line}: {what}"))
    })?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| {
        Error::corrupt(format!(
            "{name}: media registry is not well-formed XML: {e}"
        ))
    })?;
    let folder = xml.parent().unwrap_or_else(|| Path::new("."));
    let is = |node: &roxmltree::Node, tag: &str| node.is_element() && node.tag_name().name() == tag;
    // Line numbers, counted forward from the last element asked about
    // (elements come in document order): `text_pos_at` would rescan the
    // text from the start for each one.
    let mut cursor = (0usize, 1u32);
    let mut line_at = |pos: usize| -> u32 {
        if pos < cursor.0 {
            cursor = (0, 1);
        }
        let newlines = text.as_bytes()[cursor.0..pos]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        cursor = (pos, cursor.1.saturating_add(newlines as u32));
        cursor.1
    };
    let mut entries: Vec<MediaEntry> = Vec::new();
    let mut seen: HashMap<[u8; 16], u32> = HashMap::new();
    for registry in doc.descendants().filter(|n| is(n, "MediaRegistry")) {
        for disks in registry.children().filter(|n| is(n, "HardDisks")) {
            // (element, its parent's UUID, nesting level); an explicit stack,
            // so hostile nesting cannot exhaust the call stack.
            let mut stack: Vec<(roxmltree::Node, Option<[u8; 16]>, usize)> = disks
                .children()
                .filter(|n| is(n, "HardDisk"))
                .map(|n| (n, None, 1))
                .collect();
            stack.reverse();
            while let Some((node, parent, level)) = stack.pop() {
                let line = line_at(node.range().start);
                if level > MAX_NESTING {
                    return Err(Error::unsupported(format!(
                        "{name}: line {line}: HardDisk elements nested more than \
                         {MAX_NESTING} deep"
                    )));
                }
                let uuid_attr = node.attribute("uuid").ok_or_else(|| {
                    Error::corrupt(format!("{name}: line {line}: HardDisk has no uuid"))
                })?;
                let uuid = parse_uuid_text(uuid_attr).ok_or_else(|| {
                    Error::corrupt(format!(
                        "{name}: line {line}: HardDisk uuid '{uuid_attr}' is not a UUID"
                    ))
                })?;
                let location = node
                    .attribute("location")
                    .filter(|l| !l.trim().is_empty())
                    .ok_or_else(|| {
                        Error::corrupt(format!(
                            "{name}: line {line}: HardDisk {} has no location",
                            uuid_text(&uuid)
                        ))
                    })?;
                if let Some(first) = seen.insert(uuid, line) {
                    return Err(Error::corrupt(format!(
                        "{name}: lines {first} and {line} both describe the disk {}",
                        uuid_text(&uuid)
                    )));
                }
                let children: Vec<roxmltree::Node> =
                    node.children().filter(|n| is(n, "HardDisk")).collect();
                for child in children.into_iter().rev() {
                    stack.push((child, Some(uuid), level + 1));
                }
                entries.push(MediaEntry {
                    uuid,
                    location: resolve_location(folder, location),
                    format: node.attribute("format").map(str::to_string),
                    parent,
                    registry: xml.to_path_buf(),
                    line,
                });
            }
        }
    }
    Ok(entries)
}

/// Refuses, before parsing, markup that would make the XML parser's work
/// grow faster than the file: more than [`MAX_ATTRIBUTES`] attributes on one
/// element (duplicate attributes are found by comparing each with the ones
/// before it), or more than [`MAX_NAMESPACE_DECLARATIONS`] `xmlns`
/// declarations in the file (each element declaring one copies all those in
/// scope). VirtualBox's files have a handful of attributes per element and
/// one namespace. A linear scan: comments, CDATA sections and processing
/// instructions are skipped, quoted values are not looked into. Returns the
/// byte offset of the offending tag and what is wrong.
fn check_markup_limits(text: &str) -> std::result::Result<(), (usize, String)> {
    let b = text.as_bytes();
    let skip_to = |from: usize, end: &[u8]| -> usize {
        b[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    let mut namespaces = 0usize;
    let mut i = 0usize;
    while let Some(found) = b[i..].iter().position(|c| *c == b'<') {
        let start = i + found;
        let rest = &b[start..];
        if rest.starts_with(b"<!--") {
            i = skip_to(start + 4, b"-->");
            continue;
        }
        if rest.starts_with(b"<![CDATA[") {
            i = skip_to(start + 9, b"]]>");
            continue;
        }
        if rest.starts_with(b"<?") {
            i = skip_to(start + 2, b"?>");
            continue;
        }
        if rest.starts_with(b"<!") {
            // A DOCTYPE: the parser refuses it.
            i = start + 2;
            continue;
        }
        // A tag: one '=' outside quotes per attribute; the word before it
        // is the attribute's name.
        let mut attributes = 0usize;
        let mut quote: Option<u8> = None;
        let mut word = start + 1;
        let mut last_word: &[u8] = &[];
        let mut j = start + 1;
        while j < b.len() {
            let c = b[j];
            match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                        word = j + 1;
                        last_word = &[];
                    }
                }
                None => match c {
                    b'"' | b'\'' => quote = Some(c),
                    b'>' => break,
                    b'=' => {
                        attributes += 1;
                        if attributes > MAX_ATTRIBUTES {
                            return Err((
                                start,
                                format!("an element with more than {MAX_ATTRIBUTES} attributes"),
                            ));
                        }
                        let name = match b[word..j].trim_ascii() {
                            [] => last_word,
                            name => name,
                        };
                        last_word = &[];
                        word = j + 1;
                        if name.starts_with(b"xmlns") {
                            namespaces += 1;
                            if namespaces > MAX_NAMESPACE_DECLARATIONS {
                                return Err((
                                    start,
                                    format!(
                                        "more than {MAX_NAMESPACE_DECLARATIONS} namespace \
                                         declarations"
                                    ),
                                ));
                            }
                        }
                    }
                    c if c.is_ascii_whitespace() => {
                        // The last word seen, for `name = "value"`.
                        let seen = b[word..j].trim_ascii();
                        if !seen.is_empty() {
                            last_word = seen;
                            word = j;
                        }
                    }
                    _ => {}
                },
            }
            j += 1;
        }
        i = j.min(b.len());
    }
    Ok(())
}

/// An absolute location as it is; a relative one joined to the registry's
/// folder, with Windows `\` separators (a registry copied from a Windows
/// host) read as `/`.
fn resolve_location(folder: &Path, location: &str) -> PathBuf {
    let path = Path::new(location);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        folder.join(location.replace('\\', "/"))
    }
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case) as
/// the bytes of its text in order.
pub fn parse_uuid_text(text: &str) -> Option<[u8; 16]> {
    let t = text.trim();
    let t = match t.strip_prefix('{') {
        Some(inner) => inner.strip_suffix('}')?,
        None => t,
    };
    // Only the hyphenated form: uuid's parser would also take others.
    if t.len() != 36 {
        return None;
    }
    uuid::Uuid::try_parse(t).ok().map(|u| *u.as_bytes())
}

/// The hyphenated text of a UUID's bytes, for messages.
pub fn uuid_text(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).hyphenated().to_string()
}

/// A [`Disk::uuid`] in the form a VirtualBox registry records it: the same
/// bytes, except for VHD, whose footer bytes VirtualBox reads as a GUID with
/// little-endian first fields (so the first three fields are swapped).
pub fn registry_key(drive_type: DriveType, uuid: [u8; 16]) -> [u8; 16] {
    match drive_type {
        DriveType::Vhd => vdi::guid_to_rfc_bytes(&uuid),
        _ => uuid,
    }
}

// ---------------------------------------------------------------------------
// The process-wide registry.

static LOADED: LazyLock<Mutex<MediaRegistry>> = LazyLock::new(Mutex::default);

/// The loaded registry (a panic elsewhere while it was held leaves it as
/// consistent as any other moment: every change is one map operation).
fn loaded() -> MutexGuard<'static, MediaRegistry> {
    LOADED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads the media registry describing `image` into the process-wide
/// registry (see the module documentation for where it looks and which file
/// wins). Returns how many disks this load described.
pub fn load_for_image(image: &Path) -> Result<usize> {
    load_for_image_with(image, &default_global_dirs())
}

/// [`load_for_image`] with the folders to look for the global
/// `VirtualBox.xml` in given (tests; callers with their own VirtualBox home).
pub fn load_for_image_with(image: &Path, global_dirs: &[PathBuf]) -> Result<usize> {
    let registry = MediaRegistry::for_image(image, global_dirs)?;
    let count = registry.len();
    loaded().merge(registry);
    Ok(count)
}

/// Loads one registry file (any of the kinds above) into the process-wide
/// registry, replacing entries with the same UUIDs.
pub fn load_file(xml: &Path) -> Result<usize> {
    let entries = read_registry_file(xml)?;
    let count = entries.len();
    let mut registry = loaded();
    for entry in entries {
        registry.entries.insert(entry.uuid, entry);
    }
    Ok(count)
}

/// Empties the process-wide registry.
pub fn clear() {
    *loaded() = MediaRegistry::new();
}

/// True when a registry has been loaded (without copying it).
pub fn is_loaded() -> bool {
    !loaded().is_empty()
}

/// A copy of the process-wide registry.
pub fn snapshot() -> MediaRegistry {
    loaded().clone()
}

/// The file the process-wide registry names for `uuid` (registry form).
pub fn lookup(uuid: &[u8; 16]) -> Option<PathBuf> {
    loaded().get(uuid).map(|e| e.location.clone())
}

/// The process-wide registry's entry for `uuid` (registry form).
pub fn lookup_entry(uuid: &[u8; 16]) -> Option<MediaEntry> {
    loaded().get(uuid).cloned()
}

/// For the format readers: where the loaded registry puts the parent of
/// `child`. By `parent_uuid` (registry form) when the child records one;
/// otherwise the parent of the child's own entry, found by `child_uuid` or
/// else by being the same file as `child`.
pub(crate) fn registry_parent(
    child: &Path,
    parent_uuid: Option<[u8; 16]>,
    child_uuid: Option<[u8; 16]>,
) -> Option<PathBuf> {
    let registry = loaded();
    let parent = match parent_uuid {
        Some(uuid) => uuid,
        None => {
            let own = child_uuid
                .and_then(|u| registry.get(&u))
                .or_else(|| registry.entry_for_file(child))?;
            own.parent?
        }
    };
    registry.get(&parent).map(|e| e.location.clone())
}

/// Checks a legacy `iChain` index: below [`MAX_CHAIN_DEPTH`].
fn check_chain_index(i_chain: usize) -> Result<()> {
    if i_chain >= MAX_CHAIN_DEPTH {
        return Err(Error::invalid_argument(format!(
            "chain index {i_chain}: a disk's index in a differencing chain is below \
             {MAX_CHAIN_DEPTH} (the deepest chain followed)"
        )));
    }
    Ok(())
}

/// Opens `path` as the disk at index `i_chain` of a differencing chain (the
/// legacy `VDDR_Open(fn, iChain)`): 0 for the disk a user names, and each
/// parent opened below it one more. The disk and all its parents are
/// opened; the index only counts against [`MAX_CHAIN_DEPTH`], so a disk at
/// index `i` may have at most `MAX_CHAIN_DEPTH - 1 - i` parents. An index
/// of `MAX_CHAIN_DEPTH` or more is an `InvalidArgument` error.
pub fn open_chain(path: &Path, i_chain: usize, options: &OpenOptions) -> Result<Box<dyn Disk>> {
    check_chain_index(i_chain)?;
    open_path_at_depth(path, options, i_chain)
}

/// Opens the disk the process-wide registry names for `uuid` (registry
/// form), as [`open_chain`] at index `i_chain` (the legacy
/// `VDDR_OpenByUUID`). The file must carry that UUID, for formats that
/// record one.
pub fn open_by_uuid(
    uuid: &[u8; 16],
    i_chain: usize,
    options: &OpenOptions,
) -> Result<Box<dyn Disk>> {
    check_chain_index(i_chain)?;
    let entry = lookup_entry(uuid).ok_or_else(|| {
        Error::open(format!(
            "no disk with UUID {} in the loaded media registry (load the registry that \
             describes it first)",
            uuid_text(uuid)
        ))
    })?;
    if !entry.location.is_file() {
        return Err(Error::open(format!(
            "{}: line {}: the disk {} is at '{}', which is not there",
            entry.registry.display(),
            entry.line,
            uuid_text(uuid),
            entry.location.display()
        )));
    }
    let disk = open_path_at_depth(&entry.location, options, i_chain)?;
    if let Some(found) = disk.uuid() {
        let found = registry_key(disk.drive_type(), found);
        if &found != uuid {
            return Err(Error::source_mismatch(format!(
                "{}: line {}: names '{}' as the disk {}, but that image's UUID is {}",
                entry.registry.display(),
                entry.line,
                entry.location.display(),
                uuid_text(uuid),
                uuid_text(&found)
            )));
        }
    }
    Ok(disk)
}

/// The creation UUID in the header of the image at `path`, without opening
/// any parent (the legacy `VDDR_QuickGetUUID`), in the byte order
/// [`Disk::uuid`] uses for that format. Formats with one: VDI (image UUID),
/// VHD (footer unique id), VMDK (`ddb.uuid.image`, when the descriptor has
/// it), VHDX (page 83 GUID) and VCI. qcow2, Parallels, UML COW and raw
/// images have none: an `Unsupported` error.
pub fn quick_uuid(path: &Path) -> Result<[u8; 16]> {
    quick_uuid_and_type(path).map(|(uuid, _)| uuid)
}

/// [`quick_uuid`] in the registry's form ([`registry_key`]): what to pass to
/// [`lookup`] and [`open_by_uuid`].
pub fn quick_registry_uuid(path: &Path) -> Result<[u8; 16]> {
    quick_uuid_and_type(path).map(|(uuid, kind)| registry_key(kind, uuid))
}

fn quick_uuid_and_type(path: &Path) -> Result<([u8; 16], DriveType)> {
    match registry::detect(path)? {
        FormatId::Vdi => Ok((vdi::read_header_at(path)?.image_uuid, DriveType::Vdi)),
        FormatId::Vhd => Ok((vhd::footer_unique_id(path)?, DriveType::Vhd)),
        FormatId::Vmdk => {
            let image = vmdk::descriptor_uuids(path)?.image.ok_or_else(|| {
                Error::unsupported(format!(
                    "{}: VMDK descriptor records no ddb.uuid.image",
                    path.display()
                ))
            })?;
            Ok((image, DriveType::Vmdk))
        }
        FormatId::Vhdx => Ok((vhdx::page83_uuid(path)?, DriveType::Vhdx)),
        FormatId::Vci => {
            let image = vci::Vci::open(path, &vci::VciOptions::default())?;
            Ok((image.header().uuid, DriveType::Vci))
        }
        other => Err(Error::unsupported(format!(
            "{}: {} images carry no UUID",
            path.display(),
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_forms() {
        let a = parse_uuid_text("{0123ABCD-0000-1111-2222-333344445555}").unwrap();
        let b = parse_uuid_text(" 0123abcd-0000-1111-2222-333344445555 ").unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 0x01);
        assert_eq!(a[15], 0x55);
        for bad in [
            "",
            "{}",
            "{0123abcd-0000-1111-2222-33334444555}",
            "{0123abcd-0000-1111-2222-333344445555",
            "0123abcd000011112222333344445555",
            "{0123abcd-0000-1111-2222-33334444555g}",
        ] {
            assert!(parse_uuid_text(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn markup_limits_count_attributes_and_namespaces() {
        let tag = |n: usize, prefix: &str| {
            let attrs: String = (0..n).map(|i| format!(" {prefix}{i} = 'v>='")).collect();
            format!("<!-- a=b <x c=d> --><?pi a=b?><r{attrs}/><![CDATA[<q a=b>]]>")
        };
        assert!(check_markup_limits(&tag(MAX_ATTRIBUTES, "a")).is_ok());
        let (at, what) = check_markup_limits(&tag(MAX_ATTRIBUTES + 1, "a")).unwrap_err();
        assert_eq!(at, tag(0, "").find("<r").unwrap());
        assert!(what.contains("attributes"), "{what}");
        assert!(check_markup_limits(&tag(MAX_NAMESPACE_DECLARATIONS, "xmlns:p")).is_ok());
        let (_, what) =
            check_markup_limits(&tag(MAX_NAMESPACE_DECLARATIONS + 1, "xmlns:p")).unwrap_err();
        assert!(what.contains("namespace"), "{what}");
        // Spread over elements, namespaces still count; attributes do not.
        let many: String = (0..=MAX_NAMESPACE_DECLARATIONS)
            .map(|i| format!("<e xmlns:p{i}=\"u\" a=\"1\" b=\"2\">"))
            .collect();
        assert!(check_markup_limits(&many).is_err());
        let plain: String = (0..1000).map(|_| "<e a=\"1\" b='2'/>").collect();
        assert!(check_markup_limits(&plain).is_ok());
        // Unterminated constructs end the scan.
        for text in ["<!-- a=b", "<![CDATA[", "<?x", "<e a='", "<", ""] {
            assert!(check_markup_limits(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn vhd_keys_swap_the_first_three_fields() {
        let raw: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            registry_key(DriveType::Vhd, raw),
            [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(registry_key(DriveType::Vdi, raw), raw);
    }

    #[test]
    fn nested_entries_know_their_parents() {
        let xml = r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{99999999-0000-0000-0000-000000000000}" name="m">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{11111111-0000-0000-0000-000000000000}" location="base.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{22222222-0000-0000-0000-000000000000}" location="Snapshots\{2}.vdi" format="VDI"/>
        </HardDisk>
        <HardDisk uuid="{33333333-0000-0000-0000-000000000000}" location="/abs/other.vhd" format="VHD"/>
      </HardDisks>
      <DVDImages/>
    </MediaRegistry>
  </Machine>
</VirtualBox>"#;
        let entries = parse_registry(xml, Path::new("/vm/m.vbox")).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].location, PathBuf::from("/vm/base.vdi"));
        assert_eq!(entries[0].parent, None);
        assert_eq!(entries[0].line, 6);
        assert_eq!(entries[1].location, PathBuf::from("/vm/Snapshots/{2}.vdi"));
        assert_eq!(entries[1].parent, Some(entries[0].uuid));
        assert_eq!(entries[2].location, PathBuf::from("/abs/other.vhd"));
        assert_eq!(entries[2].format.as_deref(), Some("VHD"));
    }
}
