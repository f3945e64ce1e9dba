"""Unaligned requests for every format, over NBD: nbdserve against a model and, where QEMU reads
the image, against qemu-nbd serving a copy.

Formats: raw, qcow2, QED, VHD (dynamic and differencing), VHDX (512- and 4096-byte sectors,
dynamic and differencing), VMDK (monolithicSparse, with and without zeroed grains), VDI
(dynamic and static), and the encrypted ones: LUKS and qcow2 with ``encrypt.format=luks`` (both
servers given the key; QEMU's view of the plaintext is the oracle).  One trace per format of
READ, WRITE, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO), TRIM and BLOCK_STATUS at offsets and
lengths that are not aligned to anything: one byte, odd lengths, ranges straddling sectors, 4 KiB
pages, clusters and blocks, and large reads from odd offsets (the ones the server answers
sparsely, from block status).  Then:
  * every READ equals the model (and qemu-nbd's answer);
  * a TRIM (a hint) leaves each sector piece it touched either as it was or zeroed, nothing
    else; where QEMU serves the image its result must be the same (or, for VHDX, which QEMU
    never trims, qemu-nbd's copy is given our bytes);
  * FAST_ZERO either zeroes or fails with ENOTSUP and changes nothing;
  * every BLOCK_STATUS answer starts at the asked offset, is contiguous, never calls non-zero
    bytes ZERO, and agrees with the whole-disk map at every extent;
  * at the end: ``qemu-img compare`` of both exports equal, the whole-disk maps (``nbdinfo
    --map``, base:allocation and qemu:allocation-depth) equal where QEMU reports real maps (not
    VHDX), and the image file passes ``qemu-img check`` / compares equal to the model.
Images QEMU cannot make or read come from ``tests/vhdxgen.py`` and ``tests/vhdgen.py``.
"""

from __future__ import annotations

import errno
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest

from tests import vhdgen
from tests.imagetest import check_clean, compare_with_model
from tests.lukstest import (
    check_clean_key,
    make_luks,
    make_qcow2,
    qemu_compare_key,
    qemu_io_key,
    qemu_nbd_key,
    qemu_raw_key,
    secret_file,
    serve_key,
)
from tests.util import merged_map, nbd_connect, qemu_img, qemu_io, qemu_nbd, serve
from tests.util import run as run_cmd
from tests.vhdxgen import Vhdx, chain

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
FILL = ["write -P 0x11 0 5000", "write -P 0x22 1000k 200k", "write -P 0x33 3M 1M", "write -P 0x44 6M 512"]


@dataclass
class Case:
    fmt: str  # nbdserve / qemu-nbd format name
    granules: tuple[int, ...]  # boundaries worth straddling (sector, page, cluster, block)
    qemu: bool  # QEMU reads it: qemu-nbd serves a copy
    maps: bool  # QEMU reports real allocation maps for it
    lss: int = 512
    key: bool = False  # encrypted: served, checked and compared with the passphrase


CASES = {
    "raw": Case("raw", (512, 4 * KiB), qemu=True, maps=True),
    "qcow2": Case("qcow2", (512, 4 * KiB, 64 * KiB), qemu=True, maps=True),
    "qed": Case("qed", (512, 4 * KiB, 64 * KiB), qemu=True, maps=True),
    "vpc": Case("vpc", (512, 4 * KiB, 2 * MiB), qemu=True, maps=True),
    "vpc-diff": Case("vpc", (512, 4 * KiB, 256 * KiB), qemu=False, maps=False),
    "vhdx": Case("vhdx", (512, 4 * KiB, MiB), qemu=True, maps=False),
    "vhdx-4k": Case("vhdx", (4 * KiB, MiB), qemu=False, maps=False, lss=4096),
    "vhdx-diff": Case("vhdx", (512, 4 * KiB, MiB), qemu=False, maps=False),
    "vhdx-diff-4k": Case("vhdx", (4 * KiB, MiB), qemu=False, maps=False, lss=4096),
    "vmdk": Case("vmdk", (512, 4 * KiB, 64 * KiB), qemu=True, maps=True),
    "vmdk-zeroed": Case("vmdk", (512, 4 * KiB, 64 * KiB), qemu=True, maps=True),
    "vdi": Case("vdi", (512, 4 * KiB, MiB), qemu=True, maps=True),
    "vdi-static": Case("vdi", (512, 4 * KiB, MiB), qemu=True, maps=True),
    "luks": Case("luks", (512, 4 * KiB), qemu=True, maps=True, key=True),
    "qcow2-luks": Case("qcow2", (512, 4 * KiB, 64 * KiB), qemu=True, maps=True, key=True),
}
CREATE = {
    "vpc": ["-o", "force_size=on"],
    "vhdx": ["-o", "block_size=1M"],
    "vmdk-zeroed": ["-o", "zeroed_grain=on"],
    "vdi-static": ["-o", "static=on"],
}


