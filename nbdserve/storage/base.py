"""The storage contract: one byte-addressable store under one format driver (one image layer).

A ``Storage`` is what a format driver reads and writes: the host file of a qcow2 image, the
RBD image that holds a raw disk, the S3 object of a golden image.  Drivers, the cluster cache and
the image layer use only the members below, so every format runs on every backend.

One path, sync when it can: ``read`` and ``write`` return ``None`` when the operation already
completed (a local file on the page cache: no coroutine, no task, no loop turn) and an awaitable
when it must wait (librbd's aio completion, an HTTP GET).  Callers therefore write::

    pending = storage.read(offset, buf)
    if pending is not None:
        await pending

and a synchronous caller that cannot wait treats a non-None result as "not now" only if the
backend promised nothing else (see ``sync_io``).  The remaining operations are rarer and always
coroutines.

Guarantees a backend gives:
  * ``read`` fills the whole buffer; bytes at or past ``size`` read as zeroes.
  * ``write`` writes everything or raises; writing past ``size`` grows it.  ``data`` is a buffer
    or a list of buffers written one after the other (a run of guest writes coalesced: a local
    file's one ``pwritev``).
  * ``flush`` makes every write that completed before the call durable (fdatasync, aio_flush).
  * ``discard`` and ``write_zeroes`` return False, having changed nothing, when the backend cannot
    do them natively (the caller then writes zero bytes or, for a discard hint, does nothing);
    True means the range now reads as zeroes.
  * ``extent(offset, length)`` describes one run starting at ``offset``: ``(run_length, is_data)``
    with ``0 < run_length <= length``; "not data" promises the run reads as zeroes.  Reporting
    data where there is a hole is always allowed; the reverse never is.
  * Errors are ``OSError`` (with an errno) or ``NbdError``; the request fails with that errno.
  * No method keeps a reference to a caller's buffer after it completes successfully.  A read
    that failed (or whose waiter was cancelled) may still be filled by the backend afterwards
    (librbd finishes a read we gave up on by timeout): the backend then keeps its reference
    until that happens, so the memory stays alive, and the caller drops such a buffer without
    reusing it for anything (a pooled buffer is judged free by its reference count).

``name`` is for messages (a path, ``rbd:pool/image``, ``s3://bucket/key``); ``readonly`` stores
refuse every modifying call.  ``sync_io`` is True for backends whose ``read``/``write`` always
complete synchronously (local files): hot paths may rely on that to skip the awaitable check.
``splice_fd`` is a descriptor through which bytes may be written at their own offsets by other
means than ``write`` (``splice(2)`` of a WRITE payload, see ``server.landing``), or None where
``write`` is the only way (a store that is not a local file, or a local file in direct I/O mode).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import ClassVar

Pending = Awaitable[None] | None
Buffer = bytes | bytearray | memoryview


async def settled(pending: Pending) -> None:
    """Wait for ``pending`` if there is anything to wait for: ``await settled(layer.read(...))``
    is the one-line form for code off the hot path."""
    if pending is not None:
        await pending


def joined(pendings: Sequence[Awaitable[None]]) -> Pending:
    """One ``Pending`` for several operations already started (None if none must wait)."""
    if not pendings:
        return None
    if len(pendings) == 1:
        return pendings[0]
    return _all(pendings)


async def _all(pendings: Sequence[Awaitable[None]]) -> None:
    """Wait for every one of ``pendings``, even after one failed (so none is left running with a
    caller's buffer, and no coroutine is left unstarted); then raise the first error."""
    first: BaseException | None = None
    for p in pendings:
        try:
            await p
        except BaseException as e:
            if first is None:
                first = e
    if first is not None:
        raise first


ZERO_CHUNK = bytes(1 << 20)


async def write_zero_bytes(storage: Storage, offset: int, length: int) -> None:
    """Write explicit zero bytes over ``[offset, offset+length)`` (where zeroing is not native)."""
    end = offset + length
    while offset < end:
        n = min(len(ZERO_CHUNK), end - offset)
        await settled(storage.write(offset, memoryview(ZERO_CHUNK)[:n]))
        offset += n


async def read_at(storage: Storage, offset: int, length: int) -> bytearray:
    """``length`` bytes at ``offset`` in a new buffer (metadata reads; zeroes past the end)."""
    buf = bytearray(length)
    pending = storage.read(offset, memoryview(buf))
    if pending is not None:
        await pending
    return buf


class Storage:
    """Base class documenting the contract (see the module docstring)."""

    sync_io: ClassVar[bool] = False
    splice_fd: int | None = None
    name: str
    size: int
    readonly: bool

    def read(self, offset: int, buf: memoryview) -> Pending:
        raise NotImplementedError

    def write(self, offset: int, data: Buffer | list[Buffer]) -> Pending:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    async def discard(self, offset: int, length: int) -> bool:
        return False

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> bool:
        return False

    def can_zero_fast(self) -> bool:
        """False if ``write_zeroes`` is known not to work natively (FAST_ZERO is then refused
        before anything changes); True if it may."""
        return False

    async def extent(self, offset: int, length: int) -> tuple[int, bool]:
        return length, True

    async def truncate(self, size: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the store (locks, connections).  Does not flush: the driver flushes first."""
