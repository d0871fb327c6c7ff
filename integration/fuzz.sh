#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs every fuzz target (integration/fuzz/) for SECONDS seconds each, on
# its committed corpus (new inputs go there too; minimise afterwards with
# --cmin), and prints libFuzzer's last status line (exec/s, cov, ft) per
# target. Needs a nightly toolchain and cargo-fuzz (`cargo install
# cargo-fuzz`). Crashes are written to integration/fuzz/artifacts/TARGET/.
#
#   integration/fuzz.sh 60                 # every target, 60 s each
#   integration/fuzz.sh 600 topology       # one target
#   integration/fuzz.sh --cmin             # minimise every corpus
#   integration/fuzz.sh --jobs 2 300       # two targets at a time
set -euo pipefail

cd "$(dirname "$0")/.."
fuzz_dir=integration/fuzz
target_dir="${CARGO_TARGET_DIR:-target}/fuzz"
targets=(virtio_chain blk_request vhost_user_stream topology control_line log_reader)
seconds="" jobs=1 cmin=0 chosen=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '3,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --cmin) cmin=1 ;;
    --jobs) jobs="$2"; shift ;;
    [0-9]*) seconds="$1" ;;
    *) chosen+=("$1") ;;
  esac
  shift
done
[ ${#chosen[@]} -gt 0 ] && targets=("${chosen[@]}")
if [ "$cmin" = 0 ] && [ -z "$seconds" ]; then
  echo "usage: integration/fuzz.sh SECONDS [TARGET...] | --cmin [TARGET...] (try --help)" >&2
  exit 2
fi
export CARGO_INCREMENTAL=0
fuzz() { local cmd="$1"; shift; cargo +nightly fuzz "$cmd" --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" "$@"; }
fuzz build
mkdir -p "$fuzz_dir/logs"
if [ "$cmin" = 1 ]; then
  for t in "${targets[@]}"; do fuzz cmin "$t" "$fuzz_dir/corpus/$t"; done
  exit 0
fi
run() {
  local t="$1" log="$fuzz_dir/logs/$1.log"
  mkdir -p "$fuzz_dir/corpus/$t"
  fuzz run "$t" "$fuzz_dir/corpus/$t" -- -max_total_time="$seconds" \
    -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 >"$log" 2>&1 || true
  printf '%-18s %s\n' "$t" "$(grep -E '^#[0-9]+' "$log" | tail -1)"
  grep -E 'ERROR|panicked|deadly signal|Test unit written' "$log" | head -5 || true
}
running=0
for t in "${targets[@]}"; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait
