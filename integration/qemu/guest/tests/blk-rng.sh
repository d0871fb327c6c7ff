# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk-rng: one session on a disk and an entropy device (vhost-user-blk and
# vhost-user-rng, both present): blk-rw, then rng (one HARNESS RESULT line
# each). With harness.unplug=1 it then prints HARNESS READY and waits (up to
# harness.idle_secs each, default 120) for the host to hot-unplug the
# virtio-rng device and then to plug an entropy device back in (any
# virtio-rng: the host's sign that it is done with the unplug), and writes
# and reads back harness.after_kib KiB (default 256) at harness.after_off
# (bytes, default 16 MiB) of the disk, with an fsync (a flush request):
# HARNESS RESULT name=blk-after-unplug.
# Params: those of blk-rw (harness.mib, harness.dev) and the above.
. /tests/lib.sh
sh /tests/blk-rw.sh; a=$?
sh /tests/rng.sh; b=$?
[ $a = 0 ] && [ $b = 0 ] || exit 1
[ "${H_unplug:-0}" = 1 ] || exit 0

# A virtio device with device id 4 (entropy source, virtio spec 5.4).
rng_present() { grep -qx 0x0004 /sys/bus/virtio/devices/*/device 2>/dev/null; }
rng_present || { result blk-after-unplug 0 no-rng-before-unplug; exit 1; }
hwrng() { cat /sys/class/misc/hw_random/rng_current 2>/dev/null; }
echo "HARNESS READY uptime=$(now)"
end=$(( $(cut -d. -f1 /proc/uptime) + ${H_idle_secs:-120} ))
while rng_present && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.1; done
rng_present && { result blk-after-unplug 0 rng-never-unplugged; exit 1; }
echo "HARNESS EVENT uptime=$(now) rng=gone hwrng=$(hwrng)"
end=$(( $(cut -d. -f1 /proc/uptime) + ${H_idle_secs:-120} ))
while ! rng_present && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.1; done
rng_present || { result blk-after-unplug 0 rng-never-back; exit 1; }
echo "HARNESS EVENT uptime=$(now) rng=back hwrng=$(hwrng)"

DEV=$(blkdev); OFF=${H_after_off:-16777216}; LEN=$(( ${H_after_kib:-256} * 1024 ))
head -c $LEN /dev/urandom > /tmp/after
dd if=/tmp/after of="$DEV" bs=65536 seek="$OFF" oflag=seek_bytes conv=notrunc,fsync 2>/dev/null \
    || { result blk-after-unplug 0 write-failed off="$OFF"; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs "$DEV"
want=$(md5sum < /tmp/after | cut -d' ' -f1)
got=$(dd if="$DEV" bs=65536 skip="$OFF" count="$LEN" iflag=skip_bytes,count_bytes 2>/dev/null | md5sum | cut -d' ' -f1)
info "blk-chunk off=$OFF len=$LEN md5=$want read=$got"
[ "$want" = "$got" ] && ok=1 || ok=0
result blk-after-unplug "$ok" "$LEN" off="$OFF" len="$LEN"
[ "$ok" = 1 ]
