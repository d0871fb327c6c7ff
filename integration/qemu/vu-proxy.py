#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""vhost-user tracing proxy: shows what a backend sees on its control socket.

  vu-proxy.py LISTEN_SOCK BACKEND_SOCK [--log FILE]

Listens on LISTEN_SOCK (point QEMU there), dials BACKEND_SOCK for every
front-end connection, and forwards each vhost-user message both ways,
passing file descriptors (SCM_RIGHTS) through, one line logged per message:

  0.123 F>B SET_VRING_BASE flags=0x1 size=8 fds=0 idx=0 num=0
  0.125 B>F GET_VRING_BASE flags=0x5 size=8 fds=0 idx=0 num=12

Only the control plane passes here (rings and eventfds are shared memory and
fds), so it does not slow the data path. Serves connections one after another
(reconnects show up as a new "connect"). If BACKEND_SOCK cannot be dialled,
the front-end's connection is logged and closed, and the proxy keeps
listening. Stop it with SIGTERM to its PID.
"""
import array, os, socket, struct, sys, threading, time

NAMES = {1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
         5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
         9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
         12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
         15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
         18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
         21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN",
         24: "GET_CONFIG", 25: "SET_CONFIG", 26: "CREATE_CRYPTO_SESSION",
         27: "CLOSE_CRYPTO_SESSION", 28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN",
         30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD",
         33: "GPU_SET_SOCKET", 34: "RESET_DEVICE", 35: "VRING_KICK",
         36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG",
         39: "SET_STATUS", 40: "GET_STATUS", 41: "GET_SHARED_OBJECT",
         42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE"}
VRING_STATE = {8, 10, 11, 18}       # payload: u32 index, u32 num
U64 = {1, 2, 12, 13, 14, 15, 16, 17, 36, 39, 40}
T0 = time.time()
LOG = sys.stdout
LOCK = threading.Lock()


def log(line):
    with LOCK:
        LOG.write(f"{time.time() - T0:9.3f} {line}\n")
        LOG.flush()


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_msg(sock):
    fds = array.array("i")
    hdr, anc, _, _ = sock.recvmsg(12, socket.CMSG_SPACE(8 * fds.itemsize))
    if not hdr:
        return None, []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    if len(hdr) < 12:
        rest = recv_exact(sock, 12 - len(hdr))
        if rest is None:
            return None, list(fds)
        hdr += rest
    size = struct.unpack("<III", hdr)[2]
    body = recv_exact(sock, size) if size else b""
    if body is None:
        return None, list(fds)
    return hdr + body, list(fds)


def describe(msg):
    req, flags, size = struct.unpack("<III", msg[:12])
    body = msg[12:]
    extra = ""
    if req in VRING_STATE and size >= 8:
        idx, num = struct.unpack("<II", body[:8])
        extra = f" idx={idx} num={num}"
    elif req in U64 and size == 8:
        v = struct.unpack("<Q", body)[0]
        extra = f" u64={v:#x}" if req not in (12, 13, 14) else f" idx={v & 0xff} nofd={v >> 8 & 1}"
    elif req == 9 and size >= 8:
        extra = " idx=%d" % struct.unpack("<I", body[:4])[0]
    elif req == 5 and size >= 8:
        extra = " regions=%d" % struct.unpack("<I", body[:4])[0]
    elif req in (24, 25) and size >= 12:
        extra = " offset=%d len=%d" % struct.unpack("<II", body[:8])
    return f"{NAMES.get(req, 'REQ_%d' % req)} flags={flags:#x} size={size}{extra}"


def pump(src, dst, tag, done):
    try:
        while True:
            msg, fds = recv_msg(src)
            if msg is None:
                log(f"{tag} closed")
                break
            log(f"{tag} {describe(msg)} fds={len(fds)}")
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            dst.sendmsg([msg], anc)
            for fd in fds:
                os.close(fd)
    except OSError as e:
        log(f"{tag} error {e}")
    finally:
        done.set()


def main():
    args = sys.argv[1:]
    global LOG
    if "-h" in args or "--help" in args:
        print(__doc__.strip())
        return
    if "--log" in args:
        i = args.index("--log")
        if i + 1 >= len(args):
            sys.exit("vu-proxy.py: error: --log needs a file name (see --help)")
        try:
            LOG = open(args[i + 1], "a", buffering=1)
        except OSError as e:
            sys.exit(f"vu-proxy.py: error: cannot open the log file {args[i + 1]}: {e.strerror}")
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit("vu-proxy.py: error: expected LISTEN_SOCK BACKEND_SOCK (see --help)")
    listen, backend = args
    if os.path.exists(listen):
        os.unlink(listen)
    srv = socket.socket(socket.AF_UNIX)
    try:
        srv.bind(listen)
    except OSError as e:
        sys.exit(f"vu-proxy.py: error: cannot listen on {listen}: {e.strerror}")
    srv.listen(1)
    log(f"listening on {listen} -> {backend}")
    while True:
        fe, _ = srv.accept()
        be = socket.socket(socket.AF_UNIX)
        try:
            be.connect(backend)
        except OSError as e:
            log(f"connect to backend {backend} failed: {e.strerror or e}; closing the front-end connection")
            be.close()
            fe.close()
            continue
        log("connect")
        done = threading.Event()
        for a, b, tag in ((fe, be, "F>B"), (be, fe, "B>F")):
            threading.Thread(target=pump, args=(a, b, tag, done), daemon=True).start()
        done.wait()
        time.sleep(0.2)     # let the other direction log its last message
        for sk in (fe, be):
            try:
                sk.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sk.close()
        log("disconnect")


if __name__ == "__main__":
    main()
