#!/usr/bin/env python3
"""Ceph benchmark: RBD through fio's own librbd engine, through qemu-nbd and through nbdserve;
an S3 object read with ranged GETs directly and through nbdserve's S3 backend.

RBD jobs (fio, time based): 4 KiB random read and write at QD32, 1 MiB sequential read and write
at QD16, against one image per path, each filled with data first (so reads hit objects):

  fio-rbd   fio ``ioengine=rbd`` (librbd inside fio): the ceiling for any server in front of RBD
  qemu-nbd  ``qemu-nbd --cache=writeback -f raw rbd:POOL/IMAGE:conf=...``, fio ``ioengine=nbd``
  RbdStorage  nbdserve's backend in this process, driven by an asyncio loop at the same request
            size and depth (the backend's own ceiling, without NBD)
  nbdserve  ``nbdserve -f raw rbd:POOL/IMAGE,conf=...``, fio ``ioengine=nbd``

S3: one object of ``--s3-size`` read whole, sequentially:

  direct     ranged GETs of 8 MiB, 8 at a time, through botocore (what any client can do)
  S3Storage  nbdserve's backend in this process: 1 MiB reads, 16 in flight
  nbdserve   ``nbdcopy`` (its defaults: 4 connections, 64 requests in flight) from an nbdserve
             export of ``s3://BUCKET/KEY,endpoint=...`` (read-only, ``-f raw``) to ``null:``

Runs alternate between paths (A, B, C, A, B, C, ...) so load drift hits each alike; with more
than one run the first of each path is a warm-up and is discarded.  By default the script starts
its own single-node cluster (tests/cephcluster.py) under ``--workdir`` (not tmpfs: bluestore
opens its device with O_DIRECT); ``--conf`` uses an existing cluster instead (then the S3 jobs
need ``--s3-endpoint`` and credentials in the usual AWS variables).

Run from the repository: ``.venv/bin/python bench/ceph.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # bench/run.py: processes, samples, report helpers
from run import MiB, Result, Running, Sample, cpu_seconds, first_line, fmt_num, ratio, table

REPO = common.REPO
sys.path.insert(0, str(REPO))

POOL = "rbd"
RBD_PATHS = ("fio-rbd", "qemu-nbd", "RbdStorage", "nbdserve")
S3_PATHS = ("direct", "S3Storage", "nbdserve")
BUCKET = "nbdserve-bench"
S3_KEY = "bench.img"
S3_GET = 8 * MiB
S3_THREADS = 8


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: int
    depth: int

    def shape(self) -> str:
        size = f"{self.bs // MiB} MiB" if self.bs >= MiB else f"{self.bs >> 10} KiB"
        return f"{size}, QD{self.depth}"


JOBS = (
    Job("rand-read", "randread", 4096, 32),
    Job("seq-read", "read", MiB, 16),
    Job("rand-write", "randwrite", 4096, 32),
    Job("seq-write", "write", MiB, 16),
)


@dataclass
class Config:
    paths: list[str]
    s3_paths: list[str]
    jobs: list[Job]
    runtime: float
    ramp: float
    runs: int
    size: int
    s3_size: int
    conf: Path
    s3_endpoint: str | None
    workdir: Path
    sockdir: Path  # short path for Unix sockets (sun_path holds ~107 bytes)
    verbose: bool


def env_for(cfg: Config) -> dict[str, str]:
    """The tools' environment: the cluster's config, and the S3 credentials (set after start)."""
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {**common.ENV, **aws, "CEPH_CONF": str(cfg.conf)}


def image_name(path: str) -> str:
    return f"bench-{path}"


# ---------------------------------------------------------------------------------------------
# RBD paths


@contextlib.contextmanager
def serving(path: str, cfg: Config) -> Iterator[Running | None]:
    """The NBD server in front of this path's image (None for fio-rbd, which needs none)."""
    if path in ("fio-rbd", "RbdStorage"):
        yield None
        return
    image = image_name(path)
    sock, pidfile, log = cfg.sockdir / f"{path}.sock", cfg.workdir / f"{path}.pid", cfg.workdir / f"{path}.log"
    if path == "qemu-nbd":
        cmd = ["qemu-nbd", "--fork", "--persistent", "-e", "8", "--cache=writeback", "-k", str(sock),
               "--pid-file", str(pidfile), "-f", "raw", f"rbd:{POOL}/{image}:conf={cfg.conf}"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "nbdserve", "--fork", "--pid-file", str(pidfile), "-k", str(sock),
               "-f", "raw", f"rbd:{POOL}/{image},conf={cfg.conf}"]  # fmt: skip
    with open(log, "w") as logf:
        p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env_for(cfg), timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"{path} did not start: {first_line(RuntimeError(log.read_text()))}")
    srv = Running(path, sock, int(pidfile.read_text().strip()), log)
    try:
        yield srv
    finally:
        srv.stop()


