//! Media registry, open-by-UUID, quick UUID and chain index tests.
//!
//! The registries are `.vbox`-style XML written here from the facts of the
//! VirtualBox layout (a `<VirtualBox>` root, `<MediaRegistry><HardDisks>`,
//! nested `<HardDisk uuid location format>`). Chains are spread over several
//! folders so only the registry can join them: VDI chains from the
//! hand-written builder in `support::vdi` over a qemu-made base, VHD chains
//! from the writer in `support::vhd` over a qemu-made base, VMDK chains made
//! by qemu-img and then moved. Expected bytes come from
//! `qemu-img convert -O raw` of the chain while it was still together, or
//! are worked out by hand; expected UUIDs are read from the files' bytes by
//! hand.
//!
//! Every test that uses the process-wide registry holds `LOCK` and clears
//! the registry first, so parallel tests do not see each other's entries.
//! No test looks at the real `$HOME`: the global-registry folders are
//! always passed in.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use cowdisk::formats::media_registry::{self as registry, MediaRegistry};
use cowdisk::formats::{self, OpenOptions, MAX_CHAIN_DEPTH};
use cowdisk::{Disk, DriveType, Error};
use support::vdi::{build_differencing_vdi, overlay, stored_guid_text, ChildBlock};
use support::{assert_unchanged, fingerprint, follow};

const MIB: u64 = 1 << 20;

static LOCK: Mutex<()> = Mutex::new(());

/// Serialises the tests that use the process-wide registry and empties it.
fn exclusive() -> MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    registry::clear();
    guard
}

/// A UUID's text as the bytes of the text, parsed by the uuid crate.
fn text_bytes(text: &str) -> [u8; 16] {
    *uuid::Uuid::parse_str(text).unwrap().as_bytes()
}

/// Fresh random bytes to store as a VDI's image UUID.
fn random_stored_uuid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn random_text() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A `.vbox` machine file whose media registry holds `disks` (HardDisk
/// elements).
fn machine_xml(disks: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<!-- written by the cowdisk tests -->
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{{}}}" name="test" OSType="Linux_64" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
{disks}
      </HardDisks>
      <DVDImages/>
    </MediaRegistry>
    <Hardware/>
  </Machine>
</VirtualBox>
"#,
        random_text()
    )
}

/// The global `VirtualBox.xml` layout.
fn global_xml(disks: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.12-linux">
  <Global>
    <MediaRegistry>
      <HardDisks>
{disks}
      </HardDisks>
    </MediaRegistry>
  </Global>
</VirtualBox>
"#
    )
}

fn mkdirs(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    path.to_path_buf()
}

fn read_all(disk: &mut dyn Disk) -> Vec<u8> {
    let mut out = vec![0u8; disk.sector_count() as usize * 512];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        disk.read_sectors(i as u64 * 2048, chunk).unwrap();
    }
    out
}

fn open_err(path: &Path, options: &OpenOptions) -> Error {
    support::open_error(path, options)
}

