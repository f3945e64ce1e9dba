#!/usr/bin/env python3
"""Side-by-side benchmark: the same image and the same jobs served by nbdserve, qemu-nbd and nbdkit.

For every format it builds one data image (non-zero data everywhere, so reads hit real clusters,
never holes), gives every server its own copy (writes never touch another server's input) and
starts all the servers at once, each on its own Unix socket.  Each job then runs ``--runs`` times
per server, interleaved (A, B, C, A, B, C, ...), so drift in machine load (fluctuating CPU steal
on a shared VM) hits every server alike; the first run of each server is a warm-up and is
discarded, the rest are averaged.  The servers are stopped before the fresh-image job, which
starts a new server on a new empty image for every run (again interleaved).  The result is a
Markdown table per format: IOPS and MiB/s for each server, plus the ratios nbdserve/qemu-nbd and
nbdserve/nbdkit (of IOPS; the request size is the same, so MiB/s ratios are equal).

Rules: images live on tmpfs (``/dev/shm``) to take
the disk out of the measurement; every number is reported with its request size, connection
count and queue depth; qemu-nbd runs with ``--cache=writeback`` (nbdserve and nbdkit do not
fsync per write either) and ``-e 8`` so multi-connection clients are not refused.

Readiness never sleeps: nbdserve and qemu-nbd are started with ``--fork`` (their parent exits
once the socket listens, after writing the pid file); nbdkit (and nbdserve under ``--profile``)
runs in the foreground as our child and a bounded connect loop waits for its socket, waking early
through a pidfd if it dies.  Every server is stopped with SIGTERM once its jobs are done.

Besides IOPS the report gives the server's CPU time per request (from /proc), which is less
disturbed than IOPS when client and server compete for the same cores.

TLS jobs (``tls-*``) run after the plaintext ones, against the same image copies served again by
every server with X.509 credentials made for the run by ``certtool`` (as ``tests/tlscerts.py``
makes them): nbdserve ``--tls-creds DIR``, qemu-nbd ``--object tls-creds-x509`` and nbdkit
``--tls=require --tls-certificates DIR``, all requiring TLS.

Standard library only.  Run from the repository: ``.venv/bin/python bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PATH": f"/usr/bin:{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
MiB = 1 << 20
ALL_FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi", "luks")
ALL_SERVERS = ("nbdserve", "qemu-nbd", "nbdkit")
# qemu-img create/convert options per format: exact virtual size for VHD (no CHS rounding).
CREATE_OPTS = {"vpc": ["-o", "subformat=dynamic,force_size=on"]}
# Encrypted formats: both servers get the passphrase as a QEMU secret object in a file (KEY_FILE,
# next to the image) and open the image through --image-opts.  (PBKDF cost at open only.)
KEYED = {"luks": "key-secret"}
KEY_FILE = "bench.key"
# Formats that also get the "random write into a fresh (empty) image" job.
FRESH_FORMATS = ("qcow2",)
NBDCOPY_REQUEST = 256 << 10
NBDCOPY_REQUESTS = 64


# nbdserve under cProfile, timed by process CPU time: on a shared machine wall-clock profiles charge
# the time the process spends preempted (typically right after waking the client) to whatever runs.
PROFILE_MAIN = """import cProfile, sys, time
from nbdserve.cli import main
prof = cProfile.Profile(time.process_time)
try:
    rc = prof.runcall(main, sys.argv[2:])
finally:
    prof.dump_stats(sys.argv[1])
