"""How nbdserve can be started and stopped: --stdio, socket activation (libnbd and
systemd-socket-activate), TCP, --export/--config with several exports, the -e connection limit,
graceful SIGTERM, --fork error reporting, and a broken export beside working ones.

Readiness is never a sleep: forked servers return once listening; foreground servers are awaited
through sd_notify's READY=1 on a NOTIFY_SOCKET the test owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import SIZE, MiB, expected_bytes, write_sparse_raw
from tests.util import NBDSERVE, REPO, TOOL_ENV, Served, read_pid, run, serve


@pytest.fixture
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """libnbd starts the server with this process's environment: make ``-m nbdserve`` importable."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def check_rw(h: nbd.NBD, size: int = SIZE) -> None:
    assert h.get_size() == size
    assert h.pread(4096, 0) == b"\x11" * 4096
    h.pwrite(b"\xc3" * 4096, 2 * MiB)
    h.flush()
    assert h.pread(4096, 2 * MiB) == b"\xc3" * 4096


@contextlib.contextmanager
def foreground(tmp_path: Path, *args: str | os.PathLike):
    """``nbdserve ARGS`` as a child process (no --fork), so its exit status can be checked.

    Yields (process, log path) once the server has sent READY=1 to our NOTIFY_SOCKET.
    """
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    log = tmp_path / "foreground.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [*NBDSERVE, *map(str, args)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**TOOL_ENV, "NOTIFY_SOCKET": str(notify_path)},
        )
    try:
        try:
            msg = notify.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no READY=1 from the server:\n{log.read_text()}") from None
        assert b"READY=1" in msg, msg
        yield proc, log
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- --stdio and socket activation --------------------------------------------------------------


def test_stdio_through_connect_command(tmp_path: Path, repo_on_path: None) -> None:
    img = write_sparse_raw(tmp_path / "stdio.img")
    h = nbd.NBD()
    h.connect_command([*NBDSERVE, "--stdio", "-f", "raw", str(img)])
    check_rw(h)
    h.shutdown()
    del h  # reaps the server, which flushed and closed the image on the way out
    assert img.read_bytes()[2 * MiB : 2 * MiB + 4096] == b"\xc3" * 4096


def test_stdio_refuses_a_non_socket_stdin(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "stdio.img")
    p = run(*NBDSERVE, "--stdio", "-f", "raw", img, check=False, input="")
    assert p.returncode != 0
    assert "socket" in p.stderr and "Traceback" not in p.stderr


def test_libnbd_socket_activation(tmp_path: Path, repo_on_path: None) -> None:
    img = write_sparse_raw(tmp_path / "sa.img")
    h = nbd.NBD()
    h.connect_systemd_socket_activation([*NBDSERVE, "-f", "raw", str(img)])
    check_rw(h)
    h.shutdown()
    del h
    assert img.read_bytes()[2 * MiB : 2 * MiB + 4096] == b"\xc3" * 4096


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
def test_systemd_socket_activate(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "ssa.img")
    sock = tmp_path / "ssa.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), *NBDSERVE, "-f", "raw", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=TOOL_ENV,
        text=True,
    )
    try:
        # It binds and listens, says so, and execs the server (listening socket on fd 3) when
        # the first client knocks; that client waits in the listen backlog meanwhile.
        line = proc.stderr.readline()
        assert line.startswith("Listening on"), line
        h = nbd.NBD()
        h.connect_unix(str(sock))
        check_rw(h)
        h.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- TCP, several exports ----------------------------------------------------------------------


def test_tcp(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "tcp.img")
    pidfile, log = tmp_path / "tcp.pid", tmp_path / "tcp.log"
    with open(log, "w") as logf:
        p = subprocess.run(
            [*NBDSERVE, "--fork", "--pid-file", str(pidfile), "-v", "-b", "127.0.0.1", "-p", "0", "-f", "raw", img],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=TOOL_ENV,
            timeout=60,
        )
    assert p.returncode == 0, log.read_text()
    srv = Served(Path(), read_pid(pidfile), log)
    try:
        m = re.search(r"serving nbd://127\.0\.0\.1:(\d+)/", log.read_text())
        assert m, log.read_text()
        port = int(m.group(1))
        assert port != 0
        h = nbd.NBD()
        h.connect_tcp("127.0.0.1", str(port))
        check_rw(h)
        h.shutdown()
        out = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/").stdout
        assert int(out) == SIZE
    finally:
        srv.stop()
    assert not pidfile.exists()  # removed on a clean exit