fn by_uuid_err(uuid: &[u8; 16], i_chain: usize) -> Error {
    match registry::open_by_uuid(uuid, i_chain, &follow()) {
        Ok(_) => panic!("open_by_uuid should have failed"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------
// A three-deep VDI chain over three folders.

struct VdiChain {
    _root: tempfile::TempDir,
    root: PathBuf,
    /// No VirtualBox.xml in here.
    home: PathBuf,
    vbox: PathBuf,
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    /// UUIDs as VirtualBox writes them (text).
    base_text: String,
    mid_text: String,
    top_text: String,
    base_bytes: Vec<u8>,
    mid_bytes: Vec<u8>,
    top_bytes: Vec<u8>,
}

/// `vm/base.vdi` (qemu-made), `other/mid.vdi` (named only by the
/// registry, by absolute path) and `vm/Snapshots/{top}.vdi`, with the
/// registry `vm/test.vbox` nesting top in mid in base. The registry is
/// written but not loaded.
fn vdi_chain() -> VdiChain {
    let root = support::temp_dir();
    let r = root.path().to_path_buf();
    let vm = mkdirs(&r.join("vm"));
    let snapshots = mkdirs(&vm.join("Snapshots"));
    let other = mkdirs(&r.join("other"));
    let home = mkdirs(&r.join("home/.config/VirtualBox"));

    let size = 4 * MIB + 3 * 512;
    let base = support::qemu_create(&vm, "base.vdi", "vdi", &[], &size.to_string());
    support::qemu_io(
        &base,
        "vdi",
        &[
            "write -P 0x11 0 1536".to_string(),
            format!("write -P 0x12 {} {}", MIB + 4096, MIB),
            format!("write -P 0x13 {} 1536", size - 1536),
        ],
    );
    let base_bytes = support::qemu_raw_bytes(&base, &r);
    let base_raw = std::fs::read(&base).unwrap();
    let base_stored: [u8; 16] = base_raw[0x188..0x198].try_into().unwrap();

    let mid_stored = random_stored_uuid();
    let mid_blocks = [
        ChildBlock::Stored { index: 0, seed: 31 },
        ChildBlock::Free,
        ChildBlock::Zero,
        ChildBlock::Free,
        ChildBlock::Stored { index: 1, seed: 32 },
    ];
    let mid = other.join("mid.vdi");
    build_differencing_vdi(&mid, size, mid_stored, &base_stored, &mid_blocks);
    let mid_bytes = overlay(&base_bytes, &mid_blocks);

    let top_stored = random_stored_uuid();
    let top_text = stored_guid_text(&top_stored);
    let top_blocks = [
        ChildBlock::Free,
        ChildBlock::Stored { index: 0, seed: 41 },
        ChildBlock::Free,
        ChildBlock::Zero,
        ChildBlock::Free,
    ];
    let top = snapshots.join(format!("{{{top_text}}}.vdi"));
    build_differencing_vdi(&top, size, top_stored, &mid_stored, &top_blocks);
    let top_bytes = overlay(&mid_bytes, &top_blocks);

    let base_text = stored_guid_text(&base_stored);
    let mid_text = stored_guid_text(&mid_stored);
    // Relative and absolute locations; one UUID in capitals.
    let disks = format!(
        r#"        <HardDisk uuid="{{{base}}}" location="base.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{{{mid}}}" location="{mid_path}" format="VDI">
            <HardDisk uuid="{{{top}}}" location="Snapshots/{{{top_text}}}.vdi" format="VDI"/>
          </HardDisk>
        </HardDisk>"#,
        base = base_text.to_uppercase(),
        mid = mid_text,
        mid_path = mid.display(),
        top = top_text,
    );
    let vbox = vm.join("test.vbox");
    std::fs::write(&vbox, machine_xml(&disks)).unwrap();
    VdiChain {
        _root: root,
        root: r,
        home,
        vbox,
        base,
        mid,
        top,
        base_text,
        mid_text,
        top_text,
        base_bytes,
        mid_bytes,
        top_bytes,
    }
}

#[test]
fn vdi_chain_across_folders_needs_the_registry() {
    let _guard = exclusive();
    let c = vdi_chain();
    let prints: Vec<_> = [&c.base, &c.mid, &c.top].map(|p| fingerprint(p)).into();

    // Without a registry the parent (in another folder) is not found, and
    // the error says what is missing.
    let err = open_err(&c.top, &follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    let text = err.to_string();
    assert!(text.contains(&c.mid_text), "{text}");
    assert!(text.contains("media registry"), "{text}");

    // Loading the registry from the top image's path finds the machine's
    // .vbox in the parent folder of Snapshots/.
    assert_eq!(
        registry::load_for_image_with(&c.top, std::slice::from_ref(&c.home)).unwrap(),
        3
    );
    assert_eq!(
        registry::lookup(&text_bytes(&c.mid_text)),
        Some(c.mid.clone())
    );
    assert_eq!(
        registry::lookup(&text_bytes(&c.base_text)),
        Some(c.root.join("vm/base.vdi"))
    );

    let mut disk = formats::open_path(&c.top, &follow()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vdi);
    assert!(read_all(disk.as_mut()) == c.top_bytes);
    support::compare_bytes(disk.as_mut(), &c.top_bytes);
    drop(disk);

    // Parents are still only followed when the caller asks.
    let err = open_err(&c.top, &OpenOptions::default());
    assert!(err.to_string().contains("follow-parent-paths"), "{err}");

    // The middle image opens on its own too (its parent is also elsewhere).
    let mut mid = formats::open_path(&c.mid, &follow()).unwrap();
    assert!(read_all(mid.as_mut()) == c.mid_bytes);
    drop(mid);

    for (path, before) in [&c.base, &c.mid, &c.top].iter().zip(&prints) {
        assert_unchanged(path, before);
    }
}

#[test]
fn vdi_open_by_uuid_opens_each_level() {
    let _guard = exclusive();
    let c = vdi_chain();
    // Not loaded yet: a clear error naming the UUID.
    let err = by_uuid_err(&text_bytes(&c.top_text), 0);
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains(&c.top_text), "{err}");

    registry::load_file(&c.vbox).unwrap();
    for (text, bytes) in [
        (&c.top_text, &c.top_bytes),
        (&c.mid_text, &c.mid_bytes),
        (&c.base_text, &c.base_bytes),
    ] {
        let uuid = text_bytes(text);
        let mut disk = registry::open_by_uuid(&uuid, 0, &follow()).unwrap();
        assert_eq!(disk.uuid(), Some(uuid), "{text}");
        assert!(read_all(disk.as_mut()) == *bytes, "{text}");
    }
    // Opening by UUID follows parents only when asked.
    assert!(registry::open_by_uuid(&text_bytes(&c.top_text), 0, &OpenOptions::default()).is_err());
    assert!(registry::open_by_uuid(&text_bytes(&c.base_text), 0, &OpenOptions::default()).is_ok());
}

#[test]
fn vdi_quick_uuid_reads_the_header_even_without_the_parent() {
    let _guard = exclusive();
    let c = vdi_chain();
    // No registry loaded: the top image cannot be opened, but its UUID can
    // be read. The expected value is the stored GUID turned to text by hand.
    assert!(formats::open_path(&c.top, &follow()).is_err());
    for (path, text) in [
        (&c.top, &c.top_text),
        (&c.mid, &c.mid_text),
        (&c.base, &c.base_text),
    ] {
        assert_eq!(registry::quick_uuid(path).unwrap(), text_bytes(text));
        assert_eq!(
            registry::quick_registry_uuid(path).unwrap(),
            text_bytes(text)
        );
    }
}

#[test]
fn chain_index_is_the_position_in_the_chain() {
    let _guard = exclusive();
    let c = vdi_chain();
    registry::load_file(&c.vbox).unwrap();
    let top_uuid = text_bytes(&c.top_text);
    let mid_uuid = text_bytes(&c.mid_text);

    // Index 0 and any index leaving room for the parents open the same disk
    // with its whole chain: the index says where the named disk sits, it
    // does not pick another disk.
    for i in [0, 1, MAX_CHAIN_DEPTH - 3] {
        let mut disk = registry::open_chain(&c.top, i, &follow()).unwrap();
        assert_eq!(disk.uuid(), Some(top_uuid));
        assert!(read_all(disk.as_mut()) == c.top_bytes, "index {i}");
        let mut disk = registry::open_by_uuid(&top_uuid, i, &follow()).unwrap();
        assert!(read_all(disk.as_mut()) == c.top_bytes, "index {i}");
    }
    // The top's two parents need indices i+1 and i+2 below the cap.
    let err = match registry::open_chain(&c.top, MAX_CHAIN_DEPTH - 2, &follow()) {
        Ok(_) => panic!("opened a chain past the depth cap"),
        Err(e) => e,
    };
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(registry::open_by_uuid(&top_uuid, MAX_CHAIN_DEPTH - 2, &follow()).is_err());
    // The middle disk has one parent; the base none.
    assert!(registry::open_by_uuid(&mid_uuid, MAX_CHAIN_DEPTH - 2, &follow()).is_ok());
    assert!(registry::open_by_uuid(&mid_uuid, MAX_CHAIN_DEPTH - 1, &follow()).is_err());
    let mut base = registry::open_chain(&c.base, MAX_CHAIN_DEPTH - 1, &follow()).unwrap();
    assert!(read_all(base.as_mut()) == c.base_bytes);
    // An index at or past the cap is refused outright.
    for i in [MAX_CHAIN_DEPTH, usize::MAX] {
        let err = match registry::open_chain(&c.base, i, &follow()) {
            Ok(_) => panic!("index {i} accepted"),
            Err(e) => e,
        };
        assert!(err.kind() == cowdisk::error::ErrorCode::InvalidArg, "{err}");
        assert!(by_uuid_err(&top_uuid, i).kind() == cowdisk::error::ErrorCode::InvalidArg);
    }
}

// ---------------------------------------------------------------------------
// Where the registry is looked for, and which file wins.

#[test]
fn registry_files_and_their_priority() {
    let root = support::temp_dir();
    let r = root.path();
    let vm = mkdirs(&r.join("vm"));
    let snapshots = mkdirs(&vm.join("Snapshots"));
    let home1 = mkdirs(&r.join("home/.config/VirtualBox"));
    let home2 = mkdirs(&r.join("home/.VirtualBox"));
    let image = snapshots.join("img.vdi");
    std::fs::write(&image, b"not read").unwrap();

    let shared = random_text();
    let only_global = random_text();
    let only_old_global = random_text();
    let only_parent = random_text();
    let disk = |uuid: &str, location: &str| {
        format!(r#"<HardDisk uuid="{{{uuid}}}" location="{location}" format="VDI"/>"#)
    };
    let global = [
        disk(&shared, "from-global.vdi"),
        disk(&only_global, "g.vdi"),
    ];
    std::fs::write(home1.join("VirtualBox.xml"), global_xml(&global.concat())).unwrap();
    std::fs::write(
        home2.join("VirtualBox.xml"),
        global_xml(
            &[
                disk(&shared, "old.vdi"),
                disk(&only_old_global, "o.vdi"),
                disk(&only_global, "og.vdi"),
            ]
            .concat(),
        ),
    )
    .unwrap();
    std::fs::write(
        vm.join("machine.vbox"),
        machine_xml(
            &[
                disk(&shared, "from-parent.vdi"),
                disk(&only_parent, "p.vdi"),
            ]
            .concat(),
        ),
    )
    .unwrap();
    let homes = [home1.clone(), home2.clone()];
    let at = |reg: &MediaRegistry, uuid: &str| reg.get(&text_bytes(uuid)).unwrap().location.clone();

    let reg = MediaRegistry::for_image(&image, &homes).unwrap();
    assert_eq!(reg.len(), 4);
    assert_eq!(at(&reg, &shared), vm.join("from-parent.vdi"));
    assert_eq!(at(&reg, &only_global), home1.join("g.vdi"));
    assert_eq!(at(&reg, &only_old_global), home2.join("o.vdi"));
    assert_eq!(at(&reg, &only_parent), vm.join("p.vdi"));

    // A .vbox beside the image beats the one in the parent folder.
    std::fs::write(
        snapshots.join("beside.vbox"),
        machine_xml(&disk(&shared, "from-beside.vdi")),
    )
    .unwrap();
    let reg = MediaRegistry::for_image(&image, &homes).unwrap();
    assert_eq!(at(&reg, &shared), snapshots.join("from-beside.vdi"));

    // CloneVDI_Media.xml beside the image beats everything.
    std::fs::write(
        snapshots.join("CloneVDI_Media.xml"),
        machine_xml(&disk(&shared, "from-legacy.vdi")),
    )
    .unwrap();
    let reg = MediaRegistry::for_image(&image, &homes).unwrap();
    assert_eq!(at(&reg, &shared), snapshots.join("from-legacy.vdi"));
    assert_eq!(
        registry::registry_files_for_image(&image, &homes).unwrap(),
        vec![
            snapshots.join("CloneVDI_Media.xml"),
            snapshots.join("beside.vbox"),
            vm.join("machine.vbox"),
            home1.join("VirtualBox.xml"),
            home2.join("VirtualBox.xml"),
        ]
    );

    // Nothing anywhere: a clear error listing where it looked.
    let lonely = support::temp_dir();
    let alone = lonely.path().join("alone.vdi");
    std::fs::write(&alone, b"x").unwrap();
    let err = MediaRegistry::for_image(&alone, &[lonely.path().join("nohome")]).unwrap_err();
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("CloneVDI_Media.xml"), "{err}");
    assert!(err.to_string().contains("nohome"), "{err}");
    // A missing image is an error too.
    assert!(MediaRegistry::for_image(&lonely.path().join("gone.vdi"), &[]).is_err());
}

#[test]
fn later_loads_replace_earlier_entries() {
    let _guard = exclusive();
    let dir = support::temp_dir();
    let uuid = random_text();
    let other = random_text();
    let a = dir.path().join("a.vbox");
    let b = dir.path().join("b.vbox");
    std::fs::write(
        &a,
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{uuid}}}" location="one.vdi"/><HardDisk uuid="{{{other}}}" location="two.vdi"/>"#
        )),
    )
    .unwrap();
    std::fs::write(
        &b,
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{uuid}}}" location="three.vdi"/>"#
        )),
    )
    .unwrap();
    assert_eq!(registry::load_file(&a).unwrap(), 2);
    assert_eq!(registry::load_file(&b).unwrap(), 1);
    assert_eq!(
        registry::lookup(&text_bytes(&uuid)),
        Some(dir.path().join("three.vdi"))
    );
    assert_eq!(
        registry::lookup(&text_bytes(&other)),
        Some(dir.path().join("two.vdi"))
    );
    assert_eq!(registry::snapshot().len(), 2);
    registry::clear();
    assert_eq!(registry::lookup(&text_bytes(&other)), None);
}

