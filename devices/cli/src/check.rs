// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard check`: a topology file checked, nothing started.

use std::path::{Path, PathBuf};

use clap::Args;
use switchboard_devices::host::topology::{check_file, Diagnostic, Topology};

/// `switchboard check FILE`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The topology file (JSON).
    pub(crate) file: PathBuf,
}

/// A topology file found invalid; its errors are already printed. `main`
/// exits 2 for it.
#[derive(Debug)]
pub(crate) struct InvalidTopology {
    file: PathBuf,
    errors: usize,
}

impl std::fmt::Display for InvalidTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.errors == 1 { "" } else { "s" };
        write!(f, "{}: {} error{s}", self.file.display(), self.errors)
    }
}

impl std::error::Error for InvalidTopology {}

/// Checks `file` as `check` and `run` do: prints every error on stderr,
/// one per line, and returns [`InvalidTopology`] if there is one.
pub(crate) fn checked(file: &Path) -> Result<Topology, InvalidTopology> {
    check_file(file).map_err(|diagnostics: Vec<Diagnostic>| {
        for d in &diagnostics {
            eprintln!("{}", d.in_file(file));
        }
        InvalidTopology {
            file: file.to_path_buf(),
            errors: diagnostics.len(),
        }
    })
}

/// Runs `switchboard check`: a one-line summary of a valid file.
pub(crate) fn check(file: &Path) -> anyhow::Result<()> {
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let t = checked(file)?;
    println!(
        "{}: {} on {}: OK",
        file.display(),
        count(t.devices.len(), "device", "devices"),
        count(t.buses.len(), "bus", "buses")
    );
    Ok(())
}
