#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Backend-bound vhost-user-blk benchmark with no guest: blk_bench
# (integration/src/bin/blk_bench.rs) plays the VMM and the guest's virtio-blk
# driver against each backend in turn, on the same fully written raw image,
# and a table gives IOPS and the backend's CPU time per I/O (user+system, all
# its threads) for each, with the ratios switchboard/peer.
#
#   bench-backend.sh [--peer-only] [--keep-image]
#
# Each backend is started on a fresh socket, runs 4 KiB randread then
# randwrite (one queue, queue depth IODEPTH, after a WARMUP), then is stopped:
#   peer  qemu-storage-daemon through peer-qsd.sh (FOPTS go to its file blockdev)
#   ours  switchboard serve blk --path IMG --socket-path SOCK [OURS_ARGS]
# Both binaries are built first with cargo build --release (default target
# dir, or CARGO_TARGET_DIR). When ours does not build or does not start, the
# script says why and still prints the peer's results.
#
#   --peer-only    run only the peer (the same as BACKENDS=peer)
#   --keep-image   leave the image in the work dir at exit (the same as
#                  KEEP_IMAGE=1); it is written anew on every run all the same
#
# Env: SECONDS_PER_RUN (10), WARMUP (1, seconds before each measured window),
#      IODEPTH (32), IMAGE_MB (1024), BACKENDS ("peer ours"),
#      W (work dir, default ${TMPDIR:-/tmp}/bench-backend; the logs stay there),
#      FOPTS (peer file options, e.g. aio=io_uring; default aio=threads, page cache),
#      OURS_ARGS (extra arguments for switchboard serve blk),
#      VERIFY (64: blocks read back through the backend and checked against
#      the image after each run; 0 = none), SAMPLE (1000: during each run,
#      every SAMPLEth completed request is checked against the image; 0 =
#      none), KEEP_IMAGE (0).
# The page cache: the image is written anew (from /dev/urandom) on every run of
# this script, in 4 KiB writes, so it sits in the host page cache in 4 KiB
# folios for every backend, and the figures measure the backends, not the
# disk. It is synced before every run, so no run pays for the write-back of
# the one before. Folio size matters a lot for randwrite on recent kernels
# (6.18 here): on an image cached through large I/O (dd bs=1M, cat, readahead:
# large folios, so presumably each 4 KiB write dirties a whole one) the same
# qemu-storage-daemon run fell from ~85k to ~11k IOPS at ~9x the CPU per I/O.
# Exit 0 when every backend ran both workloads, 1 when one failed or did not
# start (the table is printed all the same), 2 on bad usage.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=bench-backend.sh
. "$H/common.sh"

KEEP_IMAGE=${KEEP_IMAGE:-0} BACKENDS=${BACKENDS:-peer ours}
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) print_help "$0"; exit 0 ;;
        --peer-only) BACKENDS=peer ;;
        --keep-image) KEEP_IMAGE=1 ;;
        *) die_rc 2 "unknown option '$1' (see --help)" ;;
    esac
    shift
done
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10} WARMUP=${WARMUP:-1} IODEPTH=${IODEPTH:-32}
IMAGE_MB=${IMAGE_MB:-1024} VERIFY=${VERIFY:-64} SAMPLE=${SAMPLE:-1000}
num='^[0-9]+([.][0-9]+)?$'
[[ $SECONDS_PER_RUN =~ $num ]] || die_rc 2 "SECONDS_PER_RUN must be a number of seconds, not '$SECONDS_PER_RUN'"
[[ $WARMUP =~ $num ]] || die_rc 2 "WARMUP must be a number of seconds, not '$WARMUP'"
[[ $IODEPTH =~ ^[1-9][0-9]*$ ]] || die_rc 2 "IODEPTH must be a positive number, not '$IODEPTH'"
[[ $IMAGE_MB =~ ^[1-9][0-9]*$ ]] || die_rc 2 "IMAGE_MB must be a positive number, not '$IMAGE_MB'"
[[ $VERIFY =~ ^[0-9]+$ ]] || die_rc 2 "VERIFY must be a number of blocks, not '$VERIFY'"
[[ $SAMPLE =~ ^[0-9]+$ ]] || die_rc 2 "SAMPLE must be a number of requests, not '$SAMPLE'"
for b in $BACKENDS; do
    case $b in peer|ours) ;; *) die_rc 2 "unknown backend '$b' in BACKENDS (want peer and/or ours)" ;; esac
done
[ -n "$BACKENDS" ] || die_rc 2 "BACKENDS is empty"
RWS="randread randwrite"