// ---------------------------------------------------------------------------
// VMDK chains made by qemu-img, then moved apart.

struct VmdkChain {
    _root: tempfile::TempDir,
    home: PathBuf,
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    /// Made-up registry UUIDs (qemu writes none into the images).
    uuids: [String; 3],
    bytes: [Vec<u8>; 3],
}

fn vmdk_chain() -> VmdkChain {
    let root = support::temp_dir();
    let r = root.path().to_path_buf();
    let build = mkdirs(&r.join("build"));
    let base = support::qemu_create(&build, "base.vmdk", "vmdk", &[], "5M");
    support::qemu_io(&base, "vmdk", &["write -P 0x51 0 5M".to_string()]);
    let mid = support::qemu_create(
        &build,
        "mid.vmdk",
        "vmdk",
        &["-b", "base.vmdk", "-F", "vmdk"],
        "",
    );
    support::qemu_io(
        &mid,
        "vmdk",
        &[
            "write -P 0x52 65536 70000".to_string(),
            "write -z 2097152 1048576".to_string(),
        ],
    );
    let top = support::qemu_create(
        &build,
        "top.vmdk",
        "vmdk",
        &["-b", "mid.vmdk", "-F", "vmdk"],
        "",
    );
    support::qemu_io(
        &top,
        "vmdk",
        &[
            "write -P 0x53 100000 300000".to_string(),
            "write -P 0x54 4194304 512".to_string(),
        ],
    );
    let bytes = [
        support::qemu_raw_bytes(&base, &r),
        support::qemu_raw_bytes(&mid, &r),
        support::qemu_raw_bytes(&top, &r),
    ];
    // Apart: the base in the machine folder, the middle in Snapshots/, the
    // top elsewhere. The hints ("base.vmdk", "mid.vmdk") now miss.
    let vm = mkdirs(&r.join("vm"));
    let snapshots = mkdirs(&vm.join("Snapshots"));
    let other = mkdirs(&r.join("other"));
    let moved = [
        vm.join("base.vmdk"),
        snapshots.join("mid.vmdk"),
        other.join("top.vmdk"),
    ];
    for (from, to) in [&base, &mid, &top].iter().zip(&moved) {
        std::fs::rename(from, to).unwrap();
    }
    std::fs::remove_dir(&build).unwrap();
    let uuids = [random_text(), random_text(), random_text()];
    let disks = format!(
        r#"<HardDisk uuid="{{{}}}" location="base.vmdk" format="VMDK">
             <HardDisk uuid="{{{}}}" location="Snapshots/mid.vmdk" format="VMDK">
               <HardDisk uuid="{{{}}}" location="{}" format="VMDK"/>
             </HardDisk>
           </HardDisk>"#,
        uuids[0],
        uuids[1],
        uuids[2],
        moved[2].display()
    );
    std::fs::write(vm.join("test.vbox"), machine_xml(&disks)).unwrap();
    let [base, mid, top] = moved;
    VmdkChain {
        _root: root,
        home: r.join("home"),
        base,
        mid,
        top,
        uuids,
        bytes,
    }
}

