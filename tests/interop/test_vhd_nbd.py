"""VHD over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential: every VHD variant QEMU makes, filled with the shared qemu-io script, served by
both servers (each from its own copy): same size, ``qemu-img compare`` of the two URIs equal,
and the same merged ``base:allocation`` map for dynamic images.

Crash: write through NBD with flushes, kill -9 the server mid-stream, then QEMU must open the
image, every flushed write must read back, and the structure must verify.
"""

from __future__ import annotations

import random
import shutil
import signal

import pytest

from tests import vhdgen
from tests.conftest import SLOW
from tests.imagetest import FILL, CrashOracle, crash_workload
from tests.util import merged_map, nbd_connect, qemu_img, qemu_io, qemu_nbd, run, serve

VARIANTS = {
    "dynamic": ["-o", "subformat=dynamic"],
    "fixed": ["-o", "subformat=fixed"],
    "force_size": ["-o", "force_size=on"],
}
MiB = 1 << 20


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vhd_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.vhd"
    qemu_img("create", "-q", "-f", "vpc", *VARIANTS[variant], img, "64M")
    qemu_io("vpc", img, *FILL)
    ours_copy = tmp_path / "ours.vhd"
    shutil.copyfile(img, ours_copy)
    with qemu_nbd(tmp_path, img, "vpc", "-r") as q, serve(tmp_path, "-r", "-f", "vpc", ours_copy) as o:
        assert run("nbdinfo", "--size", q.uri).stdout == run("nbdinfo", "--size", o.uri).stdout
        r = qemu_img("compare", "-f", "raw", "-F", "raw", q.uri, o.uri, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        if variant != "fixed":  # fixed: QEMU adds ZERO from host holes; holes never set on either
            assert merged_map(o.uri) == merged_map(q.uri)


@pytest.mark.parametrize("round", range(25 if SLOW else 5))
def test_vhd_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    img = tmp_path / "k.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", img, "16M")
    oracle = CrashOracle(bytes(16 * MiB))
    with serve(tmp_path, "-f", "vpc", img, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=70000, ops=rng.randint(5, 40), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)
    out = tmp_path / "k.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", img, out)
    oracle.verify(out.read_bytes())
    vhdgen.verify(img)


def test_vhd_differencing_chain_over_nbd(tmp_path):
    """QEMU cannot read differencing VHDs (it ignores the parent): the generator is the oracle."""
    bs = 64 * 1024
    base = vhdgen.Spec(
        size=4 * MiB, block_size=bs, blocks={0: vhdgen.Block(b"\x11" * bs), 5: vhdgen.Block(b"\x22" * bs)}
    )
    vhdgen.write(tmp_path / "base.vhd", base)
    child = vhdgen.Spec(
        size=4 * MiB,
        block_size=bs,
        disk_type=4,
        parent_uuid=base.unique_id,
        parent_name="base.vhd",
        locators=[(b"W2ru", ".\\base.vhd")],
        blocks={0: vhdgen.Block(b"\x33" * bs, set(range(8, 16))), 9: vhdgen.Block(b"\x44" * bs)},
    )
    vhdgen.write(tmp_path / "child.vhd", child)
    want = vhdgen.expected(child, vhdgen.expected(base))
    out = tmp_path / "out.raw"
    with serve(tmp_path, "-r", "-f", "vpc", tmp_path / "child.vhd") as srv:
        run("nbdcopy", srv.uri, out)
        # unallocated in the whole chain: hole,zero (type 3); everything else data (type 0)
        holes = [(o, n) for o, n, t in merged_map(srv.uri) if t == 3]
    assert out.read_bytes() == want
    assert holes == [(bs, 4 * bs), (6 * bs, 3 * bs), (10 * bs, 4 * MiB - 10 * bs)]


def test_short_fixed_vhd_block_status_in_whole_sectors(tmp_path):
    """A fixed VHD whose file ends inside a sector of its data area (served read-only): block
    status at unaligned offsets around that end answers (no EIO from a run that stops inside
    the sector) in whole sectors and never calls non-zero bytes ZERO.  (QEMU refuses a VHD file
    that is not whole sectors; we read it as we read a short fixed VHD: the file, then zeroes.)"""
    p = tmp_path / "short.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", p, "3M")
    qemu_io("vpc", p, "write -P 0x5c 0 3M")
    buf = bytearray(p.read_bytes())
    buf[2 * MiB + 700 : 3 * MiB] = b""  # the data area ends 700 bytes into a sector; footer kept
    p.write_bytes(bytes(buf))
    with serve(tmp_path, "-r", "-f", "vpc", p) as o:
        whole = merged_map(o.uri)
        assert all(start % 512 == 0 and length % 512 == 0 for start, length, _ in whole), whole
        h = nbd_connect(o.uri)
        h.set_strict_mode(0)
        disk = h.pread(3 * MiB, 0)
        end = 2 * MiB + 700 + 512  # the file's end (the footer is read as data, as QEMU does)
        assert disk == bytes(buf) + bytes(3 * MiB - end)
        for off, n in [(end - 3, 7), (end - 600, 1000), (end - 512 - 1, 3), (2 * MiB + 1, 1), (end + 1, 5000)]:
            got: list[int] = []
            h.block_status(n, off, lambda ctx, start, entries, err, got=got: got.extend(entries) or 0)
            pos = off
            for length, flags in zip(got[0::2], got[1::2], strict=True):
                length = min(length, off + n - pos)
                if flags & 2:  # NBD_STATE_ZERO
                    assert disk[pos : pos + length] == bytes(length), (off, n, pos, length)
                pos += length
                if pos >= off + n:
                    break
            assert pos >= off + n, (off, n, got)
        h.shutdown()