def test_config_and_export_flags(tmp_path: Path) -> None:
    one = write_sparse_raw(tmp_path / "one.img")
    two = write_sparse_raw(tmp_path / "two.img", size=2 * MiB, runs=((0, 4096, 0x11),))
    three = write_sparse_raw(tmp_path / "three.img", size=1 * MiB, runs=((0, 4096, 0x11),))
    cfg = tmp_path / "nbdserve.toml"
    cfg.write_text(
        f"""
[server]
handshake-timeout = 5

[[export]]
name = "one"
path = "{one}"
format = "raw"
description = "first export"

[[export]]
name = "two"
path = "{two}"
format = "raw"
readonly = true
"""
    )
    with serve(tmp_path, "--config", cfg, "--export", f"three={three},format=raw") as srv:
        listed = run("nbdinfo", "--list", "--json", srv.uri).stdout
        names = {e["export-name"]: e for e in json.loads(listed)["exports"]}
        assert set(names) == {"one", "two", "three"}
        assert names["one"]["description"] == "first export"
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("one"))
        check_rw(h)
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("two"))
        assert h.get_size() == 2 * MiB and h.is_read_only()
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("three"))
        assert h.get_size() == 1 * MiB and not h.is_read_only()
        h.shutdown()
        # An unknown export name is refused (and does not disturb the server).
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(srv.uri_for("four"))
        assert srv.alive()


def test_bad_image_in_a_multi_export_config_leaves_the_others_serving(tmp_path: Path) -> None:
    good = write_sparse_raw(tmp_path / "good.img")
    bad = tmp_path / "bad.img"
    bad.mkdir()  # exists, but cannot be opened as an image
    corrupt = tmp_path / "corrupt.qcow2"  # qcow2 magic and version 3, nonsense after that
    corrupt.write_bytes(b"QFI\xfb" + struct.pack(">I", 3) + b"\xff" * 504)
    args = ["--export", f"good={good},format=raw", "--export", f"bad={bad},format=raw"]
    with serve(tmp_path, *args, "--export", f"corrupt={corrupt}") as srv:
        log = srv.log_text()
        assert "'bad' not available" in log and "'corrupt' not available" in log, log
        assert "Traceback" not in log
        for name in ("bad", "corrupt"):
            h = nbd.NBD()
            with pytest.raises(nbd.Error):
                h.connect_uri(srv.uri_for(name))
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("good"))
        check_rw(h)
        h.shutdown()


# -- limits and life cycle ---------------------------------------------------------------------


def test_shared_limit_refuses_a_second_client(served_one: Served) -> None:
    first = nbd.NBD()
    first.connect_uri(served_one.uri)
    second = nbd.NBD()
    with pytest.raises(nbd.Error):
        second.connect_uri(served_one.uri)
    assert first.pread(4096, 0) == b"\x11" * 4096  # the first client is unaffected
    first.shutdown()
    # Once the first client has gone the slot is free again.  The server notices the close
    # asynchronously, so try a bounded number of times (each attempt is a full handshake).
    for _ in range(100):
        third = nbd.NBD()
        try:
            third.connect_uri(served_one.uri)
        except nbd.Error:
            continue
        assert third.pread(4096, 0) == b"\x11" * 4096
        third.shutdown()
        break
    else:
        raise AssertionError("the connection slot was never freed")


@pytest.fixture
def served_one(tmp_path: Path):
    img = write_sparse_raw(tmp_path / "one.img")
    with serve(tmp_path, "-e", "1", "-f", "raw", img) as srv:
        yield srv


def fua_writes_across_sigterm(c: raw.RawClient, proc: subprocess.Popen) -> list[int]:
    """On ``c``, a client of ``proc`` in transmission: 48 MiB of dirty pages (which the FUA writes
    then have to sync), then in one send 16 FUA writes (4 KiB of 0x40+i at i * 4 KiB, cookies
    100..115) and a READ.  The READ is answered at once, so its reply proves the server has
    parsed (and started) every write before it: then SIGTERM.  Every write must still succeed;
    returns the cookies answered after the signal (the drain was exercised if there are any)."""
    for off in (8 * MiB, 32 * MiB):
        c.pwrite(off, os.urandom(24 * MiB))
    batch = b""
    for i in range(16):
        batch += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, raw.FLAG_FUA, raw.CMD_WRITE, 100 + i, i * 4096, 4096)
        batch += bytes([0x40 + i]) * 4096
        c.expect(100 + i, raw.CMD_WRITE, i * 4096, 4096)
    batch += struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_READ, 999, 2 * MiB, 4096)
    c.expect(999, raw.CMD_READ, 2 * MiB, 4096)
    c.send(batch)
    early = []
    while (r := c.reply()).cookie != 999:
        early.append(r.cookie)
    proc.send_signal(signal.SIGTERM)
    late = []
    while len(early) + len(late) < 16:
        r = c.reply()
        assert r.error == 0, f"request {r.cookie} failed with errno {r.error}: {r.message}"
        late.append(r.cookie)
    assert sorted(early + late) == list(range(100, 116))
    return late


