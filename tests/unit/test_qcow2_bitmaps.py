"""qcow2 persistent dirty bitmaps in-process (``nbdserve.formats.qcow2.bitmaps`` and its hooks).

* ``DirtyBitmap`` against a model (hypothesis): marking any unaligned range sets exactly the
  granules it touches, block-status extents are the maximal clean/dirty runs, the data clusters
  hold the bits as the spec lays them out.
* The encoding against QEMU's: the bitmap data QEMU stored for known writes is byte for byte what
  we would store; we load what QEMU stored.
* The in_use protocol: set on disk by a read-write open before any write, cleared by a clean
  close; the autoclear bit stays set; disabled bitmaps are left as they are; a bitmap in use at
  open (a crash) is never updated nor exported; a stale extension is ignored.
* Hostile directories: one line, the image served read-only with a warning (and a ``-B`` of it
  refused), bounded memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.errors import ImageError
from nbdserve.formats.qcow2.bitmaps import (
    MEMORY_CAP,
    BitmapEntry,
    BitmapError,
    DirtyBitmap,
    decode_table,
    granules,
    parse_directory,
)
from nbdserve.formats.qcow2.overlap import BITMAPS
from nbdserve.storage.base import settled
from tests.conftest import SLOW
from tests.imagetest import check_clean, opened, qemu_raw, read_image, run, served_read_only
from tests.util import REPO, merged_map, qemu_img, qemu_io, qemu_nbd

K, M = 1 << 10, 1 << 20
EXT_BITMAPS = 0x23852875


# -- helpers ------------------------------------------------------------------------------------


def directory(raw: bytes | bytearray) -> tuple[int, int, int, list[dict]]:
    """(position of the bitmaps extension, directory offset, directory size, entries)."""
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        t, n = struct.unpack_from(">II", raw, pos)
        assert t, "no bitmaps extension"
        if t == EXT_BITMAPS:
            count, _, size, offset = struct.unpack_from(">IIQQ", raw, pos + 8)
            break
        pos += 8 + ((n + 7) & ~7)
    entries, p = [], offset
    for _ in range(count):
        t_off, t_size, flags, _type, gbits, name_size, extra = struct.unpack_from(">QIIBBHI", raw, p)
        name = bytes(raw[p + 24 + extra : p + 24 + extra + name_size]).decode()
        entries.append(dict(pos=p, table_offset=t_off, table_size=t_size, flags=flags, gbits=gbits, name=name))
        p += (24 + extra + name_size + 7) & ~7
    return pos, offset, size, entries


def flags_of(path: Path) -> dict[str, int]:
    return {e["name"]: e["flags"] for e in directory(path.read_bytes())[3]}


def qemu_bitmaps(path: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


class Model:
    """Which granules of each bitmap are dirty (a set per bitmap)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.gbits: dict[str, int] = {}
        self.enabled: dict[str, bool] = {}
        self.dirty: dict[str, set[int]] = {}

    def add(self, name: str, gbits: int, enabled: bool = True) -> None:
        self.gbits[name], self.enabled[name], self.dirty[name] = gbits, enabled, set()

    def wrote(self, off: int, n: int) -> None:
        for name, g in self.gbits.items():
            if self.enabled[name]:
                self.dirty[name].update(range(off >> g, ((off + n - 1) >> g) + 1))

    def runs(self, name: str) -> list[tuple[int, int, int]]:
        """(offset, length, 1 dirty / 0 clean) maximal runs over the disk."""
        g, dirty, out = self.gbits[name], self.dirty[name], []
        for i in range(granules(self.size, g)):
            lo, hi, v = i << g, min(self.size, (i + 1) << g), int(i in dirty)
            if out and out[-1][2] == v:
                out[-1] = (out[-1][0], hi - out[-1][0], v)
            else:
                out.append((lo, hi - lo, v))
        return out


def runs_of(bm, size: int) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    for length, v in bm.extents(0, size, 1 << 30):
        out.append((pos, length, v))
        pos += length
    assert pos == size
    return out


