#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# fio inside the QEMU guest against each vhost-user-blk backend in the same run:
# the guest-side counterpart of bench-backend.sh (same jobs: 4 KiB random read
# and write at queue depth 32, one queue). For every backend, bench-blk.sh boots
# the guest once per job (run-guest.sh --dev-opts num-queues=1) with
# BACKEND_PID set, and a table gives the guest's IOPS and the backend's CPU
# time per I/O (user+system, all its threads, the whole boot included), with
# the ratios switchboard/peer.
#
#   bench-guest.sh [--peer-only] [--keep-image] [-- run-guest.sh options...]
#
# Each backend is started on a fresh socket, serves every job of CONFIGS, then
# is stopped:
#   peer  qemu-storage-daemon through peer-qsd.sh, 1 queue (FOPTS go to its file blockdev)
#   ours  switchboard serve blk --path IMG --socket-path SOCK --queues 1 [OURS_ARGS]
# switchboard is built first with cargo build --release (default target dir,
# or CARGO_TARGET_DIR). When it does not build or does not start, the script
# says why and still prints the peer's results.
#
#   --peer-only    run only the peer (the same as BACKENDS=peer)
#   --keep-image   leave the image in the work dir at exit (the same as
#                  KEEP_IMAGE=1); it is written anew on every run all the same
#   -- ARGS...     more run-guest.sh options (after this script's own ones, so
#                  they win), e.g. -- --smp 2
#
# Env: RUNTIME (fio seconds per job, 10), ROUNDS (1), BACKENDS ("peer ours"),
#      CONFIGS ("randread:4k:32 randwrite:4k:32", each RW:BS:IODEPTH as in
#      bench-blk.sh), IMAGE_MB (1024),
#      W (work dir, default ${TMPDIR:-/tmp}/bench-guest; the logs stay there),
#      FOPTS (peer file options, e.g. aio=io_uring; default aio=threads, page cache),
#      OURS_ARGS (extra arguments for switchboard serve blk), KEEP_IMAGE (0),
#      OTHER_MAX (10, see below).
# With ROUNDS > 1 every round runs every backend, the order alternating from
# round to round (peer first in odd rounds, ours first in even ones) so that a
# drift of the machine does not always favour the same one; the table has
# every round, then the median per backend and job, the ratios switchboard/peer
# of every round, the ratios of the medians, the median of the round ratios,
# and that median again over the rounds in which neither backend's row was
# marked (*) (see below) when some were. This machine is noisy: only same-run ratios mean anything, and a
# round whose figures are far from the others' was most likely disturbed. The
# column "other CPU%" is the host CPU time (all CPUs, steal included) used
# during the guest boot by everything but this script, its QEMU and the
# backend, in % of the host's capacity; a row is marked (*) when that exceeds
# OTHER_MAX (10) or another QEMU was running at any time during it.
#
# TCG: where KVM cannot run a guest (here /dev/kvm is a nested software KVM
# that cannot boot a stock kernel), run-guest.sh picks TCG, and then the
# guest's emulated CPU is the bottleneck: the guest IOPS of both backends are
# capped at what the emulated guest can issue, and say little about the
# backends. Compare them by the backend CPU time per I/O (and see
# bench-backend.sh for a backend-bound benchmark with no guest). The table's
# header says which accelerator the runs used.
#
# The page cache, as in bench-backend.sh: the image is written anew (from
# /dev/urandom) on every run of this script, in 4 KiB writes, so it sits in the
# host page cache in 4 KiB folios for every backend; it is synced before every
# guest boot, so no run pays for the write-back of the one before. An image
# cached through large I/O (dd bs=1M, cat, readahead) makes randwrite several
# times slower on recent kernels (large folios).
#
# No QEMU or backend is left behind: each bench-blk.sh run (with its
# run-guest.sh and QEMU) is a process group of its own, killed at exit
# (Ctrl-C, TERM, error) together with the backend.
# Exit 0 when every backend ran every job in every round, 1 when one failed or
# did not start (the table is printed all the same), 2 on bad usage.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=bench-guest.sh
. "$H/common.sh"

KEEP_IMAGE=${KEEP_IMAGE:-0} BACKENDS=${BACKENDS:-peer ours}
GUEST_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) print_help "$0"; exit 0 ;;
        --peer-only) BACKENDS=peer ;;
        --keep-image) KEEP_IMAGE=1 ;;
        --) shift; GUEST_ARGS=("$@"); break ;;
        *) die_rc 2 "unknown option '$1' (see --help)" ;;
    esac
    shift
