"""qcow2 data safety: lying refcounts, metadata overlap, open-time consistency, hostile headers.

* Lying refcounts: an image with a snapshot, a compressed cluster and bitmaps gets one refcount
  changed (0, 1 or too high) for each kind of cluster (header, L1, L2, snapshot L1 and L2,
  refcount table and block, snapshot table, bitmap directory, data clusters private and shared,
  a compressed cluster, a free cluster).  A seeded workload of unaligned writes, zeroes and trims
  runs against it with every ``repair`` mode: every acknowledged write reads back, nothing else
  changes (the active disk against a bytearray model, the snapshot against QEMU's view of it
  before), and ``qemu-img check`` afterwards finds the image clean, or finds exactly the lie the
  mode was told to leave alone (leaks only), or the file was never written (served read-only).
* Lying COPIED flags in the same image: set on a shared or a compressed cluster (harmful: kept
  read-only unless ``repair=all`` corrects it), missing on a private one (harmless: repaired
  with ``leaks`` or ``all``), with the same workload and judges.
* The runtime overlap guard: refcounts that start lying after the open (the file changed under
  us) make allocation hand out a metadata cluster; the write fails with EIO, nothing lands on the
  metadata, and the image is marked corrupt.
* Interop bugs found by independent readers: a small write into a fresh cluster leaves the file
  covering the whole cluster; copying an L2 table keeps COPIED exactly where refcounts are 1.
* Opens: an L1 table or refcount block past the end of the file is served read-only with a
  warning naming the field; a NUL in the backing file name and any mutation of the header
  cluster end in a one-line ``ImageError``, never another exception.
"""

from __future__ import annotations

import json
import logging
import os
import random
import struct
from pathlib import Path

import pytest

from nbdserve.errors import CorruptImage, ImageError, NbdError
from nbdserve.formats.base import OpenOptions
from nbdserve.storage.base import settled
from tests.conftest import SLOW
from tests.imagetest import check_clean, opened, qemu_raw, read_image, run
from tests.util import qemu_img, qemu_io
from tests.util import run as run_cmd

K = 1024
M = 1024 * K
CS = 64 * K
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


# -- reading the layout of a small 64 KiB-cluster, 16-bit-refcount image ------------------------