sys.exit(rc)
"""


@dataclass(frozen=True)
class Job:
    """One measured workload.  ``kind`` is "fio" (libnbd engine) or "nbdcopy" (copy to null:)."""

    name: str
    kind: str
    rw: str  # fio rw= ("read", "write", "randread", "randwrite"); "read" for nbdcopy
    bs: int  # request size in bytes
    depth: int  # requests in flight per connection
    conns: int = 1  # NBD connections (one fio job each)
    fresh: bool = False  # run against a newly created, empty image (one per run)
    tls: bool = False  # over TLS (the servers require it)

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    def shape(self) -> str:
        size = f"{self.bs // MiB} MiB" if self.bs >= MiB else f"{self.bs >> 10} KiB"
        return f"{size}, {self.conns} conn{'s' if self.conns > 1 else ''} x QD{self.depth}" + ", TLS" * self.tls


JOBS = (
    Job("seq-read", "fio", "read", MiB, 16),
    Job("rand-read", "fio", "randread", 4096, 32),
    Job("rand-read-2conn", "fio", "randread", 4096, 32, conns=2),
    Job("nbdcopy", "nbdcopy", "read", NBDCOPY_REQUEST, NBDCOPY_REQUESTS),
    Job("seq-write", "fio", "write", MiB, 16),
    Job("rand-write", "fio", "randwrite", 4096, 32),
    Job("rand-write-fresh", "fio", "randwrite", 4096, 32, fresh=True),
    Job("tls-seq-read", "fio", "read", MiB, 16, tls=True),
    Job("tls-rand-read", "fio", "randread", 4096, 32, tls=True),
)


@dataclass
class Sample:
    iops: float
    bps: float  # bytes per second
    server_cpu: float  # server CPU seconds (user + system, all threads) while the client ran
    requests: float  # requests served while the server CPU was counted (fio: estimated incl. ramp)
    wall: float  # wall-clock seconds the client command ran

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu / self.requests * 1e6


@dataclass
class Result:
    """All runs of one job on one server; ``kept`` excludes the discarded warm-up run."""

    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    @property
    def kept(self) -> list[Sample]:
        return self.samples[1:] if len(self.samples) > 1 else self.samples

    def mean(self, attr: str) -> float | None:
        """Mean of a ``Sample`` attribute over the kept runs (None without samples)."""
        vals = [getattr(s, attr) for s in self.kept]
        return statistics.fmean(vals) if vals else None


@dataclass
class Config:
    formats: list[str]
    servers: list[str]
    jobs: list[Job]
    runtime: float
    ramp: float
    runs: int
    size: int
    workdir: Path
    verbose: bool
    sockdir: Path  # short path for Unix sockets (sun_path holds ~107 bytes)
    profile: Path | None = None  # nbdserve runs under cProfile, one .prof file per server start
    tls_dir: Path | None = None  # server credentials for the TLS jobs (made when one is selected)


# ---------------------------------------------------------------------------------------------
# Processes


def first_line(e: BaseException) -> str:
    """An error's first line (its type name when it has no text), for the report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run(cmd: list[str], *, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command and capture its output; raise with stdout and stderr when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for any process (not only a child) to exit; True if it did within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    # After the ")" of comm: fields[0] is state (field 3), utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Running:
    """A server listening on ``sock``; ``child`` is set when we own the process directly."""

    name: str
    sock: Path
    pid: int
    log: Path
    child: subprocess.Popen | None = None
    tls: bool = False

    @property
    def uri(self) -> str:
        # libnbd does not check the server's certificate on a Unix socket (no host name to check)
        return (
            f"nbds+unix:///?socket={self.sock}&tls-verify-peer=false"
            if self.tls
            else f"nbd+unix:///?socket={self.sock}"
        )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not wait_exit(self.pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_exit(self.pid, 10)
        if self.child is not None:
            self.child.wait(10)


def wait_listening(sock: Path, child: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Bounded connect loop: return once ``sock`` accepts; fail early if ``child`` exits."""
    fd = os.pidfd_open(child.pid)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(sock))
                    return
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                child.wait()
                raise RuntimeError(f"{child.args[0]} did not listen on {sock} within {timeout} s\n{log.read_text()}")
            if select.select([fd], [], [], min(left, 0.01))[0]:
                child.wait()
                raise RuntimeError(f"{child.args[0]} exited {child.returncode} before listening\n{log.read_text()}")
    finally:
        os.close(fd)


def image_args(image: Path, fmt: str) -> list[str]:
    """How both nbdserve and qemu-nbd are told the image: ``-f FMT IMAGE``, or for an encrypted
    format the secret object and ``--image-opts``."""
    if fmt not in KEYED:
        return ["-f", fmt, str(image)]
    secret = f"secret,id=benchkey,file={image.parent / KEY_FILE}"
    return ["--object", secret, "--image-opts", f"driver={fmt},file.filename={image},{KEYED[fmt]}=benchkey"]


def server_command(
    name: str, image: Path, fmt: str, sock: Path, pidfile: Path, profile: Path | None, tls: Path | None = None
) -> list[str]:
    """The command line; servers that run in the foreground (see ``serving``) get no ``--fork``.
    With ``tls`` (a credentials directory) the server requires TLS."""
    img = image_args(image, fmt)
    if name == "nbdserve":
        creds = ["--tls-creds", str(tls)] if tls else []
        if profile is not None:
            return [sys.executable, "-c", PROFILE_MAIN, str(profile), "-k", str(sock), *creds, *img]
        return [sys.executable, "-m", "nbdserve", "--fork", "--pid-file", str(pidfile), "-k", str(sock), *creds,
                *img]  # fmt: skip
    if name == "qemu-nbd":
        creds = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls},verify-peer=off",
                 "--tls-creds", "tls0"] if tls else []  # fmt: skip
        return ["qemu-nbd", "--fork", "--persistent", "-e", "8", "--cache=writeback", "--aio=threads",
                "-k", str(sock), "--pid-file", str(pidfile), *creds, *img]  # fmt: skip
    # nbdkit in the foreground (our child): its forking parent may exit before the pid file exists.
    creds = ["--tls=require", f"--tls-certificates={tls}"] if tls else []
    return ["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), *creds, "file", str(image)]


@contextlib.contextmanager
def serving(name: str, image: Path, fmt: str, cfg: Config, tls: bool = False) -> Iterator[Running]:
    """Start server ``name`` on ``image`` (requiring TLS with ``tls``); yield once it listens;
    stop it afterwards.

    With ``--profile DIR`` nbdserve runs in the foreground under cProfile and writes
    ``DIR/<image>.prof`` when it exits on SIGTERM.
    """
    tag = image.stem + "-tls" * tls
    sock, pidfile, log = cfg.sockdir / f"{tag}.sock", cfg.workdir / f"{tag}.pid", cfg.workdir / f"{tag}.log"
    for p in (sock, pidfile):
        p.unlink(missing_ok=True)
    profile = cfg.profile / f"{tag}.{fmt}.prof" if cfg.profile is not None and name == "nbdserve" else None
    cmd = server_command(name, image, fmt, sock, pidfile, profile, cfg.tls_dir if tls else None)
    with open(log, "w") as logf:
        if name == "nbdkit" or profile is not None:
            child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=ENV)
            wait_listening(sock, child, log)
            srv = Running(name, sock, child.pid, log, child, tls)
        else:
            p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=ENV, timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n{log.read_text()}")
            srv = Running(name, sock, int(pidfile.read_text().strip()), log, tls=tls)
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# Jobs


def fio_command(job: Job, uri: str, cfg: Config, out: Path) -> list[str]:
    cmd = ["fio", f"--name={job.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}", f"--bs={job.bs}",
           f"--iodepth={job.depth}", f"--numjobs={job.conns}", "--group_reporting", "--time_based",
           f"--runtime={cfg.runtime:g}", "--output-format=json", f"--output={out}"]  # fmt: skip
    if cfg.ramp > 0:
        cmd.append(f"--ramp_time={cfg.ramp:g}")
    return cmd


def run_fio(job: Job, srv: Running, cfg: Config) -> Sample:
    out = cfg.workdir / "fio.json"
    cmd = fio_command(job, srv.uri, cfg, out)
    if cfg.verbose:
        print("   ", " ".join(cmd), flush=True)
    cpu0, t0 = cpu_seconds(srv.pid), time.perf_counter()
    run(cmd, timeout=cfg.runtime + cfg.ramp + 120)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(srv.pid) - cpu0
    data = json.loads(out.read_text())
    (res,) = data["jobs"]  # group_reporting: one entry for all connections
    if res.get("error"):
        raise RuntimeError(f"fio job {job.name} failed with error {res['error']}")
    side = res["write" if job.writes else "read"]
    if side["io_bytes"] == 0:
        raise RuntimeError(f"fio job {job.name} transferred nothing")
    # fio is time based: I/O runs for ramp + runtime seconds, at about the measured rate.
    return Sample(side["iops"], side["bw_bytes"], cpu, side["iops"] * (cfg.runtime + cfg.ramp), wall)


def run_nbdcopy(job: Job, srv: Running, cfg: Config) -> Sample:
    cmd = ["nbdcopy", f"--connections={job.conns}", f"--requests={job.depth}", f"--request-size={job.bs}",
           srv.uri, "null:"]  # fmt: skip
    if cfg.verbose:
        print("   ", " ".join(cmd), flush=True)
    cpu0 = cpu_seconds(srv.pid)
    t0 = time.perf_counter()
    run(cmd)
    secs = time.perf_counter() - t0
    cpu = cpu_seconds(srv.pid) - cpu0
    requests = cfg.size / job.bs
    return Sample(requests / secs, cfg.size / secs, cpu, requests, secs)


def measure(job: Job, srv: Running, cfg: Config) -> Sample:
    return run_fio(job, srv, cfg) if job.kind == "fio" else run_nbdcopy(job, srv, cfg)


# ---------------------------------------------------------------------------------------------
# Images


def make_data(path: Path, size: int) -> None:
    """A raw file of ``size`` bytes, every MiB a distinct non-zero block (random, numbered)."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            block[:8] = (i // MiB + 1).to_bytes(8, "little")
            f.write(block[: min(MiB, size - i)])


def make_image(fmt: str, data: Path, workdir: Path) -> Path:
    if fmt == "raw":
        return data
    img = workdir / f"data.{fmt}"
    opts = CREATE_OPTS.get(fmt, [])
    if fmt in KEYED:
        (workdir / KEY_FILE).write_bytes(b"nbdserve bench passphrase")
        secret = f"secret,id=benchkey,file={workdir / KEY_FILE}"
        opts = ["--object", secret, "-o", f"{KEYED[fmt]}=benchkey,iter-time=100", *opts]
    for _attempt in range(20):
        try:
            run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(data), str(img)])
            break
        except RuntimeError as e:
            # QEMU's PBKDF benchmark times its first round with the thread's CPU clock and gives
            # up when that clock has not moved, which a busy machine makes happen now and then.
            if "accurate CPU usage" not in str(e):
                raise
    else:
        raise RuntimeError(f"qemu-img convert -O {fmt}: its PBKDF benchmark failed 20 times")
    return img


