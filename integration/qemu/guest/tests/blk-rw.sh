# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk-rw: write distinct random chunks at several offsets of the disk, sync,
# drop caches, read back and compare md5s. Also reports geometry.
# Params: harness.mib=N (chunk size, default 4), harness.dev=/dev/vdX
. /tests/lib.sh
DEV=$(blkdev); B=${DEV#/dev/}; Q=/sys/block/$B/queue
[ -b "$DEV" ] || { result blk-rw 0 no-device dev=$DEV; exit 1; }
SECT=$(cat /sys/block/$B/size); BYTES=$((SECT * 512))
info "blk dev=$DEV sectors=$SECT bytes=$BYTES ro=$(cat /sys/block/$B/ro)" \
     "lbs=$(cat $Q/logical_block_size) pbs=$(cat $Q/physical_block_size)" \
     "mq=$(ls /sys/block/$B/mq | wc -l) max_sectors_kb=$(cat $Q/max_sectors_kb)" \
     "discard_max=$(cat $Q/discard_max_bytes) wzeroes_max=$(cat $Q/write_zeroes_max_bytes)" \
     "wcache=$(tr " " - < $Q/write_cache)"

# What was on the disk before we wrote (the host can compare with the image).
info "blk-pre off=0 len=1048576 md5=$(dd if=$DEV bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"

CH=$(( ${H_mib:-4} * 1048576 ))
while [ $((4 * CH + 65536)) -gt $BYTES ] && [ $CH -gt 4096 ]; do CH=$((CH / 2)); done
# start, an odd (sector- but not page-aligned) offset, the middle, the very end
OFFS="0 $((CH + 7 * 512)) $((BYTES / 2 / 4096 * 4096)) $((BYTES - CH))"

t0=$(now); i=0
for off in $OFFS; do
    head -c $CH /dev/urandom > /tmp/c$i
    dd if=/tmp/c$i of=$DEV bs=65536 seek=$off oflag=seek_bytes conv=notrunc 2>/dev/null \
        || { result blk-rw 0 write-failed off=$off; exit 1; }
    i=$((i + 1))
done
sync; echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs $DEV
t1=$(now)

i=0; bad=0
for off in $OFFS; do
    want=$(md5sum < /tmp/c$i | cut -d' ' -f1)
    got=$(dd if=$DEV bs=65536 skip=$off count=$CH iflag=skip_bytes,count_bytes 2>/dev/null | md5sum | cut -d' ' -f1)
    info "blk-chunk off=$off len=$CH md5=$want read=$got"
    [ "$want" = "$got" ] || bad=$((bad + 1))
    i=$((i + 1))
done
t2=$(now)
[ $bad -eq 0 ] && ok=1 || ok=0
result blk-rw $ok $SECT sectors=$SECT chunks=$i chunk_bytes=$CH bad=$bad \
    write_s=$(echo "$t1 $t0" | awk '{print $1-$2}') read_s=$(echo "$t2 $t1" | awk '{print $1-$2}')
[ $ok = 1 ]