def make(path: Path, size: int, cluster_size: int, spec, model: Model, writes=()) -> None:
    """An image with the bitmaps of ``spec`` ((name, granularity_bits, enabled, [(off, len)])):
    each is added, then its writes are made (dirtying every enabled bitmap so far), then it is
    disabled if it should be.  ``writes``: made last."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, str(size))
    for name, gbits, enabled, ranges in spec:
        qemu_img("bitmap", "--add", "-g", str(1 << gbits), path, name)
        model.add(name, gbits)
        for off, n in ranges:
            qemu_io("qcow2", path, f"write -P 0x5a {off} {n}")
            model.wrote(off, n)
        if not enabled:
            qemu_img("bitmap", "--disable", path, name)
            model.enabled[name] = False
    for off, n in writes:
        qemu_io("qcow2", path, f"write -P 0x5b {off} {n}")
        model.wrote(off, n)


# -- DirtyBitmap against a model --------------------------------------------------------------


@settings(max_examples=400 if SLOW else 80, deadline=None)
@given(
    gbits=st.sampled_from([9, 10, 12, 16]),
    cluster_size=st.sampled_from([512, 1024]),
    size=st.integers(1, 3 << 20),
    ops=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 300 * K)), max_size=12),
    queries=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 4 << 20), st.integers(1, 6)), max_size=6),
)
def test_dirty_bitmap_against_model(gbits, cluster_size, size, ops, queries):
    size = (size + 511) & ~511
    entry = BitmapEntry("b", 0, 1 << 16, 1, 2, gbits)
    bm = DirtyBitmap(entry, size, cluster_size)
    dirty: set[int] = set()
    nbits = granules(size, gbits)
    for frac, n in ops:
        off = int(frac * (size - 1))
        n = min(n, size - off)
        bm.mark(off, n)
        dirty.update(range(off >> gbits, ((off + n - 1) >> gbits) + 1))
    # bits: every granule, and nothing past the last one (the stored tail is zero)
    assert {g for g in range(nbits) if bm.get(g)} == dirty
    # changed data clusters: exactly those holding a dirty bit
    assert {i for i, c in enumerate(bm.changed) if c} == {g // (8 * cluster_size) for g in dirty}
    # the stored layout: bit i is bit i % 8 of byte i // 8, clusters zero padded
    for i in range(len(bm.changed)):
        data = bm.chunk(i, cluster_size)
        assert len(data) == cluster_size
        base = i * cluster_size * 8
        want = bytearray(cluster_size)
        for g in dirty:
            if base <= g < base + cluster_size * 8:
                want[(g - base) >> 3] |= 1 << (g & 7)
        assert data == want
    # extents: maximal runs, values from the model, clean past the end, limits honoured
    for frac, n, limit in [(0.0, size, 1 << 20), *queries]:
        off = int(frac * (size - 1))
        ext = bm.extents(off, n, limit)
        assert 1 <= len(ext) <= limit
        assert all(length > 0 for length, _ in ext)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(ext))
        pos = off
        for length, v in ext:
            for g in range(pos >> gbits, ((pos + length - 1) >> gbits) + 1):
                assert v == int(g in dirty), (pos, length, v, g)
            pos += length
        assert pos == off + n or len(ext) == limit


def test_parse_directory_and_table_decoding():
    cs = 4096
    size = 64 * M

    def entry(name: bytes, *, t_off=0x10000, t_size=None, flags=2, btype=1, gbits=16, extra=b"") -> bytes:
        if t_size is None:
            t_size = -(-granules(size, gbits) // (8 * cs))
        head = struct.pack(">QIIBBHI", t_off, t_size, flags, btype, gbits, len(name), len(extra))
        body = head + extra + name
        return body + bytes(-len(body) % 8)

    good = entry(b"a") + entry(b"b", t_off=0x20000, gbits=9, flags=3)
    got = parse_directory(good, 2, cs, size)
    assert [(e.name, e.table_offset, e.granularity_bits, e.auto, e.in_use, e.pos) for e in got] == [
        ("a", 0x10000, 16, True, False, 0),
        ("b", 0x20000, 9, True, True, 32),
    ]
    bad = [
        (good, 1, "more than the 1 bitmaps"),
        (good, 3, "holds 2 bitmaps, the header says 3"),
        (good[:-8], 2, "runs past the directory"),
        (good + bytes(8), 2, "more than the 2"),
        (entry(b""), 1, "bad name"),
        (entry(b"a\0b"), 1, "bad name"),
        (entry(b"\xff\xfe"), 1, "not UTF-8"),
        (entry(b"x" * 1024), 1, "bad name"),
        (entry(b"a") + entry(b"a", t_off=0x20000), 2, "appears twice"),
        (entry(b"a", extra=b"12345678"), 1, "extra data"),
        (entry(b"a", btype=2), 1, "type 2"),
        (entry(b"a", flags=4), 1, "reserved flags"),
        (entry(b"a", flags=1 << 31), 1, "reserved flags"),
        (entry(b"a", gbits=8), 1, "granularity_bits 8"),
        (entry(b"a", gbits=32), 1, "granularity_bits 32"),
        (entry(b"a", t_off=0), 1, "empty or unaligned"),
        (entry(b"a", t_off=0x10200), 1, "empty or unaligned"),
        (entry(b"a", t_size=0), 1, "empty or unaligned"),
        (entry(b"a", t_size=(512 * M // cs) + 1), 1, "too large"),
        (entry(b"a", t_size=0x8000001), 1, "too large"),
        (entry(b"a", t_size=2), 1, "does not fit the disk size"),
    ]
    for raw, count, needle in bad:
        with pytest.raises(BitmapError) as info:
            parse_directory(raw, count, cs, size)
        assert needle in str(info.value) and "\n" not in str(info.value)
    # an in-use bitmap may have any table size (QEMU does not store it before it is consistent)
    assert parse_directory(entry(b"a", t_size=7, flags=1), 1, cs, size)[0].in_use
    # tables
    table = struct.pack(">4Q", 0, 1, 0x30000, 0x00FFFFFFFFFFF000)
    assert list(decode_table(table, cs, "t")) == [0, 1, 0x30000, 0x00FFFFFFFFFFF000]
    for e in (0x30001, 0x30002, 0x30200, 1 << 56, 0x100):
        with pytest.raises(BitmapError, match="entry 0"):
            decode_table(struct.pack(">Q", e), cs, "t")


# -- the encoding against QEMU's ----------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_qemu_stored_bitmaps_load_and_encode_alike(tmp_path, cluster_size):
    """QEMU stores known writes; we load the same bits, and the data clusters QEMU wrote are the
    bytes we would write for the same marks."""
    size = 24 * M + 3 * K
    model = Model(size)
    spec = [
        ("fine", 9, True, [(5 * M + 1, 1), (7 * M - 3, 70 * K)]),
        ("off", 12, False, [(100, 100), (24 * M, 3 * K)]),
        ("coarse", 16, True, []),
    ]
    path = tmp_path / "q.qcow2"
    make(path, size, cluster_size, spec, model, writes=[(0, 4 * K + 1), (20 * M + 7, 2 * M)])
    raw = path.read_bytes()

    async def main():
        img = await opened(path, readonly=True)
        try:
            for name in model.gbits:
                bm = await img.dirty_bitmap(name)
                assert runs_of(bm, size) == model.runs(name)
                e = next(e for e in directory(raw)[3] if e["name"] == name)
                mine = DirtyBitmap(BitmapEntry(name, 0, 0, 1, 0, e["gbits"]), size, cluster_size)
                for g in model.dirty[name]:
                    mine.mark(g << e["gbits"], 1)
                for i in range(e["table_size"]):
                    t = struct.unpack_from(">Q", raw, e["table_offset"] + 8 * i)[0]
                    stored = raw[t : t + cluster_size] if t else bytes(cluster_size)
                    assert stored == mine.chunk(i, cluster_size), (name, i)
        finally:
            await img.close()

    run(main())


# -- the in_use protocol ------------------------------------------------------------------------


def test_read_write_open_marks_in_use_and_clean_close_stores(tmp_path, caplog):
    size = 16 * M
    model = Model(size)
    spec = [("b0", 16, True, [(M, 10)]), ("b9", 9, True, []), ("off", 12, False, [(3 * M, 5)])]
    path = tmp_path / "w.qcow2"
    make(path, size, 4096, spec, model)
    before = path.read_bytes()
    off_entry = next(e for e in directory(before)[3] if e["name"] == "off")
    off_table = before[off_entry["table_offset"] : off_entry["table_offset"] + 8 * off_entry["table_size"]]
    data = bytearray(qemu_raw(path, tmp_path))

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert not img.readonly
            # Before any write: every bitmap is in use on disk, the autoclear bit still set.
            assert flags_of(path) == {"b0": 3, "b9": 3, "off": 1}
            assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1
            drv = img.driver
            _, dir_off, _, entries = directory(path.read_bytes())
            for e in entries:  # the overlap map knows every bitmap cluster
                assert drv.meta.kinds[e["table_offset"] >> drv.cb] == BITMAPS
            assert drv.meta.kinds[dir_off >> drv.cb] == BITMAPS
            ops = [("w", 5 * M + 100, 7000), ("z", 9 * M - 1, 2), ("t", 12 * M + 3, 300 * K), ("w", size - 1, 1)]
            for kind, off, n in ops:
                if kind == "w":
                    await settled(img.write(off, memoryview(b"\x77" * n), fua=False))
                    data[off : off + n] = b"\x77" * n
                elif kind == "z":
                    await img.write_zeroes(off, n, may_trim=True, fast=False, fua=False)
                    data[off : off + n] = bytes(n)
                else:
                    await img.trim(off, n, fua=False)
                    lo, hi = -(-off // 4096) * 4096, (off + n) // 4096 * 4096
                    data[lo:hi] = bytes(hi - lo)
                model.wrote(off, n)
            await img.flush()
            assert flags_of(path) == {"b0": 3, "b9": 3, "off": 1}  # a flush does not store bitmaps
            for name in model.gbits:  # live, before anything is stored
                assert runs_of(await img.dirty_bitmap(name), size) == model.runs(name)
        finally:
            await img.close()

    run(main())
    assert caplog.text == ""
    after = path.read_bytes()
    assert flags_of(path) == {"b0": 2, "b9": 2, "off": 0}
    assert struct.unpack_from(">Q", after, 88)[0] == 1  # bitmaps still consistent
    e = next(e for e in directory(after)[3] if e["name"] == "off")
    assert after[e["table_offset"] : e["table_offset"] + 8 * e["table_size"]] == off_table  # disabled: untouched
    check_clean(path)
    assert qemu_raw(path, tmp_path) == data
    assert [(b["name"], b["flags"], b["granularity"]) for b in qemu_bitmaps(path)] == [
        ("b0", ["auto"], 65536),
        ("b9", ["auto"], 512),
        ("off", [], 4096),
    ]

    async def reread():
        img = await opened(path, readonly=True)
        try:
            for name in model.gbits:
                assert runs_of(await img.dirty_bitmap(name), size) == model.runs(name)
        finally:
            await img.close()

    run(reread())


def test_bitmap_in_use_at_open_is_inconsistent(tmp_path, caplog):
    """A bitmap left in use (a crash): served like QEMU does: the image opens read-write, the
    bitmap is never updated nor exported and stays in use; the others work."""
    size = 8 * M
    model = Model(size)
    path = tmp_path / "c.qcow2"
    make(path, size, 65536, [("crashed", 16, True, [(M, 1)]), ("good", 16, True, [])], model)
    raw = bytearray(path.read_bytes())
    e = next(e for e in directory(raw)[3] if e["name"] == "crashed")
    struct.pack_into(">I", raw, e["pos"] + 12, 3)
    path.write_bytes(raw)
    table = raw[e["table_offset"] : e["table_offset"] + 8]

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert not img.readonly
            with pytest.raises(ImageError, match="'crashed' is inconsistent"):
                await img.dirty_bitmap("crashed")
            await settled(img.write(5 * M, memoryview(b"x"), fua=False))
            model.wrote(5 * M, 1)
            assert runs_of(await img.dirty_bitmap("good"), size) == model.runs("good")
        finally:
            await img.close()

    run(main())
    assert "'crashed'" in caplog.text and "in use" in caplog.text
    after = path.read_bytes()
    assert flags_of(path) == {"crashed": 3, "good": 2}
    assert after[e["table_offset"] : e["table_offset"] + 8] == table
    check_clean(path)
    assert [b["flags"] for b in qemu_bitmaps(path)] == [["in-use", "auto"], ["auto"]]


def test_stale_bitmaps_extension_is_ignored(tmp_path, caplog):
    """The autoclear bit clear (a program without bitmap support wrote the image): the bitmaps
    are ignored, as QEMU ignores them, and the bit is never set again."""
    path = tmp_path / "s.qcow2"
    make(path, 8 * M, 65536, [("b", 16, True, [(0, 1)])], Model(8 * M))
    raw = bytearray(path.read_bytes())
    struct.pack_into(">Q", raw, 88, 0)
    path.write_bytes(raw)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert not img.readonly
            with pytest.raises(ImageError, match="bitmap 'b' not found"):
                await img.dirty_bitmap("b")
            await settled(img.write(0, memoryview(b"x"), fua=False))
        finally:
            await img.close()

    run(main())
    assert "invalidated by a program without bitmap support" in caplog.text
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0
    assert qemu_bitmaps(path) == []


def test_bitmaps_of_the_backing_file(tmp_path):
    """``dirty_bitmap`` searches the chain, top first."""
    size = 4 * M
    model = Model(size)
    base = tmp_path / "base.qcow2"
    make(base, size, 65536, [("both", 16, True, [(0, 1)]), ("base", 9, True, [(M + 1, 1000)])], model)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_img("bitmap", "--add", top, "both")

    async def main():
        img = await opened(top)
        try:
            assert runs_of(await img.dirty_bitmap("both"), size) == [(0, size, 0)]  # the top one
            await settled(img.write(M + 5000, memoryview(b"x" * 10), fua=False))
            assert runs_of(await img.dirty_bitmap("base"), size) == model.runs("base")  # unchanged
            with pytest.raises(ImageError, match="'nope' not found"):
                await img.dirty_bitmap("nope")
        finally:
            await img.close()

    run(main())


# -- hostile directories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_bitmaps(tmp_path_factory) -> tuple[bytes, bytes]:
    """(image bytes, disk contents): two bitmaps with data clusters, 4 KiB clusters."""
    d = tmp_path_factory.mktemp("bm")
    path = d / "p.qcow2"
    make(path, 8 * M, 4096, [("a", 9, True, [(M, 5)]), ("b", 12, True, [(2 * M, 5)])], Model(8 * M))
    return path.read_bytes(), qemu_raw(path, d)


def _entry_field(fmt: str, field_offset: int, value_fn):
    def patch(raw: bytearray) -> None:
        e = directory(raw)[3][1]
        struct.pack_into(fmt, raw, e["pos"] + field_offset, value_fn(raw, e))

    return patch


def _first_data(raw, e) -> int:
    return struct.unpack_from(">Q", raw, e["table_offset"])[0]


def _set_table_entry(value_fn):
    def patch(raw: bytearray) -> None:
        e = directory(raw)[3][1]
        struct.pack_into(">Q", raw, e["table_offset"], value_fn(raw))

    return patch


def _past_eof(raw) -> int:
    return -(-len(raw) // 4096) * 4096 + 4096


def _reftable(raw) -> int:
    return struct.unpack_from(">Q", raw, 48)[0]


def _l2(raw) -> int:
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    return struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00


def _ext_field(fmt: str, at: int, value_fn):
    def patch(raw: bytearray) -> None:
        pos = directory(raw)[0]
        struct.pack_into(fmt, raw, pos + 8 + at, value_fn(raw))

    return patch


def _other_bitmaps_data(raw) -> int:
    return _first_data(raw, directory(raw)[3][0])


HOSTILE = [
    # caught when the directory is read (any open)
    ("directory-past-eof", _ext_field(">Q", 16, _past_eof), "beyond the end of the file", True),
    ("directory-size-huge", _ext_field(">Q", 8, lambda raw: 60 * M), "beyond the end of the file", True),
    ("count-too-small", _ext_field(">I", 0, lambda raw: 1), "more than the 1 bitmaps", True),
    ("count-too-large", _ext_field(">I", 0, lambda raw: 65535), "the header says 65535", True),
    ("table-past-eof", _entry_field(">Q", 0, lambda raw, e: _past_eof(raw)), "beyond the end", True),
    ("table-size-huge", _entry_field(">I", 8, lambda raw, e: 0x7FFFFFFF), "too large", True),
    ("table-size-wrong", _entry_field(">I", 8, lambda raw, e: e["table_size"] + 1), "does not fit", True),
    ("granularity-8", _entry_field(">B", 17, lambda raw, e: 8), "granularity_bits 8", True),
    ("granularity-40", _entry_field(">B", 17, lambda raw, e: 40), "granularity_bits 40", True),
    ("reserved-flag", _entry_field(">I", 12, lambda raw, e: 2 | 1 << 7), "reserved flags", True),
    ("type-0", _entry_field(">B", 16, lambda raw, e: 0), "type 0", True),
    ("name-duplicate", _entry_field(">B", 24, lambda raw, e: ord("a")), "appears twice", True),
    ("name-nul", _entry_field(">B", 24, lambda raw, e: 0), "bad name", True),
    ("name-not-utf8", _entry_field(">B", 24, lambda raw, e: 0xFF), "not UTF-8", True),
    ("name-size-past-directory", _entry_field(">H", 18, lambda raw, e: 900), "runs past the directory", True),
    # caught when the bitmap's table is read (loading it)
    ("table-entry-reserved", _set_table_entry(lambda raw: 1 << 60), "malformed", True),
    ("table-entry-unaligned", _set_table_entry(lambda raw: 0x10200), "malformed", True),
    ("data-past-eof", _set_table_entry(_past_eof), "beyond the end", True),
    # caught by the consistency check of a read-write open (the overlap map)
    ("table-on-reftable", _entry_field(">Q", 0, lambda raw, e: _reftable(raw)), "overlaps", False),
    ("data-on-l2", _set_table_entry(_l2), "overlaps", False),
    ("data-shared", _set_table_entry(_other_bitmaps_data), "shares a cluster", False),
    ("table-on-directory", _entry_field(">Q", 0, lambda raw, e: directory(raw)[1]), "shares a cluster", False),
]


@pytest.mark.parametrize(("patch", "needle", "export_refused"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_bitmap_directory(tmp_path, pristine_bitmaps, patch, needle, export_refused, caplog):
    raw0, disk = pristine_bitmaps
    raw = bytearray(raw0)
    patch(raw)
    warning = served_read_only(tmp_path, raw, caplog, expected=disk)
    assert needle in warning, warning
    assert all(len(line) < 400 for line in warning.splitlines())
    if not export_refused:
        return
    path = tmp_path / "ro.qcow2"

    async def export():
        img = await opened(path, readonly=True)
        try:
            with pytest.raises(ImageError) as info:
                await img.dirty_bitmap("b")
            assert needle in str(info.value) and "\n" not in str(info.value)
            assert await read_image(img) == disk
        finally:
            await img.close()

    run(export())


def test_bitmap_beyond_the_memory_cap_is_refused_before_allocating(tmp_path):
    """A 2 TiB disk with a 512-byte granularity bitmap (QEMU allows it: 512 MiB of bits): more than
    the cap.  Read-write: served read-only with one line; export: refused; memory stays small."""
    path = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "2T")
    qemu_img("bitmap", "--add", "-g", "512", path, "huge")
    assert granules(2 << 40, 9) // 8 > MEMORY_CAP
    script = f"""