done
RUNTIME=${RUNTIME:-10} ROUNDS=${ROUNDS:-1} IMAGE_MB=${IMAGE_MB:-1024} OTHER_MAX=${OTHER_MAX:-10}
CONFIGS=${CONFIGS:-randread:4k:32 randwrite:4k:32}
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die_rc 2 "RUNTIME must be whole seconds (> 0), not '$RUNTIME'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die_rc 2 "ROUNDS must be a positive number, not '$ROUNDS'"
[[ $IMAGE_MB =~ ^[1-9][0-9]*$ ]] || die_rc 2 "IMAGE_MB must be a positive number, not '$IMAGE_MB'"
[[ $OTHER_MAX =~ ^[0-9]+$ ]] || die_rc 2 "OTHER_MAX must be a whole percentage, not '$OTHER_MAX'"
read -r -a BLIST <<< "$BACKENDS"
[ ${#BLIST[@]} -gt 0 ] || die_rc 2 "BACKENDS is empty"
for b in "${BLIST[@]}"; do
    case $b in peer|ours) ;; *) die_rc 2 "unknown backend '$b' in BACKENDS (want peer and/or ours)" ;; esac
done
read -r -a JOBS <<< "$CONFIGS"
[ ${#JOBS[@]} -gt 0 ] || die_rc 2 "CONFIGS is empty"
for c in "${JOBS[@]}"; do
    [[ $c =~ ^[a-z]+:[0-9]+[kKmM]?:[1-9][0-9]*$ ]] || die_rc 2 "bad config '$c' in CONFIGS (want RW:BS:IODEPTH, e.g. randread:4k:32)"
done
has() { [[ " ${BLIST[*]} " == *" $1 "* ]]; }

ROOT=$(cd "$H/../.." && pwd)
if has peer; then
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed: run $H/setup.sh"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not installed: run $H/setup.sh"
W=${W:-${TMPDIR:-/tmp}/bench-guest}
mkdir -p "$W" || die "cannot create the work dir $W"
W=$(cd "$W" && pwd)
IMG=$W/disk.img
rm -f "$W"/*.sock "$W"/*.log "$W"/*.out "$W"/*.err   # nothing stale in the table or logs

PID='' SOCK='' GPID=''
# stop_group: the running bench-blk.sh, its run-guest.sh and QEMU (one process group)
# shellcheck disable=SC2317  # also reached from the EXIT trap
stop_group() {
    [ -n "$GPID" ] || return 0
    local i
    kill -TERM -- "-$GPID" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 -- "-$GPID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$GPID" 2>/dev/null || true
    wait "$GPID" 2>/dev/null || true
    GPID=
}
stop_backend() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    PID=
    if [ -n "$SOCK" ]; then rm -f "$SOCK"; fi
}
# shellcheck disable=SC2317  # reached from the EXIT trap
cleanup() {
    stop_group
    stop_backend
    rm -f "$W"/*.sock
    if [ "$KEEP_IMAGE" != 1 ]; then rm -f "$IMG"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A WHY=()   # backend (or backend:round:job) -> why it did not run
SWITCHBOARD=
if has ours; then
    command -v cargo >/dev/null || die "cargo is not installed"
    TDIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') \
        || die "cannot find cargo's target directory (cargo metadata failed in $ROOT)"
    SWITCHBOARD=$TDIR/release/switchboard
    note "building switchboard (log: $W/build-ours.log)"
    if ! (cd "$ROOT" && cargo build --release -p switchboard-devices --bin switchboard) > "$W/build-ours.log" 2>&1; then
        WHY[ours]="switchboard does not build (log: $W/build-ours.log)"
        tail -n 20 "$W/build-ours.log" >&2
        note "ours: ${WHY[ours]}; going on with the peer"
    fi
fi

# A fresh, fully written image (no holes), written in 4 KiB blocks: see the
# page-cache note in --help.
note "writing a ${IMAGE_MB} MiB image $IMG"
rm -f "$IMG"
dd if=/dev/urandom of="$IMG" bs=4k count=$((IMAGE_MB * 256)) status=none || die "cannot write the image $IMG"
sync_image() { sync "$IMG" || die "cannot sync the image $IMG"; }

# start_backend NAME: starts it on $W/NAME.sock, sets PID and SOCK; fails with WHY[NAME] set.
start_backend() {
    local name=$1 log=$W/$1.log extra=()
    SOCK=$W/$name.sock
    rm -f "$SOCK"
    read -r -a extra <<< "${OURS_ARGS:-}"
    case $name in
        peer) "$H/peer-qsd.sh" "$IMG" "$SOCK" 1 "${FOPTS:-}" >> "$log" 2>&1 & ;;
        ours) "$SWITCHBOARD" serve blk --path "$IMG" --socket-path "$SOCK" --queues 1 \
                  "${extra[@]}" >> "$log" 2>&1 & ;;
    esac
    PID=$!
    local st=0
    await_socket "$PID" "$SOCK" "$log" || st=$?
    [ $st = 0 ] && return 0
    WHY[$name]=$AWAIT_WHY
    if [ $st = 1 ]; then PID=; else stop_backend; fi
    return 1
}
field() { grep -o " $1=[0-9.a-z?]*" <<< "$2" | head -n 1 | cut -d= -f2 || true; }
# ticks: host CPU ticks "BUSY TOTAL" (steal counted as busy)
ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
# ours_ticks: CPU ticks of this shell, its reaped children (bench-blk.sh, with
# run-guest.sh and QEMU, once waited for) and the backend
ours_ticks() {
    local b=0
    if [ -n "$PID" ]; then b=$(awk '{ print $14 + $15 }' "/proc/$PID/stat" 2>/dev/null || echo 0); fi
    awk -v b="$b" '{ print $14 + $15 + $16 + $17 + b }' "/proc/$$/stat"
}
# others [PGID]: how many QEMU system emulators run outside process group PGID (ours)
others() { ps -eo pgid=,comm= | awk -v g="${1:--1}" '$2 ~ /^qemu-system/ && $1 != g { n++ } END { print n + 0 }'; }

TIMEOUT=$((RUNTIME + 170))
declare -A IOPS=() CPU=() BUSY=() OTHER=()
ACCELS=
fail=0
for ((round = 1; round <= ROUNDS; round++)); do
    order=("${BLIST[@]}")
    if ((round % 2 == 0)) && [ ${#BLIST[@]} -eq 2 ]; then order=("${BLIST[1]}" "${BLIST[0]}"); fi
    for name in "${order[@]}"; do
        [ -z "${WHY[$name]:-}" ] || { fail=1; continue; }
        note "round $round/$ROUNDS, $name: starting"
        if ! start_backend "$name"; then
            note "$name: did not start: ${WHY[$name]}"
            fail=1
            continue
        fi
        for c in "${JOBS[@]}"; do
            k=$name:$round:$c
            sync_image
            o0=$(others)
            read -r hb0 ht0 < <(ticks); m0=$(ours_ticks)
            base=$W/$name-r$round-${c//:/-}
            # A process group of its own (setsid), so that cleanup can stop
            # run-guest.sh and QEMU with it.
            BACKEND_PID=$PID CONFIGS=$c RUNTIME=$RUNTIME NJ=1 setsid "$H/bench-blk.sh" "$SOCK" \
                --dev-opts num-queues=1 --timeout "$TIMEOUT" "${GUEST_ARGS[@]}" \
                > "$base.out" 2> "$base.err" &
            GPID=$!
            busy=0
            while [ -r "/proc/$GPID/stat" ] && [ "$(awk '{ print $3 }' "/proc/$GPID/stat" 2>/dev/null)" != Z ]; do
                n=$(others "$GPID"); if [ "$n" -gt "$busy" ]; then busy=$n; fi
                sleep 1
            done
            wait "$GPID" && rc=0 || rc=$?
            GPID=
            read -r hb1 ht1 < <(ticks); m1=$(ours_ticks)
            o1=$(others)
            OTHER[$k]=$(awk -v b=$((hb1 - hb0)) -v t=$((ht1 - ht0)) -v m=$((m1 - m0)) \
                'BEGIN { o = t > 0 ? (b - m) * 100 / t : 0; printf "%.0f", o < 0 ? 0 : o }')
            out=$(grep '^bench: ' "$base.out" || true)
            echo "round $round $name: ${out:-no result}"
            IOPS[$k]=$(field iops "$out")
            CPU[$k]=$(field backend_cpu_us_per_io "$out")
            a=$(field accel "$out")
            if [ -n "$a" ] && [[ " $ACCELS " != *" $a "* ]]; then ACCELS="${ACCELS:+$ACCELS }$a"; fi
            if [ "$o0" != 0 ] || [ "$busy" != 0 ] || [ "$o1" != 0 ] || [ "${OTHER[$k]}" -gt "$OTHER_MAX" ]; then
                BUSY[$k]=1
                note "round $round $name $c may be disturbed: other processes used ${OTHER[$k]}% of the" \
                     "host CPU; other QEMUs before: $o0, during: up to $busy, after: $o1"
            fi
            if [ "$rc" != 0 ] || [ -z "${IOPS[$k]}" ]; then
                WHY[$k]="bench-blk.sh failed, status $rc (see $base.err)"
                note "round $round $name $c: ${WHY[$k]}"
                tail -n 20 "$base.err" >&2
                fail=1
            fi
            if ! kill -0 "$PID" 2>/dev/null; then
                WHY[$name]="died during round $round, $c (log: $W/$name.log)"
                note "$name: ${WHY[$name]}"
                PID=
                fail=1
                break
            fi
        done
        stop_backend
    done
done

# median of the numbers given (the mean of the middle two for an even count); "" for none
median() {
    printf '%s\n' "$@" | awk '/^[0-9.]+$/' | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2];
                else printf "%.10g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "x%.2f", a / b }'; }

echo
echo "bench-guest: fio in the guest (libaio, direct=1, 1 job) on /dev/vda, one queue," \
     "${RUNTIME} s per job, ${IMAGE_MB} MiB image, $(nproc) host CPUs, accel=${ACCELS:-?}, $ROUNDS round(s)"
if [[ " ${ACCELS:-tcg} " == *" tcg "* ]]; then
    echo "  TCG: the emulated guest CPU is the bottleneck, so guest IOPS say little about" \
         "the backends; compare backend CPU us/IO (the whole boot included)"
fi
printf '%-7s %-8s %-18s %10s %20s %11s\n' round backend job "guest IOPS" "backend CPU us/IO" "other CPU%"
for ((round = 1; round <= ROUNDS; round++)); do
    for name in "${BLIST[@]}"; do
        for c in "${JOBS[@]}"; do
            k=$name:$round:$c
            why=${WHY[$k]:-}
            if [ -z "${IOPS[$k]:-}" ] && [ -z "$why" ]; then why=${WHY[$name]:-}; fi
            printf '%-7s %-8s %-18s %10s %20s %11s%s%s\n' "$round" "$name" "$c" "${IOPS[$k]:--}" \
                "${CPU[$k]:--}" "${OTHER[$k]:--}" "${BUSY[$k]:+ (*)}" "${why:+   ($why)}"
        done
    done
done
declare -A MI=() MC=()
for name in "${BLIST[@]}"; do
    for c in "${JOBS[@]}"; do
        is=() cs=()
        for ((round = 1; round <= ROUNDS; round++)); do
            is+=("${IOPS[$name:$round:$c]:-}") cs+=("${CPU[$name:$round:$c]:-}")
        done
        MI[$name:$c]=$(median "${is[@]}") MC[$name:$c]=$(median "${cs[@]}")
        if [ "$ROUNDS" -gt 1 ]; then
            printf '%-7s %-8s %-18s %10s %20s\n' median "$name" "$c" "${MI[$name:$c]:--}" "${MC[$name:$c]:--}"
        fi
    done
done
if has peer && has ours; then
    for ((round = 1; round <= ROUNDS && ROUNDS > 1; round++)); do
        for c in "${JOBS[@]}"; do
            printf 'round %-2s switchboard/peer %-18s guest IOPS %s, backend CPU per I/O %s\n' "$round" "$c" \
                "$(ratio "${IOPS[ours:$round:$c]:-}" "${IOPS[peer:$round:$c]:-}")" \
                "$(ratio "${CPU[ours:$round:$c]:-}" "${CPU[peer:$round:$c]:-}")"
        done
    done
    what=; [ "$ROUNDS" -gt 1 ] && what="(ratio of the medians) "
    for c in "${JOBS[@]}"; do
        printf 'switchboard/peer %s%-18s guest IOPS %s, backend CPU per I/O %s\n' "$what" "$c" \
            "$(ratio "${MI[ours:$c]:-}" "${MI[peer:$c]:-}")" \
            "$(ratio "${MC[ours:$c]:-}" "${MC[peer:$c]:-}")"
    done
    # the same-round pairs: less exposed to a drift of the machine between rounds
    for c in "${JOBS[@]}"; do
        [ "$ROUNDS" -gt 1 ] || break
        ri=() rc=() qi=() qc=()
        for ((round = 1; round <= ROUNDS; round++)); do
            i=$(ratio "${IOPS[ours:$round:$c]:-}" "${IOPS[peer:$round:$c]:-}" | tr -d x)
            u=$(ratio "${CPU[ours:$round:$c]:-}" "${CPU[peer:$round:$c]:-}" | tr -d x)
            ri+=("$i") rc+=("$u")
            if [ -z "${BUSY[ours:$round:$c]:-}${BUSY[peer:$round:$c]:-}" ]; then qi+=("$i") qc+=("$u"); fi
        done
        printf 'switchboard/peer (median of the round ratios) %-18s guest IOPS %s, backend CPU per I/O %s\n' "$c" \
            "$(ratio "$(median "${ri[@]}")" 1)" "$(ratio "$(median "${rc[@]}")" 1)"
        if [ ${#qi[@]} -lt "$ROUNDS" ]; then
            printf 'switchboard/peer (the same, %s undisturbed round(s) only) %-18s guest IOPS %s, backend CPU per I/O %s\n' \
                "${#qi[@]}" "$c" "$(ratio "$(median "${qi[@]}")" 1)" "$(ratio "$(median "${qc[@]}")" 1)"
        fi
    done
fi
exit $fail
