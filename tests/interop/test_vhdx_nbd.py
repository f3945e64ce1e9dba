"""VHDX over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential (read): every VHDX variant QEMU makes, filled with the shared qemu-io script, served
by both servers (each from its own copy): same size and ``qemu-img compare`` of the two URIs equal.
Maps are not compared: QEMU reports every VHDX range as data (its driver has no block status).

Differential (write): one libnbd trace (writes, zeroes with and without NO_HOLE, trims, FUA,
flushes) replayed on both servers; afterwards the two images compare equal and ours passes
``qemu-img check`` with an empty log.

Crash: write through NBD with flushes, kill -9 the server with requests in flight; QEMU opens
the file (``qemu-img check -r all`` replays any pending log), nbdserve reopens it, both read
the same bytes, and no flushed write is lost.

Beyond QEMU: a differencing child (built by ``tests/vhdxgen.py``) and a 4 KiB-sector image served,
read and written through NBD.
"""

from __future__ import annotations

import random
import shutil
import signal
import uuid

import nbd
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
from tests.util import merged_map, nbd_connect, qemu_img, qemu_io, qemu_nbd, serve
from tests.vhdxgen import Vhdx

MiB = 1 << 20
VARIANTS = {
    "default": [],
    "not_present": ["-o", "block_state_zero=off"],
    "fixed": ["-o", "subformat=fixed,block_state_zero=off"],
    "1M-log4M": ["-o", "block_size=1M,log_size=4M"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vhdx_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", *VARIANTS[variant], img, "64M")
    qemu_io("vhdx", img, *FILL)
    ours_copy = tmp_path / "ours.vhdx"
    shutil.copyfile(img, ours_copy)
    with qemu_nbd(tmp_path, img, "vhdx", "-r") as q, serve(tmp_path, "-r", "-f", "vhdx", ours_copy) as o:
        assert_same_export(o, q, maps=False)  # QEMU maps all VHDX as data


@pytest.mark.parametrize("variant", ["default", "1M-log4M", "fixed"])
def test_vhdx_writes_same_as_qemu_nbd(tmp_path, variant):
    size = 24 * MiB
    theirs, ours = tmp_path / "t.vhdx", tmp_path / "o.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", *VARIANTS[variant], theirs, str(size))
    qemu_io("vhdx", theirs, "write -P 0x5a 1M 3M", "write -P 0x5b 9M 1M")
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(variant), size, 40, max_len=3 * MiB)
    replay_on_both(tmp_path, "vhdx", ours, theirs, ops)
    check_clean(ours, "vhdx")


@pytest.mark.parametrize("round", range(25 if SLOW else 5))
def test_vhdx_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    size = 12 * MiB
    img = tmp_path / "k.vhdx"
    opts = ["-o", "block_size=1M"] if round % 2 else ["-o", "block_size=1M,block_state_zero=off"]
    qemu_img("create", "-q", "-f", "vhdx", *opts, img, str(size))
    oracle = CrashOracle(bytes(size))
    with serve(tmp_path, "-f", "vhdx", img, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=400 * 512, ops=rng.randint(5, 30), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)

    # QEMU opens it (replaying a pending log on a copy) ...
    qcopy = tmp_path / "q.vhdx"
    shutil.copyfile(img, qcopy)
    p = qemu_img("check", "-r", "all", "-f", "vhdx", qcopy, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qraw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", qcopy, qraw)
    # ... and so does nbdserve, with the same bytes; every flushed write is there.
    with serve(tmp_path, "-f", "vhdx", img) as srv:
        h = nbd_connect(srv.uri)
        got = b"".join(h.pread(4 * MiB, pos) for pos in range(0, size, 4 * MiB))
        h.shutdown()
    assert got == qraw.read_bytes()
    oracle.verify(got)
    check_clean(img, "vhdx")


def test_vhdx_differencing_and_4k_served(tmp_path):
    """What QEMU cannot serve: a differencing child (sector bitmap, parent reads) and 4 KiB
    sectors, read and written through the server; the allocation depth follows the BAT."""
    parent = tmp_path / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, "8M")
    qemu_io("vhdx", parent, "write -P 0xa1 0 8M")
    hs = [parent.read_bytes()[off : off + 48] for off in (64 * 1024, 128 * 1024)]
    seqs = [int.from_bytes(h[8:16], "little") for h in hs]
    dwg = hs[seqs.index(max(seqs))][32:48]
    loc = {"parent_linkage": "{" + str(uuid.UUID(bytes_le=dwg)) + "}", "relative_path": ".\\parent.vhdx"}
    g = Vhdx(str(tmp_path / "child.vhdx"), 8 * MiB, block_size=MiB, lss=512, has_parent=True, locator=loc)
    g.put_block(1, b"\xc1" * MiB)
    g.put_partial(2, b"\xc2" * MiB, [i < 1024 for i in range(MiB // 512)])  # first half here
    g.set_entry(g.payload_index(3), 2)
    want = bytearray(b"\xa1" * (8 * MiB))
    want[MiB : 2 * MiB] = b"\xc1" * MiB
    want[2 * MiB : 2 * MiB + 512 * 1024] = b"\xc2" * (512 * 1024)
    want[3 * MiB : 4 * MiB] = bytes(MiB)
    with serve(tmp_path, "-f", "vhdx", g.path) as o:
        h = nbd_connect(o.uri)
        assert h.pread(8 * MiB, 0) == want
        depth = [(e[0], e[1], e[2]) for e in _depth_map(o.uri)]
        assert depth[:4] == [(0, MiB, 2), (MiB, MiB + 512 * 1024, 1), (2 * MiB + 512 * 1024, 512 * 1024, 2),
                             (3 * MiB, MiB, 1)]  # fmt: skip
        h.pwrite(b"\x0e" * 4096, 2 * MiB + 510 * 1024)  # across the bitmap boundary
        want[2 * MiB + 510 * 1024 : 2 * MiB + 514 * 1024] = b"\x0e" * 4096
        h.flush()
        assert h.pread(8 * MiB, 0) == want
        h.shutdown()
    with serve(tmp_path, "-r", "-f", "vhdx", g.path) as o:
        h = nbd_connect(o.uri)
        assert h.pread(8 * MiB, 0) == want
        h.shutdown()

    k4 = Vhdx(str(tmp_path / "k4.vhdx"), 8 * MiB, block_size=MiB, lss=4096)
    k4.put_block(5, b"\x4b" * MiB)
    with serve(tmp_path, "-f", "vhdx", k4.path) as o:
        h = nbd_connect(o.uri)
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        h.pwrite(b"\x01" * 100, 5 * MiB + 10)  # sub-sector write: read-modify-write
        got = h.pread(2 * MiB, 4 * MiB)
        h.shutdown()
    assert got[:MiB] == bytes(MiB) and got[MiB + 10 : MiB + 110] == b"\x01" * 100
    assert got[MiB : MiB + 10] == b"\x4b" * 10 and got[MiB + 110 :] == b"\x4b" * (MiB - 110)


def _depth_map(uri: str):
    return merged_map(uri, "qemu:allocation-depth")
