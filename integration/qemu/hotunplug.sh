#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Hot-unplug (and optionally re-plug) a vhost-user device from a running guest
# and log what the backend sees (vu-proxy.py sits between QEMU and the backend).
#
#   hotunplug.sh SOCKET [TYPE] [--replug] [run-guest.sh options...]
#
# The backend must already listen on SOCKET. TYPE (blk, rng, ...) defaults to blk.
# Steps: the guest runs test=idle; after HARNESS READY: QMP device_del vu0, wait
# for DEVICE_DELETED, chardev-remove cvu0 (this is what closes the backend's
# connection); with --replug: chardev-add + device_add on the same root port
# (q35; pci.0 with --machine pc), and the guest waits until the device is back.
# Prints run-guest's output, the proxy's log (the backend's view) and the guest
# kernel messages after READY; logs stay in ${TMPDIR:-/tmp}/harness-unplug.XXXXXX.
# Exit: run-guest.sh's exit code; 2 when the guest never got ready or a QMP step failed.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=hotunplug.sh
. "$H/common.sh"
case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
[ $# -ge 1 ] || die_rc 2 "expected SOCKET [TYPE] [--replug] [run-guest.sh options...] (see --help)"
SOCK=$1; shift
[ -S "$SOCK" ] || die_rc 2 "no unix socket at $SOCK (start the backend first)"
TYPE=blk
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then TYPE=$1; shift; fi
REPLUG=0
if [ "${1:-}" = --replug ]; then REPLUG=1; shift; fi
BUS=rp0
for a in "$@"; do [ "$a" = pc ] && [ "${prev:-}" = --machine ] && BUS=pci.0; prev=$a; done
W=$(mktemp -d "${TMPDIR:-/tmp}/harness-unplug.XXXXXX")
QMP=("$H/qmp.py" "$W/g/qmp.sock")
mark() { echo "--- $*" | tee -a "$W/proxy.log"; }

"$H/vu-proxy.py" "$W/proxy.sock" "$SOCK" --log "$W/proxy.log" & PX=$!
RG=
# run-guest.sh takes its QEMU down with it
trap 'kill $PX $RG 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$W/proxy.sock" ] && break; sleep 0.1; done
[ -S "$W/proxy.sock" ] || die_rc 2 "vu-proxy.py did not start listening on $W/proxy.sock"
until=gone; [ $REPLUG = 0 ] || until=back
"$H/run-guest.sh" --socket "$W/proxy.sock" --device "$TYPE" --test idle \
    --arg idle_secs=120 --arg until=$until --arg linger=4 --dir "$W/g" "$@" > "$W/run-guest.out" 2>&1 & RG=$!

for _ in $(seq 1200); do
    grep -qa 'HARNESS READY' "$W/g/serial.log" 2>/dev/null && break
    kill -0 $RG 2>/dev/null || break
    sleep 0.1
done
if ! grep -qa 'HARNESS READY' "$W/g/serial.log" 2>/dev/null; then
    echo "hotunplug: the guest never got ready"; cat "$W/run-guest.out"; exit 2
fi

qmp_fail() { echo "hotunplug: QMP $1 failed; run-guest output:"; kill $RG 2>/dev/null || true
             wait $RG 2>/dev/null || true; cat "$W/run-guest.out"; exit 2; }
mark "device_del vu0"
t0=$(date +%s.%N)
"${QMP[@]}" device_del '{"id": "vu0"}' --wait-event DEVICE_DELETED --timeout 60 || qmp_fail device_del
echo "hotunplug: DEVICE_DELETED after $(echo "$(date +%s.%N) $t0" | awk '{printf "%.2f", $1 - $2}')s"
sleep 0.5
mark "chardev-remove cvu0"
"${QMP[@]}" chardev-remove '{"id": "cvu0"}' || qmp_fail chardev-remove
sleep 0.5
if [ $REPLUG = 1 ]; then
    drv=vhost-user-$TYPE-pci
    mark "chardev-add cvu0 + device_add $drv vu0 on $BUS"
    "${QMP[@]}" chardev-add "{\"id\": \"cvu0\", \"backend\": {\"type\": \"socket\", \"data\":
        {\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$W/proxy.sock\"}}, \"server\": false}}}" \
        || qmp_fail chardev-add
    "${QMP[@]}" device_add "{\"driver\": \"$drv\", \"id\": \"vu0\", \"chardev\": \"cvu0\", \"bus\": \"$BUS\"}" \
        || qmp_fail device_add
fi
rc=0; wait $RG || rc=$?
RG=
cat "$W/run-guest.out"
echo "== backend's view (vu-proxy.py):"; cat "$W/proxy.log"
echo "== guest kernel messages after READY:"
sed -n '/HARNESS READY/,$p' "$W/g/serial.log" | grep -av '^HARNESS' | head -40 || true
echo "hotunplug: run-guest rc=$rc, logs in $W"
exit $rc
