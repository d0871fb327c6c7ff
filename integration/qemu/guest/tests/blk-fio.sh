# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk-fio: fio against the raw disk, prints IOPS.
# Params (harness.X=...): fio_rw (randread), fio_bs (4k), fio_iodepth (32),
#   fio_runtime (10), fio_numjobs (1), dev (/dev/vda)
. /tests/lib.sh
DEV=$(blkdev)
command -v fio >/dev/null || { result blk-fio 0 no-fio; exit 1; }
[ -b "$DEV" ] || { result blk-fio 0 no-device dev=$DEV; exit 1; }
RW=${H_fio_rw:-randread} BS=${H_fio_bs:-4k} QD=${H_fio_iodepth:-32}
RT=${H_fio_runtime:-10} NJ=${H_fio_numjobs:-1}
out=$(fio --name=h --filename=$DEV --rw=$RW --bs=$BS --iodepth=$QD --numjobs=$NJ \
          --ioengine=libaio --direct=1 --runtime=$RT --time_based --thread \
          --group_reporting --output-format=terse --terse-version=3 2>&1)
rc=$?
line=$(echo "$out" | grep '^3;' | tail -1)
if [ $rc -ne 0 ] || [ -z "$line" ]; then
    echo "$out" | sed 's/^/HARNESS INFO fio: /'
    result blk-fio 0 fio-failed rc=$rc; exit 1
fi
# terse v3: field 5 error, 8 read IOPS, 7 read KiB/s, 49 write IOPS, 48 write KiB/s
echo "$line" | awk -F';' -v rw=$RW -v bs=$BS -v qd=$QD -v nj=$NJ -v rt=$RT '{
    iops = int($8 + $49 + 0.5)
    ok = ($5 == 0 && iops > 0) ? 1 : 0
    printf "HARNESS RESULT name=blk-fio ok=%d value=%d rw=%s bs=%s iodepth=%s numjobs=%s runtime=%s read_iops=%d write_iops=%d read_kbs=%d write_kbs=%d err=%s\n",
        ok, iops, rw, bs, qd, nj, rt, $8, $49, $7, $48, $5
    exit !ok }'
