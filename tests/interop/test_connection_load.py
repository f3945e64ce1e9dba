"""Many clients at once: a burst of 1,000 simultaneous TCP connects is greeted and served in full
(the listen backlog is sized for bursts), an idle connection costs little memory (measured from
/proc), and clients over the connection limit get a clean refusal that names the limit.

NBD's server speaks first, so a client whose connection overflowed the accept queue would wait for
a greeting forever: "greeted" is checked by waiting (bounded) for every socket to turn readable.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import struct
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from nbdserve.config import DEFAULT_BACKLOG
from tests.interop import nbdclient as raw
from tests.util import serve

N = 1000
MiB = 1 << 20
IDLE_CONNECTION_BUDGET = 64 << 10  # bytes of server RSS per idle connection


@pytest.fixture
def many_fds():
    """This process needs a descriptor per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = N + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the open-file hard limit ({hard}) is below {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "load.img"
    img.write_bytes(bytes(range(256)) * (MiB // 256))
    return img


def burst(port: int, n: int) -> list[socket.socket]:
    """``n`` non-blocking connects issued back to back."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def wait_greeted(socks: list[socket.socket], timeout: float) -> int:
    """How many sockets turn readable (the greeting arrived) within ``timeout`` (a bound on a
    failure, not a measured time)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    greeted, deadline = 0, time.monotonic() + timeout
    while greeted < len(socks):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            sel.unregister(key.fileobj)
            greeted += 1
    sel.close()
    return greeted


def serve_one(s: socket.socket, image_bytes: bytes, offset: int) -> raw.RawClient:
    c = raw.RawClient(s, timeout=60)
    c.greet()
    c.go()
    assert c.pread(offset, 4096) == image_bytes[offset : offset + 4096]
    return c


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_simultaneous_connects_are_all_greeted_and_served(tmp_path, image, many_fds):
    data = image.read_bytes()
    with serve(tmp_path, "--handshake-timeout", "600", "-f", "raw", image, tcp=True) as srv:
        socks = burst(srv.port, N)
        try:
            greeted = wait_greeted(socks, timeout=60)
            assert greeted == N, f"{N - greeted} of {N} clients never got the greeting"
            clients = [serve_one(s, data, (i * 4096) % MiB) for i, s in enumerate(socks)]
            for c in clients:  # all still connected and answering
                assert c.pread(0, 512) == data[:512]
        finally:
            for s in socks:
                s.close()


def test_idle_connections_cost_little_memory(tmp_path, image, many_fds):
    data = image.read_bytes()
    with serve(tmp_path, "--handshake-timeout", "600", "-f", "raw", image, tcp=True) as srv:
        port = srv.port
        for s in burst(port, 50):  # warm up: code paths, pools, the allocator's arenas
            assert wait_greeted([s], 60) == 1
            serve_one(s, data, 0).close()
        before = rss(srv.pid)
        socks = []
        try:
            for _ in range(N // 50):  # in small bursts: this test is about memory, not the backlog
                socks += burst(port, 50)
                assert wait_greeted(socks[-50:], 60) == 50
            clients = [serve_one(s, data, (i * 4096) % MiB) for i, s in enumerate(socks)]
            after = rss(srv.pid)
            assert all(c.pread(4096, 512) == data[4096:4608] for c in clients)
        finally:
            for s in socks:
                s.close()
    per_connection = (after - before) / N
    print(f"server RSS {before >> 10} KiB -> {after >> 10} KiB: {per_connection / 1024:.1f} KiB per idle connection")
    assert per_connection <= IDLE_CONNECTION_BUDGET, f"{per_connection / 1024:.1f} KiB per idle connection"


def test_clients_over_the_limit_get_a_clean_refusal(tmp_path, image):
    with serve(tmp_path, "-e", "2", "-f", "raw", image) as srv:
        first, second = nbd.NBD(), nbd.NBD()
        first.connect_uri(srv.uri)
        second.connect_uri(srv.uri)
        with raw.RawClient(srv.sock) as c:
            c.greet()  # the greeting comes, as for anyone
            replies = c.option(raw.OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 0))
            rtype, payload = replies[-1]
            assert rtype == (1 << 31) | 2, replies  # NBD_REP_ERR_POLICY
            assert b"too many connections" in payload and b"2" in payload, payload
            assert c.wait_closed()
        third = nbd.NBD()
        with pytest.raises(nbd.Error):
            third.connect_uri(srv.uri)
        assert first.pread(512, 0) == image.read_bytes()[:512]  # the admitted clients are unaffected
        first.shutdown()
        second.shutdown()


def listen_backlog(port: int) -> int:
    """The backlog of the TCP listener on ``port`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_backlog_is_sized_for_bursts_and_configurable(tmp_path, image):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with serve(tmp_path, "-f", "raw", image, tcp=True) as srv:
        assert listen_backlog(srv.port) == min(DEFAULT_BACKLOG, somaxconn)
    with serve(tmp_path, "--backlog", "77", "-f", "raw", image, tcp=True) as srv:
        assert listen_backlog(srv.port) == 77
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nbacklog = 55\n[[export]]\nname = ""\npath = "{image}"\nformat = "raw"\n')
    with serve(tmp_path, "--config", conf, tcp=True) as srv:
        assert listen_backlog(srv.port) == 55


def test_unix_connections_get_a_send_buffer_for_large_replies(tmp_path: Path) -> None:
    """A Unix stream socket keeps the kernel's default send buffer (208 KiB, less than one 1 MiB
    reply) unless the server asks for more; ``ss -xm`` shows what the server's end of a client's
    connection got: 4 MiB (the kernel reports twice that), or as much as ``net.core.wmem_max``
    allows where the server lacks CAP_NET_ADMIN."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    with serve(tmp_path, "-f", "raw", img) as srv:
        h = nbd.NBD()
        h.connect_unix(str(srv.sock))
        out = subprocess.run(["ss", "-x", "-m", "-p", "-H"], capture_output=True, text=True, check=True).stdout
        h.shutdown()
    (ours,) = [line for line in out.splitlines() if f"pid={srv.pid}," in line and str(srv.sock) in line]
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    want = 2 * (4 * MiB if os.geteuid() == 0 else min(4 * MiB, wmem_max))
    assert int(ours.split(",tb")[1].split(",")[0]) >= want, ours