def fio_rbd(job: Job, path: str, srv: Running | None, cfg: Config) -> Sample:
    out = cfg.workdir / "fio.json"
    if srv is None:
        engine = ["--ioengine=rbd", "--clientname=admin", f"--pool={POOL}", f"--rbdname={image_name(path)}"]
    else:
        engine = ["--ioengine=nbd", f"--uri={srv.uri}"]
    cmd = ["fio", f"--name={job.name}", *engine, f"--rw={job.rw}", f"--bs={job.bs}", f"--iodepth={job.depth}",
           f"--size={cfg.size}", "--time_based", f"--runtime={cfg.runtime * 1000:.0f}ms",
           f"--ramp_time={cfg.ramp * 1000:.0f}ms", "--output-format=json", f"--output={out}"]  # fmt: skip
    if cfg.verbose:
        print("   ", " ".join(cmd), flush=True)
    cpu0, t0 = (cpu_seconds(srv.pid) if srv else 0.0), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env_for(cfg), timeout=cfg.runtime + cfg.ramp + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    wall, cpu = time.perf_counter() - t0, (cpu_seconds(srv.pid) - cpu0 if srv else 0.0)
    try:
        (res,) = json.loads(out.read_text())["jobs"]
    except ValueError:
        raise RuntimeError(f"fio wrote no report: {out.read_text()[:200]!r}") from None
    side = res["write" if "write" in job.rw else "read"]
    if res.get("error") or side["io_bytes"] == 0:
        raise RuntimeError(f"fio job {job.name} failed (error {res.get('error')}, {side['io_bytes']} bytes)")
    return Sample(side["iops"], side["bw_bytes"], cpu, side["iops"] * (cfg.runtime + cfg.ramp), wall)


def rbd_storage(job: Job, path: str, cfg: Config) -> Sample:
    """``job`` through RbdStorage in this process: ``depth`` workers, time based like fio."""
    import random

    from nbdserve.storage.location import RbdLocation
    from nbdserve.storage.rbd import RbdStorage

    async def go() -> tuple[int, float]:
        stor = await RbdStorage.open(RbdLocation(pool=POOL, image=image_name(path), conf=str(cfg.conf)), readonly=False)
        blocks = cfg.size // job.bs
        cursor = 0
        counted = 0
        data = os.urandom(job.bs)
        t0 = time.perf_counter()
        start, stop = t0 + cfg.ramp, t0 + cfg.ramp + cfg.runtime

        async def worker() -> None:
            nonlocal cursor, counted
            buf = memoryview(bytearray(job.bs))
            rng = random.Random()
            while (now := time.perf_counter()) < stop:
                if job.rw.startswith("rand"):
                    off = rng.randrange(blocks) * job.bs
                else:
                    off, cursor = cursor, (cursor + job.bs) % (blocks * job.bs)
                pending = stor.write(off, data) if "write" in job.rw else stor.read(off, buf)
                if pending is not None:
                    await pending
                if now >= start:
                    counted += 1

        await asyncio.gather(*(worker() for _ in range(job.depth)))
        await stor.close()
        return counted, cfg.runtime

    n, secs = asyncio.run(go())
    return Sample(n / secs, n * job.bs / secs, 0.0, n, secs)


