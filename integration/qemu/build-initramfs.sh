#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build the guest initramfs images (uncompressed cpio: boots faster under TCG):
#   $CACHE/initramfs.cpio      busybox-static + virtio modules + guest/init + guest/tests/*.sh
#   $CACHE/initramfs-fio.cpio  the same + fio with its shared libraries and loader
#                              (~90 MB; costs ~1 s more boot under TCG, so only for fio tests)
#
#   build-initramfs.sh [--force]               both images, each only if out of date
#   build-initramfs.sh [--force] OUT [fio]     one image at OUT
#
# An image is out of date when its OUT.stamp (a hash of this script, guest/,
# the kernel version, busybox and fio) differs, so a cache shared by several
# clones never serves an image built from other guest scripts. The cache is
# $SWITCHBOARD_QEMU_CACHE or ~/.cache/switchboard-qemu (see setup.sh --help).
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=build-initramfs.sh
. "$H/common.sh"

FORCE=0 POS=()
while [ $# -gt 0 ]; do
    case $1 in
        --force) FORCE=1 ;;
        -h|--help) print_help "$0"; exit 0 ;;
        -*) die_rc 2 "unknown option $1 (see --help)" ;;
        *) POS+=("$1") ;;
    esac
    shift
done
require_cache
F=(); if [ $FORCE = 1 ]; then F=(--force); fi
if [ ${#POS[@]} -eq 0 ]; then
    "$0" "${F[@]}" "$CACHE/initramfs.cpio"
    exec "$0" "${F[@]}" "$CACHE/initramfs-fio.cpio" fio
fi
[ ${#POS[@]} -le 2 ] || die_rc 2 "too many arguments (see --help)"
OUT=$(realpath -m -- "${POS[0]}") WITH_FIO=0
case ${POS[1]:-} in
    fio) WITH_FIO=1 ;;
    "") ;;
    *) die_rc 2 "second argument must be 'fio', not '${POS[1]}'" ;;
esac
[ -s "$CACHE/kversion" ] || "$H/setup.sh" --no-initramfs
KV=$(cat "$CACHE/kversion")
MODDIR=$CACHE/kroot/lib/modules/$KV
[ -d "$MODDIR" ] || die "no kernel modules at $MODDIR: re-run setup.sh (or remove $CACHE/kversion)"
for c in cpio /bin/busybox; do command -v "$c" >/dev/null || die "$c is missing: run setup.sh"; done
FIO=
if [ $WITH_FIO = 1 ]; then
    FIO=$(command -v fio) || die "fio is not installed: run setup.sh"
fi
mkdir -p "$(dirname "$OUT")"

stamp() {
    export LC_ALL=C
    {
        (cd "$H" && sha256sum build-initramfs.sh guest/init guest/tests/*.sh)
        echo "kernel=$KV fio=$WITH_FIO"
        sha256sum /bin/busybox | cut -d' ' -f1
        if [ $WITH_FIO = 1 ]; then sha256sum "$FIO" | cut -d' ' -f1; fi
    } | sha256sum | cut -d' ' -f1
}
# Several run-guest.sh may want the same image at once: one builds, the others wait.
exec 9>"$OUT.lock"
flock 9
STAMP=$(stamp)
if [ $FORCE = 0 ] && [ -s "$OUT" ] && [ "$(cat "$OUT.stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "build-initramfs: $OUT is up to date"
    exit 0
fi

# Drivers the tests may need; their dependencies are added automatically.
MODULES="virtio_pci virtio_blk virtio_rng virtio_console virtio_net virtio_scsi
         virtiofs virtio_input vmw_vsock_virtio_transport"

R=$(mktemp -d); trap 'rm -rf "$R"; rm -f "$OUT.tmp.$$"' EXIT
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,lib/modules,tests}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"; done
# Needs root; without it the kernel has no console for init until init mounts
# devtmpfs and re-opens /dev/console itself (it does).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
install -m 755 "$H/guest/init" "$R/init"
install -m 644 "$H"/guest/tests/*.sh "$R/tests/"

# --- kernel modules, in dependency order from the .modinfo "depends=" strings
# (the .deb ships no modules.dep: depmod runs in its postinst, which we skip)
declare -A KO SEEN
while read -r f; do n=$(basename "$f"); n=${n%%.ko*}; KO[${n//-/_}]=$f; done \
    < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
: > "$R/etc/modules.list"
add_mod() {
    local m=${1//-/_} f d
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    f=${KO[$m]:-}
    if [ -z "$f" ]; then
        grep -q "/${m}.ko" "$MODDIR/modules.builtin" 2>/dev/null && return 0   # built in
        grep -q "/${1}.ko" "$MODDIR/modules.builtin" 2>/dev/null && return 0
        die "kernel module $m is neither in $MODDIR nor built in"
    fi
    case $f in
        *.xz) xz -dc "$f" ;;
        *.zst) zstd -qdc "$f" ;;
        *) cat "$f" ;;
    esac > "$R/lib/modules/$m.ko" || die "cannot read module $f"
    for d in $(tr '\0' '\n' < "$R/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr , ' '); do
        add_mod "$d"
    done
    echo "$m" >> "$R/etc/modules.list"
}
for m in $MODULES; do add_mod "$m"; done

# --- fio with its shared libraries and the dynamic loader, at the same paths
if [ $WITH_FIO = 1 ]; then
    cp "$FIO" "$R/usr/bin/fio"
    for lib in $(ldd "$FIO" | grep -o '/[^ ]*'); do
        mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"
    done
fi

echo "kernel=$KV built=$(date -u +%FT%TZ) fio=$WITH_FIO" > "$R/etc/harness-build"
(cd "$R" && find . | cpio -o -H newc -R 0:0 --quiet) > "$OUT.tmp.$$"
mv "$OUT.tmp.$$" "$OUT"
echo "$STAMP" > "$OUT.stamp"
echo "build-initramfs: $OUT ($(du -h "$OUT" | cut -f1)), modules: $(tr '\n' ' ' < "$R/etc/modules.list")"
