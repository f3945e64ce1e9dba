"""Real clients over TLS: libnbd (nbdinfo, nbdcopy, the Python bindings) and QEMU (qemu-img,
qemu-io, qemu-nbd --list), each with its own way of naming the credentials, against nbdserve
with X.509 certificates made by ``tests/tlscerts.py``.

The server listens on 127.0.0.1 (the certificate names 127.0.0.1 and localhost) and requires TLS
(FORCEDTLS, the default once credentials are given) and client certificates; the bytes every
client reads and writes are checked against the image file.  One test repeats the basics on
asyncio's own event loop (``loop.start_tls`` is the loop's, so both loops are exercised).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import nbd
import pytest

from tests.interop.conftest import MiB, random_raw
from tests.tlscerts import Pki
from tests.util import NBDSERVE, Served, qemu_img, run, serve

SIZE = 16 * MiB


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    d = tmp_path_factory.mktemp("tls")
    img = random_raw(d / "disk.img", SIZE)
    obj = f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server}"  # qemu-nbd's spelling
    with serve(d, "--object", obj, "--tls-creds", "tls0", "-x", "disk", "-f", "raw", img, tcp=True) as srv:
        srv.export = "disk"
        yield srv, img


def client_object(certs: Path, oid: str = "tls0") -> str:
    return f"tls-creds-x509,id={oid},endpoint=client,dir={certs}"


def image_opts(srv: Served, oid: str = "tls0") -> str:
    return (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={srv.port},export={srv.export},tls-creds={oid}"
    )


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_nbdinfo_tcp_and_unix(tls_server, pki: Pki, tmp_path: Path) -> None:
    srv, _ = tls_server
    out = run("nbdinfo", "--json", srv.tls_uri(pki.alice)).stdout
    assert '"TLS": true' in out and f'"export-size": {SIZE}' in out
    # the same over a Unix socket (libnbd does not check a host name there)
    img = random_raw(tmp_path / "u.img", MiB)
    with serve(tmp_path, "--tls-creds", pki.server, "-f", "raw", img) as usrv:
        out = run("nbdinfo", "--json", usrv.tls_uri(pki.alice)).stdout
        assert '"TLS": true' in out and f'"export-size": {MiB}' in out


def test_nbdcopy_both_ways(tls_server, pki: Pki, tmp_path: Path) -> None:
    srv, img = tls_server
    src = random_raw(tmp_path / "src.img", SIZE, seed=7)
    run("nbdcopy", src, srv.tls_uri(pki.alice))
    assert img.read_bytes() == src.read_bytes()
    back = tmp_path / "back.img"
    run("nbdcopy", srv.tls_uri(pki.alice), back)
    assert back.read_bytes() == src.read_bytes()


def test_libnbd_python_tls_settings(tls_server, pki: Pki) -> None:
    srv, img = tls_server
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki.alice))
    h.set_tls_verify_peer(True)
    h.set_export_name("disk")
    h.connect_tcp("127.0.0.1", str(srv.port))
    try:
        assert h.get_tls_negotiated()
        data = os.urandom(70001)
        h.pwrite(data, 3 * MiB + 513)  # unaligned offset and length
        h.flush()
        assert h.pread(70001, 3 * MiB + 513) == data
        assert file_bytes(img, 3 * MiB + 513, 70001) == data
    finally:
        h.shutdown()


def test_libnbd_python_verify_peer_rejects_an_unknown_ca(tls_server, pki: Pki) -> None:
    srv, _ = tls_server
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki.wrong_ca))
    h.set_tls_verify_peer(True)
    h.set_export_name("disk")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(srv.port))


def test_qemu_img_info_convert_compare(tls_server, pki: Pki, tmp_path: Path) -> None:
    srv, img = tls_server
    obj = ["--object", client_object(pki.alice)]
    out = qemu_img("info", *obj, "--image-opts", image_opts(srv)).stdout
    assert f"virtual size: 16 MiB ({SIZE} bytes)" in out
    # local -> server, server -> local, then compare server and file
    src = random_raw(tmp_path / "src.img", SIZE, seed=11)
    qemu_img("convert", *obj, "-n", "-f", "raw", src, "--target-image-opts", image_opts(srv))
    assert img.read_bytes() == src.read_bytes()
    out_file = tmp_path / "out.qcow2"
    qemu_img("convert", *obj, "--image-opts", image_opts(srv), "-O", "qcow2", out_file)
    qemu_img("compare", *obj, "--image-opts", image_opts(srv), f"driver=qcow2,file.filename={out_file}")
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out_file, src)


def test_qemu_io_unaligned(tls_server, pki: Pki) -> None:
    srv, img = tls_server
    p = run(
        "qemu-io", "--object", client_object(pki.alice), "--image-opts", image_opts(srv),
        "-c", "write -P 0x5a 1234567 70001", "-c", "read -P 0x5a 1234567 70001",
    )  # fmt: skip
    assert "Pattern verification failed" not in p.stdout
    assert file_bytes(img, 1234567, 70001) == b"\x5a" * 70001


def test_qemu_nbd_list(tls_server, pki: Pki) -> None:
    srv, _ = tls_server
    out = run(
        "qemu-nbd", "--list", "-b", "127.0.0.1", "-p", str(srv.port), "--object", client_object(pki.alice),
        "--tls-creds", "tls0",
    ).stdout  # fmt: skip
    assert "export: 'disk'" in out and f"size:  {SIZE}" in out


def test_asyncio_event_loop(pki: Pki, tmp_path: Path) -> None:
    """``loop.start_tls`` on the standard loop as well as on uvloop."""
    img = random_raw(tmp_path / "a.img", 4 * MiB)
    with serve(tmp_path, "--tls-creds", pki.server, "-f", "raw", img, env={"NBDSERVE_LOOP": "asyncio"}) as srv:
        src = random_raw(tmp_path / "src.img", 4 * MiB, seed=3)
        run("nbdcopy", src, srv.tls_uri(pki.alice))
        back = tmp_path / "back.img"
        run("nbdcopy", srv.tls_uri(pki.alice), back)
        assert back.read_bytes() == src.read_bytes() == img.read_bytes()


def test_sighup_rotates_certificates(pki: Pki, tmp_path: Path) -> None:
    """SIGHUP reads the credentials again: new clients see the new certificate, an established
    session keeps going, and a broken replacement keeps the old credentials."""
    creds = tmp_path / "creds"
    shutil.copytree(pki.server, creds)
    img = random_raw(tmp_path / "r.img", 4 * MiB)
    # TCP: libnbd checks the server's certificate only when it has a host name to check.
    with serve(tmp_path, "--tls-creds", creds, "-f", "raw", img, tcp=True) as srv:
        old = nbd.NBD()
        old.set_uri_allow_local_file(True)
        old.connect_uri(srv.tls_uri(pki.alice))
        try:
            # Rotate to a certificate from another CA: clients trusting only our CA must now fail,
            # clients trusting the other CA succeed.
            for name in ("server-cert.pem", "server-key.pem"):
                shutil.copy(pki.root / "other-server" / name, creds / name)
            reloaded = srv.log_text().count("TLS: reloaded")
            os.kill(srv.pid, signal.SIGHUP)
            wait_for_log(srv, "TLS: reloaded", reloaded + 1)
            assert run("nbdinfo", srv.tls_uri(pki.alice), check=False).returncode != 0
            run("nbdinfo", srv.tls_uri(pki.wrong_ca))  # trusts the other CA
            assert old.pread(4096, 0) == img.read_bytes()[:4096]  # the old session goes on
            # A key that does not match the certificate: the reload fails, the credentials stay.
            shutil.copy(pki.server / "server-key.pem", creds / "server-key.pem")
            failed = srv.log_text().count("TLS: reload failed")
            os.kill(srv.pid, signal.SIGHUP)
            wait_for_log(srv, "TLS: reload failed", failed + 1)
            run("nbdinfo", srv.tls_uri(pki.wrong_ca))
            assert old.pread(4096, 4096) == img.read_bytes()[4096:8192]
        finally:
            old.shutdown()


def wait_for_log(srv: Served, text: str, count: int) -> None:
    """Wait (bounded) until ``text`` appears ``count`` times in the server log: a client request
    round-trips through the server's event loop, which runs the signal handler first."""
    insecure = srv.uri.replace("nbd", "nbds", 1) + ("&" if "?" in srv.uri else "?") + "tls-verify-peer=false"
    for _ in range(50):
        run("nbdinfo", "--size", insecure, check=False)
        if srv.log_text().count(text) >= count:
            return
    raise AssertionError(f"{text!r} not logged {count} times:\n{srv.log_text()}")


@pytest.mark.parametrize("fork", [True, False])
def test_bad_credentials_refused_at_start(tmp_path: Path, pki: Pki, fork: bool) -> None:
    """A key that does not match its certificate: one line naming the files, exit status 1."""
    creds = tmp_path / "creds"
    shutil.copytree(pki.server, creds)
    shutil.copy(pki.other_server / "server-key.pem", creds / "server-key.pem")
    img = random_raw(tmp_path / "b.img", MiB)
    args = ["--fork", "--pid-file", tmp_path / "p.pid"] if fork else []
    p = run(*NBDSERVE, *args, "-k", tmp_path / "s.sock", "--tls-creds", creds, "-f", "raw", img, check=False)
    assert p.returncode == 1
    (line,) = p.stderr.splitlines()
    expected = f"nbdserve: TLS credentials: cannot load {creds}/server-cert.pem with {creds}/server-key.pem"
    assert line.startswith(expected)
