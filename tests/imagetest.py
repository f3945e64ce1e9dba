"""Helpers shared by the format-driver tests: QEMU as the oracle, images opened in-process.

* ``FILL``: one deterministic qemu-io script (data, zeroes with and without unmap, runs across
  cluster and block boundaries) that every format's fixtures get.
* ``run``: ``asyncio.run`` that hands the result back through a box (on Python 3.11
  ``asyncio.run`` formats ``repr(task)`` including the result when it restores the SIGINT
  handler, which costs seconds for a disk image's worth of bytes).
* Opening and reading images (``opened``, ``read_image``, ``served_read_only``), QEMU's view of
  the same file (``qemu_raw``, ``qemu_map``, ``check_clean``, ``compare_with_model``) and ours in
  the same terms (``our_map``).
* Writes against a model in-process: ``model_ops`` (a hypothesis strategy of writes, zeroes,
  trims and flushes), ``apply_ops`` (applies them to an image and a bytearray model),
  ``write_concurrently`` (many writes started at once, e.g. into one unallocated cluster).
* Crash states: ``Recorder`` logs every write, truncate and sync of an open image file;
  ``file_after`` rebuilds the file as a crash at any point of that log may leave it.
* Workloads over NBD against a model: ``random_trace``/``replay_trace`` (one connection),
  ``run_streams`` (several connections at once, asynchronous), ``crash_workload``; the kill -9
  oracle (``CrashOracle``) and differential traces (``replay_on_both``, ``assert_same_export``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.errors import NbdError
from nbdserve.image import Image, ImageSpec, open_image
from nbdserve.locks import CoQueue
from nbdserve.protocol.constants import STATE_HOLE, STATE_ZERO
from nbdserve.storage.base import settled
from nbdserve.storage.local import LocalFile
from tests.util import qemu_img
from tests.util import run as run_cmd

FILL = [
    "write -P 0xab 0 64k",
    "write -P 0xcd 100k 4k",
    "write -P 0x11 3M 1M",
    "write -z 8M 128k",
    "write -z -u 10M 64k",
    "write -P 0x22 20M 512",
    "write -P 0x33 63M 1M",
]


def run(coro):
    box = []

    async def boxed():
        box.append(await coro)

    asyncio.run(boxed())
    return box[0]


async def opened(
    path: Path, *, fmt: str | None = None, readonly: bool = False, cache: ClusterCache | int | None = None, **spec
) -> Image:
    """Open ``path`` through the image layer (``cache``: a cache, a budget in bytes, or 8 MiB)."""
    if not isinstance(cache, ClusterCache):
        cache = ClusterCache(cache or 8 << 20)
    return await open_image(ImageSpec(str(path), format=fmt, readonly=readonly, **spec), cache)


async def read_image(img: Image, step: int = 4 << 20) -> bytes:
    buf = bytearray(img.size)
    for pos in range(0, img.size, step):
        await settled(img.read(pos, memoryview(buf)[pos : pos + step]))
    return bytes(buf)


def model_ops(vsize: int, *, write_max: int, zero_max: int, trim_max: int = 0, fast_zero: bool = False):
    """Hypothesis strategy of one op for ``apply_ops``: ``(kind, offset, length, byte, may_trim,
    fast)`` with kind write / zero / trim (only if ``trim_max``) / flush.  (Written by hand, an op
    may stop after its last field that matters: ``("flush",)``, ``("trim", offset, length)``.)"""
    ops = [
        st.tuples(st.just("write"), st.integers(0, vsize - 1), st.integers(1, write_max), st.integers(1, 255)),
        st.tuples(st.just("zero"), st.integers(0, vsize - 1), st.integers(1, zero_max), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(1), st.just(0)),
    ]
    if trim_max:
        ops.append(st.tuples(st.just("trim"), st.integers(0, vsize - 1), st.integers(1, trim_max), st.integers(1, 255)))
    zero_flags = st.tuples(st.booleans(), st.booleans() if fast_zero else st.just(False))
    return st.tuples(st.one_of(ops), zero_flags).map(lambda t: (*t[0], *t[1]))


async def apply_ops(
    img: Image,
    model: bytearray,
    ops,
    lo: int,
    hi: int,
    *,
    trimmed: Callable[[int, int], list[tuple[int, int]]] | None = None,
    fua_every: int = 0,
    fast_unit: int = 0,
) -> None:
    """Apply ``model_ops`` ops, clamped to ``[lo, hi)``, to ``img`` and ``model``.

    ``trimmed(offset, length)``: the ranges a TRIM makes read as zeroes; None: a TRIM leaves its
    range unspecified, so the range is written again right after (the model stays exact).
    ``fua_every``: writes at offsets that are multiples of it carry FUA.  A FAST_ZERO may be
    refused (ENOTSUP) only for a range that is not whole ``fast_unit``s.
    """
    for op in ops:
        kind, off, n, byte, may_trim, fast = (*op, 0, 0, 0, False, False)[:6]
        if kind == "flush":
            await img.flush()
            continue
        off = lo + off % (hi - lo)
        n = min(n, hi - off)
        if kind == "write":
            data = bytes([byte]) * n
            await settled(img.write(off, memoryview(data), fua=bool(fua_every) and off % fua_every == 0))
            model[off : off + n] = data
        elif kind == "zero":
            try:
                await img.write_zeroes(off, n, may_trim=may_trim, fast=fast, fua=False)
            except NbdError as e:
                assert fast and e.errno == errno.ENOTSUP and fast_unit and (off | n) % fast_unit, e
                continue
            model[off : off + n] = bytes(n)
        else:
            await img.trim(off, n, fua=False)
            if trimmed is None:
                data = bytes([byte]) * n
                await settled(img.write(off, memoryview(data), fua=False))
                model[off : off + n] = data
            else:
                for a, b in trimmed(off, n):
                    model[a:b] = bytes(b - a)


def write_concurrently(path: Path, writes: list[tuple[int, bytes]], **spec) -> None:
    """Open ``path`` and start every ``(offset, data)`` write at once, then wait for all."""

    async def go():
        img = await opened(path, **spec)
        try:
            pendings = [img.write(off, memoryview(data), fua=False) for off, data in writes]
            await asyncio.gather(*(p for p in pendings if p is not None))
        finally:
            await img.close()

    run(go())


def with_writes(size: int, writes: list[tuple[int, bytes]]) -> bytearray:
    """A zero disk of ``size`` bytes with ``writes`` applied."""
    disk = bytearray(size)
    for off, data in writes:
        disk[off : off + len(data)] = data
    return disk


def served_read_only(tmp_path: Path, raw: bytes | bytearray, caplog, expected: bytes | None = None) -> str:
    """Open qcow2 ``raw`` read-write: it must be served read-only, reads equal ``expected`` (by
    default QEMU's reading), the file stays unchanged.  Returns the warning."""
    path = tmp_path / "ro.qcow2"
    path.write_bytes(bytes(raw))
    if expected is None:
        expected = qemu_raw(path, tmp_path)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert img.readonly
            assert await read_image(img) == expected
            with pytest.raises(NbdError):
                await settled(img.write(0, memoryview(b"z"), fua=False))
        finally:
            await img.close()

    caplog.clear()
    run(main())
    assert path.read_bytes() == raw
    assert "read-only" in caplog.text
    return caplog.text


def _fmt(fmt: str | None) -> list[str]:
    return ["-f", fmt] if fmt else []


def qemu_raw(path: Path, tmp: Path, *extra: str, fmt: str | None = None) -> bytes:
    """The disk's bytes as QEMU reads them (``qemu-img convert -O raw``)."""
    out = tmp / (Path(path).name + ".qemu.raw")
    qemu_img("convert", "-U", *_fmt(fmt), "-O", "raw", *extra, path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def merge(rows) -> list[tuple]:
    """Merge adjacent (start, length, *key) rows with equal keys."""
    out: list[tuple] = []
    for start, length, *key in rows:
        if out and list(out[-1][2:]) == key and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, *key)
        else:
            out.append((start, length, *key))
    return out


def qemu_map(path: Path, fmt: str | None = None, *, depth: bool = False) -> list[tuple]:
    """``qemu-img map`` as merged (start, length, data, zero, present[, depth or -1]) rows."""
    rows = []
    for e in json.loads(qemu_img("map", "-U", "--output=json", *_fmt(fmt), path).stdout):
        row = (e["start"], e["length"], e["data"], e["zero"], e["present"])
        rows.append((*row, e["depth"] if e["present"] else -1) if depth else row)
    return merge(rows)


async def our_map(img: Image, *, depth: bool = False) -> list[tuple]:
    """Our block status in ``qemu_map``'s terms.

    qemu-img map calls the range past the end of a shorter backing file "not present", where NBD's
    allocation depth (``Run.depth``, as qemu-nbd reports it) attributes it to that backing file.
    """
    rows, pos = [], 0
    sizes = [layer.size for layer in img.chain()]
    for r in await img.runs(0, img.size):
        present = r.depth > 0 and pos < sizes[r.depth - 1]
        row = (pos, r.length, not r.flags & STATE_HOLE, bool(r.flags & STATE_ZERO), present)
        rows.append((*row, r.depth - 1 if present else -1) if depth else row)
        pos += r.length
    assert pos == img.size
    return merge(rows)


def check_clean(path: Path, fmt: str | None = None) -> dict:
    """``qemu-img check``: exit 0, no corruptions, no leaks, no errors; qcow2 not marked corrupt."""
    p = run_cmd("qemu-img", "check", "--output=json", *_fmt(fmt), path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    for key in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"):
        assert report.get(key, 0) == 0, report
    info = json.loads(qemu_img("info", "--output=json", *_fmt(fmt), path).stdout)
    assert not info.get("format-specific", {}).get("data", {}).get("corrupt", False), info
    return report


def compare_with_model(path: Path, model: bytes | bytearray, tmp: Path, fmt: str) -> None:
    """``qemu-img compare`` of the image with a raw file holding ``model``: equal."""
    ref = tmp / "model.raw"
    ref.write_bytes(model)
    p = run_cmd("qemu-img", "compare", "-f", fmt, "-F", "raw", path, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    ref.unlink()


class CountingQueue(CoQueue):
    """A driver's ``CoQueue`` that counts the waits: a test's proof that some coroutine really
    waited there (e.g. a writer for a cluster in flight)."""

    __slots__ = ("waits",)

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    async def wait(self, mutex=None) -> None:
        self.waits += 1
        await super().wait(mutex)


class FlakyBacking:
    """Put in place of ``img.driver.read_backing``: while ``failing``, every backing read fails
    with EIO (after a yield, so that concurrent writers really overlap); else the real read."""

    def __init__(self, img: Image) -> None:
        self.good = img.driver.read_backing
        self.failing = True
        img.driver.read_backing = self.read

    async def read(self, offset: int, buf: memoryview) -> None:
        await asyncio.sleep(0)
        if self.failing:
            raise OSError(errno.EIO, "injected backing read failure")
        await settled(self.good(offset, buf))


async def write_all(img: Image, writes: list[tuple[int, bytes]], *, errors: bool = False) -> list:
    """Start every ``(offset, data)`` write at once and wait for all; ``errors``: return each
    one's exception (or None) instead of raising the first."""

    async def write(off: int, data: bytes) -> None:
        await settled(img.write(off, memoryview(data), fua=False))

    return await asyncio.gather(*(write(o, d) for o, d in writes), return_exceptions=errors)


class Oracle(NamedTuple):
    """How one format's tests compare with QEMU: ``check_clean``, ``compare_raw`` (a
    ``compare_with_model``), ``qemu_map``, ``qemu_raw`` bound to the format, and ``our_map`` and
    ``qemu_map`` with the allocation depth."""

    check_clean: Callable
    compare_raw: Callable
    our_map: Callable
    qemu_map: Callable
    qemu_raw: Callable


def oracle(fmt: str) -> Oracle:
    """``check_clean, compare_raw, our_map, qemu_map, qemu_raw = oracle("qed")``."""
    return Oracle(
        functools.partial(check_clean, fmt=fmt),
        functools.partial(compare_with_model, fmt=fmt),
        functools.partial(our_map, depth=True),
        functools.partial(qemu_map, fmt=fmt, depth=True),
        functools.partial(qemu_raw, fmt=fmt),
    )


class Recorder:
    """Records every write / truncate / flush of one open ``LocalFile``, with the bytes replaced."""

    def __init__(self, f: LocalFile, path: Path) -> None:
        self.f, self.path = f, path
        self.ops: list[tuple] = []  # ("w", off, old, new) | ("t", old_size, new_size) | ("sync",) | ("mark", name)
        self.real = (f.write, f.truncate, f.flush)
        f.write, f.truncate, f.flush = self.write, self.truncate, self.flush

    def write(self, offset, data):
        data = b"".join(data) if isinstance(data, list) else bytes(data)
        old = os.pread(self.f.fd, len(data), offset)
        self.real[0](offset, data)
        self.ops.append(("w", offset, old, data))

    async def truncate(self, size):
        old = self.f.size
        await self.real[1](size)
        self.ops.append(("t", old, size))

    async def flush(self):
        await self.real[2]()
        self.ops.append(("sync",))

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))

    def restore(self) -> None:
        self.f.write, self.f.truncate, self.f.flush = self.real


def file_after(base: bytes, ops: list[tuple], lose_unsynced: bool, keep_last: bool = False) -> bytes:
    """The file after ``ops`` (a ``Recorder`` log).  ``lose_unsynced``: the writes and truncates
    after the last sync are undone, except (``keep_last``) the very last one, which models a disk
    that made a later write durable before earlier unsynced ones."""
    last_sync = max((i for i, op in enumerate(ops) if op[0] == "sync"), default=-1)
    last_io = max((i for i, op in enumerate(ops) if op[0] in ("w", "t")), default=-1)
    buf = bytearray(base)
    for i, op in enumerate(ops):
        if lose_unsynced and i > last_sync and not (keep_last and i == last_io):
            continue
        if op[0] == "w":
            _, off, _, new = op
            if len(buf) < off + len(new):
                buf += bytes(off + len(new) - len(buf))
            buf[off : off + len(new)] = new
        elif op[0] == "t":
            buf = buf[: op[2]] + bytes(max(0, op[2] - len(buf)))
    return bytes(buf)


class CrashOracle:
    """What a crash may leave behind: every sector holds the content it had at the last completed
    flush, or a content it took on since (writes after that flush, acknowledged or in flight).

    ``wrote``/``zeroed`` apply an acknowledged request to the model; ``in_flight`` records a
    sector-aligned write that may or may not land; ``flushed`` marks a completed flush.
    """

    def __init__(self, model: bytes | bytearray, sector: int = 512) -> None:
        self.model = bytearray(model)
        self.sector = sector
        self.at_flush = bytes(self.model)
        self.since: dict[int, set[bytes]] = {}

    def _note(self, off: int, length: int, source: bytes | bytearray) -> None:
        s = self.sector
        for i in range(off // s, -(-(off + length) // s)):
            self.since.setdefault(i, set()).add(bytes(source[i * s : (i + 1) * s]))

    def wrote(self, off: int, data: bytes | bytearray) -> None:
        self.model[off : off + len(data)] = data
        self._note(off, len(data), self.model)

    def in_flight(self, off: int, data: bytes | bytearray) -> None:
        assert off % self.sector == 0 and len(data) % self.sector == 0, "in-flight writes are whole sectors"
        landed = bytearray(self.model)
        landed[off : off + len(data)] = data
        self._note(off, len(data), landed)

    def flushed(self) -> None:
        self.at_flush = bytes(self.model)
        self.since.clear()

    def verify(self, got: bytes | bytearray) -> None:
        s = self.sector
        assert len(got) == len(self.at_flush)
        for i in range(len(got) // s):
            part = bytes(got[i * s : (i + 1) * s])
            if part != self.at_flush[i * s : (i + 1) * s]:
                assert part in self.since.get(i, ()), f"sector {i} holds neither its flushed nor a later content"


def crash_workload(h, rng, oracle: CrashOracle, *, max_len: int, ops: int, in_flight: int, zeroes: float = 0.2) -> None:
    """Random writes, zeroes and flushes through libnbd handle ``h``, then ``in_flight`` aligned
    writes left unanswered (the caller kills the server next).  ``oracle`` tracks what may survive."""
    import nbd

    size = len(oracle.model)
    for _ in range(ops):
        off = rng.randrange(0, size - max_len)
        n = rng.randint(1, max_len)
        if rng.random() < zeroes:
            h.zero(n, off)
            oracle.wrote(off, bytes(n))
        else:
            data = rng.randbytes(n)  # random bytes: a misplaced cluster cannot pass for the right one
            h.pwrite(data, off)
            oracle.wrote(off, data)
        if rng.random() < 0.4:
            h.flush()
            oracle.flushed()
    s = oracle.sector
    for _ in range(in_flight):
        off = rng.randrange(0, (size - max_len) // s) * s
        data = b"\xee" * (max(1, rng.randint(1, max_len) // s) * s)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
        oracle.in_flight(off, data)
    if rng.random() < 0.5:
        h.aio_flush()  # a flush still in flight promises nothing


def random_trace(rng, size: int, n: int, *, max_len: int, sector: int = 1) -> list[tuple[str, int, int, int]]:
    """``n`` random (kind, offset, length, fill byte) requests; ``sector`` aligns them (qemu-nbd
    advertises a 512-byte minimum block size for some formats and libnbd then insists on it)."""
    ops = []
    for i in range(n):
        off = rng.randrange(0, size // sector - 1) * sector
        length = min(max(1, rng.randint(1, max_len) // sector) * sector, size - off)
        kind = rng.choice(["write", "write", "write", "zero", "zero_nohole", "flush", "fua"])
        ops.append((kind, off, length, i % 250 + 1))
    return ops


def replay_trace(uri: str, ops) -> None:
    """Send ``random_trace`` requests to a server through libnbd, one at a time."""
    import nbd

    from tests.util import nbd_connect

    h = nbd_connect(uri)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)  # unaligned requests: the server's RMW
    for kind, off, length, byte in ops:
        if kind == "flush":
            h.flush()
        elif kind == "zero":
            h.zero(length, off)
        elif kind == "zero_nohole":
            h.zero(length, off, nbd.CMD_FLAG_NO_HOLE)
        else:
            h.pwrite(bytes([byte]) * length, off, nbd.CMD_FLAG_FUA if kind == "fua" else 0)
    h.shutdown()


def run_streams(
    uri: str,
    plan: list[list[tuple[str, int, int]]],
    model: bytearray,
    seed: int,
    *,
    stripe: int,
    trim: Callable[[bytearray, int, int], None] | None = None,
    touched: Callable[[int, int], None] | None = None,
) -> None:
    """Send per-connection streams of (kind, offset in the stripe, length) requests (kinds
    ``write``, ``zero``, ``zero_nohole``, ``trim``, ``flush``) through one libnbd connection each,
    asynchronously, connection ``i`` on bytes [i * stripe, (i + 1) * stripe) (connections interleave
    freely in time; requests of one connection in flight together never overlap), keeping
    ``model`` (the disk) up to date.  ``trim(model, offset, length)``: the server's known TRIM
    semantics; without it a TRIM's range is unspecified, so it is written right afterwards.
    ``touched(offset, length)`` is told of every write, zero and trim sent.  Finally every
    connection flushes and reads every stripe back (multi-conn visibility)."""
    import nbd

    from tests.util import nbd_connect

    rng = random.Random(seed)
    handles = [nbd_connect(uri) for _ in plan]
    for h in handles:
        assert h.can_multi_conn()
    pending = [list(reversed(p)) for p in plan]
    inflight: list[list[tuple[int, int]]] = [[] for _ in plan]  # ranges possibly still in flight
    keep = []  # buffers must outlive their requests

    def drain(i: int) -> None:
        while handles[i].aio_in_flight():
            handles[i].poll(-1)
        inflight[i].clear()

    while any(pending):
        i = rng.randrange(len(handles))
        h = handles[i]
        if not pending[i]:
            continue
        kind, off, n = pending[i].pop()
        off += i * stripe
        n = min(n, (i + 1) * stripe - off)
        if not h.aio_in_flight():
            inflight[i].clear()
        if any(a < off + n and off < b for a, b in inflight[i]):
            drain(i)  # requests in flight together are unordered: never overlap them
        inflight[i].append((off, off + n))
        if touched is not None and kind != "flush":
            touched(off, n)
        if kind == "write":
            data = rng.randbytes(n)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            keep.append(buf)
            h.aio_pwrite(buf, off)
            model[off : off + n] = data
        elif kind in ("zero", "zero_nohole"):
            h.aio_zero(n, off, flags=nbd.CMD_FLAG_NO_HOLE if kind == "zero_nohole" else 0)
            model[off : off + n] = bytes(n)
        elif kind == "trim" and trim is not None:
            h.aio_trim(n, off)
            trim(model, off, n)
        elif kind == "trim":
            # TRIM is a hint: the range becomes unspecified; make it known by writing it afterwards
            h.aio_trim(n, off)
            drain(i)
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model[off : off + n] = data
        else:
            h.aio_flush()
        if h.aio_in_flight() > 8:
            h.poll(-1)
    for i, h in enumerate(handles):
        drain(i)
        h.flush()
    # every connection sees every stripe (multi-conn visibility after flush)
    for h in handles:
        for i in range(len(handles)):
            got = h.pread(stripe, i * stripe)
            assert got == model[i * stripe : (i + 1) * stripe], f"stripe {i} differs on another connection"
    for h in handles:
        h.shutdown()


def assert_same_export(ours, theirs, *, maps: bool = True) -> None:
    """Two running servers (``tests.util.Served``) export the same disk: size and bytes, and with
    ``maps`` the same ``base:allocation`` and ``qemu:allocation-depth`` maps."""
    from tests.util import merged_map

    assert run_cmd("nbdinfo", "--size", ours.uri).stdout == run_cmd("nbdinfo", "--size", theirs.uri).stdout
    r = run_cmd("qemu-img", "compare", "-f", "raw", "-F", "raw", theirs.uri, ours.uri, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    if maps:
        assert merged_map(ours.uri) == merged_map(theirs.uri)
        depth = "qemu:allocation-depth"
        assert merged_map(ours.uri, depth) == merged_map(theirs.uri, depth)


def replay_on_both(workdir: Path, fmt: str, ours: Path, theirs: Path, ops) -> None:
    """Send the same ``random_trace`` through nbdserve on ``ours`` and qemu-nbd on ``theirs`` (a
    copy); afterwards the two files hold the same disk."""
    from tests.util import qemu_nbd, serve

    with qemu_nbd(workdir, theirs, fmt, "--cache=writeback") as q, serve(workdir, "-f", fmt, ours) as o:
        replay_trace(q.uri, ops)
        replay_trace(o.uri, ops)
    r = run_cmd("qemu-img", "compare", "-f", fmt, "-F", fmt, ours, theirs, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
