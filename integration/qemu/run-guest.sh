#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Boot the harness guest under QEMU with vhost-user device(s) served by an
# external backend over a unix socket (QEMU is the vhost-user front-end and
# the socket client), run one guest test and exit with its result.
#
#   run-guest.sh --socket /tmp/vu.sock --device blk --test blk-rw
#   run-guest.sh --test probe                       # no device at all
#
#   --socket PATH     backend's vhost-user socket; repeat with --device for more devices
#   --device TYPE     blk|rng|vsock|fs|net|scsi|input|gpio|i2c, or a QEMU device name
#                     taking chardev= (ids: vu0, vu1, ...; chardevs cvu0, ...)
#   --dev-opts OPTS   extra properties for the last --device, e.g. num-queues=2
#   --test NAME       guest/tests/NAME.sh: blk-rw blk-fio rng blk-rng probe idle shell (default probe)
#   --arg K=V         test parameter, reaches the guest as harness.K=V ($H_K); repeatable
#   --kargs STR       extra kernel command line (e.g. quiet, or loglevel=7)
#   --mem SIZE        guest RAM (default 512M), always memfd share=on (vhost-user needs it)
#   --smp N           vCPUs (default 1). vhost-user-blk-pci defaults to one queue per vCPU:
#                     with a 1-queue backend add --dev-opts num-queues=1
#   --accel A         kvm|tcg|auto (default auto: kvm only if /dev/kvm opens AND the CPU
#                     flags show vmx/svm, else tcg)
#   --machine M       q35 (default; each device on its own hot-pluggable root port) or pc
#   --timeout S       kill QEMU after S seconds (default 180)
#   --dir DIR         keep serial.log, qemu.log, cmdline, qmp.sock, qemu.pid here (default: a new
#                     ${TMPDIR:-/tmp}/harness.XXXXXX, removed after a passing run unless KEEP=1)
#   --reconnect S     QEMU re-dials a restarted backend after S seconds
#                     (chardev reconnect=S, or reconnect-ms=S*1000 on QEMU >= 9.2)
#   --kernel FILE     default $CACHE/vmlinuz (setup.sh)
#   --initrd FILE     default $CACHE/initramfs.cpio, or $CACHE/initramfs-fio.cpio for *fio*
#                     tests (both rebuilt automatically when guest/ changes)
#   --interactive     serial on this terminal (use with --test shell)
#   --qemu-arg ARG    extra raw QEMU argument; repeatable (e.g. --qemu-arg -trace --qemu-arg 'vhost_user_*')
#   -v                print the whole serial log at the end
#
# $CACHE is $SWITCHBOARD_QEMU_CACHE or ~/.cache/switchboard-qemu (see setup.sh --help).
# Output: the guest's HARNESS RESULT/INFO/EVENT/WARN lines, then one summary line
# "run-guest: test=... accel=... boot=...s ... rc=N dir=...".
# Exit: 0 every HARNESS RESULT ok=1; 1 a result ok=0 (or none); 2 usage error, setup
# failure or no DONE line (boot or harness failure: qemu.log and the serial tail are
# printed); 124 timeout.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=run-guest.sh
. "$H/common.sh"

SOCKS=() DEVS=() OPTS=() ARGS=() QARGS=()
TEST=probe MEM=512M SMP=1 ACCEL=auto MACHINE=q35 TIMEOUT=180 DIR= RECONNECT=
INITRD= KERNEL= INTERACTIVE=0 VERBOSE=0
while [ $# -gt 0 ]; do
    case $1 in
        --socket|--device|--dev-opts|--test|--arg|--kargs|--mem|--smp|--accel|--machine|--timeout|\
        --dir|--reconnect|--initrd|--kernel|--qemu-arg) need_arg "$1" $# ;;
    esac
    case $1 in
        --socket) SOCKS+=("$2"); shift ;;
        --device) DEVS+=("$2"); OPTS+=(""); shift ;;
        --dev-opts)
            [ ${#DEVS[@]} -gt 0 ] || die_rc 2 "--dev-opts applies to the last --device: give --device first"
            OPTS[${#DEVS[@]}-1]=",$2"; shift ;;
        --test) TEST=$2; shift ;;
        --arg) ARGS+=("harness.$2"); shift ;;
        --kargs) ARGS+=("$2"); shift ;;
        --mem) MEM=$2; shift ;;
        --smp) SMP=$2; shift ;;
        --accel) ACCEL=$2; shift ;;
        --machine) MACHINE=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --dir) DIR=$2; shift ;;
        --reconnect) RECONNECT=$2; shift ;;
        --initrd) INITRD=$2; shift ;;
        --kernel) KERNEL=$2; shift ;;
        --interactive) INTERACTIVE=1 ;;
        --qemu-arg) QARGS+=("$2"); shift ;;
        -v) VERBOSE=1 ;;
        -h|--help) print_help "$0"; exit 0 ;;
        *) die_rc 2 "unknown option $1 (see --help)" ;;
    esac
    shift
