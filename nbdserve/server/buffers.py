"""Reusable buffers, shared by every connection of a server: ``ReplyBuffers`` for large READ
replies, ``PayloadBuffers`` for WRITE payloads too large to stay in the receive buffer, and
``ReceiveBuffers`` for the request parsers' receive buffers.

Connections take buffers when they need them and give them back (receive buffers) or drop them
(reply buffers, judged free by reference count) when done, so an idle connection holds none: its
memory is its Python objects and the kernel's socket buffers.

A fresh ``bytearray`` of a MiB costs a memset and, once the transport holds several of them,
page faults for new heap memory: about a sixth of the CPU of a 1 MiB read.  Replies of the same
size (clients use one request size: fio's bs, nbdcopy's 256 KiB, qemu-img's 2 MiB) reuse their
buffers instead.

Invariant: a pooled buffer is handed out again only when nothing but the pool refers to it,
judged by its reference count: the transport keeps a reference (a memoryview) to every reply it
has not finished sending, a write in flight keeps one to its payload, and a storage backend
keeps one to the buffer of a read it may still fill (an RBD read that failed by timeout, until
librbd is done with it), so a buffer in use is never overwritten.  A reused buffer holds stale
bytes of an earlier request; callers overwrite all of it (reply header and data; a payload as it
is received).

A payload over ``PayloadBuffers.large`` bytes gets an anonymous mapping of its own instead: its
pages are committed only as the payload arrives, so a client that announces a large write and
stalls pins what it sent, not the announced length.
"""

from __future__ import annotations

import mmap
import sys


def _idle_references() -> int:
    """``sys.getrefcount`` of a pooled buffer nobody else holds, seen from ``ReplyBuffers.get``'s
    loop (measured the same way, so it holds on any interpreter version)."""
    pool = [bytearray(1)]
    for b in pool:
        return sys.getrefcount(b)
    raise AssertionError("unreachable")


_IDLE = _idle_references()


class ReplyBuffers:
    """Buffers by exact size: at most ``per_size`` kept for each of at most ``sizes`` sizes;
    buffers under ``min_size`` bytes are simply allocated (cheap, and too many to pool)."""

    def __init__(self, *, min_size: int = 64 << 10, per_size: int = 8, sizes: int = 2) -> None:
        self.min_size = min_size
        self.per_size = per_size
        self.sizes = sizes
        self._pools: dict[int, list[bytearray]] = {}

    def get(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes: zeroed when new, else with unspecified contents."""
        if size < self.min_size:
            return bytearray(size)
        pool = self._pools.get(size)
        if pool is None:
            if len(self._pools) >= self.sizes:
                del self._pools[next(iter(self._pools))]  # the size used longest ago goes
            pool = self._pools[size] = []
        else:
            for b in pool:
                if sys.getrefcount(b) == _IDLE:
                    return b
        b = bytearray(size)
        if len(pool) < self.per_size:
            pool.append(b)
        return b


class PayloadBuffers(ReplyBuffers):
    """WRITE payload buffers: pooled by exact size up to ``large`` bytes, mapped above."""

    def __init__(self, *, large: int = 1 << 20, **kw: int) -> None:
        super().__init__(**kw)
        self.large = large

    def get(self, size: int) -> bytearray | mmap.mmap:  # type: ignore[override]
        return super().get(size) if size <= self.large else mmap.mmap(-1, size)


class ReceiveBuffers:
    """Fixed-size receive buffers: ``take`` one (a kept one if any), ``give`` it back when it holds
    nothing of value; at most ``keep`` are kept for reuse."""

    def __init__(self, size: int, *, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)