ROOT=$(cd "$H/../.." && pwd)
command -v cargo >/dev/null || die "cargo is not installed"
if [[ " $BACKENDS " == *" peer "* ]]; then
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed: run $H/setup.sh"
fi
W=${W:-${TMPDIR:-/tmp}/bench-backend}
mkdir -p "$W" || die "cannot create the work dir $W"
W=$(cd "$W" && pwd)
IMG=$W/disk.img
rm -f "$W"/*.sock "$W"/*-rand*.err "$W"/peer.log "$W"/ours.log   # nothing stale in the table or logs

PID='' SOCK=''
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -f "$W"/*.sock
    if [ "$KEEP_IMAGE" != 1 ]; then rm -f "$IMG"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The binaries: built in the default target dir (or CARGO_TARGET_DIR).
TDIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') \
    || die "cannot find cargo's target directory (cargo metadata failed in $ROOT)"
note "building blk_bench (log: $W/build-bench.log)"
(cd "$ROOT" && cargo build --release -p switchboard-integration --bin blk_bench) > "$W/build-bench.log" 2>&1 \
    || { tail -n 30 "$W/build-bench.log" >&2; die "blk_bench does not build (log: $W/build-bench.log)"; }
BENCH=$TDIR/release/blk_bench
declare -A WHY=()   # backend -> why it did not run
if [[ " $BACKENDS " == *" ours "* ]]; then
    note "building switchboard (log: $W/build-ours.log)"
    if ! (cd "$ROOT" && cargo build --release -p switchboard-cli --bin switchboard) > "$W/build-ours.log" 2>&1; then
        WHY[ours]="switchboard does not build (log: $W/build-ours.log)"
        tail -n 20 "$W/build-ours.log" >&2
        note "ours: ${WHY[ours]}; going on with the peer"
    fi
fi
SWITCHBOARD=$TDIR/release/switchboard

# A fresh, fully written image (no holes), written in 4 KiB blocks: see the
# page-cache note in --help.
note "writing a ${IMAGE_MB} MiB image $IMG"
rm -f "$IMG"
dd if=/dev/urandom of="$IMG" bs=4k count=$((IMAGE_MB * 256)) status=none || die "cannot write the image $IMG"
# Clean page cache for the image: dirty pages left by the last writer would be
# written back during the next run and charged to it.
sync_image() { sync "$IMG" || die "cannot sync the image $IMG"; }

# start_backend NAME: starts it on $W/NAME.sock, sets PID and SOCK; fails with WHY[NAME] set.
start_backend() {
    local name=$1 log=$W/$1.log extra=()
    SOCK=$W/$name.sock
    rm -f "$SOCK"
    read -r -a extra <<< "${OURS_ARGS:-}"
    case $name in
        peer) "$H/peer-qsd.sh" "$IMG" "$SOCK" 1 "${FOPTS:-}" > "$log" 2>&1 & ;;
        ours) "$SWITCHBOARD" serve blk --path "$IMG" --socket-path "$SOCK" "${extra[@]}" > "$log" 2>&1 & ;;
    esac
    PID=$!
    local st=0
    await_socket "$PID" "$SOCK" "$log" || st=$?
    [ $st = 0 ] && return 0
    WHY[$name]=$AWAIT_WHY
    if [ $st = 1 ]; then PID=; else stop_backend; fi
    return 1
}
stop_backend() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    PID=
    rm -f "$SOCK"
}
field() { grep -o " $1=[0-9.a-z]*" <<< "$2" | head -n 1 | cut -d= -f2 || true; }

declare -A IOPS=() CPU=()
fail=0
for name in $BACKENDS; do
    [ -z "${WHY[$name]:-}" ] || { fail=1; continue; }
    note "$name: starting"
    if ! start_backend "$name"; then
        note "$name: did not start: ${WHY[$name]}"
        fail=1
        continue
    fi
    for rw in $RWS; do
        sync_image
        if out=$("$BENCH" --socket "$SOCK" --backend "$name" --rw "$rw" --iodepth "$IODEPTH" \
            --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --pid "$PID" \
            --verify "$VERIFY" --sample "$SAMPLE" --image "$IMG" 2> "$W/$name-$rw.err"); then
            echo "$out"
            IOPS[$name:$rw]=$(field iops "$out")
            CPU[$name:$rw]=$(field backend_cpu_us_per_io "$out")
        else
            note "$name $rw failed: $(tail -n 5 "$W/$name-$rw.err")"
            WHY[$name:$rw]="blk_bench failed (see $W/$name-$rw.err)"
            fail=1
        fi
        cat "$W/$name-$rw.err" >&2
        if ! kill -0 "$PID" 2>/dev/null; then
            WHY[$name]="died during $rw (log: $W/$name.log)"
            note "$name: ${WHY[$name]}"
            PID=
            fail=1
            break
        fi
    done
    stop_backend
done

echo
echo "bench-backend: 4 KiB random I/O, one queue, qd=$IODEPTH, ${SECONDS_PER_RUN} s per run," \
     "${IMAGE_MB} MiB image, $(nproc) CPUs, no guest"
printf '%-8s %-10s %10s %20s\n' backend rw IOPS "backend CPU us/IO"
for name in $BACKENDS; do
    for rw in $RWS; do
        k=$name:$rw
        why=${WHY[$k]:-${WHY[$name]:-}}
        printf '%-8s %-10s %10s %20s%s\n' "$name" "$rw" "${IOPS[$k]:--}" "${CPU[$k]:--}" \
            "${why:+   ($why)}"
    done
done
if [[ " $BACKENDS " == *" peer "* ]] && [[ " $BACKENDS " == *" ours "* ]]; then
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "x%.2f", a / b }'; }
    for rw in $RWS; do
        printf 'switchboard/peer %-10s IOPS %s, backend CPU per I/O %s\n' "$rw" \
            "$(ratio "${IOPS[ours:$rw]:-}" "${IOPS[peer:$rw]:-}")" \
            "$(ratio "${CPU[ours:$rw]:-}" "${CPU[peer:$rw]:-}")"
    done
fi
exit $fail