done
[ ${#SOCKS[@]} -eq ${#DEVS[@]} ] \
    || die_rc 2 "need one --socket per --device (got ${#SOCKS[@]} sockets, ${#DEVS[@]} devices)"
case $ACCEL in auto|kvm|tcg) ;; *) die_rc 2 "--accel must be kvm, tcg or auto, not '$ACCEL'" ;; esac
case $MACHINE in q35|pc) ;; *) die_rc 2 "--machine must be q35 or pc, not '$MACHINE'" ;; esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die_rc 2 "--timeout must be whole seconds, not '$TIMEOUT'"
[[ $SMP =~ ^[0-9]+$ ]] || die_rc 2 "--smp must be a number, not '$SMP'"
[ -z "$RECONNECT" ] || [[ $RECONNECT =~ ^[0-9]+$ ]] || die_rc 2 "--reconnect must be whole seconds, not '$RECONNECT'"
command -v qemu-system-x86_64 >/dev/null || die_rc 2 "qemu-system-x86_64 is not installed: run $H/setup.sh"

# Guest image: the fio tests get the (bigger, slower to boot) image with fio.
# The default images are (re)built when missing or when guest/ changed.
if [ -z "$KERNEL" ]; then
    require_cache
    KERNEL=$CACHE/vmlinuz
    if [ ! -e "$KERNEL" ]; then "$H/setup.sh" --no-initramfs || die_rc 2 "setup.sh failed"; fi
fi
[ -e "$KERNEL" ] || die_rc 2 "no kernel at $KERNEL"
if [ -z "$INITRD" ]; then
    require_cache
    [ -f "$H/guest/tests/$TEST.sh" ] || die_rc 2 "no guest test '$TEST' (no $H/guest/tests/$TEST.sh)"
    case $TEST in
        *fio*) INITRD=$CACHE/initramfs-fio.cpio; "$H/build-initramfs.sh" "$INITRD" fio >/dev/null ;;
        *) INITRD=$CACHE/initramfs.cpio; "$H/build-initramfs.sh" "$INITRD" >/dev/null ;;
    esac || die_rc 2 "could not build $INITRD"
fi
[ -e "$INITRD" ] || die_rc 2 "no initramfs at $INITRD"

AUTODIR=0
if [ -z "$DIR" ]; then DIR=$(mktemp -d "${TMPDIR:-/tmp}/harness.XXXXXX"); AUTODIR=1; fi
mkdir -p "$DIR" || die_rc 2 "cannot create --dir $DIR"
rm -f "$DIR"/{serial.log,qemu.log,qmp.sock,qemu.pid}
LOG=$DIR/serial.log

if [ "$ACCEL" = auto ]; then
    # Hardware KVM only: an openable /dev/kvm whose CPU shows vmx/svm. (A software
    # KVM such as kvm_pvm opens fine but cannot boot a stock kernel: see README.md.)
    ACCEL=tcg
    if (exec 3<>/dev/kvm) 2>/dev/null && grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; fi
fi
if [ "$ACCEL" = kvm ]; then CPU=host; else CPU=max; fi

# chardev "reconnect" (seconds) was deprecated in QEMU 9.2 for "reconnect-ms" and later removed.
RECONNECT_OPT=
if [ -n "$RECONNECT" ]; then
    qv=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    read -r qmaj qmin <<< "${qv:-0 0}"
    if [ "$qmaj" -gt 9 ] || { [ "$qmaj" -eq 9 ] && [ "$qmin" -ge 2 ]; }; then
        RECONNECT_OPT=,reconnect-ms=$((RECONNECT * 1000))
    else
        RECONNECT_OPT=,reconnect=$RECONNECT
    fi
fi

Q=(qemu-system-x86_64 -nodefaults -no-user-config -nographic -no-reboot
   -machine "$MACHINE,memory-backend=mem" -accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM"
   -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
   -kernel "$KERNEL" -initrd "$INITRD"
   -append "console=ttyS0 panic=-1 harness.test=$TEST ${ARGS[*]:-}"
   -qmp "unix:$DIR/qmp.sock,server=on,wait=off")
