"""VDI over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential (read): dynamic and static images QEMU makes, filled with the shared qemu-io script
and served by both servers (each from its own copy): same size, ``qemu-img compare`` of the two
URIs equal, the same merged maps (static images: QEMU adds "zero" for host holes inside
allocated blocks, so only the bytes are compared).

Differential (write): one libnbd trace (writes, zeroes with and without NO_HOLE, FUA, flushes,
unaligned) replayed on both servers; the two images compare equal and ours passes
``qemu-img check``.

Crash: write, zero and trim through NBD with flushes, kill -9 the server with requests in
flight; nbdserve reopens the image (repairing what the crash left), every flushed write is
there and ``qemu-img check`` is clean.
"""

from __future__ import annotations

import random
import shutil
import signal

import pytest

from tests.conftest import SLOW
from tests.imagetest import (
    FILL,
    CrashOracle,
    assert_same_export,
    check_clean,
    crash_workload,
    qemu_raw,
    random_trace,
    replay_on_both,
)
from tests.util import nbd_connect, qemu_img, qemu_io, qemu_nbd, serve

MiB = 1 << 20
VARIANTS = {"dynamic": ["-o", "static=off"], "static": ["-o", "static=on"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vdi_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.vdi"
    qemu_img("create", "-q", "-f", "vdi", *VARIANTS[variant], img, "64M")
    qemu_io("vdi", img, *FILL)
    ours = tmp_path / "ours.vdi"
    shutil.copyfile(img, ours)
    with qemu_nbd(tmp_path, img, "vdi", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "vdi", ours) as o:
        assert_same_export(o, q, maps=variant == "dynamic")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vdi_writes_same_as_qemu_nbd(tmp_path, variant):
    size = 24 * MiB + 512
    theirs, ours = tmp_path / "t.vdi", tmp_path / "o.vdi"
    qemu_img("create", "-q", "-f", "vdi", *VARIANTS[variant], theirs, str(size))
    qemu_io("vdi", theirs, "write -P 0x5a 1M 3M", "write -z 6M 1M")
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(variant), size, 60, max_len=3 * MiB)
    replay_on_both(tmp_path, "vdi", ours, theirs, ops)
    check_clean(ours, "vdi")


@pytest.mark.parametrize("round", range(20 if SLOW else 4))
def test_vdi_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    size = 12 * MiB
    img = tmp_path / "k.vdi"
    qemu_img("create", "-q", "-f", "vdi", img, str(size))
    qemu_io("vdi", img, "write -P 0x61 2M 3M")
    model = bytearray(size)
    model[2 * MiB : 5 * MiB] = b"\x61" * (3 * MiB)
    oracle = CrashOracle(model)
    with serve(tmp_path, "-f", "vdi", img, check_stop=False) as srv:
        h = nbd_connect(srv.uri)
        for _ in range(rng.randint(0, 3)):  # whole-block trims move blocks around (then rewritten)
            off = rng.randrange(0, size // MiB) * MiB
            h.trim(MiB, off)
            oracle.wrote(off, bytes(MiB))  # a whole-block trim reads as zeroes
            data = rng.randbytes(MiB)
            h.pwrite(data, off)
            oracle.wrote(off, data)
        crash_workload(h, rng, oracle, max_len=2 * MiB, ops=rng.randint(5, 30), in_flight=rng.randint(0, 8))
        srv.stop(signal.SIGKILL)
    with serve(tmp_path, "-f", "vdi", img) as srv:  # repairs on open
        h = nbd_connect(srv.uri)
        got = b"".join(h.pread(4 * MiB, pos) for pos in range(0, size, 4 * MiB))
        h.shutdown()
    oracle.verify(got)
    assert qemu_raw(img, tmp_path, fmt="vdi") == got
    check_clean(img, "vdi")
