#!/usr/bin/env python3
"""Scaling over cores: several exports, one client each, served by nbdserve with ``--workers 1``
and ``--workers N`` and by one qemu-nbd process per image, all in the same run.

Every configuration serves the same raw images (on tmpfs, so the disk is out of the
measurement); each measurement runs one fio process with one job (one NBD connection) per export
at once and sums their IOPS.  Rounds alternate between the configurations (a slow spell on a
shared machine hits all of them alike); the first round is a warm-up and is not counted.

Server CPU is user + system time from ``/proc/PID/stat`` of every server process (nbdserve's
acceptor and its workers; each qemu-nbd) over the run; client CPU is fio's own usr + sys figure.
Per request: CPU seconds / requests (requests = IOPS x (ramp + runtime), as in ``bench/run.py``).

    .venv/bin/python bench/scaling.py                       # 4 exports, workers 1 and 2, qemu-nbd
    .venv/bin/python bench/scaling.py --out bench/RESULTS-scaling.md
    .venv/bin/python bench/scaling.py --quick               # checks the harness, measures nothing

The model written under the table: a server process that runs one event loop uses at most one
core, so its ceiling is 1e6 / (server CPU us per request) requests per second per process; with W
workers on C cores the server's ceiling is min(W, C) times that, and with the clients on the same
machine the whole (server + client CPU per request) must fit into C cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ENV, MiB, cpu_seconds, make_data, run, wait_exit  # bench/run.py's helpers


@dataclass
class Config:
    """One way of serving the images."""

    label: str
    kind: str  # "nbdserve" or "qemu-nbd"
    workers: int = 1
    samples: list[dict] = field(default_factory=list)


@dataclass
class Served:
    pids: list[int]  # the processes to stop (nbdserve: its acceptor; qemu-nbd: each)
    uris: list[str]

    def all_pids(self) -> list[int]:
        """Every server process, nbdserve's workers included."""
        out = []
        for pid in self.pids:
            out.append(pid)
            for tid in os.listdir(f"/proc/{pid}/task"):
                out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        return out

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.all_pids())

    def stop(self) -> None:
        for pid in self.pids:
            os.kill(pid, 15)
        for pid in self.pids:
            if not wait_exit(pid, 30):
                os.kill(pid, 9)


def start(cfg: Config, images: list[Path], workdir: Path) -> Served:
    if cfg.kind == "nbdserve":
        sock, pidfile = workdir / f"nbdserve-{cfg.workers}.sock", workdir / f"nbdserve-{cfg.workers}.pid"
        exports = [f"--export=e{i}={img},format=raw,readonly" for i, img in enumerate(images)]
        log = workdir / f"nbdserve-{cfg.workers}.log"
        cmd = [sys.executable, "-m", "nbdserve", "--fork", "--pid-file", str(pidfile), "-k", str(sock),
               "--workers", str(cfg.workers), "--log", str(log), *exports]  # fmt: skip
        run(cmd, timeout=120)
        return Served([int(pidfile.read_text())], [f"nbd+unix:///e{i}?socket={sock}" for i in range(len(images))])
    pids, uris = [], []
    for i, img in enumerate(images):
        sock, pidfile = workdir / f"qemu-nbd-{i}.sock", workdir / f"qemu-nbd-{i}.pid"
        run(["qemu-nbd", "--fork", "--persistent", "-e", "8", "--cache=writeback", "--aio=threads", "-f", "raw", "-r",
             "-k", str(sock), "--pid-file", str(pidfile), str(img)], timeout=120)  # fmt: skip
        pids.append(int(pidfile.read_text()))
        uris.append(f"nbd+unix:///?socket={sock}")
    return Served(pids, uris)


def measure(served: Served, args: argparse.Namespace, out: Path) -> dict:
    """One fio process, one job (one connection) per export, all at once."""
    cmd = ["fio", "--ioengine=nbd", "--rw=randread", f"--bs={args.bs}", f"--iodepth={args.depth}", "--time_based",
           f"--runtime={args.runtime:g}", f"--ramp_time={args.ramp:g}", "--output-format=json",
           f"--output={out}"]  # fmt: skip
    for i, uri in enumerate(served.uris):
        cmd += [f"--name=e{i}", f"--uri={uri}"]
    cpu0, t0 = served.cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=ENV, timeout=args.runtime + args.ramp + 120)
    wall, cpu = time.perf_counter() - t0, served.cpu() - cpu0
    jobs = json.loads(out.read_text())["jobs"]
    if any(j.get("error") for j in jobs) or any(j["read"]["io_bytes"] == 0 for j in jobs):
        raise RuntimeError(f"fio failed: {out.read_text()[:2000]}")
    iops = sum(j["read"]["iops"] for j in jobs)
    client_cpu = sum((j["usr_cpu"] + j["sys_cpu"]) / 100 * args.runtime for j in jobs)
    return {
        "iops": iops,
        "bytes_per_s": sum(j["read"]["bw_bytes"] for j in jobs),
        "server_cpu_s": cpu,
        "requests": iops * (args.runtime + args.ramp),
        "client_cpu_us_per_req": client_cpu / (iops * args.runtime) * 1e6,
        "wall_s": wall,
    }


