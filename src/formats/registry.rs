//! The one table of built-in formats: which formats exist, what they are
//! called, which file extensions they use, how to recognise and open them.
//!
//! Everything else (the format probe, the backend tables of the C ABI, the
//! media registry, the CLI) asks this table: a format is a [`FormatId`], and
//! this module is the only place its name is matched as a string.

use std::fs::File;
use std::path::Path;

use super::{
    open_read_only, parallels, qcow2, raw, umlcow, vci, vdi, vhd, vhdx, vmdk, OpenOptions,
};
use crate::disk::{Disk, ImageFile};
use crate::error::{Error, Result};

/// A built-in format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatId {
    Raw,
    Vdi,
    Vhd,
    Vhdx,
    Vmdk,
    Qcow2,
    Parallels,
    /// User-Mode Linux copy-on-write files ("cow").
    UmlCow,
    /// VirtualBox's VCI cache images.
    Vci,
}

impl FormatId {
    /// The format's entry in the table.
    pub fn info(self) -> &'static FormatInfo {
        match self {
            FormatId::Raw => &RAW,
            FormatId::Vdi => &VDI,
            FormatId::Vhd => &VHD,
            FormatId::Vhdx => &VHDX,
            FormatId::Vmdk => &VMDK,
            FormatId::Qcow2 => &QCOW2,
            FormatId::Parallels => &PARALLELS,
            FormatId::UmlCow => &UML_COW,
            FormatId::Vci => &VCI,
        }
    }

    /// Short lowercase name ("raw", "vdi", "cow", "vci", ...): the backend
    /// table's name in the C ABI.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The format called `name` (exactly its [`FormatId::name`]).
    pub fn from_name(name: &str) -> Option<FormatId> {
        PROBE_ORDER
            .iter()
            .find(|info| info.name == name)
            .map(|info| info.id)
    }

    /// The format QEMU calls `name`, as a qcow2 image's backing-format
    /// header extension names its parent: QEMU's names are ours except that
    /// VHD is "vpc" (Virtual PC).
    pub fn from_qemu_name(name: &str) -> Option<FormatId> {
        match name {
            "vpc" => Some(FormatId::Vhd),
            other => FormatId::from_name(other),
        }
    }
}

/// A read-only open of an image that is `usize` links down a parent chain
/// (0 for the image the caller named), passed on to `open_parent`.
pub type OpenAtDepth = fn(&Path, &OpenOptions, usize) -> Result<Box<dyn Disk>>;

/// How [`FormatInfo::open_image`] opens an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOpenOptions {
    /// Open for writing (else every write fails).
    pub writable: bool,
    /// Read unchanged sectors from the backing file the image names (a
    /// differencing format); else they read as unallocated.
    pub follow_backing: bool,
    /// Also accept an image a crashed writer left marked unclean, after
    /// checking and rebuilding what the format keeps for that (VCI).
    pub repair: bool,
}

/// Parameters of [`FormatInfo::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    /// Virtual size in bytes.
    pub size: u64,
    /// Preallocate the image ("fixed") rather than grow it as written.
    pub fixed: bool,
    /// Ask for a differencing image (formats that cannot make one refuse).
    pub differencing: bool,
    /// The image UUID to store, if the format has one (random if `None`).
    pub uuid: Option<[u8; 16]>,
    /// A comment, for formats that store one.
    pub comment: Option<String>,
}

/// Opens an image as an [`ImageFile`]: writable, or read-only with what
/// only such an open knows (which sectors the file itself holds).
pub type OpenImage = fn(&Path, &ImageOpenOptions) -> Result<Box<dyn ImageFile>>;

/// Creates an image (it must not exist) and opens it for writing.
pub type CreateImage = fn(&Path, &CreateParams) -> Result<Box<dyn ImageFile>>;

/// A built-in format: how to recognise an image and open it.
pub struct FormatInfo {
    pub id: FormatId,
    /// Short lowercase name ("raw", "vdi", ...).
    pub name: &'static str,
    /// File name extensions, without the dot.
    pub extensions: &'static [&'static str],
    /// True when the file's content looks like this format. Must not fail
    /// loudly: a probe that cannot read the header says "no".
    pub probe: fn(&File) -> bool,
    /// Opens the image read-only as a source disk.
    pub open_at_depth: OpenAtDepth,
    /// For formats that can be written (UML COW, VCI). It checks the
    /// file's format itself.
    pub open_image: Option<OpenImage>,
    /// For formats that can create images (VCI).
    pub create: Option<CreateImage>,
    /// The format can discard sectors ([`ImageFile::as_discard`]).
    pub discards: bool,
    /// [`FormatInfo::open_image`] can repair an image a crashed writer left
    /// unclean ([`ImageOpenOptions::repair`]).
    pub repairs: bool,
    /// Every image of the format is a differencing image over a backing
    /// file (UML COW).
    pub differencing: bool,
}

impl FormatInfo {
    /// [`FormatInfo::probe`] by path: false when the file cannot be opened.
    pub fn probe_path(&self, path: &Path) -> bool {
        match File::open(path) {
            Ok(file) => (self.probe)(&file),
            Err(_) => false,
        }
    }
}