#[test]
fn vmdk_chain_moved_apart_matches_qemu_through_the_registry() {
    let _guard = exclusive();
    let c = vmdk_chain();
    let prints: Vec<_> = [&c.base, &c.mid, &c.top].map(|p| fingerprint(p)).into();

    let err = open_err(&c.top, &follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("mid.vmdk"), "{err}");
    assert!(err.to_string().contains("media registry"), "{err}");

    // The images record no UUIDs: the registry finds each child's own entry
    // by its file, and the parent by the nesting.
    assert_eq!(
        registry::load_for_image_with(&c.mid, std::slice::from_ref(&c.home)).unwrap(),
        3
    );
    let mut disk = formats::open_path(&c.top, &follow()).unwrap();
    support::compare_bytes(disk.as_mut(), &c.bytes[2]);
    drop(disk);

    for (uuid, bytes) in c.uuids.iter().zip(&c.bytes) {
        let mut disk = registry::open_by_uuid(&text_bytes(uuid), 0, &follow()).unwrap();
        assert_eq!(disk.drive_type(), DriveType::Vmdk);
        assert!(read_all(disk.as_mut()) == *bytes, "{uuid}");
    }
    // qemu writes no ddb.uuid.image.
    let err = registry::quick_uuid(&c.top).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("ddb.uuid.image"), "{err}");

    for (path, before) in [&c.base, &c.mid, &c.top].iter().zip(&prints) {
        assert_unchanged(path, before);
    }
}

/// Appends `lines` to a text descriptor (before the NUL padding QEMU may
/// leave after the text, which is dropped).
fn append_to_descriptor(path: &Path, lines: &str) {
    let mut text = std::fs::read(path).unwrap();
    let used = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    text.truncate(used);
    text.extend_from_slice(lines.as_bytes());
    std::fs::write(path, text).unwrap();
}

