"""A real single-node Ceph cluster (mon, one OSD, optionally radosgw) for tests and benchmarks.

Owns ``CephCluster``: everything lives in one directory (config, keyring, mon store, OSD data,
a sparse file holding the OSD's bluestore device, logs, admin sockets) and every daemon listens on
127.0.0.1 only, on ports picked free at start.  Daemons run in the foreground (``-f``) as our
children, each in its own session, and are stopped by PID: SIGTERM, then SIGKILL after a grace
period, in the order radosgw -> OSD -> mon.  No mgr: RBD and S3 do not need one.

Readiness is never a sleep: the mon is ready when ``ceph mon stat`` answers; the OSD is ready when
``rbd pool init`` returns (it writes to the pool, so it returns only once the pool's placement
groups are active); radosgw is ready when its HTTP port answers.  Every wait is bounded, wakes
early when a daemon dies, and fails with the daemons' logs in the message.

Standard library only, so ``bench/`` can use it too.  Run ``python -m tests.cephcluster DIR`` to
bring a cluster up by hand; it prints the config path and the S3 endpoint and runs until Ctrl-C.
Why each setting is there: docs/ceph.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.util import free_port

GiB = 1 << 30
POOL = "rbd"
S3_ACCESS_KEY = "NBDSERVETESTACCESS01"
S3_SECRET_KEY = "nbdserveTestSecretKey0123456789abcdefghij"
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
# Client-side timeouts for the CLI, so a dead cluster makes a command fail instead of hang.
CLI_TIMEOUT = ["--connect-timeout", "20", "--rados-osd-op-timeout", "20", "--rados-mon-op-timeout", "20"]
RBD_CLI_TIMEOUT = ["--rados-osd-op-timeout", "20", "--rados-mon-op-timeout", "20", "--client-mount-timeout", "20"]
ENV = {**os.environ, "PATH": f"/usr/bin:/usr/sbin:{os.environ.get('PATH', '')}"}


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies, so a killed
    test run leaves no daemons behind."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ClusterError(RuntimeError):
    """The cluster failed to start or a command failed; the message carries the daemons' logs."""


@dataclass
class Daemon:
    """One daemon we started: its argv, process and log file."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=ENV,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
        """Signal the daemon and reap it; SIGKILL if it outlives ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        self.proc = None

    def tail(self, lines: int = 25) -> str:
        """The last lines of the daemon's own log file and its captured output."""
        out = []
        for path in (self.log.with_suffix(".log"), self.log):
            if path.exists() and path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out)


