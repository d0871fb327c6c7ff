# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# probe: list every virtio device, its device id, driver and negotiated
# features. ok=1 if at least one device is bound to a driver, or, with
# harness.expect=N, if exactly N devices are bound (expect=0: a boot with no device).
. /tests/lib.sh
n=0
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
    info "virtio $(basename $d) device=$(cat $d/device) vendor=$(cat $d/vendor)" \
         "driver=${drv:-none} status=$(cat $d/status 2>/dev/null) features=$(cat $d/features)"
    [ -n "$drv" ] && n=$((n + 1))
done
if [ -n "${H_expect:-}" ]; then
    [ "$n" = "$H_expect" ] && ok=1 || ok=0
else
    [ $n -gt 0 ] && ok=1 || ok=0
fi
result probe $ok $n bound=$n${H_expect:+ expect=$H_expect}
[ $ok = 1 ]
