"""nbdserve as a qemu-nbd drop-in: every option of ``qemu-nbd --help`` (the table
``nbdserve.cli.QEMU_NBD_OPTIONS``, shown to readers as docs/qemu-nbd.md) run once, qemu-nbd's
-t/-e/exit behaviour next to the real qemu-nbd's, and the command lines scripts use, unchanged.

nbdserve runs "the qemu-nbd way" as ``python -m nbdserve.qemu_nbd`` (what the
``nbdserve-qemu-nbd`` command and a ``qemu-nbd`` link run).  The kernel's NBD driver is not
available here: ``-c``/``-d`` are run for real in ``tests/e2e/test_vm_connect.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from nbdserve.cli import QEMU_NBD_OPTIONS, build_parser
from tests.interop.conftest import SIZE, MiB, expected_bytes, seek_data_ranges, write_sparse_raw
from tests.tlscerts import ALICE_DN, Pki
from tests.util import (
    NBDSERVE,
    QEMU_NBD_WAY,
    REPO,
    TOOL_ENV,
    Served,
    free_port,
    qemu_img,
    read_pid,
    run,
    serve,
    wait_pid_exit,
)

QEMU_NBD = shutil.which("qemu-nbd")


def qway(tmp: Path, *args: str | os.PathLike, tcp: bool = False, export: str = ""):
    """nbdserve the qemu-nbd way, forked, on a Unix socket (or TCP), yielding once it serves."""
    return serve(tmp, *args, tcp=tcp, export=export, module="nbdserve.qemu_nbd")


def fails(*args: str | os.PathLike, way: list[str] = QEMU_NBD_WAY, status: int = 1) -> str:
    """Run and expect a one-line error with ``status``; returns the line."""
    p = run(*way, *args, check=False, timeout=60)
    assert p.returncode == status, (p.returncode, p.stdout, p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


@contextlib.contextmanager
def strace_server(tmp: Path, *args: str | os.PathLike, calls: str) -> Iterator[tuple[Served, Path]]:
    """nbdserve in the foreground under ``strace -f -e trace=CALLS`` (ready once it sends READY=1
    to our NOTIFY_SOCKET); yields (server, trace file); stops it after."""
    sock, trace, pidfile, notify_path = tmp / "st.sock", tmp / "strace.out", tmp / "st.pid", tmp / "notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    argv = ["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(trace), *NBDSERVE, "--pid-file", str(pidfile)]
    argv += ["--log", str(tmp / "st.log"), "-k", str(sock), *map(str, args)]
    proc = subprocess.Popen(argv, env={**TOOL_ENV, "NOTIFY_SOCKET": str(notify_path)}, stderr=subprocess.DEVNULL)
    try:
        assert b"READY=1" in notify.recv(4096)
        srv = Served(sock, read_pid(pidfile), tmp / "st.log")
        yield srv, trace
        srv.stop()
        assert proc.wait(60) == 0
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def count_calls(trace: Path, name: str) -> int:
    return sum(1 for line in trace.read_text().splitlines() if re.search(rf"\b{name}\(", line))


# -- the table against qemu-nbd's own --help ------------------------------------------------------


def _help_options(text: str) -> set[str]:
    opts = set()
    for line in text.splitlines():
        m = re.match(r"\s+(-\w)?,?\s*(--[\w-]+)", line)
        if m:
            opts |= {o for o in m.groups() if o}
    return opts


@pytest.mark.skipif(QEMU_NBD is None, reason="qemu-nbd not installed")
def test_the_table_lists_every_option_of_qemu_nbd_help() -> None:
    listed = _help_options(run("qemu-nbd", "--help").stdout)
    assert len(listed) > 30, listed
    table = {f for o in QEMU_NBD_OPTIONS for f in o.flags}
    assert listed - table == set()


def doc_row(o) -> str:
    """One row of docs/qemu-nbd.md's table, as the code's table gives it."""
    flags = ", ".join(f"`{f}`" for f in o.flags)
    meaning = o.meaning.replace("|", "\\|")
    return f"| {flags} | {o.status} | {meaning} | `test_option[{o.flags[-1]}]` |"


def test_the_documented_table_is_the_code_table() -> None:
    text = (REPO / "docs" / "qemu-nbd.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [doc_row(o) for o in QEMU_NBD_OPTIONS]


def test_every_table_option_is_parsed_and_has_a_test() -> None:
    parser = build_parser(qemu_nbd=True)
    for o in QEMU_NBD_OPTIONS:
        for flag in o.flags:
            assert flag in parser._option_string_actions, flag
        assert o.flags[-1] in ROW_TESTS, f"no test for {o.flags}"
    assert set(ROW_TESTS) == {o.flags[-1] for o in QEMU_NBD_OPTIONS}


# -- one test per row ------------------------------------------------------------------------------

ROW_TESTS: dict[str, Callable[..., None]] = {}


def row(flag: str):
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        ROW_TESTS[flag] = fn
        return fn

    return register


@pytest.mark.parametrize("option", QEMU_NBD_OPTIONS, ids=lambda o: o.flags[-1])
def test_option(option, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if option.status == "refused":
        assert option.meaning
    fn = ROW_TESTS[option.flags[-1]]
    fn(tmp_path, request.getfixturevalue("pki")) if fn.__code__.co_argcount == 2 else fn(tmp_path)


@row("--help")
def _help(tmp: Path) -> None:
    out = run(*QEMU_NBD_WAY, "--help").stdout
    assert "--cache" in out and "--detect-zeroes" in out and out.startswith("usage: qemu-nbd")


@row("--version")
def _version(tmp: Path) -> None:
    assert run(*QEMU_NBD_WAY, "-V").stdout.startswith("nbdserve ")


@row("--port")
def _port(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "p.img")
    with qway(tmp, "-f", "raw", "-t", img, tcp=True) as srv:  # -b and -p given by serve()
        assert int(run("nbdinfo", "--size", f"nbd://127.0.0.1:{srv.port}/").stdout) == SIZE


@row("--bind")
def _bind(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "b.img")
    port = free_port()
    p = run(*QEMU_NBD_WAY, "--fork", "--pid-file", tmp / "b.pid", "-t", "-p", port, "-f", "raw", img)
    srv = Served(Path(), read_pid(tmp / "b.pid"), tmp / "none.log")
    try:  # the qemu-nbd way binds 0.0.0.0 by default (connect through loopback here)
        assert p.returncode == 0
        listening = run("ss", "-Hltn", f"sport = :{port}", check=False).stdout
        assert "0.0.0.0" in listening or shutil.which("ss") is None, listening
        assert int(run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/").stdout) == SIZE
    finally:
        srv.stop()


@row("--socket")
def _socket(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "k.img")
    with qway(tmp, "-f", "raw", "-t", img) as srv:
        assert srv.sock.is_socket()
        assert int(run("nbdinfo", "--size", srv.uri).stdout) == SIZE


def _wait_for_slot(tmp: Path, server_cmd: list[str]) -> None:
    """``-t -e 1``: a second client is not refused: it waits until the first has left."""
    img = write_sparse_raw(tmp / "e.img")
    sock = tmp / "e.sock"
    cmd = [*server_cmd, "--fork", "--pid-file", str(tmp / "e.pid"), "-t", "-e", "1", "-k", str(sock)]
    run(*cmd, "-f", "raw", img)
    pid = read_pid(tmp / "e.pid")
    try:
        first = connect(f"nbd+unix:///?socket={sock}")
        second = socket.socket(socket.AF_UNIX)
        second.settimeout(60)
        second.connect(str(sock))  # queued by the kernel: the server does not accept it yet
        assert first.pread(4096, 0) == b"\x11" * 4096
        first.shutdown()
        greeting = second.recv(8)  # sent once the first client has gone
        assert greeting == b"NBDMAGIC", greeting
        second.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_pid_exit(pid)


@row("--shared")
def _shared(tmp: Path) -> None:
    _wait_for_slot(tmp, QEMU_NBD_WAY)


@pytest.mark.skipif(QEMU_NBD is None, reason="qemu-nbd not installed")
def test_shared_wait_matches_qemu_nbd(tmp_path: Path) -> None:
    _wait_for_slot(tmp_path, ["qemu-nbd"])


def test_shared_refuses_in_nbdserve_mode(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "r.img")
    with serve(tmp_path, "-e", "1", "-f", "raw", img) as srv:
        first = connect(srv.uri)
        with pytest.raises(nbd.Error):
            connect(srv.uri)
        first.shutdown()


def _exits_after_last_client(tmp: Path, server_cmd: list[str], persistent: bool) -> bool:
    """Serve (qemu-nbd's defaults), let one client read and leave; True if the server exited."""
    img = write_sparse_raw(tmp / "t.img")
    sock = tmp / f"t{persistent}.sock"
    cmd = [*server_cmd, "--fork", "--pid-file", str(tmp / "t.pid"), "-k", str(sock), "-f", "raw"]
    run(*cmd, *(["-t"] if persistent else []), img)
    pid = read_pid(tmp / "t.pid")
    try:
        # A listing client does not count (it never reaches transmission) ...
        run("nbdinfo", "--list", f"nbd+unix:///?socket={sock}")
        h = connect(f"nbd+unix:///?socket={sock}")
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()
        del h
        if persistent:
            h = connect(f"nbd+unix:///?socket={sock}")  # ... and a persistent server takes another
            h.shutdown()
            return not os.path.exists(f"/proc/{pid}")
        return wait_pid_exit(pid, 30)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGTERM)
            wait_pid_exit(pid)