#[test]
fn vmdk_descriptor_uuids_pick_the_parent() {
    let _guard = exclusive();
    let root = support::temp_dir();
    let r = root.path();
    let build = mkdirs(&r.join("build"));
    // Text descriptors (flat base, split sparse child) so UUID lines can be
    // added as VirtualBox writes them.
    let base = support::qemu_create(
        &build,
        "base.vmdk",
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
        "3M",
    );
    support::qemu_io(&base, "vmdk", &["write -P 0x61 0 3M".to_string()]);
    let child = support::qemu_create(
        &build,
        "child.vmdk",
        "vmdk",
        &[
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
        ],
        "",
    );
    support::qemu_io(&child, "vmdk", &["write -P 0x62 512 1024".to_string()]);
    let expected = support::qemu_raw_bytes(&child, r);
    let base_uuid = random_text();
    let child_uuid = random_text();
    append_to_descriptor(&base, &format!("ddb.uuid.image=\"{base_uuid}\"\nddb.uuid.parent=\"00000000-0000-0000-0000-000000000000\"\n"));
    append_to_descriptor(
        &child,
        &format!(
            "ddb.uuid.image=\"{child_uuid}\"\nddb.uuid.parent=\"{}\"\n",
            base_uuid.to_uppercase()
        ),
    );
    assert_eq!(registry::quick_uuid(&base).unwrap(), text_bytes(&base_uuid));
    assert_eq!(
        registry::quick_uuid(&child).unwrap(),
        text_bytes(&child_uuid)
    );

    // Move the base (descriptor and its flat extent) away.
    let away = mkdirs(&r.join("away"));
    for name in ["base.vmdk", "base-flat.vmdk"] {
        std::fs::rename(build.join(name), away.join(name)).unwrap();
    }
    let err = open_err(&child, &follow());
    assert!(err.to_string().contains(&base_uuid), "{err}");

    // A registry beside the child (the legacy file name), by UUID only: no
    // nesting, so the child's ddb.uuid.parent is what finds the base.
    std::fs::write(
        build.join("CloneVDI_Media.xml"),
        format!(
            r#"<CloneVDI><MediaRegistry><HardDisks>
                 <HardDisk uuid="{{{base_uuid}}}" location="../away/base.vmdk"/>
               </HardDisks></MediaRegistry></CloneVDI>"#
        ),
    )
    .unwrap();
    assert_eq!(registry::load_for_image_with(&child, &[]).unwrap(), 1);
    let mut disk = formats::open_path(&child, &follow()).unwrap();
    support::compare_bytes(disk.as_mut(), &expected);
    drop(disk);

    // A registry pointing the base's UUID at a disk with another
    // ddb.uuid.image is caught.
    let impostor = support::qemu_create(
        &away,
        "impostor.vmdk",
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
        "3M",
    );
    append_to_descriptor(
        &impostor,
        &format!("ddb.uuid.image=\"{}\"\n", random_text()),
    );
    std::fs::write(
        build.join("CloneVDI_Media.xml"),
        format!(
            r#"<CloneVDI><MediaRegistry><HardDisks>
                 <HardDisk uuid="{{{base_uuid}}}" location="../away/impostor.vmdk"/>
               </HardDisks></MediaRegistry></CloneVDI>"#
        ),
    )
    .unwrap();
    registry::load_for_image_with(&child, &[]).unwrap();
    let err = open_err(&child, &follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
    assert!(
        by_uuid_err(&text_bytes(&base_uuid), 0).kind() == cowdisk::error::ErrorCode::SourceMismatch
    );
}

// ---------------------------------------------------------------------------
// VHD: VirtualBox writes a VHD's UUID as the GUID its footer bytes spell.

#[test]
fn vhd_registry_uuid_is_the_footer_read_as_a_guid() {
    let _guard = exclusive();
    let dir = support::temp_dir();
    let vhd = support::qemu_create(dir.path(), "disk.vhd", "vpc", &[], "2M");
    support::qemu_io(&vhd, "vpc", &["write -P 0x71 0 4096".to_string()]);
    let expected = support::qemu_raw_bytes(&vhd, dir.path());
    let bytes = std::fs::read(&vhd).unwrap();
    let footer_id: [u8; 16] = bytes[bytes.len() - 512 + 68..bytes.len() - 512 + 84]
        .try_into()
        .unwrap();
    // What Disk::uuid gives: the footer bytes as stored.
    assert_eq!(registry::quick_uuid(&vhd).unwrap(), footer_id);
    // VirtualBox's text: the first three fields read little-endian.
    let vbox_text = stored_guid_text(&footer_id);
    assert_eq!(
        registry::quick_registry_uuid(&vhd).unwrap(),
        text_bytes(&vbox_text)
    );

    std::fs::write(
        dir.path().join("m.vbox"),
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{vbox_text}}}" location="disk.vhd" format="VHD"/>"#
        )),
    )
    .unwrap();
    registry::load_for_image_with(&vhd, &[]).unwrap();
    let mut disk = registry::open_by_uuid(&text_bytes(&vbox_text), 0, &follow()).unwrap();
    assert_eq!(disk.uuid(), Some(footer_id));
    assert!(read_all(disk.as_mut())[..expected.len()] == expected[..]);
    drop(disk);

    // The same file registered under its raw bytes (not how VirtualBox
    // writes it) is a mismatch, unless the bytes happen to be symmetric.
    let raw_text = uuid::Uuid::from_bytes(footer_id).hyphenated().to_string();
    if raw_text != vbox_text {
        std::fs::write(
            dir.path().join("m.vbox"),
            machine_xml(&format!(
                r#"<HardDisk uuid="{{{raw_text}}}" location="disk.vhd" format="VHD"/>"#
            )),
        )
        .unwrap();
        registry::load_for_image_with(&vhd, &[]).unwrap();
        assert!(by_uuid_err(&footer_id, 0).kind() == cowdisk::error::ErrorCode::SourceMismatch);
    }
}

/// A three-deep VHD chain over three folders: a qemu-made base in `vm/`, a
/// differencing middle in `vm/Snapshots/` and a differencing top in
/// `other/` (both from the test writer), whose parent locators name files
/// beside them that are not there. The registry `vm/test.vbox` writes each
/// UUID as VirtualBox does (the footer bytes read as a GUID).
#[test]
fn vhd_chain_across_folders_opens_through_the_registry() {
    use support::vhd::{child_block, overlay as vhd_overlay, utf16le, VhdBuilder};
    let _guard = exclusive();
    let root = support::temp_dir();
    let r = root.path();
    let vm = mkdirs(&r.join("vm"));
    let snapshots = mkdirs(&vm.join("Snapshots"));
    let other = mkdirs(&r.join("other"));
    let size = 6 * MIB;
    let base = support::qemu_create(
        &vm,
        "base.vhd",
        "vpc",
        &["-o", "subformat=dynamic,force_size=on"],
        &size.to_string(),
    );
    support::qemu_io(
        &base,
        "vpc",
        &[
            "write -P 0x81 0 1M".to_string(),
            "write -P 0x82 4M 64k".to_string(),
        ],
    );
    let base_bytes = support::qemu_raw_bytes(&base, r);
    let footer_id = |path: &Path| -> [u8; 16] {
        let bytes = std::fs::read(path).unwrap();
        bytes[bytes.len() - 512 + 68..bytes.len() - 512 + 84]
            .try_into()
            .unwrap()
    };
    let base_id = footer_id(&base);
    let locators = |name: &str| {
        vec![
            (*b"W2ru", utf16le(&format!(r".\{name}"))),
            (*b"W2ku", utf16le(&format!(r"C:\gone\{name}"))),
        ]
    };
    let mid_id = random_stored_uuid();
    let mid_builder = VhdBuilder {
        size,
        disk_type: 4,
        unique_id: mid_id,
        parent_id: base_id,
        parent_name: "base.vhd".into(),
        locators: locators("base.vhd"),
        blocks: vec![
            child_block(0, |s| s % 3 == 0, 51),
            child_block(2, |_| true, 52),
        ],
    };
    let mid = snapshots.join("mid.vhd");
    std::fs::write(&mid, mid_builder.build()).unwrap();
    let mut mid_bytes = base_bytes.clone();
    vhd_overlay(&mut mid_bytes, &mid_builder.blocks);

    let top_id = random_stored_uuid();
    let top_builder = VhdBuilder {
        size,
        disk_type: 4,
        unique_id: top_id,
        parent_id: mid_id,
        parent_name: "mid.vhd".into(),
        locators: locators("mid.vhd"),
        blocks: vec![
            child_block(0, |s| s < 10, 61),
            child_block(1, |s| s > 4000, 62),
        ],
    };
    let top = other.join("top.vhd");
    std::fs::write(&top, top_builder.build()).unwrap();
    let mut top_bytes = mid_bytes.clone();
    vhd_overlay(&mut top_bytes, &top_builder.blocks);

    let [base_text, mid_text, top_text] = [base_id, mid_id, top_id].map(|id| stored_guid_text(&id));
    let disks = format!(
        r#"<HardDisk uuid="{{{base_text}}}" location="base.vhd" format="VHD">
             <HardDisk uuid="{{{mid_text}}}" location="Snapshots/mid.vhd" format="VHD">
               <HardDisk uuid="{{{top_text}}}" location="{}" format="VHD"/>
             </HardDisk>
           </HardDisk>"#,
        top.display()
    );
    std::fs::write(vm.join("test.vbox"), machine_xml(&disks)).unwrap();

    let err = open_err(&top, &follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains(&mid_text), "{err}");

    assert_eq!(registry::load_for_image_with(&mid, &[]).unwrap(), 3);
    let mut disk = formats::open_path(&top, &follow()).unwrap();
    assert_eq!(disk.drive_type(), DriveType::Vhd);
    support::compare_bytes(disk.as_mut(), &top_bytes);
    drop(disk);
    for (text, id, bytes) in [
        (&top_text, top_id, &top_bytes),
        (&mid_text, mid_id, &mid_bytes),
        (&base_text, base_id, &base_bytes),
    ] {
        let mut disk = registry::open_by_uuid(&text_bytes(text), 0, &follow()).unwrap();
        assert_eq!(disk.uuid(), Some(id));
        assert!(read_all(disk.as_mut()) == *bytes, "{text}");
    }
    assert_eq!(registry::quick_uuid(&top).unwrap(), top_id);
    assert_eq!(
        registry::quick_registry_uuid(&top).unwrap(),
        text_bytes(&top_text)
    );
}