def make_image(tmp: Path, name: str, case: Case, rng: random.Random) -> tuple[Path, bytes]:
    """The image to serve and the disk it holds."""
    if case.key:
        path, secret = tmp / f"img.{case.fmt}", secret_file(tmp)
        (make_luks if case.fmt == "luks" else make_qcow2)(path, SIZE, secret)
        qemu_io_key(path, case.fmt, secret, *FILL)
        return path, qemu_raw_key(path, case.fmt, secret, tmp)
    if case.qemu:
        path = tmp / f"img.{case.fmt}"
        opts = CREATE.get(name, [])
        qemu_img("create", "-q", "-f", case.fmt, *opts, path, str(SIZE))
        qemu_io(case.fmt, path, *FILL)
        out = tmp / "initial.raw"
        qemu_img("convert", "-f", case.fmt, "-O", "raw", path, out)
        data = out.read_bytes()
        out.unlink()
        return path, data
    if name == "vhdx-4k":
        g = Vhdx(str(tmp / "img.vhdx"), SIZE, block_size=MiB, lss=4096)
        g.put_block(1, rng.randbytes(MiB))
        g.set_entry(g.payload_index(3), 2)
        data = bytearray(SIZE)
        data[MiB : 2 * MiB] = g.read(g.entry(g.payload_index(1)) & ~0xFFFFF, MiB)
        return Path(g.path), bytes(data)
    if name.startswith("vhdx-diff"):
        layers, models = chain(tmp, rng, levels=2, lss=case.lss, size=SIZE)
        return Path(layers[-1].path), models[-1]
    paths, models = vhdgen.chain(tmp, rng, levels=2, size=SIZE)
    return Path(paths[-1]), models[-1]


def trace(rng: random.Random, case: Case) -> list[tuple[str, int, int]]:
    """(kind, offset, length): edge cases around every granule, then random unaligned ones."""
    ops: list[tuple[str, int, int]] = []
    top = case.granules[-1]
    for at in range(0, min(SIZE, 8 * top), top):  # odd starts in the first granules: sparse reads
        ops += [("status", at + 1, 10), ("read", at + 10, 65536), ("read", at + 100, 300000)]
    for g in case.granules:
        k = rng.randrange(1, SIZE // g - 1)
        at = k * g
        ops += [
            ("write", at - 1, 2),  # one byte each side of the boundary
            ("read", at - 1, 1),
            ("status", at - 3, 7),
            ("zero", at - 5, 11),
            ("read", at - 700, 1401),
            ("write", at + 1, g + 3),
            ("zero_no_hole", at - g - 1, 2 * g + 3),
            ("status", at - g + 1, 2 * g - 1),
            ("trim", at - g - 7, 3 * g + 9),
            ("fast_zero", at + 3, g),
            ("read", at - g - 100, 3 * g + 333),
        ]
    for _ in range(30):
        kind = rng.choice(["read", "write", "write", "zero", "zero_no_hole", "fast_zero", "trim", "status"])
        off = rng.randrange(SIZE - 1)
        n = rng.choice([1, rng.randrange(1, 1100), rng.randrange(1, 70000), rng.randrange(1, 3 * MiB)])
        ops.append((kind, off, n))
    return [(kind, max(0, off), min(n + min(0, off), SIZE - max(0, off))) for kind, off, n in ops]


def connect(uri: str):
    h = nbd_connect(uri)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)  # unaligned: the server copes
    return h


