#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs every check and every test of switchboard, as CI does. Installs what
# the tests need on a fresh Debian machine first (as root, or with sudo).
#
#   integration/test-all.sh            # everything
#   integration/test-all.sh --quick    # debug tests only, no release pass
set -euo pipefail

cd "$(dirname "$0")/.."
quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help)
      sed -n '3,9p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi
cargo --version
rustc --version

step "QEMU, guest kernel and initramfs (integration/qemu/setup.sh)"
integration/qemu/setup.sh

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# A hung test fails its step with every thread's backtrace instead of
# using up CI's time (integration/watchdog.sh). A step takes about 10
# minutes here.
limit=${SWITCHBOARD_TEST_LIMIT_SECS:-1800}

step "tests (debug)"
integration/watchdog.sh "$limit" cargo test --workspace --all-features

if [ "$quick" = 0 ]; then
  step "tests (release)"
  integration/watchdog.sh "$limit" cargo test --workspace --all-features --release

  step "benchmarks build"
  cargo bench --workspace --no-run --quiet

  step "main example"
  cargo run --release --quiet -p switchboard-examples --example unplug_demo -- --accesses 500
fi

step "all checks passed"
