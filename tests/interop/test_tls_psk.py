"""TLS with pre-shared keys (``username:hexkey`` files made by psktool), with libnbd (nbdinfo,
the Python bindings' ``set_tls_psk_file``) and QEMU (``tls-creds-psk``) as clients.

Python's ssl module has TLS-PSK from 3.13 on.  On an older Python nbdserve must refuse PSK
credentials at start-up with a one-line reason (tested whenever this Python lacks PSK).  The
client tests need a server interpreter with PSK: this Python if it has it, else the one named
by ``NBDSERVE_PSK_PYTHON`` (a Python >= 3.13 with nbdserve's dependencies installed); without
either they are skipped and say why.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from tests.interop.conftest import MiB, random_raw
from tests.tlscerts import psk_file
from tests.util import NBDSERVE, TOOL_ENV, qemu_img, run, serve

HAVE_PSK = hasattr(ssl.SSLContext, "set_psk_server_callback")
PSK_PYTHON = sys.executable if HAVE_PSK else os.environ.get("NBDSERVE_PSK_PYTHON")
needs_psk_python = pytest.mark.skipif(
    PSK_PYTHON is None, reason="TLS-PSK needs Python >= 3.13: set NBDSERVE_PSK_PYTHON to run these"
)


@pytest.mark.skipif(HAVE_PSK, reason="this Python has TLS-PSK")
def test_psk_refused_with_one_line_on_this_python(tmp_path: Path) -> None:
    keys = psk_file(tmp_path / "keys.psk")
    img = random_raw(tmp_path / "x.img", MiB)
    p = subprocess.run(
        [*NBDSERVE, "-k", tmp_path / "s.sock", "--tls-psk", keys, "-f", "raw", img],
        capture_output=True, text=True, timeout=60, env=TOOL_ENV,
    )  # fmt: skip
    assert p.returncode == 1
    (line,) = p.stderr.splitlines()
    assert line.startswith("nbdserve: TLS-PSK needs Python 3.13 or later (this is 3.")
    assert "--tls-creds DIR" in line


@pytest.fixture(scope="module")
def psk_server(tmp_path_factory: pytest.TempPathFactory):
    if PSK_PYTHON is None:
        pytest.skip("TLS-PSK needs Python >= 3.13: set NBDSERVE_PSK_PYTHON to run these")
    d = tmp_path_factory.mktemp("psk")
    keys = psk_file(d / "keys.psk", "alice")
    psk_file(keys, "bob")  # a valid key, but bob is not authorised below
    img = random_raw(d / "disk.img", 8 * MiB)
    args = [
        "--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={d}", "--tls-creds", "tls0",
        "--object", "authz-simple,id=auth0,identity=alice", "--tls-authz", "auth0",
        "-x", "disk", "-f", "raw", "-v", img,
    ]  # fmt: skip
    with serve(d, *args, tcp=True, python=PSK_PYTHON) as srv:
        srv.export = "disk"
        yield srv, img, keys


def psk_uri(srv, keys: Path, user: str = "alice") -> str:
    return f"nbds://{user}@127.0.0.1:{srv.port}/disk?tls-psk-file={keys}"


@needs_psk_python
def test_nbdinfo_psk(psk_server) -> None:
    srv, _, keys = psk_server
    assert run("nbdinfo", "--size", psk_uri(srv, keys)).stdout.strip() == str(8 * MiB)
    assert "client 'alice'" in srv.log_text()


@needs_psk_python
def test_libnbd_python_psk(psk_server) -> None:
    srv, img, keys = psk_server
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(keys))
    h.set_tls_username("alice")
    h.set_export_name("disk")
    h.connect_tcp("127.0.0.1", str(srv.port))
    try:
        assert h.get_tls_negotiated()
        data = os.urandom(5000)
        h.pwrite(data, MiB + 7)
        h.flush()
        assert h.pread(5000, MiB + 7) == data
        assert img.read_bytes()[MiB + 7 : MiB + 5007] == data
    finally:
        h.shutdown()


@needs_psk_python
def test_qemu_psk(psk_server, tmp_path: Path) -> None:
    srv, img, keys = psk_server
    obj = ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={keys.parent},username=alice"]
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={srv.port},export=disk,tls-creds=tls0"
    assert "virtual size: 8 MiB" in qemu_img("info", *obj, "--image-opts", opts).stdout
    out = tmp_path / "copy.raw"
    qemu_img("convert", *obj, "--image-opts", opts, "-O", "raw", out)
    assert out.read_bytes() == img.read_bytes()


@needs_psk_python
@pytest.mark.parametrize("who", ["wrong-key", "unknown-user", "unauthorised-user"])
def test_psk_refusals(psk_server, tmp_path: Path, who: str) -> None:
    srv, _, keys = psk_server
    user = {"wrong-key": "alice", "unknown-user": "carol", "unauthorised-user": "bob"}[who]
    other = keys if who == "unauthorised-user" else psk_file(tmp_path / "other.psk", user)  # a fresh random key
    p = run("nbdinfo", "--size", psk_uri(srv, other, user), check=False)
    assert p.returncode != 0
    if who == "unauthorised-user":
        assert "TLS identity 'bob' does not pass [server] tls-authz = alice" in srv.log_text()
    assert run("nbdinfo", "--size", psk_uri(srv, keys)).returncode == 0  # others still served