@row("--persistent")
def _persistent(tmp: Path) -> None:
    assert _exits_after_last_client(tmp, QEMU_NBD_WAY, persistent=False)
    assert not _exits_after_last_client(tmp, QEMU_NBD_WAY, persistent=True)


@pytest.mark.skipif(QEMU_NBD is None, reason="qemu-nbd not installed")
def test_exit_after_last_client_matches_qemu_nbd(tmp_path: Path) -> None:
    assert _exits_after_last_client(tmp_path, ["qemu-nbd"], persistent=False)
    assert not _exits_after_last_client(tmp_path, ["qemu-nbd"], persistent=True)


@row("--verbose")
def _verbose(tmp: Path) -> None:
    one, two = write_sparse_raw(tmp / "v1.img"), write_sparse_raw(tmp / "v2.img")
    with qway(tmp, "-t", "-f", "raw", one) as quiet, qway(tmp, "-v", "-t", "-f", "raw", two) as loud:
        for srv in (quiet, loud):
            connect(srv.uri).shutdown()
        srv.stop()
        assert "serving export" not in quiet.log_text()
        assert "serving export ''" in loud.log_text()


@row("--export-name")
def _export_name(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "x.img")
    with qway(tmp, "-t", "-x", "disk one", "-f", "raw", img, export="disk%20one") as srv:
        listed = json.loads(run("nbdinfo", "--list", "--json", srv.uri).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["disk one"]


@row("--description")
def _description(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "d.img")
    with qway(tmp, "-t", "-D", "the disk", "-f", "raw", img) as srv:
        listed = json.loads(run("nbdinfo", "--list", "--json", srv.uri).stdout)
        assert listed["exports"][0]["description"] == "the disk"


@row("--offset")
def _offset(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "o.img")
    with qway(tmp, "-t", "-o", str(1 * MiB), "-f", "raw", img) as srv:
        h = connect(srv.uri)
        assert h.get_size() == SIZE - MiB
        assert h.pread(4096, 0) == b"\x5a" * 4096  # the image's byte 1 MiB
        h.pwrite(b"\x99" * 1000, 7)
        h.flush()
        h.shutdown()
    assert img.read_bytes()[MiB + 7 : MiB + 1007] == b"\x99" * 1000
    assert "beyond the end" in fails("-o", str(2 * SIZE), "-f", "raw", img)


@row("--allocation-depth")
def _allocation_depth(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "a.img")
    with qway(tmp, "-t", "-A", "-f", "raw", img) as srv:
        assert "qemu:allocation-depth" in run("nbdinfo", "--list", srv.uri).stdout


@row("--bitmap")
def _bitmap(tmp: Path) -> None:
    img = tmp / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_img("bitmap", "--add", img, "b0")
    with qway(tmp, "-t", "-B", "b0", "-f", "qcow2", img) as srv:
        assert "qemu:dirty-bitmap:b0" in run("nbdinfo", "--list", srv.uri).stdout


def _listing(text: str) -> list[tuple[str, str]]:
    """(export, size) pairs from -L output."""
    return re.findall(r"export: '([^']*)'\n(?:  description: .*\n)?  size:\s+(\d+)", text)


@row("--list")
def _list(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "l.img")
    small = write_sparse_raw(tmp / "s.img", size=MiB, runs=())
    with serve(tmp, "--export", f"a={img},format=raw", "--export", f"b={small},format=raw,readonly") as srv:
        ours = run(*QEMU_NBD_WAY, "-L", "-k", srv.sock).stdout
        assert ours.startswith("exports available: 2\n"), ours
        assert _listing(ours) == [("a", str(SIZE)), ("b", str(MiB))]
        assert "readonly" in ours.split("export: 'b'")[1] and "base:allocation" in ours
        if QEMU_NBD:
            theirs = run("qemu-nbd", "-L", "-k", srv.sock).stdout
            assert _listing(theirs) == _listing(ours)
    assert "cannot connect" in fails("-L", "-k", tmp / "nothing.sock")


@row("--object")
def _object(tmp: Path) -> None:
    assert "unsupported object type" in fails("--object", "memory-backend-ram,id=m", "-f", "raw", "x")


@row("--tls-creds")
def _tls_creds(tmp: Path, pki: Pki) -> None:
    img = write_sparse_raw(tmp / "t.img")
    obj = f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server},verify-peer=off"
    with qway(tmp, "-t", "--object", obj, "--tls-creds", "tls0", "-f", "raw", img) as srv:
        with pytest.raises(nbd.Error):
            connect(srv.uri)  # plaintext is refused
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.alice))
        h.connect_uri(srv.uri.replace("nbd+unix", "nbds+unix"))
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()


