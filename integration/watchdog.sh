#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs a command with a time limit, so that a hung test fails the run in
# minutes instead of using up CI's whole budget, and says where it hung.
#
#   integration/watchdog.sh SECONDS COMMAND [ARGS...]
#
# If COMMAND is still running after SECONDS, every thread of every process
# it started is printed with gdb ("thread apply all bt"), then the whole
# process group is killed and the exit status is 124. Otherwise the exit
# status is COMMAND's.
set -uo pipefail

if [ "$#" -lt 2 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//'
  [ "$#" -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; } && exit 0
  exit 2
fi
limit=$1
shift
case "$limit" in
  ''|*[!0-9]*) echo "watchdog: SECONDS must be a whole number, not '$limit'" >&2; exit 2 ;;
esac

# A process group of its own, so that everything COMMAND starts can be found
# and killed together.
set -m
"$@" &
pid=$!
set +m

descendants() {
  local p=$1 c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}

waited=0
while kill -0 "$pid" 2>/dev/null; do
  if [ "$waited" -ge "$limit" ]; then
    echo "watchdog: '$*' still running after ${limit}s; its processes:" >&2
    for p in $(descendants "$pid"); do
      echo "--- pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)" >&2
      if command -v gdb >/dev/null; then
        timeout 60 gdb -p "$p" -batch -ex 'thread apply all bt' 2>&1 \
          | grep -v '^\[New LWP\|^\[Thread debugging\|^Using host libthread' >&2
      fi
    done
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    echo "watchdog: killed '$*' after ${limit}s" >&2
    exit 124
  fi
  sleep 5
  waited=$((waited + 5))
done
wait "$pid"
