"""Opening what the server may not write, and what clients are told about the server's files.

* An image the server's user may not write is refused without ``-r`` (as qemu-nbd does), never
  silently served read-only; with ``-r`` it is served.  The server runs as ``nobody`` (setpriv)
  on an image owned by root.
* Error replies (a request failing on a corrupt image, an export that failed to open) name files
  by their file name only; the server's log keeps the full path.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.interop import nbdclient as raw
from tests.util import NBDSERVE, TOOL_ENV, qemu_img, qemu_io, read_pid, serve, wait_pid_exit


@pytest.fixture
def shared_dir():
    """A directory ``nobody`` can use (pytest's own tmp_path is private to root)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the server as another user")
    d = Path(tempfile.mkdtemp(prefix="nbdserve-perm-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def serve_as_nobody(d: Path, *args: str | Path) -> tuple[int, str]:
    """``nbdserve --fork`` as user nobody: (exit status, output).  The caller stops a server that
    started (pid file ``d/nobody.pid``).  Output goes to a file: the server keeps it open."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *NBDSERVE]
    cmd += ["--fork", "--pid-file", str(d / "nobody.pid"), "-k", str(d / "nobody.sock"), *map(str, args)]
    log = d / "nobody.log"
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=TOOL_ENV, timeout=120, cwd="/")
    return p.returncode, log.read_text()


def test_unwritable_image_is_refused_without_read_only(shared_dir):
    img = shared_dir / "root-owned.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    img.chmod(0o644)  # root's; nobody may read it, not write it
    status, out = serve_as_nobody(shared_dir, "-f", "raw", img)
    assert status != 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "cannot open for writing: Permission denied" in lines[0] and "-r" in lines[0], lines
    status, out = serve_as_nobody(shared_dir, "-r", "-f", "raw", img)
    assert status == 0, out
    pid = read_pid(shared_dir / "nobody.pid")
    try:
        with raw.RawClient(str(shared_dir / "nobody.sock")) as c:
            c.greet()
            c.go()
            assert c.pread(0, 4096) == b"\x5a" * 4096
            assert c.pwrite(0, b"x" * 512).error == raw.EPERM
    finally:
        os.kill(pid, 15)
        assert wait_pid_exit(pid)


def corrupt_l2_qcow2(path: Path) -> None:
    """A qcow2 whose first L2 entry points at an unaligned host offset (found when read)."""
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("qcow2", path, "write -P 1 0 64k")
    data = bytearray(path.read_bytes())
    (l1,) = struct.unpack_from(">Q", data, 40)
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2, (1 << 63) | (0x123456 << 9))
    path.write_bytes(data)


def test_error_replies_carry_no_server_paths(tmp_path):
    bad = tmp_path / "bad.qcow2"
    corrupt_l2_qcow2(bad)
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + bytes(508))  # fails to open
    with serve(tmp_path, "--export", f"bad={bad},readonly", "--export", f"broken={broken}") as srv:
        with raw.RawClient(srv.sock) as c:
            c.greet()
            replies = c.option(raw.OPT_GO, struct.pack(">I", 6) + b"broken" + struct.pack(">H", 0))
            rtype, payload = replies[-1]
            assert rtype & (1 << 31), replies
            text = payload.decode()
            assert "broken.qcow2" in text and str(tmp_path) not in text, text
        with raw.RawClient(srv.sock) as c:
            c.greet()
            c.go("bad")
            r = c.call(raw.CMD_READ, 0, 512)
            assert r.error == 5 and "bad.qcow2: L2 entry" in r.message, r
            assert str(tmp_path) not in r.message, r.message
        log = srv.log_text()
        assert str(bad) in log and str(broken) in log  # the operator still sees where
