#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Peer baseline backend: qemu-storage-daemon exporting a raw image as vhost-user-blk.
#
#   peer-qsd.sh IMAGE SOCKET [NUM_QUEUES] [FILE_OPTS]
#
# Runs in the foreground (start it with & and stop it by its PID). Creates a
# 256 MiB sparse IMAGE if it does not exist; removes a stale SOCKET first.
# NUM_QUEUES defaults to 1 (then run-guest.sh needs --dev-opts num-queues=1 with
# --smp > 1). FILE_OPTS go to the file blockdev, e.g. "cache.direct=on,aio=native"
# or "aio=io_uring" (default: aio=threads, host page cache).
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=peer-qsd.sh
. "$H/common.sh"
case ${1:-} in -h|--help) print_help "$0"; exit 0 ;; esac
[ $# -ge 2 ] && [ $# -le 4 ] || die_rc 2 "expected IMAGE SOCKET [NUM_QUEUES] [FILE_OPTS] (see --help)"
IMG=$1 SOCK=$2 NQ=${3:-1} FOPTS=${4:-}
[[ $NQ =~ ^[1-9][0-9]*$ ]] || die_rc 2 "NUM_QUEUES must be a positive number, not '$NQ'"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed: run $H/setup.sh"
[ -d "$(dirname "$SOCK")" ] || die "the socket's directory $(dirname "$SOCK") does not exist"
if [ ! -e "$IMG" ]; then truncate -s 256M "$IMG" || die "cannot create the image $IMG"; fi
[ -f "$IMG" ] || die "$IMG is not a regular file"
rm -f "$SOCK"
exec qemu-storage-daemon \
    --blockdev "driver=file,node-name=disk0,filename=$IMG${FOPTS:+,$FOPTS}" \
    --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$NQ"
