#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# End-to-end proof with the peer backend (qemu-storage-daemon, vhost-user-blk)
# on a fresh 256 MiB raw image with 1 MiB of known data at its start:
# blk-rw in the guest, the guest's view of the known data, the host-side image
# check (check-image.sh), then blk-fio.
#
#   e2e-qsd.sh [run-guest.sh options...]       e.g. e2e-qsd.sh --accel tcg
#
# Env: W (work dir, default ${TMPDIR:-/tmp}/harness-qsd), NQ (queues, 1), FOPTS (file
# blockdev options, e.g. cache.direct=on,aio=native), FIO_RUNTIME (10; 0 skips blk-fio).
# Exit 0 when every step passed, 1 otherwise.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=e2e-qsd.sh
. "$H/common.sh"
case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
W=${W:-${TMPDIR:-/tmp}/harness-qsd}
mkdir -p "$W" || die "cannot create the work dir $W"
IMG=$W/disk.img SOCK=$W/vu.sock NQ=${NQ:-1} FIO_RUNTIME=${FIO_RUNTIME:-10}
rm -f "$IMG"; truncate -s 256M "$IMG"
head -c 1M /dev/urandom | dd of="$IMG" conv=notrunc status=none   # known pre-existing data
pre=$(head -c 1M "$IMG" | md5sum | cut -d' ' -f1)

"$H/peer-qsd.sh" "$IMG" "$SOCK" "$NQ" "${FOPTS:-}" > "$W/qsd.log" 2>&1 &
QSD=$!
trap 'kill $QSD 2>/dev/null || true; wait $QSD 2>/dev/null || true' EXIT
fail=0

"$H/run-guest.sh" --socket "$SOCK" --device blk --dev-opts "num-queues=$NQ" \
    --test blk-rw --dir "$W/rw" "$@" || fail=1
gpre=$(grep -a -o 'blk-pre off=0 len=1048576 md5=[0-9a-f]*' "$W/rw/serial.log" 2>/dev/null | cut -d= -f4 || true)
if [ "$gpre" = "$pre" ]; then
    echo "e2e: pre-existing data read correctly"
else
    echo "e2e: pre-existing data MISMATCH host=$pre guest=${gpre:-none}"; fail=1
fi
"$H/check-image.sh" "$W/rw/serial.log" "$IMG" || fail=1

if [ "$FIO_RUNTIME" != 0 ]; then
    "$H/run-guest.sh" --socket "$SOCK" --device blk --dev-opts "num-queues=$NQ" \
        --test blk-fio --arg fio_runtime="$FIO_RUNTIME" --dir "$W/fio" "$@" || fail=1
fi
if ! kill -0 $QSD 2>/dev/null; then echo "e2e: qemu-storage-daemon died; its log:"; cat "$W/qsd.log"; fail=1; fi

echo "e2e-qsd: $([ $fail = 0 ] && echo PASS || echo FAIL) (logs in $W)"
exit $fail