def fast_zero(h, off: int, n: int) -> bool:
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
        return True
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, e
        return False


def block_status(h, off: int, n: int) -> list[tuple[int, int]]:
    """base:allocation extents (length, flags) for ``[off, off+n)``, clipped to it."""
    got: list[tuple[int, int]] = []

    def cb(ctx, start, entries, err):
        assert start == off
        if ctx == "base:allocation":
            got.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    h.block_status(n, off, cb)
    out, pos = [], off
    for length, flags in got:
        if pos >= off + n:
            break
        length = min(length, off + n - pos)
        out.append((length, flags))
        pos += length
    assert out and pos <= off + n
    return out


def flags_at(whole: list[tuple[int, int, int]], at: int) -> int:
    for start, length, kind in whole:
        if start <= at < start + length:
            return kind
    raise AssertionError(at)


def check_status(h, model: bytearray, off: int, n: int, whole) -> None:
    pos = off
    for length, flags in block_status(h, off, n):
        if flags & nbd.STATE_ZERO:
            assert model[pos : pos + length] == bytes(length), f"status calls {pos}+{length} zero"
        if whole is not None:
            assert flags_at(whole, pos) == flags and flags_at(whole, pos + length - 1) == flags, (pos, length)
        pos += length


@pytest.mark.parametrize("name", list(CASES))
def test_unaligned_requests(tmp_path, name):
    case = CASES[name]
    rng = random.Random(name)
    path, initial = make_image(tmp_path, name, case, rng)
    model = bytearray(initial)
    if case.qemu:  # phase A: the same requests to qemu-nbd serving a copy
        copy = tmp_path / ("copy" + path.suffix)
        run_cmd("cp", "--sparse=always", path, copy)  # host holes matter to both maps
        ops = trace(rng, case)
        with served(tmp_path, case, path) as srv, oracle(tmp_path, case, copy) as q:
            # writes first, then the maps must agree; zeroing leaves each server free to allocate
            # or not (NBD lets it), so after the zeroes only the bytes must agree.  TRIM: phase B.
            run_trace(srv, q, [op for op in ops if op[0] in ("read", "write", "status")], model, case.maps)
            run_trace(srv, q, [op for op in ops if op[0] in ("read", "zero", "zero_no_hole", "fast_zero")], model)
    with served(tmp_path, case, path) as srv:  # phase B (only phase for the rest): everything
        run_trace(srv, None, trace(rng, case), model)
    if case.key:
        secret = secret_file(tmp_path)
        if case.fmt == "qcow2":
            check_clean_key(path, secret)
        ref = tmp_path / "model.raw"
        ref.write_bytes(model)
        r = qemu_compare_key(path, case.fmt, ref, "raw", secret)
        assert r.returncode == 0, r.stdout + r.stderr
    elif case.qemu:
        if case.fmt in ("qcow2", "qed", "vhdx", "vmdk", "vdi"):
            check_clean(path, case.fmt)
        compare_with_model(path, model, tmp_path, case.fmt)
    elif case.fmt == "vpc":
        vhdgen.verify(path)
    with served(tmp_path, case, path, readonly=True) as srv:  # and after a restart
        h = connect(srv.uri)
        assert h.pread(SIZE, 0) == model
        h.shutdown()


QEMU_NBD = ("--cache=writeback", "--discard=unmap", "--shared=4", "--allocation-depth")


def served(tmp: Path, case: Case, path: Path, *, readonly: bool = False):
    """nbdserve serving ``path`` (with the key if encrypted)."""
    if case.key:
        return serve_key(tmp, path, secret_file(tmp), readonly=readonly)
    return serve(tmp, *(["-r"] if readonly else []), "-f", case.fmt, path)


