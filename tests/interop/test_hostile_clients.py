"""Hostile and broken clients: each attack must end (at most) its own connection, within bounded
time and memory, while a well-behaved client connected to the same server keeps working.

The witness is a libnbd handle connected before the attacks and used after each one; the server
runs with ``--handshake-timeout 1`` and ``--max-options 8`` so the limits are reachable quickly.
Waiting for the server to close a connection is a bounded ``recv``, never a sleep.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB
from tests.util import Served, serve

SIZE = 64 * MiB
MAX_OPTIONS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("hostile")
    img = d / "hostile.img"
    with open(img, "wb") as f:
        f.write(os.urandom(SIZE))  # fully allocated: reads are data, not holes
    with serve(d, "--handshake-timeout", "1", "--max-options", str(MAX_OPTIONS), "-x", "disk", "-f", "raw", img) as srv:
        srv.export = "disk"
        yield srv, img


@pytest.fixture(scope="module")
def witness(server):
    srv, _ = server
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    yield h
    h.shutdown()


@pytest.fixture
def check_witness(server, witness):
    """After the test: the server is alive and the witness reads and writes correctly."""
    yield
    srv, img = server
    assert srv.alive(), srv.log_text()
    pattern = os.urandom(4096)
    witness.pwrite(pattern, 40 * MiB)
    witness.flush()
    assert witness.pread(4096, 40 * MiB) == pattern
    with open(img, "rb") as f:
        f.seek(40 * MiB)
        assert f.read(4096) == pattern
    assert "Traceback" not in srv.log_text(), srv.log_text()


def client(srv: Served, timeout: float = 10.0) -> raw.RawClient:
    return raw.RawClient(srv.sock, timeout)


pytestmark = pytest.mark.usefixtures("check_witness")


def test_garbage_after_the_greeting(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.recv_exact(18)
        c.send(os.urandom(4096))
        assert c.wait_closed()


def test_garbage_instead_of_an_option(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.send(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n")
        assert c.wait_closed()


def test_huge_option_length(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.send_option(raw.OPT_GO, b"\0" * 64, length=0xFFFFFFFF)
        assert c.wait_closed()


def test_huge_unknown_option_is_cut_off_by_the_handshake_timeout(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.send_option(0x7777, b"\0" * 65536, length=0xFFFFFFFF)  # 4 GiB promised, never sent
        start = time.monotonic()
        assert c.wait_closed(10)
        assert time.monotonic() - start < 5


def test_slow_handshake_is_closed(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.option(raw.OPT_LIST)  # a little progress does not reset the clock
        start = time.monotonic()
        assert c.wait_closed(10)
        assert time.monotonic() - start < 5


def test_too_many_options(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        for _ in range(MAX_OPTIONS):
            replies = c.option(raw.OPT_LIST)
            assert replies[-1][0] == raw.REP_ACK
        c.send_option(raw.OPT_LIST)
        assert c.wait_closed()


def test_unknown_option_with_a_large_payload_is_drained(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        ((rtype, _),) = c.option(0x4242, os.urandom(1 * MiB))
        assert rtype == raw.REP_ERR_UNSUP
        replies = c.option(raw.OPT_LIST)
        assert replies[-1][0] == raw.REP_ACK
        assert any(t == raw.REP_SERVER and p[4:].startswith(b"disk") for t, p in replies)
        c.go("disk")
        assert c.size == SIZE
        c.pread(0, 4096)


def test_bad_request_magic(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.go("disk")
        c.send(struct.pack(">IHHQQI", 0x12345678, 0, raw.CMD_READ, 1, 0, 512))
        assert c.wait_closed()


def test_connection_dropped_mid_write_payload(server) -> None:
    srv, img = server
    with open(img, "rb") as f:
        f.seek(8 * MiB)
        before = f.read(65536)
    with client(srv) as c:
        c.greet()
        c.go("disk")
        c.send(struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, 8 * MiB, 65536) + b"\xaa" * 1000)
    with open(img, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(65536) == before  # a write that never fully arrived is not applied


def test_dropped_with_requests_in_flight(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.go("disk")
        for i in range(64):
            c.request(raw.CMD_READ, i, i * MiB % SIZE, 1 * MiB, raw.FLAG_DF)
        c.request(raw.CMD_FLUSH, 999)


def test_client_that_never_reads_its_replies(server) -> None:
    """Replies pile up only to a bound: the server stops reading requests while its send buffer is
    full, so a client asking for far more data than it reads cannot make the server buffer it all."""
    srv, img = server
    n, length = 24, 16 * MiB
    baseline = peak_rss(srv.pid)
    with client(srv, timeout=60) as c:
        c.greet()
        c.go("disk")
        for i in range(n):
            c.request(raw.CMD_READ, i, (i % 2) * length, length, raw.FLAG_DF)
        # A round trip on another connection lets the server handle everything that arrived.
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pread(512, 0)
        h.shutdown()
        grown = peak_rss(srv.pid) - baseline
        assert grown < 128 * MiB, f"the server buffered {grown >> 20} MiB of replies for one client"
        # The slow reader still gets every byte it asked for, in full.
        with open(img, "rb") as f:
            want = [f.read(length), f.read(length)]
        for _ in range(n):
            r = c.reply()
            assert r.error == 0
            assert r.data == want[r.cookie % 2]


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_oversize_compact_write_cuts_the_connection(server) -> None:
    """A 4 GiB WRITE payload is more than the server will drain: it drops that client."""
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.go("disk")
        c.send(struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, 0, 0xFFFFFFFF) + b"\0" * 65536)
        assert c.wait_closed()


def test_close_while_large_replies_are_being_sent(server) -> None:
    """The client goes away with 128 MiB of replies unread: the server's writes fail (EPIPE),
    which must end only this session."""
    srv, _ = server
    c = client(srv)
    c.greet()
    c.go("disk")
    for i in range(8):
        c.request(raw.CMD_READ, i, 0, 16 * MiB, raw.FLAG_DF)
    c.recv_exact(4096)
    c.close()


def test_many_stalled_handshakes_are_all_closed(server) -> None:
    srv, _ = server
    stalled = [client(srv) for _ in range(32)]
    try:
        for c in stalled:
            c.greet()
        for c in stalled:
            assert c.wait_closed(10)
    finally:
        for c in stalled:
            c.close()


def test_go_for_an_unknown_export_then_a_good_one(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        name = b"no-such-disk"
        replies = c.option(raw.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        assert replies[-1][0] == (1 << 31) | 6  # NBD_REP_ERR_UNKNOWN
        # A malformed INFO (name length past the option's end) is an error too, not a disconnect.
        replies = c.option(raw.OPT_INFO, struct.pack(">I", 1000) + b"disk" + struct.pack(">H", 0))
        assert replies[-1][0] == raw.REP_ERR_INVALID
        c.go("disk")
        assert c.size == SIZE


def test_abort_is_acknowledged(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        assert c.option(raw.OPT_ABORT) == [(raw.REP_ACK, b"")]
        assert c.wait_closed()


def test_disc_finishes_in_flight_requests_first(server) -> None:
    srv, img = server
    with client(srv) as c:
        c.greet()
        c.go("disk")
        for i in range(16):
            c.request(raw.CMD_READ, i, i * MiB, 65536, raw.FLAG_DF)
        c.request(raw.CMD_FLUSH, 100)
        c.disconnect(cookie=300)
        c.request(raw.CMD_READ, 200, 0, 512)  # after DISC: must be ignored, not answered
        got = {}
        for _ in range(17):
            r = c.reply()
            assert r.error == 0
            got[r.cookie] = r.data
        assert set(got) == {*range(16), 100}
        with open(img, "rb") as f:
            for i in range(16):
                f.seek(i * MiB)
                assert got[i] == f.read(65536)
        assert c.wait_closed()


def test_half_close_finishes_in_flight_requests(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        c.go("disk")
        for i in range(8):
            c.request(raw.CMD_READ, i, i * MiB, 4096)
        c.request(raw.CMD_FLUSH, 100)
        c.sock.shutdown(socket.SHUT_WR)
        cookies = {c.reply().cookie for _ in range(9)}
        assert cookies == {*range(8), 100}
        assert c.wait_closed()


def test_handshake_and_requests_in_one_send(server) -> None:
    """A client that does not wait: options, GO, a WRITE with a 192 KiB payload and a READ, all
    in one send.  The bytes after GO belong to the transmission phase and must not be lost."""
    srv, img = server
    with client(srv) as c:
        c.recv_exact(18)
        name = b"disk"
        payload = os.urandom(192 << 10)
        out = struct.pack(">I", 3)
        out += struct.pack(">QII", raw.IHAVEOPT, raw.OPT_STRUCTURED_REPLY, 0)
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        out += struct.pack(">QII", raw.IHAVEOPT, raw.OPT_GO, len(go)) + go
        out += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, 20 * MiB + 7, len(payload)) + payload
        out += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_READ, 2, 20 * MiB + 7, len(payload))
        c.send(out)
        assert c.option_reply()[1] == raw.REP_ACK  # STRUCTURED_REPLY
        while True:
            _, rtype, _ = c.option_reply()
            if rtype == raw.REP_ACK:
                break
            assert rtype == raw.REP_INFO
        c.structured = True
        c.expect(1, raw.CMD_WRITE, 20 * MiB + 7, len(payload))
        c.expect(2, raw.CMD_READ, 20 * MiB + 7, len(payload))
        replies = {r.cookie: r for r in (c.reply(), c.reply())}
        assert replies[1].error == 0
        assert bytes(replies[2].data) == payload
    with open(img, "rb") as f:
        f.seek(20 * MiB + 7)
        assert f.read(len(payload)) == payload


def test_pipelined_write_past_the_end_is_refused_alone(server) -> None:
    """Sequential plain WRITEs in one send (an image that takes runs writes them as one): the one
    running past the end gets its own ENOSPC and nothing of it lands (the file does not grow);
    the one before it is written, and a READ sent behind them sees it."""
    srv, img = server
    a, b = os.urandom(4096), os.urandom(4096)
    with client(srv) as c:
        c.greet()
        c.go("disk")
        out = b""
        for cookie, cmd, offset, payload in [
            (1, raw.CMD_WRITE, SIZE - 4096, a),
            (2, raw.CMD_WRITE, SIZE, b),
            (3, raw.CMD_READ, SIZE - 4096, b""),
        ]:
            out += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, cmd, cookie, offset, 4096) + payload
            c.expect(cookie, cmd, offset, 4096)
        c.send(out)
        replies = {r.cookie: r for r in (c.reply(), c.reply(), c.reply())}
        assert (replies[1].error, replies[2].error, replies[3].error) == (0, raw.ENOSPC, 0)
        assert bytes(replies[3].data) == a
    assert os.path.getsize(img) == SIZE
    with open(img, "rb") as f:
        f.seek(SIZE - 4096)
        assert f.read() == a


def test_oversize_write_then_pipelined_requests(server) -> None:
    """A WRITE over the 32 MiB payload limit is refused (EINVAL) after its payload is skipped;
    requests sent right behind it are parsed from the right place and answered."""
    srv, img = server
    n = 32 * MiB + 512
    with client(srv, timeout=60) as c:
        c.greet()
        c.go("disk")
        c.request(raw.CMD_WRITE, 1, 0, n, 0, b"\xab" * n)
        c.request(raw.CMD_READ, 2, 4096, 4096)
        c.request(raw.CMD_FLUSH, 3)
        replies = {r.cookie: r for r in (c.reply(), c.reply(), c.reply())}
        assert replies[1].error == raw.EINVAL
        assert replies[3].error == 0
        with open(img, "rb") as f:
            f.seek(4096)
            assert bytes(replies[2].data) == f.read(4096)  # and nothing of the refused write landed


def _set_meta(c: raw.RawClient, export: str, *queries: str) -> list[tuple[int, bytes]]:
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    data += b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)
    return c.option(raw.OPT_SET_META_CONTEXT, data)


def test_meta_contexts_belong_to_the_export_they_were_set_for(pool) -> None:
    """Contexts selected for one export are dropped by GO for another: BLOCK_STATUS is then EINVAL."""
    srv, _ = pool.take()
    with raw.RawClient(pool.srv.sock) as c:
        c.greet()
        assert c.option(raw.OPT_STRUCTURED_REPLY)[-1][0] == raw.REP_ACK
        ((rtype, _), (ack, _)) = _set_meta(c, "ro", "base:allocation")
        assert (rtype, ack) == (raw.REP_META_CONTEXT, raw.REP_ACK)
        c.structured = True
        c.go(srv.export, structured=False)
        assert c.call(raw.CMD_BLOCK_STATUS, 0, 4096).error == raw.EINVAL
        assert c.pread(0, 4096) == b"\x11" * 4096
    with raw.RawClient(pool.srv.sock) as c:
        c.greet()
        c.go(srv.export, contexts=("base:allocation", "nbdkit:nonsense", "qemu:"))
        assert set(c.contexts) == {"base:allocation"}  # unknown ones and bare namespaces are ignored
        r = c.call(raw.CMD_BLOCK_STATUS, 0, 128 << 10)
        assert r.status == {c.contexts["base:allocation"]: [(64 << 10, 0), (64 << 10, 3)]}


def test_starttls_is_refused_by_policy(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        ((rtype, _),) = c.option(5)  # NBD_OPT_STARTTLS
        assert rtype == (1 << 31) | 2  # NBD_REP_ERR_POLICY: no TLS configured, the handshake goes on
        c.go("disk")
        assert len(c.pread(0, 512)) == 512


def test_set_meta_context_before_structured_replies(server) -> None:
    srv, _ = server
    with client(srv) as c:
        c.greet()
        ((rtype, _),) = _set_meta(c, "disk", "base:allocation")
        assert rtype == raw.REP_ERR_INVALID
        c.go("disk")
        assert c.call(raw.CMD_BLOCK_STATUS, 0, 4096).error == raw.EINVAL


def test_stalled_write_headers_do_not_pin_their_payload_size(tmp_path: Path) -> None:
    img = tmp_path / "pin.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    with serve(tmp_path, "-f", "raw", img) as srv:
        before = rss(srv.pid)
        stalled = []
        try:
            for _ in range(6):
                c = client(srv)
                c.greet()
                c.go()
                c.send(struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, 0, 32 * MiB) + b"\0" * 16)
                stalled.append(c)
            probe = client(srv)  # a round trip after the headers were sent
            probe.greet()
            probe.go()
            probe.pread(0, 512)
            probe.close()
            grown = rss(srv.pid) - before
            assert grown < 64 * MiB, f"{grown >> 20} MiB resident for 6 WRITE headers"
        finally:
            for c in stalled:
                c.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
