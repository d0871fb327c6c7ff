#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Minimal QMP client for the QEMU harness (Python standard library only).

  qmp.py SOCK COMMAND [JSON-ARGUMENTS] [--wait-event NAME] [--timeout S]

  qmp.py $DIR/qmp.sock query-pci
  qmp.py $DIR/qmp.sock device_del '{"id": "vu0"}' --wait-event DEVICE_DELETED
  qmp.py $DIR/qmp.sock chardev-remove '{"id": "cvu0"}'
  qmp.py $DIR/qmp.sock human-monitor-command '{"command-line": "info pci"}'

SOCK is the QMP socket run-guest.sh opens in its --dir (qmp.sock). Prints the
reply's "return" (or the error) as JSON, then every event seen, one JSON
object a line, prefixed "EVENT". Exit 0 on success, 1 on an error reply,
2 on a usage or connection error, 124 when the awaited event did not come
within the timeout (default 30 s).
"""
import json
import socket
import sys
import time


def usage_error(msg):
    print(f"qmp.py: error: {msg} (see --help)", file=sys.stderr)
    return 2


def main():
    args, wait, timeout = [], None, 30.0
    it = iter(sys.argv[1:])
    for a in it:
        if a in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        if a in ("--wait-event", "--timeout"):
            try:
                v = next(it)
            except StopIteration:
                return usage_error(f"option {a} needs a value")
            if a == "--wait-event":
                wait = v
            else:
                try:
                    timeout = float(v)
                except ValueError:
                    return usage_error(f"--timeout must be a number of seconds, not {v!r}")
        else:
            args.append(a)
    if len(args) < 2 or len(args) > 3:
        return usage_error("expected SOCK COMMAND [JSON-ARGUMENTS]")
    path, cmd = args[0], args[1]
    arguments = None
    if len(args) > 2:
        try:
            arguments = json.loads(args[2])
        except json.JSONDecodeError as e:
            return usage_error(f"JSON-ARGUMENTS is not valid JSON ({e}): {args[2]}")

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        print(f"qmp.py: error: cannot connect to the QMP socket {path}: {e.strerror or e}"
              " (is the guest's QEMU running?)", file=sys.stderr)
        return 2
    f = s.makefile("rw")

    def recv():
        line = f.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP connection")
        return json.loads(line)

    def send(obj):
        f.write(json.dumps(obj) + "\n")
        f.flush()

    try:
        recv()  # greeting
        send({"execute": "qmp_capabilities"})
        while "return" not in recv():
            pass
        msg = {"execute": cmd}
        if arguments is not None:
            msg["arguments"] = arguments
        send(msg)
        deadline, got_reply, got_event = time.time() + timeout, False, wait is None
        while not (got_reply and got_event):
            s.settimeout(max(0.01, deadline - time.time()))
            try:
                r = recv()
            except (socket.timeout, TimeoutError):
                what = f"{wait} event" if got_reply else f"reply to {cmd}"
                print(f"qmp.py: no {what} within {timeout}s", file=sys.stderr)
                return 124
            if "event" in r:
                print("EVENT", json.dumps(r), flush=True)
                if r["event"] == wait:
                    got_event = True
            elif "return" in r:
                ret = r["return"]
                print(ret if isinstance(ret, str) else json.dumps(ret, indent=1), flush=True)
                got_reply = True
            elif "error" in r:
                print("ERROR", json.dumps(r["error"]), flush=True)
                return 1
    except (ConnectionError, OSError) as e:
        print(f"qmp.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