def run_rbd(cfg: Config, cluster_rbd) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    for path in cfg.paths:
        image = image_name(path)
        print(f"   filling {POOL}/{image} ({cfg.size / MiB:g} MiB)", flush=True)
        with contextlib.suppress(RuntimeError):  # left by an earlier run on a --conf cluster
            cluster_rbd("rm", "--no-progress", f"{POOL}/{image}")
        cluster_rbd("create", "--size", f"{cfg.size // MiB}M", f"{POOL}/{image}")
        cluster_rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M", "--io-threads", "8",
                    "--io-total", str(cfg.size), f"{POOL}/{image}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        servers: dict[str, Running | None] = {}
        for path in cfg.paths:
            try:
                servers[path] = stack.enter_context(serving(path, cfg))
            except RuntimeError as e:
                for job in cfg.jobs:
                    results[(job.name, path)] = Result(error=first_line(e))
                print(f"   {path}: {first_line(e)}", flush=True)
        for job in cfg.jobs:
            print(f"== {job.name} ({job.shape()})", flush=True)
            for _ in range(cfg.runs):
                for path, srv in servers.items():
                    r = results.setdefault((job.name, path), Result())
                    if r.error:
                        continue
                    try:
                        s = rbd_storage(job, path, cfg) if path == "RbdStorage" else fio_rbd(job, path, srv, cfg)
                        r.samples.append(s)
                        print(f"   {path:9} {s.iops:10,.0f} IOPS {s.bps / MiB:8.1f} MiB/s", flush=True)
                    except (RuntimeError, OSError) as e:
                        r.error = first_line(e)
                        print(f"   {path:9} error: {r.error}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# S3 paths


def s3_client(cfg: Config):
    import botocore.config
    import botocore.session

    return botocore.session.Session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=cfg.s3_endpoint,
        config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=S3_THREADS),
    )


def upload(cfg: Config) -> None:
    """A ``--s3-size`` object of non-zero data (a random MiB, numbered per copy), in 64 MiB parts."""
    client = s3_client(cfg)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=BUCKET)
    block = bytearray(os.urandom(MiB))
    part_size = 64 * MiB
    up = client.create_multipart_upload(Bucket=BUCKET, Key=S3_KEY)
    parts = []
    for n, start in enumerate(range(0, cfg.s3_size, part_size), 1):
        body = bytearray()
        for pos in range(start, min(start + part_size, cfg.s3_size), MiB):
            block[:8] = (pos // MiB).to_bytes(8, "little")
            body += block[: min(MiB, cfg.s3_size - pos)]
        etag = client.upload_part(Bucket=BUCKET, Key=S3_KEY, UploadId=up["UploadId"], PartNumber=n, Body=bytes(body))[
            "ETag"
        ]
        parts.append({"ETag": etag, "PartNumber": n})
    client.complete_multipart_upload(
        Bucket=BUCKET, Key=S3_KEY, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )


def s3_direct(cfg: Config) -> Sample:
    client = s3_client(cfg)

    def get(start: int) -> int:
        rng = f"bytes={start}-{min(start + S3_GET, cfg.s3_size) - 1}"
        return len(client.get_object(Bucket=BUCKET, Key=S3_KEY, Range=rng)["Body"].read())

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(S3_THREADS) as pool:
        total = sum(pool.map(get, range(0, cfg.s3_size, S3_GET)))
    secs = time.perf_counter() - t0
    assert total == cfg.s3_size
    return Sample(total / S3_GET / secs, total / secs, 0.0, total / S3_GET, secs)


def s3_storage(cfg: Config) -> Sample:
    from nbdserve.storage.location import S3Location
    from nbdserve.storage.s3 import S3Storage

    async def go() -> float:
        stor = await S3Storage.open(S3Location(bucket=BUCKET, key=S3_KEY, endpoint=cfg.s3_endpoint))
        sem = asyncio.Semaphore(16)
        bufs = [memoryview(bytearray(MiB)) for _ in range(16)]

        async def one(i: int, off: int) -> None:
            async with sem:
                pending = stor.read(off, bufs[i % 16])
                if pending is not None:
                    await pending

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, off) for i, off in enumerate(range(0, cfg.s3_size, MiB))))
        secs = time.perf_counter() - t0
        await stor.close()
        return secs

    secs = asyncio.run(go())
    return Sample(cfg.s3_size / MiB / secs, cfg.s3_size / secs, 0.0, cfg.s3_size / MiB, secs)


