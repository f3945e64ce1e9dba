"""Smoke test of the benchmark harness ``bench/run.py``: one quick pass with nbdserve on raw.

It checks that the harness starts and stops the server, drives every job through fio and nbdcopy,
and writes a Markdown table and JSON with real numbers.  It asserts no speed: the figures of a
quick run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.util import REPO, run

JOBS = (
    "seq-read",
    "rand-read",
    "rand-read-2conn",
    "nbdcopy",
    "seq-write",
    "rand-write",
    "tls-seq-read",
    "tls-rand-read",
)


def test_quick_bench_produces_a_table(tmp_path: Path) -> None:
    table, samples = tmp_path / "table.md", tmp_path / "samples.json"
    p = run(sys.executable, REPO / "bench" / "run.py", "--quick", "--formats", "raw", "--servers", "nbdserve",
            "--out", table, "--json", samples, "--workdir", tmp_path / "work", timeout=300)  # fmt: skip
    text = table.read_text()
    assert text in p.stdout
    assert "## raw" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in JOBS:  # Job | shape | nbdserve IOPS | nbdserve MiB/s
            rows[cells[0]] = cells
    assert set(rows) == set(JOBS)
    for job, (_, shape, iops, mibs) in rows.items():
        assert re.fullmatch(r"[\d,]+", iops) and int(iops.replace(",", "")) > 0, (job, iops)
        assert re.fullmatch(r"[\d,]+\.\d", mibs) and float(mibs.replace(",", "")) > 0, (job, mibs)
        assert "conn" in shape and "QD" in shape
    assert "| rand-read-2conn | 4 KiB, 2 conns x QD32 |" in text
    results = json.loads(samples.read_text())["results"]
    assert {(r["format"], r["job"], r["server"]) for r in results} == {("raw", j, "nbdserve") for j in JOBS}
    for r in results:
        assert r["error"] == "" and len(r["samples"]) == 1 and r["samples"][0]["iops"] > 0, r
    # The harness cleans up after itself: no image, socket or log is left behind.
    assert not any((tmp_path / "work").iterdir())
