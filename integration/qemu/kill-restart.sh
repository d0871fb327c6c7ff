#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A backend killed with SIGKILL mid-I/O and restarted: does the guest's I/O
# survive? A Linux guest runs fio random writes with crc32c verification
# (guest test blk-fio-verify) on a vhost-user-blk disk whose file I/O is
# slowed, so that about 32 requests are always in flight and complete out
# of order: each file operation waits the latency plus a random part of as
# much again, and every 16th (--slow-every) waits ten times the latency, so
# that at any instant some request is held while later ones complete. (With
# random waits alone, a guest slowed by other guests on the same CPUs can
# keep few requests in flight, and a kill can then find the completed
# requests in ring order: the control run's guest then survives by luck.)
# Once fio runs, the backend is killed with SIGKILL KILLS times,
# INTERVAL seconds apart, and restarted on the same socket each time while
# QEMU reconnects (chardev reconnect=1). Afterwards fio on the host checks
# the image file against what the guest's fio wrote (--verify_only).
#
#   kill-restart.sh --backend ours --bin target/debug/switchboard
#   kill-restart.sh --backend qsd
#
#   --backend B      ours (switchboard serve blk), ours-no-inflight (the same with
#                    in-flight tracking not advertised: SWITCHBOARD_TEST_NO_INFLIGHT=1,
#                    the control run) or qsd (qemu-storage-daemon)
#   --bin PATH       the switchboard binary (for ours; default: target/debug/switchboard)
#   --kills N        SIGKILLs (default 3)
#   --interval S     seconds between kills, from fio's start (default 3)
#   --latency-ms MS  ours: --test-latency-ms (each file operation waits MS plus a
#                    random part of as much again). qsd: a throttle group with the
#                    same mean rate. Default 20
#   --io-threads N   ours: --io-threads (default 16: with the random part, requests
#                    complete far out of order)
#   --slow-every N   ours: --test-slow-every (every Nth file operation waits ten times
#                    the latency; default 16; 0: none)
#   --panic-at N     ours: no SIGKILL; instead the blk handler panics once, on request N
#                    (--test-panic-at N), and the device's supervisor restarts it in the
#                    process (--restart-limit 3) while QEMU reconnects
#   --record LOG     ours with --panic-at: record the run to LOG (--record LOG
#                    --record-data hash), across the restart, for replay
#   --size SIZE      fio's size (default 32M)
#   --dir DIR        keep the guest's and backends' logs here (default: a new temp dir)
#   --timeout S      the guest's timeout (default 600)
#
# Output: the guest's HARNESS lines, then one summary line
#   kill-restart: backend=B kills=N restarts=N guest_ok=0|1 io_errors=N fio_rc=N host_verify=ok|failed|skipped
# Exit: 0 when the guest's fio verify passed with 0 I/O errors and the host
# verify passed; 1 otherwise; 2 on a usage or setup error.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=kill-restart.sh
. "$H/common.sh"

BACKEND= BIN=target/debug/switchboard KILLS=3 INTERVAL=3 LAT=20 IO_THREADS=16 SLOW_EVERY=16 SIZE=32M DIR= TIMEOUT=600 PANIC_AT= RECORD=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) print_help "$0"; exit 0 ;;
        --backend|--bin|--kills|--interval|--latency-ms|--io-threads|--slow-every|--size|--dir|--timeout|--panic-at|--record) need_arg "$1" $# ;;
    esac
    case $1 in
        --backend) BACKEND=$2; shift ;;
        --bin) BIN=$2; shift ;;
        --kills) KILLS=$2; shift ;;
        --interval) INTERVAL=$2; shift ;;
        --latency-ms) LAT=$2; shift ;;
        --io-threads) IO_THREADS=$2; shift ;;
        --slow-every) SLOW_EVERY=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --dir) DIR=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --panic-at) PANIC_AT=$2; shift ;;
        --record) RECORD=$2; shift ;;
        *) die_rc 2 "unknown option '$1' (see --help)" ;;
    esac
    shift
done
case $BACKEND in ours|ours-no-inflight|qsd) ;; *) die_rc 2 "--backend must be ours, ours-no-inflight or qsd, not '${BACKEND}'" ;; esac
if [ -n "$PANIC_AT" ]; then
    [ "$BACKEND" != qsd ] || die_rc 2 "--panic-at needs --backend ours"
    [[ $PANIC_AT =~ ^[1-9][0-9]*$ ]] || die_rc 2 "--panic-at must be a request number from 1, not '$PANIC_AT'"
    KILLS=0
fi
# One process records: a SIGKILLed backend's successor would need a log of its own.
[ -z "$RECORD" ] || [ -n "$PANIC_AT" ] || die_rc 2 "--record needs --panic-at"
for n in KILLS INTERVAL LAT IO_THREADS SLOW_EVERY TIMEOUT; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die_rc 2 "--$(tr 'A-Z_' 'a-z-' <<< "$n") must be a whole number, not '${!n}'"
done
if [ "$BACKEND" != qsd ]; then [ -x "$BIN" ] || die_rc 2 "no switchboard binary at $BIN (build it, or pass --bin)"; fi
command -v fio >/dev/null || die_rc 2 "fio is not installed on the host: run $H/setup.sh"
[ -n "$DIR" ] || DIR=$(mktemp -d "${TMPDIR:-/tmp}/kill-restart.XXXXXX")
mkdir -p "$DIR/guest"
DIR=$(realpath "$DIR")
IMG=$DIR/disk.img SOCK=$DIR/vu.sock
rm -f "$IMG" "$SOCK"
truncate -s 64M "$IMG"
truncate -s ">$SIZE" "$IMG"   # at least fio's size

