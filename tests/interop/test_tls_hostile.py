"""Hostile and broken TLS clients: each must end only its own connection, within the handshake
deadline, while a libnbd client connected over TLS before the attacks keeps working.

The server requires TLS, runs with ``--handshake-timeout 1`` and ``--shared 4``: a connection
whose failed TLS upgrade were not cleaned up would keep its place, and after the attacks
(far more than four) new clients would be turned away.  Waiting for the server to close a
connection is a bounded ``recv``, never a sleep.  TLS client hellos are made with Python's ssl
module through memory BIOs, so the tests can cut them, delay them or send them too early.
"""

from __future__ import annotations

import os
import signal
import ssl
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB, random_raw
from tests.tlscerts import Pki
from tests.util import Served, run, serve, wait_pid_exit

SIZE = 8 * MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    d = tmp_path_factory.mktemp("tls-hostile")
    img = random_raw(d / "disk.img", SIZE)
    args = ["--tls-creds", pki.server, "--handshake-timeout", "1", "--shared", "4", "-x", "disk", "-f", "raw", img]
    with serve(d, *args, tcp=True) as srv:
        srv.export = "disk"
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(srv.tls_uri(pki.alice))
        yield srv, img, h
        h.shutdown()


@pytest.fixture(autouse=True)
def check_witness(server, pki: Pki):
    yield
    srv, img, h = server
    assert srv.alive(), srv.log_text()
    pattern = os.urandom(4096)
    h.pwrite(pattern, 3 * MiB)
    h.flush()
    assert h.pread(4096, 3 * MiB) == pattern
    with open(img, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(4096) == pattern
    run("nbdinfo", "--size", srv.tls_uri(pki.alice))  # a new client still gets a place
    assert "Traceback" not in srv.log_text(), srv.log_text()


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca.cert))


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a TLS client, made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def acked(srv: Served) -> raw.RawClient:
    """A plaintext client whose STARTTLS the server has acknowledged."""
    c = raw.RawClient(("127.0.0.1", srv.port))
    c.greet()
    assert c.option(raw.OPT_STARTTLS) == [(raw.REP_ACK, b"")]
    return c


def failures(srv: Served, text: str = "TLS handshake failed") -> int:
    return srv.log_text().count(text)


def wait_logged(server, text: str, count: int) -> None:
    """Until ``text`` is in the log ``count`` times (the witness round-trips between looks)."""
    srv, _, h = server
    srv.wait_logged(count, text, witness=lambda: h.pread(512, 0))


def test_garbage_instead_of_client_hello(server) -> None:
    srv, *_ = server
    before = failures(srv, "TLS handshake failed: [SSL: ")
    with acked(srv) as c:
        c.send(os.urandom(4096))
        assert c.wait_closed()
    wait_logged(server, "TLS handshake failed: [SSL: ", before + 1)


def test_stalled_tls_handshake_ends_at_the_deadline(server) -> None:
    srv, *_ = server
    before = failures(srv, "handshake not finished within 1.0s")
    with acked(srv) as c:
        assert c.wait_closed(timeout=30)
    wait_logged(server, "handshake not finished within 1.0s", before + 1)


def test_hello_cut_short_then_stall(server, pki: Pki) -> None:
    srv, *_ = server
    hello = client_hello(client_context(pki))
    with acked(srv) as c:
        c.send(hello[: len(hello) // 2])
        assert c.wait_closed(timeout=30)  # the deadline covers the TLS handshake too


@pytest.mark.parametrize("cut", ["in-the-hello", "after-the-hello"])
def test_client_drops_mid_handshake(server, pki: Pki, cut: str) -> None:
    srv, *_ = server
    hello = client_hello(client_context(pki))
    for _ in range(6):  # more than --shared: each dropped connection must give its place back
        c = acked(srv)
        if cut == "in-the-hello":
            c.send(hello[:20])
        else:
            c.send(hello)
            assert c.sock.recv(10)  # the server answered with its hello; now vanish
        c.close()


def test_second_starttls_err_invalid(server, pki: Pki) -> None:
    srv, img, _ = server
    with raw.RawClient(("127.0.0.1", srv.port)) as c:
        c.greet()
        c.starttls(client_context(pki))
        replies = c.option(raw.OPT_STARTTLS)
        assert [r[0] for r in replies] == [raw.REP_ERR_INVALID]
        c.go("disk")  # the session goes on, over TLS
        assert c.pread(MiB + 1, 4095) == img.read_bytes()[MiB + 1 : MiB + 4096]


def test_client_hello_sent_before_the_ack(server, pki: Pki) -> None:
    srv, *_ = server
    before = failures(srv, "client sent data after STARTTLS")
    with raw.RawClient(("127.0.0.1", srv.port)) as c:
        c.greet()
        # STARTTLS and a ClientHello in one segment, without waiting for the reply.  (A hello that
        # arrives after the server read STARTTLS is simply handed to TLS, as if the client waited.)
        c.send(struct.pack(">QII", raw.IHAVEOPT, raw.OPT_STARTTLS, 0) + client_hello(client_context(pki)))
        assert c.wait_closed()
    wait_logged(server, "client sent data after STARTTLS", before + 1)


def test_tls_1_1_is_refused(server) -> None:
    srv, *_ = server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    before = failures(srv, "unsupported protocol")
    with acked(srv) as c, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(c.sock, server_hostname="localhost")
    wait_logged(server, "unsupported protocol", before + 1)


def test_shutdown_during_a_tls_handshake(pki: Pki, tmp_path: Path) -> None:
    """SIGTERM while a client stalls in its TLS handshake: the server drops it and exits."""
    img = random_raw(tmp_path / "s.img", MiB)
    with serve(tmp_path, "--tls-creds", pki.server, "--handshake-timeout", "0", "-f", "raw", img, tcp=True) as srv:
        c = acked(srv)
        c.send(client_hello(client_context(pki))[:10])
        os.kill(srv.pid, signal.SIGTERM)
        assert wait_pid_exit(srv.pid, 30), srv.log_text()
        assert c.wait_closed()
        c.close()
        assert "Traceback" not in srv.log_text()


def test_libnbd_plaintext_downgrade_refused(server) -> None:
    """A client that asks for TLS but accepts plaintext (LIBNBD_TLS_ALLOW) still gets TLS: the
    server never offers a plaintext path."""
    srv, *_ = server
    code = (
        "import nbd, sys; h = nbd.NBD(); h.set_tls(nbd.TLS_ALLOW); h.set_tls_verify_peer(False); "
        "h.set_export_name('disk'); h.connect_tcp('127.0.0.1', sys.argv[1]); print(h.get_tls_negotiated())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(srv.port)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "True"