class Layout:
    """The clusters of a qcow2 file by role (standard L2, one refcount table cluster)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        (self.l1_size, self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots, self.sn_offset) = (
            struct.unpack_from(">IQQIIQ", raw, 36)
        )
        self.cb = struct.unpack_from(">I", raw, 20)[0]
        self.order = struct.unpack_from(">I", raw, 96)[0]
        self.l1 = [self.q(self.l1_offset + 8 * i) for i in range(self.l1_size)]
        self.refblocks = [e for e in (self.q(self.rt_offset + 8 * i) for i in range(CS // 8)) if e]
        self.snap_l1_offsets = []
        pos = self.sn_offset
        for _ in range(self.nb_snapshots):
            l1_off, _l1_size, id_len, name_len = struct.unpack_from(">QIHH", raw, pos)
            extra = struct.unpack_from(">I", raw, pos + 36)[0]
            self.snap_l1_offsets.append(l1_off)
            pos += (40 + extra + id_len + name_len + 7) & ~7

    def q(self, off: int) -> int:
        return struct.unpack_from(">Q", self.raw, off)[0]

    def l2(self, l1e: int) -> list[int]:
        base = l1e & OFFSET_MASK
        return [self.q(base + 8 * i) for i in range(CS // 8)]

    def refcount(self, cluster: int) -> int:
        return struct.unpack_from(">H", self.raw, self.refblocks[0] + 2 * cluster)[0]


def set_refcount(raw: bytearray, cluster: int, value: int) -> None:
    """Change a 16-bit refcount in the file (any cluster size)."""
    cb = struct.unpack_from(">I", raw, 20)[0]
    assert struct.unpack_from(">I", raw, 96)[0] == 4
    per_block = (1 << cb) // 2
    rt = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, rt + 8 * (cluster // per_block))[0]
    struct.pack_into(">H", raw, block + 2 * (cluster % per_block), value)


@pytest.fixture(scope="module")
def lying_base(tmp_path_factory) -> tuple[bytes, dict[str, int], bytes, bytes]:
    """(image bytes, role -> cluster, active disk, snapshot disk) of the image the lies go into."""
    d = tmp_path_factory.mktemp("lying")
    p = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io("qcow2", p, "write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -c -P 0x33 2M 64k")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io("qcow2", p, "write -P 0x44 64k 64k", "write -P 0x55 3M 100k")  # copies the L2 table
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_io("qcow2", p, "write -P 0x66 5M 64k")  # dirties the bitmap: a bitmap data cluster
    raw = p.read_bytes()
    lay = Layout(raw)
    active_l2 = lay.l1[0] & OFFSET_MASK
    snap_l1 = lay.snap_l1_offsets[0]
    snap_l2 = lay.q(snap_l1) & OFFSET_MASK
    assert snap_l2 != active_l2
    t = lay.l2(lay.l1[0])
    bm_ext = raw.find(struct.pack(">I", 0x23852875), 104)
    bm_dir = struct.unpack_from(">Q", raw, bm_ext + 8 + 16)[0]
    bm_table = struct.unpack_from(">Q", raw, bm_dir)[0]
    bm_data = struct.unpack_from(">Q", raw, bm_table)[0]
    file_clusters = -(-len(raw) // CS)
    roles = {
        "header": 0,
        "reftable": lay.rt_offset >> 16,
        "refblock": lay.refblocks[0] >> 16,
        "l1": lay.l1_offset >> 16,
        "l2": active_l2 >> 16,
        "snap_l1": snap_l1 >> 16,
        "snap_l2": snap_l2 >> 16,
        "snap_table": lay.sn_offset >> 16,
        "bitmap_dir": bm_dir >> 16,
        "bitmap_table": bm_table >> 16,
        "bitmap_data": bm_data >> 16,
        "data": (t[1] & OFFSET_MASK) >> 16,  # written after the snapshot: refcount 1
        "shared_data": (t[0] & OFFSET_MASK) >> 16,  # shared with the snapshot: refcount 2
        "compressed": (t[32] & ((1 << 54) - 1)) >> 16,
        "free_at_eof": file_clusters,
    }
    assert t[1] & COPIED and not t[0] & COPIED and t[32] & COMPRESSED
    assert len(set(roles.values())) == len(roles), roles
    active = qemu_raw(p, d)
    snap = qemu_raw(p, d, "-l", "snapshot.name=s1")
    return raw, roles, active, snap


def workload(seed: int, size: int) -> list[tuple[str, int, int, int]]:
    """Unaligned writes (many into fresh clusters, so allocation runs), zeroes and trims."""
    rng = random.Random(seed)
    ops = []
    for i in range(30):
        off = rng.randrange(0, size - 1)
        n = min(rng.choice([1, 700, 4 * K + 3, 70 * K, 200 * K]), size - off)
        kind = rng.choice(["write"] * 5 + ["zero", "zero_keep", "trim", "flush"])
        ops.append((kind, off, n, i % 250 + 1))
    return ops


async def apply(img, model: bytearray, ops) -> None:
    cs = img.driver.cs
    for kind, off, n, byte in ops:
        if kind == "write":
            data = bytes([byte]) * n
            await settled(img.write(off, memoryview(data), fua=False))
            model[off : off + n] = data
        elif kind in ("zero", "zero_keep"):
            await img.write_zeroes(off, n, may_trim=kind == "zero", fast=False, fua=False)
            model[off : off + n] = bytes(n)
        elif kind == "trim":
            await img.trim(off, n, fua=False)
            start, end = -(-off // cs) * cs, (off + n) // cs * cs
            if end > start:
                model[start:end] = bytes(end - start)
        else:
            await img.flush()


def serve_and_apply(path: Path, options: OpenOptions, model: bytearray, ops, caplog, unreadable: int | None = None):
    """Open ``path`` with ``options`` (warnings into ``caplog``).  Served read-only: every cluster
    reads as ``model`` (cluster ``unreadable`` fails with CorruptImage instead); returns True.
    Else ``ops`` are applied to the image and to ``model``, which the image then reads as; False."""

    async def main() -> bool:
        img = await opened(path, options=options)
        try:
            if img.readonly:
                buf = memoryview(bytearray(CS))
                for c in range(img.size // CS):
                    if c == unreadable:
                        with pytest.raises(CorruptImage):
                            await settled(img.read(c * CS, buf))
                        continue
                    await settled(img.read(c * CS, buf))
                    assert buf == model[c * CS : (c + 1) * CS], c
                return True
            await apply(img, model, ops)
            assert await read_image(img) == model, "an acknowledged write does not read back"
            return False
        finally:
            await img.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
        return run(main())


def qemu_check(path: Path) -> dict:
    p = run_cmd("qemu-img", "check", "--output=json", path, check=False)
    assert p.returncode in (0, 2, 3), p.stdout + p.stderr
    return json.loads(p.stdout)


# Each role's true refcount in ``lying_base``: clusters written before the snapshot are shared with
# it, the cluster past the end of the file is free, every other one is used once.
TRUE_REFCOUNT = {role: 1 for role in (
    "header", "reftable", "refblock", "l1", "l2", "snap_l1", "snap_l2", "snap_table", "bitmap_dir", "bitmap_table",
    "bitmap_data", "data",
)} | {"shared_data": 2, "compressed": 2, "free_at_eof": 0}  # fmt: skip
LIE_VALUE = {"zero": lambda true: 0, "one": lambda true: 1, "high": lambda true: true + 3}
# Every (role, lie) pair where the lie differs from the truth.
LIES = [(role, how) for role, true in TRUE_REFCOUNT.items() for how in LIE_VALUE if LIE_VALUE[how](true) != true]


@pytest.mark.parametrize(("role", "how"), LIES, ids=[f"{r}-{h}" for r, h in LIES])
def test_lying_refcounts(tmp_path, lying_base, role, how, caplog):
    raw, roles, active, snap = lying_base
    cluster = roles[role]
    true = Layout(raw).refcount(cluster)
    assert true == TRUE_REFCOUNT[role], "lying_base no longer has the layout the lies are chosen for"
    lie = LIE_VALUE[how](true)
    bad = bytearray(raw)
    set_refcount(bad, cluster, lie)
    harmful = lie < true
    (tmp_path / "before.qcow2").write_bytes(bad)
    before = qemu_check(tmp_path / "before.qcow2")
    for mode in ("default", "off", "leaks", "all"):
        path = tmp_path / f"{mode}.qcow2"
        path.write_bytes(bad)
        model = bytearray(active)
        options = OpenOptions() if mode == "default" else OpenOptions(repair=mode)
        served_ro = serve_and_apply(path, options, model, workload(hash((role, how)) & 0xFFFF, 8 * M), caplog)
        report = qemu_check(path)
        if served_ro:
            # Only refused when the lie is harmful and the mode may not repair it.
            assert harmful and mode in ("default", "off", "leaks"), (mode, caplog.text)
            assert "refcount" in caplog.text and "read-only" in caplog.text
            assert path.read_bytes() == bad  # never written
            assert report.get("corruptions", 0) > 0  # QEMU sees the lie too
            continue
        assert qemu_raw(path, tmp_path) == model  # QEMU reads what we acknowledged
        assert qemu_raw(path, tmp_path, "-l", "snapshot.name=s1") == snap  # the snapshot is untouched
        assert report.get("check-errors", 0) == 0, report
        if mode in ("leaks", "all"):
            check_clean(path)
        else:  # a harmless lie (a leak), left alone and warned about; no worse than before
            assert not harmful and "leak" in caplog.text
            assert report.get("corruptions", 0) <= before.get("corruptions", 0), (before, report)


# Lies in the active L2 table's COPIED flags (entry index, flag change, harmful): COPIED on a
# cluster shared with the snapshot or on a compressed one would let a write land in place (the
# snapshot would change); COPIED missing on a cluster used once only costs a copy.
COPIED_LIES = {
    "shared-copied": (0, COPIED, True),
    "compressed-copied": (32, COPIED, True),
    "data-missing": (1, -COPIED, False),
}


@pytest.mark.parametrize("lie", list(COPIED_LIES))
def test_lying_copied_flags(tmp_path, lying_base, lie, caplog):
    """A COPIED flag that lies: a harmful one keeps the image read-only unless ``repair=all``
    (which rebuilds and corrects the flags), a harmless one is repaired with ``leaks`` or
    ``all``.  Whenever the image is served writable, writes into the lying entry's cluster and
    elsewhere read back, QEMU reads the same disk, and the snapshot is untouched."""
    raw, _roles, active, snap = lying_base
    index, change, harmful = COPIED_LIES[lie]
    lay = Layout(raw)
    at = (lay.l1[0] & OFFSET_MASK) + 8 * index
    bad = bytearray(raw)
    entry = lay.q(at)
    struct.pack_into(">Q", bad, at, entry | COPIED if change > 0 else entry & ~COPIED)
    for mode in ("default", "off", "leaks", "all"):
        path = tmp_path / f"{mode}.qcow2"
        path.write_bytes(bad)
        model = bytearray(active)
        options = OpenOptions() if mode == "default" else OpenOptions(repair=mode)
        ops = [("write", index * CS + 1000, 5000, 0x77), *workload(index, 8 * M), ("flush", 0, 0, 0)]
        unreadable = index if lie == "compressed-copied" else None  # reading it is an error too
        served_ro = serve_and_apply(path, options, model, ops, caplog, unreadable)
        if served_ro:
            assert harmful and mode != "all", (mode, caplog.text)
            assert "COPIED" in caplog.text and "read-only" in caplog.text, caplog.text
            assert path.read_bytes() == bad  # never written
            continue
        assert qemu_raw(path, tmp_path) == model
        assert qemu_raw(path, tmp_path, "-l", "snapshot.name=s1") == snap  # the snapshot is untouched
        if mode in ("leaks", "all"):
            check_clean(path)
        else:
            assert not harmful and "harmless" in caplog.text, caplog.text


# -- the runtime overlap guard ----------------------------------------------------------------

GUARD_ROLES = [
    "header", "reftable", "refblock", "l1", "l2", "snap_l1", "snap_l2", "snap_table", "bitmap_dir", "bitmap_table",
    "bitmap_data",
]  # fmt: skip


@pytest.mark.parametrize("role", GUARD_ROLES)
def test_allocation_onto_metadata_is_refused_at_run_time(tmp_path, lying_base, role):
    """The open-time check passes, then the file's refcount block says a metadata cluster is
    free (another program wrote it): the allocating write that would land there fails with EIO,
    the metadata is intact, the image is marked corrupt and further writes are refused."""
    raw, roles, active, snap = lying_base
    cluster = roles[role]
    path = tmp_path / "g.qcow2"
    path.write_bytes(raw)
    before = raw[cluster * CS : (cluster + 1) * CS]

    async def main():
        img = await opened(path, cache=CS)  # room for one table: the refcount block gets evicted
        try:
            assert not img.readonly
            assert await read_image(img) == active  # loads the L2 table: the refcount block goes
            lied = bytearray(path.read_bytes())
            set_refcount(lied, cluster, 0)
            with open(path, "r+b") as f:  # under the driver
                f.write(lied)
            with pytest.raises((CorruptImage, NbdError)) as info:
                # Fresh clusters everywhere: allocation walks every free-looking cluster.
                for off in range(6 * M, 8 * M, CS):
                    await settled(img.write(off + 100, memoryview(b"\xee" * 100), fua=False))
            assert "metadata" in str(info.value)
            with pytest.raises((CorruptImage, NbdError)):
                await settled(img.write(7 * M + 5, memoryview(b"x"), fua=False))
            assert (await read_image(img))[: 6 * M] == active[: 6 * M]
        finally:
            await img.close()

    run(main())
    after = path.read_bytes()[cluster * CS : (cluster + 1) * CS]
    assert b"\xee" * 100 not in after  # no data landed there
    if role == "header":  # only the feature bits changed (corrupt set)
        assert after[:72] == before[:72] and after[96:] == before[96:]
    elif role == "bitmap_dir":  # only the bitmap's in_use flag, set at open
        want = bytearray(before)
        want[15] |= 1
        assert after == want
    elif role != "refblock":  # (the refcount block itself is rightly written)
        assert after == before
    info = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    # nothing more was written after the refusal: the bitmap was not stored and stays in use
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    assert qemu_raw(path, tmp_path, "-l", "snapshot.name=s1") == snap


# -- interop: fresh clusters and COPIED -------------------------------------------------------


def file_covers_every_cluster(path: Path) -> None:
    size = path.stat().st_size
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        if "offset" in e:
            assert e["offset"] + e["length"] <= size, (e, size)
    lay = Layout(path.read_bytes())
    for l1e in lay.l1:
        if l1e & OFFSET_MASK:
            assert (l1e & OFFSET_MASK) + CS <= size
            for e in lay.l2(l1e):
                if e & OFFSET_MASK and not e & COMPRESSED:
                    assert (e & OFFSET_MASK) + CS <= size, hex(e)


def test_small_write_into_fresh_cluster_covers_the_cluster(tmp_path):
    """Issue 14 item 4: the file ends at a cluster boundary after small writes at EOF."""
    path = tmp_path / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    model = bytearray(8 * M)

    async def main():
        img = await opened(path)
        try:
            for off, n in ((100, 10), (1 * M + 7, 512), (3 * M, 1), (5 * M + 65000, 1000), (7 * M + 4096, 4096)):
                await settled(img.write(off, memoryview(b"\x5a" * n), fua=False))
                model[off : off + n] = b"\x5a" * n
        finally:
            await img.close()

    run(main())
    file_covers_every_cluster(path)
    assert path.stat().st_size % CS == 0
    check_clean(path)
    assert qemu_raw(path, tmp_path) == model


def test_l2_copy_sets_copied_where_refcount_is_one(tmp_path):
    """Issue 14 item 5: an L1 entry without COPIED over an L2 table of refcount 1 (QEMU calls
    the flag wrong, the data is fine).  A write through it must leave every active entry's
    COPIED flag equal to "refcount is 1", as ``qemu-img check`` demands."""
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x21 0 128k", "write -P 0x22 1M 64k")
    raw = bytearray(path.read_bytes())
    l1 = Layout(bytes(raw)).l1_offset
    struct.pack_into(">Q", raw, l1, struct.unpack_from(">Q", raw, l1)[0] & ~COPIED)
    path.write_bytes(raw)
    model = bytearray(qemu_raw(path, tmp_path))

    async def main():
        img = await opened(path)
        try:
            assert not img.readonly
            await settled(img.write(3 * M + 5, memoryview(b"\x23" * 10), fua=False))
            model[3 * M + 5 : 3 * M + 15] = b"\x23" * 10
        finally:
            await img.close()

    run(main())
    check_clean(path)
    assert qemu_raw(path, tmp_path) == model


def test_l2_copy_of_a_shared_table_keeps_shared_entries_unflagged(tmp_path):
    """The usual copy (L2 shared with a snapshot): shared entries stay without COPIED, the new
    cluster has it; checked by QEMU and against the snapshot."""
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x31 0 128k")
    qemu_img("snapshot", "-c", "s", path)
    snap = qemu_raw(path, tmp_path, "-l", "snapshot.name=s")
    model = bytearray(snap)

    async def main():
        img = await opened(path)
        try:
            await settled(img.write(2 * M, memoryview(b"\x32" * 3), fua=False))
            model[2 * M : 2 * M + 3] = b"\x32" * 3
        finally:
            await img.close()

    run(main())
    check_clean(path)
    assert qemu_raw(path, tmp_path) == model
    assert qemu_raw(path, tmp_path, "-l", "snapshot.name=s") == snap
    lay = Layout(path.read_bytes())
    t = lay.l2(lay.l1[0])
    assert not t[0] & COPIED and t[32] & COPIED


# -- opens: past EOF, NUL bytes, header mutations ---------------------------------------------


def test_l1_table_past_eof_is_served_read_only(tmp_path, caplog):
    """Issue 14 item 14: QEMU reads an L1 table that runs past EOF (the rest reads as zeroes)."""
    path = tmp_path / "l1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x41 0 64k")
    raw = bytearray(path.read_bytes())
    lay = Layout(bytes(raw))
    raw += bytes(-len(raw) % CS)
    moved = len(raw)  # the L1 table moves to the last cluster and grows past the end
    raw += struct.pack(">Q", lay.l1[0]) + bytes(CS - 8)
    struct.pack_into(">IQ", raw, 36, 2 * CS // 8, moved)
    path.write_bytes(raw)
    expected = qemu_raw(path, tmp_path)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert img.readonly
            assert await read_image(img) == expected
        finally:
            await img.close()

    run(main())
    assert "l1_table_offset" in caplog.text and "read-only" in caplog.text
    assert path.read_bytes() == raw


def test_refcount_block_past_eof_is_served_read_only(tmp_path, caplog):
    path = tmp_path / "rb.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x42 0 64k")
    raw = bytearray(path.read_bytes())
    rt = Layout(bytes(raw)).rt_offset
    struct.pack_into(">Q", raw, rt + 8, 64 * CS)  # refcount block 1: far past the end
    path.write_bytes(raw)
    expected = qemu_raw(path, tmp_path)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert img.readonly
            assert await read_image(img) == expected
        finally:
            await img.close()

    run(main())
    assert "refcount table entry 1" in caplog.text and "read-only" in caplog.text


def test_backing_name_with_nul_is_refused_in_one_line(tmp_path):
    """Issue 14 item 6."""
    (tmp_path / "b.raw").write_bytes(bytes(M))
    path = tmp_path / "n.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", path, "1M")
    raw = bytearray(path.read_bytes())
    off, n = struct.unpack_from(">QI", raw, 8)
    assert raw[off : off + n] == b"b.raw"
    raw[off + 1] = 0
    path.write_bytes(raw)
    for readonly in (True, False):
        with pytest.raises(ImageError) as info:
            run(opened(path, readonly=readonly))
        assert "NUL" in str(info.value) and "\n" not in str(info.value)
    # NUL padding at the end is no ambiguity (QEMU reads the name as a C string): served.
    struct.pack_into(">QI", raw, 8, off, n + 3)
    raw[off : off + n + 3] = b"b.raw\0\0\0"
    path.write_bytes(raw)

    async def main():
        img = await opened(path, readonly=True)
        try:
            assert img.driver.backing.name == "b.raw" and img.backing is not None
        finally:
            await img.close()

    run(main())


def header_mutants(raw: bytes, rng: random.Random, n: int, end: int = 0):
    """Mutations of the header cluster (or of the first ``end`` bytes): random bytes, bit flips,
    fields set to edge values."""
    end = end or struct.unpack_from(">I", raw, 100)[0] + 200
    edges = [0, 1, 7, 8, 0x200, 0xFFFF, 0xFFFFFFFF, 1 << 31]
    for _ in range(n):
        out = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            pos = rng.randrange(0, end)
            if r < 0.4:
                out[pos] ^= 1 << rng.randrange(8)
            elif r < 0.7:
                out[pos] = rng.randrange(256)
            else:
                pos &= ~3
                struct.pack_into(">I", out, pos, rng.choice(edges) & 0xFFFFFFFF)
        yield out


@pytest.fixture(scope="module")
def header_rich(tmp_path_factory) -> tuple[Path, bytes]:
    """Backing file + format, a bitmap, a snapshot: every kind of header extension we parse."""
    d = tmp_path_factory.mktemp("mut")
    (d / "b.raw").write_bytes(bytes(M))
    p = d / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 64k", "write -c -P 2 128k 64k")
    qemu_img("snapshot", "-c", "s", p)
    qemu_img("bitmap", "--add", p, "bm")
    return d, p.read_bytes()


@pytest.mark.parametrize("where", ["header", "tables"])
def test_mutations_end_in_one_line_errors(header_rich, where):
    """Mutants of the header cluster, or of any metadata table (L1, L2, refcount, snapshot,
    bitmap), opened read-only and read-write (which runs the consistency check over every table
    the mutant names): an open and a read or write either succeed or end in ImageError /
    NbdError / OSError with a one-line message, never another exception."""
    d, raw = header_rich
    rng = random.Random(1414 if where == "header" else 1415)
    path = d / "mutant.qcow2"
    end = 0 if where == "header" else len(raw)
    for i, mutant in enumerate(header_mutants(raw, rng, 3000 if SLOW else 300, end)):
        path.write_bytes(mutant)

        async def main(readonly=i % 2 == 0):
            img = await opened(path, readonly=readonly, fmt="qcow2")
            try:
                n = min(img.size, 2 * M)  # a mutated size may be huge: read the start
                if n:
                    await settled(img.read(0, memoryview(bytearray(n))))
                if not img.readonly and n:
                    await settled(img.write(n // 2, memoryview(b"\x77" * 700), fua=True))
            finally:
                await img.close()

        try:
            run(main())
        except (ImageError, NbdError, OSError) as e:
            assert "\n" not in str(e), str(e)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def test_corrupt_bit_cleared_by_repair_all(tmp_path, caplog):
    """A consistent image marked corrupt: read-only by default, checked and cleared with
    ``repair=all``."""
    path = tmp_path / "cb.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x51 0 64k")
    raw = bytearray(path.read_bytes())
    struct.pack_into(">Q", raw, 72, 2)
    path.write_bytes(raw)

    async def main(options):
        img = await opened(path, options=options)
        try:
            if not img.readonly:
                await settled(img.write(3 * M, memoryview(b"\x52" * 3), fua=False))
            return img.readonly
        finally:
            await img.close()

    with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
        assert run(main(OpenOptions()))
        assert "marked corrupt" in caplog.text
        assert not run(main(OpenOptions(repair="all")))
    check_clean(path)
    out = qemu_io("qcow2", path, "read -P 0x51 0 64k", "read -P 0x52 3M 3").stdout
    assert "verification failed" not in out


def test_check_fast_path_sees_lies_in_contiguous_tables(tmp_path):
    """Fully allocated L2 tables of one host-contiguous run are checked by slices (the fast
    path of ``check.scan``); a lie inside such a run is found like anywhere else."""
    from nbdserve.formats.qcow2.check import _run_start, scan

    path = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,preallocation=metadata", path, "1M")
    raw = path.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1 + 8 * 5)[0] & OFFSET_MASK
    entry = struct.unpack_from(">Q", raw, l2 + 8 * 17)[0]
    data = (entry & OFFSET_MASK) >> 9

    def findings(image: bytes | bytearray):
        path.write_bytes(image)

        async def main():
            img = await opened(path, readonly=True)
            try:
                drv = img.driver
                runs = 0
                for e in drv.l1:
                    table = await drv.cache.get(drv.l2kind, e & OFFSET_MASK)
                    runs += bool(_run_start(drv, table.value))
                    drv.cache.release(table)
                return runs, await scan(drv)
            finally:
                await img.close()

        return run(main())

    runs, f = findings(raw)
    assert runs == 32 and f.clean  # every table took the fast path
    for value, harmful in ((0, True), (2, False)):
        bad = bytearray(raw)
        set_refcount(bad, data, value)
        runs, f = findings(bad)
        assert runs == 32 and f.harmful == harmful and (harmful or data in f.leaks), f.summary()
    bad = bytearray(raw)  # COPIED cleared on one entry: the table is no longer one run
    struct.pack_into(">Q", bad, l2 + 8 * 17, entry & ~COPIED)
    runs, f = findings(bad)
    assert runs == 31 and f.missing_copied == 1 and not f.harmful
