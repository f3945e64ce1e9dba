"""The failures issue 15 listed, run again: each is now a one-line message with the right exit
status, or works (qemu-nbd's options, the signals, readiness, percent-encoded URIs)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
from pathlib import Path

import nbd
import pytest

from tests.interop.conftest import SIZE, write_sparse_raw
from tests.util import NBDSERVE, TOOL_ENV, run, serve


def one_line_failure(tmp: Path, *args: str | os.PathLike, status: int) -> str:
    p = run(*NBDSERVE, *args, check=False, timeout=120)
    assert p.returncode == status, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


# (case, config file text or None, extra arguments, exit status, what the line must say)
EXPORT = '[[export]]\npath = "{img}"\n'
CASES = [
    (
        "port is not a number",
        '[server]\nport = "abc"\n' + EXPORT,
        [],
        2,
        ':2: [server] port: expected an integer, not "abc"',
    ),
    (
        "readonly as a string",
        EXPORT + 'readonly = "false"\n',
        [],
        2,
        ":3: [[export]] #1 readonly: expected true or false",
    ),
    ("unknown key", EXPORT + "readonyl = true\n", [], 2, "unknown key 'readonyl' (did you mean 'readonly'?)"),
    ("abbreviated option", None, ["--cache-si", "64M"], 2, "unrecognized arguments: --cache-si"),
    ("bad cache mode", None, ["--cache=sometimes"], 2, "argument --cache: invalid choice: 'sometimes'"),
    (
        "every export failed",
        None,
        ["--export", "a=/no/a.img", "--export", "b=/no/b.img"],
        1,
        "no export could be opened",
    ),
    ("the only image is missing", None, ["/no/disk.img"], 1, "/no/disk.img: cannot open"),
    ("port out of range", None, ["-p", "70000", "{img}"], 2, "port out of range: 70000"),
    ("bad metrics address", None, ["--metrics", "x", "{img}"], 2, "--metrics 'x': expected ADDR:PORT"),
    ("offset not a size", None, ["-o", "abc", "{img}"], 2, "argument -o/--offset: not a size: 'abc'"),
    ("cache size not a size", None, ["--cache-size", "lots", "{img}"], 2, "argument --cache-size: not a size"),
    ("list an absent server", None, ["-L"], 1, "s: No such file or directory"),
    ("selinux label", None, ["--selinux-label", "x", "{img}"], 2, "--selinux-label: nbdserve does not set SELinux"),
]


@pytest.mark.parametrize(("case", "toml", "args", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_error_table(tmp_path: Path, case: str, toml: str | None, args: list[str], status: int, message: str) -> None:
    img = write_sparse_raw(tmp_path / "e.img")
    argv = [a.format(img=img) for a in args]
    if toml is not None:
        cfg = tmp_path / "c.toml"
        cfg.write_text(toml.format(img=img))
        argv = ["--config", str(cfg), *argv]
    line = one_line_failure(tmp_path, "-k", tmp_path / "s", *argv, status=status)
    assert message in line, line
    assert not (tmp_path / "s").exists()


def test_cache_writeback_serves(tmp_path: Path) -> None:
    """``--cache=writeback`` ended in a traceback (argparse took it for --cache-size)."""
    img = write_sparse_raw(tmp_path / "w.img")
    with serve(tmp_path, "--cache=writeback", "--aio=threads", "--discard=unmap", "-f", "raw", img) as srv:
        assert int(run("nbdinfo", "--size", srv.uri).stdout) == SIZE


def test_sigusr1_and_sighup_do_not_kill(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "s.img")
    with serve(tmp_path, "-f", "raw", img) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR1):
            os.kill(srv.pid, sig)
            assert h.pread(512, 0) == b"\x11" * 512  # answered after the signal was handled
        h.shutdown()
        assert srv.alive()
    assert "statistics: export ''" in srv.log_text()


def _readiness(tmp: Path, *args: str | os.PathLike) -> tuple[int, list[bytes], str]:
    """Run nbdserve in the foreground until it is READY (then SIGTERM) or exits: (status, the
    messages it sent to NOTIFY_SOCKET, stderr)."""
    path = tmp / "notify.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(60)
        proc = subprocess.Popen(
            [*NBDSERVE, "-k", str(tmp / "r.sock"), *map(str, args)],
            env={**TOOL_ENV, "NOTIFY_SOCKET": str(path)},
            stderr=subprocess.PIPE,
            text=True,
        )
        messages: list[bytes] = []
        exited = os.pidfd_open(proc.pid)
        try:
            while True:  # until it exits: a message, or its exit, whichever comes first
                ready, _, _ = select.select([notify, exited], [], [], 60)
                if notify in ready:
                    messages.append(notify.recv(4096))
                    if b"READY=1" in messages[-1]:
                        proc.send_signal(signal.SIGTERM)
                elif exited in ready:
                    break
                else:
                    raise AssertionError("no message and no exit within 60 s")
            _, err = proc.communicate(timeout=60)
            notify.setblocking(False)
            while True:  # whatever it sent just before exiting
                try:
                    messages.append(notify.recv(4096))
                except BlockingIOError:
                    break
        finally:
            os.close(exited)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, messages, err


def test_ready_only_when_an_export_serves(tmp_path: Path) -> None:
    good = write_sparse_raw(tmp_path / "g.img")
    bad = ["--export", "x=/nonexistent/x.img", "--export", "y=/nonexistent/y.img"]
    status, messages, err = _readiness(tmp_path, *bad)
    assert status == 1 and not any(b"READY=1" in m for m in messages), messages
    assert "no export could be opened" in err.splitlines()[-1]
    status, messages, _ = _readiness(tmp_path, *bad, "--export", f"g={good},format=raw")
    assert status == 0 and any(b"READY=1" in m for m in messages)
    assert any(b"STATUS=serving 1 of 3 exports" in m for m in messages), messages
    cfg = tmp_path / "all.toml"
    cfg.write_text('[server]\nrequire-exports = "all"\n')
    status, messages, err = _readiness(tmp_path, "--config", cfg, *bad, "--export", f"g={good},format=raw")
    assert status == 1 and not any(b"READY=1" in m for m in messages)
    assert "2 of 3 exports failed to open (require-exports = all)" in err.splitlines()[-1]


def test_watchdog_is_fed(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "wd.img")
    path = tmp_path / "wd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(60)
        env = {**TOOL_ENV, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        proc = subprocess.Popen([*NBDSERVE, "-k", tmp_path / "s", "-f", "raw", img], env=env)
        try:
            seen = [notify.recv(4096) for _ in range(6)]
            assert sum(m == b"WATCHDOG=1" for m in seen) >= 3, seen
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0


def test_printed_uris_are_percent_encoded(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "u.img")
    sock = tmp_path / "a b#c.sock"
    p = run(*NBDSERVE, "-k", sock, "-x", "disk one/ü?", "--run", 'nbdinfo --size "$uri"', "-f", "raw", img)
    uri = p.stderr.splitlines()[0].split("serving ", 1)[1]
    assert uri == f"nbd+unix:///disk%20one/%C3%BC%3F?socket={str(sock).replace(' ', '%20').replace('#', '%23')}"
    assert int(p.stdout) == SIZE  # libnbd took the same URI (as $uri) and reached the export
