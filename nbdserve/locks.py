"""Coroutine locks on asyncio futures: QEMU's CoMutex and CoQueue, and a range lock for the
image layer (QEMU likewise makes a sub-alignment write wait only for requests that overlap it).

Owns ``CoMutex`` (FIFO, owner-checked, ``assert_locked``), ``CoQueue`` (wait until woken, FIFO)
and ``CoRangeLock`` (shared or exclusive holds on ranges; overlapping holds conflict when either
is exclusive, and a waiting request blocks later ones over its range, so none is starved).

Lock order (never acquire against it):
    image range lock (RMW of sub-alignment writes)  ->  driver CoMutex (metadata)  ->  cache internals
The server's send path takes no lock that a driver holds while awaiting.

Invariants:
  * A lock is handed directly to the first waiter on release (no barging), so waiters are
    served in FIFO order (for ``CoRangeLock``: in FIFO order among requests that overlap).
  * Only the owner (``coro.current_owner()``) may unlock a ``CoMutex``; violating that, or
    ``assert_locked`` failing, is a bug and raises ``AssertionError``.
  * Uncontended lock/unlock never suspends, so eagerly started requests stay synchronous.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .coro import current_owner


class CoMutex:
    """A FIFO mutual-exclusion lock for coroutines.  ``async with mutex: ...``."""

    __slots__ = ("_locked", "_owner", "_waiters", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._locked = False
        self._owner: object = None
        self._waiters: deque[tuple[asyncio.Future, object]] = deque()

    def locked(self) -> bool:
        return self._locked

    async def lock(self) -> None:
        me = current_owner()
        if not self._locked:
            self._locked, self._owner = True, me
            return
        if self._owner is me and me is not None:
            raise AssertionError(f"CoMutex {self.name!r}: recursive lock")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, me))
        await fut  # ownership was handed to us by unlock()

    def unlock(self) -> None:
        if not self._locked:
            raise AssertionError(f"CoMutex {self.name!r}: unlock of an unlocked mutex")
        if self._owner is not current_owner():
            raise AssertionError(f"CoMutex {self.name!r}: unlocked by a non-owner")
        while self._waiters:
            fut, owner = self._waiters.popleft()
            if not fut.done():
                self._owner = owner
                fut.set_result(None)
                return
        self._locked, self._owner = False, None

    def assert_locked(self) -> None:
        """Raise unless the caller holds this mutex (QEMU's qemu_co_mutex_assert_locked)."""
        if not self._locked or self._owner is not current_owner():
            raise AssertionError(f"CoMutex {self.name!r}: caller does not hold the lock")

    async def __aenter__(self) -> CoMutex:
        await self.lock()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.unlock()


class CoQueue:
    """Coroutines wait here until woken, in FIFO order (QEMU's CoQueue).

    ``wait(mutex)`` releases ``mutex`` while waiting and re-acquires it before returning, so the
    usual pattern is ``while not condition: await queue.wait(mutex)``.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def wait(self, mutex: CoMutex | None = None) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if mutex is not None:
            mutex.unlock()
        try:
            await fut
        finally:
            if mutex is not None:
                await mutex.lock()

    def wake_all(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class CoRangeLock:
    """Shared or exclusive holds on ranges ``[start, end)``: two holds conflict when they overlap
    and either is exclusive.  A request waits while it conflicts with a hold or with an earlier
    request still waiting (so an exclusive request is not starved by a stream of shared ones over
    its range); requests that conflict with nothing are granted at once, whatever else waits.

    ``try_shared``/``shared``/``exclusive`` return a token; ``unlock(token)`` ends that hold.
    Like every lock here, waiters are never cancelled (see ``coro``)."""

    __slots__ = ("_exclusive", "_held", "_next", "_queue")

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}  # token -> (start, end, exclusive)
        self._exclusive = 0  # exclusive holds in _held
        self._next = 0  # the last token handed out
        # FIFO of (start, end, exclusive, token, future): granted in order as holds allow.
        self._queue: deque[tuple[int, int, bool, int, asyncio.Future]] = deque()

    def try_shared(self, start: int, end: int) -> int | None:
        """A shared hold if that needs no waiting (for synchronous fast paths), else None."""
        if (self._exclusive or self._queue) and self._conflicts(start, end, False):
            return None
        return self._grant_now(start, end, False)

    async def shared(self, start: int, end: int) -> int:
        return await self._acquire(start, end, False)

    async def exclusive(self, start: int, end: int) -> int:
        return await self._acquire(start, end, True)

    def unlock(self, token: int) -> None:
        try:
            start, end, exclusive = self._held.pop(token)
        except KeyError:
            raise AssertionError(f"CoRangeLock: unlock of a token not held ({token})") from None
        if exclusive:
            self._exclusive -= 1
        if self._queue:
            self._grant(start, end)

    @property
    def holds(self) -> list[tuple[int, int, bool]]:
        """The holds now, as (start, end, exclusive)."""
        return list(self._held.values())

    async def _acquire(self, start: int, end: int, exclusive: bool) -> int:
        if not self._conflicts(start, end, exclusive):
            return self._grant_now(start, end, exclusive)
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((start, end, exclusive, self._next, fut))
        return await fut

    def _grant_now(self, start: int, end: int, exclusive: bool) -> int:
        self._next += 1
        self._held[self._next] = (start, end, exclusive)
        self._exclusive += exclusive
        return self._next

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        """Whether a request for ``[start, end)`` must wait: it conflicts with a hold or a waiter."""
        if (exclusive or self._exclusive) and _clash(start, end, exclusive, self._held.values()):
            return True
        return _clash(start, end, exclusive, self._queue)

    def _grant(self, freed_start: int, freed_end: int) -> None:
        """The hold of ``[freed_start, freed_end)`` ended: grant, in order, every waiter that
        conflicts neither with a hold nor with an earlier waiter that still waits.  Only waiters
        overlapping the freed range can have become free (whatever else blocks a waiter still
        does: an earlier waiter granted now blocks it as a hold), so the others are passed over
        without a search, and a release far from a queue of waiters costs one pass over it."""
        waiting: deque[tuple[int, int, bool, int, asyncio.Future]] = deque()
        for item in self._queue:
            start, end, exclusive, token, fut = item
            if (
                not (start < freed_end and freed_start < end)
                or _clash(start, end, exclusive, waiting)
                or _clash(start, end, exclusive, self._held.values())
            ):
                waiting.append(item)
                continue
            self._held[token] = (start, end, exclusive)
            self._exclusive += exclusive
            fut.set_result(token)
        self._queue = waiting


def _clash(start: int, end: int, exclusive: bool, others) -> bool:
    """Whether ``[start, end)`` (exclusive or not) conflicts with any of ``others``, tuples that
    begin (start, end, exclusive): they overlap and either is exclusive."""
    return any(o[0] < end and start < o[1] and (exclusive or o[2]) for o in others)
