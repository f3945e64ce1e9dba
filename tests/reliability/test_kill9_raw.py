"""kill -9 with a flushed-write oracle for raw images (the other formats' rounds live beside their
format tests: ``test_qcow2_nbd``, ``test_qed_nbd``, ``test_vhd_nbd``, ``test_vhdx_nbd``).

Random writes, zeroes and flushes (``imagetest.crash_workload``), some writes left in flight, then
SIGKILL: every sector must hold its content at the last completed flush or one it took since
(``imagetest.CrashOracle``).  Probed and explicit raw both, and a sparse file, so the zeroing
paths (punch hole, zero range) are in the mix.
"""

from __future__ import annotations

import random
import signal

import pytest

from tests.conftest import SLOW
from tests.imagetest import CrashOracle, crash_workload
from tests.util import nbd_connect, serve

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.mark.parametrize("round", range(25 if SLOW else 5))
def test_raw_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    img = tmp_path / "k.raw"
    model = rng.randbytes(SIZE) if round % 2 else bytes(SIZE)
    with open(img, "wb") as f:
        f.write(model) if round % 2 else f.truncate(SIZE)
    oracle = CrashOracle(model)
    fmt = ["-f", "raw"] if round % 3 else []
    with serve(tmp_path, *fmt, img, check_stop=False) as srv:
        h = nbd_connect(srv.uri)
        crash_workload(h, rng, oracle, max_len=300000, ops=rng.randint(5, 60), in_flight=rng.randint(0, 12))
        srv.stop(signal.SIGKILL)
    oracle.verify(img.read_bytes())