if [ $INTERACTIVE = 1 ]; then Q+=(-serial mon:stdio); else Q+=(-serial "file:$LOG"); fi

for i in "${!DEVS[@]}"; do
    s=${SOCKS[$i]} t=${DEVS[$i]} o=${OPTS[$i]} bus=
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.1; done   # backend may still be starting
    [ -S "$s" ] || die_rc 2 "no unix socket at $s after 10 s (is the backend listening there?)"
    Q+=(-chardev "socket,id=cvu$i,path=$s$RECONNECT_OPT")
    if [ "$MACHINE" = q35 ]; then
        Q+=(-device "pcie-root-port,id=rp$i,bus=pcie.0,chassis=$((i + 1))"); bus=",bus=rp$i"
    fi
    case $t in
        net) Q+=(-netdev "vhost-user,id=net$i,chardev=cvu$i" -device "virtio-net-pci,id=vu$i,netdev=net$i$bus$o") ;;
        fs)  Q+=(-device "vhost-user-fs-pci,id=vu$i,chardev=cvu$i,tag=harness$i$bus$o") ;;
        blk|rng|vsock|scsi|input|gpio|i2c) Q+=(-device "vhost-user-$t-pci,id=vu$i,chardev=cvu$i$bus$o") ;;
        *)   Q+=(-device "$t,id=vu$i,chardev=cvu$i$bus$o") ;;
    esac
done
Q+=("${QARGS[@]}")
echo "${Q[*]}" > "$DIR/cmdline"

start=$(date +%s.%N)
if [ $INTERACTIVE = 1 ]; then
    exec "${Q[@]}"
fi
"${Q[@]}" >"$DIR/qemu.log" 2>&1 &
QPID=$!; echo $QPID > "$DIR/qemu.pid"
# never leave our QEMU behind, whatever ends this script
trap 'kill $QPID 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

# Wait for QEMU to exit; note when the guest's init starts; enforce the timeout.
boot= timed_out=0 SECONDS=0
while kill -0 $QPID 2>/dev/null; do
    t=$(date +%s.%N)
    if [ -z "$boot" ] && grep -qa 'HARNESS INIT' "$LOG" 2>/dev/null; then
        boot=$(echo "$t $start" | awk '{printf "%.2f", $1 - $2}')
    fi
    if [ $SECONDS -ge "$TIMEOUT" ]; then
        timed_out=1; kill $QPID 2>/dev/null || true; sleep 1; kill -9 $QPID 2>/dev/null || true; break
    fi
    sleep 0.05
done
qrc=0; wait $QPID 2>/dev/null || qrc=$?
trap - EXIT
total=$(echo "$(date +%s.%N) $start" | awk '{printf "%.2f", $1 - $2}')

# the serial console writes \r\n
if [ -e "$LOG" ]; then tr -d '\r' < "$LOG" > "$LOG.txt" && mv -f "$LOG.txt" "$LOG"; else : > "$LOG"; fi
if [ $VERBOSE = 1 ]; then cat "$LOG"; fi
ginit=$(grep -a -o 'HARNESS INIT uptime=[0-9.]*' "$LOG" | head -1 | cut -d= -f2 || true)
gdone=$(grep -a -o 'HARNESS DONE .*' "$LOG" | head -1 || true)
grep -a -o 'HARNESS \(RESULT\|INFO\|EVENT\|WARN\) .*' "$LOG" || true

if [ $timed_out = 1 ]; then rc=124
elif [ -z "$gdone" ]; then rc=2
elif ! grep -aq 'HARNESS RESULT ' "$LOG" || grep -aqE 'HARNESS RESULT .* ok=0( |$)' "$LOG"; then rc=1
else rc=0; fi
# a passing run without --dir leaves nothing behind (KEEP=1 keeps it)
if [ $rc = 0 ] && [ $AUTODIR = 1 ] && [ -z "${KEEP:-}" ]; then
    rm -rf "$DIR"; DIR="(removed; KEEP=1 keeps it)"
fi
echo "run-guest: test=$TEST accel=$ACCEL boot=${boot:-?}s (guest uptime at init ${ginit:-?}s)" \
     "total=${total}s qemu_rc=$qrc rc=$rc dir=$DIR"
case $rc in
    124) echo "run-guest: TIMEOUT after ${TIMEOUT}s; serial tail:" >&2; tail -n 30 "$LOG" >&2 ;;
    2) echo "run-guest: no HARNESS DONE line; qemu.log and serial tail:" >&2
       cat "$DIR/qemu.log" >&2; tail -n 30 "$LOG" >&2 ;;
esac
exit $rc
