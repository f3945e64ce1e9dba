"""QED over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential (read): every QED variant QEMU makes, filled with the shared qemu-io script, served by
both servers (each from its own copy): same size, ``qemu-img compare`` of the two URIs equal, the
same merged ``base:allocation`` and ``qemu:allocation-depth`` maps.

Differential (write): one libnbd trace (writes, zeroes with and without NO_HOLE, FUA, flushes)
replayed on both servers; afterwards the two images compare equal and ours passes
``qemu-img check``.

Crash: write through NBD with flushes, kill -9 the server with requests in flight; nbdserve
reopens the image with no manual step (repairing it), no flushed write is lost, and after a clean
stop ``qemu-img check`` is clean.
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
    random_trace,
    replay_on_both,
)
from tests.util import nbd_connect, qemu_img, qemu_io, qemu_nbd, serve

MiB = 1 << 20
VARIANTS = {
    "default": [],
    "4k-16": ["-o", "cluster_size=4k,table_size=16"],
    "4k-2": ["-o", "cluster_size=4k,table_size=2"],
    "256k-2": ["-o", "cluster_size=256k,table_size=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qed_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.qed"
    qemu_img("create", "-q", "-f", "qed", *VARIANTS[variant], img, "64M")
    qemu_io("qed", img, *FILL)
    ours_copy = tmp_path / "ours.qed"
    shutil.copyfile(img, ours_copy)
    with qemu_nbd(tmp_path, img, "qed", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "qed", ours_copy) as o:
        assert_same_export(o, q)


def test_qed_chain_differential_vs_qemu_nbd(tmp_path):
    base = tmp_path / "base.raw"
    # 64 MiB of data, no host holes.  (A backing file shorter than the overlay shows a different
    # qemu:allocation-depth past its end in qemu-nbd: an image-layer question, not QED's.)
    base.write_bytes(bytes(range(256)) * (256 * 1024))
    mid, top = tmp_path / "mid.qed", tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k", "-b", base.name, "-F", "raw", mid, "64M")
    qemu_img("create", "-q", "-f", "qed", "-b", mid.name, "-F", "qed", top, "64M")
    qemu_io("qed", mid, "write -P 0x61 1M 6k", "write -z 2M 64k", "write -P 0x62 40M 1M")
    qemu_io("qed", top, *FILL)
    with qemu_nbd(tmp_path, top, "qed", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "qed", top) as o:
        assert_same_export(o, q)


@pytest.mark.parametrize("variant", ["default", "4k-2"])
def test_qed_writes_same_as_qemu_nbd(tmp_path, variant):
    """No backing file here: with one, QEMU's zero-cluster copy-on-write bug makes it differ."""
    size = 24 * MiB
    theirs, ours = tmp_path / "t.qed", tmp_path / "o.qed"
    qemu_img("create", "-q", "-f", "qed", *VARIANTS[variant], theirs, str(size))
    qemu_io("qed", theirs, "write -P 0x5a 1M 3M", "write -z 6M 1M")
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(variant), size, 60, max_len=600 * 512, sector=512)
    replay_on_both(tmp_path, "qed", ours, theirs, ops)
    check_clean(ours, "qed")


@pytest.mark.parametrize("round", range(25 if SLOW else 5))
def test_qed_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    size = 12 * MiB
    img = tmp_path / "k.qed"
    backing = round % 2 == 1
    if backing:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\x77" * (8 * MiB))
        opts = ["-o", "cluster_size=4k,table_size=2", "-b", base.name, "-F", "raw"]
        model = bytearray(base.read_bytes() + bytes(size - 8 * MiB))
    else:
        opts = ["-o", "cluster_size=4k,table_size=2"] if round % 4 == 2 else []
        model = bytearray(size)
    qemu_img("create", "-q", "-f", "qed", *opts, img, str(size))
    oracle = CrashOracle(model)
    with serve(tmp_path, "-f", "qed", img, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=200 * 512, ops=rng.randint(5, 40), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)

    # nbdserve reopens it without help (the repair runs on open) and every flushed write is there.
    with serve(tmp_path, "-f", "qed", img) as srv:
        h = nbd_connect(srv.uri)
        got = b"".join(h.pread(4 * MiB, pos) for pos in range(0, size, 4 * MiB))
        h.shutdown()
    oracle.verify(got)
    check_clean(img, "qed")