@row("--tls-authz")
def _tls_authz(tmp: Path, pki: Pki) -> None:
    img = write_sparse_raw(tmp / "z.img")
    args = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server}", "--tls-creds", "tls0"]
    args += ["--object", f"authz-simple,id=a0,identity={ALICE_DN.replace(',', ',,')}", "--tls-authz", "a0"]
    with qway(tmp, "-t", *args, "-f", "raw", img) as srv:
        for who, ok in ((pki.alice, True), (pki.mallory, False)):
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(str(who))
            uri = srv.uri.replace("nbd+unix", "nbds+unix")
            if ok:
                h.connect_uri(uri)
                h.shutdown()
            else:
                with pytest.raises(nbd.Error):
                    h.connect_uri(uri)


@row("--tls-hostname")
def _tls_hostname(tmp: Path, pki: Pki) -> None:
    img = write_sparse_raw(tmp / "h.img")
    obj = f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server},verify-peer=off"
    with qway(tmp, "-t", "--object", obj, "--tls-creds", "tls0", "-f", "raw", img) as srv:
        client = ["--object", f"tls-creds-x509,id=c0,endpoint=client,dir={pki.alice}", "--tls-creds", "c0"]
        out = run(*QEMU_NBD_WAY, "-L", "-k", srv.sock, *client, "--tls-hostname", "localhost").stdout
        assert _listing(out) == [("", str(SIZE))]
        assert "TLS handshake failed" in fails("-L", "-k", srv.sock, *client, "--tls-hostname", "elsewhere")
    assert "--tls-hostname" in fails("--tls-hostname", "x", "-f", "raw", img)


