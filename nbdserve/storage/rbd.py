"""Ceph RBD images through librbd's asynchronous calls: the ``rbd:`` backend of the storage contract.

Owns ``RbdStorage`` (one open image, its cluster connection and, for writers, RBD's exclusive
lock) and ``AllocationMap`` (which parts of the image hold data, learned from the object map).
librbd is reached through its C API (``storage.librbd``); the facts about librbd this relies on
are written down in docs/ceph.md.

I/O path: ``read``/``write``/``flush``/``discard``/``write_zeroes`` submit librbd ``aio_*``
calls tagged with their op's number and return an asyncio future. librbd queues each completion
and bumps the image's eventfd; the loop's reader on that eventfd (``_drain``) collects every
queued completion in one call and resolves their futures, so no Python runs on librbd's threads.
A read lands straight in the caller's buffer; the op keeps a reference to that buffer (and so
its memory alive) until librbd's completion is collected.  Calls that have no aio form (connect,
open, lock, resize, the allocation fetch, close) run on a short-lived daemon thread, so the loop
never blocks on Ceph.

Outages: with ``on_outage="fail"`` a request still unanswered after ``timeout`` seconds fails
with EIO (a sweep every ``timeout/4`` seconds finds them, so the bound is ``1.25 * timeout``).
librbd keeps the operation and finishes it when the cluster is back: a failed read's buffer may
still be written then, and stays referenced by its op until it is (the storage contract: the
caller drops the buffer of a failed read; a pooled buffer is not handed out again while
referenced), and a write that failed may or may not have landed, as with any EIO.  With
``"wait"`` requests wait for as long as the outage lasts.  Either way nothing needs a restart:
librbd resends to the OSDs once they are back.

Locking: a writable open takes RBD's exclusive lock explicitly (``lock_acquire``), which also
stops librbd from handing the lock to another client that asks for it; a second writer is
refused at open with ``ImageError``.  If the holder died, librbd waits until the cluster expires
the dead client's watch, then breaks the lock and blocklists the dead client.  Read-only and
snapshot opens take no lock.

Invariants:
  * ``self.size`` is the image size as of our last open/resize; reads past it return zeroes,
    writes past it grow the image first (one resize at a time, under ``_grow_lock``).
  * Memory librbd may still write (a read's buffer, with its ctypes export) stays referenced
    until that op's completion has been collected or librbd's close of the image has returned,
    also after the op failed by timeout (``_orphans``) or its caller cancelled, and after a
    close we gave up on by timeout.  The eventfd stays open until that close returns too.
  * A read that succeeded has filled its whole buffer: librbd's ``rv`` bytes, zeroes after.
  * ``AllocationMap`` never reports a hole where the image may hold data (see its docstring).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ImageError
from . import librbd
from .base import Buffer, Pending, Storage
from .location import RbdLocation

log = logging.getLogger(__name__)

# librados and librbd settings this backend depends on, set on our own cluster handle (never
# stored in the cluster; they win over the config file and CEPH_ARGS).  Why each one matters:
# docs/ceph.md.
CLIENT_CONF = {
    "rbd_skip_partial_discard": "false",  # a discard zeroes exactly its range
    "rbd_disable_zero_copy_writes": "true",  # librbd copies write data before aio_write returns
    "rbd_non_blocking_aio": "true",  # aio submission is queued, never blocks the caller
    "librados_thread_count": "1",  # one completion thread: fewer hand-offs than two (~10% IOPS)
    "log_to_stderr": "false",  # Ceph's own log lines stay out of our stderr: we say it in one line
    "err_to_stderr": "false",
}
WINDOW_GRANULES = 16384  # allocation is fetched this many objects at a time (64 GiB of 4 MiB objects)

UNKNOWN, HOLE, DATA = 0, 1, 2


def in_thread(
    fn: Callable[..., Any], *args: Any, timeout: float | None, what: str, abandon: Callable[[Any], None] | None = None
) -> asyncio.Future:
    """Run ``fn(*args)`` on a daemon thread; the awaitable fails with EIO after ``timeout``
    seconds (None: no bound).  A call given up on keeps running; if it succeeds later,
    ``abandon(result)`` cleans up on that thread."""
    cf: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        cf.set_running_or_notify_cancel()
        try:
            cf.set_result(fn(*args))
        except BaseException as e:
            cf.set_exception(e)

    threading.Thread(target=run, name="rbd-call", daemon=True).start()
    fut = asyncio.wrap_future(cf)
    if timeout is None:
        return fut

    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if abandon is not None:

                def cleanup(f: concurrent.futures.Future) -> None:
                    if not f.cancelled() and f.exception() is None:
                        threading.Thread(target=abandon, args=(f.result(),), daemon=True).start()

                cf.add_done_callback(cleanup)
            raise OSError(errno.EIO, f"{what}: no answer from the Ceph cluster in {timeout:g} s") from None

    return asyncio.ensure_future(bounded())


class _Op:
    """One aio call in flight, tagged ``tag``.  A read has ``buf``: the caller's buffer that
    librbd writes, and its export, held until the completion is collected."""

    __slots__ = ("buf", "fut", "kind", "length", "offset", "start", "tag")

    def __init__(self, tag: int, fut: asyncio.Future, kind: str, offset: int, length: int) -> None:
        self.tag = tag
        self.fut = fut
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buf: tuple[memoryview, Any] | None = None
        self.start = time.monotonic()


class AllocationMap:
    """Which granules (RBD objects) of the image may hold data: UNKNOWN, HOLE or DATA per granule.

    Learned a window of ``WINDOW_GRANULES`` at a time from ``diff_iterate(whole_object=True)``
    (the object map with fast-diff: one OSD read per window), then kept in step with our own
    I/O without asking Ceph again:
      * a write marks its granules DATA when it is submitted (before librbd creates objects);
      * a discard or unmapping write-zeroes, once complete, marks the granules it fully covers
        HOLE when that is exact (``exact_zero``: no parent image, plain striping), no write over
        it was in flight when it started and none was submitted since; otherwise it marks the
        granules it touches UNKNOWN (fetched again when asked).  With ``exact_zero``, granules it
        covers partly keep their state: librbd keeps an existing object and does not create a
        missing one.
    While a window is being fetched, changes to it are logged and replayed over the fetched
    answer, and granules with writes in flight when the fetch began are kept DATA, so an answer
    older than our own writes never turns them into holes.

    ``enabled`` False (no fast-diff, or its map flagged invalid): every granule is DATA.
    Lock discipline: loop thread only.
    """

    def __init__(
        self,
        size: int,
        granule: int,
        *,
        enabled: bool,
        exact_zero: bool,
        fetch: Callable[[int, int], asyncio.Future],
        writes_in_flight: Callable[[], list[tuple[int, int]]],
    ) -> None:
        self.granule = granule
        self.size = size
        self.enabled = enabled
        self.exact_zero = exact_zero
        self._fetch = fetch
        self._writes_in_flight = writes_in_flight
        self.state = bytearray(self._count(size))
        self.write_seq = 0  # writes submitted so far
        self.fetches = 0  # windows fetched from Ceph (for tests and statistics)
        self._fetching: dict[int, tuple[asyncio.Future, list[tuple[int, int, int]]]] = {}

    def _count(self, size: int) -> int:
        return -(-size // self.granule)

    # -- updates from our own I/O --------------------------------------------------------------

    def _set(self, first: int, stop: int, value: int) -> None:
        if first >= stop:
            return
        self.state[first:stop] = bytes([value]) * (stop - first)
        for w, (_, logged) in self._fetching.items():
            lo, hi = w * WINDOW_GRANULES, (w + 1) * WINDOW_GRANULES
            if first < hi and stop > lo:
                logged.append((max(first, lo), min(stop, hi), value))

    def note_write(self, offset: int, length: int) -> None:
        self.write_seq += 1
        g = self.granule
        self._set(offset // g, min(-(-(offset + length) // g), len(self.state)), DATA)

    def zero_started(self, offset: int, length: int) -> int | None:
        """Called as a discard / unmapping write-zeroes of ``offset, length`` starts; the token for
        ``note_zeroed``: None if a write over the range is in flight (it may land after the
        zeroing: nothing here assumes Ceph applies overlapping requests in the order sent), else
        the count of writes submitted so far."""
        end = offset + length
        if any(o < end and offset < o + n for o, n in self._writes_in_flight()):
            return None
        return self.write_seq

    def note_zeroed(self, offset: int, length: int, token: int | None) -> None:
        """The zeroing that ``zero_started`` gave ``token`` for (inside the image) completed."""
        g = self.granule
        end = offset + length
        if self.exact_zero and token == self.write_seq:
            first = -(-offset // g)  # the granules fully inside the range (the last may end at size)
            stop = len(self.state) if end == self.size else end // g
            self._set(first, stop, HOLE)
        else:
            self._set(offset // g, -(-end // g), UNKNOWN)

    def resize(self, size: int) -> None:
        old = len(self.state)
        new = self._count(size)
        if new < old:
            del self.state[new:]
        else:  # new space holds no objects
            self.state.extend(bytes([HOLE]) * (new - old))
        self.size = size

    # -- queries -------------------------------------------------------------------------------

    async def extent(self, offset: int, length: int) -> tuple[int, bool]:
        """One run from ``offset`` (inside the image), at most ``length`` long."""
        if not self.enabled:
            return length, True
        g = self.granule
        i = offset // g
        if self.state[i] == UNKNOWN:
            await self._load(i // WINDOW_GRANULES)
        s = self.state[i]
        if s == UNKNOWN:  # changed again while loading: say data, ask again next time
            s = DATA
        last = min((offset + length - 1) // g, len(self.state) - 1)
        j = last + 1
        for other in (UNKNOWN, HOLE, DATA):
            if other != s:
                k = self.state.find(other, i + 1, last + 1)
                if k != -1:
                    j = min(j, k)
        return min(j * g, offset + length) - offset, s == DATA

    async def _load(self, w: int) -> None:
        pending = self._fetching.get(w)
        if pending is not None:
            await asyncio.shield(pending[0])
            return
        g = self.granule
        lo = w * WINDOW_GRANULES
        hi = min(lo + WINDOW_GRANULES, len(self.state))
        logged: list[tuple[int, int, int]] = []
        for off, n in self._writes_in_flight():
            first, stop = max(off // g, lo), min(-(-(off + n) // g), hi)
            if first < stop:
                logged.append((first, stop, DATA))
        fut = self._fetch(lo * g, min(hi * g, self.size) - lo * g)
        self.fetches += 1
        self._fetching[w] = (fut, logged)
        try:
            extents = await fut
        finally:
            del self._fetching[w]
        hi = min(hi, len(self.state))  # the image may have shrunk meanwhile
        if lo >= hi:
            return
        fresh = bytearray([HOLE]) * (hi - lo)
        for off, n in extents:
            first, stop = max(off // g, lo), min(-(-(off + n) // g), hi)
            if first < stop:
                fresh[first - lo : stop - lo] = bytes([DATA]) * (stop - first)
        self.state[lo:hi] = fresh
        for first, stop, value in logged:
            stop = min(stop, hi)
            if first < stop:
                self.state[first:stop] = bytes([value]) * (stop - first)


class RbdStorage(Storage):
    """One RBD image (HEAD or a snapshot); see the module docstring.  Open with ``open()``."""

    sync_io = False

    def __init__(self, loc: RbdLocation, image: librbd.Image, *, readonly: bool) -> None:
        """Loop thread; takes over ``image`` (closes it if this fails)."""
        self.loc = loc
        self.name = loc.name
        self.readonly = readonly
        self._image = image
        self._loop = asyncio.get_running_loop()
        self._timeout = loc.timeout if loc.on_outage == "fail" else None
        self._tags = itertools.count(1)
        self._ops: dict[int, _Op] = {}  # in flight by tag, oldest first
        self._orphans: dict[int, _Op] = {}  # reads failed by timeout whose memory librbd may still write
        self._sweeper: asyncio.TimerHandle | None = None
        self._grow_lock = asyncio.Lock()
        self._closed = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            image.notify(self._efd)
            self.size, granule = image.stat()
            has_parent = image.has_parent()
            fast_diff = bool(image.features() & librbd.RBD_FEATURE_FAST_DIFF) and not (
                image.flags() & librbd.RBD_FLAG_FAST_DIFF_INVALID
            )
            plain_striping = image.striping() == (granule, 1)
        except BaseException:
            os.close(self._efd)
            _close_soon(image)
            raise
        self._loop.add_reader(self._efd, self._drain)
        self.map = AllocationMap(
            self.size,
            granule,
            enabled=fast_diff,
            exact_zero=plain_striping and not has_parent,
            fetch=self._fetch_extents,
            writes_in_flight=self._writes_in_flight,
        )

    # -- opening and closing -------------------------------------------------------------------

    @classmethod
    async def open(cls, loc: RbdLocation, *, readonly: bool) -> RbdStorage:
        """Connect, open the image and (writers) take its exclusive lock; ``ImageError`` with
        one line if that fails.  Bounded by ``loc.timeout``; the lock wait by twice that plus
        30 s, as long as a cluster with default settings needs to expire a dead holder."""
        missing = librbd.available()
        if missing is not None:
            raise ImageError(loc.name, missing)
        readonly = readonly or loc.snap is not None
        try:
            image = await in_thread(_open_image, loc, readonly, timeout=loc.timeout, what="open", abandon=_close)
        except Exception as e:
            raise ImageError(loc.name, _short(e)) from None
        try:
            if not readonly:
                await in_thread(_lock, loc, image, timeout=2 * loc.timeout + 30, what="exclusive lock")
        except BaseException as e:
            _close_soon(image)
            if isinstance(e, ImageError) or not isinstance(e, Exception):
                raise
            raise ImageError(loc.name, _short(e)) from None
        try:
            stor = cls(loc, image, readonly=readonly)
        except Exception as e:
            raise ImageError(loc.name, _short(e)) from None
        try:
            # librbd keeps its cache write-through until the first flush; our promise is the
            # local file's (durable at FLUSH), so start in the configured mode (docs/ceph.md).
            await stor.flush()
        except BaseException as e:
            await stor.close()
            if not isinstance(e, Exception):
                raise
            raise ImageError(loc.name, _short(e)) from None
        return stor

    async def close(self) -> None:
        """Wait for the ops in flight (bounded by the timeout), then close image and connection
        (which releases the exclusive lock)."""
        if self._closed:
            return
        self._closed = True
        pending = [op.fut for op in self._ops.values()]
        if pending:
            await asyncio.wait(pending, timeout=self._timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
        # librbd is done with every op, and with our eventfd, once the image is closed: only then
        # may the ops' memory (callers' read buffers) and the eventfd's number be used again.
        efd, held = self._efd, [*self._ops.values(), *self._orphans.values()]
        self._orphans.clear()

        def release(_closed: object = None) -> None:
            os.close(efd)
            held.clear()

        try:
            await in_thread(_close, self._image, timeout=self._timeout, what=f"{self.name}: close", abandon=release)
        except OSError as e:  # still closing: ``release`` runs when librbd returns (never, if it fails)
            log.warning("%s", e)
            self._loop.remove_reader(efd)
        else:
            self._loop.remove_reader(efd)
            release()

    # -- data ----------------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> Pending:
        n = len(buf)
        length = max(0, min(n, self.size - offset))
        if length < n:  # past the end: zeroes
            buf[length:] = bytes(n - length)
        if not length:
            return None
        op = self._start("read", offset, length)
        where, _, export = librbd.address(buf)
        op.buf = (buf, export)
        self._submit(op, self._image.aio_read, offset, where, length)
        return op.fut

    def write(self, offset: int, data: Buffer | list[Buffer]) -> Pending:
        self._check_writable()
        if type(data) is list:
            data = b"".join(data)
        n = len(data)
        if n == 0:
            return None
        if offset + n > self.size:
            return self._grow_then_write(offset, data)
        op = self._start("write", offset, n)
        self.map.note_write(offset, n)
        self._submit(op, self._image.aio_write, offset, data)
        return op.fut

    async def flush(self) -> None:
        if self.readonly:
            return
        op = self._start("flush", 0, 0)
        self._submit(op, self._image.aio_flush)
        await op.fut

    async def discard(self, offset: int, length: int) -> bool:
        self._check_writable()
        length = min(length, self.size - offset)
        if length <= 0:
            return True
        token = self.map.zero_started(offset, length)
        op = self._start("discard", offset, length)
        self._submit(op, self._image.aio_discard, offset, length)
        await op.fut
        self.map.note_zeroed(offset, length, token)
        return True

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> bool:
        self._check_writable()
        if length <= 0:
            return True
        if offset + length > self.size:
            await self._grow(offset + length)
        token = self.map.zero_started(offset, length) if may_unmap else None
        if may_unmap:
            op = self._start("zero", offset, length)
        else:  # allocated zeroes: a write as far as the map is concerned
            op = self._start("write", offset, length)
            self.map.note_write(offset, length)
        self._submit(op, self._image.aio_write_zeroes, offset, length, thick=not may_unmap)
        await op.fut
        if may_unmap:
            self.map.note_zeroed(offset, length, token)
        return True

    def can_zero_fast(self) -> bool:
        return not self.readonly

    async def extent(self, offset: int, length: int) -> tuple[int, bool]:
        if offset >= self.size:
            return length, False
        return await self.map.extent(offset, min(length, self.size - offset))

    async def truncate(self, size: int) -> None:
        self._check_writable()
        async with self._grow_lock:
            await self._resize(size)

    # -- internals -----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.name}: opened read-only")

    def _start(self, kind: str, offset: int, length: int) -> _Op:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"{self.name}: closed")
        tag = next(self._tags)
        op = self._ops[tag] = _Op(tag, self._loop.create_future(), kind, offset, length)
        if self._timeout is not None and self._sweeper is None:
            self._sweeper = self._loop.call_later(self._timeout / 4, self._sweep)
        return op

    def _submit(self, op: _Op, aio: Callable[..., None], *args: Any, **kw: Any) -> None:
        """Call ``aio(op.tag, *args, **kw)``; a refusal at submission fails the op at once."""
        try:
            aio(op.tag, *args, **kw)
        except OSError as e:
            del self._ops[op.tag]
            raise OSError(_to_errno(e.errno), f"{self.name}: {op.kind} at {op.offset}: {_why(e.errno)}") from None

    def _drain(self) -> None:
        """Loop thread, when the eventfd is readable: resolve every completion librbd queued."""
        try:
            os.eventfd_read(self._efd)  # reset first: a completion queued after this bumps it again
        except BlockingIOError:
            pass
        for tag, rv in self._image.poll():
            op = self._ops.pop(tag, None)
            if op is None:  # failed by timeout earlier: librbd is done with its buffer now
                self._orphans.pop(tag, None)
                continue
            fut = op.fut
            if fut.done():  # the caller gave up (cancelled)
                continue
            if rv < 0:
                fut.set_exception(OSError(_to_errno(-rv), f"{self.name}: {op.kind} at {op.offset}: {_why(-rv)}"))
                continue
            if op.buf is not None and rv < op.length:  # a short read: the rest reads as zeroes
                op.buf[0][rv : op.length] = bytes(op.length - rv)
            fut.set_result(None)

    def _sweep(self) -> None:
        """Loop thread, every timeout/4 while ops are in flight: fail those older than the timeout."""
        self._sweeper = None
        assert self._timeout is not None
        deadline = time.monotonic() - self._timeout
        while self._ops:
            op = next(iter(self._ops.values()))
            if op.start > deadline:
                break
            del self._ops[op.tag]
            if op.buf is not None:
                self._orphans[op.tag] = op
            if not op.fut.done():
                msg = f"{self.name}: {op.kind} at {op.offset}: no answer from Ceph in {self._timeout:g} s"
                op.fut.set_exception(OSError(errno.EIO, msg))
        if self._ops:
            self._sweeper = self._loop.call_later(self._timeout / 4, self._sweep)

    def _writes_in_flight(self) -> list[tuple[int, int]]:
        return [(op.offset, op.length) for op in self._ops.values() if op.kind == "write"]

    def _fetch_extents(self, offset: int, length: int) -> asyncio.Future:
        return in_thread(self._image.diff, offset, length, timeout=self._timeout, what=f"{self.name}: allocation")

    async def _grow_then_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._grow(offset + len(data))
        pending = self.write(offset, data)
        if pending is not None:
            await pending

    async def _grow(self, end: int) -> None:
        async with self._grow_lock:
            if end > self.size:
                await self._resize(end)

    async def _resize(self, size: int) -> None:
        """Called with ``_grow_lock`` held."""
        await in_thread(self._image.resize, size, timeout=self._timeout, what=f"{self.name}: resize")
        self.size = size
        self.map.resize(size)


# librbd errors meaning "this process can no longer write the image" (Ceph's EBLOCKLISTED is
# ESHUTDOWN): reported as EIO with these words, not as the client's fault.
_LOST = {
    errno.ESHUTDOWN: "blocklisted by the cluster (another writer broke our lock)",
    errno.EROFS: "lost the exclusive lock to another writer",
}
_PASS = {errno.ENOSPC, errno.EDQUOT, errno.EINVAL}


def _to_errno(err: int | None) -> int:
    """librbd's errno as the request's: space errors and EINVAL as they are, anything else EIO."""
    return err if err in _PASS else errno.EIO


def _why(err: int) -> str:
    return _LOST.get(err) or errno.errorcode.get(err, str(err))


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _open_image(loc: RbdLocation, readonly: bool) -> librbd.Image:
    """Blocking (daemon thread): connect to the cluster and open the image."""
    settings = {**CLIENT_CONF, "client_mount_timeout": str(math.ceil(loc.timeout))}
    return librbd.Image.open(
        conf=loc.conf,
        client_id=loc.id,
        settings=settings,
        pool=loc.pool,
        namespace=loc.namespace,
        name=loc.image,
        snap=loc.snap,
        readonly=readonly,
    )


def _lock(loc: RbdLocation, image: librbd.Image) -> None:
    """Blocking (daemon thread): take the exclusive lock; ``ImageError`` naming the holder if
    another live writer has it."""
    try:
        image.lock_acquire()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EBUSY):
            raise ImageError(loc.name, f"cannot take the exclusive lock: {_short(e)}") from None
        try:
            holders = ", ".join(image.lock_owners()) or "another client"
        except OSError:
            holders = "another client"
        raise ImageError(
            loc.name, f"locked by another writer ({holders}); serve it read-only or stop that writer"
        ) from None


def _close_soon(image: librbd.Image) -> None:
    threading.Thread(target=_close, args=(image,), daemon=True).start()


def _close(image: librbd.Image) -> None:
    image.close()