def s3_nbdserve(cfg: Config) -> Sample:
    """The object through an nbdserve export, copied whole by nbdcopy (a fresh server each run,
    so its read cache starts empty).  The server's CPU is counted."""
    sock, pidfile, log = cfg.sockdir / "s3.sock", cfg.workdir / "s3.pid", cfg.workdir / "s3.log"
    image = f"s3://{BUCKET}/{S3_KEY},endpoint={cfg.s3_endpoint}"
    cmd = [sys.executable, "-m", "nbdserve", "--fork", "--pid-file", str(pidfile), "-k", str(sock), "-r", "-f", "raw",
           "--workers", "1", image]  # fmt: skip
    with open(log, "w") as logf:
        p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env_for(cfg), timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"nbdserve did not start: {first_line(RuntimeError(log.read_text()))}")
    srv = Running("s3", sock, int(pidfile.read_text().strip()), log)
    try:
        cpu0, t0 = cpu_seconds(srv.pid), time.perf_counter()
        common.run(["nbdcopy", srv.uri, "null:"], timeout=1800)
        secs, cpu = time.perf_counter() - t0, cpu_seconds(srv.pid) - cpu0
    finally:
        srv.stop()
    return Sample(cfg.s3_size / MiB / secs, cfg.s3_size / secs, cpu, cfg.s3_size / MiB, secs)