/// VirtualBox records a parent's UUID in its own in-memory layout: a VDI
/// child's linkage field over a VHD parent holds the VHD's footer bytes as
/// stored, and a VHD child's parent id over a VDI parent holds the VDI's
/// stored UUID bytes. Such mixed chains are found through the registry (a
/// VDI child only scans its folder for `.vdi` files) and accepted.
#[test]
fn mixed_vdi_and_vhd_chains_through_the_registry() {
    use support::vhd::{child_block, overlay as vhd_overlay, utf16le, VhdBuilder};
    let _guard = exclusive();
    let root = support::temp_dir();
    let r = root.path();
    let bases = mkdirs(&r.join("bases"));
    let children = mkdirs(&r.join("children"));
    let size = 4 * MIB;

    // A VDI child over a VHD parent.
    let vhd = support::qemu_create(
        &bases,
        "parent.vhd",
        "vpc",
        &["-o", "subformat=dynamic,force_size=on"],
        &size.to_string(),
    );
    support::qemu_io(&vhd, "vpc", &["write -P 0x91 0 2M".to_string()]);
    let vhd_bytes = support::qemu_raw_bytes(&vhd, r);
    let vhd_raw = std::fs::read(&vhd).unwrap();
    let footer_id: [u8; 16] = vhd_raw[vhd_raw.len() - 512 + 68..vhd_raw.len() - 512 + 84]
        .try_into()
        .unwrap();
    let vdi_child = children.join("over-vhd.vdi");
    let vdi_blocks = [
        ChildBlock::Free,
        ChildBlock::Stored { index: 0, seed: 71 },
        ChildBlock::Zero,
        ChildBlock::Free,
    ];
    let vdi_child_stored = random_stored_uuid();
    build_differencing_vdi(&vdi_child, size, vdi_child_stored, &footer_id, &vdi_blocks);

    // A VHD child over a VDI parent.
    let vdi = support::qemu_create(&bases, "parent.vdi", "vdi", &[], &size.to_string());
    support::qemu_io(&vdi, "vdi", &["write -P 0x92 1M 2M".to_string()]);
    let vdi_bytes = support::qemu_raw_bytes(&vdi, r);
    let vdi_stored: [u8; 16] = std::fs::read(&vdi).unwrap()[0x188..0x198]
        .try_into()
        .unwrap();
    let vhd_child_builder = VhdBuilder {
        size,
        disk_type: 4,
        unique_id: random_stored_uuid(),
        parent_id: vdi_stored,
        parent_name: "parent.vdi".into(),
        locators: vec![(*b"W2ru", utf16le(r".\parent.vdi"))],
        blocks: vec![child_block(1, |s| s < 100, 72)],
    };
    let vhd_child = children.join("over-vdi.vhd");
    std::fs::write(&vhd_child, vhd_child_builder.build()).unwrap();

    std::fs::write(
        children.join("CloneVDI_Media.xml"),
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{}}}" location="../bases/parent.vhd" format="VHD">
                 <HardDisk uuid="{{{}}}" location="over-vhd.vdi" format="VDI"/>
               </HardDisk>
               <HardDisk uuid="{{{}}}" location="../bases/parent.vdi" format="VDI">
                 <HardDisk uuid="{{{}}}" location="over-vdi.vhd" format="VHD"/>
               </HardDisk>"#,
            stored_guid_text(&footer_id),
            stored_guid_text(&vdi_child_stored),
            stored_guid_text(&vdi_stored),
            stored_guid_text(&vhd_child_builder.unique_id),
        )),
    )
    .unwrap();
    assert!(open_err(&vdi_child, &follow())
        .to_string()
        .contains("media registry"));
    assert_eq!(registry::load_for_image_with(&vdi_child, &[]).unwrap(), 4);

    let mut disk = formats::open_path(&vdi_child, &follow()).unwrap();
    assert!(read_all(disk.as_mut()) == overlay(&vhd_bytes, &vdi_blocks));
    drop(disk);
    let mut expected = vdi_bytes.clone();
    vhd_overlay(&mut expected, &vhd_child_builder.blocks);
    let mut disk = formats::open_path(&vhd_child, &follow()).unwrap();
    assert!(read_all(disk.as_mut()) == expected);
    drop(disk);

    // The same children over the other base are refused.
    let wrong = formats::open_path(&vdi, &OpenOptions::default()).unwrap();
    let err = cowdisk::formats::vdi::VdiDisk::open_with_parent(&vdi_child, wrong).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
    let wrong = formats::open_path(&vhd, &OpenOptions::default()).unwrap();
    let err = cowdisk::formats::vhd::VhdDisk::open_with_parent(&vhd_child, wrong).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
}

