"""Ceph RBD images through librbd's asynchronous calls: the ``rbd:`` backend of the storage contract.

Owns ``RbdStorage`` (one open image, its cluster connection and, for writers, RBD's exclusive
lock) and ``AllocationMap`` (which parts of the image hold data, learned from the object map).
The facts about librbd this relies on are written down in docs/ceph.md.

I/O path: ``read``/``write``/``flush``/``discard``/``write_zeroes`` submit librbd ``aio_*`` calls
and return an asyncio future.  librbd calls the completion on its own thread; that thread only
appends ``(op, return value, data)`` to a queue and, if no wake-up is pending, schedules one
drain on the loop with ``call_soon_threadsafe`` (one wake-up for a burst of completions).  Every
future is resolved, and every caller buffer written, on the loop thread only.  Calls that have no
aio form (connect, open, lock, resize, the allocation fetch, close) run on a short-lived daemon
thread, so the loop never blocks on Ceph.

Outages: with ``on_outage="fail"`` a request still unanswered after ``timeout`` seconds fails
with EIO (a sweep every ``timeout/4`` seconds finds them, so the bound is ``1.25 * timeout``).
librbd keeps the operation and finishes it when the cluster is back: a failed read never writes
into the caller's buffer afterwards (the op drops its buffer when it fails), and a write that
failed may or may not have landed, as with any EIO.  With ``"wait"`` requests wait for as long
as the outage lasts.  Either way nothing needs a restart: librbd resends to the OSDs once they
are back.

Locking: a writable open takes RBD's exclusive lock explicitly (``lock_acquire``), which also
stops librbd from handing the lock to another client that asks for it; a second writer is
refused at open with ``ImageError``.  If the holder died, librbd waits until the cluster expires
the dead client's watch, then breaks the lock and blocklists the dead client.  Read-only and
snapshot opens take no lock.

Invariants:
  * ``self.size`` is the image size as of our last open/resize; reads past it return zeroes,
    writes past it grow the image first (one resize at a time, under ``_grow_lock``).
  * An op's buffer is written only while the op is pending; completions of ops that already
    failed by timeout, or whose caller cancelled, are dropped.
  * ``AllocationMap`` never reports a hole where the image may hold data (see its docstring).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ImageError
from .base import Buffer, Pending, Storage
from .location import RbdLocation

log = logging.getLogger(__name__)

# librbd settings this backend depends on, set on our own cluster handle (never stored in the
# cluster).  Why each one matters: docs/ceph.md.
CLIENT_CONF = {
    "rbd_skip_partial_discard": "false",  # a discard zeroes exactly its range
    "rbd_disable_zero_copy_writes": "true",  # librbd copies write data before aio_write returns
    "rbd_non_blocking_aio": "true",  # aio submission is queued, never blocks the caller
    "log_to_stderr": "false",  # Ceph's own log lines stay out of our stderr: we say it in one line
    "err_to_stderr": "false",
}
WINDOW_GRANULES = 16384  # allocation is fetched this many objects at a time (64 GiB of 4 MiB objects)

UNKNOWN, HOLE, DATA = 0, 1, 2


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError:
        raise ImportError("rbd: exports need Ceph's Python bindings (Debian: python3-rados python3-rbd)") from None
    return rados, rbd


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
    """One aio call in flight.  ``buf`` (reads) is dropped when the op fails by timeout."""

    __slots__ = ("buf", "fut", "kind", "length", "offset", "start")

    def __init__(self, fut: asyncio.Future, kind: str, offset: int, length: int, buf: memoryview | None) -> None:
        self.fut = fut
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buf = buf
        self.start = time.monotonic()


class AllocationMap:
    """Which granules (RBD objects) of the image may hold data: UNKNOWN, HOLE or DATA per granule.

    Learned a window of ``WINDOW_GRANULES`` at a time from ``diff_iterate(whole_object=True)``
    (the object map with fast-diff: one OSD read per window), then kept in step with our own
    I/O without asking Ceph again:
      * a write marks its granules DATA when it is submitted (before librbd creates objects);
      * a discard or unmapping write-zeroes, once complete, marks the granules it fully covers
        HOLE when that is exact (``exact_zero``: no parent image, plain striping) and no write
        was submitted since it started; otherwise it marks the granules it touches UNKNOWN
        (fetched again when asked).  With ``exact_zero``, granules it covers partly keep their
        state: librbd keeps an existing object and does not create a missing one.
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

    def note_zeroed(self, offset: int, length: int, seq_at_start: int) -> None:
        """A discard / unmapping write-zeroes of ``offset, length`` (inside the image) completed."""
        g = self.granule
        end = offset + length
        if self.exact_zero and self.write_seq == seq_at_start:
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

    def __init__(self, loc: RbdLocation, handles: tuple[Any, Any, Any], *, readonly: bool) -> None:
        rbd = _bindings()[1]
        self.loc = loc
        self.name = loc.name
        self.readonly = readonly
        self._cluster, self._ioctx, self._image = handles
        self._thick = rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._loop = asyncio.get_running_loop()
        self._timeout = loc.timeout if loc.on_outage == "fail" else None
        self._ops: dict[_Op, None] = {}  # in flight, oldest first
        self._done: collections.deque = collections.deque()
        self._wake_pending = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._grow_lock = asyncio.Lock()
        self._closed = False
        image = self._image
        self.size = image.size()
        granule = image.stat()["obj_size"]
        try:
            image.parent_info()
            has_parent = True
        except rbd.ImageNotFound:
            has_parent = False
        fast_diff = bool(image.features() & rbd.RBD_FEATURE_FAST_DIFF) and not (
            image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID
        )
        plain_striping = image.stripe_count() == 1 and image.stripe_unit() == granule
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
        try:
            _bindings()
        except ImportError as e:
            raise ImageError(loc.name, str(e)) from None
        readonly = readonly or loc.snap is not None
        try:
            handles = await in_thread(
                _open_image, loc, readonly, timeout=loc.timeout, what="open", abandon=_close_handles
            )
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(loc.name, _short(e)) from None
        try:
            if not readonly:
                await in_thread(_lock, loc, handles, timeout=2 * loc.timeout + 30, what="exclusive lock")
            stor = cls(loc, handles, readonly=readonly)
            # librbd keeps its cache write-through until the first flush; our promise is the
            # local file's (durable at FLUSH), so start in the configured mode (docs/ceph.md).
            await stor.flush()
            return stor
        except ImageError:
            _close_soon(handles)
            raise
        except Exception as e:
            _close_soon(handles)
            raise ImageError(loc.name, _short(e)) from None
        except BaseException:
            _close_soon(handles)
            raise

    async def close(self) -> None:
        """Wait for the ops in flight (bounded by the timeout), then close image and connection
        (which releases the exclusive lock)."""
        if self._closed:
            return
        self._closed = True
        pending = [op.fut for op in self._ops]
        if pending:
            await asyncio.wait(pending, timeout=self._timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
        handles = (self._cluster, self._ioctx, self._image)
        try:
            await in_thread(_close_handles, handles, timeout=self._timeout, what=f"{self.name}: close")
        except OSError as e:
            log.warning("%s", e)

    # -- data ----------------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> Pending:
        n = len(buf)
        length = min(n, self.size - offset)
        if length <= 0:
            if n:
                buf[:] = bytes(n)
            return None
        op = self._start("read", offset, length, buf)
        self._submit(op, self._image.aio_read, offset, length)
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
        if isinstance(data, memoryview):  # the bindings take bytes or bytearray only
            data = data.obj if _whole(data) else data.tobytes()
        op = self._start("write", offset, n, None)
        self.map.note_write(offset, n)
        self._submit(op, self._image.aio_write, data, offset)
        return op.fut

    async def flush(self) -> None:
        if self.readonly:
            return
        op = self._start("flush", 0, 0, None)
        self._submit(op, self._image.aio_flush)
        await op.fut

    async def discard(self, offset: int, length: int) -> bool:
        self._check_writable()
        length = min(length, self.size - offset)
        if length <= 0:
            return True
        seq = self.map.write_seq
        op = self._start("discard", offset, length, None)
        self._submit(op, self._image.aio_discard, offset, length)
        await op.fut
        self.map.note_zeroed(offset, length, seq)
        return True

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> bool:
        self._check_writable()
        if length <= 0:
            return True
        if offset + length > self.size:
            await self._grow(offset + length)
        seq = self.map.write_seq
        if may_unmap:
            op = self._start("zero", offset, length, None)
            flags = 0
        else:  # allocated zeroes: a write as far as the map is concerned
            op = self._start("write", offset, length, None)
            flags = self._thick
            self.map.note_write(offset, length)
        self._submit(op, self._image.aio_write_zeroes, offset, length, zero_flags=flags)
        await op.fut
        if may_unmap:
            self.map.note_zeroed(offset, length, seq)
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

    def _start(self, kind: str, offset: int, length: int, buf: memoryview | None) -> _Op:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"{self.name}: closed")
        op = _Op(self._loop.create_future(), kind, offset, length, buf)
        self._ops[op] = None
        if self._timeout is not None and self._sweeper is None:
            self._sweeper = self._loop.call_later(self._timeout / 4, self._sweep)
        return op

    def _submit(self, op: _Op, aio: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Call the aio function with our completion callback (inserted before ``kw``, where
        the bindings expect it); a refusal at submission fails the op at once."""
        try:
            aio(*args, functools.partial(self._completed, op), **kw)
        except Exception as e:
            del self._ops[op]
            raise OSError(
                _to_errno(getattr(e, "errno", None)), f"{self.name}: {op.kind} at {op.offset}: {_short(e)}"
            ) from None

    def _completed(self, op: _Op, completion: Any, data: bytes | None = None) -> None:
        """librbd's completion callback: runs on a librbd thread.  Touches no loop state."""
        self._done.append((op, completion.get_return_value(), data))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _drain(self) -> None:
        """Loop thread: resolve every queued completion."""
        self._wake_pending = False  # before popping: a completion queued after this wakes us again
        done = self._done
        while done:
            op, rv, data = done.popleft()
            if op not in self._ops:  # already failed by timeout
                continue
            del self._ops[op]
            fut = op.fut
            if fut.done():  # the caller gave up (cancelled): its buffer is no longer ours
                op.buf = None
                continue
            if rv < 0:
                fut.set_exception(OSError(_to_errno(-rv), f"{self.name}: {op.kind} at {op.offset}: {_why(-rv)}"))
                continue
            buf = op.buf
            if buf is not None:
                op.buf = None
                got = len(data) if data is not None else 0
                if got:
                    buf[:got] = data
                if got < len(buf):
                    buf[got:] = bytes(len(buf) - got)
            fut.set_result(None)

    def _sweep(self) -> None:
        """Loop thread, every timeout/4 while ops are in flight: fail those older than the timeout."""
        self._sweeper = None
        assert self._timeout is not None
        deadline = time.monotonic() - self._timeout
        while self._ops:
            op = next(iter(self._ops))
            if op.start > deadline:
                break
            del self._ops[op]
            op.buf = None
            if not op.fut.done():
                msg = f"{self.name}: {op.kind} at {op.offset}: no answer from Ceph in {self._timeout:g} s"
                op.fut.set_exception(OSError(errno.EIO, msg))
        if self._ops:
            self._sweeper = self._loop.call_later(self._timeout / 4, self._sweep)

    def _writes_in_flight(self) -> list[tuple[int, int]]:
        return [(op.offset, op.length) for op in self._ops if op.kind == "write"]

    def _fetch_extents(self, offset: int, length: int) -> asyncio.Future:
        return in_thread(_diff, self._image, offset, length, timeout=self._timeout, what=f"{self.name}: allocation")

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


def _whole(view: memoryview) -> bool:
    """True if ``view`` is all of a bytes/bytearray object (then the object itself can be passed)."""
    obj = view.obj
    return isinstance(obj, bytes | bytearray) and view.contiguous and view.nbytes == len(obj)


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _open_image(loc: RbdLocation, readonly: bool) -> tuple[Any, Any, Any]:
    """Blocking (daemon thread): connect to the cluster and open the image."""
    rados, rbd = _bindings()
    cluster = rados.Rados(rados_id=loc.id)
    try:
        try:
            cluster.conf_read_file(loc.conf)
        except rados.Error:
            where = loc.conf or "the default places (CEPH_CONF, /etc/ceph/ceph.conf)"
            raise OSError(errno.ENOENT, f"cannot read a Ceph config from {where}") from None
        cluster.conf_parse_env()
        for key, value in CLIENT_CONF.items():
            cluster.conf_set(key, value)
        cluster.conf_set("client_mount_timeout", str(math.ceil(loc.timeout)))
        try:
            cluster.connect(timeout=max(1, int(loc.timeout)))
        except rados.Error as e:
            raise OSError(errno.EIO, f"cannot connect to the Ceph cluster: {_short(e)}") from None
        try:
            ioctx = cluster.open_ioctx(loc.pool)
        except rados.ObjectNotFound:
            raise OSError(errno.ENOENT, f"no pool {loc.pool!r}") from None
        try:
            if loc.namespace:
                ioctx.set_namespace(loc.namespace)
            image = rbd.Image(ioctx, loc.image, snapshot=loc.snap, read_only=readonly)
        except rbd.ImageNotFound:
            ioctx.close()
            what = f"snapshot {loc.snap!r} of image {loc.image!r}" if loc.snap else f"image {loc.image!r}"
            raise OSError(errno.ENOENT, f"no {what} in pool {loc.pool!r}") from None
        except BaseException:
            ioctx.close()
            raise
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, ioctx, image


def _lock(loc: RbdLocation, handles: tuple[Any, Any, Any]) -> None:
    """Blocking (daemon thread): take the exclusive lock; ``ImageError`` naming the holder if
    another live writer has it."""
    rbd = _bindings()[1]
    image = handles[2]
    try:
        image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
    except (rbd.ReadOnlyImage, rbd.ImageBusy):
        try:
            holders = ", ".join(o["owner"] for o in image.lock_get_owners()) or "another client"
        except rbd.Error:
            holders = "another client"
        raise ImageError(
            loc.name, f"locked by another writer ({holders}); serve it read-only or stop that writer"
        ) from None
    except rbd.Error as e:
        raise ImageError(loc.name, f"cannot take the exclusive lock: {_short(e)}") from None


def _diff(image: Any, offset: int, length: int) -> list[tuple[int, int]]:
    """Blocking (daemon thread): the extents of ``offset, length`` that hold data, object by object."""
    out: list[tuple[int, int]] = []

    def cb(off: int, n: int, exists: bool) -> int:
        if exists:
            out.append((off, n))
        return 0

    image.diff_iterate(offset, length, None, cb, include_parent=True, whole_object=True)
    return out


def _close_soon(handles: tuple[Any, Any, Any]) -> None:
    threading.Thread(target=_close_handles, args=(handles,), daemon=True).start()


def _close_handles(handles: tuple[Any, Any, Any]) -> None:
    cluster, ioctx, image = handles
    try:
        image.close()
    finally:
        ioctx.close()
        cluster.shutdown()