def make_tls_creds(root: Path) -> Path:
    """A CA and a server certificate for localhost (certtool, as the tests make theirs); returns
    the server's credential directory (ca-cert.pem, server-cert.pem, server-key.pem)."""
    sys.path.insert(0, str(REPO))
    from tests.tlscerts import Ca

    return Ca.make(root / "ca", "nbdserve bench CA").issue(root / "server", "server", "localhost")


def make_fresh(fmt: str, size: int, workdir: Path, server: str) -> Path:
    img = workdir / f"{server}-fresh.{fmt}"
    img.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", fmt, *CREATE_OPTS.get(fmt, []), str(img), str(size)])
    return img


# ---------------------------------------------------------------------------------------------
# Driver


def servers_for(fmt: str, servers: list[str]) -> list[str]:
    """nbdkit's file plugin serves raw bytes only, so it takes part for raw images only."""
    return [s for s in servers if s != "nbdkit" or fmt == "raw"]


def estimate_seconds(cfg: Config) -> float:
    """A rough duration: fio runs take ramp + runtime + ~1 s of start-up, copies ~1 s per GiB."""
    total = 0.0
    for fmt in cfg.formats:
        for job in cfg.jobs:
            if job.fresh and fmt not in FRESH_FORMATS:
                continue
            each = cfg.runtime + cfg.ramp + 1 if job.kind == "fio" else 1 + cfg.size / (1 << 30)
            total += each * cfg.runs * len(servers_for(fmt, cfg.servers))
    return total


