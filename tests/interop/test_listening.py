"""The life of the listening socket: nothing listens until the images are open (an early client
is refused at connect instead of being accepted and then reset), and the Unix socket file the
server created is removed when it exits (after SIGTERM, or when start-up fails), but never a
socket file someone else put at that path.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.util import NBDSERVE, TOOL_ENV, serve, start_error


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    """Read the process's stderr until a line contains ``needle`` (bounded wait on the pipe)."""
    seen, deadline = b"", time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        r, _, _ = select.select([proc.stderr], [], [], max(left, 0))
        if not r:
            raise AssertionError(f"no {needle!r} from the server: {seen.decode(errors='replace')}")
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"the server exited: {seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode(errors="replace")


def test_nothing_listens_before_the_images_are_open(tmp_path: Path):
    fifo = tmp_path / "slow.img"
    os.mkfifo(fifo)  # opening it read-only blocks until a writer comes: the image "opens slowly"
    sock = tmp_path / "early.sock"
    proc = subprocess.Popen(
        [*NBDSERVE, "-v", "-r", "-f", "raw", "-k", str(sock), str(fifo)], stderr=subprocess.PIPE, env=TOOL_ENV
    )
    try:
        read_until(proc, "opening export")  # bound, and now blocked opening the image
        assert sock.exists()
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
            s.connect(str(sock))
    finally:
        os.close(os.open(fifo, os.O_WRONLY))  # let the open finish, whatever follows
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_unix_socket_file_is_removed_at_exit(tmp_path: Path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    with serve(tmp_path, "-f", "raw", img) as srv:
        assert srv.sock.exists()
    assert not srv.sock.exists()


def test_unix_socket_file_is_removed_when_start_up_fails(tmp_path: Path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(508))
    assert "bad.qcow2" in start_error(tmp_path, bad)  # with --fork: the child reported, then exited
    assert not (tmp_path / "refused.sock").exists()


def test_another_servers_socket_file_is_left_alone(tmp_path: Path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    with serve(tmp_path, "-f", "raw", img) as srv:
        os.unlink(srv.sock)  # someone replaces our socket file with theirs
        theirs = socket.socket(socket.AF_UNIX)
        theirs.bind(str(srv.sock))
        theirs.listen(1)
        srv.stop(signal.SIGTERM)
    try:
        assert srv.sock.exists()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.sock))  # still theirs, still working
    finally:
        theirs.close()