BPID=
start_backend() {
    local log=$DIR/backend.$1.log
    rm -f "$SOCK"
    if [ "$BACKEND" != qsd ]; then
        local env=() slow=()
        [ "$BACKEND" = ours ] || env=(SWITCHBOARD_TEST_NO_INFLIGHT=1)
        [ "$SLOW_EVERY" = 0 ] || [ "$LAT" = 0 ] || slow=(--test-slow-every "$SLOW_EVERY")
        env "${env[@]}" RUST_LOG=${RUST_LOG:-info} "$BIN" serve blk --path "$IMG" --socket-path "$SOCK" --io-threads "$IO_THREADS" \
            --test-latency-ms "$LAT" "${slow[@]}" ${PANIC_AT:+--test-panic-at "$PANIC_AT" --restart-limit 3} \
            ${RECORD:+--record "$RECORD" --record-data hash} >"$log" 2>&1 &
    else
        # The same mean rate as ours: IO_THREADS threads, LAT * 1.5 ms per operation.
        local iops=$(( LAT > 0 ? IO_THREADS * 1000 * 2 / (3 * LAT) : 0 ))
        local throttle=()
        [ "$iops" -gt 0 ] && throttle=(--object "throttle-group,id=tg0,x-iops-total=$iops")
        rm -f "$SOCK"
        if [ "$iops" -gt 0 ]; then
            qemu-storage-daemon "${throttle[@]}" \
                --blockdev "driver=file,node-name=file0,filename=$IMG" \
                --blockdev "driver=throttle,node-name=disk0,throttle-group=tg0,file=file0" \
                --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1" \
                >"$log" 2>&1 &
        else
            "$H/peer-qsd.sh" "$IMG" "$SOCK" 1 >"$log" 2>&1 &
        fi
    fi
    BPID=$!
    local rc=0
    await_socket "$BPID" "$SOCK" "$log" || rc=$?
    [ "$rc" = 0 ] || die "backend start $1 failed: $AWAIT_WHY"
}
cleanup() { [ -z "$BPID" ] || kill -9 "$BPID" 2>/dev/null || true; }
trap cleanup EXIT

start_backend 0
"$H/run-guest.sh" --socket "$SOCK" --device blk --dev-opts num-queues=1 --test blk-fio-verify \
    --arg fio_size="$SIZE" --reconnect 1 --timeout "$TIMEOUT" --dir "$DIR/guest" \
    >"$DIR/guest.out" 2>&1 &
GPID=$!
# fio's start in the guest's serial log.
for _ in $(seq 1 "$TIMEOUT"); do
    grep -q 'HARNESS INFO fio-start' "$DIR/guest/serial.log" 2>/dev/null && break
    kill -0 "$GPID" 2>/dev/null || break
    sleep 1
done
grep -q 'HARNESS INFO fio-start' "$DIR/guest/serial.log" 2>/dev/null \
    || { cat "$DIR/guest.out" >&2; die "the guest never started fio"; }
note "fio started; killing the $BACKEND backend $KILLS times, every ${INTERVAL}s"
for k in $(seq 1 "$KILLS"); do
    sleep "$INTERVAL"
    if grep -q 'HARNESS INFO fio-end' "$DIR/guest/serial.log"; then
        note "fio ended before kill $k"; break
    fi
    kill -9 "$BPID"; wait "$BPID" 2>/dev/null || true
    note "kill $k: SIGKILL sent"
    start_backend "$k"
    note "kill $k: backend restarted (pid $BPID)"
done
grc=0
wait "$GPID" || grc=$?
grep -E '^HARNESS (RESULT|INFO (fio|dmesg))' "$DIR/guest.out" || true
result=$(grep -o 'HARNESS RESULT name=blk-fio-verify.*' "$DIR/guest.out" || true)
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<< "$result"; }
guest_ok=$(field ok) errors=$(sed -n 's/.* value=\([^ ]*\).*/\1/p' <<< "$result") fio_rc=$(field fio_rc)
[ -n "$result" ] || { guest_ok=0 errors=unknown fio_rc="none(guest rc=$grc)"; tail -n 20 "$DIR/guest.out" >&2; }
kill -9 "$BPID" 2>/dev/null || true; wait "$BPID" 2>/dev/null || true; BPID=
host=skipped
if [ "$guest_ok" = 1 ]; then
    if (cd "$DIR" && fio --name=verify --filename="$IMG" --rw=randwrite --bs=4k --size="$SIZE" \
        --ioengine=psync --verify=crc32c --verify_only --verify_fatal=1 --randrepeat=1 \
        --verify_state_save=0 \
        >"$DIR/host-verify.log" 2>&1); then host=ok; else host=failed; tail -n 5 "$DIR/host-verify.log" >&2; fi
fi
restarts=$(cat "$DIR"/backend.*.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | grep -c ' restarted ' || true)
echo "kill-restart: backend=$BACKEND kills=$KILLS restarts=$restarts guest_ok=${guest_ok:-0} io_errors=${errors:-unknown} fio_rc=${fio_rc:-none} host_verify=$host dir=$DIR"
[ "$guest_ok" = 1 ] && [ "$host" = ok ]