def mean(samples: list[dict], key: str) -> float:
    return statistics.fmean(s[key] for s in samples)


def report(configs: list[Config], args: argparse.Namespace, load: tuple[str, str], command: str) -> str:
    cores = os.cpu_count() or 1
    base = next(c for c in configs if c.kind == "nbdserve" and c.workers == 1)
    rows = []
    model = {}
    for c in configs:
        kept = c.samples[1:] if len(c.samples) > 1 else c.samples
        iops, mbs = mean(kept, "iops"), mean(kept, "bytes_per_s") / MiB
        cpu = sum(s["server_cpu_s"] for s in kept) / sum(s["requests"] for s in kept) * 1e6
        client = mean(kept, "client_cpu_us_per_req")
        used = sum(s["server_cpu_s"] for s in kept) / sum(s["wall_s"] for s in kept)
        ratio = iops / mean(base.samples[1:] or base.samples, "iops")
        model[c.label] = (cpu, client, c)
        rows.append(f"| {c.label} | {iops:,.0f} | {mbs:,.1f} | {ratio:.2f} | {cpu:.1f} | {client:.1f} | {used:.2f} |")
    out = [
        "# Scaling over cores: 4 exports, 4 clients",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {cores} cores ({platform.machine()}), {platform.platform()}; shared with other work.",
        f"- Load average (1, 5, 15 min) at start: {load[0]}; at end: {load[1]}.",
        f"- {len(args.images)} raw images of {args.size // MiB} MiB on tmpfs, fully written; one fio process,",
        f"  one job per export (--ioengine=nbd, randread, bs={args.bs}, iodepth={args.depth}), runtime "
        f"{args.runtime:g} s + ramp {args.ramp:g} s;",
        f"  {args.runs} rounds alternating between the configurations, the first one a warm-up (not counted).",
        "- Read-only exports (every configuration serves the same files).  qemu-nbd: one process per",
        "  image, `-r --cache=writeback --aio=threads`.",
        "",
        "| server | aggregate IOPS | MiB/s | vs --workers 1 | server CPU µs/request | client CPU µs/request "
        "| server cores busy |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Model",
        "",
        "An nbdserve process runs one event loop, so it uses at most one core: its ceiling is",
        "1e6 / (server CPU µs per request) requests per second.  With W workers on C cores the server's",
        "ceiling is min(W, C, exports) times that.  When clients share the machine, server and client CPU",
        "per request together must fit into the C cores: IOPS <= C x 1e6 / (server + client µs per request).",
        "",
        "| server | per-process ceiling (IOPS) | here: C x 1e6 / (server + client) | 16 cores, clients elsewhere |",
        "|---|---|---|---|",
    ]
    for label, (cpu, client, c) in model.items():
        here = cores * 1e6 / (cpu + client)
        if c.kind == "nbdserve":
            per = 1e6 / cpu
            at16 = f"min(W, 16) x {per:,.0f}: W=4 (4 exports) {4 * per:,.0f}; W=16 (16 exports) {16 * per:,.0f}"
            ceiling = f"{per:,.0f}"
        else:
            ceiling = "(multi-threaded)"
            at16 = f"16 x 1e6 / {cpu:.1f} = {16e6 / cpu:,.0f} if its CPU per request stays the same"
        out.append(f"| {label} | {ceiling} | {here:,.0f} | {at16} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exports", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="nbdserve --workers values to compare (1 must be among them)")
    p.add_argument("--runtime", type=float, default=10)
    p.add_argument("--ramp", type=float, default=2)
    p.add_argument("--runs", type=int, default=4, help="rounds; the first is a warm-up")
    p.add_argument("--size", type=int, default=256 * MiB)
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--workdir", default="/dev/shm")
    p.add_argument("--out", help="also write the report here")
    p.add_argument("--quick", action="store_true", help="1 s runs, 2 rounds, 32 MiB images")
    args = p.parse_args()
    if args.quick:
        args.runtime, args.ramp, args.runs, args.size = 1, 0, 2, 32 * MiB
    workdir = Path(args.workdir) / f"nbdserve-scaling-{os.getpid()}"
    workdir.mkdir()
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.images = [workdir / f"img{i}.raw" for i in range(args.exports)]
    for img in args.images:
        make_data(img, args.size)
    configs = [Config(f"nbdserve --workers {w}", "nbdserve", int(w)) for w in args.workers.split(",")]
    configs.append(Config(f"{args.exports} x qemu-nbd", "qemu-nbd"))
    served = {}
    try:
        for c in configs:
            served[c.label] = start(c, args.images, workdir)
        for r in range(args.runs):
            for c in configs:
                s = measure(served[c.label], args, workdir / "fio.json")
                c.samples.append(s)
                print(f"round {r}: {c.label}: {s['iops']:,.0f} IOPS, server CPU {s['server_cpu_s']:.2f} s", flush=True)
    finally:
        for s in served.values():
            s.stop()
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(["python", "bench/scaling.py", *sys.argv[1:]])
    text = report(configs, args, (load0, load1), command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