def run_s3(cfg: Config) -> dict[str, Result]:
    print(f"== S3 sequential read of {cfg.s3_size / MiB:g} MiB (uploading)", flush=True)
    upload(cfg)
    runners = {"direct": s3_direct, "S3Storage": s3_storage, "nbdserve": s3_nbdserve}
    results = {p: Result() for p in cfg.s3_paths}
    for _ in range(cfg.runs):
        for path in cfg.s3_paths:
            r = results[path]
            if r.error:
                continue
            try:
                s = runners[path](cfg)
                r.samples.append(s)
                print(f"   {path:9} {s.bps / MiB:8.1f} MiB/s ({s.wall:.2f} s)", flush=True)
            except Exception as e:
                r.error = first_line(e)
                print(f"   {path:9} error: {r.error}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Report


def report(rbd: dict[tuple[str, str], Result], s3: dict[str, Result], cfg: Config, cluster: str) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# nbdserve Ceph benchmark",
        "",
        f"- Host: {os.cpu_count()} CPUs, load {load} at the end; {common.tool_version(['ceph', '--version'])}; "
        f"{common.tool_version(['qemu-nbd', '--version'])}; {common.tool_version(['fio', '--version'])}",
        f"- Cluster: {cluster}",
        f"- fio time_based, runtime {cfg.runtime:g} s, ramp {cfg.ramp:g} s; {cfg.runs} run(s) per path"
        + (", the first discarded" if cfg.runs > 1 else "")
        + "; runs alternate between paths",
        f"- RBD images {cfg.size / MiB:g} MiB, filled by `rbd bench --io-type write` first; qemu-nbd "
        "`--cache=writeback -e 8 -f raw rbd:...`",
    ]
    if rbd:
        head = ["Job", "Request"]
        for p in cfg.paths:
            head += [f"{p} IOPS", f"{p} MiB/s"]
        ours = [p for p in cfg.paths if p in ("RbdStorage", "nbdserve")]
        theirs = [p for p in cfg.paths if p not in ours]
        head += [f"{o}/{t}" for o in ours for t in theirs]
        rows = []
        for job in cfg.jobs:
            row = [job.name, job.shape()]
            for p in cfg.paths:
                r = rbd.get((job.name, p), Result())
                bps = r.mean("bps")
                row += ["error", "error"] if r.error else [fmt_num(r.mean("iops")), fmt_num(bps and bps / MiB, 1)]
            iops = {p: rbd.get((job.name, p), Result()).mean("iops") for p in cfg.paths}
            row += [ratio(iops[o], iops[t]) for o in ours for t in theirs]
            rows.append(row)
        lines += ["", "## RBD", "", *table(head, rows)]
    if s3:
        rows = []
        direct = s3.get("direct", Result()).mean("bps")
        for p, r in s3.items():
            bps = r.mean("bps")
            rows.append([p, "error: " + r.error if r.error else fmt_num(bps and bps / MiB, 1), ratio(bps, direct)])
        lines += ["", f"## S3: sequential read of {cfg.s3_size / MiB:g} MiB", ""]
        lines += table(["Path", "MiB/s", "/direct"], rows)
    errors = [f"{p} {j}: {r.error}" for (j, p), r in rbd.items() if r.error]
    if errors:
        lines += ["", "Errors: " + "; ".join(sorted(set(errors)))]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    job_names = tuple(j.name for j in JOBS)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paths", type=common.csv_choice(RBD_PATHS), default=list(RBD_PATHS),
                    help=f"RBD paths (default all: {','.join(RBD_PATHS)})")  # fmt: skip
    ap.add_argument("--s3-paths", type=common.csv_choice(S3_PATHS), default=list(S3_PATHS),
                    help=f"S3 paths (default all: {','.join(S3_PATHS)})")  # fmt: skip
    ap.add_argument("--no-rbd", action="store_true", help="skip the RBD jobs")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 read")
    ap.add_argument("--jobs", type=common.csv_choice(job_names), default=list(job_names), help="RBD jobs")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 10; --quick: 1)")
    ap.add_argument("--ramp", type=float, help="fio ramp_time (default runtime/5 capped at 2; --quick: 0)")
    ap.add_argument("--runs", type=int, help="runs per path, the first discarded when > 1 (default 3; --quick: 1)")
    ap.add_argument("--size", type=common.parse_size, help="RBD image size (default 1G; --quick: 64M)")
    ap.add_argument("--s3-size", type=common.parse_size, help="S3 object size (default 1G; --quick: 64M)")
    ap.add_argument("--quick", action="store_true", help="smoke test: small sizes, 1 s runs, one run")
    ap.add_argument("--conf", type=Path, help="use this cluster (ceph.conf with client.admin) instead of starting one")
    ap.add_argument("--s3-endpoint", help="with --conf: the S3 endpoint URL (credentials from the AWS variables)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="cluster and scratch files (not tmpfs)")
    ap.add_argument("--out", type=Path, help="also write the Markdown report here")
    ap.add_argument("--json", type=Path, help="also write every sample as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the fio command lines")
    a = ap.parse_args(argv)
    a.runtime = a.runtime if a.runtime is not None else (1.0 if a.quick else 10.0)
    a.ramp = a.ramp if a.ramp is not None else (0.0 if a.quick else min(2.0, a.runtime / 5))
    a.runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    a.size = a.size if a.size is not None else (64 * MiB if a.quick else 1 << 30)
    a.s3_size = a.s3_size if a.s3_size is not None else (64 * MiB if a.quick else 1 << 30)
    if a.conf is not None and not a.no_s3 and not a.s3_endpoint:
        ap.error("--conf needs --s3-endpoint (or --no-s3)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from tests.cephcluster import RBD_CLI_TIMEOUT, S3_ACCESS_KEY, S3_SECRET_KEY, CephCluster

    a.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbdserve-ceph-bench-", dir=a.workdir))
    sockdir = Path(tempfile.mkdtemp(prefix="nbdc-", dir="/tmp"))
    cluster = None
    try:
        if a.conf is None:
            print(f"starting a cluster in {workdir}", flush=True)
            cluster = CephCluster(
                workdir / "cluster", rgw=not a.no_s3, osd_size=4 * (a.size + a.s3_size) + 8 * (1 << 30)
            )
            cluster.start()
            conf, endpoint = cluster.conf, (None if a.no_s3 else cluster.s3_endpoint)
            os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
            where = f"single node, started by this script (bluestore on a sparse file in {a.workdir})"
        else:
            conf, endpoint, where = a.conf.resolve(), a.s3_endpoint, f"given: {a.conf}"
        cfg = Config(a.paths, a.s3_paths, [j for j in JOBS if j.name in a.jobs], a.runtime, a.ramp, a.runs,
                     a.size, a.s3_size, conf, endpoint, workdir, sockdir, a.verbose)  # fmt: skip

        def cluster_rbd(*args: str) -> None:
            common.run(["rbd", "-c", str(conf), *RBD_CLI_TIMEOUT, *args], timeout=1800)

        rbd = {} if a.no_rbd else run_rbd(cfg, cluster_rbd)
        s3 = {} if a.no_s3 else run_s3(cfg)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    text = report(rbd, s3, cfg, where)
    print()
    print(text, end="")
    if a.out:
        a.out.write_text(text)
    if a.json:
        samples = {f"rbd {j} {p}": [vars(s) for s in r.samples] for (j, p), r in rbd.items()}
        samples.update({f"s3 {p}": [vars(s) for s in r.samples] for p, r in s3.items()})
        a.json.write_text(json.dumps(samples, indent=1) + "\n")
    failed = any(r.error for r in rbd.values()) or any(r.error for r in s3.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