def run_format(fmt: str, data: Path, cfg: Config) -> dict[tuple[str, str], Result]:
    """Every job on every server for one format, the servers' runs interleaved (see ``run_job``).

    Each server gets its own copy of the image.  All servers run at once for the plaintext jobs,
    then are started again requiring TLS for the TLS jobs, and are stopped before the fresh-image
    jobs, which start a new server per run.  A server that fails to start gets an error for every
    job of that phase and the others carry on.
    """
    results: dict[tuple[str, str], Result] = {}
    source = make_image(fmt, data, cfg.workdir)
    jobs = [j for j in cfg.jobs if not j.fresh or fmt in FRESH_FORMATS]
    images = {name: cfg.workdir / f"{name}-copy.{fmt}" for name in servers_for(fmt, cfg.servers)}
    try:
        for image in images.values():
            shutil.copyfile(source, image)
        for tls in (False, True):
            phase = [j for j in jobs if not j.fresh and j.tls == tls]
            if phase:
                results.update(run_phase(phase, fmt, cfg, images, tls))
        fresh: dict[str, Running | None] = dict.fromkeys(images)
        for job in jobs:
            if job.fresh:
                for name, res in run_job(job, fmt, cfg, fresh).items():
                    results[job.name, name] = res
    finally:
        for image in images.values():
            image.unlink(missing_ok=True)
        if source != data:
            source.unlink(missing_ok=True)
    return results


