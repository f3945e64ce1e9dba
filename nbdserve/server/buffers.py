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
has not finished sending, and a write in flight keeps one to its payload, so a buffer in use is
never overwritten.  A reused buffer holds stale bytes of an earlier request; callers overwrite
all of it (reply header and data; a payload as it is received).

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
    b = pool[0]
    return sys.getrefcount(b)


_IDLE = _idle_references()


class ReplyBuffers:
    """Buffers by exact size: up to ``keep_bytes`` of each of at most ``sizes`` sizes are kept
    (at least one buffer); buffers under ``min_size`` bytes are simply allocated (cheap, and too
    many to pool).  The budget is in bytes so that a deep queue of mid-sized requests (nbdcopy:
    64 requests of 256 KiB per connection) finds its buffers pooled as 1 MiB requests do."""

    def __init__(self, *, min_size: int = 64 << 10, keep_bytes: int = 32 << 20, sizes: int = 2) -> None:
        self.min_size = min_size
        self.keep_bytes = keep_bytes
        self.sizes = sizes
        self._pools: dict[int, list[bytearray]] = {}
        self._next: dict[int, int] = {}  # where the next search of each pool starts

    def get(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes: zeroed when new, else with unspecified contents.

        The search for an idle buffer starts after the last one handed out: replies finish
        sending in about the order they were made, so the next idle buffer is usually the
        first one looked at, however many are in flight."""
        if size < self.min_size:
            return bytearray(size)
        pool = self._pools.get(size)
        if pool is None:
            if len(self._pools) >= self.sizes:
                old = next(iter(self._pools))  # the size used longest ago goes
                del self._pools[old], self._next[old]
            pool = self._pools[size] = []
        else:
            n = len(pool)
            i = self._next[size]
            for _ in range(n):
                if i >= n:
                    i = 0
                b = pool[i]
                if sys.getrefcount(b) == _IDLE:
                    self._next[size] = i + 1
                    return b
                i += 1
        b = bytearray(size)
        if len(pool) < max(1, self.keep_bytes // size):
            pool.append(b)
        self._next[size] = len(pool)
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
