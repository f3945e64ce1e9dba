"""fio's NBD engine (libnbd) against nbdserve: mixed random I/O with checksummed verification.

Two jobs (two connections) each write and read back their own half of the export with
``verify=crc32c``; a second, verify-only pass after the image was wiped behind the server's back
must fail, which shows the verification really reads the data through the server.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.interop.conftest import MiB
from tests.util import run, serve


def fio(cwd: Path, uri: str, *extra: str):
    args = [
        "fio",
        "--name=interop",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randrw",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=20261122",
        *extra,
    ]
    return run(*args, check=False, cwd=cwd, timeout=120)


def test_fio_randrw_verify(tmp_path: Path) -> None:
    img = tmp_path / "fio.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    with serve(tmp_path, "-f", "raw", img) as srv:
        p = fio(tmp_path, srv.uri, "--output-format=json", f"--output={tmp_path / 'fio.json'}")
        assert p.returncode == 0, p.stdout + p.stderr
        doc = json.loads((tmp_path / "fio.json").read_text())
        assert len(doc["jobs"]) == 2
        for job in doc["jobs"]:
            assert job["error"] == 0
            assert job["write"]["io_bytes"] > 0
            assert job["read"]["io_bytes"] > 0
        assert "verify:" not in p.stdout + p.stderr

        # Wipe the image under the server: verifying the same pattern again must now fail.
        with open(img, "r+b") as f:
            f.write(bytes(16 * MiB))
        p = fio(tmp_path, srv.uri, "--verify_only")
        assert p.returncode != 0
        assert "verify: bad magic header" in p.stdout + p.stderr