def assert_fua_writes_landed(data: bytes) -> None:
    """The image holds every write of ``fua_writes_across_sigterm``."""
    for i in range(16):
        assert data[i * 4096 : (i + 1) * 4096] == bytes([0x40 + i]) * 4096


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "drain.img", size=64 * MiB)
    sock = tmp_path / "drain.sock"
    with foreground(tmp_path, "-v", "-k", sock, "-f", "raw", img) as (proc, log):
        c = raw.RawClient(sock)
        c.greet()
        c.go()
        late = fua_writes_across_sigterm(c, proc)
        assert c.wait_closed(30)  # then the server closes the connection...
        assert proc.wait(timeout=30) == 0  # ...and exits cleanly
        c.close()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "flushing and closing images" in text, text
    assert_fua_writes_landed(img.read_bytes())
    # at least one write was still in flight when the signal arrived (else nothing was drained)
    assert late, "every write finished before SIGTERM; the drain was not exercised"


def test_sigterm_with_an_idle_client_and_a_handshaking_one(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "idle.img")
    sock = tmp_path / "idle.sock"
    with foreground(tmp_path, "-k", sock, "-f", "raw", img) as (proc, _log):
        idle = raw.RawClient(sock)
        idle.greet()
        idle.go()
        assert idle.pread(0, 4096) == b"\x11" * 4096
        half = raw.RawClient(sock)
        half.greet()  # never finishes the handshake
        proc.send_signal(signal.SIGTERM)
        assert half.wait_closed(30)
        assert idle.wait_closed(30)
        assert proc.wait(timeout=30) == 0
        idle.close()
        half.close()
    assert expected_bytes() == img.read_bytes()


# -- --fork error reporting ----------------------------------------------------------------------


def fork_server(tmp_path: Path, *args: str | os.PathLike) -> tuple[int, str]:
    """``nbdserve --fork ARGS`` expected to fail: (exit status, output).  Output goes through a file,
    not a pipe (a daemon keeps its stderr open); a daemon started by mistake is stopped at once."""
    pidfile, log = tmp_path / "f.pid", tmp_path / "fork.log"
    with open(log, "w") as logf:
        rc = subprocess.run(
            [*NBDSERVE, "--fork", "--pid-file", str(pidfile), *map(str, args)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=TOOL_ENV,
            timeout=60,
        ).returncode
    if rc == 0 and pidfile.exists():
        Served(Path(), read_pid(pidfile), log).stop()
    return rc, log.read_text()


def test_fork_reports_a_missing_image(tmp_path: Path) -> None:
    rc, out = fork_server(tmp_path, "-k", tmp_path / "s", "-f", "raw", tmp_path / "nope.img")
    assert rc != 0
    assert "nope.img" in out and "Traceback" not in out
    assert not (tmp_path / "f.pid").exists()


def test_fork_reports_an_image_that_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "dir.img").mkdir()
    rc, out = fork_server(tmp_path, "-k", tmp_path / "s", "-f", "raw", tmp_path / "dir.img")
    assert rc != 0
    assert "dir.img" in out and "Traceback" not in out
    assert not (tmp_path / "f.pid").exists()


def test_fork_reports_a_busy_port(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "busy.img")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, out = fork_server(tmp_path, "-b", "127.0.0.1", "-p", str(port), "-f", "raw", img)
    assert rc != 0
    assert str(port) in out and "Traceback" not in out
    assert not (tmp_path / "f.pid").exists()


def test_fork_refuses_a_unix_socket_in_use(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "live.img")
    with serve(tmp_path, "-f", "raw", img) as first:
        rc, out = fork_server(tmp_path, "-k", first.sock, "-f", "raw", img)
        assert rc != 0
        assert str(first.sock) in out and "Traceback" not in out
        h = nbd.NBD()  # the first server still owns its socket
        h.connect_uri(first.uri)
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()


def test_a_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "stale.img")
    sock = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # left behind, nobody listening
    log = tmp_path / "stale.log"
    with open(log, "w") as logf:  # a file, not a pipe: the daemon keeps its stderr open
        rc = subprocess.run(
            [*NBDSERVE, "--fork", "--pid-file", str(tmp_path / "f.pid"), "-k", str(sock), "-f", "raw", str(img)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=TOOL_ENV,
            timeout=60,
        ).returncode
    assert rc == 0, log.read_text()
    srv = Served(sock, read_pid(tmp_path / "f.pid"), log)
    try:
        h = nbd.NBD()
        h.connect_unix(str(sock))
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()
    finally:
        srv.stop()
