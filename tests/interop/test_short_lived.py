"""nbdkit's short-lived modes (``--run``, ``-U -``, ``--exit-with-parent``, ``--print-uri``), ``--fork``
inside a shell's ``$(...)``, and where logs go (``--log``, ``--log-format``, the journal protocol).

As nbdkit's own tests do it: the server is wrapped around one command and the command's output
and exit status are what is checked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from nbdserve import logsetup
from tests.interop.conftest import SIZE, MiB, write_sparse_raw
from tests.util import NBDSERVE, TOOL_ENV, Served, read_pid, run, wait_pid_exit

SERVE = " ".join(NBDSERVE)


def test_run_nbdinfo_json_uri(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "r.img")
    p = run(*NBDSERVE, "-k", tmp_path / "s", "--run", 'nbdinfo --json "$uri"', "-f", "raw", img)
    info = json.loads(p.stdout)
    assert info["exports"][0]["export-size"] == SIZE


def test_run_sets_nbdkits_variables(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "v.img")
    cmd = 'printf "%s|%s|%s|%s|%s|%s" "$uri" "$nbd" "$port" "$unixsocket" "$exportname" "$tls"'
    sock = tmp_path / "a b.sock"
    out = run(*NBDSERVE, "-k", sock, "-x", "vm one", "--run", cmd, "-f", "raw", img).stdout
    uri, nbd_, port, unixsocket, name, tls = out.split("|")
    assert uri == nbd_ == f"nbd+unix:///vm%20one?socket={str(sock).replace(' ', '%20')}"
    assert (port, unixsocket, name, tls) == ("", str(sock), "vm one", "0")
    out = run(*NBDSERVE, "-b", "127.0.0.1", "-p", "0", "--run", cmd, "-f", "raw", img).stdout
    uri, _, port, unixsocket, name, _ = out.split("|")
    assert uri == f"nbd://127.0.0.1:{port}/" and int(port) > 0 and unixsocket == "" and name == ""


@pytest.mark.parametrize(("command", "status"), [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 128 + 9)])
def test_run_passes_the_exit_status_through(tmp_path: Path, command: str, status: int) -> None:
    img = write_sparse_raw(tmp_path / "x.img")
    p = run(*NBDSERVE, "-k", tmp_path / "s", "--run", command, "-f", "raw", img, check=False)
    assert p.returncode == status, p.stderr


def test_run_data_written_by_the_command_is_on_disk(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "w.img")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(SIZE))
    run(*NBDSERVE, "-k", tmp_path / "s", "--run", f'nbdcopy {src} "$uri"', "-f", "raw", img)
    assert img.read_bytes() == src.read_bytes()


def test_private_unix_socket(tmp_path: Path) -> None:
    """``-U -``: a socket in a fresh private directory, gone afterwards."""
    img = write_sparse_raw(tmp_path / "u.img")
    out = run(*NBDSERVE, "-U", "-", "--run", 'echo "$unixsocket"; nbdinfo --size "$uri"', "-f", "raw", img).stdout
    path, size = out.split()
    assert int(size) == SIZE
    assert Path(path).parent != tmp_path and Path(path).parent.name.startswith("nbdserve-")
    assert not Path(path).exists() and not Path(path).parent.exists()


def test_exit_with_parent(tmp_path: Path) -> None:
    """The parent is killed (no chance to clean up): the server notices, flushes and exits."""
    img = write_sparse_raw(tmp_path / "p.img")
    sock, pidfile, notify_path = tmp_path / "p.sock", tmp_path / "p.pid", tmp_path / "notify"
    parent_code = (
        "import subprocess, sys\n"
        f"subprocess.Popen({[*NBDSERVE, '--exit-with-parent', '--pid-file', str(pidfile)]!r} + sys.argv[1:])\n"
        "sys.stdin.read()\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        parent = subprocess.Popen(
            [sys.executable, "-c", parent_code, "-k", str(sock), "-f", "raw", str(img)],
            stdin=subprocess.PIPE,
            env={**TOOL_ENV, "NOTIFY_SOCKET": str(notify_path)},
        )
        try:
            assert b"READY=1" in notify.recv(4096)  # the server (the parent's child) serves
            server = read_pid(pidfile)
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///?socket={sock}")
            h.pwrite(b"\x44" * 4096, 0)
            h.shutdown()
            parent.kill()
            parent.wait()
            assert wait_pid_exit(server, 30), "the server outlived its parent"
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    assert img.read_bytes()[:4096] == b"\x44" * 4096
    assert not pidfile.exists()


def test_exit_with_parent_refuses_fork(tmp_path: Path) -> None:
    p = run(*NBDSERVE, "--exit-with-parent", "--fork", "-k", tmp_path / "s", "x.img", check=False)
    assert p.returncode == 2 and "--exit-with-parent" in p.stderr and len(p.stderr.splitlines()) == 1


def test_fork_in_command_substitution_returns_at_once(tmp_path: Path) -> None:
    """``out=$(nbdserve --fork --print-uri ...)`` returns as soon as the server serves (the daemon
    lets go of the shell's pipe), with the URI as its output; the server goes on serving."""
    img = write_sparse_raw(tmp_path / "f.img")
    sock, pidfile = tmp_path / "f.sock", tmp_path / "f.pid"
    script = f'out=$({SERVE} --fork --print-uri --pid-file {pidfile} -k {sock} -f raw {img}); echo "rc=$? out=$out"'
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=TOOL_ENV, timeout=60)
    srv = Served(sock, read_pid(pidfile), tmp_path / "none")
    try:
        assert p.stdout.strip() == f"rc=0 out=nbd+unix:///?socket={sock}", p
        assert int(run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}").stdout) == SIZE
    finally:
        srv.stop()


