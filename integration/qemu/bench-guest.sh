#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# fio inside the QEMU guest against each vhost-user-blk backend in the same run:
# the guest-side counterpart of bench-backend.sh (same jobs: 4 KiB random read
# and write at queue depth 32, one queue). For every backend, bench-blk.sh boots
# the guest once per job (run-guest.sh --dev-opts num-queues=1) with
# BACKEND_PID set, and a table gives the guest's IOPS and the backend's CPU
# time per I/O (user+system, all its threads, the whole boot included), with
# the ratios switchboard/peer (or to another BASELINE, see below).
#
#   bench-guest.sh [--peer-only] [--keep-image] [-- run-guest.sh options...]
#
# Each backend is started on a fresh socket, serves every job of CONFIGS, then
# is stopped (but see "Recording" below):
#   peer        qemu-storage-daemon through peer-qsd.sh, 1 queue (FOPTS go to its file blockdev)
#   ours        switchboard serve blk --path IMG --socket-path SOCK --queues 1 [OURS_ARGS]
#   ours-hash   ours recording every request: ... [OURS_ARGS] --record LOG --record-data hash
#   ours-value  ours recording every request: ... [OURS_ARGS] --record LOG --record-data value
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
# Env: RUNTIME (fio seconds per job, 10), ROUNDS (1), BACKENDS ("peer ours";
#      any of peer, ours, ours-hash, ours-value), BASELINE (peer, see below),
#      CONFIGS ("randread:4k:32 randwrite:4k:32", each RW:BS:IODEPTH as in
#      bench-blk.sh), IMAGE_MB (1024),
#      W (work dir, default ${TMPDIR:-/tmp}/bench-guest; the logs stay there),
#      FOPTS (peer file options, e.g. aio=io_uring; default aio=threads, page cache),
#      OURS_ARGS (extra arguments for switchboard serve blk), KEEP_IMAGE (0),
#      OTHER_MAX (10, see below), WAIT_OTHERS (0, see below).
# With ROUNDS > 1 every round runs every backend, the order rotating from
# round to round (round r starts with the r-th backend of BACKENDS, cyclically:
# with "peer ours", peer first in odd rounds, ours first in even ones) so that
# a drift of the machine does not always favour the same one; the table has
# every round, then the median per backend and job, the ratios to BASELINE
# (switchboard/peer by default) of every round, the ratios of the medians, the
# median of the round ratios, and that median again over the rounds in which
# neither backend's row was marked (*) (see below) when some were. This
# machine is noisy: only same-run ratios mean anything, and a round whose
# figures are far from the others' was most likely disturbed. The
# column "other CPU%" is the host CPU time (all CPUs, steal included) used
# during the guest boot by everything but this script, its QEMU and the
# backend, in % of the host's capacity; a row is marked (*) when that exceeds
# OTHER_MAX (10) or another QEMU was running at any time during it. With
# WAIT_OTHERS=S, each guest boot first waits (up to S seconds, checking every
# 15 s or so) for a quiet host: no other QEMU system emulator, and other
# processes at most at OTHER_MAX % of the host CPU over 5 s; after S seconds
# it starts all the same (and the row is marked if it was disturbed).
#
# The ratios compare every other backend of BACKENDS with BASELINE: with the
# default (peer), "switchboard/peer" is ours against the peer (and
# "ours-hash/peer" ours-hash, when it runs); with BASELINE=ours,
# "ours-hash/ours" is the cost of recording with hashes, "peer/ours" the peer.
#
# Recording (ours-hash, ours-value): each job gets its own log,
# W/NAME-rROUND-RW-BS-IODEPTH.record.log (--record refuses an existing file).
# So when BACKENDS holds a recording backend, every backend (the others too,
# so that all are treated alike) is started afresh for every job, and a round
# runs job by job, every backend in turn on the same job, rather than backend
# by backend. After the job the backend is stopped (SIGTERM: it drains and
# closes the log), the log's size and record count are printed ("log MiB" in
# the table) and the log is deleted: a 4 KiB request takes some 460 bytes of
# a hashed log and 11 KiB of a by-value one (each block is in it twice, base64:
# as guest memory and as file data), so 10 s at 10k IOPS log about 1.1 GiB by
# value. The log writer thread is one of the backend's threads, so its CPU
# time is in the backend's; the kernel's write-back of the log is not (it
# would show in "other CPU%").
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
# did not start or a log was not closed (the table is printed all the same),
# 2 on bad usage.
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
WAIT_OTHERS=${WAIT_OTHERS:-0}
CONFIGS=${CONFIGS:-randread:4k:32 randwrite:4k:32}
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die_rc 2 "RUNTIME must be whole seconds (> 0), not '$RUNTIME'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die_rc 2 "ROUNDS must be a positive number, not '$ROUNDS'"
[[ $IMAGE_MB =~ ^[1-9][0-9]*$ ]] || die_rc 2 "IMAGE_MB must be a positive number, not '$IMAGE_MB'"
[[ $OTHER_MAX =~ ^[0-9]+$ ]] || die_rc 2 "OTHER_MAX must be a whole percentage, not '$OTHER_MAX'"
[[ $WAIT_OTHERS =~ ^[0-9]+$ ]] || die_rc 2 "WAIT_OTHERS must be whole seconds, not '$WAIT_OTHERS'"
read -r -a BLIST <<< "$BACKENDS"
[ ${#BLIST[@]} -gt 0 ] || die_rc 2 "BACKENDS is empty"
declare -A SEEN=()
for b in "${BLIST[@]}"; do
    case $b in
        peer|ours|ours-hash|ours-value) ;;
        *) die_rc 2 "unknown backend '$b' in BACKENDS (want peer, ours, ours-hash and/or ours-value)" ;;
    esac
    [ -z "${SEEN[$b]:-}" ] || die_rc 2 "backend '$b' is twice in BACKENDS"
    SEEN[$b]=1