@dataclass
class CephCluster:
    """A single-node cluster in ``workdir``.  ``start()`` brings it up, ``stop()`` takes it down.

    ``rgw``: also run radosgw with one S3 user (``S3_ACCESS_KEY``/``S3_SECRET_KEY``).
    ``osd_size``: size of the sparse file under the OSD (only what is written takes disk space).
    """

    workdir: Path
    rgw: bool = True
    osd_size: int = 16 * GiB
    mon_port: int = 0
    rgw_port: int = 0
    daemons: dict[str, Daemon] = field(default_factory=dict)
    osd_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def conf(self) -> Path:
        return self.workdir / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.workdir / "keyring"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    # -- bring-up -----------------------------------------------------------------------------

    def start(self) -> CephCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        w = self.workdir
        for d in ("mon.a", "osd.0", "run", "log", "crash", "rgw.x"):
            (w / d).mkdir(parents=True, exist_ok=True)
        self.mon_port = self.mon_port or free_port()
        self.rgw_port = self.rgw_port or free_port()
        self.conf.write_text(self._config())
        self._keyring()
        monmap = w / "monmap"
        self._tool(
            "monmaptool",
            "--create",
            "--clobber",
            "--fsid",
            self._fsid,
            "--addv",
            "a",
            f"[v2:127.0.0.1:{self.mon_port}]",
            str(monmap),
        )
        self._tool(
            "ceph-mon",
            "-c",
            str(self.conf),
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            str(monmap),
            "--keyring",
            str(self.keyring),
        )
        self._daemon("mon.a", "ceph-mon", "-i", "a")
        self.ceph("mon", "stat")
        self.ceph("osd", "new", self.osd_uuid, "0")
        self._tool("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid)
        self._daemon("osd.0", "ceph-osd", "-i", "0")
        if self.rgw:
            # radosgw creates its own pools at start; it and the user creation need the OSD only
            # for writes, which wait for the PGs, so they start right away.
            self._daemon("rgw.x", "radosgw", "-n", "client.rgw.x")
        self.ceph("osd", "pool", "create", POOL, "8", "8")
        self.rbd("pool", "init", POOL)
        if self.rgw:
            self.radosgw_admin(
                "user",
                "create",
                "--uid=test",
                "--display-name=test",
                f"--access-key={S3_ACCESS_KEY}",
                f"--secret-key={S3_SECRET_KEY}",
            )
            self._wait_http(self.rgw_port, "rgw.x")

    @property
    def _fsid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, str(self.workdir)))

    def _config(self) -> str:
        w = self.workdir
        return f"""[global]
fsid = {self._fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {self.keyring}
run dir = {w}/run
admin socket = {w}/run/$name.$pid.$cctid.asok
log file = {w}/log/$name.log
crash dir = {w}/crash
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.1
rbd default features = 61
# Clients re-ask the mon for a newer OSD map on this tick (default 5 s), and after an op has had
# no answer for objecter timeout (default 10 s): an op sent to an OSD that was not up yet (at
# start) or had died (before a restart) otherwise waits that long after the OSD is back.
objecter tick interval = 0.2
objecter timeout = 1
# A dead client's watch (and so its RBD exclusive lock) expires after this many seconds.
osd client watch timeout = 5

[mon]
mon data = {w}/mon.$id

[osd]
osd data = {w}/osd.$id
osd objectstore = bluestore
bluestore block path = {w}/osd.$id.block
bluestore block create = true
bluestore block size = {self.osd_size}
bdev aio poll ms = 10
osd memory target = {1 * GiB}
osd fast shutdown notify mon = false
# Read leases: with one OSD a lost lease renewal leaves a PG "laggy" and every op on it stuck
# until the OSD restarts (a Ceph bug).  A lease far longer than any test session avoids it.
osd pool default read lease ratio = 180

[client.rgw.x]
rgw data = {w}/rgw.x
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
rgw enable gc threads = false
rgw enable lc threads = false
rgw enable quota threads = false
rgw dns name = localhost
"""

    def _keyring(self) -> None:
        entities = {
            "mon.": ["mon", "allow *"],
            "client.admin": ["mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"],
            "osd.0": ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"],
            "client.rgw.x": ["mon", "allow rw", "osd", "allow rwx"],
        }
        first = True
        for name, caps in entities.items():
            argv = ["ceph-authtool", str(self.keyring), "--gen-key", "-n", name]
            if first:
                argv.insert(2, "--create-keyring")
                first = False
            for kind, cap in zip(caps[::2], caps[1::2], strict=True):
                argv += ["--cap", kind, cap]
            self._tool(*argv)

    # -- running commands ----------------------------------------------------------------------

    def _tool(self, *argv: str, timeout: float = START_TIMEOUT) -> str:
        """Run a command, waking early if a daemon dies; raise ClusterError with logs on failure."""
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) as p:
            deadline = time.monotonic() + timeout
            pidfd = os.pidfd_open(p.pid)
            try:
                while True:
                    watched = {d.name: os.pidfd_open(d.proc.pid) for d in self.daemons.values() if d.alive()}
                    try:
                        ready, _, _ = select.select(
                            [pidfd, *watched.values()], [], [], max(0.0, deadline - time.monotonic())
                        )
                    finally:
                        for fd in watched.values():
                            os.close(fd)
                    if pidfd in ready:
                        break
                    dead = [d.name for d in self.daemons.values() if not d.alive()]
                    if dead or not ready:
                        p.kill()
                        why = f"{', '.join(dead)} died" if dead else f"no answer in {timeout:.0f} s"
                        raise ClusterError(f"{' '.join(argv)}: {why}\n{self.logs()}")
            finally:
                os.close(pidfd)
            out, err = p.communicate()
        if p.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {p.returncode}: {err.strip()}\n{self.logs()}")
        return out

    def ceph(self, *args: str, timeout: float = START_TIMEOUT) -> str:
        return self._tool("ceph", "-c", str(self.conf), *CLI_TIMEOUT, *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = START_TIMEOUT) -> str:
        return self._tool("rbd", "-c", str(self.conf), *RBD_CLI_TIMEOUT, *args, timeout=timeout)

    def radosgw_admin(self, *args: str, timeout: float = START_TIMEOUT) -> str:
        return self._tool("radosgw-admin", "-c", str(self.conf), *RBD_CLI_TIMEOUT, *args, timeout=timeout)

    def _daemon(self, name: str, exe: str, *args: str) -> Daemon:
        d = Daemon(name, [exe, "-f", "-c", str(self.conf), *args], self.workdir / "log" / f"{name}.out")
        self.daemons[name] = d
        d.start()
        return d

    def _wait_http(self, port: int, name: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``port`` accepts a connection and answers an HTTP request."""
        deadline = time.monotonic() + timeout
        daemon = self.daemons[name]
        pidfd = os.pidfd_open(daemon.proc.pid)
        try:
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
                    s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/"):
                        return
                left = deadline - time.monotonic()
                # The pidfd turns readable if the daemon dies; otherwise this is the retry interval.
                if select.select([pidfd], [], [], min(0.05, max(left, 0)))[0] or left <= 0:
                    why = "died" if not daemon.alive() else f"not answering on port {port} after {timeout:.0f} s"
                    raise ClusterError(f"{name} {why}\n{self.logs()}")
        finally:
            os.close(pidfd)

    # -- OSD outages (for the outage tests) ----------------------------------------------------

    def stop_osd(self, sig: int = signal.SIGKILL) -> None:
        self.daemons["osd.0"].stop(sig)

    def start_osd(self) -> None:
        """Restart the OSD; returns at once (clients resume when the OSD is back in the map)."""
        self.daemons["osd.0"].start()

    def wait_osd_up(self, timeout: float = START_TIMEOUT) -> None:
        """Return once an I/O to the pool succeeds (the OSD is up and its PGs are active)."""
        self._tool("rados", "-c", str(self.conf), *RBD_CLI_TIMEOUT, "-p", POOL, "stat", "rbd_info", timeout=timeout)

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every daemon (rgw, OSD, mon), SIGTERM then SIGKILL."""
        for name in ("rgw.x", "osd.0", "mon.a"):
            if name in self.daemons:
                self.daemons[name].stop()

    def logs(self) -> str:
        return "\n".join(d.tail() for d in self.daemons.values())


@contextlib.contextmanager
def running_cluster(workdir: Path, **kw) -> Iterator[CephCluster]:
    cluster = CephCluster(workdir, **kw)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    workdir = Path(argv[0] if argv else "ceph-cluster").resolve()
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    t0 = time.monotonic()
    with running_cluster(workdir) as c:
        print(f"up in {time.monotonic() - t0:.1f} s\nconf: {c.conf}\ns3: {c.s3_endpoint}", flush=True)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
