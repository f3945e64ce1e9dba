"""Smoke test of ``bench/ceph.py`` against the session's cluster: a tiny pass through fio's rbd
engine, qemu-nbd ``rbd:``, nbdserve ``rbd:`` and the S3 paths (direct, the backend, nbdserve),
ending in a report with real numbers.  It asserts no speed: the figures of a quick run on a
shared machine mean nothing.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.util import REPO, TOOL_ENV, run

pytestmark = pytest.mark.ceph


def test_quick_ceph_bench_produces_a_report(ceph, s3_env, tmp_path):
    out, samples = tmp_path / "report.md", tmp_path / "samples.json"
    p = run(sys.executable, REPO / "bench" / "ceph.py", "--quick", "--conf", ceph.conf, "--s3-endpoint",
            ceph.s3_endpoint, "--runtime", "0.5", "--size", "16M", "--s3-size", "16M", "--jobs", "rand-read,seq-write",
            "--paths", "fio-rbd,qemu-nbd,nbdserve",
            "--workdir", tmp_path, "--out", out, "--json", samples,
            env={**TOOL_ENV, **s3_env}, timeout=300)  # fmt: skip
    text = out.read_text()
    assert text in p.stdout
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("rand-read", "seq-write", "direct", "S3Storage", "nbdserve"):
            rows[cells[0]] = cells
    assert set(rows) == {"rand-read", "seq-write", "direct", "S3Storage", "nbdserve"}
    for job in ("rand-read", "seq-write"):
        _, shape, *figures = rows[job]
        assert "QD" in shape and len(figures) == 8  # IOPS and MiB/s of 3 paths, nbdserve / the other two
        assert all(re.fullmatch(r"[\d,]+(\.\d+)?", f) and float(f.replace(",", "")) > 0 for f in figures), rows[job]
    assert all(float(rows[p][1]) > 0 for p in ("direct", "S3Storage", "nbdserve"))
    got = json.loads(samples.read_text())
    assert set(got) == {
        "rbd rand-read fio-rbd",
        "rbd rand-read qemu-nbd",
        "rbd rand-read nbdserve",
        "rbd seq-write fio-rbd",
        "rbd seq-write qemu-nbd",
        "rbd seq-write nbdserve",
        "s3 direct",
        "s3 S3Storage",
        "s3 nbdserve",
    }
    assert all(len(v) == 1 and v[0]["bps"] > 0 for v in got.values())