done
read -r -a JOBS <<< "$CONFIGS"
[ ${#JOBS[@]} -gt 0 ] || die_rc 2 "CONFIGS is empty"
for c in "${JOBS[@]}"; do
    [[ $c =~ ^[a-z]+:[0-9]+[kKmM]?:[1-9][0-9]*$ ]] || die_rc 2 "bad config '$c' in CONFIGS (want RW:BS:IODEPTH, e.g. randread:4k:32)"
done
has() { [[ " ${BLIST[*]} " == *" $1 "* ]]; }
if [ -n "${BASELINE:-}" ]; then
    has "$BASELINE" || die_rc 2 "BASELINE '$BASELINE' is not in BACKENDS ($BACKENDS)"
fi
BASELINE=${BASELINE:-peer}
OURS=()   # the backends that are switchboard
for b in "${BLIST[@]}"; do [[ $b != ours* ]] || OURS+=("$b"); done
# recording: whether a backend of BACKENDS records (then every backend is
# started afresh for every job: see "Recording" in --help)
recording() { has ours-hash || has ours-value; }
BW=8   # width of the backend column
for b in "${BLIST[@]}"; do if [ ${#b} -gt "$BW" ]; then BW=${#b}; fi; done

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

PID='' SOCK='' GPID='' REC=''
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
    if [ -n "$REC" ]; then rm -f "$REC"; fi
    rm -f "$W"/*.sock
    if [ "$KEEP_IMAGE" != 1 ]; then rm -f "$IMG"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A WHY=()   # backend (or backend:round:job) -> why it did not run
SWITCHBOARD=
if [ ${#OURS[@]} -gt 0 ]; then
    command -v cargo >/dev/null || die "cargo is not installed"
    TDIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') \
        || die "cannot find cargo's target directory (cargo metadata failed in $ROOT)"
    SWITCHBOARD=$TDIR/release/switchboard
    note "building switchboard (log: $W/build-ours.log)"
    if ! (cd "$ROOT" && cargo build --release -p switchboard-cli --bin switchboard) > "$W/build-ours.log" 2>&1; then
        for b in "${OURS[@]}"; do WHY[$b]="switchboard does not build (log: $W/build-ours.log)"; done
        tail -n 20 "$W/build-ours.log" >&2
        note "${OURS[*]}: ${WHY[${OURS[0]}]}; going on with the peer"
    fi
fi

# A fresh, fully written image (no holes), written in 4 KiB blocks: see the
# page-cache note in --help.
note "writing a ${IMAGE_MB} MiB image $IMG"
rm -f "$IMG"
dd if=/dev/urandom of="$IMG" bs=4k count=$((IMAGE_MB * 256)) status=none || die "cannot write the image $IMG"
sync_image() { sync "$IMG" || die "cannot sync the image $IMG"; }

# start_backend NAME: starts it on $W/NAME.sock, sets PID and SOCK; fails with WHY[NAME] set.
# A recording backend records to REC (set by the caller).
start_backend() {
    local name=$1 log=$W/$1.log extra=()
    SOCK=$W/$name.sock
    rm -f "$SOCK"
    read -r -a extra <<< "${OURS_ARGS:-}"
    case $name in
        ours-hash|ours-value) rm -f "$REC"; extra+=(--record "$REC" --record-data "${name#ours-}") ;;
    esac
    case $name in
        peer) "$H/peer-qsd.sh" "$IMG" "$SOCK" 1 "${FOPTS:-}" >> "$log" 2>&1 & ;;
        ours*) "$SWITCHBOARD" serve blk --path "$IMG" --socket-path "$SOCK" --queues 1 \
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
declare -A IOPS=() CPU=() BUSY=() OTHER=() LOGMB=()
ACCELS=
fail=0

# others_pct: the host CPU used by other processes over 5 s, in % of the host's
# capacity (as "other CPU%", while nothing of ours runs)
others_pct() {
    local hb0 ht0 hb1 ht1 m0 m1
    read -r hb0 ht0 < <(ticks); m0=$(ours_ticks)
    sleep 5
    read -r hb1 ht1 < <(ticks); m1=$(ours_ticks)
    awk -v b=$((hb1 - hb0)) -v t=$((ht1 - ht0)) -v m=$((m1 - m0)) \
        'BEGIN { o = t > 0 ? (b - m) * 100 / t : 0; printf "%.0f", o < 0 ? 0 : o }'
}
# wait_others: waits (up to WAIT_OTHERS seconds) for a quiet host: no other
# QEMU, and other processes at most at OTHER_MAX % of the host CPU
wait_others() {
    local t0=$SECONDS n p waited=0
    [ "$WAIT_OTHERS" -gt 0 ] || return 0
    while :; do
        n=$(others) p=$(others_pct)
        if [ "$n" = 0 ] && [ "$p" -le "$OTHER_MAX" ]; then
            if [ $waited = 1 ]; then note "the host is quiet after $((SECONDS - t0)) s"; fi
            return 0
        fi
        if ((SECONDS - t0 >= WAIT_OTHERS)); then
            note "the host is still busy after $((SECONDS - t0)) s ($n other QEMU(s), other processes" \
                 "at $p% of its CPU); going on"
            return 0
        fi
        if [ $waited = 0 ]; then
            note "waiting (up to $WAIT_OTHERS s) for a quiet host: $n other QEMU(s), other processes" \
                 "at $p% of its CPU"
            waited=1
        fi
        sleep 10
    done
}

# run_job NAME ROUND CONFIG: one guest boot running fio's job CONFIG against
# the running backend NAME (PID, SOCK); the figures go to IOPS, CPU, OTHER and
# BUSY under NAME:ROUND:CONFIG. Returns 1 when the backend died (WHY[NAME] set).
run_job() {
    local name=$1 round=$2 c=$3 k=$1:$2:$3
    local o0 o1 hb0 ht0 hb1 ht1 m0 m1 base busy n rc out a
    wait_others
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
        return 1
    fi
}

# close_log NAME ROUND CONFIG: once the recording backend NAME has stopped,
# notes the size of its log REC and what it said about it, then deletes it.
close_log() {
    local name=$1 round=$2 c=$3 k=$1:$2:$3 bytes said
    bytes=$(stat -c %s "$REC" 2>/dev/null || true)
    if [ -n "$bytes" ]; then LOGMB[$k]=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }'); fi
    # switchboard's last words: "switchboard: recorded N records (B bytes) to LOG[; ...]"
    said=$(grep -F "switchboard: recorded " "$W/$name.log" | grep -F " to $REC" | tail -n 1 || true)
    if [ -n "$said" ]; then
        echo "round $round $name $c: log ${LOGMB[$k]:-?} MiB, ${said#*switchboard: recorded }; deleted"
    else
        WHY[$k]=${WHY[$k]:-the log was not closed (no summary in $W/$name.log)}
        note "round $round $name $c: the log $REC was not closed (no summary in $W/$name.log); deleted"
        fail=1
    fi
    rm -f "$REC"
    REC=
}

NB=${#BLIST[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    order=()
    for ((i = 0; i < NB; i++)); do order+=("${BLIST[(i + round - 1) % NB]}"); done
    if recording; then
        # a fresh backend (and log) for every job, the backends in turn on each job
        for c in "${JOBS[@]}"; do
            for name in "${order[@]}"; do
                [ -z "${WHY[$name]:-}" ] || { fail=1; continue; }
                note "round $round/$ROUNDS, $c, $name: starting"
                REC=
                if [[ $name == ours-* ]]; then REC=$W/$name-r$round-${c//:/-}.record.log; fi
                if ! start_backend "$name"; then
                    note "$name: did not start: ${WHY[$name]}"
                    fail=1
                    if [ -n "$REC" ]; then rm -f "$REC"; REC=; fi
                    continue
                fi
                run_job "$name" "$round" "$c" || true
                stop_backend
                if [ -n "$REC" ]; then close_log "$name" "$round" "$c"; fi
            done
        done
        continue
    fi
    for name in "${order[@]}"; do
        [ -z "${WHY[$name]:-}" ] || { fail=1; continue; }
        note "round $round/$ROUNDS, $name: starting"
        if ! start_backend "$name"; then
            note "$name: did not start: ${WHY[$name]}"
            fail=1
            continue
        fi
        for c in "${JOBS[@]}"; do
            run_job "$name" "$round" "$c" || break
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
# logcol KEY: the "log MiB" column, only when a backend records
logcol() { if recording; then printf ' %9s' "${LOGMB[$1]:--}"; fi; }
printf "%-7s %-${BW}s %-18s %10s %20s%s %11s\n" round backend job "guest IOPS" "backend CPU us/IO" \
    "$(if recording; then printf ' %9s' 'log MiB'; fi)" "other CPU%"
for ((round = 1; round <= ROUNDS; round++)); do
    for name in "${BLIST[@]}"; do
        for c in "${JOBS[@]}"; do
            k=$name:$round:$c
            why=${WHY[$k]:-}
            if [ -z "${IOPS[$k]:-}" ] && [ -z "$why" ]; then why=${WHY[$name]:-}; fi
            printf "%-7s %-${BW}s %-18s %10s %20s%s %11s%s%s\n" "$round" "$name" "$c" "${IOPS[$k]:--}" \
                "${CPU[$k]:--}" "$(logcol "$k")" "${OTHER[$k]:--}" "${BUSY[$k]:+ (*)}" "${why:+   ($why)}"
        done
    done
done
declare -A MI=() MC=() ML=()
for name in "${BLIST[@]}"; do
    for c in "${JOBS[@]}"; do
        is=() cs=() ls=()
        for ((round = 1; round <= ROUNDS; round++)); do
            is+=("${IOPS[$name:$round:$c]:-}") cs+=("${CPU[$name:$round:$c]:-}") ls+=("${LOGMB[$name:$round:$c]:-}")
        done
        MI[$name:$c]=$(median "${is[@]}") MC[$name:$c]=$(median "${cs[@]}") ML[$name:$c]=$(median "${ls[@]}")
        if [ "$ROUNDS" -gt 1 ]; then
            printf "%-7s %-${BW}s %-18s %10s %20s%s\n" median "$name" "$c" "${MI[$name:$c]:--}" "${MC[$name:$c]:--}" \
                "$(if recording; then printf ' %9s' "${ML[$name:$c]:--}"; fi)"
        fi
    done
done
# The ratios: every other backend against BASELINE (ours against the peer is
# called switchboard/peer).
for b in "${BLIST[@]}"; do
    if [ "$b" = "$BASELINE" ] || ! has "$BASELINE"; then continue; fi
    base=$BASELINE label=$b/$BASELINE
    if [ "$label" = ours/peer ]; then label=switchboard/peer; fi
    for ((round = 1; round <= ROUNDS && ROUNDS > 1; round++)); do
        for c in "${JOBS[@]}"; do
            printf 'round %-2s %s %-18s guest IOPS %s, backend CPU per I/O %s\n' "$round" "$label" "$c" \
                "$(ratio "${IOPS[$b:$round:$c]:-}" "${IOPS[$base:$round:$c]:-}")" \
                "$(ratio "${CPU[$b:$round:$c]:-}" "${CPU[$base:$round:$c]:-}")"
        done
    done
    what=; [ "$ROUNDS" -gt 1 ] && what="(ratio of the medians) "
    for c in "${JOBS[@]}"; do
        printf '%s %s%-18s guest IOPS %s, backend CPU per I/O %s\n' "$label" "$what" "$c" \
            "$(ratio "${MI[$b:$c]:-}" "${MI[$base:$c]:-}")" \
            "$(ratio "${MC[$b:$c]:-}" "${MC[$base:$c]:-}")"
    done
    # the same-round pairs: less exposed to a drift of the machine between rounds
    for c in "${JOBS[@]}"; do
        [ "$ROUNDS" -gt 1 ] || break
        ri=() rc=() qi=() qc=()
        for ((round = 1; round <= ROUNDS; round++)); do
            i=$(ratio "${IOPS[$b:$round:$c]:-}" "${IOPS[$base:$round:$c]:-}" | tr -d x)
            u=$(ratio "${CPU[$b:$round:$c]:-}" "${CPU[$base:$round:$c]:-}" | tr -d x)
            ri+=("$i") rc+=("$u")
            if [ -z "${BUSY[$b:$round:$c]:-}${BUSY[$base:$round:$c]:-}" ]; then qi+=("$i") qc+=("$u"); fi
        done
        printf '%s (median of the round ratios) %-18s guest IOPS %s, backend CPU per I/O %s\n' "$label" "$c" \
            "$(ratio "$(median "${ri[@]}")" 1)" "$(ratio "$(median "${rc[@]}")" 1)"
        if [ ${#qi[@]} -lt "$ROUNDS" ]; then
            printf '%s (the same, %s undisturbed round(s) only) %-18s guest IOPS %s, backend CPU per I/O %s\n' \
                "$label" "${#qi[@]}" "$c" "$(ratio "$(median "${qi[@]}")" 1)" "$(ratio "$(median "${qc[@]}")" 1)"
        fi
    done
done
exit $fail