def test_fork_start_up_error_reaches_the_launcher(tmp_path: Path) -> None:
    script = f'out=$({SERVE} --fork -k {tmp_path / "s"} -f raw {tmp_path / "missing.img"} 2>&1); echo "rc=$?|$out"'
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=TOOL_ENV, timeout=60)
    rc, out = p.stdout.strip().split("|", 1)
    assert rc == "rc=1" and "missing.img" in out and len(out.splitlines()) == 1, p.stdout


def test_logs_go_to_a_file_after_fork(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "l.img")
    sock, pidfile, logf = tmp_path / "l.sock", tmp_path / "l.pid", tmp_path / "server.log"
    p = run(*NBDSERVE, "--fork", "--pid-file", pidfile, "--log", logf, "-k", sock, "-f", "raw", img)
    assert p.stdout == p.stderr == ""  # everything went to the file
    srv = Served(sock, read_pid(pidfile), logf)
    try:
        os.kill(srv.pid, signal.SIGUSR1)  # logged after the fork
        run("nbdinfo", "--size", srv.uri)
    finally:
        srv.stop()
    text = logf.read_text()
    assert "serving nbd+unix" in text and "statistics: export ''" in text and "shutting down" not in text


def test_json_log_lines(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "j.img")
    out = run(
        *NBDSERVE, "-v", "--log-format", "json", "-k", tmp_path / "s", "--run", "true", "-f", "raw", img
    ).stderr.splitlines()
    records = [json.loads(line) for line in out]
    assert {"time", "level", "pid", "message"} <= set(records[0])
    assert any(r["level"] == "notice" and r["message"].startswith("serving nbd+unix") for r in records)
    assert all(r["time"].endswith("Z") and "T" in r["time"] for r in records)


def test_text_log_lines_have_time_and_level(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "t.img", size=MiB)
    line = run(*NBDSERVE, "-k", tmp_path / "s", "--run", "true", "-f", "raw", img).stderr.splitlines()[0]
    stamp, who, level, message = line.split(" ", 3)
    assert stamp.endswith("Z") and who.startswith("nbdserve[") and level == "notice:", line
    assert message.startswith("serving nbd+unix:///?socket=")


def test_syslog_lines_carry_daemon_facility_and_level(tmp_path: Path, monkeypatch) -> None:
    """``--log syslog``: one datagram per record to the syslog socket (a socket standing in for
    /dev/log), ``<PRI>nbdserve[PID]: message`` with facility daemon and the record's own level
    (NOTICE is syslog's notice, not warning)."""
    path = tmp_path / "log.sock"
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", str(path))
    log = logsetup.logging.getLogger(logsetup.LOGGER)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        logsetup.setup(logsetup.LogSettings(dest="syslog", level=logsetup.NOTICE))
        try:
            log.log(logsetup.NOTICE, "serving nbd://127.0.0.1/")
            log.error("disk full")
            log.info("not at this level")
            log.warning("last")
            got = [syslog.recv(4096) for _ in range(3)]
        finally:
            logsetup.setup(logsetup.LogSettings(dest="null"))
    daemon = 3 << 3
    pid = os.getpid()
    assert got == [
        f"<{daemon | 5}>nbdserve[{pid}]: serving nbd://127.0.0.1/\x00".encode(),
        f"<{daemon | 3}>nbdserve[{pid}]: disk full\x00".encode(),
        f"<{daemon | 4}>nbdserve[{pid}]: last\x00".encode(),
    ]


def test_journal_native_protocol(tmp_path: Path) -> None:
    """The journal handler's datagrams, read from a socket standing in for the journal's."""
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        handler = logsetup.JournalHandler(str(path))
        handler.setFormatter(logsetup.logging.Formatter("%(message)s"))
        for level, msg in ((logsetup.logging.ERROR, "disk full"), (logsetup.NOTICE, "two\nlines")):
            handler.emit(logsetup.logging.LogRecord("nbdserve", level, __file__, 1, msg, None, None))
        first, second = journal.recv(4096), journal.recv(4096)
        handler.close()
    assert first == b"MESSAGE=disk full\nPRIORITY=3\nSYSLOG_IDENTIFIER=nbdserve\n"
    assert second.startswith(b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\nPRIORITY=5\n")