import asyncio, logging, sys
sys.path.insert(0, {str(REPO)!r})
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from tests.imagetest import opened
from nbdserve.storage.base import settled
async def main():
    img = await opened({str(path)!r})
    print("readonly", img.readonly)
    try:
        await img.dirty_bitmap("huge")
    except Exception as e:
        print("export:", e)
    await img.close()
asyncio.run(main())
print("peak_kib", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])  # (this process only)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "readonly True" in p.stdout
    assert "needs 512 MiB in memory" in p.stdout and "256 MiB cap" in p.stdout
    assert "bitmaps cannot be kept up to date" in p.stderr and "read-only" in p.stderr
    rss = int(p.stdout.split("peak_kib")[1])
    assert rss < 200 * 1024, rss
    assert flags_of(path) == {"huge": 2}  # untouched


def test_all_ones_table_entries_load_and_survive_a_store(tmp_path):
    """A table entry "all ones" without a data cluster (the spec allows it; QEMU never writes it):
    read as all dirty, kept as it is when the bitmap is stored, read so by QEMU."""
    size = 5 * M
    path = tmp_path / "ones.qcow2"
    model = Model(size)
    make(path, size, 512, [("b", 9, True, [])], model)
    raw = bytearray(path.read_bytes())
    e = directory(raw)[3][0]
    assert e["table_size"] == 3  # 2 MiB of disk per 512-byte data cluster
    struct.pack_into(">Q", raw, e["table_offset"] + 8, 1)  # the second 2 MiB: all dirty
    path.write_bytes(raw)
    model.dirty["b"].update(range(4096, 8192))

    async def main():
        img = await opened(path)
        try:
            assert runs_of(await img.dirty_bitmap("b"), size) == model.runs("b")
            for off in (100, 3 * M, 4 * M + 7):  # before, inside and after the all-ones part
                await settled(img.write(off, memoryview(b"w"), fua=False))
                model.wrote(off, 1)
        finally:
            await img.close()

    run(main())
    assert struct.unpack_from(">Q", path.read_bytes(), e["table_offset"] + 8)[0] == 1
    check_clean(path)
    with qemu_nbd(tmp_path, path, "qcow2", "-r", "-B", "b") as q:
        assert merged_map(q.uri, "qemu:dirty-bitmap:b") == model.runs("b")
