# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk-fio-verify: fio random writes with crc32c verification on the raw disk
# (every block written is read back and checked), then the kernel's I/O
# errors are counted. ok=1 only if fio passed its verify and the kernel
# logged no I/O error and no "is not a head".
# Params (harness.X=...): fio_size (32M), fio_bs (4k), fio_iodepth (32), dev (/dev/vda)
. /tests/lib.sh
DEV=$(blkdev)
command -v fio >/dev/null || { result blk-fio-verify 0 no-fio; exit 1; }
[ -b "$DEV" ] || { result blk-fio-verify 0 no-device dev=$DEV; exit 1; }
SIZE=${H_fio_size:-32M} BS=${H_fio_bs:-4k} QD=${H_fio_iodepth:-32}
info "fio-start size=$SIZE bs=$BS iodepth=$QD"
out=$(fio --name=verify --filename=$DEV --rw=randwrite --bs=$BS --iodepth=$QD --size=$SIZE \
          --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
          --randrepeat=1 --output-format=terse --terse-version=3 2>&1)
rc=$?
info "fio-end rc=$rc"
line=$(echo "$out" | grep '^3;' | tail -1)
err=$(echo "$line" | cut -d';' -f5)
echo "$out" | grep -v '^3;' | head -20 | sed 's/^/HARNESS INFO fio: /'
errors=$(dmesg | grep -c -E 'I/O error|is not a head|blk_update_request')
heads=$(dmesg | grep -c 'is not a head')
dmesg | grep -E 'I/O error|not a head|virtio_blk' | tail -5 | sed 's/^/HARNESS INFO dmesg: /'
ok=0
[ "$rc" -eq 0 ] && [ "$errors" -eq 0 ] && [ "${err:-1}" = 0 ] && ok=1
result blk-fio-verify $ok $errors fio_rc=$rc fio_err=${err:-none} not_a_head=$heads size=$SIZE
