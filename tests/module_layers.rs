//! Who may import whom inside the library (docs/ARCHITECTURE.md, "Who may
//! import whom"): every top-level module of `src/` has a layer, and a
//! module may name (`crate::other::...`, in a `use` or inline) only
//! modules of lower layers. That keeps the module graph free of cycles and
//! the C ABI (`ffi`) on top, where nothing but `lib.rs` reaches it.
//!
//! The scan is textual: every line of every `.rs` file under a module's
//! folder (or its single file), comments left out, is searched for
//! `crate::NAME`. `src/bin/` is a separate crate and is not scanned.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["numbers"],
    &["error"],
    &["disk", "file_io", "newfile"],
    &["formats", "store"],
    &["overlay"],
    &["partition"],
    &["fs"],
    &["clone"],
    &["ffi"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules of the library: `src/NAME.rs` and `src/NAME/`,
/// without the crate root and the binaries.
fn top_level_modules() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let is_module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
        if is_module && name != "lib" && name != "bin" {
            names.insert(name);
        }
    }
    names
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The top-level modules `module` names as `crate::NAME`, each with the
/// first place it does.
fn imports_of(module: &str, modules: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let dir = src().join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(src().join(format!("{module}.rs")));
    }
    files.sort();
    let mut found: Vec<(String, String)> = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != module
                    && modules.contains(&name)
                    && !found.iter().any(|(n, _)| *n == name)
                {
                    let place = format!(
                        "{}:{}",
                        file.strip_prefix(src()).unwrap().display(),
                        number + 1
                    );
                    found.push((name, place));
                }
            }
        }
    }
    found
}

#[test]
fn every_module_has_a_layer() {
    let modules = top_level_modules();
    let unplaced: Vec<&String> = modules.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in tests/module_layers.rs and docs/ARCHITECTURE.md: \
         {unplaced:?}"
    );
    for layer in LAYERS {
        for module in *layer {
            assert!(
                modules.contains(*module),
                "the layer table names '{module}', which is not a module of src/"
            );
        }
    }
}

#[test]
fn modules_import_only_lower_layers() {
    let modules = top_level_modules();
    let mut wrong = Vec::new();
    for module in &modules {
        let Some(own) = layer_of(module) else {
            continue; // every_module_has_a_layer reports it
        };
        for (imported, place) in imports_of(module, &modules) {
            let Some(theirs) = layer_of(&imported) else {
                continue;
            };
            if theirs >= own {
                wrong.push(format!(
                    "{module} (layer {own}) imports {imported} (layer {theirs}) at src/{place}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers (see docs/ARCHITECTURE.md, \"Who may import whom\"):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn nothing_but_the_crate_root_imports_ffi() {
    let modules = top_level_modules();
    for module in modules.iter().filter(|m| *m != "ffi") {
        for (imported, place) in imports_of(module, &modules) {
            assert_ne!(imported, "ffi", "{module} imports ffi at src/{place}");
        }
    }
}