static QCOW2: FormatInfo = FormatInfo {
    id: FormatId::Qcow2,
    name: "qcow2",
    extensions: &["qcow2"],
    probe: qcow2::probe,
    open_at_depth: qcow2::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static VMDK: FormatInfo = FormatInfo {
    id: FormatId::Vmdk,
    name: "vmdk",
    extensions: &["vmdk"],
    probe: vmdk::probe,
    open_at_depth: vmdk::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static VDI: FormatInfo = FormatInfo {
    id: FormatId::Vdi,
    name: "vdi",
    extensions: &["vdi"],
    probe: vdi::probe,
    open_at_depth: vdi::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static PARALLELS: FormatInfo = FormatInfo {
    id: FormatId::Parallels,
    name: "parallels",
    extensions: &["hdd"],
    probe: parallels::probe,
    open_at_depth: parallels::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static VHDX: FormatInfo = FormatInfo {
    id: FormatId::Vhdx,
    name: "vhdx",
    extensions: &["vhdx"],
    probe: vhdx::probe,
    open_at_depth: vhdx::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static VHD: FormatInfo = FormatInfo {
    id: FormatId::Vhd,
    name: "vhd",
    extensions: &["vhd"],
    probe: vhd::probe,
    open_at_depth: vhd::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

static UML_COW: FormatInfo = FormatInfo {
    id: FormatId::UmlCow,
    name: "cow",
    extensions: &["cow"],
    probe: umlcow::probe,
    open_at_depth: umlcow::open_boxed,
    open_image: Some(umlcow::open_image),
    create: None,
    discards: false,
    repairs: false,
    differencing: true,
};

static VCI: FormatInfo = FormatInfo {
    id: FormatId::Vci,
    name: "vci",
    extensions: &["vci"],
    probe: vci::probe,
    open_at_depth: vci::open_boxed,
    open_image: Some(vci::open_image),
    create: Some(vci::create_image),
    discards: true,
    repairs: true,
    differencing: false,
};

static RAW: FormatInfo = FormatInfo {
    id: FormatId::Raw,
    name: "raw",
    extensions: &["img", "raw", "bin"],
    probe: raw::probe,
    open_at_depth: raw::open_boxed,
    open_image: None,
    create: None,
    discards: false,
    repairs: false,
    differencing: false,
};

/// Every built-in format in probe order: `raw`, which accepts any file,
/// comes last.
static PROBE_ORDER: [&FormatInfo; 9] = [
    &QCOW2, &VMDK, &VDI, &PARALLELS, &VHDX, &VHD, &UML_COW, &VCI, &RAW,
];

/// The built-in formats in probe order (`raw`, which accepts any file,
/// last).
pub fn builtin_formats() -> &'static [&'static FormatInfo] {
    &PROBE_ORDER
}

/// The format of the file at `path`, by its content (the first format in
/// probe order whose probe says yes; `raw` accepts anything).
pub fn detect(path: &Path) -> Result<FormatId> {
    let file = open_read_only(path)?;
    PROBE_ORDER
        .iter()
        .find(|info| (info.probe)(&file))
        .map(|info| info.id)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "{}: not an image format this library reads",
                path.display()
            ))
        })
}

/// An image opened by [`open`]: which format it is, and the disk.
pub struct Opened {
    pub format: FormatId,
    pub disk: Box<dyn Disk>,
}

/// Opens an image read-only, choosing the format by its content, and says
/// which format it chose.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Opened> {
    open_at_depth(path, options, 0)
}

/// [`open`] for an image that is `depth` links down a parent chain.
pub fn open_at_depth(path: &Path, options: &OpenOptions, depth: usize) -> Result<Opened> {
    let format = detect(path)?;
    let disk = (format.info().open_at_depth)(path, options, depth)?;
    Ok(Opened { format, disk })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [FormatId; 9] = [
        FormatId::Raw,
        FormatId::Vdi,
        FormatId::Vhd,
        FormatId::Vhdx,
        FormatId::Vmdk,
        FormatId::Qcow2,
        FormatId::Parallels,
        FormatId::UmlCow,
        FormatId::Vci,
    ];

    #[test]
    fn every_format_is_in_the_table_once_under_its_own_name() {
        for id in ALL {
            assert_eq!(id.info().id, id);
            assert_eq!(FormatId::from_name(id.name()), Some(id));
            assert_eq!(
                PROBE_ORDER.iter().filter(|info| info.id == id).count(),
                1,
                "{id:?}"
            );
        }
        assert_eq!(PROBE_ORDER.len(), ALL.len());
        assert_eq!(PROBE_ORDER.last().map(|info| info.id), Some(FormatId::Raw));
    }

    #[test]
    fn qemu_calls_vhd_vpc() {
        assert_eq!(FormatId::from_qemu_name("vpc"), Some(FormatId::Vhd));
        assert_eq!(FormatId::from_qemu_name("qcow2"), Some(FormatId::Qcow2));
        assert_eq!(FormatId::from_name("vpc"), None);
        assert_eq!(FormatId::from_name("nonesuch"), None);
    }
}
