"""Shared test helpers: run tools, serve an image with nbdserve / qemu-nbd / nbdkit, wait on sockets.

Readiness is never a sleep: servers are started with ``--fork`` (the parent exits once the socket
listens) and processes are awaited through pidfds.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NBDSERVE = [sys.executable, "-m", "nbdserve"]
QEMU_NBD_WAY = [sys.executable, "-m", "nbdserve.qemu_nbd"]  # nbdserve invoked the qemu-nbd way
# Debian's python (with the libnbd bindings) first on PATH, for nbdsh and friends.
TOOL_ENV = {**os.environ, "PATH": f"/usr/bin:{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}


def run(*cmd: str | os.PathLike, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure the assertion shows stdout and stderr."""
    kw.setdefault("env", TOOL_ENV)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def qemu_img(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(fmt: str, image: str | os.PathLike, *cmds: str) -> subprocess.CompletedProcess:
    argv: list[str | os.PathLike] = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, image)


def wait_pid_exit(pid: int, timeout: float = 30.0) -> bool:
    """Wait for any process (not only a child) to exit; True if it did within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass
class Served:
    """A running server on a Unix socket (or, when ``port`` is set, on 127.0.0.1:port)."""

    sock: Path
    pid: int
    log: Path
    export: str = ""
    port: int = 0

    @property
    def uri(self) -> str:
        return self.uri_for(self.export)

    def uri_for(self, export: str) -> str:
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def tls_uri(self, certs: str | os.PathLike, export: str | None = None) -> str:
        """An nbds:// URI with libnbd's ``tls-certificates`` (the client's credential directory)."""
        export = self.export if export is None else export
        if self.port:
            return f"nbds://127.0.0.1:{self.port}/{export}?tls-certificates={certs}"
        return f"nbds+unix:///{export}?socket={self.sock}&tls-certificates={certs}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        if not wait_pid_exit(self.pid, timeout):
            os.kill(self.pid, signal.SIGKILL)
            wait_pid_exit(self.pid, 10)
            raise AssertionError(f"server {self.pid} did not exit on signal {sig}:\n{self.log_text()}")

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_lines(self, *needles: str) -> list[str]:
        """The log lines that contain every one of ``needles``."""
        return [line for line in self.log_text().splitlines() if all(n in line for n in needles)]

    def wait_logged(self, count: int, *needles: str, witness: Callable[[], object]) -> list[str]:
        """Until ``count`` log lines contain every one of ``needles``; returns them.

        A client can see a refusal before the server has written the line for it (a failed TLS
        handshake is logged a loop iteration or two after the alert leaves), so this round-trips
        ``witness`` (a request on another connection to the same server) between looks, bounded.
        """
        for _ in range(100):
            lines = self.log_lines(*needles)
            if len(lines) >= count:
                return lines
            witness()
        raise AssertionError(f"{needles!r} not logged {count} times:\n{self.log_text()}")


_counter = iter(range(1_000_000))


def _paths(workdir: Path, tag: str) -> tuple[Path, Path, Path]:
    n = next(_counter)
    return workdir / f"{tag}{n}.sock", workdir / f"{tag}{n}.pid", workdir / f"{tag}{n}.log"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a server binding it later may still lose a race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    workdir: Path,
    *args: str | os.PathLike,
    export: str = "",
    check_stop: bool = True,
    tcp: bool = False,
    bind: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    module: str = "nbdserve",
) -> Iterator[Served]:
    """Run ``nbdserve --fork -k SOCK ARGS...`` (``tcp``: on ``bind`` and a free port, retried if
    another process takes the port first); yields once it listens; stops it after.  ``env`` adds
    environment variables; ``python`` is the interpreter to run nbdserve with; ``module``:
    ``nbdserve.qemu_nbd`` runs it the qemu-nbd way."""
    sock, pidfile, log = _paths(workdir, "nbdserve")
    port = 0
    for _attempt in range(3):
        where = ["-b", bind, "-p", str(port := free_port())] if tcp else ["-k", str(sock)]
        log.write_text("")
        # The launcher's output and, once it has detached, the server's log (--log) in one file.
        with open(log, "a") as logf:
            argv = [python, "-m", module, "--fork", "--pid-file", str(pidfile), "--log", str(log), *where]
            p = subprocess.run(
                [*argv, *map(str, args)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**TOOL_ENV, **(env or {})},
                timeout=120,
            )
        if p.returncode == 0 or "Address already in use" not in log.read_text():
            break
    if p.returncode != 0:
        raise AssertionError(f"nbdserve failed to start ({p.returncode}):\n{log.read_text()}")
    srv = Served(sock, read_pid(pidfile), log, export, port)
    try:
        yield srv
    finally:
        if srv.alive():
            srv.stop() if check_stop else srv.stop(signal.SIGKILL)


def start_error(workdir: Path, *args: str | os.PathLike, env: dict[str, str] | None = None) -> str:
    """Start ``nbdserve --fork -k SOCK ARGS...`` expecting it to fail; its one-line error.  (A
    server that starts anyway is stopped and the assertion fails.)  ``env`` adds environment
    variables."""
    _, pidfile, log = _paths(workdir, "refused")
    with open(log, "w") as logf:  # a file, not a pipe: a server that did start would hold a pipe open
        p = subprocess.run(
            [*NBDSERVE, "--fork", "--pid-file", str(pidfile), "-k", str(workdir / "refused.sock"), *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=logf,
            env={**TOOL_ENV, **(env or {})},
            timeout=120,
        )
    text = log.read_text()
    if p.returncode == 0:
        Served(workdir / "refused.sock", read_pid(pidfile), log).stop()
    assert p.returncode != 0, f"nbdserve started: {text}"
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text  # one line, no traceback
    return lines[0]


@contextlib.contextmanager
def qemu_nbd(
    workdir: Path, image: str | os.PathLike, fmt: str | None, *args: str, export: str = ""
) -> Iterator[Served]:
    """The oracle: ``qemu-nbd --fork --persistent -k SOCK``; yields once listening.  ``fmt`` None:
    no ``-f`` (for ``--image-opts``)."""
    sock, pidfile, log = _paths(workdir, "qemu-nbd")
    cmd = ["qemu-nbd", "--fork", "--persistent", "--pid-file", str(pidfile), "-k", str(sock)]
    cmd += ["-f", fmt] if fmt else []
    cmd += ["-x", export, *args, str(image)]
    with open(log, "w") as logf:
        p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"qemu-nbd failed to start:\n{log.read_text()}")
    srv = Served(sock, read_pid(pidfile), log, export)
    try:
        yield srv
    finally:
        srv.stop()


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[dict]:
    """``nbdinfo --map --json``: a list of {offset, length, type, description}."""
    return json.loads(run("nbdinfo", "--json", f"--map={context}", uri).stdout)


def merged_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """The map as (offset, length, type) with adjacent equal types merged."""
    out: list[tuple[int, int, int]] = []
    for e in nbdinfo_map(uri, context):
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def nbd_connect(uri: str):
    """A connected libnbd handle (Python bindings)."""
    import nbd

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def connect_raw_socket(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s
