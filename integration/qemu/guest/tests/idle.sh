# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# idle: print HARNESS READY, then watch the virtio devices for harness.idle_secs
# (default 60) and print an EVENT line whenever the set changes (hot-unplug/plug).
# harness.until=gone ends early once no virtio device is left;
# harness.until=back ends once a device came back after having gone.
# harness.linger=S keeps watching S more seconds once the until-condition is met.
. /tests/lib.sh
snap() { echo "virtio=$(ls /sys/bus/virtio/devices | tr '\n' , ) block=$(ls /sys/block | tr '\n' ,)"; }
prev=$(snap); gone=0
echo "HARNESS READY uptime=$(now) $prev"
end=$(( $(cut -d. -f1 /proc/uptime) + ${H_idle_secs:-60} ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do
    cur=$(snap)
    if [ "$cur" != "$prev" ]; then
        echo "HARNESS EVENT uptime=$(now) $cur"; prev=$cur
        case "$cur" in virtio=\ *) gone=1; [ "${H_until:-}" = gone ] && met=1 ;;
                       *) [ $gone = 1 ] && [ "${H_until:-}" = back ] && met=1 ;; esac
        [ -n "${met:-}" ] && [ -z "${stop:-}" ] && stop=1 && end=$(( $(cut -d. -f1 /proc/uptime) + ${H_linger:-0} ))
    fi
    sleep 0.1
done
result idle 1 "$(ls /sys/bus/virtio/devices | wc -l)" gone_seen=$gone
