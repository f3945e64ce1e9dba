"""A closing connection whose client has stopped reading its replies is cut off after
``--drain-timeout``, so it cannot hold up a SIGTERM shutdown; a client that reads gets every reply
of the drain.

The stalled client asks for 64 MiB of 1 MiB reads and reads only the first reply: far
more than the kernel's socket buffers and the transport's high-water mark hold, so replies stay
queued in the server until the deadline.  Waiting is on the process (pidfd) or on the socket's
hang-up (poll without reading), never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import socket
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB
from tests.util import Served, serve, wait_pid_exit

SIZE = 16 * MiB
READS = 64
DRAIN = 1  # seconds, the server's --drain-timeout


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(SIZE))  # fully allocated: every read is data
    return img


def stalled_reader(srv: Served, image: Path) -> raw.RawClient:
    """A client with 64 MiB of read replies pending that has read the first reply: the server
    has parsed the requests and its replies are backed up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.connect(str(srv.sock))
    c = raw.RawClient(s)
    c.greet()
    c.go("")
    for i in range(READS):
        c.request(raw.CMD_READ, i, i * MiB % SIZE, MiB)
    first = c.reply()
    assert (first.cookie, first.error) == (0, 0) and first.data == image.read_bytes()[:MiB]
    return c


def hung_up(c: raw.RawClient, timeout: float) -> bool:
    """True once the server has closed the connection (within ``timeout``), without reading."""
    p = select.poll()
    p.register(c.sock, select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in p.poll(timeout * 1000))


def test_sigterm_is_not_held_up_by_a_client_that_stopped_reading(tmp_path: Path, image: Path) -> None:
    with serve(tmp_path, "--drain-timeout", str(DRAIN), "-f", "raw", image, check_stop=False) as srv:
        reader = nbd.NBD()
        reader.connect_uri(srv.uri)
        stalled = stalled_reader(srv, image)
        bufs = [bytearray(MiB) for _ in range(8)]
        for i, b in enumerate(bufs):
            reader.aio_pread(b, i * MiB)
        os.kill(srv.pid, signal.SIGTERM)
        while reader.aio_in_flight() > 0:
            reader.poll(-1)
        assert b"".join(bufs) == image.read_bytes()[: 8 * MiB]  # drained, not cut off
        assert wait_pid_exit(srv.pid, 30), "the server is still draining a client that does not read"
        assert hung_up(stalled, 5)
        lines = srv.log_lines("replies not sent within 1.0s of closing")
        assert len(lines) == 1, srv.log_text()
        assert "Traceback" not in srv.log_text()
