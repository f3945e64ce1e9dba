"""``--metrics``: the Prometheus endpoint scraped after a client made known requests, the numbers
checked against them; SIGUSR1's statistics; and the Grafana dashboard checked against the metric
names the server exports."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import nbd
from prometheus_client.parser import text_string_to_metric_families

from tests.interop import nbdclient as raw
from tests.interop.conftest import SIZE, MiB, write_sparse_raw
from tests.util import NBDSERVE, REPO, free_port, qemu_img, run, serve

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition describes, including families with no sample yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + sfx for f in text_string_to_metric_families(text) for sfx in suffixes[f.type]}


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_match_the_requests_a_client_made(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "m.img")
    q = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", q, "64M")
    port = free_port()
    args = ["--metrics", f"127.0.0.1:{port}", "--export", f"a={img},format=raw", "--export", f"q={q},format=qcow2"]
    with serve(tmp_path, *args) as srv:
        status, text = scrape(port)
        assert status == 200
        m = samples(text)
        assert value(m, "nbdserve_requests_total", export="a", command="read") == 0
        assert value(m, "nbdserve_export_up", export="a") == 1

        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri_for("a"))
        reads = [(4096, 0), (512, 100), (65536, MiB), (1 << 20, 2 * MiB), (7, SIZE - 7)]
        for n, off in reads:
            h.pread(n, off)
        writes = [(4096, 0), (3, 5), (131072, 4 * MiB)]
        for n, off in writes:
            h.pwrite(b"\x01" * n, off)
        h.flush()
        h.flush()
        h.trim(65536, 8 * MiB)
        h.zero(4096, 9 * MiB)
        h.block_status(MiB, 0, lambda *a: 0)
        m = samples(scrape(port)[1])
        assert value(m, "nbdserve_connections", export="a") == 1
        assert value(m, "nbdserve_requests_in_flight", export="a") == 0
        h.shutdown()

        # An error reply, by errno: a write past the end of the export.
        with raw.RawClient(srv.sock) as c:
            c.greet()
            c.go("a")
            assert c.pwrite(SIZE - 10, b"x" * 20).error == raw.ENOSPC

        # The qcow2 export's reads go through the metadata cache.
        hq = nbd.NBD()
        hq.connect_uri(srv.uri_for("q"))
        hq.pwrite(b"\x02" * 65536, 0)
        for _ in range(3):
            hq.pread(65536, 0)
        hq.shutdown()

        m = samples(scrape(port)[1])
        want = {
            "read": (len(reads), sum(n for n, _ in reads)),
            "write": (len(writes) + 1, sum(n for n, _ in writes) + 20),
            "flush": (2, 0),
            "trim": (1, 65536),
            "write_zeroes": (1, 4096),
            "block_status": (1, MiB),
            "cache": (0, 0),
        }
        for cmd, (count, nbytes) in want.items():
            assert value(m, "nbdserve_requests_total", export="a", command=cmd) == count, cmd
            assert value(m, "nbdserve_request_bytes_total", export="a", command=cmd) == nbytes, cmd
            assert value(m, "nbdserve_request_duration_seconds_count", export="a", command=cmd) == count, cmd
            assert value(m, "nbdserve_request_duration_seconds_bucket", export="a", command=cmd, le="+Inf") == count
        buckets = [
            (float(dict(labels)["le"]), v)
            for (name, labels), v in m.items()
            if name == "nbdserve_request_duration_seconds_bucket"
            and dict(labels)["command"] == "read"
            and dict(labels)["export"] == "a"
        ]
        counts = [v for _, v in sorted(buckets)]
        assert counts == sorted(counts)  # cumulative
        assert value(m, "nbdserve_request_errors_total", export="a", errno="ENOSPC") == 1
        assert value(m, "nbdserve_export_connections_total", export="a") == 2
        assert value(m, "nbdserve_connections", export="a") == 0
        assert value(m, "nbdserve_requests_total", export="q", command="read") == 3
        assert value(m, "nbdserve_cache_hits_total") + value(m, "nbdserve_cache_misses_total") > 0
        assert value(m, "nbdserve_cache_budget_bytes") == 64 << 20
        assert value(m, "nbdserve_worker_restarts_total") == 0
        assert value(m, "nbdserve_connections_accepted_total") == 3

        assert scrape(port, "/health") == (200, "ok\n")
        assert scrape(port, "/nothing")[0] == 404

        os.kill(srv.pid, signal.SIGUSR1)
        assert scrape(port)[0] == 200  # the signal was handled before this request
    log = srv.log_text()
    line = next(x for x in log.splitlines() if "statistics: export 'a'" in x)
    (reads, read_bytes), (writes, written) = want["read"], want["write"]
    assert f"read {reads}, write {writes}" in line, line
    assert f"read {read_bytes} bytes, written {written} bytes; 1 errors" in line, line


def test_pipelined_requests_are_counted_one_by_one(tmp_path: Path) -> None:
    """Sequential WRITEs sent together may be written as one run, and plain READs answered as a
    batch: each request still counts once, with its own bytes."""
    img = write_sparse_raw(tmp_path / "p.img")
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "raw", img) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        n, size = 32, 4096 + 512
        for i in range(n):  # one guest-contiguous run
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * size), i * size)
        while h.aio_in_flight():
            h.poll(-1)
        bufs = [nbd.Buffer(1000) for _ in range(n)]
        for i, b in enumerate(bufs):
            h.aio_pread(b, 3 * MiB + i * 7)
        while h.aio_in_flight():
            h.poll(-1)
        assert h.pread(n * size, 0) == b"".join(bytes([i]) * size for i in range(n))
        h.shutdown()
        m = samples(scrape(port)[1])
    assert value(m, "nbdserve_requests_total", export="", command="write") == n
    assert value(m, "nbdserve_request_bytes_total", export="", command="write") == n * size
    assert value(m, "nbdserve_request_duration_seconds_count", export="", command="write") == n
    assert value(m, "nbdserve_requests_total", export="", command="read") == n + 1
    assert value(m, "nbdserve_request_bytes_total", export="", command="read") == n * 1000 + n * size
    assert value(m, "nbdserve_request_duration_seconds_bucket", export="", command="read", le="+Inf") == n + 1


def test_metrics_off_by_default_and_bad_address(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "o.img", size=MiB, runs=())
    with serve(tmp_path, "-f", "raw", img) as srv:
        assert "metrics at" not in srv.log_text()
    p = run(*NBDSERVE, "--metrics", "127.0.0.1:notaport", "-f", "raw", img, check=False)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "--metrics" in p.stderr


def test_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {name for e in exprs for name in re.findall(r"\bnbdserve_[a-z_]+", e)}
    img = write_sparse_raw(tmp_path / "d.img", size=MiB, runs=())
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "raw", img):
        exported = exported_names(scrape(port)[1])
    assert used and used <= exported, used - exported
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families == shown, families ^ shown  # every metric has a panel
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
