"""Coroutine locks modelled on QEMU's CoMutex, CoQueue and CoRwlock, on asyncio futures.

Owns ``CoMutex`` (FIFO, owner-checked, ``assert_locked``), ``CoQueue`` (wait until woken, FIFO)
and ``CoRwLock`` (many readers or one writer; a waiting writer blocks new readers, so writers are
not starved).

Lock order (never acquire against it):
    image rwlock (RMW of sub-alignment writes)  ->  driver CoMutex (metadata)  ->  cache internals
The server's send path takes no lock that a driver holds while awaiting.

Invariants:
  * A lock is handed directly to the first waiter on release (no barging), so waiters are
    served in FIFO order.
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


class CoRwLock:
    """Many readers or one writer.  A queued writer makes later readers wait (no starvation)."""

    __slots__ = ("_queue", "_readers", "_writer")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        # FIFO of (future, is_writer); heads are granted in order as the lock allows.
        self._queue: deque[tuple[asyncio.Future, bool]] = deque()

    async def rdlock(self) -> None:
        if not self._writer and not self._queue:
            self._readers += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((fut, False))
        await fut

    def try_rdlock(self) -> bool:
        """Take a read lock if that needs no waiting (for synchronous fast paths)."""
        if self._writer or self._queue:
            return False
        self._readers += 1
        return True

    async def wrlock(self) -> None:
        if not self._writer and self._readers == 0 and not self._queue:
            self._writer = True
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((fut, True))
        await fut

    def unlock(self) -> None:
        if self._writer:
            self._writer = False
        elif self._readers > 0:
            self._readers -= 1
        else:
            raise AssertionError("CoRwLock: unlock of an unlocked lock")
        self._grant()

    def _grant(self) -> None:
        while self._queue and not self._writer:
            fut, is_writer = self._queue[0]
            if is_writer:
                if self._readers:
                    return
                self._queue.popleft()
                self._writer = True
                fut.set_result(None)
                return
            self._queue.popleft()
            self._readers += 1
            fut.set_result(None)

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def write_locked(self) -> bool:
        return self._writer