#[test]
fn quick_uuid_of_vhdx_and_vci() {
    let dir = support::temp_dir();
    // VHDX: the page 83 GUID, as Disk::uuid reports it (qemu-img info does
    // not show it: the reader is the reference here).
    let vhdx = support::qemu_create(dir.path(), "d.vhdx", "vhdx", &[], "8M");
    let disk = formats::open_path(&vhdx, &OpenOptions::default()).unwrap();
    assert_eq!(registry::quick_uuid(&vhdx).unwrap(), disk.uuid().unwrap());
    drop(disk);
    // VCI: the UUID it was created with.
    let uuid = random_stored_uuid();
    let vci = dir.path().join("d.vci");
    let params = cowdisk::formats::CreateParams {
        size: MIB,
        uuid: Some(uuid),
        ..Default::default()
    };
    drop(cowdisk::formats::vci::Vci::create(&vci, &params).unwrap());
    assert_eq!(registry::quick_uuid(&vci).unwrap(), uuid);
    assert_eq!(registry::quick_registry_uuid(&vci).unwrap(), uuid);
}

#[test]
fn formats_without_a_uuid_say_so() {
    let dir = support::temp_dir();
    let qcow2 = support::qemu_create(dir.path(), "d.qcow2", "qcow2", &[], "1M");
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    for path in [&qcow2, &raw] {
        let err = registry::quick_uuid(path).unwrap_err();
        assert!(
            err.kind() == cowdisk::error::ErrorCode::Unsupported,
            "{err}"
        );
        assert!(err.to_string().contains("no UUID"), "{err}");
    }
    let err = registry::quick_uuid(&dir.path().join("missing.vdi")).unwrap_err();
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
}

// ---------------------------------------------------------------------------
// Bad input.

/// Writes `text` as `dir/bad.vbox` and returns the load's error.
fn load_error(text: &[u8]) -> Error {
    let dir = support::temp_dir();
    let path = dir.path().join("bad.vbox");
    std::fs::write(&path, text).unwrap();
    let started = Instant::now();
    let err = MediaRegistry::new().load_file(&path).unwrap_err();
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("bad.vbox"), "{err}");
    err
}

#[test]
fn malformed_registries_are_clear_errors() {
    let uuid = random_text();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"<VirtualBox><MediaRegistry><HardDisks>".to_vec(), "well-formed"),
        (b"".to_vec(), "well-formed"),
        (b"not xml at all".to_vec(), "well-formed"),
        (vec![0xFF, 0xFE, b'<', 0], "UTF-8"),
        (
            machine_xml(r#"<HardDisk location="a.vdi"/>"#).into_bytes(),
            "no uuid",
        ),
        (
            machine_xml(r#"<HardDisk uuid="{1234}" location="a.vdi"/>"#).into_bytes(),
            "not a UUID",
        ),
        (
            machine_xml(&format!(r#"<HardDisk uuid="{{{uuid}}}"/>"#)).into_bytes(),
            "no location",
        ),
        (
            machine_xml(&format!(
                r#"<HardDisk uuid="{{{uuid}}}" location="a.vdi"><HardDisk uuid="{{{}}}" location="b.vdi"/></HardDisk>
                   <HardDisk uuid="{{{}}}" location="c.vdi"/>"#,
                uuid,
                uuid.to_uppercase()
            ))
            .into_bytes(),
            "both describe",
        ),
        // Entity expansion ("billion laughs") needs a DTD, which is refused.
        (
            br#"<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><VirtualBox>&b;</VirtualBox>"#.to_vec(),
            "well-formed",
        ),
    ];
    for (text, wanted) in cases {
        let err = load_error(&text);
        assert!(err.to_string().contains(wanted), "{wanted}: {err}");
        assert!(err.kind() == cowdisk::error::ErrorCode::Corrupt, "{err}");
    }
}

#[test]
fn huge_and_deep_registries_are_refused() {
    // Nested HardDisk elements past the cap.
    let depth = registry::MAX_NESTING + 1;
    let mut disks = String::new();
    for i in 0..depth {
        disks.push_str(&format!(
            r#"<HardDisk uuid="{{{}}}" location="{i}.vdi">"#,
            uuid::Uuid::from_u128(i as u128 + 1).hyphenated()
        ));
    }
    disks.push_str(&"</HardDisk>".repeat(depth));
    let err = load_error(machine_xml(&disks).as_bytes());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("nested"), "{err}");

    // Plain elements nested as deep as the node cap allows: no stack
    // overflow, and no entries.
    let levels = registry::MAX_XML_NODES as usize - 10;
    let deep = format!(
        "<VirtualBox>{}{}</VirtualBox>",
        "<a>".repeat(levels),
        "</a>".repeat(levels)
    );
    let dir = support::temp_dir();
    let path = dir.path().join("deep.vbox");
    std::fs::write(&path, deep).unwrap();
    let started = Instant::now();
    assert_eq!(MediaRegistry::new().load_file(&path).unwrap(), 0);
    assert!(started.elapsed().as_secs() < 20);

    // Many entries: read in one pass, not a rescan per entry.
    let count = 150_000;
    let mut disks = String::new();
    for i in 0..count {
        disks.push_str(&format!(
            "<HardDisk uuid=\"{{{}}}\" location=\"d{i}.vdi\"/>\n",
            uuid::Uuid::from_u128(i as u128 + 1).hyphenated()
        ));
    }
    let path = dir.path().join("many.vbox");
    std::fs::write(&path, machine_xml(&disks)).unwrap();
    let started = Instant::now();
    let mut many = MediaRegistry::new();
    assert_eq!(many.load_file(&path).unwrap(), count);
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
    let last = many
        .get(uuid::Uuid::from_u128(count as u128).as_bytes())
        .unwrap();
    assert_eq!(
        last.location,
        dir.path().join(format!("d{}.vdi", count - 1))
    );
    assert_eq!(last.line, 7 + count as u32 - 1); // the first disk is on line 7

    // More nodes than the cap.
    let many = format!(
        "<VirtualBox>{}</VirtualBox>",
        "<a/>".repeat(registry::MAX_XML_NODES as usize + 10)
    );
    let err = load_error(many.as_bytes());
    assert!(err.kind() == cowdisk::error::ErrorCode::Corrupt, "{err}");

    // A file over the size cap is refused before it is parsed (a sparse
    // file: nothing is written).
    let dir = support::temp_dir();
    let path = dir.path().join("big.vbox");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(registry::MAX_REGISTRY_BYTES + 1).unwrap();
    let err = MediaRegistry::new().load_file(&path).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("larger than"), "{err}");
}

