#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# fio matrix against any vhost-user-blk backend already listening on SOCKET,
# one guest boot per config, one summary line each (same configs for every
# backend, so the peer and ours can be compared on the same machine).
#
#   bench-blk.sh SOCKET [run-guest.sh options...]
#
# Env: CONFIGS (default "randread:4k:32 randwrite:4k:32 read:128k:8", each RW:BS:IODEPTH),
#      RUNTIME (10), NJ (1),
#      BACKEND_PID: also report the backend's CPU time per I/O (user+sys, all threads,
#      whole boot included) - under TCG the guest is the IOPS bottleneck, this is not.
# Exit 0 when every run passed, 1 otherwise.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=bench-blk.sh
. "$H/common.sh"
case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
[ $# -ge 1 ] || die_rc 2 "expected SOCKET [run-guest.sh options...] (see --help)"
SOCK=$1; shift
RUNTIME=${RUNTIME:-10} NJ=${NJ:-1}
if [ -n "${BACKEND_PID:-}" ] && [ ! -r "/proc/$BACKEND_PID/stat" ]; then
    die "BACKEND_PID=$BACKEND_PID is not a running process"
fi
rc=0
cpu() { if [ -n "${BACKEND_PID:-}" ]; then awk '{print $14 + $15}' "/proc/$BACKEND_PID/stat"; else echo 0; fi; }
field() { grep -o "$1=[0-9]*" <<< "$2" | head -1 | cut -d= -f2 || true; }
for c in ${CONFIGS:-randread:4k:32 randwrite:4k:32 read:128k:8}; do
    IFS=: read -r rw bs qd <<< "$c"
    [ -n "$rw" ] && [ -n "$bs" ] && [ -n "$qd" ] || die_rc 2 "bad config '$c' in CONFIGS (want RW:BS:IODEPTH)"
    c0=$(cpu)
    out=$("$H/run-guest.sh" --socket "$SOCK" --device blk --test blk-fio --arg fio_rw="$rw" \
        --arg fio_bs="$bs" --arg fio_iodepth="$qd" --arg fio_runtime="$RUNTIME" \
        --arg fio_numjobs="$NJ" "$@" 2>&1) || { rc=1; echo "$out" | tail -n 40 >&2; }
    c1=$(cpu)
    r=$(grep -o 'HARNESS RESULT name=blk-fio.*' <<< "$out" || true)
    iops=$(field value "$r")
    per=
    if [ -n "${BACKEND_PID:-}" ] && [ -n "$iops" ] && [ "$iops" -gt 0 ]; then
        per=" backend_cpu_us_per_io=$(awk -v d=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
            -v n=$((iops * RUNTIME)) 'BEGIN{printf "%.1f", d / hz * 1e6 / n}')"
    fi
    b=$(grep -o 'accel=[a-z]* boot=[0-9.?]*s' <<< "$out" || true)
    echo "bench: $rw bs=$bs qd=$qd nj=$NJ iops=$iops" \
         "read_kbs=$(field read_kbs "$r") write_kbs=$(field write_kbs "$r")$per $b"
done
exit $rc
