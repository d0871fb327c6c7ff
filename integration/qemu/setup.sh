#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Install what the QEMU harness needs on Debian 12, unpack a guest kernel into
# the cache and build the guest initramfs images. Idempotent: once everything
# is there a re-run changes nothing and needs no network.
#
#   setup.sh                  packages (only those missing), kernel, initramfs images
#   setup.sh --no-initramfs   packages and kernel only
#   setup.sh --print-cache    print the cache directory and exit
#
# Packages (apt-get, as root or through sudo): qemu-system-x86, qemu-utils,
# busybox-static, cpio, fio. No version is pinned: an installed QEMU (7.2 from
# bookworm, or 10 from bookworm-backports) is used as it is.
#
# Guest kernel: the versioned package that linux-image-$KFLAVOUR currently
# depends on, fetched with `apt-get download` and unpacked with `dpkg-deb -x`
# into the cache (nothing is installed on the host).
#
# Env:
#   SWITCHBOARD_QEMU_CACHE  cache directory (default: $XDG_CACHE_HOME/switchboard-qemu,
#                           else ~/.cache/switchboard-qemu); never inside the git tree
#   KFLAVOUR                kernel flavour, default cloud-amd64 (amd64 = the generic
#                           kernel, needed for virtio gpio/i2c/sound/gpu/crypto; untested).
#                           Use a separate SWITCHBOARD_QEMU_CACHE per flavour.
set -euo pipefail
H=$(cd "$(dirname "$0")" && pwd)
PROG=setup.sh
. "$H/common.sh"

BUILD_INITRAMFS=1
while [ $# -gt 0 ]; do
    case $1 in
        --no-initramfs) BUILD_INITRAMFS=0 ;;
        --print-cache) require_cache; echo "$CACHE"; exit 0 ;;
        -h|--help) print_help "$0"; exit 0 ;;
        *) die_rc 2 "unknown option $1 (see --help)" ;;
    esac
    shift
done
KFLAVOUR=${KFLAVOUR:-cloud-amd64}
require_cache
check_cache_location
mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "apt-get and dpkg-deb are required (this script expects Debian 12)"
# apt-get as root, or through sudo; only needed when something is missing
apt_root() {
    if [ "$(id -u)" = 0 ]; then
        env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    elif command -v sudo >/dev/null; then
        sudo env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else
        die "packages are missing, and this is not root and sudo is not installed: run setup.sh as root"
    fi
}

UPDATED=0
apt_update_once() {
    if [ $UPDATED = 1 ]; then return 0; fi
    note "apt-get update"
    apt_root -qq update >/dev/null || die "apt-get update failed"
    UPDATED=1
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
apt_install() {     # apt_install [apt options...] PACKAGES...
    note "apt-get install $*"
    apt_root install -y -qq --no-install-recommends "$@" >/dev/null \
        || die "apt-get install $* failed (run it by hand to see why)"
}

# --- host packages ---------------------------------------------------------
missing=()
for p in qemu-system-x86 qemu-utils busybox-static cpio fio; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    first=()
    for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || first+=("$p"); done
    utils_before=$(version_of qemu-utils)
    if [ ${#first[@]} -gt 0 ]; then
        # qemu-utils is installed separately, afterwards: a qemu-utils from a newer
        # release (this machine kind ships 10.0 from bookworm-backports without that
        # source configured) Breaks bookworm's qemu-system-common 7.2, since both ship
        # qemu-storage-daemon. Asking for both at once then fails; installing the
        # emulator alone lets apt replace qemu-utils, which is put back just below.
        apt_install "${first[@]}"
    fi
    if ! installed qemu-utils; then
        sysver=$(version_of qemu-system-common)
        if [ -n "$sysver" ] && apt-cache madison qemu-utils | awk -F'|' '{gsub(/ /, "", $2); print $2}' \
                | grep -qxF "$sysver"; then
            apt_install --no-remove "qemu-utils=$sysver"    # the same version as the emulator
        else
            apt_install --no-remove qemu-utils
        fi
        if [ -n "$utils_before" ] && [ "$utils_before" != "$(version_of qemu-utils)" ]; then
            note "note: qemu-utils $utils_before was replaced by $(version_of qemu-utils) to match qemu-system-x86"
        fi
    fi
fi
for c in qemu-system-x86_64 qemu-storage-daemon qemu-img cpio fio; do
    command -v "$c" >/dev/null || die "$c is not on PATH after installing the packages"
done
[ -x /bin/busybox ] || die "/bin/busybox is missing (package busybox-static)"
if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked: install busybox-static (it replaces busybox)"
fi

# --- guest kernel ----------------------------------------------------------
if [ -s "$CACHE/kflavour" ] && [ "$(cat "$CACHE/kflavour")" != "$KFLAVOUR" ]; then
    die "the cache $CACHE holds a $(cat "$CACHE/kflavour") kernel, not $KFLAVOUR:" \
        "use another SWITCHBOARD_QEMU_CACHE, or remove $CACHE"
fi
if [ ! -s "$CACHE/kversion" ] || [ ! -e "$CACHE/vmlinuz" ]; then
    # linux-image-cloud-amd64 is a meta package: find the versioned one it depends on.
    resolve() { apt-cache depends "linux-image-$KFLAVOUR" 2>/dev/null \
                    | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
    pkg=$(resolve)
    if [ -z "$pkg" ]; then apt_update_once; pkg=$(resolve); fi
    [ -n "$pkg" ] || die "cannot resolve linux-image-$KFLAVOUR to a versioned kernel package" \
                         "(apt-cache depends linux-image-$KFLAVOUR names none)"
    kv=${pkg#linux-image-}
    rm -f "$CACHE"/linux-image-*.deb
    download() {
        local out rc=0
        out=$(cd "$CACHE" && apt-get -qq download "$pkg" 2>&1) || rc=$?
        # as root apt warns that it cannot drop to the _apt user for a download into $HOME: harmless
        [ -z "$out" ] || grep -v '^W: Download is performed unsandboxed' <<< "$out" >&2 || true
        return $rc
    }
    note "fetching $pkg (apt-get download)"
    download || { apt_update_once; download; } || die "apt-get download $pkg failed"
    deb=$(ls "$CACHE/${pkg}"_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "apt-get download $pkg left no ${pkg}_*.deb in $CACHE"
    rm -rf "$CACHE/kroot.tmp"
    dpkg-deb -x "$deb" "$CACHE/kroot.tmp" || die "dpkg-deb -x $deb failed"
    [ -f "$CACHE/kroot.tmp/boot/vmlinuz-$kv" ] || die "$deb has no boot/vmlinuz-$kv"
    [ -d "$CACHE/kroot.tmp/lib/modules/$kv" ] || die "$deb has no lib/modules/$kv"
    rm -rf "$CACHE/kroot"; mv "$CACHE/kroot.tmp" "$CACHE/kroot"
    ln -sfn "kroot/boot/vmlinuz-$kv" "$CACHE/vmlinuz"
    echo "$KFLAVOUR" > "$CACHE/kflavour"
    echo "$kv" > "$CACHE/kversion"      # written last: marks the kernel complete
    # images built for another kernel are stale now
    rm -f "$CACHE"/initramfs*.cpio "$CACHE"/initramfs*.cpio.stamp
fi

# --- initramfs images --------------------------------------------------------
if [ $BUILD_INITRAMFS = 1 ]; then
    "$H/build-initramfs.sh"
fi
echo "setup: cache $CACHE, kernel $(cat "$CACHE/kversion"), $(qemu-system-x86_64 --version | head -1)"
