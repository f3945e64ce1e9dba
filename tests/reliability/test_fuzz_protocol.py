"""Protocol fuzzing against a live server: random and mutated handshake and transmission bytes,
each case on its own connection, while a control client (libnbd, connected before the first
case) keeps working.

A case builds a client byte stream (the client flags, a random run of valid options ending in GO
or EXPORT_NAME, then random requests with random flags, offsets, lengths and payloads), mutates
it (bit flips, random bytes, interesting length values, cuts, duplications; or sends plain random
bytes after the greeting), sends it in random pieces while draining whatever the server answers,
half-closes, and waits (bounded) for the server to close.  Then:
  * the server is alive, and the control client writes, flushes and reads back a pattern;
  * the server's log has no traceback and no "internal error" (every failure was an errno);
  * a connection the server did not close within ``CASE_LIMIT`` seconds of the half-close is a
    hang.

The exports: a raw image, a qcow2 image (so requests reach a format driver) and a read-only one.
Default ``CASES`` cases; ``NBDSERVE_SLOW=1`` runs ``SLOW_CASES``.  FUZZ_CASE=seed replays one.
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import struct
import time

import pytest

from tests.conftest import SLOW
from tests.interop import nbdclient as raw
from tests.util import nbd_connect, qemu_img, serve

MiB = 1 << 20
SIZE = 64 * MiB
CASES = 300
SLOW_CASES = 40000
CASE_LIMIT = 30.0
EXPORTS = ("raw", "q", "ro")
OPTIONS = (
    raw.OPT_STRUCTURED_REPLY,
    raw.OPT_EXTENDED_HEADERS,
    raw.OPT_LIST,
    raw.OPT_INFO,
    raw.OPT_SET_META_CONTEXT,
    9,  # LIST_META_CONTEXT
    5,  # STARTTLS
    raw.OPT_ABORT,
    12345,  # unknown
)
INTERESTING = (0, 1, 511, 512, 4095, 4096, 0xFFFF, 1 << 20, 32 << 20, (32 << 20) + 1, 0x7FFFFFFF, 0xFFFFFFFF)
INTERESTING64 = (*INTERESTING, SIZE - 1, SIZE, SIZE + 1, 1 << 32, 1 << 62, (1 << 63) - 1, (1 << 64) - 1)


# -- building a client's bytes -------------------------------------------------------------------


def option(opt: int, data: bytes) -> bytes:
    return struct.pack(">QII", raw.IHAVEOPT, opt, len(data)) + data


def name_and_queries(rng: random.Random, export: str) -> bytes:
    queries = [q.encode() for q in rng.sample(["base:allocation", "qemu:allocation-depth", "base:", "x:y"], 2)]
    body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries)) + body


def handshake(rng: random.Random) -> tuple[bytes, bool, bool]:
    """Client flags, some options, then GO or EXPORT_NAME: (bytes, extended, structured)."""
    export = rng.choice(EXPORTS)
    out = struct.pack(">I", rng.choice((3, 3, 3, 1, 0)))
    extended = structured = False
    for _ in range(rng.randint(0, 5)):
        opt = rng.choice(OPTIONS)
        if opt in (raw.OPT_SET_META_CONTEXT, 9):
            out += option(opt, name_and_queries(rng, export))
        elif opt == raw.OPT_INFO:
            out += option(opt, struct.pack(">I", len(export)) + export.encode() + struct.pack(">HH", 1, 3))
        elif opt == 12345:
            out += option(opt, rng.randbytes(rng.randint(0, 100)))
        else:
            out += option(opt, b"")
            extended |= opt == raw.OPT_EXTENDED_HEADERS
            structured |= opt in (raw.OPT_STRUCTURED_REPLY, raw.OPT_EXTENDED_HEADERS)
    if rng.random() < 0.8:
        out += option(raw.OPT_GO, struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 0))
    else:
        out += option(raw.OPT_EXPORT_NAME, export.encode())
    return out, extended, structured


def requests(rng: random.Random, extended: bool) -> bytes:
    out = b""
    for cookie in range(rng.randint(1, 24)):
        cmd = rng.choice((0, 0, 1, 1, 3, 4, 5, 6, 7, 2, rng.randrange(16)))
        flags = rng.choice((0, 0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)))
        offset = rng.choice((rng.randrange(SIZE), rng.randrange(SIZE) & ~511, rng.choice(INTERESTING64)))
        length = rng.choice((rng.randint(0, 4096), rng.randint(0, 300000), rng.choice(INTERESTING)))
        payload = b""
        if cmd == raw.CMD_WRITE or (extended and flags & raw.FLAG_PAYLOAD_LEN):
            payload = rng.randbytes(min(length, 1 << 20))  # may fall short of the header's length
        if extended:
            out += struct.pack(">IHHQQQ", raw.EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        else:
            out += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, flags, cmd, cookie, offset, length & 0xFFFFFFFF)
            out += payload
    return out


def mutate(rng: random.Random, data: bytes, start: int) -> bytes:
    """Mutations at or after ``start``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if len(buf) <= start:
            break
        pos = rng.randrange(start, len(buf))
        op = rng.randrange(5)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op == 2:
            pos &= ~3
            buf[pos : pos + 4] = rng.choice(INTERESTING).to_bytes(4, "big")
        elif op == 3:
            del buf[pos:]
        else:
            n = rng.randint(1, 64)
            buf[pos:pos] = buf[pos : pos + n]
    return bytes(buf)