def oracle(tmp: Path, case: Case, path: Path):
    """qemu-nbd serving ``path`` (with the key if encrypted)."""
    if case.key:
        return qemu_nbd_key(tmp, path, case.fmt, secret_file(tmp), *QEMU_NBD)
    return qemu_nbd(tmp, path, case.fmt, *QEMU_NBD)


def run_trace(srv, q, ops, model: bytearray, maps: bool = False) -> None:
    """``ops`` through nbdserve (and qemu-nbd, if ``q``), checked as the module docstring says;
    ``maps``: the whole-disk maps of the two servers must agree too."""
    h = connect(srv.uri)
    hq = connect(q.uri) if q is not None else None
    assert h.pread(SIZE, 0) == model
    statuses: list[tuple[int, int]] = []
    for kind, off, n in ops:
        _apply(kind, off, n, h, hq, model, statuses)
        lo, hi = max(0, off - 4 * KiB), min(SIZE, off + n + 4 * KiB)
        assert h.pread(hi - lo, lo) == model[lo:hi], (kind, off, n)  # nothing else moved
    h.flush()
    assert h.pread(SIZE, 0) == model
    whole = merged_map(srv.uri)
    for off, n in statuses:  # unaligned answers agree with the whole map (and so with QEMU's)
        check_status(h, model, off, n, whole)
    if hq is not None:
        hq.flush()
        r = run_cmd("qemu-img", "compare", "-f", "raw", "-F", "raw", q.uri, srv.uri, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        if maps:
            same_map(whole, merged_map(q.uri))
            depth = "qemu:allocation-depth"
            assert merged_map(srv.uri, depth) == merged_map(q.uri, depth)
        hq.shutdown()
    h.shutdown()


def same_map(ours: list[tuple[int, int, int]], theirs: list[tuple[int, int, int]]) -> None:
    """Equal maps, except that QEMU may call ZERO what we call data: it looks for host holes
    inside allocated clusters, we do not (we never call ZERO what QEMU calls data)."""
    cuts = sorted({s for s, _, _ in ours} | {s for s, _, _ in theirs} | {SIZE})
    for a, b in itertools.pairwise(cuts):
        mine, qemu = flags_at(ours, a), flags_at(theirs, a)
        assert mine == qemu or (mine == 0 and qemu == nbd.STATE_ZERO), f"map at {a}+{b - a}: {mine} vs QEMU {qemu}"


def _apply(kind: str, off: int, n: int, h, hq, model: bytearray, statuses: list) -> None:
    both = [x for x in (h, hq) if x is not None]
    if kind == "read":
        for who, x in zip(("nbdserve", "qemu-nbd"), both, strict=False):
            assert x.pread(n, off) == model[off : off + n], (who, kind, off, n)
    elif kind == "status":
        check_status(h, model, off, n, None)
        statuses.append((off, n))
    elif kind == "write":
        data = bytes([off % 251 + 1]) * n
        for x in both:
            x.pwrite(data, off)
        model[off : off + n] = data
    elif kind in ("zero", "zero_no_hole"):
        for x in both:
            x.zero(n, off, nbd.CMD_FLAG_NO_HOLE if kind == "zero_no_hole" else 0)
        model[off : off + n] = bytes(n)
    elif kind == "fast_zero":  # as qemu-img does: FAST_ZERO, and a plain zero if that is refused
        for x in both:
            if not fast_zero(x, off, n):
                if x is h:  # nbdserve refuses before changing anything (NBD would allow less)
                    assert h.pread(n, off) == model[off : off + n], ("fast zero changed", off, n)
                x.zero(n, off)
        model[off : off + n] = bytes(n)
    else:  # trim: each sector piece it touched stays or reads zeroes
        h.trim(n, off)
        after = h.pread(n, off)
        for lo in range(off - off % 512, off + n, 512):
            a, b = max(lo, off), min(lo + 512, off + n)
            assert after[a - off : b - off] in (model[a:b], bytes(b - a)), f"trim of {off}+{n} changed {a}"
        model[off : off + n] = after
