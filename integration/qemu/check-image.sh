#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Host-side check after a blk-rw run against a file-backed backend: every chunk
# the guest wrote (its "HARNESS INFO blk-chunk off= len= md5=" lines) must be
# at that offset of IMAGE.
#
#   check-image.sh SERIAL_LOG IMAGE
#
# SERIAL_LOG is serial.log in run-guest.sh's --dir (or a kept KEEP=1 dir).
# Exit: 0 every chunk matches; 1 a mismatch or no chunk in the log; 2 usage error.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=check-image.sh
case ${1:-} in -h|--help) . "$H/common.sh"; print_help "$0"; exit 0 ;; esac
[ $# -eq 2 ] || { echo "check-image.sh: error: expected SERIAL_LOG IMAGE (see --help)" >&2; exit 2; }
LOG=$1 IMG=$2 n=0 bad=0
[ -r "$LOG" ] || { echo "check-image.sh: error: cannot read the serial log $LOG" >&2; exit 2; }
[ -r "$IMG" ] || { echo "check-image.sh: error: cannot read the image $IMG" >&2; exit 2; }
while read -r line; do
    off=$(grep -o 'off=[0-9]*' <<< "$line" | cut -d= -f2)
    len=$(grep -o 'len=[0-9]*' <<< "$line" | cut -d= -f2)
    want=$(grep -o 'md5=[0-9a-f]*' <<< "$line" | head -1 | cut -d= -f2)
    got=$(dd if="$IMG" bs=64K skip="$off" count="$len" iflag=skip_bytes,count_bytes 2>/dev/null | md5sum | cut -d' ' -f1)
    n=$((n + 1))
    if [ "$want" != "$got" ]; then
        bad=$((bad + 1))
        echo "check-image: MISMATCH off=$off len=$len guest=$want image=$got"
    fi
done < <(grep -a -o 'HARNESS INFO blk-chunk .*' "$LOG" || true)
echo "check-image: $n chunks, $bad bad"
if [ $n -eq 0 ]; then echo "check-image: no 'HARNESS INFO blk-chunk' line in $LOG (not a blk-rw log?)" >&2; fi
[ $n -gt 0 ] && [ $bad -eq 0 ]
