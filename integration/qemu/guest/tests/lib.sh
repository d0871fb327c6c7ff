# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the guest tests.
# result NAME OK VALUE [more key=value ...]  -> one parseable line on the console
result() {
    n=$1 ok=$2 v=$3; shift 3
    echo "HARNESS RESULT name=$n ok=$ok value=$v${*:+ $*}"
}
info() { echo "HARNESS INFO $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
# first block device backed by virtio-blk (vda unless told otherwise)
blkdev() { echo "${H_dev:-/dev/vda}"; }
