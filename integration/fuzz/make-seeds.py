#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Writes the hand-made seed inputs of each fuzz target into seeds/<target>/
# (the layouts are in integration/docs/FUZZING.md). The committed corpora
# grew from these and were minimised with `cargo fuzz cmin`.
#
#   integration/fuzz/make-seeds.py [LOG...]   # LOG: real message logs to add
import json, os, struct, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))
out = os.path.join(here, "seeds")

def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

# --- descriptor chains: table (16 x 16 bytes), avail idx + ring, data ---
QUEUE, DATA, HIGH = 16, 0x1_0000, 2 << 20
NEXT, WRITE, INDIRECT = 1, 2, 4

def desc(addr, ln, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, ln, flags, nxt)

def chains(descs, heads, data=b""):
    table = b"".join(descs).ljust(QUEUE * 16, b"\0")
    ring = struct.pack("<H", len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    return table + ring.ljust(2 + 2 * QUEUE, b"\0") + data

def linked(bufs, first=0):
    """Descriptors first.. chained in order: bufs of (addr, len, write)."""
    out = []
    for i, (a, ln, w) in enumerate(bufs):
        last = i + 1 == len(bufs)
        out.append(desc(a, ln, (0 if last else NEXT) | (WRITE if w else 0), 0 if last else first + i + 1))
    return out

put("virtio_chain", "one", chains(linked([(DATA, 16, 0), (DATA + 0x100, 512, 1), (DATA + 0x400, 1, 1)]), [0]))
put("virtio_chain", "three", chains(
    linked([(DATA, 8, 0)]) + linked([(DATA + 8, 8, 0), (DATA + 16, 8, 1)], 1) + linked([(HIGH, 64, 1)], 3),
    [0, 1, 3]))
table = b"".join(linked([(DATA + 0x200, 16, 0), (DATA + 0x300, 32, 1)]))
put("virtio_chain", "indirect", chains([desc(DATA + 0x1000, 32, INDIRECT)], [0], b"\0" * 0x1000 + table))
put("virtio_chain", "loop", chains([desc(DATA, 8, NEXT, 1), desc(DATA, 8, NEXT, 0)], [0]))
put("virtio_chain", "outside", chains(linked([(DATA, 8, 0), (0x7000_0000, 8, 1)]), [0]))
put("virtio_chain", "straddle", chains(linked([(HIGH + 0xff00, 0x200, 1)]), [0]))

# --- virtio-blk: a disk byte (even: writable), then chains ---
def blk(kind, sector, data_bufs, payload=b"", ro=0):
    hdr = struct.pack("<IIQ", kind, 0, sector)
    bufs = [(DATA, 16, 0)] + data_bufs + [(DATA + 0x3000, 1, 1)]
    return bytes([ro]) + chains(linked(bufs), [0], hdr.ljust(0x1000, b"\0") + payload)

put("blk_request", "read", blk(0, 2, [(DATA + 0x1000, 512, 1), (DATA + 0x2000, 512, 1)]))
put("blk_request", "write", blk(1, 3, [(DATA + 0x1000, 512, 0)], bytes(range(256)) * 2))
put("blk_request", "write-ro", blk(1, 3, [(DATA + 0x1000, 512, 0)], b"\x11" * 512, ro=1))
put("blk_request", "flush", blk(4, 0, []))
put("blk_request", "get-id", blk(8, 0, [(DATA + 0x1000, 20, 1)]))
put("blk_request", "discard", blk(11, 0, [(DATA + 0x1000, 16, 0)], struct.pack("<QII", 4, 8, 0)))
put("blk_request", "write-zeroes", blk(13, 0, [(DATA + 0x1000, 16, 0)], struct.pack("<QII", 8, 4, 1)))
put("blk_request", "past-end", blk(0, 63, [(DATA + 0x1000, 1024, 1)]))
put("blk_request", "unknown", blk(99, 0, []))

# --- vhost-user: a device byte (even: rng, odd: blk), then messages ---
V1, REPLY, NEED = 0x1, 0x4, 0x8

def msg(req, payload=b"", flags=V1):
    return struct.pack("<III", req, flags, len(payload)) + payload

u64 = lambda v: struct.pack("<Q", v)
state = lambda i, n: struct.pack("<II", i, n)
handshake = (msg(3) + msg(1) + msg(2, u64((1 << 32) | (1 << 30))) + msg(15)
             + msg(16, u64((1 << 0) | (1 << 3) | (1 << 9) | (1 << 15) | (1 << 13))))
vring = (msg(8, state(0, 64)) + msg(10, state(0, 0))
         + msg(9, struct.pack("<IIQQQQ", 0, 0, 0x1000, 0x2000, 0x3000, 0)))
for dev, name in ((0, "rng"), (1, "blk")):
    b = bytes([dev])
    put("vhost_user_stream", f"{name}-handshake", b + handshake + msg(17) + msg(36))
    put("vhost_user_stream", f"{name}-config", b + handshake + msg(24, struct.pack("<III", 0, 16, 0) + b"\0" * 16, V1 | NEED))
    put("vhost_user_stream", f"{name}-vring", b + handshake + vring + msg(18, state(0, 1)) + msg(11, state(0, 0)) + msg(34))
    put("vhost_user_stream", f"{name}-rem-reg", b + handshake + msg(38, u64(0) + struct.pack("<QQQQ", 0, 1 << 20, 0x7000_0000, 0), V1 | NEED))
    put("vhost_user_stream", f"{name}-short", b + msg(1)[:7])

# --- topology: the examples, and a few refused ones ---
exdir = os.path.join(root, "examples", "topologies")
for f in sorted(os.listdir(exdir)):
    put("topology", f, open(os.path.join(exdir, f), "rb").read())
put("topology", "dup-key", '{"devices": [{"id": "a", "id": "b", "kind": "virtio-rng", "vhost_user": {"socket": "a.sock"}}]}')
put("topology", "overlap", '{"buses": [{"id": "p", "kind": "pio"}], "devices": [{"id": "a", "kind": "uart-16550", "bus": "p", "addr": "0x3f8", "output": "null"}, {"id": "b", "kind": "uart-16550", "bus": "p", "addr": 1017, "output": "null"}]}')
put("topology", "blk", '{"devices": [{"id": "d", "kind": "virtio-blk", "path": "d.img", "read_only": true, "serial": "x", "vhost_user": {"socket": "d.sock", "queues": 2}}]}')
put("topology", "syntax", '{"devices": [ {"id": 1,')

# --- control lines ---
lines = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "query-commands", "id": 7}',
    '{"execute": "bus-write", "arguments": {"bus": "pio0", "addr": "0x3f8", "size": 1, "value": 65}}',
    '{"execute": "bus-read", "arguments": {"bus": "mmio0", "addr": 3489660928, "size": "8"}}',
    '{"execute": "bus-read", "arguments": {"bus": "pio0", "addr": "0xffff", "size": 2}}',
    '{"execute": "device-add", "arguments": {"id": "rng1", "kind": "virtio-rng", "vhost_user": {"socket": "rng1.sock"}}}',
    '{"execute": "device-add", "arguments": {"id": "com2", "kind": "uart-16550", "bus": "pio0", "addr": "0x3f8", "output": "null"}}',
    '{"execute": "device-del", "arguments": {"id": "rng0"}, "id": "x"}',
    'bus-write pio0 0x3f8 1 65',
    'bus-read mmio0 0xd0000000 4',
    '[1, 2]',
]
for i, line in enumerate(lines):
    put("control_line", f"line{i}", line + "\n")
put("control_line", "all", "\n".join(lines) + "\n")

# --- message logs ---
header = {"format": "switchboard-log", "version": 1, "switchboard": "0.1.0", "command": "fuzz",
          "started_unix_ms": 0, "data": "value", "topology": {"devices": []},
          "actors": [{"id": "com1", "kind": "uart-16550", "rebuild": {"irq": 4}}]}
put("log_reader", "header-only", json.dumps(header) + "\n")
put("log_reader", "cut", json.dumps(header) + "\n" + '{"seq":1,"time":0,"latency":0,"from":"a","to":"com1","type":"add')
put("log_reader", "newer", json.dumps(dict(header, version=99)) + "\n")
for i, path in enumerate(sys.argv[1:]):
    put("log_reader", f"real{i}", open(path, "rb").read())
