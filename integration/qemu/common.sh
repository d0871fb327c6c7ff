# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Sourced (not run) by the QEMU harness scripts: the cache location and the
# error helpers. The caller sets H (this folder) and PROG (its own name) first.
#
# The cache (guest kernel, initramfs images, downloaded .debs) lives outside
# the git tree so that a clone never commits it:
#   $SWITCHBOARD_QEMU_CACHE                  if set
#   $XDG_CACHE_HOME/switchboard-qemu         else, if XDG_CACHE_HOME is set
#   $HOME/.cache/switchboard-qemu            else

die() { echo "$PROG: error: $*" >&2; exit 1; }
# die_rc RC MESSAGE...: the same with a chosen exit code
die_rc() { local rc=$1; shift; echo "$PROG: error: $*" >&2; exit "$rc"; }
note() { echo "$PROG: $*" >&2; }

# need_arg OPTION "$#": an option that takes a value was given without one
need_arg() { [ "$2" -ge 2 ] || die_rc 2 "option $1 needs a value (see --help)"; }

harness_cache() {
    local c
    if [ -n "${SWITCHBOARD_QEMU_CACHE:-}" ]; then c=$SWITCHBOARD_QEMU_CACHE
    elif [ -n "${XDG_CACHE_HOME:-}" ]; then c=$XDG_CACHE_HOME/switchboard-qemu
    elif [ -n "${HOME:-}" ]; then c=$HOME/.cache/switchboard-qemu
    else return 0
    fi
    realpath -m -- "$c"
}
CACHE=$(harness_cache)    # empty when it cannot be chosen: scripts that need it call require_cache
require_cache() {
    [ -n "$CACHE" ] || die "cannot choose a cache directory: set SWITCHBOARD_QEMU_CACHE (HOME is not set)"
}

# Refuse a cache inside this git work tree unless git ignores it (a clean clone
# must not pick up a kernel and 90 MB initramfs images as untracked files).
check_cache_location() {
    local top
    top=$(git -C "$H" rev-parse --show-toplevel 2>/dev/null) || return 0
    top=$(realpath -m -- "$top")
    case "$CACHE/" in
        "$top"/*)
            git -C "$top" check-ignore -q -- "$CACHE" 2>/dev/null \
                || die "cache directory $CACHE is inside the git work tree $top and not ignored by git;" \
                       "set SWITCHBOARD_QEMU_CACHE to a directory outside it (default: ~/.cache/switchboard-qemu)"
            ;;
    esac
}

# print_help FILE: the comment block after the shebang and SPDX lines, up to `set -e...`
print_help() {
    sed -n '2,/^set -/p' "$1" | sed '/^# SPDX-License-Identifier/d; $d; s/^# \{0,1\}//' | sed '/./,$!d'
}

# await_socket PID SOCK LOG: waits up to 10 s for the backend PID (a child of
# this shell) to listen on SOCK. Returns 0 once it does; 1 when it exited first
# (its status reaped, the tail of LOG on stderr); 2 on timeout (it still runs).
# On failure AWAIT_WHY says what happened.
await_socket() {
    local pid=$1 sock=$2 log=$3 i rc
    AWAIT_WHY=
    for ((i = 0; i < 200; i++)); do
        [ -S "$sock" ] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null && rc=0 || rc=$?
            AWAIT_WHY="exited with status $rc before listening on its socket (log: $log)"
            tail -n 20 "$log" >&2
            return 1
        fi
        sleep 0.05
    done
    AWAIT_WHY="no socket $sock after 10 s (log: $log)"
    return 2
}