@row("--trace")
def _trace(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "tr.img")
    with qway(tmp, "-t", "-T", "*serving export*", "-f", "raw", img) as srv:
        connect(srv.uri).shutdown()
        srv.stop()
        assert "serving export ''" in srv.log_text()  # an info message, shown by the pattern


@row("--fork")
def _fork(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "f.img")
    sock = tmp / "f.sock"
    p = subprocess.run(  # through pipes: they must be let go of once the server is up
        [*QEMU_NBD_WAY, "--fork", "-t", "--pid-file", str(tmp / "f.pid"), "-k", str(sock), "-f", "raw", str(img)],
        capture_output=True,
        env=TOOL_ENV,
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout == b"", p
    Served(sock, read_pid(tmp / "f.pid"), tmp / "none").stop()


@row("--pid-file")
def _pid_file(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "pf.img")
    with qway(tmp, "-t", "-f", "raw", img) as srv:
        assert os.path.exists(f"/proc/{srv.pid}")
        assert f"/proc/{srv.pid}/cmdline" and "nbdserve" in Path(f"/proc/{srv.pid}/cmdline").read_text()


@row("--selinux-label")
def _selinux(tmp: Path) -> None:
    line = fails("--selinux-label", "system_u:object_r:svirt_image_t:s0", "-f", "raw", "x.img")
    assert "SELinux" in line


@row("--connect")
def _connect(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "c.img")
    line = fails("-c", tmp / "disk0", "-f", "raw", img)  # not an NBD device (the real one: VM test)
    assert "not an NBD device" in line
    if not os.path.exists("/dev/nbd0"):
        assert "/dev/nbd0" in fails("-c", "/dev/nbd0", "-f", "raw", img)


@row("--disconnect")
def _disconnect(tmp: Path) -> None:
    assert "cannot open" in fails("-d", tmp / "nbd9")
    assert "DEVICE" in fails("-d")


@row("--format")
def _format(tmp: Path) -> None:
    img = tmp / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    with qway(tmp, "-t", "-f", "raw", img) as srv:  # the qcow2 file itself, as raw bytes
        assert connect(srv.uri).pread(4, 0) == b"QFI\xfb"
    with qway(tmp, "-t", "-f", "qcow2", img) as srv:
        assert connect(srv.uri).get_size() == 4 * MiB


@row("--read-only")
def _read_only(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "r.img")
    with qway(tmp, "-t", "-r", "-f", "raw", img) as srv:
        h = connect(srv.uri)
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x", 0)


@row("--snapshot")
def _snapshot(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "s.img")
    with qway(tmp, "-t", "-s", "-f", "raw", img) as srv:
        h = connect(srv.uri)
        h.pwrite(b"\x77" * 4096, 0)
        assert h.pread(4096, 0) == b"\x77" * 4096
        h.shutdown()
    assert img.read_bytes() == expected_bytes()


@row("--load-snapshot")
def _load_snapshot(tmp: Path) -> None:
    img = tmp / "ls.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 4k", img)
    qemu_img("snapshot", "-c", "snap1", img)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x43 0 4k", img)
    for spec in ("snap1", "snapshot.name=snap1", "snapshot.id=1"):
        with qway(tmp, "-t", "-l", spec, "-f", "qcow2", img) as srv:
            h = connect(srv.uri)
            assert h.is_read_only() and h.pread(4096, 0) == b"\x42" * 4096


