// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The layout the README's "Layout" section promises: which role folder may
//! use which, that the device library pulls in no CLI crate, and that no
//! source file outgrows what a reader takes in (tests aside).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The role folders of `devices/src` a folder's code may name as
/// `crate::ROLE`: models use no other role; the serving layer uses the
/// models; the host and the log tools use both, and not each other.
#[test]
fn test_device_library_roles_use_only_the_roles_below_them() {
    let src = root().join("devices/src");
    let allowed: [(&str, &[&str]); 4] = [
        ("models", &["models"]),
        ("vhost_user", &["models", "vhost_user"]),
        ("host", &["models", "vhost_user", "host"]),
        ("log", &["models", "vhost_user", "log"]),
    ];
    let roles = ["models", "vhost_user", "host", "log"];
    let mut broken = Vec::new();
    for (role, may_use) in allowed {
        let mut files = Vec::new();
        rust_files(&src.join(role), &mut files);
        assert!(!files.is_empty(), "devices/src/{role} holds no Rust file");
        for file in files {
            let text = fs::read_to_string(&file).expect("read a source file");
            for (n, line) in text.lines().enumerate() {
                for other in roles {
                    let named = line.contains(&format!("crate::{other}::"))
                        || line.contains(&format!("crate::{other}}}"))
                        || line.contains(&format!("crate::{other};"));
                    if named && !may_use.contains(&other) {
                        broken.push(format!(
                            "{}:{}: {role} uses {other}: {}",
                            file.strip_prefix(root()).unwrap_or(&file).display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "role rule broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn test_device_library_depends_on_no_cli_crate() {
    let out = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "--offline",
            "-p",
            "switchboard-devices",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("cargo tree prints UTF-8");
    assert!(
        tree.lines().any(|l| l.starts_with("switchboard-devices v")),
        "cargo tree did not list the device library:\n{tree}"
    );
    for cli in ["clap", "anyhow", "tracing-subscriber", "signal-hook"] {
        let found: Vec<&str> = tree
            .lines()
            .filter(|l| l.starts_with(&format!("{cli} v")))
            .collect();
        assert!(
            found.is_empty(),
            "switchboard-devices depends on {cli}: {found:?}"
        );
    }
}

/// No source file is over 1,200 lines before its unit tests.
#[test]
fn test_no_source_file_is_over_1200_lines_before_its_tests() {
    let mut files = Vec::new();
    for dir in ["runtime", "bus", "devices", "examples", "integration"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut long = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(root()).unwrap_or(file);
        let is_test_file = rel.components().any(|c| c.as_os_str() == "tests")
            || rel.file_name().is_some_and(|n| n == "tests.rs");
        if is_test_file {
            continue;
        }
        let text = fs::read_to_string(file).expect("read a source file");
        let code = text.lines().take_while(|l| *l != "#[cfg(test)]").count();
        if code > 1200 {
            long.push(format!("{}: {code} lines", rel.display()));
        }
    }
    assert!(!files.is_empty(), "no source files found");
    assert!(
        long.is_empty(),
        "files over 1,200 lines:\n{}",
        long.join("\n")
    );
}