/// Shapes of XML that make a parser's work grow faster than the input:
/// refused before parsing, or read in time proportional to the file.
#[test]
fn pathological_xml_is_refused_or_read_quickly() {
    let dir = support::temp_dir();
    let load = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let started = Instant::now();
        let result = MediaRegistry::new().load_file(&path);
        let took = started.elapsed();
        assert!(took.as_secs() < 20, "{name} took {took:?}");
        result
    };
    // One element with 400,000 attributes (a parser checks each against
    // the ones before it for duplicates).
    let attrs: String = (0..400_000).map(|i| format!(" a{i}=\"\"")).collect();
    let err = load("attrs.vbox", format!("<VirtualBox{attrs}/>")).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("attributes"), "{err}");
    // A namespace declared on each of 100,000 nested elements (each copies
    // those in scope).
    let open: String = (0..100_000)
        .map(|i| format!("<e xmlns:p{i}=\"u\">"))
        .collect();
    let err = load("ns.vbox", format!("<VirtualBox>{open}")).unwrap_err();
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("namespace"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
    // Millions of character and entity references in text and in a value.
    let refs = "&#65;&amp;&lt;".repeat(1_000_000);
    assert_eq!(
        load("text.vbox", format!("<VirtualBox>{refs}</VirtualBox>")).unwrap(),
        0
    );
    let uuid = random_text();
    let entries = load(
        "value.vbox",
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{uuid}}}" location="{refs}"/>"#
        )),
    )
    .unwrap();
    assert_eq!(entries, 1);
    // 900,000 comments and processing instructions.
    let junk = "<!-- a=\"b\" --><?pi x=\"y\"?>".repeat(450_000);
    assert_eq!(
        load("junk.vbox", format!("<VirtualBox>{junk}</VirtualBox>")).unwrap(),
        0
    );
}

#[test]
fn a_bad_file_fails_the_whole_load() {
    let _guard = exclusive();
    let c = vdi_chain();
    // A good machine file, and a broken global one: nothing is loaded.
    std::fs::write(c.home.join("VirtualBox.xml"), b"<VirtualBox>").unwrap();
    let err = registry::load_for_image_with(&c.top, std::slice::from_ref(&c.home)).unwrap_err();
    assert!(err.to_string().contains("VirtualBox.xml"), "{err}");
    assert_eq!(registry::lookup(&text_bytes(&c.top_text)), None);
}

#[test]
fn registry_naming_missing_or_wrong_files() {
    let _guard = exclusive();
    let c = vdi_chain();
    // The middle disk's entry points at a file that is not there.
    let gone = c.root.join("gone/mid.vdi");
    let text = std::fs::read_to_string(&c.vbox).unwrap();
    std::fs::write(
        &c.vbox,
        text.replace(&c.mid.display().to_string(), &gone.display().to_string()),
    )
    .unwrap();
    registry::load_file(&c.vbox).unwrap();
    let err = by_uuid_err(&text_bytes(&c.mid_text), 0);
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("gone/mid.vdi"), "{err}");
    assert!(err.to_string().contains("test.vbox"), "{err}");
    let err = open_err(&c.top, &follow());
    assert!(err.kind() == cowdisk::error::ErrorCode::Open, "{err}");
    assert!(err.to_string().contains("gone/mid.vdi"), "{err}");

    // The middle disk's entry points at the base: the child checks the
    // UUID it was made on.
    std::fs::write(
        &c.vbox,
        text.replace(&c.mid.display().to_string(), &c.base.display().to_string()),
    )
    .unwrap();
    registry::load_file(&c.vbox).unwrap();
    let err = open_err(&c.top, &follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::SourceMismatch,
        "{err}"
    );
    assert!(err.to_string().contains(&c.mid_text), "{err}");
    assert!(
        by_uuid_err(&text_bytes(&c.mid_text), 0).kind()
            == cowdisk::error::ErrorCode::SourceMismatch
    );
}

#[test]
fn uuid_loops_through_the_registry_end_in_an_error() {
    let _guard = exclusive();
    let root = support::temp_dir();
    let r = root.path();
    let one = mkdirs(&r.join("one"));
    let two = mkdirs(&r.join("two"));
    // Two differencing images in different folders, each made on the other;
    // the registry knows both, so each parent is always found.
    let a_stored = random_stored_uuid();
    let b_stored = random_stored_uuid();
    let a = one.join("a.vdi");
    let b = two.join("b.vdi");
    build_differencing_vdi(&a, MIB, a_stored, &b_stored, &[ChildBlock::Free]);
    build_differencing_vdi(&b, MIB, b_stored, &a_stored, &[ChildBlock::Free]);
    // A third entry naming itself as its own parent's file.
    let c_stored = random_stored_uuid();
    let c = one.join("c.vdi");
    build_differencing_vdi(&c, MIB, c_stored, &c_stored, &[ChildBlock::Free]);
    std::fs::write(
        one.join("CloneVDI_Media.xml"),
        machine_xml(&format!(
            r#"<HardDisk uuid="{{{}}}" location="a.vdi"><HardDisk uuid="{{{}}}" location="../two/b.vdi"/></HardDisk>
               <HardDisk uuid="{{{}}}" location="c.vdi"/>"#,
            stored_guid_text(&a_stored),
            stored_guid_text(&b_stored),
            stored_guid_text(&c_stored)
        )),
    )
    .unwrap();
    assert_eq!(registry::load_for_image_with(&a, &[]).unwrap(), 3);
    let started = Instant::now();
    let err = open_err(&a, &follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(err.to_string().contains("a loop?"), "{err}");
    let err = open_err(&c, &follow());
    assert!(
        err.kind() == cowdisk::error::ErrorCode::Unsupported,
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 20);
    let uuid = text_bytes(&stored_guid_text(&b_stored));
    assert!(by_uuid_err(&uuid, 0).kind() == cowdisk::error::ErrorCode::Unsupported);
}