def _fd_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every descriptor of process ``pid`` on ``path``."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                out.append(int(re.search(r"flags:\s+(\d+)", info).group(1), 8))
        except OSError:
            continue
    return out


@row("--nocache")
def _nocache(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "n.img")
    with qway(tmp, "-t", "-n", "-f", "raw", img) as srv:
        flags = _fd_flags(srv.pid, img)
        assert any(f & os.O_DIRECT for f in flags), flags
        h = connect(srv.uri)
        h.pwrite(b"\x31" * 5000, 4095)
        h.flush()
        assert h.pread(8192, 0) == b"\x11" * 4095 + b"\x31" * 4097
        h.shutdown()
    assert img.read_bytes()[4095:9095] == b"\x31" * 5000


@row("--cache")
def _cache(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "c.img")
    writes = 8
    syncs = {}
    for mode in ("writeback", "writethrough", "unsafe", "directsync"):
        with strace_server(tmp, f"--cache={mode}", "-f", "raw", img, calls="fdatasync,fsync") as (srv, trace):
            h = connect(srv.uri_for(""))
            for i in range(writes):
                h.pwrite(bytes([i]) * 4096, i * 4096)
            before = count_calls(trace, "fdatasync") + count_calls(trace, "fsync")
            h.flush()
            after = count_calls(trace, "fdatasync") + count_calls(trace, "fsync")
            h.shutdown()
        syncs[mode] = (before, after - before)
    assert syncs["writeback"][0] == 0 and syncs["writeback"][1] >= 1  # durable at FLUSH
    assert syncs["writethrough"][0] >= writes  # every write durable before its reply
    assert syncs["directsync"][0] >= writes
    assert syncs["unsafe"] == (0, 0)  # FLUSH does nothing
    assert "--cache" in fails("--cache=bogus", "x")


@row("--aio")
def _aio(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "aio.img")
    for args in (["--aio=native", "--cache=none"], ["--aio=io_uring"], ["--aio=threads"]):
        with qway(tmp, "-t", *args, "-f", "raw", img) as srv:
            assert connect(srv.uri).pread(4096, 0) == b"\x11" * 4096
    assert "aio=native needs cache=none" in fails("--aio=native", "-f", "raw", img)


@row("--discard")
def _discard(tmp: Path) -> None:
    for mode, hole in (("ignore", False), ("unmap", True)):
        img = write_sparse_raw(tmp / f"{mode}.img")
        with qway(tmp, "-t", f"--discard={mode}", "-f", "raw", img) as srv:
            h = connect(srv.uri)
            assert h.can_trim()
            h.trim(128 << 10, MiB)
            h.flush()
            h.shutdown()
        trimmed = not any(s < MiB + (128 << 10) and e > MiB for s, e in seek_data_ranges(img))
        assert trimmed == hole, (mode, seek_data_ranges(img))