def case_bytes(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 4096))
    hs, extended, _ = handshake(rng)
    body = requests(rng, extended)
    data = hs + body
    if kind < 0.4:
        return mutate(rng, data, 0)  # anywhere, the handshake included
    if kind < 0.9:
        return mutate(rng, data, len(hs))  # the requests only: they reach transmission
    return data  # unmutated: random but well-formed requests


# -- running a case ------------------------------------------------------------------------------------


def play(path: str, rng: random.Random, data: bytes) -> None:
    """Send ``data`` in random pieces while draining replies; half-close; wait for the server to
    close (bounded: a connection still open after CASE_LIMIT seconds is a hang)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    pos, deadline, shut = 0, time.monotonic() + CASE_LIMIT, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the server neither closed the connection nor stopped answering")
            for _, events in sel.select(left):
                if events & selectors.EVENT_READ:
                    try:
                        if not s.recv(1 << 20):
                            return  # the server closed: the case is over
                    except (ConnectionResetError, BrokenPipeError):
                        return
                if events & selectors.EVENT_WRITE and not shut:
                    if pos < len(data):
                        try:
                            pos += s.send(data[pos : pos + rng.choice((1, 7, 100, 4096, 1 << 20))])
                        except (BrokenPipeError, ConnectionResetError):
                            return
                    if pos >= len(data):
                        s.shutdown(socket.SHUT_WR)
                        shut = True
                        sel.modify(s, selectors.EVENT_READ)
    finally:
        sel.close()
        s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzproto")
    img = d / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    q = d / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", q, str(SIZE))
    ro = d / "ro.raw"
    ro.write_bytes(os.urandom(MiB))
    args = ["-v", "--handshake-timeout", "5", "--max-options", "16", "-e", "64"]
    exports = ["--export", f"raw={img},format=raw", "--export", f"q={q},format=qcow2"]
    exports += ["--export", f"ro={ro},format=raw,readonly"]
    with serve(d, *args, *exports) as srv:
        yield srv


def test_protocol_fuzz_ends_only_the_fuzzed_connection(server):
    control = nbd_connect(server.uri_for("q"))
    only = os.environ.get("FUZZ_CASE")
    cases = [int(only)] if only else range(SLOW_CASES if SLOW else CASES)
    pattern = bytes(range(256)) * 16
    reached = -1  # the control client's "serving export" is not a case
    with open(server.log, errors="replace") as log:  # read as it grows

        def check_log(case: int) -> int:
            new = log.read()
            assert "Traceback" not in new and "internal error" not in new, f"after case {case}:\n{new[-5000:]}"
            return new.count(": serving export")

        for case in cases:
            rng = random.Random(case)
            data = case_bytes(rng)
            try:
                play(str(server.sock), rng, data)
            except AssertionError as e:
                raise AssertionError(f"case {case} ({len(data)} bytes): {e}") from None
            assert server.alive(), f"case {case} killed the server:\n{server.log_text()[-3000:]}"
            if case % 10 == 0 or only:  # the control client, and the log, every few cases
                mark = case.to_bytes(4, "big") + pattern[4:]
                control.pwrite(mark, SIZE - 8192)
                control.flush()
                assert control.pread(len(mark), SIZE - 8192) == mark, f"after case {case}"
                reached += check_log(case)
        control.shutdown()
        reached += check_log(len(cases))
    print(
        f"\nfuzz protocol: {len(cases)} cases, {reached} reached transmission; "
        "0 crashes, 0 hangs, 0 internal errors; control client intact"
    )
    assert only or reached >= len(cases) // 4, "the fuzzer rarely gets past the handshake"