def run_phase(
    jobs: list[Job], fmt: str, cfg: Config, images: Mapping[str, Path], tls: bool
) -> dict[tuple[str, str], Result]:
    """``jobs`` with every server up at once on its copy (requiring TLS with ``tls``)."""
    results: dict[tuple[str, str], Result] = {}
    with contextlib.ExitStack() as stack:
        running: dict[str, Running] = {}
        for name, image in images.items():
            try:
                running[name] = stack.enter_context(serving(name, image, fmt, cfg, tls))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                print(f"  {fmt}: {name} failed: {e}", file=sys.stderr, flush=True)
                for job in jobs:
                    results[job.name, name] = Result(error=f"server failed: {first_line(e)}")
        for job in jobs:
            for name, res in run_job(job, fmt, cfg, running).items():
                results[job.name, name] = res
    return results


def run_job(job: Job, fmt: str, cfg: Config, servers: Mapping[str, Running | None]) -> dict[str, Result]:
    """``cfg.runs`` runs of one job on each server, interleaved: run 1 on A, B, C, then run 2 ...

    Interleaving spreads drift in machine load (CPU steal on a shared VM) over every server alike.
    A server given as None gets a new empty image and a new server for every run (fresh-image
    job).  A server whose run fails keeps its samples so far, records the error and is left out of
    the later runs.
    """
    results = {name: Result() for name in servers}
    for _ in range(cfg.runs):
        for name, srv in servers.items():
            res = results[name]
            if res.error:
                continue
            try:
                if srv is None:
                    with serving(name, make_fresh(fmt, cfg.size, cfg.workdir, name), fmt, cfg) as fresh_srv:
                        res.samples.append(measure(job, fresh_srv, cfg))
                else:
                    res.samples.append(measure(job, srv, cfg))
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
                res.error = first_line(e)
                print(f"  {fmt} {job.name} on {name}: FAILED: {e}", file=sys.stderr, flush=True)
                if srv is not None:
                    log = srv.log.read_text(errors="replace")[-2000:]
                    print(f"  server log tail:\n{log}", file=sys.stderr, flush=True)
    for name, res in results.items():
        iops, bps = res.mean("iops"), res.mean("bps")
        if iops is not None and bps is not None:
            print(f"  {fmt:5} {job.name:17} {name:9} {iops:12,.0f} IOPS {bps / MiB:9.1f} MiB/s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Report


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def tool_version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=ENV)
    except OSError:
        return "absent"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def environment(cfg: Config) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rev = tool_version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        f"- Host: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, load {load} at start",
        f"- nbdserve git {rev}; Python {platform.python_version()}; {tool_version(['qemu-nbd', '--version'])}; "
        f"{tool_version(['nbdkit', '--version'])}; {tool_version(['fio', '--version'])}; "
        f"{tool_version(['nbdcopy', '--version'])}",
        f"- Image: {cfg.size / MiB:g} MiB virtual, filled with non-zero data, on {cfg.workdir} "
        f"({'tmpfs' if str(cfg.workdir).startswith('/dev/shm') else 'not tmpfs'})",
        f"- fio: ioengine=nbd, time_based, runtime {cfg.runtime:g} s, ramp_time {cfg.ramp:g} s; "
        f"nbdcopy: whole image to null:, {NBDCOPY_REQUEST >> 10} KiB requests, {NBDCOPY_REQUESTS} in flight, "
        "1 connection (IOPS = requests/s)",
        f"- {cfg.runs} run{'s' if cfg.runs > 1 else ''} per job"
        + (", the first discarded as warm-up, the rest averaged" if cfg.runs > 1 else " (no warm-up discarded)")
        + "; runs alternate between the servers (all up at once), so load drift hits each alike",
        "- qemu-nbd: `--cache=writeback --aio=threads -e 8`; nbdkit: `file` plugin (raw only); "
        "nbdserve: defaults. Write jobs run on a private copy of the image per server; "
        "`rand-write-fresh` runs on a newly created empty image for every run.",
    ]


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def report(all_results: dict[str, dict[tuple[str, str], Result]], cfg: Config, skipped: list[str]) -> str:
    """The Markdown report: environment, then per format a throughput table and a server-CPU table."""
    lines = ["# nbdserve benchmark", "", *environment(cfg)]
    if skipped:
        lines.append(f"- Skipped: {'; '.join(skipped)}")
    for fmt, results in all_results.items():
        servers = servers_for(fmt, cfg.servers)
        others = [s for s in servers if s != "nbdserve"] if "nbdserve" in servers else []
        jobs = [j for j in cfg.jobs if any((j.name, s) in results for s in servers)]
        head = ["Job", "Request, conns x depth"]
        for s in servers:
            head += [f"{s} IOPS", f"{s} MiB/s"]
        head += [f"nbdserve/{s}" for s in others]
        rows, cpu_rows = [], []
        for job in jobs:
            row, cpu_row = [job.name, job.shape()], [job.name]
            for s in servers:
                r = results.get((job.name, s), Result())
                bps = r.mean("bps")
                if r.error:
                    row += ["error", "error"]
                else:
                    row += [fmt_num(r.mean("iops")), fmt_num(None if bps is None else bps / MiB, 1)]
                cpu_row.append(fmt_num(r.mean("cpu_us_per_request"), 1))
            ours = results.get((job.name, "nbdserve"), Result()).mean("iops")
            row += [ratio(ours, results.get((job.name, s), Result()).mean("iops")) for s in others]
            rows.append(row)
            cpu_rows.append(cpu_row)
        lines += ["", f"## {fmt}", "", *table(head, rows)]
        lines += ["", "Server CPU per request (µs, user+system, all threads; lower is better):", ""]
        lines += table(["Job", *servers], cpu_rows)
        errors = [f"{s} {j}: {r.error}" for (j, s), r in results.items() if r.error]
        if errors:
            lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def results_json(all_results: dict[str, dict[tuple[str, str], Result]], cfg: Config) -> dict:
    jobs = {j.name: j for j in cfg.jobs}
    out: dict = {"runtime": cfg.runtime, "ramp": cfg.ramp, "runs": cfg.runs, "size": cfg.size, "results": []}
    for fmt, results in all_results.items():
        for (jname, server), r in results.items():
            j = jobs[jname]
            out["results"].append({
                "format": fmt, "job": jname, "server": server, "rw": j.rw, "bs": j.bs, "depth": j.depth,
                "conns": j.conns, "error": r.error, "samples": [vars(s) for s in r.samples],
                "iops": r.mean("iops"), "bps": r.mean("bps"), "cpu_us_per_request": r.mean("cpu_us_per_request"),
            })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def csv_choice(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {text!r})")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    job_names = tuple(j.name for j in JOBS)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--formats", type=csv_choice(ALL_FORMATS), default=list(ALL_FORMATS),
                    help=f"comma-separated image formats (default {','.join(ALL_FORMATS)})")  # fmt: skip
    ap.add_argument("--servers", type=csv_choice(ALL_SERVERS), default=list(ALL_SERVERS),
                    help=f"comma-separated servers (default {','.join(ALL_SERVERS)})")  # fmt: skip
    ap.add_argument("--jobs", type=csv_choice(job_names), default=list(job_names),
                    help=f"comma-separated jobs (default all: {','.join(job_names)})")  # fmt: skip
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 10; --quick: 1)")
    ap.add_argument("--ramp", type=float, help="fio ramp_time seconds (default runtime/5 capped at 2; --quick: 0)")
    ap.add_argument("--runs", type=int, help="runs per job, the first discarded when > 1 (default 3; --quick: 1)")
    ap.add_argument("--size", type=parse_size, help="virtual image size, e.g. 1G, 64M (default 1G; --quick: 64M)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny image, 1 s runs, one run per job")
    ap.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    ap.add_argument("--json", type=Path, help="also write every sample as JSON to this file")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm"), help="where to make images (default /dev/shm)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="profile nbdserve (cProfile, CPU time): DIR/<image>.<fmt>.prof per start")  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true", help="print every client command line")
    a = ap.parse_args(argv)
    a.runtime = a.runtime if a.runtime is not None else (1.0 if a.quick else 10.0)
    a.ramp = a.ramp if a.ramp is not None else (0.0 if a.quick else min(2.0, a.runtime / 5))
    a.runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    a.size = a.size if a.size is not None else (64 * MiB if a.quick else 1 << 30)
    if a.runs < 1 or a.runtime <= 0 or a.ramp < 0:
        ap.error("--runs must be >= 1, --runtime > 0, --ramp >= 0")
    if a.size < MiB or a.size % MiB:
        ap.error("--size must be a positive multiple of 1 MiB")
    return a


