# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# rng: read 4 KiB from /dev/hwrng (virtio-rng), twice; must be full length,
# not all zeros, and the two reads must differ.
. /tests/lib.sh
[ -c /dev/hwrng ] || { result rng 0 no-hwrng; exit 1; }
cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
info "rng current=$cur available=$(cat /sys/class/misc/hw_random/rng_available 2>/dev/null | tr ' ' ,)"
timeout 30 head -c 4096 /dev/hwrng > /tmp/r1
timeout 30 head -c 4096 /dev/hwrng > /tmp/r2
n=$(wc -c < /tmp/r1); nz=$(tr -d '\000' < /tmp/r1 | wc -c)
same=0; cmp -s /tmp/r1 /tmp/r2 && same=1
ok=0
case "$cur" in virtio_rng*) [ "$n" = 4096 ] && [ "$nz" -gt 0 ] && [ $same = 0 ] && ok=1 ;; esac
result rng $ok $n bytes=$n nonzero=$nz identical=$same current=$cur
[ $ok = 1 ]