@row("--detect-zeroes")
def _detect_zeroes(tmp: Path) -> None:
    for mode, hole in (("off", False), ("unmap", True)):
        img = write_sparse_raw(tmp / f"dz-{mode}.img")
        with qway(tmp, "-t", f"--detect-zeroes={mode}", "--discard=unmap", "-f", "raw", img) as srv:
            h = connect(srv.uri)
            h.pwrite(bytes(128 << 10), MiB)  # zeroes over the data at 1 MiB
            h.flush()
            assert h.pread(128 << 10, MiB) == bytes(128 << 10)
            h.shutdown()
        punched = not any(s < MiB + (128 << 10) and e > MiB for s, e in seek_data_ranges(img))
        assert punched == hole, (mode, seek_data_ranges(img))
    img = write_sparse_raw(tmp / "dz-on.img")
    for mode, zeroed in (("on", True), ("off", False)):
        with strace_server(
            tmp, f"--detect-zeroes={mode}", "-f", "raw", img, calls="fallocate,pwrite64,pwritev,pwritev2"
        ) as (
            srv,
            trace,
        ):
            h = connect(srv.uri_for(""))
            h.pwrite(bytes(64 << 10), 2 * MiB)  # zero bytes: with detect-zeroes, a zero-range instead
            assert h.pread(64 << 10, 2 * MiB) == bytes(64 << 10)
            h.shutdown()
        writes = sum(count_calls(trace, c) for c in ("pwrite64", "pwritev", "pwritev2"))
        calls = (count_calls(trace, "fallocate"), writes)
        assert calls == ((1, 0) if zeroed else (0, 1)), (mode, trace.read_text())
    assert "discard=unmap" in fails("--detect-zeroes=unmap", "-f", "raw", img)


@row("--image-opts")
def _image_opts(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "io.img")
    with qway(tmp, "-t", "--image-opts", f"driver=raw,file.filename={img}") as srv:
        assert connect(srv.uri).pread(4096, 0) == b"\x11" * 4096
    with qway(tmp, "-t", "--image-opts", f"driver=raw,file.driver=file,file.filename={img},read-only=on") as srv:
        assert connect(srv.uri).is_read_only()
    assert "'bogus' is not supported" in fails("--image-opts", f"driver=raw,file.filename={img},bogus=1")


@row("--handshake-limit")
def _handshake_limit(tmp: Path) -> None:
    img = write_sparse_raw(tmp / "hl.img")
    with qway(tmp, "-t", "--handshake-limit", "1", "-f", "raw", img) as srv:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(str(srv.sock))
        assert s.recv(8) == b"NBDMAGIC"
        while s.recv(4096):  # the server closes the stalled handshake after a second
            pass
        s.close()


# -- command lines written for qemu-nbd, run unchanged --------------------------------------------

SCRIPTED = [
    "-f qcow2 --cache=none --aio=native --discard=unmap --detect-zeroes=unmap -t -e 4 --fork --pid-file {pid} {img}",
    "--fork --persistent --shared=8 --discard=unmap -f qcow2 -x disk --pid-file {pid} {img}",
    "-f qcow2 -r -t --fork --pid-file {pid} -A -x ro {img}",
    "--format=qcow2 --cache=writeback --detect-zeroes=on -t --fork --pid-file={pid} {img}",
    "-n -f qcow2 -e 2 -t --fork --pid-file {pid} --export-name=nocache {img}",
]


@pytest.mark.parametrize("line", SCRIPTED)
def test_scripted_qemu_nbd_command_lines(tmp_path: Path, line: str) -> None:
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    pid, port = tmp_path / "s.pid", free_port()
    argv = [*line.format(pid=pid, img=img).split(), "-b", "127.0.0.1", "-p", str(port)]
    name = argv[argv.index("-x") + 1] if "-x" in argv else ""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--export-name=")), name)
    results = {}
    for server in (["qemu-nbd"], QEMU_NBD_WAY) if QEMU_NBD else (QEMU_NBD_WAY,):
        p = subprocess.run([*server, *argv], capture_output=True, env=TOOL_ENV, timeout=60)
        assert p.returncode == 0, (server, p)
        srv = Served(Path(), read_pid(pid), tmp_path / "none")
        try:
            h = connect(f"nbd://127.0.0.1:{port}/{name}")
            results[server[0]] = (h.get_size(), h.is_read_only(), h.can_trim())
            if not h.is_read_only():
                h.pwrite(b"\x5c" * 4096, 8192)
                h.flush()
                assert h.pread(4096, 8192) == b"\x5c" * 4096
            h.shutdown()
        finally:
            srv.stop()
    assert len(set(results.values())) == 1, results
    qemu_img("check", img)