def registered_formats() -> set[str]:
    sys.path.insert(0, str(REPO))
    from nbdserve.formats import BY_NAME

    return set(BY_NAME)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    skipped: list[str] = []
    servers = []
    for s in a.servers:
        if s != "nbdserve" and shutil.which(s, path=ENV["PATH"]) is None:
            skipped.append(f"server {s} (not installed)")
        else:
            servers.append(s)
    formats = list(a.formats)
    if "nbdserve" in servers:
        known = registered_formats()
        for f in [f for f in formats if f not in known]:
            skipped.append(f"format {f} (no nbdserve driver registered)")
            formats.remove(f)
    for msg in skipped:
        print(f"skipped: {msg}", flush=True)
    jobs = [j for j in JOBS if j.name in a.jobs]
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.profile is not None:
        a.profile = a.profile.resolve()
        a.profile.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbdserve-bench-", dir=a.workdir))
    sockdir = Path(tempfile.mkdtemp(prefix="nbdb-", dir="/tmp"))
    cfg = Config(formats, servers, jobs, a.runtime, a.ramp, a.runs, a.size, workdir, a.verbose, sockdir, a.profile)
    if any(j.tls for j in jobs):
        try:
            cfg.tls_dir = make_tls_creds(workdir / "pki")
        except (RuntimeError, OSError, AssertionError) as e:
            skipped.append(f"TLS jobs (no credentials: {first_line(e)})")
            print(f"skipped: {skipped[-1]}", file=sys.stderr, flush=True)
            cfg.jobs = [j for j in jobs if not j.tls]
    all_results: dict[str, dict[tuple[str, str], Result]] = {}
    print(f"about {estimate_seconds(cfg) / 60:.0f} min; images in {workdir}", flush=True)
    try:
        data = workdir / "data.raw"
        make_data(data, cfg.size)
        for fmt in formats:
            print(f"== {fmt}", flush=True)
            try:
                all_results[fmt] = run_format(fmt, data, cfg)
            except RuntimeError as e:  # the image could not be made
                skipped.append(f"format {fmt} ({first_line(e)})")
                print(f"skipped: {skipped[-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    table = report(all_results, cfg, skipped)
    print()
    print(table, end="")
    if a.out:
        a.out.write_text(table)
    if a.json:
        a.json.write_text(json.dumps(results_json(all_results, cfg), indent=1) + "\n")
    failed = any(r.error for res in all_results.values() for r in res.values())
    return 1 if failed or len(all_results) < len(formats) or not all_results else 0


if __name__ == "__main__":
    sys.exit(main())
